"""The command line: help, shipped configs, and the demo tour at a tiny size."""

from __future__ import annotations

from pathlib import Path

import pytest

from modalseg.cli.main import main
from modalseg.training.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("synth", "verify", "train", "evaluate", "predict", "experiment", "demo"):
        assert cmd in out


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig) and cfg.data


def test_unknown_config_option_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: x\nepochz: 3\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epochz" in err[0] and str(cfg) in err[0]


def test_help_config_documents_every_option(capsys):
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    for name in TrainConfig.__dataclass_fields__:
        assert name in out


def test_demo_tour_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--epochs", "1", "--size", "32", "--patients", "5", "--width", "4"]) == 0
    text = capsys.readouterr().out
    assert "results table" in text and "figure" in text
    for rel in ("results.md", "results.csv", "figures/overlays.png", "figures/attention_maps.png",
                "data/SynthBreast/dataset.json"):
        assert (out / rel).is_file(), rel
    assert len(list((out / "predictions").glob("*.nii.gz"))) == 1
    assert "master_assistant" in (out / "results.md").read_text() and "unet" in (out / "results.md").read_text()
