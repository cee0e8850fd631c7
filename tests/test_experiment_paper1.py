"""``modalseg experiment paper1``: tiny end-to-end run (Table 1 files, figures, records) and resumability."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import re

import matplotlib.image as mpimg
import numpy as np
import pytest

from modalseg.errors import ConfigError
from modalseg.experiments import paper1
from modalseg.models.paper1 import PAPER1_RECONSTRUCTED_PARAMS, PAPER1_TABLE1_PARAMS, PAPER1_TABLE1_ROWS

MODELS = ["unet", "fuse_unet", "master_assistant"]


def tiny_argv(data, out, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--output", str(out), "--models", ",".join(MODELS), "--runs", "1", "--folds", "5",
        "--only-folds", "0", "--epochs", "1", "--image-size", "32", "--base-width-scale", "0.0625",
        "--sa-reduction", "2", "--precision", "fp32", "--lr", "1e-3", *extra,
    ]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    paper1.add_arguments(parser)
    return parser.parse_args(argv)


def mean_sd(cell: str) -> tuple[float, float]:
    m = re.fullmatch(r"(-?[0-9.]+) ± ([0-9.]+)", cell.strip())
    assert m, cell
    return float(m.group(1)), float(m.group(2))


@pytest.fixture(scope="module")
def experiment(breast_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("paper1") / "exp"
    assert paper1.run(parse(tiny_argv(breast_dataset, out))) == 0
    return out


def test_table_records_and_figures(experiment, breast_dataset):
    out = experiment
    with open(out / "table1.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["Model"] for r in rows] == [PAPER1_TABLE1_ROWS[m] for m in MODELS]  # paper's row order
    by_name = dict(zip(MODELS, rows, strict=True))
    for name, row in by_name.items():
        assert float(row["Params (paper, M)"]) == PAPER1_TABLE1_PARAMS[name]
        # full-size build at paper widths: matches the reconstructed count (3 -> 1 input channels: < 2k params)
        assert abs(float(row["Params (this build at full size, M)"]) - PAPER1_RECONSTRUCTED_PARAMS[name]) < 0.005
        trained = float(row["Params (as trained, M)"])
        assert 0 < trained < 0.5  # widths 4/2 instead of 64/32
        for col in ("Dice", "Sensitivity"):
            m, sd = mean_sd(row[col])
            assert 0.0 <= m <= 100.0 and sd == 0.0  # one run: s.d. 0
        assert mean_sd(row["Relative area difference"])[0] >= 0.0
        assert row["Runs"] == "1"
    # as-trained ratio of the paper: U-Net (base 4) vs FuseUNet (base 2 per stream) -> U-Net is larger
    assert float(by_name["unet"]["Params (as trained, M)"]) > float(by_name["fuse_unet"]["Params (as trained, M)"])
    md = (out / "table1.md").read_text()
    assert "Budget: 1 epochs, image 32x32, base widths 4/2" in md and "Kendall tau" in md

    cache = paper1._open_cache(paper1.build_plan(parse(tiny_argv(breast_dataset, out))), "unet")
    splits = json.loads((out / "splits.json").read_text())
    val = splits[0]["val"]
    for name in MODELS:
        rec = json.loads((out / "records" / f"{name}_run0_fold0.json").read_text())
        assert rec["model"] == name and rec["run"] == 0 and rec["fold"] == 0 and rec["val_patients"] == val
        # same split file in every run folder
        assert json.loads((out / "runs" / name / "run_0" / "splits.json").read_text()) == splits
        assert rec["slices"] and {s["patient_id"] for s in rec["slices"]} == set(val)
        for s in rec["slices"]:
            assert 0.0 <= s["dice"] <= 1.0 and s["class_name"] == "mass"
        assert abs(rec["params_trained"] / 1e6 - float(by_name[name]["Params (as trained, M)"])) <= 1e-4
        npz = np.load(out / "records" / f"{name}_run0_fold0_val.npz")
        assert npz["pred"].shape[0] == len(rec["slices"]) and npz["pred"].shape[1:] == (32, 32)
        for j, s in enumerate(rec["slices"]):  # the record's Dice is the saved prediction's Dice
            assert s["dice"] == pytest.approx(_dice(npz["pred"][j], cache, npz["cache_index"][j]), abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    # table cell = mean over the pooled validation slices of the run
    pooled = np.mean([s["dice"] for s in json.loads(
        (out / "records" / "unet_run0_fold0.json").read_text())["slices"]])
    assert summary["models"]["unet"]["dice"]["mean"] == pytest.approx(pooled)
    assert mean_sd(by_name["unet"]["Dice"])[0] == pytest.approx(100 * pooled, abs=0.051)

    fig4 = mpimg.imread(out / "figures" / "fig4_overlays.png")
    assert fig4.ndim == 3 and fig4.shape[1] > fig4.shape[0]  # columns: image + 3 models
    fig5 = mpimg.imread(out / "figures" / "fig5_attention.png")
    assert fig5.ndim == 3 and fig5.shape[1] > fig5.shape[0]


def _dice(pred: np.ndarray, cache, cache_index: int) -> float:
    gt = np.asarray(cache.labels[cache_index]) > 0
    p = pred > 0
    denom = p.sum() + gt.sum()
    return 1.0 if denom == 0 else float(2 * (p & gt).sum() / denom)


def test_second_invocation_reuses_records(experiment, breast_dataset, monkeypatch, capsys):
    from modalseg.training.engine import Trainer

    def no_training(self):  # noqa: ANN001
        raise AssertionError("training must not run when records exist")

    monkeypatch.setattr(Trainer, "fit", no_training)
    before = (experiment / "records" / "unet_run0_fold0.json").read_text()
    (experiment / "table1.csv").unlink()
    assert paper1.run(parse(tiny_argv(breast_dataset, experiment))) == 0
    assert "3 reused" in capsys.readouterr().out
    assert (experiment / "table1.csv").is_file()
    assert (experiment / "records" / "unet_run0_fold0.json").read_text() == before
    # a different budget must not silently mix with the stored records
    with pytest.raises(ConfigError, match="another budget"):
        paper1.run(parse(tiny_argv(breast_dataset, experiment, "--epochs", "2")))


def test_invalid_options(breast_dataset, tmp_path):
    with pytest.raises(ConfigError, match="unknown model.*known: unet"):
        paper1.run(parse(tiny_argv(breast_dataset, tmp_path / "x")[:4] + ["--models", "unet,bogus"]))
    with pytest.raises(ConfigError, match="only-folds"):
        paper1.run(parse(tiny_argv(breast_dataset, tmp_path / "x", "--only-folds", "7")))
    with pytest.raises(ConfigError, match="multiple of 32"):
        paper1.build_plan(parse(tiny_argv(breast_dataset, tmp_path / "x", "--image-size", "48", "--models",
                                          "fusenet")))
    with pytest.raises(ConfigError, match="set by this command"):
        paper1.build_plan(parse(tiny_argv(breast_dataset, tmp_path / "x", "--set", "epochs=3")))
    plan = paper1.build_plan(parse(tiny_argv(breast_dataset, tmp_path / "x", "--base-width-scale", "0.25",
                                             "--models", "all", "--set", "num_threads=1")))
    assert plan.models == list(PAPER1_TABLE1_PARAMS)
    assert {m: plan.base_width(m) for m in ("unet", "fusenet", "fuse_unet", "master_assistant")} == {
        "unet": 16, "fusenet": 16, "fuse_unet": 8, "master_assistant": 8}
    assert plan.overrides == {"num_threads": 1} and "num_threads" not in plan.budget()["overrides"]


@pytest.mark.skipif(importlib.util.find_spec("modalseg.experiments.paper2") is None,
                    reason="the experiment dispatcher also needs experiments/paper2.py")
def test_cli_entry_point(experiment, breast_dataset, monkeypatch):
    from modalseg.cli.main import main
    from modalseg.training.engine import Trainer

    monkeypatch.setattr(Trainer, "fit", lambda self: (_ for _ in ()).throw(AssertionError("no training")))
    assert main(["experiment", "paper1", *tiny_argv(breast_dataset, experiment)]) == 0
    assert main(["experiment", "paper1", *tiny_argv(breast_dataset, experiment)[:4], "--models", "nope"]) == 2


def test_dims_3_runs_the_table_with_3d_networks_on_the_labelled_slices(tmp_path, capsys):
    """``--dims 3``: planned 3D networks, FuseNet left out of ``all`` (refused by name), records that say 3D, scored
    on the slices with foreground only; the 2D budget is unchanged (2D records stay reusable)."""
    import nibabel as nib

    from modalseg.data.synth import make_breast_dataset_3d
    from modalseg.training.checkpoint import read_checkpoint

    data = make_breast_dataset_3d(tmp_path / "b3", num_patients=4, size=16, seed=3)
    with pytest.raises(ConfigError, match="fixed VGG topology"):
        paper1.build_plan(parse(tiny_argv(data, tmp_path / "x", "--models", "fusenet,unet", "--dims", "3")))
    plan = paper1.build_plan(parse(tiny_argv(data, tmp_path / "x", "--models", "all", "--dims", "3")))
    assert "fusenet" not in plan.models and plan.budget()["dims"] == 3
    assert "dims" not in paper1.build_plan(parse(tiny_argv(data, tmp_path / "y"))).budget()
    out = tmp_path / "exp3"
    argv = tiny_argv(data, out, "--models", "master_assistant", "--folds", "2", "--image-size", "16", "--dims", "3")
    assert paper1.run(parse(argv)) == 0
    assert "3D plan: patch" in capsys.readouterr().out
    record = json.loads((out / "records" / "master_assistant_run0_fold0.json").read_text())
    assert record["budget"]["dims"] == 3
    run_dir = out / "runs" / "master_assistant" / "run_0" / "fold_0"
    meta = read_checkpoint(run_dir / "latest.pt").meta
    assert meta.spatial_dims == 3 and meta.patch_size
    spec_labels = sorted((data / "labelsTr").glob("*.nii.gz"))
    val = set(json.loads((out / "splits.json").read_text())[0]["val"])
    fg_slices = sum(int((np.asarray(nib.load(str(p)).dataobj)[..., z] > 0).any())
                    for p in spec_labels if p.name.rsplit(".nii", 1)[0] in val
                    for z in range(nib.load(str(p)).shape[2]))
    assert len(record["slices"]) == fg_slices > 0
    assert "3D networks (--dims 3" in (out / "table1.md").read_text()


def test_robustness_flag_writes_the_missing_modality_table(breast_dataset, tmp_path, capsys):
    out = tmp_path / "exp"
    argv = tiny_argv(breast_dataset, out, "--models", "unet,master_assistant", "--robustness")
    assert paper1.run(parse(argv)) == 0
    assert "paper1: robustness ->" in capsys.readouterr().out
    text = (out / "robustness.md").read_text()
    # the two-modality model: none, T1C and T2W removed; the single-modality U-Net has no row
    assert text.count("| Proposed |") == 3 and "U-Net (T1C)" not in text
    rows = list(csv.DictReader((out / "robustness" / "master_assistant" / "robustness.csv").open()))
    assert [r["removed"] for r in rows] == ["none", "T1C", "T2W"]
    assert [r["trained"] for r in rows] == ["yes", "no", "no"]
