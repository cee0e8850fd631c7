"""Evaluate a trained fold on its validation patients: per-patient (3D) and per-slice metrics, in mm."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modalseg.evaluation.metrics import CaseMetrics, aggregate, evaluate_case, evaluate_slices
from modalseg.evaluation.tables import write_table
from modalseg.training.checkpoint import read_checkpoint

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
) -> tuple[list[CaseMetrics], list[CaseMetrics]]:
    """Per-patient 3D metrics (slices stacked in z order) and per-slice 2D metrics."""
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


def evaluate_trainer(trainer: Trainer, checkpoint: str = "best.pt") -> dict[str, Any]:
    """Load the fold's best weights, predict its validation slices and write ``validation*.csv/md``."""
    path = trainer.run_dir / checkpoint
    if path.exists():
        read_checkpoint(path).load_weights(trainer.network)
    class_names = list(trainer.meta.labels)
    rows_patient: list[dict] = []
    rows_slice: list[dict] = []
    summary: list[dict] = []
    column = trainer.task.group_column  # unpaired tables say which modality a row is
    for group, split in trainer.predict_split("val").items():
        per_patient, per_slice = evaluate_predictions(split.pred, split.target, split.records, class_names)
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
