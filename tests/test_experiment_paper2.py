"""``modalseg experiment paper2`` end to end on tiny synthetic unpaired cardiac data (all six settings)."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import struct

import numpy as np
import pytest

from modalseg.errors import ConfigError
from modalseg.experiments import paper2

SETTINGS_ROWS = ["Single", "UMMKD", "Joint", "MSBN", "Affinity", "CSA"]
CLASS_COLUMNS = [f"{m} {c}" for m in ("CT", "MR") for c in ("LV", "Myo", "RV", "Avg")]


def _args(data, out, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    paper2.add_arguments(parser)
    base = ["--data", str(data), "--output", str(out), "--settings", "all", "--backbone", "dilated_fcn",
            "--width", "2", "--iterations", "2", "--eval-every", "1", "--batch-size", "2", "--folds", "5",
            "--only-folds", "0", "--runs", "1", "--seed", "0", "--precision", "fp32", "--quiet"]
    return parser.parse_args(base + list(extra))


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """Run the whole experiment once (module scope: the later tests reuse its outputs)."""
    from modalseg.data.synth import make_cardiac_dataset

    root = tmp_path_factory.mktemp("paper2")
    data = make_cardiac_dataset(root / "data", num_patients_per_modality=5, slices=3, size=32, seed=2)
    out = root / "exp"
    assert paper2.run(_args(data, out)) == 0
    return data, out


def test_tables_have_six_settings_in_paper_order(experiment):
    _, out = experiment
    for stem in ("table_dice", "table_hd", "table_hd95"):
        rows = _read_csv(out / f"{stem}.csv")
        assert [r["Setting"] for r in rows] == SETTINGS_ROWS
        columns = list(rows[0])
        assert columns[:1 + len(CLASS_COLUMNS)] == ["Setting", *CLASS_COLUMNS]
        assert set(columns) - {"Setting", *CLASS_COLUMNS} <= {"Excluded"}
        md = (out / f"{stem}.md").read_text()
        assert "| Setting | CT LV |" in md and "Note:" in md
        for r in rows:
            for c in CLASS_COLUMNS:
                if r[c] == "n/a":  # every patient's distance infinite: must then be explained
                    assert stem != "table_dice" and r.get("Excluded")
                    continue
                value = float(r[c])
                if stem == "table_dice":
                    assert 0.0 <= value <= 100.0
                else:
                    assert math.isfinite(value) and value >= 0.0
    assert "MONAI" in (out / "table_hd.md").read_text()


def test_table_values_are_the_mean_of_the_patient_records(experiment):
    _, out = experiment
    records = _read_csv(out / "records.csv")
    # fold 0 of 5 on 5 + 5 patients, stratified: one CT and one MR validation patient, 3 classes, 6 settings.
    assert len(records) == 6 * 2 * 3
    dice = {r["Setting"]: r for r in _read_csv(out / "table_dice.csv")}
    for setting in SETTINGS_ROWS:
        for modality in ("CT", "MR"):
            per_class = []
            for cls in ("LV", "Myo", "RV"):
                vals = [float(r["dice"]) for r in records
                        if r["setting"] == setting and r["modality"] == modality and r["class_name"] == cls]
                assert len(vals) == 1
                per_class.append(100 * np.mean(vals))
                assert float(dice[setting][f"{modality} {cls}"]) == pytest.approx(per_class[-1], abs=0.006)
            assert float(dice[setting][f"{modality} Avg"]) == pytest.approx(np.mean(per_class), abs=0.006)
    # Single trains one network per modality: after 2 steps it cannot equal the shared-kernel Joint network.
    single = [r["dice"] for r in records if r["setting"] == "Single"]
    joint = [r["dice"] for r in records if r["setting"] == "Joint"]
    assert single != joint


def test_same_stratified_split_for_every_setting(experiment):
    _, out = experiment
    shared = json.loads((out / "splits.json").read_text())
    assert len(shared) == 5
    for fold in shared:
        assert {p[:2] for p in fold["val"]} == {"ct", "mr"}  # each modality validated in every fold
        assert not set(fold["val"]) & set(fold["train"])
    for setting in paper2.SETTING_ORDER:
        assert json.loads((out / "runs" / setting / "run_0" / "splits.json").read_text()) == shared
        rec = json.loads((out / "records" / setting / "run0_fold0.json").read_text())
        assert rec["signature"]["split"] == shared[0]
        assert rec["steps"] == 2
        assert {r["patient_id"] for r in rec["per_patient"]} == set(shared[0]["val"])


def test_wilcoxon_file(experiment):
    _, out = experiment
    rows = _read_csv(out / "wilcoxon.csv")
    assert [r["modality"] for r in rows] == ["CT", "MR"]
    for r in rows:
        assert (r["a"], r["b"]) == ("CSA", "UMMKD")
        p = float(r["p_two_sided"])
        if math.isnan(p):
            assert r["note"].startswith("n/a")
        else:
            assert 0.0 <= p <= 1.0
            assert int(r["n"]) == 1 and "smallest attainable" in r["note"]


def test_figure_png(experiment):
    _, out = experiment
    png = (out / "figures" / "fig6_masks.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    from modalseg.evaluation.figures import DEFAULT_DPI, PANEL_INCHES

    panel = PANEL_INCHES * DEFAULT_DPI
    assert width == pytest.approx(7 * panel, abs=1)  # columns: GT + six settings
    assert 2 * panel < height < 3 * panel  # rows: one CT and one MR slice (plus title and legend)


def test_second_call_reuses_records(experiment, monkeypatch, capsys):
    data, out = experiment
    from modalseg.training.engine import Trainer

    def no_training(self):
        raise AssertionError("records should have been reused")

    monkeypatch.setattr(Trainer, "fit", no_training)
    before = (out / "table_dice.csv").read_text()
    assert paper2.run(_args(data, out)) == 0
    assert (out / "table_dice.csv").read_text() == before
    assert capsys.readouterr().out.count("reusing") == 6
    # Other options must not silently reuse records made with different ones.
    with pytest.raises(ConfigError, match="iterations"):
        paper2.run(_args(data, out, "--iterations", "3"))


def test_overwrite_retrains_and_compare_option(experiment, monkeypatch, tmp_path):
    import shutil

    data, original = experiment
    out = tmp_path / "exp_copy"  # a copy, so the other tests keep the original records
    shutil.copytree(original, out)
    from modalseg.training.engine import Trainer

    calls = []
    real_fit = Trainer.fit

    def counting_fit(self):
        calls.append(self.cfg.setting)
        return real_fit(self)

    monkeypatch.setattr(Trainer, "fit", counting_fit)
    argv = ("--settings", "msbn,csa", "--overwrite", "--compare", "csa,single", "--recalibrate-bn")
    assert paper2.run(_args(data, out, *argv)) == 0
    assert calls == ["msbn", "csa"]
    rows = _read_csv(out / "wilcoxon.csv")
    assert all(r["b"] == "Single" and r["note"].startswith("n/a") for r in rows)  # Single not in this call
    assert [r["Setting"] for r in _read_csv(out / "table_dice.csv")] == ["MSBN", "CSA"]
    assert "BN statistics re-estimated" in (out / "table_dice.md").read_text()
    assert json.loads((out / "records" / "csa" / "run0_fold0.json").read_text())["signature"]["recalibrate_bn"]


def test_stratified_splits_balance_modalities():
    patients = {f"ct_{i}": ["CT"] for i in range(7)} | {f"mr_{i}": ["MR"] for i in range(5)}
    splits = paper2.stratified_splits(patients, 5, seed=3)
    vals = [s["val"] for s in splits]
    assert sorted(p for v in vals for p in v) == sorted(patients)  # every patient validated exactly once
    assert max(map(len, vals)) - min(map(len, vals)) <= 1
    for v in vals:
        assert 1 <= sum(p.startswith("ct") for p in v) <= 2
        assert sum(p.startswith("mr") for p in v) == 1


def test_bad_options():
    parser = argparse.ArgumentParser()
    paper2.add_arguments(parser)
    for bad in (["--settings", "csa,foo"], ["--compare", "csa"], ["--feature-layers", "group5"],
                ["--only-folds", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["--data", "d", "--output", "o", *bad])


@pytest.mark.skipif(importlib.util.find_spec("modalseg.experiments.paper1") is None,
                    reason="experiments/paper1.py not written yet (the dispatcher imports both)")
def test_cli_dispatch(experiment, monkeypatch):
    from modalseg.cli.main import main
    from modalseg.training.engine import Trainer

    data, out = experiment
    monkeypatch.setattr(Trainer, "fit", lambda self: (_ for _ in ()).throw(AssertionError("no training")))
    argv = ["experiment", "paper2", "--data", str(data), "--output", str(out), "--settings", "msbn,csa",
            "--width", "2", "--iterations", "2", "--eval-every", "1", "--batch-size", "2", "--precision",
            "fp32", "--quiet"]
    assert main(argv) == 0
    assert main([*argv[:-1], "--iterations", "5"]) == 2  # ConfigError -> one line, exit code 2


def test_recalibrate_bn_uses_each_modality_training_slices_only():
    """MSBN: modality 0's re-estimated statistics ignore modality 1's slices; dropout is off (deterministic)."""
    from types import SimpleNamespace

    import torch

    from modalseg.models.msbn import msbn_modules
    from modalseg.models.unpaired import UnpairedSegmenter
    from modalseg.training.precision import resolve_precision

    torch.manual_seed(0)
    net = UnpairedSegmenter("dilated_fcn", ["A", "B"], "msbn", num_classes=3, width=2)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(12, 1, 16, 16)).astype(np.float32)
    train = {"A": np.arange(0, 6), "B": np.arange(6, 12)}  # the task's training groups (cache indices)
    task = SimpleNamespace(groups=lambda which: train if which == "train" else {},
                           inputs=lambda group, idx: (images[idx], ["A", "B"].index(group)))
    trainer = SimpleNamespace(network=net, cfg=SimpleNamespace(batch_size=4), task=task,
                              precision=resolve_precision(torch.device("cpu"), "fp32"))

    def stats(index: int) -> list[torch.Tensor]:
        return [m.bns[index].running_var.clone() for m in msbn_modules(net)]

    before_a = [t.clone() for t in stats(0)]
    paper2.recalibrate_bn(trainer)
    first_a, first_b = stats(0), stats(1)
    assert not all(torch.equal(x, y) for x, y in zip(before_a, first_a, strict=True))
    assert not net.training and all(m.momentum == 0.1 for m in net.modules()
                                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    images[6:] = 5 * rng.normal(size=(6, 1, 16, 16)) + 3  # change modality B's slices only
    paper2.recalibrate_bn(trainer)
    second_a, second_b = stats(0), stats(1)
    assert all(torch.allclose(x, y) for x, y in zip(first_a, second_a, strict=True))
    assert not all(torch.allclose(x, y) for x, y in zip(first_b, second_b, strict=True))


def test_dims_3_trains_the_3d_unet_backbone_with_csa(tmp_path, capsys):
    """``--dims 3 --backbone unet``: the settings train the planned 3D U-Net (MSBN, 3D CSA); records say 3D; the
    dilated FCN is refused in 3D in one line."""
    from modalseg.data.synth import make_cardiac_dataset_3d
    from modalseg.training.checkpoint import read_checkpoint

    data = make_cardiac_dataset_3d(tmp_path / "c3", num_patients_per_modality=3, size=16, seed=4)
    with pytest.raises(ConfigError, match="--dims 3 needs --backbone unet"):
        paper2.run(_args(data, tmp_path / "x", "--dims", "3", "--folds", "3"))
    out = tmp_path / "exp"
    argv = ["--dims", "3", "--backbone", "unet", "--settings", "msbn,csa", "--folds", "3"]
    assert paper2.run(_args(data, out, *argv)) == 0
    assert "3D plan: patch" in capsys.readouterr().out
    record = json.loads((out / "records" / "csa" / "run0_fold0.json").read_text())
    assert record["signature"]["dims"] == 3
    meta = read_checkpoint(out / "runs" / "csa" / "run_0" / "fold_0" / "latest.pt").meta
    assert meta.spatial_dims == 3 and meta.setting == "csa" and meta.patch_size
    assert "in 3D (--dims 3" in (out / "table_dice.md").read_text()
