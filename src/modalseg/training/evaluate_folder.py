"""Evaluate prediction files against label files (``modalseg evaluate``), in mm using each file's spacing.

Outputs in the output folder (each written atomically): ``metrics.md`` / ``metrics.csv`` (per case and class),
``summary.md`` / ``summary.csv`` (mean ± s.d. over cases) and ``summary.json`` in the shape nnU-Net v2's
``compute_metrics_on_folder`` writes (see :func:`nnunet_summary`).

For users coming from nnU-Net:

* The cases scored are those of the **prediction** folder (nnU-Net's behaviour with ``--chill``); reference
  labels without a prediction are listed on stdout and not scored. A prediction without a reference is an error.
* ``empty_dice="nan"`` scores a class absent from both prediction and reference Dice NaN and leaves it out of
  the means, as nnU-Net does; our default ``"one"`` scores it 1 (see :mod:`modalseg.evaluation.metrics`).
* Region-based labels (``"whole tumor": [1, 2, 3]``) are scored per region (the union of its values) and the
  ``"ignore"`` label's reference voxels are left out of every metric, as in nnU-Net. Until the dataset layout
  parser accepts region labels, they are read from the raw ``dataset.json`` here (:func:`parse_nnunet_labels`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modalseg.data.geometry import ORIGIN_TOL_VOXELS, geometry_problems
from modalseg.data.io import is_supported, read_volume, strip_extension
from modalseg.data.layouts import check_ignore_label, load_dataset
from modalseg.errors import ConfigError, DataError
from modalseg.evaluation.metrics import (
    EMPTY_DICE_CONVENTIONS,
    HD95_CONVENTIONS,
    CaseMetrics,
    aggregate,
    confusion_counts,
    evaluate_masks,
    region_masks,
)
from modalseg.evaluation.tables import write_table
from modalseg.utils.atomic import atomic_write_text

COLUMNS = ["case_id", "class_name", "status", "dice", "sensitivity", "rad", "hd", "hd95", "n_gt", "n_pred"]
SUMMARY_COLUMNS = ["class_name", "n_cases", "dice_mean", "dice_sd", "dice_excluded", "sensitivity_mean", "rad_mean",
                   "hd_mean", "hd95_mean", "hd_excluded"]
#: Per-class keys of summary.json: nnU-Net v2's, in its order, then ours (distances in mm).
NNUNET_METRICS = ("Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref")
EXTRA_METRICS = ("HD", "HD95", "sensitivity", "RAD")
LIST_UNSCORED = 10

_PROB = "_prob_"


@dataclass(frozen=True)
class LabelScheme:
    """What is scored: foreground class or region name -> its label values (a region is their union).

    ``keys`` gives each name's key in summary.json (nnU-Net's ``str(label)`` or ``str(region tuple)``),
    ``allowed`` the values a label file may hold, ``ignore`` nnU-Net's ignore label value (or None).
    """

    classes: dict[str, tuple[int, ...]]
    keys: dict[str, str]
    allowed: frozenset[int]
    ignore: int | None = None


def _label_files(folder: Path, keep: frozenset[str] = frozenset()) -> tuple[dict[str, Path], int]:
    """Case id -> file of every supported volume in ``folder``, and how many probability maps were left out.

    ``predict --probabilities`` writes ``CASE_prob_<class>`` beside ``CASE``: a file is skipped as a
    probability map only when the part of its name before a ``_prob_`` is itself a case id in ``folder``, so a
    case genuinely named e.g. ``a_prob_x`` (with no case ``a``) is evaluated; ids in ``keep`` (the reference
    cases, for the prediction folder) are never skipped. Two files for one case id (e.g.
    ``a.nii.gz`` and ``a.nrrd``) are refused rather than one silently winning.
    """
    if not folder.is_dir():
        raise DataError("not a folder", folder)
    files: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if not (f.is_file() and is_supported(f)):
            continue
        case = strip_extension(f.name)
        if case in files:
            raise DataError(f"a second file for case {case!r} beside {files[case]} (one file per case; remove one)", f)
        files[case] = f
    maps = {k for k in files if k not in keep and _prob_prefix(k, files) is not None}
    return {k: v for k, v in files.items() if k not in maps}, len(maps)


def _prob_prefix(case: str, cases: dict[str, Path]) -> str | None:
    """The case id that ``case`` is a probability map of (``<that case>_prob_<class>``), if any."""
    start = case.find(_PROB)
    while start != -1:
        prefix = case[:start]
        if prefix and prefix in cases and len(case) > start + len(_PROB):
            return prefix
        start = case.find(_PROB, start + 1)
    return None


# ------------------------------------------------------------------------------------------- label schemes
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def has_nnunet_extras(labels: Any) -> bool:
    """Whether a dataset.json ``labels`` object uses region lists or an ``ignore`` label."""
    return isinstance(labels, dict) and ("ignore" in labels or any(isinstance(v, list) for v in labels.values()))


def parse_nnunet_labels(meta: Mapping[str, Any], path: Path) -> LabelScheme:
    """The label scheme of a raw nnU-Net ``dataset.json`` (``meta``), with region lists and an ``ignore`` label.

    nnU-Net's rules (``LabelManager``): the dataset has regions when any value is a list of more than one label;
    entries whose values are all 0 are the background; ``ignore`` is one integer, the highest label value, and
    is never scored. ``regions_class_order`` (needed by nnU-Net to train on regions, not to evaluate) is only
    checked when present. modalseg's ``labels_to_background`` values are accepted in the files as background.
    """
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DataError("key 'labels' must be a non-empty object {name: value}", path)
    ignore: int | None = None
    entries: dict[str, tuple[int, ...]] = {}
    for name, value in labels.items():
        if name == "ignore":
            if not _is_int(value) or value < 0:
                raise DataError(f"key 'labels': the ignore label must be one integer value >= 0, found {value!r}",
                                path)
            ignore = int(value)
            continue
        if _is_int(value):
            values: tuple[int, ...] = (int(value),)
        elif isinstance(value, list) and value and all(_is_int(v) for v in value):
            values = tuple(int(v) for v in value)
        else:
            raise DataError(f"key 'labels': value of {name!r} must be an integer or a non-empty list of integers, "
                            f"found {value!r}", path)
        if min(values) < 0:
            raise DataError(f"key 'labels': {name!r} has a negative label value ({list(values)})", path)
        entries[str(name)] = values
    has_regions = any(isinstance(v, list) and len(v) > 1 for k, v in labels.items() if k != "ignore")
    if not any(set(v) == {0} for v in entries.values()):
        raise DataError("key 'labels': no background entry with value 0", path)
    classes = {n: v for n, v in entries.items() if set(v) != {0}}
    if not classes:
        raise DataError("key 'labels': no foreground label or region to score", path)
    for name, values in classes.items():
        if 0 in values:
            raise DataError(f"key 'labels': {name!r} includes the background value 0 ({list(values)})", path)
    seen: dict[frozenset[int], str] = {}
    for name, values in classes.items():
        if frozenset(values) in seen:
            what = "regions" if has_regions else "labels"
            raise DataError(f"key 'labels': {what} {seen[frozenset(values)]!r} and {name!r} have the same values "
                            f"({sorted(values)})", path)
        seen[frozenset(values)] = name
    if has_regions:
        keys = {n: str(tuple(labels[n])) if isinstance(labels[n], list) else str(labels[n]) for n in classes}
        order = meta.get("regions_class_order")
        if order is not None and (not isinstance(order, list) or not all(_is_int(v) for v in order)
                                  or len(order) != len(classes)):
            raise DataError(f"key 'regions_class_order' must list one integer per region ({len(classes)}), "
                            f"found {order!r}", path)
    else:
        keys = {n: str(v[0]) for n, v in classes.items()}
    values_used = {0} | {v for vs in classes.values() for v in vs}
    check_ignore_label(ignore, entries, values_used, path)
    to_background = meta.get("labels_to_background", [])
    if not isinstance(to_background, list) or not all(_is_int(v) for v in to_background):
        raise DataError(f"key 'labels_to_background' must be a list of integers, found {to_background!r}", path)
    allowed = values_used | set(to_background) | ({ignore} if ignore is not None else set())
    return LabelScheme(classes=classes, keys=keys, allowed=frozenset(allowed), ignore=ignore)


def label_scheme(dataset: Path | None, references: Sequence[Path]) -> LabelScheme:
    """The classes to score: from ``dataset`` (its dataset.json / modalseg.json), else the references' values.

    A dataset.json with region lists or an ``ignore`` label is parsed here (:func:`parse_nnunet_labels`), since
    ``load_dataset`` refuses region labels; any other dataset goes through ``load_dataset`` as before.
    Without a dataset, every value found in the scored references is a class named ``label_<value>``.
    """
    if dataset is not None:
        raw = dataset / "dataset.json"
        meta: Any = None
        if raw.is_file():
            try:
                meta = json.loads(raw.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                meta = None  # load_dataset reports it in one line
        if isinstance(meta, dict) and has_nnunet_extras(meta.get("labels")):
            return parse_nnunet_labels(meta, raw)
        spec = load_dataset(dataset)
        fg = list(spec.labels.items())[1:]
        return LabelScheme(classes={n: (v,) for n, v in fg}, keys={n: str(v) for n, v in fg},
                           allowed=frozenset(spec.label_lut()))
    values: set[int] = set()
    for f in references:
        values |= set(np.unique(read_volume(f, kind="label").array).tolist())
    fg_values = sorted(values - {0})
    if not fg_values:
        where = references[0].parent if references else None
        raise DataError("the scored reference labels hold no foreground value (only 0); pass --dataset to declare "
                        "the labels", where)
    return LabelScheme(classes={f"label_{v}": (v,) for v in fg_values}, keys={f"label_{v}": str(v) for v in fg_values},
                       allowed=frozenset(values | {0}))


# ------------------------------------------------------------------------------------------- evaluation
def _check_values(array: np.ndarray, allowed: frozenset[int], path: Path) -> None:
    unknown = [int(v) for v in np.unique(array) if int(v) not in allowed]
    if unknown:
        raise DataError(f"label value(s) {unknown[:5]} not declared", path)


def _unscored_line(unscored: list[str]) -> str:
    shown = ", ".join(unscored[:LIST_UNSCORED])
    more = f", ... (first {LIST_UNSCORED})" if len(unscored) > LIST_UNSCORED else ""
    return f"{len(unscored)} reference case(s) have no prediction and are not scored: {shown}{more}"


def _nnunet_case_metrics(m: CaseMetrics, counts: dict[str, int], empty_dice: str) -> dict[str, float | int]:
    tp, fp, fn = counts["TP"], counts["FP"], counts["FN"]
    union = tp + fp + fn
    iou = tp / union if union else (1.0 if empty_dice == "one" else math.nan)
    return {"Dice": m.dice, "IoU": iou, "FP": fp, "TP": tp, "FN": fn, "TN": counts["TN"], "n_pred": tp + fp,
            "n_ref": tp + fn, "HD": m.hd, "HD95": m.hd95, "sensitivity": m.sensitivity, "RAD": m.rad}


def _finite_mean(values: list[float]) -> float:
    finite = [float(v) for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def nnunet_summary(per_case: list[dict], keys: list[str]) -> dict:
    """summary.json as nnU-Net v2's ``compute_metrics_on_folder`` writes it, plus our distance metrics.

    ``{"metric_per_case": [{"prediction_file", "reference_file", "metrics": {key: {...}}}], "mean": {key: {...}},
    "foreground_mean": {...}}``; ``key`` is the label value as a string (``"1"``) or, for a region, the string
    of its tuple (``"(1, 2, 3)"``, ``"(3,)"``), exactly as nnU-Net's ``label_or_region_to_key``. Per class:
    nnU-Net's ``Dice``, ``IoU``, ``FP``, ``TP``, ``FN``, ``TN``, ``n_pred``, ``n_ref`` (voxel counts outside the
    ignore label) and our additions ``HD``, ``HD95`` (mm), ``sensitivity`` and ``RAD`` (fractions).
    ``mean`` is the mean over cases of the finite values: nnU-Net's ``np.nanmean`` for its own keys (never
    inf), and for ours the same exclusions as summary.csv (an infinite HD is left out). ``foreground_mean`` is
    the plain mean of the class means, as in nnU-Net (NaN if a class mean is NaN).
    """
    names = [*NNUNET_METRICS, *EXTRA_METRICS]
    mean = {k: {m: _finite_mean([c["metrics"][k][m] for c in per_case]) for m in names} for k in keys}
    fg = [k for k in keys if k != "0"]
    foreground_mean = {m: float(np.mean([mean[k][m] for k in fg])) for m in names}
    return {"metric_per_case": per_case, "mean": mean, "foreground_mean": foreground_mean}


def write_summary_json(summary: dict, path: Path) -> None:
    """Atomically, with ``sort_keys=True`` and ``indent=4`` as nnU-Net's ``save_json``; NaN is written as the
    bare token ``NaN`` (and inf as ``Infinity``), as Python's ``json`` does with ``allow_nan`` (nnU-Net too)."""
    atomic_write_text(path, json.dumps(summary, sort_keys=True, indent=4, allow_nan=True) + "\n")


def evaluate_folders(
    pred_dir: Path,
    label_dir: Path,
    out_dir: Path,
    *,
    dataset: Path | None = None,
    hd95_convention: str = "monai",
    empty_dice: str = "one",
) -> list[dict]:
    """Per-case, per-class metrics of every prediction against its reference label (same case id).

    Reference cases without a prediction are listed in one stdout line and not scored; a prediction without a
    reference is an error. Probability maps (``CASE_prob_<class>`` beside ``CASE``) are skipped, and counted in
    one line on stdout. A prediction must lie on its reference's grid: shape, spacing, orientation and origin
    (within half a voxel) are checked, as ``modalseg verify`` checks a label against its image. Returns the
    summary rows (``aggregate``; s.d. None when a class has a single value).
    """
    if hd95_convention not in HD95_CONVENTIONS:
        raise ConfigError(f"hd95 convention must be one of {HD95_CONVENTIONS}, got {hd95_convention!r}")
    if empty_dice not in EMPTY_DICE_CONVENTIONS:
        raise ConfigError(f"empty-dice convention must be one of {EMPTY_DICE_CONVENTIONS}, got {empty_dice!r}")
    labels, label_maps = _label_files(label_dir)
    preds, pred_maps = _label_files(pred_dir, keep=frozenset(labels))
    if pred_maps or label_maps:
        where = [f"{n} in {d}" for n, d in ((pred_maps, pred_dir), (label_maps, label_dir)) if n]
        total = pred_maps + label_maps
        print(f"skipped {total} probability map{'s' if total != 1 else ''} (CASE_prob_<class> files beside "
              f"their CASE): {', '.join(where)}")
    if not labels:
        raise DataError("no label files found", label_dir)
    if not preds:
        raise DataError("no prediction files found", pred_dir)
    cases = [c for c in preds if c in labels]
    if not cases:
        raise DataError(f"no prediction has a reference label in {label_dir} (case ids are the file names, "
                        f"e.g. {next(iter(preds))!r} vs {next(iter(labels))!r})", pred_dir)
    orphans = [c for c in preds if c not in labels]
    if orphans:
        others = f" ({len(orphans)} predictions have none)" if len(orphans) > 1 else ""
        raise DataError(f"no reference label {orphans[0]!r} in {label_dir}{others}", preds[orphans[0]])
    unscored = sorted(set(labels) - set(preds))
    if unscored:
        print(_unscored_line(unscored))
    scheme = label_scheme(dataset, [labels[c] for c in cases])
    results: list[CaseMetrics] = []
    per_case: list[dict] = []
    for case in cases:
        label_path, pred_path = labels[case], preds[case]
        gt_vol = read_volume(label_path, kind="label")
        pred_vol = read_volume(pred_path, kind="label")
        if gt_vol.shape != pred_vol.shape:
            raise DataError(f"shape {pred_vol.shape} differs from the reference {gt_vol.shape}", pred_path)
        # Distances are in the reference's mm: a prediction on another grid (spacing, axis order, flips or a
        # shifted origin) would be scored against the wrong voxels, so refuse it as `modalseg verify` would.
        problems = geometry_problems(pred_vol, gt_vol, "prediction", "reference", origin_tol_voxels=ORIGIN_TOL_VOXELS)
        if problems:
            raise DataError(problems[0])
        _check_values(gt_vol.array, scheme.allowed, label_path)
        _check_values(pred_vol.array, scheme.allowed, pred_path)
        valid = None if scheme.ignore is None else gt_vol.array != scheme.ignore
        gt_masks = region_masks(gt_vol.array, scheme.classes)
        pred_masks = region_masks(pred_vol.array, scheme.classes)
        case_metrics = evaluate_masks(pred_masks, gt_masks, spacing=gt_vol.spacing, case_id=case, valid=valid,
                                      hd95_convention=hd95_convention, empty_dice=empty_dice)
        results += case_metrics
        per_case.append({
            "prediction_file": str(pred_path),
            "reference_file": str(label_path),
            "metrics": {scheme.keys[m.class_name]: _nnunet_case_metrics(
                m, confusion_counts(pred_masks[m.class_name], gt_masks[m.class_name], valid), empty_dice)
                for m in case_metrics},
        })
    write_table([m.as_dict() for m in results], COLUMNS, out_dir / "metrics.md", out_dir / "metrics.csv",
                title="Per-case metrics (distances in mm)")
    summary = aggregate(results, sd_of_one=None)
    write_table(summary, SUMMARY_COLUMNS, out_dir / "summary.md", out_dir / "summary.csv", title="Summary over cases")
    write_summary_json(nnunet_summary(per_case, list(scheme.keys.values())), out_dir / "summary.json")
    return summary
