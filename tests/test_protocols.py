"""Evaluation protocols (issue 18): paper 1's weights and empty-slice count, uneven cardiac data, full budget."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from modalseg.cli.main import main
from modalseg.data.synth import make_cardiac_dataset, synth_cardiac_case
from modalseg.errors import ConfigError
from modalseg.experiments import paper1
from modalseg.models.paper1 import PAPER1_MODELS, PAPER1_TABLE1_ROWS
from test_experiment_paper1 import parse  # noqa: E402
from test_experiment_paper1 import tiny_argv as _tiny_argv  # noqa: E402

MODELS = ["unet", "master_assistant"]


def tiny_argv(data, out, *extra: str, models: list[str] = MODELS) -> list[str]:
    argv = _tiny_argv(data, out, *extra)
    argv[argv.index("--models") + 1] = ",".join(models)
    return argv


def _spy_loads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every checkpoint the experiment loads (the evaluated weights are the last one of a fold)."""
    import modalseg.training.checkpoint as ckpt_mod

    loaded: list[Path] = []
    real = ckpt_mod.load_checkpoint

    def spy(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        loaded.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "load_checkpoint", spy)
    return loaded


def _script_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Epoch 1 validates best and later epochs worse, so best.pt (epoch 1) and latest.pt (epoch 2) differ; the
    tiny networks' own validation is degenerate (all foreground) and would never write best.pt."""
    from modalseg.training.engine import Trainer

    def validate(self):  # noqa: ANN001
        self.last_validation_degenerate = False
        return 1.0 if self.epoch == 1 else 0.0

    monkeypatch.setattr(Trainer, "validate", validate)


def _blank_first_unet_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny U-Net predicts foreground everywhere; blank its first validation slice so that the empty-slice
    count has something to find (the count is then checked against the saved predictions)."""
    from modalseg.training.engine import Trainer

    real = Trainer.predict_split

    def predict_split(self, which="val"):  # noqa: ANN001
        out = real(self, which)
        if self.cfg.model == "unet":
            out["all"].pred[0] = 0
        return out

    monkeypatch.setattr(Trainer, "predict_split", predict_split)


@pytest.fixture(scope="module")
def default_experiment(breast_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("protocols") / "exp"
    with pytest.MonkeyPatch.context() as mp:
        _script_validation(mp)
        _blank_first_unet_slice(mp)
        loaded = _spy_loads(mp)
        assert paper1.run(parse(tiny_argv(breast_dataset, out, "--epochs", "2"))) == 0
    return out, loaded


def _hand_count(out: Path, model: str, cache) -> tuple[int, int]:
    """Empty slices counted from the saved predictions and the cached reference labels."""
    with np.load(out / "records" / f"{model}_run0_fold0_val.npz") as f:
        pred, idx = f["pred"], f["cache_index"]
    empty = ref = 0
    for p, i in zip(pred, idx, strict=True):
        has_ref = bool((np.asarray(cache.labels[i]) > 0).any())
        ref += has_ref
        empty += has_ref and not (p > 0).any()
    return empty, ref


def _table_row(out: Path, model: str) -> dict[str, str]:
    import csv

    with open(out / "table1.csv", newline="") as fh:
        return {r["Model"]: r for r in csv.DictReader(fh)}[PAPER1_TABLE1_ROWS[model]]


# ------------------------------------------------------------------------------------------------ paper 1
def test_paper1_default_evaluates_final_weights(default_experiment, breast_dataset):
    out, loaded = default_experiment
    assert parse(tiny_argv(breast_dataset, out, "--epochs", "2")).checkpoint == "latest"
    md = (out / "table1.md").read_text()
    assert "weights latest.pt (final epoch)" in md and "best.pt" not in md.split("Wall time")[0]
    for model in MODELS:
        fold_dir = out / "runs" / model / "run_0" / "fold_0"
        rec = json.loads((out / "records" / f"{model}_run0_fold0.json").read_text())
        assert (fold_dir / "best.pt").is_file()  # there was a best.pt to choose; the final weights were used
        assert Path(rec["checkpoint"]) == fold_dir / "latest.pt"
        assert [p for p in loaded if p.parent == fold_dir][-1] == fold_dir / "latest.pt"
    assert json.loads((out / "summary.json").read_text())["budget"]["checkpoint"] == "latest"


def test_paper1_empty_slice_count_matches_the_saved_predictions(default_experiment, breast_dataset):
    out, _ = default_experiment
    cache = paper1._open_cache(paper1.build_plan(parse(tiny_argv(breast_dataset, out, "--epochs", "2"))), "unet")
    summary = json.loads((out / "summary.json").read_text())["models"]
    header = (out / "table1.md").read_text().splitlines()
    cols = [c.strip() for c in next(line for line in header if line.startswith("| Model")).strip("|").split("|")]
    assert cols.index("Empty slices") == cols.index("Dice") + 1  # beside Dice
    for model in MODELS:
        rec = json.loads((out / "records" / f"{model}_run0_fold0.json").read_text())
        empty, ref = _hand_count(out, model, cache)
        assert (rec["empty_slices"], rec["reference_slices"]) == (empty, ref)
        assert ref == len(rec["slices"]) > 0  # paper 1's preset keeps the labelled slices only
        # the slices' own statuses agree (Dice 0, status pred_empty)
        assert sum(s["status"] == "pred_empty" for s in rec["slices"]) == empty
        assert summary[model]["empty_slices"]["per_run"] == [empty]
        assert summary[model]["empty_slices"]["reference_slices_per_run"] == [ref]
        assert _table_row(out, model)["Empty slices"] == f"{empty:.1f} ± 0.0 / {ref}"
        assert empty >= (model == "unet")


def test_count_empty_slices_and_version1_records():
    target = np.zeros((4, 3, 3), np.uint8)
    target[0, 1, 1] = target[1, 0, 0] = target[3, 2, 2] = 1
    pred = np.zeros_like(target)
    pred[1, 2, 2] = 1  # slice 1 predicted (wrong place: not empty); slices 0 and 3 empty; slice 2 no reference
    pred[2, 0, 0] = 1
    assert paper1.count_empty_slices(pred, target) == (2, 3)
    # a version-1 record (no counts): from the per-class statuses; a slice is empty only if no class is predicted
    slices = [
        {"patient_id": "a", "z": 0, "status": "pred_empty"}, {"patient_id": "a", "z": 0, "status": "both_empty"},
        {"patient_id": "a", "z": 1, "status": "pred_empty"}, {"patient_id": "a", "z": 1, "status": "ok"},
        {"patient_id": "b", "z": 0, "status": "both_empty"}, {"patient_id": "b", "z": 0, "status": "gt_empty"},
    ]
    assert paper1._empty_counts({"slices": slices}) == (1, 2)
    assert paper1._empty_counts({"slices": slices, "empty_slices": 5, "reference_slices": 9}) == (5, 9)


def test_paper1_checkpoint_best_still_works(breast_dataset, tmp_path, monkeypatch):
    from modalseg.training.engine import Trainer

    real_save = Trainer.save

    def save(self, name):  # noqa: ANN001
        if name == "best.pt" and self.cfg.model == "master_assistant":
            return  # as the engine does after a degenerate validation: no best.pt
        real_save(self, name)

    monkeypatch.setattr(Trainer, "save", save)
    _script_validation(monkeypatch)
    loaded = _spy_loads(monkeypatch)
    out = tmp_path / "best"
    assert paper1.run(parse(tiny_argv(breast_dataset, out, "--epochs", "2", "--checkpoint", "best"))) == 0
    unet = json.loads((out / "records" / "unet_run0_fold0.json").read_text())
    ma = json.loads((out / "records" / "master_assistant_run0_fold0.json").read_text())
    assert Path(unet["checkpoint"]).name == "best.pt" and Path(ma["checkpoint"]).name == "latest.pt"
    unet_dir = out / "runs" / "unet" / "run_0" / "fold_0"
    assert [p for p in loaded if p.parent == unet_dir][-1] == unet_dir / "best.pt"
    assert "empty_slices" in unet and "empty_slices" in ma
    md = (out / "table1.md").read_text()
    assert "weights best.pt (best validation Dice on the reported fold: optimistic; 1 record(s) without best.pt " \
           "used latest.pt)" in md
    assert re.search(r"\| [0-9.]+ ± 0\.0 / \d+ \|", md)
    # records made with best.pt are not mixed into a default (final-weights) table
    with pytest.raises(ConfigError, match="another budget.*checkpoint"):
        paper1.run(parse(tiny_argv(breast_dataset, out, "--epochs", "2")))


def test_full_budget_commands_follow_the_paper(tmp_path):
    from modalseg.cli import synth as synth_cli

    data, out = tmp_path / "my data", tmp_path / "exp"
    synth_cmd, exp_cmd = paper1.full_budget_commands(str(data), str(out))
    synth_argv, exp_argv = shlex.split(synth_cmd), shlex.split(exp_cmd)
    assert synth_argv[:3] == ["modalseg", "synth", "breast"] and exp_argv[:3] == ["modalseg", "experiment", "paper1"]
    sp = argparse.ArgumentParser()
    synth_cli.add_arguments(sp)
    s = sp.parse_args(synth_argv[2:])
    assert (s.patients, s.slices, s.size, s.output) == (313, 1, 256, data)  # Sec. 2: 313 patients, 1 labelled slice
    data.mkdir()
    plan = paper1.build_plan(parse(exp_argv[3:]))
    assert plan.models == list(PAPER1_MODELS) and (plan.runs, plan.folds) == (3, 5)
    assert (plan.epochs, plan.image_size, plan.batch_size, plan.lr, plan.sa_reduction) == (100, 256, 4, 1e-4, 16)
    assert plan.base_width("unet") == 64 and plan.base_width("master_assistant") == 32
    assert plan.checkpoint == "latest" and plan.precision == "fp32" and plan.output == out


# ------------------------------------------------------------------------------------------------ cardiac
def _digest(root: Path) -> str:
    """SHA-256 over every file's path and content; NIfTI files hashed uncompressed (gzip bytes could differ with
    the zlib build although the file content is the same)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name.endswith(".gz"):
                data = gzip.decompress(data)
            h.update(str(p.relative_to(root)).encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


# Computed on the generator before patients_per_modality / modality_gap existed: defaults must not change a byte.
DEFAULT_SMALL_SHA256 = "ff6489aed24be36061f0f43e1794febca6905523033c5549c06649e462ebeefd"
DEFAULT_FULL_SHA256 = "b62efebdabac74c644e83ebc68255d299f7ffe43b3b9dcb84cda0cc626fdd047"


def test_cardiac_defaults_unchanged(tmp_path):
    small = dict(num_patients_per_modality=2, slices=4, size=48, seed=0)
    assert _digest(make_cardiac_dataset(tmp_path / "small", **small)) == DEFAULT_SMALL_SHA256
    assert _digest(make_cardiac_dataset(tmp_path / "full")) == DEFAULT_FULL_SHA256
    # the new options at their neutral values write the same files
    explicit = make_cardiac_dataset(tmp_path / "explicit", **small, patients_per_modality={"CT": 2, "mr": 2},
                                    modality_gap=1.0)
    assert _digest(explicit) == DEFAULT_SMALL_SHA256


def test_cardiac_uneven_patients_per_modality(tmp_path):
    out = make_cardiac_dataset(tmp_path / "uneven", patients_per_modality={"CT": 20, "MR": 5}, slices=2, size=32)
    meta = json.loads((out / "dataset.json").read_text())
    mods = list(meta["case_modality"].values())
    assert (mods.count("CT"), mods.count("MR"), meta["numTraining"]) == (20, 5, 25)
    assert len(list((out / "imagesTr").glob("ct_*_0000.nii.gz"))) == 20
    assert sorted(p.name for p in (out / "labelsTr").glob("mr_*")) == [f"mr_{i:03d}.nii.gz" for i in range(5)]
    assert meta["modalseg_synth"]["patients_per_modality"] == {"CT": 20, "MR": 5}
    assert "num_patients_per_modality" not in meta["modalseg_synth"]
    # subject i is the same whatever the counts (its own random stream)
    even = make_cardiac_dataset(tmp_path / "even", num_patients_per_modality=5, slices=2, size=32)
    assert (out / "imagesTr" / "mr_004_0000.nii.gz").read_bytes() == (even / "imagesTr" / "mr_004_0000.nii.gz"
                                                                     ).read_bytes()
    from modalseg.data.layouts import load_dataset

    assert len(load_dataset(str(out)).cases) == 25
    with pytest.raises(ConfigError, match="not among the modalities"):
        make_cardiac_dataset(tmp_path / "x", modalities=("CT",), patients_per_modality={"MR": 2})
    with pytest.raises(ConfigError, match="positive integer"):
        make_cardiac_dataset(tmp_path / "x", patients_per_modality={"MR": 0})
    with pytest.raises(ConfigError, match="PET"):
        make_cardiac_dataset(tmp_path / "x", patients_per_modality={"PET": 2})
    assert not (tmp_path / "x").exists()


def _blood_myo_contrast(modality: str, gap: float) -> float:
    """LV blood minus myocardium mean, in units of each image's s.d. (what z-score normalisation sees)."""
    gaps = []
    for i in range(3):
        case = synth_cardiac_case(0, modality, i, slices=4, size=48, modality_gap=gap)
        x = case.images[modality].astype(np.float64)
        x = (x - x.mean()) / x.std()
        gaps.append(x[case.label == 500].mean() - x[case.label == 200].mean())
    return float(np.mean(gaps))


def test_cardiac_modality_gap_changes_mr_contrast_not_anatomy():
    ct = _blood_myo_contrast("CT", 1.0)
    assert _blood_myo_contrast("CT", 0.0) == ct  # CT is the reference: the gap does not touch it
    mr_far, mr_mid, mr_near = (_blood_myo_contrast("MR", g) for g in (1.0, 0.5, 0.0))
    assert mr_far > 3 * ct  # bSSFP-like: bright blood, dark myocardium
    assert mr_far > mr_mid > mr_near
    assert abs(mr_near - ct) < 0.25 * ct  # CT's contrast, in MR's texture
    far = synth_cardiac_case(0, "MR", 1, slices=4, size=48)
    near = synth_cardiac_case(0, "MR", 1, slices=4, size=48, modality_gap=0.0)
    assert np.array_equal(far.label, near.label) and far.affine.tolist() == near.affine.tolist()
    assert not np.allclose(far.images["MR"], near.images["MR"])
    with pytest.raises(ConfigError, match="modality gap"):
        synth_cardiac_case(0, "MR", 0, modality_gap=1.5)


def test_cli_synth_cardiac_uneven_and_gap(tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["synth", "cardiac", "--output", str(out), "--patients", "2", "--patients-ct", "4", "--patients-mr", "1",
            "--modality-gap", "0.25", "--slices", "2", "--size", "32"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 CT" in printed and "1 MR" in printed
    meta = json.loads((out / "dataset.json").read_text())["modalseg_synth"]
    assert meta["patients_per_modality"] == {"CT": 4, "MR": 1} and meta["modality_gap"] == 0.25
    assert main(["synth", "breast", "--output", str(tmp_path / "b"), "--patients-mr", "3"]) == 2
    assert "synth cardiac" in capsys.readouterr().err
    assert main(["synth", "cardiac", "--output", str(tmp_path / "d"), "--modality-gap", "2"]) == 2
    assert not (tmp_path / "b").exists() and not (tmp_path / "d").exists()
