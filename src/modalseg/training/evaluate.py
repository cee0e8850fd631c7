"""Evaluate a trained fold on its validation patients: per-patient (3D) and per-slice metrics, in mm.

nnU-Net's extras, scored as ``modalseg evaluate --dataset`` scores files (training/evaluate_folder.py):

* ``ignore`` label: prediction and target are set to background on the target's ignored voxels before any metric
  (so a prediction there is neither FP nor TP and moves no surface distance; nnU-Net leaves them out of its
  counts, which for Dice and the distances is the same; sensitivity and RAD too, being ratios of TP/FN counts);
* region-based models: one row per region, its mask the union of its label values in the painted prediction and
  in the target (a binary map per region, scored as one class).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modalseg.evaluation.metrics import CaseMetrics, aggregate, evaluate_case, evaluate_slices
from modalseg.evaluation.tables import write_table
from modalseg.training.checkpoint import read_checkpoint
from modalseg.training.model_meta import ModelMeta

if TYPE_CHECKING:
    from modalseg.training.engine import Trainer

METRIC_COLUMNS = ["dice", "sensitivity", "rad", "hd", "hd95"]


def record_spacing(record: dict[str, Any]) -> tuple[float, float, float]:
    """(slice thickness, row, column) spacing in mm of a cached slice (processed pixel size in-plane)."""
    row, col = record["spacing"]
    return float(record.get("slice_thickness", 1.0)), float(row), float(col)


def evaluate_predictions(
    pred: np.ndarray,
    target: np.ndarray,
    records: list[dict[str, Any]],
    class_names: list[str],
    *,
    ignore_index: int | None = None,
) -> tuple[list[CaseMetrics], list[CaseMetrics]]:
    """Per-patient 3D metrics (slices stacked in z order) and per-slice 2D metrics; ``ignore_index``: target
    voxels with it are background in both maps (module docstring)."""
    if ignore_index is not None:
        unscored = target == ignore_index
        pred, target = np.where(unscored, 0, pred), np.where(unscored, 0, target)
    num_classes = len(class_names)
    per_patient: list[CaseMetrics] = []
    patients = [r["patient_id"] for r in records]
    for patient in dict.fromkeys(patients):
        sel = [i for i, p in enumerate(patients) if p == patient]
        sel.sort(key=lambda i: (records[i]["case_id"], records[i]["z"]))
        spacing = record_spacing(records[sel[0]])
        per_patient += evaluate_case(pred[sel], target[sel], num_classes=num_classes, class_names=class_names,
                                     spacing=spacing, case_id=patient)
    per_slice = evaluate_slices(
        pred, target, num_classes=num_classes, class_names=class_names,
        spacing=[record_spacing(r)[1:] for r in records],
        case_ids=[f"{r['case_id']}:z{r['z']}" for r in records],
    )
    return per_patient, per_slice


def evaluate_model_predictions(
    pred: np.ndarray, target: np.ndarray, records: list[dict[str, Any]], meta: ModelMeta
) -> tuple[list[CaseMetrics], list[CaseMetrics]]:
    """:func:`evaluate_predictions` for ``meta``'s model: its classes, or one binary map per region (module
    docstring), with its ignore label."""
    if meta.regions is None:
        return evaluate_predictions(pred, target, records, list(meta.labels), ignore_index=meta.ignore_index)
    patients, slices = [], []
    for name, values in meta.scored_classes().items():
        p, t = np.isin(pred, values).astype(np.uint8), np.isin(target, values).astype(np.uint8)
        if meta.ignore_index is not None:
            p[target == meta.ignore_index] = 0
        rows = evaluate_predictions(p, t, records, ["background", name])
        patients.append(rows[0])
        slices.append(rows[1])
    # one row per case and region, regions in order within a case (as classes are)
    return [m for rows in zip(*patients, strict=True) for m in rows], [m for rows in zip(*slices, strict=True)
                                                                      for m in rows]


def evaluate_trainer(trainer: Trainer, checkpoint: str = "best.pt") -> dict[str, Any]:
    """Load the fold's best weights, predict its validation slices and write ``validation*.csv/md``."""
    path = trainer.run_dir / checkpoint
    if path.exists():
        read_checkpoint(path).load_weights(trainer.network)
    rows_patient: list[dict] = []
    rows_slice: list[dict] = []
    summary: list[dict] = []
    column = trainer.task.group_column  # unpaired tables say which modality a row is
    for group, split in trainer.predict_split("val").items():
        per_patient, per_slice = evaluate_model_predictions(split.pred, split.target, split.records, trainer.meta)
        extra = {column: group} if column else {}
        rows_patient += [m.as_dict(**extra) for m in per_patient]
        rows_slice += [m.as_dict(**extra) for m in per_slice]
        for row in aggregate(per_patient):
            summary.append({**extra, **{k: row[k] for k in ("class_name", "dice_mean", "hd_mean", "hd95_mean")}})
    run_dir = Path(trainer.run_dir)
    cols = ([column] if column else []) + ["case_id", "class_name", "status", *METRIC_COLUMNS]
    write_table(rows_patient, cols, run_dir / "validation.md", run_dir / "validation.csv",
                title=f"Validation, fold {trainer.cfg.fold}: per patient (3D)")
    write_table(rows_slice, cols, run_dir / "validation_slices.md", run_dir / "validation_slices.csv",
                title=f"Validation, fold {trainer.cfg.fold}: per slice (2D)")
    return {"validation": summary}
