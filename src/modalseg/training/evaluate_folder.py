"""Evaluate prediction files against label files (``modalseg evaluate``), in mm using each file's spacing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modalseg.data.io import is_supported, read_volume, strip_extension
from modalseg.data.layouts import load_dataset
from modalseg.data.verify import geometry_problems
from modalseg.errors import DataError
from modalseg.evaluation.metrics import aggregate, evaluate_case
from modalseg.evaluation.tables import write_table

COLUMNS = ["case_id", "class_name", "status", "dice", "sensitivity", "rad", "hd", "hd95", "n_gt", "n_pred"]


def _label_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError("not a folder", folder)
    files = {strip_extension(f.name): f for f in sorted(folder.iterdir()) if f.is_file() and is_supported(f)}
    return {k: v for k, v in files.items() if "_prob_" not in k}


def evaluate_folders(
    pred_dir: Path, label_dir: Path, out_dir: Path, *, dataset: Path | None = None, hd95_convention: str = "monai"
) -> list[dict]:
    """Per-case, per-class metrics for every reference label that has a prediction; missing ones are errors."""
    preds, labels = _label_files(pred_dir), _label_files(label_dir)
    if not labels:
        raise DataError("no label files found", label_dir)
    missing = sorted(set(labels) - set(preds))
    if missing:
        raise DataError(f"no prediction for {len(missing)} case(s), e.g. {missing[0]}", pred_dir)
    if dataset is not None:
        spec = load_dataset(dataset)
        declared = spec.labels
        lut = spec.label_lut()
    else:
        values: set[int] = set()
        for f in labels.values():
            values |= set(np.unique(read_volume(f, kind="label").array).tolist())
        declared = {("background" if v == 0 else f"label_{v}"): v for v in sorted(values | {0})}
        lut = {v: i for i, v in enumerate(declared.values())}
    class_names = list(declared)
    results = []
    for case, label_path in labels.items():
        gt_vol = read_volume(label_path, kind="label")
        pred_vol = read_volume(preds[case], kind="label")
        if gt_vol.shape != pred_vol.shape:
            raise DataError(f"shape {pred_vol.shape} differs from the reference {gt_vol.shape}", preds[case])
        # Distances are in the reference's mm: a prediction on another grid (spacing, axis order or flips)
        # would be scored against the wrong voxels, so refuse it as `modalseg verify` would.
        problems = geometry_problems(pred_vol, gt_vol, "prediction", "reference")
        if problems:
            raise DataError(problems[0])
        gt = _to_index(gt_vol.array, lut, label_path)
        pred = _to_index(pred_vol.array, lut, preds[case])
        results += evaluate_case(pred, gt, num_classes=len(class_names), class_names=class_names,
                                 spacing=gt_vol.spacing, case_id=case, hd95_convention=hd95_convention)
    write_table([m.as_dict() for m in results], COLUMNS, out_dir / "metrics.md", out_dir / "metrics.csv",
                title="Per-case metrics (distances in mm)")
    summary = aggregate(results)
    cols = ["class_name", "n_cases", "dice_mean", "dice_sd", "sensitivity_mean", "rad_mean", "hd_mean", "hd95_mean",
            "hd_excluded"]
    write_table(summary, cols, out_dir / "summary.md", out_dir / "summary.csv", title="Summary over cases")
    return summary


def _to_index(array: np.ndarray, lut: dict[int, int], path: Path) -> np.ndarray:
    values = np.unique(array)
    unknown = [int(v) for v in values if int(v) not in lut]
    if unknown:
        raise DataError(f"label value(s) {unknown[:5]} not declared", path)
    out = np.zeros(array.shape, dtype=np.int64)
    for v in values:
        out[array == v] = lut[int(v)]
    return out
