"""Robustness to missing modalities: a paired model's validation Dice and HD95 with modalities removed.

``modalseg evaluate --checkpoint RUN/fold_0/best.pt --data DATASET --robustness --output OUT`` (issue 16, item 3)
predicts every validation case of the checkpoint's fold (``<run>/splits.json``, the fold recorded in the
checkpoint's configuration) once per **removed subset**: nothing removed, then every non-empty proper subset of
the model's modalities (by size, then in channel order: ``none``, ``T1C``, ``T2W`` for a T1C + T2W model). A run
folder evaluates each fold's model on its own validation cases and pools the cases (cross-validation).

How a modality is removed. Exactly as ``predict --missing`` feeds it and as modality dropout trained it: the
modalities present are preprocessed as always and each removed one is a channel of zeros after normalisation
(:meth:`modalseg.inference.predictor.Predictor.predict` with ``missing`` and ``trained_only=False``). The
present modalities are first put on the master's grid (as the predictor does when the master is given), so the
prediction lands on the master's grid whatever is removed. The removed modality's file is read only for that
grid, never for its intensities.

Models trained without the removed subset are evaluated too: that is the measurement ("the plain model without
T2W" is the plain model fed zeros for T2W). ``predict --missing`` refuses such a model, and still does; here each
row says whether the model was trained for it (``trained`` column: ``yes`` when the model's ``modality_dropout``
dropped every removed modality, as ``check_missing`` requires, ``no`` otherwise; the "none removed" row is
``yes``). A model with one modality has only the "none removed" row; unpaired models are refused (they read one
modality per case, so nothing can be removed).

Scoring is ``modalseg evaluate``'s for prediction files (training/evaluate_folder.py): the dataset's label
scheme (regions and the ignore label honoured), :func:`~modalseg.evaluation.metrics.evaluate_masks` per case in
the label file's mm, means over cases per class with non-finite values (an empty prediction's infinite HD95)
left out and counted. Hence the "none removed" row is what ``modalseg predict`` (no post-processing, no TTA)
followed by ``modalseg evaluate`` gives on the same cases (tested). No post-processing or TTA is applied.

Outputs, each written atomically: ``robustness.csv`` / ``robustness.md`` (one row per removed subset: Dice per
class, mean foreground Dice, HD95 per class in mm and how many of its cases were infinite) and
``robustness_cases.csv`` (per removed subset, case and class: Dice, HD95, status).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modalseg.data.geometry import ORIGIN_TOL_VOXELS, onto_grid
from modalseg.data.io import read_volume
from modalseg.data.layouts import load_dataset
from modalseg.data.types import CaseFiles, DatasetSpec, Volume
from modalseg.errors import CheckpointError, ConfigError, DataError
from modalseg.evaluation.metrics import (
    EMPTY_DICE_CONVENTIONS,
    HD95_CONVENTIONS,
    CaseMetrics,
    aggregate,
    evaluate_masks,
    region_masks,
)
from modalseg.evaluation.tables import write_table
from modalseg.inference.inferers import inferer_for
from modalseg.inference.predictor import LoadedModel, Predictor, load_torch_model
from modalseg.training.checkpoint import TrainedCheckpoint, find_checkpoints, read_checkpoint
from modalseg.training.evaluate_folder import LabelScheme, label_scheme
from modalseg.training.model_meta import ModelMeta, check_missing
from modalseg.training.splits import read_split_list

if TYPE_CHECKING:
    import torch

    from modalseg.training.precision import Precision

__all__ = ["CASE_COLUMNS", "RobustnessResult", "evaluate_robustness", "fold_validation_cases", "parse_subsets",
           "removal_subsets", "subset_name", "trained_for", "write_robustness"]

NONE = "none"
CASE_COLUMNS = ["removed", "trained", "fold", "case_id", "class_name", "status", "dice", "hd95", "n_gt", "n_pred"]


# ----------------------------------------------------------------------------------------------- subsets
def removal_subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """``()`` (nothing removed), then every non-empty proper subset of ``modalities``, by size, then in channel
    order (``itertools.combinations``): 2 ** n - 1 subsets for n modalities."""
    mods = list(modalities)
    out: list[tuple[str, ...]] = [()]
    for size in range(1, len(mods)):
        out += list(itertools.combinations(mods, size))
    return out


def subset_name(subset: Sequence[str]) -> str:
    """``"none"`` or the removed modalities joined by ``+`` (``"T2W"``, ``"T2W+DWI"``)."""
    return "+".join(subset) if subset else NONE


def parse_subsets(values: Sequence[str] | None, modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """``--remove none T2W T2W+DWI`` as subsets in the model's channel order (names case-insensitive), in the
    order of :func:`removal_subsets`; ``None``: all of them. Unknown names, every modality or a repeat: one line."""
    every = removal_subsets(modalities)
    if values is None:
        return every
    by_fold = {m.casefold(): m for m in modalities}
    chosen: set[tuple[str, ...]] = set()
    for value in values:
        for item in (v.strip() for v in value.split(",")):
            if not item:
                continue
            if item.casefold() == NONE:
                chosen.add(())
                continue
            names = [n.strip() for n in item.split("+") if n.strip()]
            unknown = [n for n in names if n.casefold() not in by_fold]
            if unknown:
                raise ConfigError(f"--remove {item}: {unknown[0]!r} is not one of the model's modalities "
                                  f"({', '.join(modalities)})")
            subset = tuple(m for m in modalities if m.casefold() in {n.casefold() for n in names})
            if len(subset) == len(modalities):
                raise ConfigError(f"--remove {item}: every modality of the model would be removed; at least one "
                                  "must stay")
            chosen.add(subset)
    if not chosen:
        raise ConfigError("--remove names no subset (e.g. --remove none T2W)")
    return [s for s in every if s in chosen]


def trained_for(meta: ModelMeta, subset: Sequence[str]) -> bool:
    """Whether ``predict --missing`` would accept ``subset`` for this model (:func:`check_missing`): its modality
    dropout dropped each removed modality. Nothing removed: always."""
    if not subset:
        return True
    try:
        check_missing(meta, list(subset))
    except ConfigError:
        return False
    return True


# ----------------------------------------------------------------------------------------------- the fold
def fold_validation_cases(checkpoint: TrainedCheckpoint, spec: DatasetSpec) -> tuple[int, list[CaseFiles]]:
    """(fold, the dataset's cases of the fold's validation patients) of a trained fold's checkpoint.

    The fold is the checkpoint's configuration's ``fold``; its patients are ``<run>/splits.json`` (the run folder
    holds ``fold_K/`` and ``splits.json``). Refused in one line: no configuration, a ``fold_all`` model (no
    validation), no splits, a fold the splits lack, or validation patients the dataset does not have (another
    dataset than the model's?).
    """
    path = checkpoint.path
    config = checkpoint.state.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("fold"), int):
        raise CheckpointError("has no training configuration with its fold, so its validation cases are unknown",
                              path)
    if config.get("train_all"):
        raise ConfigError("this model was trained on every case (fold_all): it has no validation cases to "
                          "evaluate", path)
    fold = int(config["fold"])
    splits_path = path.parent.parent / "splits.json"
    if not splits_path.is_file():
        raise DataError(f"not found: the validation patients of fold {fold} are read from the run's splits.json "
                        "(give a checkpoint inside its run folder, RUN/fold_K/best.pt)", splits_path)
    splits = read_split_list(splits_path, "patient ids")
    if fold >= len(splits):
        raise DataError(f"has {len(splits)} fold(s); the checkpoint is of fold {fold}", splits_path)
    val = list(splits[fold]["val"])
    if not val:
        raise DataError(f"fold {fold} has no validation patients", splits_path)
    by_patient: dict[str, list[CaseFiles]] = {}
    for case in spec.cases:
        by_patient.setdefault(case.patient_id, []).append(case)
    absent = [p for p in val if p not in by_patient]
    if absent:
        raise DataError(f"validation patient(s) {absent[:5]} of fold {fold} ({splits_path}) are not in this "
                        "dataset: is it the one the model was trained on?", spec.root)
    cases = sorted((c for p in val for c in by_patient[p]), key=lambda c: c.case_id)
    unlabelled = [c.case_id for c in cases if c.label is None]
    if unlabelled:
        raise DataError(f"validation case(s) {unlabelled[:5]} have no label file", spec.root)
    return fold, cases


# ----------------------------------------------------------------------------------------------- evaluation
@dataclass
class RobustnessResult:
    """What :func:`evaluate_robustness` measured: the summary rows, the per-case rows and their column names."""

    rows: list[dict[str, Any]]
    cases: list[dict[str, Any]]
    columns: list[str]
    class_names: list[str]
    meta: ModelMeta
    models: list[LoadedModel]


def _present_on_master_grid(volumes: Sequence[Volume], meta: ModelMeta, subset: Sequence[str],
                            case: str) -> list[Volume]:
    """The present modalities in the model's order, each on the master's (first modality's) grid: the predictor
    then takes the master's grid as its reference whatever is removed (module docstring)."""
    master = volumes[0]
    present = []
    for name, vol in zip(meta.modalities, volumes, strict=True):
        if name in subset:
            continue
        if vol is not master:
            vol, _ = onto_grid(vol, master, name=name, ref_name=meta.modalities[0], case=case)
        present.append(vol)
    return present


def _score(labels: np.ndarray, reference: Volume, gt: Volume, scheme: LabelScheme, case: str, *,
           hd95_convention: str, empty_dice: str) -> list[CaseMetrics]:
    """``modalseg evaluate``'s per-case scoring of a predicted label map (file values) against the label file,
    after putting the prediction on the label's grid if it is not on it (nearest neighbour)."""
    pred = Volume(np.asarray(labels), reference.affine)
    if pred.shape != gt.shape or not np.allclose(pred.affine, gt.affine, atol=1e-3):
        pred, _ = onto_grid(pred, gt, name="prediction", ref_name="label", kind="label", case=case, fill=0,
                            origin_tol_voxels=ORIGIN_TOL_VOXELS)
    valid = None if scheme.ignore is None else gt.array != scheme.ignore
    return evaluate_masks(region_masks(pred.array, scheme.classes), region_masks(gt.array, scheme.classes),
                          spacing=gt.spacing, case_id=case, valid=valid, hd95_convention=hd95_convention,
                          empty_dice=empty_dice)


def evaluate_robustness(
    checkpoint: str | Path,
    data: str | Path | None = None,
    *,
    which: str = "best",
    subsets: Sequence[str] | None = None,
    precision: Precision | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    hd95_convention: str = "monai",
    empty_dice: str = "one",
    log: Any = print,
) -> RobustnessResult:
    """Dice and HD95 of the checkpoint(s) on their folds' validation cases with each subset removed.

    ``checkpoint``: a checkpoint file, a fold folder or a run folder (every fold, each on its own validation
    cases; ``which`` picks best.pt or latest.pt as ``predict --checkpoint`` does). ``data``: the dataset (default:
    the one recorded in the first checkpoint's configuration). ``subsets``: ``--remove`` values
    (:func:`parse_subsets`; default every subset). ``precision=None``: measured (``--precision auto``).
    """
    if hd95_convention not in HD95_CONVENTIONS:
        raise ConfigError(f"hd95 convention must be one of {HD95_CONVENTIONS}, got {hd95_convention!r}")
    if empty_dice not in EMPTY_DICE_CONVENTIONS:
        raise ConfigError(f"empty-dice convention must be one of {EMPTY_DICE_CONVENTIONS}, got {empty_dice!r}")
    paths = find_checkpoints(checkpoint, which)
    checkpoints = [read_checkpoint(p) for p in paths]
    meta = checkpoints[0].meta
    if meta.kind != "paired":
        raise ConfigError(f"robustness to missing modalities applies to paired models (one input per modality); "
                          f"this model {meta.describe()} is unpaired and reads one modality per case",
                          checkpoints[0].path)
    for other in checkpoints[1:]:
        m = other.meta
        if (m.labels, m.regions, m.modalities, m.kind) != (meta.labels, meta.regions, meta.modalities, meta.kind):
            raise CheckpointError(f"model {m.describe()} differs from {meta.describe()} (one kind of model per "
                                  "table)", other.path)
    config = checkpoints[0].state.get("config")
    recorded = config.get("data") if isinstance(config, dict) else None
    if data is None:
        if not recorded:
            raise ConfigError("give the dataset with --data (the checkpoint records none)")
        data = recorded
    layout = config.get("layout", "auto") if isinstance(config, dict) else "auto"
    spec = load_dataset(data, layout if isinstance(layout, str) else "auto")
    if not spec.paired:
        raise ConfigError("the dataset is unpaired; robustness to missing modalities needs paired cases", spec.root)
    channel_names = meta.channel_names or meta.modalities
    missing_channels = [m for m in meta.modalities if m not in spec.modalities]
    if missing_channels:
        raise DataError(f"the dataset has channels {spec.modalities}, the model reads {meta.modalities}", spec.root)
    chosen = parse_subsets(subsets, meta.modalities)
    if len(meta.modalities) == 1 and log is not None:
        log(f"the model reads one modality ({meta.modalities[0]}): nothing can be removed, only the "
            "'none removed' row is evaluated")
    folds = [fold_validation_cases(c, spec) for c in checkpoints]
    scheme = label_scheme(Path(spec.root), [c.label for _, cases in folds for c in cases])  # type: ignore[misc]
    class_names = list(scheme.classes)
    trained = {s: trained_for(meta, s) for s in chosen}
    if log is not None:
        untrained = [subset_name(s) for s in chosen if not trained[s]]
        n_cases = sum(len(cases) for _, cases in folds)
        log(f"{len(checkpoints)} model(s) {meta.describe()}, {n_cases} validation case(s), removed subsets: "
            f"{', '.join(subset_name(s) for s in chosen)}")
        if untrained:
            dropout = ", ".join(f"{m} {p:g}" for m, p in (meta.modality_dropout or {}).items()) or "none"
            log(f"  not trained for removed {' / '.join(untrained)} (modality dropout: {dropout}): evaluated "
                "anyway, fed zeros after normalisation (trained = no in the table; predict --missing refuses it)")
    per_subset: dict[tuple[str, ...], list[CaseMetrics]] = {s: [] for s in chosen}
    case_rows: list[dict[str, Any]] = []
    models: list[LoadedModel] = []
    for ckpt, (fold, cases) in zip(checkpoints, folds, strict=True):
        model = load_torch_model(ckpt, precision, device=device, batch_size=batch_size)
        precision = model.precision
        models.append(model)
        if log is not None:
            log(f"  fold {fold}: checkpoint {model.describe()}, {len(cases)} validation case(s)")
        # the model's own inferer (slices, 2.5D stacks or 3D sliding windows), as predict uses
        predictor = Predictor([model], inferer=inferer_for(model.meta, batch_size))
        for case in cases:
            images = [case.images[channel_names.index(m)] for m in meta.modalities]
            volumes = [read_volume(p) for p in images]
            gt = read_volume(case.label, kind="label")  # type: ignore[arg-type]
            for subset in chosen:
                present = _present_on_master_grid(volumes, meta, subset, case.case_id)
                # zeros for the removed modalities whether or not the model was trained for them (the row says)
                result = predictor.predict(present, missing=list(subset), case=case.case_id, trained_only=False)
                metrics = _score(result.labels, result.reference, gt, scheme, case.case_id,
                                 hd95_convention=hd95_convention, empty_dice=empty_dice)
                per_subset[subset] += metrics
                for m in metrics:
                    case_rows.append({"removed": subset_name(subset), "trained": "yes" if trained[subset] else "no",
                                      "fold": fold, **m.as_dict()})
    rows = [_summary_row(subset, trained[subset], per_subset[subset], class_names, meta) for subset in chosen]
    return RobustnessResult(rows, case_rows, summary_columns(class_names), class_names, meta, models)


def summary_columns(class_names: Sequence[str]) -> list[str]:
    """robustness.csv's columns: the removed subset, what was present, whether the model was trained for it, the
    case count, mean foreground Dice, then per class Dice, HD95 (mm) and the count of infinite HD95 values."""
    cols = ["removed", "present", "trained", "n_cases", "dice_mean"]
    cols += [f"dice_{c}" for c in class_names]
    cols += [f"hd95_{c}" for c in class_names]
    cols += [f"hd95_inf_{c}" for c in class_names]
    return cols


def _summary_row(subset: tuple[str, ...], trained: bool, metrics: list[CaseMetrics], class_names: Sequence[str],
                 meta: ModelMeta) -> dict[str, Any]:
    by_class = {r["class_name"]: r for r in aggregate(metrics, sd_of_one=None)}
    row: dict[str, Any] = {
        "removed": subset_name(subset),
        "present": "+".join(m for m in meta.modalities if m not in subset),
        "trained": "yes" if trained else "no",
        "n_cases": len({m.case_id for m in metrics}),
    }
    dice = [by_class[c]["dice_mean"] for c in class_names]
    # nnU-Net's foreground_mean: the mean of the class means
    row["dice_mean"] = float(np.mean(dice)) if dice else math.nan
    for c in class_names:
        row[f"dice_{c}"] = by_class[c]["dice_mean"]
        row[f"hd95_{c}"] = by_class[c]["hd95_mean"]
        row[f"hd95_inf_{c}"] = int(by_class[c]["hd95_n_excluded"])
    return row


# ----------------------------------------------------------------------------------------------- tables
def _fmt(value: float, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def markdown_rows(result: RobustnessResult) -> tuple[list[dict[str, str]], list[str]]:
    """The rows of robustness.md: Dice in %, HD95 in mm with its infinite cases counted beside it."""
    names = result.class_names
    cols = ["Removed", "Present", "Trained for it", "Cases", "Mean Dice (%)"]
    cols += [f"Dice {c} (%)" for c in names] + [f"HD95 {c} (mm)" for c in names]
    out = []
    for row in result.rows:
        md = {"Removed": row["removed"], "Present": row["present"], "Trained for it": row["trained"],
              "Cases": str(row["n_cases"]), "Mean Dice (%)": _fmt(100 * row["dice_mean"], 2)}
        for c in names:
            md[f"Dice {c} (%)"] = _fmt(100 * row[f"dice_{c}"], 2)
            inf = row[f"hd95_inf_{c}"]
            md[f"HD95 {c} (mm)"] = _fmt(row[f"hd95_{c}"], 2) + (f" ({inf} of {row['n_cases']} inf)" if inf else "")
        out.append(md)
    return out, cols


def write_robustness(result: RobustnessResult, out_dir: str | Path) -> list[Path]:
    """robustness.csv, robustness.md and robustness_cases.csv in ``out_dir``, each atomically."""
    out = Path(out_dir)
    write_table(result.rows, result.columns, None, out / "robustness.csv")
    md_rows, md_cols = markdown_rows(result)
    used = ", ".join(str(m.path) for m in result.models)
    title = (f"Robustness to missing modalities: {result.meta.model}, validation cases of {used}; removed "
             "modalities fed as zeros after normalisation; HD95 means leave infinite values (empty predictions) "
             "out and count them")
    write_table(md_rows, md_cols, out / "robustness.md", None, title=title)
    write_table(result.cases, CASE_COLUMNS, None, out / "robustness_cases.csv")
    return [out / "robustness.csv", out / "robustness.md", out / "robustness_cases.csv"]
