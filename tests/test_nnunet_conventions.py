"""nnU-Net conventions on the evaluation side (issue 13, items 4 and 5), through the real CLI where possible.

* A: ``evaluate`` scores the cases of the prediction folder; reference cases without a prediction are listed in
  one stdout line; a prediction without a reference is refused; one case prints no ± s.d.
* B: ``summary.json`` in nnU-Net v2's shape, values checked against hand-computed voxel counts.
* C: ``--empty-dice nan``: nnU-Net's NaN Dice for a class absent from both masks, left out of the means.
* D: nnU-Net ``splits_final.json`` (case ids) converted to our patient folds; refusals; ``-f all``.
* E: region-based labels (BraTS) scored per region; the ``ignore`` label's voxels are not scored.

Volumes are 16x16x2 with voxels 0.8 x 0.8 x 3 mm (``AFF`` of test_reliability). With two slices every voxel
of a mask is on its surface, so surface distances are in-plane distances between the masks.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from modalseg.errors import DataError
from test_reliability import SHAPE, _img, assert_refused, files_under, run_cli


def _write(path: Path, array: np.ndarray) -> Path:
    return _img(path, array=np.asarray(array, dtype=np.uint8))


def _box(*boxes: tuple[slice, slice, int]) -> np.ndarray:
    arr = np.zeros(SHAPE, np.uint8)
    for rows, cols, value in boxes:
        arr[rows, cols, :] = value
    return arr


def _evaluate(capsys, pred: Path, ref: Path, out: Path, *extra: str):
    return run_cli(capsys, ["evaluate", "--pred", str(pred), "--labels", str(ref), "--output", str(out), *extra])


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _dataset(root: Path, labels: dict, **extra) -> Path:
    """A dataset.json and one listed image (evaluation reads the labels, never the images)."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "imagesTr" / "c_0000.nii.gz").write_bytes(b"")
    meta = {"channel_names": {"0": "MR"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz", **extra}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


MASS = (slice(4, 10), slice(5, 11), 1)  # 6 x 6 x 2 = 72 voxels


# ------------------------------------------------------------------------------------------------ A
def test_scores_the_prediction_cases_and_lists_the_unscored_references(tmp_path, capsys):
    pred, ref, out = tmp_path / "pred", tmp_path / "ref", tmp_path / "out"
    for k in range(13):
        _write(ref / f"r{k:02d}.nii.gz", _box(MASS))
    _write(pred / "r00.nii.gz", _box(MASS))
    _write(pred / "r05.nii.gz", _box(MASS))
    code, stdout, err = _evaluate(capsys, pred, ref, out)
    assert code == 0 and err == [], err
    listed = [ln for ln in stdout.splitlines() if "have no prediction" in ln]
    assert listed == ["11 reference case(s) have no prediction and are not scored: r01, r02, r03, r04, r06, r07, "
                      "r08, r09, r10, r11, ... (first 10)"]
    assert {r["case_id"] for r in _csv(out / "metrics.csv")} == {"r00", "r05"}
    (row,) = _csv(out / "summary.csv")
    assert row["n_cases"] == "2" and float(row["dice_mean"]) == 1.0


def test_few_unscored_references_are_all_listed(tmp_path, capsys):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    for case in ("a", "b", "c"):
        _write(ref / f"{case}.nii.gz", _box(MASS))
    _write(pred / "b.nii.gz", _box(MASS))
    code, stdout, err = _evaluate(capsys, pred, ref, tmp_path / "out")
    assert code == 0 and err == [], err
    assert "2 reference case(s) have no prediction and are not scored: a, c\n" in stdout


def test_prediction_without_reference_is_refused(tmp_path, capsys):
    pred, ref, out = tmp_path / "pred", tmp_path / "ref", tmp_path / "out"
    for case in ("c0", "c1"):
        _write(ref / f"{case}.nii.gz", _box(MASS))
        _write(pred / f"{case}.nii.gz", _box(MASS))
    orphan = _write(pred / "x9.nii.gz", _box(MASS))
    code, _, err = _evaluate(capsys, pred, ref, out)
    assert_refused(code, err, orphan, f"no reference label 'x9' in {ref}")
    assert files_under(out) == []


def test_no_case_in_common_is_refused(tmp_path, capsys):
    pred, ref, out = tmp_path / "pred", tmp_path / "ref", tmp_path / "out"
    _write(ref / "a.nii.gz", _box(MASS))
    _write(pred / "b.nii.gz", _box(MASS))
    code, _, err = _evaluate(capsys, pred, ref, out)
    assert_refused(code, err, pred, f"no prediction has a reference label in {ref}")
    assert files_under(out) == []


def test_one_case_prints_no_sd(tmp_path, capsys):
    pred, ref, out = tmp_path / "pred", tmp_path / "ref", tmp_path / "out"
    _write(ref / "c0.nii.gz", _box(MASS))
    _write(pred / "c0.nii.gz", _box((slice(4, 10), slice(5, 9), 1)))  # Dice 2*48/(72+48) = 0.8
    code, stdout, err = _evaluate(capsys, pred, ref, out)
    assert code == 0 and err == [], err
    (line,) = [ln for ln in stdout.splitlines() if "label_1:" in ln]
    assert line.strip() == "label_1: Dice 0.8000, HD 1.60 mm, HD95 1.60 mm (n=1)"
    (row,) = _csv(out / "summary.csv")
    assert row["dice_sd"] == "" and float(row["dice_mean"]) == pytest.approx(0.8)
    assert "nan" not in (out / "summary.md").read_text().lower()


# ------------------------------------------------------------------------------------------------ B, C
def _two_class_case(tmp_path: Path) -> tuple[Path, Path, Path]:
    """c0: class a under-segmented, class b over-segmented; c1: a exact, b absent from both."""
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    ds = _dataset(tmp_path / "ds", {"background": 0, "a": 1, "b": 2})
    b_ref, b_pred = (slice(12, 14), slice(12, 14), 2), (slice(12, 14), slice(12, 16), 2)
    _write(ref / "c0.nii.gz", _box(MASS, b_ref))
    _write(pred / "c0.nii.gz", _box((slice(4, 10), slice(5, 9), 1), b_pred))
    _write(ref / "c1.nii.gz", _box(MASS))
    _write(pred / "c1.nii.gz", _box(MASS))
    return pred, ref, ds


# Hand-computed (512 voxels): c0 a: ref 72, pred 48 inside it; c0 b: ref 8, pred 16 containing it.
EXPECTED_C0 = {
    "1": {"TP": 48, "FP": 0, "FN": 24, "TN": 440, "n_pred": 48, "n_ref": 72, "Dice": 0.8, "IoU": 2 / 3,
          "HD": 1.6, "HD95": 1.6, "sensitivity": 48 / 72, "RAD": 24 / 72},
    "2": {"TP": 8, "FP": 8, "FN": 0, "TN": 496, "n_pred": 16, "n_ref": 8, "Dice": 2 / 3, "IoU": 0.5,
          "HD": 1.6, "HD95": 1.6, "sensitivity": 1.0, "RAD": 1.0},
}
EXPECTED_C1 = {
    "1": {"TP": 72, "FP": 0, "FN": 0, "TN": 440, "n_pred": 72, "n_ref": 72, "Dice": 1.0, "IoU": 1.0,
          "HD": 0.0, "HD95": 0.0, "sensitivity": 1.0, "RAD": 0.0},
    "2": {"TP": 0, "FP": 0, "FN": 0, "TN": 512, "n_pred": 0, "n_ref": 0, "Dice": 1.0, "IoU": 1.0,
          "HD": 0.0, "HD95": 0.0, "sensitivity": math.nan, "RAD": math.nan},
}
KEYS = {"Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref", "HD", "HD95", "sensitivity", "RAD"}


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-5, abs=1e-6)


def _check_metrics(got: dict, expected: dict) -> None:
    assert set(got) == KEYS, set(got) ^ KEYS
    for name, value in expected.items():
        assert _same(float(got[name]), value), (name, got[name], value)
        if name in ("TP", "FP", "FN", "TN", "n_pred", "n_ref"):
            assert isinstance(got[name], int), (name, got[name])


def test_summary_json_has_nnunet_shape_and_hand_computed_values(tmp_path, capsys):
    pred, ref, ds = _two_class_case(tmp_path)
    out = tmp_path / "out"
    code, _, err = _evaluate(capsys, pred, ref, out, "--dataset", str(ds))
    assert code == 0 and err == [], err
    text = (out / "summary.json").read_text()
    summary = json.loads(text)
    assert list(summary) == ["foreground_mean", "mean", "metric_per_case"]  # nnU-Net's sort_keys=True
    c0, c1 = summary["metric_per_case"]
    assert set(c0) == {"prediction_file", "reference_file", "metrics"}
    assert c0["prediction_file"] == str(pred / "c0.nii.gz") and c0["reference_file"] == str(ref / "c0.nii.gz")
    assert list(c0["metrics"]) == ["1", "2"]  # label values as strings, background not scored
    for key in ("1", "2"):
        _check_metrics(c0["metrics"][key], EXPECTED_C0[key])
        _check_metrics(c1["metrics"][key], EXPECTED_C1[key])
    means = {k: {m: (EXPECTED_C0[k][m] + EXPECTED_C1[k][m]) / 2 for m in EXPECTED_C0[k]} for k in ("1", "2")}
    means["2"]["sensitivity"] = means["2"]["RAD"] = 1.0  # c1's NaN left out
    for key in ("1", "2"):
        for name, value in means[key].items():
            assert _same(summary["mean"][key][name], value), (key, name)
    assert summary["foreground_mean"]["Dice"] == pytest.approx((0.9 + 5 / 6) / 2)
    assert summary["foreground_mean"]["IoU"] == pytest.approx(((2 / 3 + 1) / 2 + 0.75) / 2)
    assert "NaN" in text  # c1 b: sensitivity and RAD 0/0, written as json does with allow_nan (as nnU-Net)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_empty_dice_nan_is_nnunet_convention_and_left_out_of_means(tmp_path, capsys):
    pred, ref, ds = _two_class_case(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = _evaluate(capsys, pred, ref, out, "--dataset", str(ds), "--empty-dice", "nan")
    assert code == 0 and err == [], err
    summary = json.loads((out / "summary.json").read_text())
    b_c1 = summary["metric_per_case"][1]["metrics"]["2"]
    assert math.isnan(b_c1["Dice"]) and math.isnan(b_c1["IoU"])
    assert summary["mean"]["2"]["Dice"] == pytest.approx(2 / 3)  # nanmean: c0's value only
    assert summary["mean"]["2"]["IoU"] == pytest.approx(0.5)
    assert summary["mean"]["1"]["Dice"] == pytest.approx(0.9)  # unchanged: no both-empty case
    rows = {r["class_name"]: r for r in _csv(out / "summary.csv")}
    assert float(rows["b"]["dice_mean"]) == pytest.approx(2 / 3)
    assert rows["b"]["dice_excluded"] == "both_empty: 1 (NaN)" and rows["b"]["dice_sd"] == ""
    assert float(rows["a"]["dice_sd"]) == pytest.approx(np.std([0.8, 1.0], ddof=1))
    per_case = {(r["case_id"], r["class_name"]): r for r in _csv(out / "metrics.csv")}
    assert per_case[("c1", "b")]["dice"] == "nan" and per_case[("c1", "b")]["status"] == "both_empty"
    (line,) = [ln for ln in stdout.splitlines() if ln.strip().startswith("b:")]
    assert "Dice 0.6667, " in line and "Dice excluded: both_empty: 1 (NaN)" in line

    # our default: Dice 1 for the both-empty case, in the mean
    code, _, err = _evaluate(capsys, pred, ref, tmp_path / "out1", "--dataset", str(ds))
    assert code == 0 and err == [], err
    rows = {r["class_name"]: r for r in _csv(tmp_path / "out1" / "summary.csv")}
    assert float(rows["b"]["dice_mean"]) == pytest.approx(5 / 6) and rows["b"]["dice_excluded"] == ""


def test_empty_dice_nan_in_metrics_functions():
    from modalseg.evaluation.metrics import aggregate, evaluate_case

    gt = np.zeros((4, 4), int)
    gt[1:3, 1:3] = 1
    pred = gt.copy()
    pred[1, 1] = 0  # Dice 2*3/(4+3)
    kw = dict(num_classes=3, class_names=["bg", "x", "y"], spacing=(1.0, 1.0))
    ms = evaluate_case(pred, gt, case_id="p", empty_dice="nan", **kw) + evaluate_case(
        gt, gt, case_id="q", empty_dice="nan", **kw)
    by = {(m.case_id, m.class_name): m for m in ms}
    assert by[("p", "x")].dice == pytest.approx(6 / 7) and math.isnan(by[("p", "y")].dice)
    assert by[("p", "y")].hd == 0.0  # only Dice changes
    rows = {r["class_name"]: r for r in aggregate(ms, sd_of_one=None)}
    assert rows["x"]["dice_mean"] == pytest.approx((6 / 7 + 1) / 2)
    assert math.isnan(rows["y"]["dice_mean"]) and rows["y"]["dice_excluded"] == "both_empty: 2 (NaN)"
    (one,) = aggregate([by[("p", "x")]], sd_of_one=None)
    assert one["dice_sd"] is None and aggregate([by[("p", "x")]])[0]["dice_sd"] == 0.0


# ------------------------------------------------------------------------------------------------ D
CASE_PATIENT = {"c0": "p0", "c1": "p0", "c2": "p1", "c3": "p2", "c4": "p3"}
PATIENTS = {"p0": ["c0", "c1"], "p1": ["c2"], "p2": ["c3"], "p3": ["c4"]}
NNUNET_SPLITS = [{"train": ["c0", "c1", "c2"], "val": ["c3", "c4"]}, {"train": ["c3", "c4"], "val": ["c2", "c1", "c0"]}]
PATIENT_SPLITS = [{"train": ["p0", "p1"], "val": ["p2", "p3"]}, {"train": ["p2", "p3"], "val": ["p0", "p1"]}]


def test_splits_final_converted_to_patients(tmp_path):
    from modalseg.training.splits import load_nnunet_splits

    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps(NNUNET_SPLITS))
    assert load_nnunet_splits(path, CASE_PATIENT) == PATIENT_SPLITS


@pytest.mark.parametrize("splits, fragment", [
    ([{"train": ["c0", "c2"], "val": ["c1", "c3"]}],
     "fold 0 puts patient 'p0' on both sides (train ['c0'], val ['c1'])"),
    ([{"train": ["c0", "c1", "zz"], "val": ["c3"]}], "fold 0 names 1 unknown case id(s), e.g. ['zz']"),
    ([{"train": ["c0", "c1", "c2"], "val": ["c2", "c3"]}], "fold 0 has case(s) on both sides: ['c2']"),
    ([{"train": ["c0", "c2"], "val": ["c3"]}], "fold 0 lists only some cases of patient 'p0' (not ['c1'])"),
    ({"train": ["c0"], "val": ["c1"]}, 'must be a non-empty list of {"train": [case ids], "val": [case ids]} folds'),
])
def test_splits_final_refusals_are_one_line(tmp_path, splits, fragment):
    from modalseg.training.splits import load_nnunet_splits

    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps(splits))
    with pytest.raises(DataError) as exc:
        load_nnunet_splits(path, CASE_PATIENT)
    message = str(exc.value)
    assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message, message


def test_resolve_splits_prefers_splits_json_then_splits_final(tmp_path, capsys):
    from modalseg.training.splits import resolve_splits

    data, out = tmp_path / "Dataset001", tmp_path / "run"
    data.mkdir()
    (data / "splits_final.json").write_text(json.dumps(NNUNET_SPLITS))
    lines: list[str] = []
    assert resolve_splits(out, PATIENTS, 2, dataset_root=data, log=lines.append) == PATIENT_SPLITS
    assert json.loads((out / "splits.json").read_text()) == PATIENT_SPLITS  # every later fold uses the same
    assert len(lines) == 1 and str(data / "splits_final.json") in lines[0]
    # splits.json now wins (an edited splits_final.json is not silently picked up half-way through a run)
    (data / "splits_final.json").write_text(json.dumps(NNUNET_SPLITS[::-1]))
    assert resolve_splits(out, PATIENTS, 2, dataset_root=data, log=lines.append) == PATIENT_SPLITS
    assert len(lines) == 1

    # <output>/splits_final.json and <dataset>/splits_final.json that disagree are refused
    out2 = tmp_path / "run2"
    out2.mkdir()
    (out2 / "splits_final.json").write_text(json.dumps(NNUNET_SPLITS))
    with pytest.raises(DataError, match="differs from"):
        resolve_splits(out2, PATIENTS, 2, dataset_root=data, log=None)
    # wrong fold count, as for splits.json
    with pytest.raises(DataError, match="has 2 folds but 5 were requested"):
        resolve_splits(tmp_path / "run3", PATIENTS, 5, dataset_root=data, log=None)
    # nothing nnU-Net: a new patient split, as load_or_create_splits makes
    fresh = resolve_splits(tmp_path / "run4", PATIENTS, 2, log=None)
    assert sorted(p for s in fresh for p in s["val"]) == sorted(PATIENTS)


def test_all_cases_split_trains_on_everyone():
    from modalseg.training.splits import all_cases_split

    assert all_cases_split(PATIENTS) == [{"train": ["p0", "p1", "p2", "p3"], "val": []}]
    assert all_cases_split(["b", "a", "a"]) == [{"train": ["a", "b"], "val": []}]


# ------------------------------------------------------------------------------------------------ E
BRATS_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}


def _brats_reference() -> np.ndarray:
    return _box((slice(2, 12), slice(2, 12), 1), (slice(4, 10), slice(4, 10), 2), (slice(6, 8), slice(6, 8), 3))


def test_region_masks_are_unions():
    from modalseg.evaluation.metrics import region_masks

    masks = region_masks(_brats_reference(), BRATS_LABELS | {"background": [0]})
    assert {k: int(v.sum()) for k, v in masks.items()} == {
        "background": 512 - 200, "whole tumor": 200, "tumor core": 72, "enhancing tumor": 8}
    assert masks["whole tumor"].dtype == bool


def test_region_dice_on_brats_like_labels(tmp_path, capsys):
    ds = _dataset(tmp_path / "ds", BRATS_LABELS, regions_class_order=[1, 2, 3])
    pred, ref, out = tmp_path / "pred", tmp_path / "ref", tmp_path / "out"
    _write(ref / "b0.nii.gz", _brats_reference())
    # enhancing tumour labelled as core (2) and 2 extra columns of oedema (1): 10 x 2 x 2 = 40 voxels
    p = _brats_reference()
    p[6:8, 6:8, :] = 2
    p[2:12, 12:14, :] = 1
    _write(pred / "b0.nii.gz", p)
    code, stdout, err = _evaluate(capsys, pred, ref, out, "--dataset", str(ds))
    assert code == 0 and err == [], err
    dice = {r["class_name"]: float(r["dice"]) for r in _csv(out / "metrics.csv")}
    # WT: 2*200/(200+240); TC: values {2, 3} cover [4:10, 4:10] in both; ET: missed entirely
    assert dice == pytest.approx({"whole tumor": 10 / 11, "tumor core": 1.0, "enhancing tumor": 0.0})
    metrics = json.loads((out / "summary.json").read_text())["metric_per_case"][0]["metrics"]
    assert list(metrics) == ["(1, 2, 3)", "(2, 3)", "(3,)"]  # nnU-Net's str(region tuple)
    assert (metrics["(1, 2, 3)"]["TP"], metrics["(1, 2, 3)"]["FP"], metrics["(1, 2, 3)"]["FN"]) == (200, 40, 0)
    assert metrics["(1, 2, 3)"]["HD"] == pytest.approx(1.6)  # columns 12, 13: 2 voxels of 0.8 mm off
    assert metrics["(3,)"]["n_ref"] == 8 and metrics["(3,)"]["n_pred"] == 0
    assert "whole tumor: Dice 0.9091" in stdout


def test_ignore_label_voxels_are_not_scored(tmp_path, capsys):
    ds = _dataset(tmp_path / "ds", {"background": 0, "mass": 1, "ignore": 2})
    pred, ref, out = tmp_path / "pred", tmp_path / "ref", tmp_path / "out"
    ignored = (slice(0, 16), slice(12, 16), 2)  # 16 x 4 x 2 = 128 voxels not annotated
    _write(ref / "c0.nii.gz", _box(MASS, ignored))
    # wrong only inside the ignore region: mass there (FP if it counted), nothing elsewhere differs
    _write(pred / "c0.nii.gz", _box(MASS, (slice(0, 4), slice(12, 16), 1)))
    code, stdout, err = _evaluate(capsys, pred, ref, out, "--dataset", str(ds))
    assert code == 0 and err == [], err
    (row,) = _csv(out / "metrics.csv")
    assert row["class_name"] == "mass" and float(row["dice"]) == 1.0 and float(row["hd"]) == 0.0
    assert row["n_pred"] == "72"
    metrics = json.loads((out / "summary.json").read_text())["metric_per_case"][0]["metrics"]
    assert list(metrics) == ["1"]  # the ignore label is not a class
    counts = tuple(metrics["1"][k] for k in ("TP", "FP", "FN", "TN"))
    assert counts == (72, 0, 0, 512 - 72 - 128)  # TN leaves the 128 ignored voxels out, as nnU-Net


def test_ignore_label_must_be_the_highest_value(tmp_path, capsys):
    ds = _dataset(tmp_path / "ds", {"background": 0, "ignore": 1, "mass": 2})
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    _write(ref / "c0.nii.gz", _box(MASS))
    _write(pred / "c0.nii.gz", _box(MASS))
    code, _, err = _evaluate(capsys, pred, ref, tmp_path / "out", "--dataset", str(ds))
    assert_refused(code, err, ds / "dataset.json", "the ignore label 1 must be the highest label value")
