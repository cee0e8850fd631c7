"""Segmentation metrics through MONAI, with explicit conventions for empty masks.

Metrics (one value per case and class):

* ``dice``: Dice similarity coefficient ``2|P∩G| / (|P|+|G|)`` (``monai.metrics.compute_dice``), a fraction.
* ``sensitivity``: ``TP / (TP + FN)`` (``get_confusion_matrix`` + ``compute_confusion_matrix_metric``),
  a fraction.
* ``rad``: relative area difference of paper 1, ``|A_pred - A_gt| / A_gt`` (not in MONAI; numpy on the voxel
  counts, the voxel size cancels), a **fraction**: tables multiply by 100 to print the paper's percentages,
  exactly as for Dice and sensitivity (``format_mean_sd(..., scale=100)``).
* ``hd``: symmetric Hausdorff distance in mm (``compute_hausdorff_distance(percentile=None)``), the maximum of
  the two directed distances between the mask *edges* (voxels of the mask removed by one binary erosion).
  Paper 2's "surface Hausdorff distance" is this ``hd``; ``hd95`` is reported beside it.
* ``hd95``: 95th-percentile Hausdorff distance in mm. ``hd95_convention="monai"`` (default) follows
  ``compute_hausdorff_distance(percentile=95)``: the **maximum of the two directed 95th percentiles**
  (pred->gt edge distances and gt->pred edge distances, each percentile taken with linear interpolation).
  medpy's ``hd95`` instead pools both directions' distances and takes one 95th percentile, which is usually
  smaller but, with interpolated percentiles, not always; ``hd95_convention="pooled"`` computes that variant
  (from MONAI's edge distances), so numbers can be compared with papers that used medpy.

Distances use the voxel ``spacing`` in mm, one value per array axis (pass it: unit spacing is not mm).

Empty-mask conventions (``status``), applied explicitly before MONAI is called (MONAI would return NaN or
inf silently, and NaN values vanish from ``nanmean``):

==============  ======  ===========  ======  ======  ======
status          dice    sensitivity  rad     hd      hd95
==============  ======  ===========  ======  ======  ======
``ok``          value   value        value   value   value
``both_empty``  1.0     NaN          NaN     0.0     0.0
``gt_empty``    0.0     NaN          inf     inf     inf
``pred_empty``  0.0     0.0          1.0     inf     inf
==============  ======  ===========  ======  ======  ======

Why: a correctly empty prediction is a perfect overlap (Dice 1, no surface distance); sensitivity and RAD are
ratios over the ground truth, so with an empty ground truth they are undefined (0/0 = NaN) or infinite
(n/0 = inf); a missing prediction has no surface, so its distances are infinite. :func:`aggregate` never drops
a NaN or inf silently: it leaves non-finite values out of the mean and reports how many, per status.

Where we deviate from nnU-Net: nnU-Net v2 (``compute_metrics``) scores a both-empty class Dice (and IoU) **NaN**
(``tp + fp + fn == 0``) and ``np.nanmean`` then leaves that case out of the class mean; ours scores it 1, so a
class that is correctly absent raises the mean. ``empty_dice="nan"`` (``modalseg evaluate --empty-dice nan``)
gives nnU-Net's convention: Dice NaN for ``both_empty`` (the distances stay 0), and the NaN is left out of the
means (and counted) by :func:`aggregate`, i.e. a nanmean. Only Dice changes; the other rows above do not.

nnU-Net's ``ignore`` label and region-based labels (BraTS' whole tumour = values 1, 2, 3) are scored with
:func:`region_masks` and :func:`evaluate_masks` (``valid`` = voxels outside the reference's ignore label).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics import (
    compute_confusion_matrix_metric,
    compute_dice,
    compute_hausdorff_distance,
    get_confusion_matrix,
)
from monai.metrics.utils import get_edge_surface_distance

from modalseg.errors import ConfigError, DataError
from modalseg.errors import EvaluationError as EvaluationError  # its old home: still importable from here
from modalseg.evaluation.stats import mean_sd

METRIC_NAMES: tuple[str, ...] = ("dice", "sensitivity", "rad", "hd", "hd95")
STATUSES: tuple[str, ...] = ("ok", "both_empty", "pred_empty", "gt_empty")
HD95_CONVENTIONS: tuple[str, ...] = ("monai", "pooled")
#: Dice of a class absent from both prediction and reference: ``"one"`` (ours) or ``"nan"`` (nnU-Net's).
EMPTY_DICE_CONVENTIONS: tuple[str, ...] = ("one", "nan")
_HD_CHUNK_VOXELS = 1 << 24


@dataclass
class CaseMetrics:
    """Metrics of one class in one case (a patient volume or a single slice). Distances in mm."""

    case_id: str
    class_name: str
    dice: float
    sensitivity: float
    rad: float
    hd: float
    hd95: float
    status: str
    n_gt: int
    n_pred: int

    def as_dict(self, **extra: object) -> dict:
        """Plain record for tables; ``extra`` adds keys such as ``model``, ``run``, ``fold``, ``modality``."""
        return {**extra, **asdict(self)}


def _check_inputs(
    pred: np.ndarray,
    gt: np.ndarray,
    num_classes: int,
    class_names: Sequence[str],
    case_id: str,
    hd95_convention: str,
    spatial_ndim: int | None = None,
    empty_dice: str = "one",
) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise DataError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}", case_id)
    if spatial_ndim is not None and pred.ndim != spatial_ndim:
        raise DataError(f"expected {spatial_ndim}D label maps, got shape {pred.shape}", case_id)
    if pred.ndim not in (2, 3) and spatial_ndim is None:
        raise DataError(f"expected a 2D or 3D label map, got shape {pred.shape}", case_id)
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2 (background + one class), got {num_classes}")
    if len(class_names) != num_classes:
        raise ConfigError(
            f"{len(class_names)} class names {list(class_names)} for num_classes={num_classes} "
            "(name every class, background first)"
        )
    _check_conventions(hd95_convention, empty_dice)
    for name, arr in (("prediction", pred), ("ground truth", gt)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            if not np.all(np.equal(np.mod(arr, 1), 0)):
                raise DataError(f"{name} is not a label map (non-integer values, dtype {arr.dtype})", case_id)
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise DataError(
                f"{name} has label values in [{arr.min()}, {arr.max()}], outside 0..{num_classes - 1}",
                case_id,
            )
    return pred.astype(np.int64, copy=False), gt.astype(np.int64, copy=False)


def _check_conventions(hd95_convention: str, empty_dice: str) -> None:
    if hd95_convention not in HD95_CONVENTIONS:
        raise ConfigError(f"hd95_convention must be one of {HD95_CONVENTIONS}, got {hd95_convention!r}")
    if empty_dice not in EMPTY_DICE_CONVENTIONS:
        raise ConfigError(f"empty_dice must be one of {EMPTY_DICE_CONVENTIONS}, got {empty_dice!r}")


def _one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """(B, *spatial) integer labels -> (B, C, *spatial) uint8 one-hot, as MONAI expects."""
    t = torch.from_numpy(np.ascontiguousarray(labels))
    oh = torch.nn.functional.one_hot(t, num_classes).to(torch.uint8)
    return oh.movedim(-1, 1).contiguous()


def _check_spacing(spacing: Sequence[float] | float, ndim: int, case_id: str) -> tuple[float, ...]:
    sp = (float(spacing),) * ndim if np.isscalar(spacing) else tuple(float(s) for s in spacing)
    if len(sp) != ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise DataError(f"spacing {spacing} must be {ndim} positive voxel sizes in mm, one per axis", case_id)
    return sp


def _pooled_hd95(pred_mask: torch.Tensor, gt_mask: torch.Tensor, spacing: tuple[float, ...]) -> float:
    """medpy-style HD95: one 95th percentile over both directions' edge distances pooled."""
    _, distances, _ = get_edge_surface_distance(
        pred_mask.bool(), gt_mask.bool(), distance_metric="euclidean", spacing=spacing, symmetric=True
    )
    pooled = torch.cat([d.reshape(-1).double() for d in distances])
    return float(torch.quantile(pooled, 0.95))


def _evaluate_batch(
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    num_classes: int,
    class_names: Sequence[str],
    spacings: Sequence[tuple[float, ...]],
    case_ids: Sequence[str],
    include_background: bool,
    hd95_convention: str,
    empty_dice: str = "one",
) -> list[CaseMetrics]:
    """Metrics of a batch of label maps (B, *spatial), all classes at once where MONAI allows."""
    p = _one_hot(pred, num_classes)
    g = _one_hot(gt, num_classes)
    first = 0 if include_background else 1
    return _evaluate_onehot(
        p[:, first:], g[:, first:], names=list(class_names)[first:], spacings=spacings, case_ids=case_ids,
        hd95_convention=hd95_convention, empty_dice=empty_dice,
    )


def _evaluate_onehot(
    p: torch.Tensor,
    g: torch.Tensor,
    *,
    names: Sequence[str],
    spacings: Sequence[tuple[float, ...]],
    case_ids: Sequence[str],
    hd95_convention: str,
    empty_dice: str,
) -> list[CaseMetrics]:
    """Metrics of binary masks (B, C, *spatial) uint8, one channel per class or region (channels may overlap)."""
    # Confusion matrix (B, C, 4) = [tp, fp, tn, fn]; it also gives the voxel counts.
    cm = get_confusion_matrix(p, g, include_background=True)
    tp, fp, fn = cm[..., 0].long(), cm[..., 1].long(), cm[..., 3].long()
    n_gt = (tp + fn).numpy()
    n_pred = (tp + fp).numpy()
    sens = compute_confusion_matrix_metric("sensitivity", cm).double().numpy()
    # ignore_empty=False: MONAI returns 1 for both-empty and 0 for gt-empty, matching our convention.
    dice = compute_dice(p, g, include_background=True, ignore_empty=False).double().numpy()

    status = np.full(n_gt.shape, "ok", dtype=object)
    status[(n_gt == 0) & (n_pred == 0)] = "both_empty"
    status[(n_gt == 0) & (n_pred > 0)] = "gt_empty"
    status[(n_gt > 0) & (n_pred == 0)] = "pred_empty"

    hd = np.zeros(n_gt.shape)
    hd95 = np.zeros(n_gt.shape)
    hd[status != "both_empty"] = np.inf
    hd95[status != "both_empty"] = np.inf
    ok_b, ok_c = np.nonzero(status == "ok")
    # Only masks that are non-empty on both sides reach MONAI (no empty-mask warnings, no NaN). MONAI casts
    # to float, so pairs go in chunks of at most _HD_CHUNK_VOXELS voxels to bound memory on large volumes.
    voxels = int(np.prod(p.shape[2:]))
    step = max(1, _HD_CHUNK_VOXELS // max(voxels, 1))
    for start in range(0, ok_b.size, step):
        cb, cc = ok_b[start : start + step], ok_c[start : start + step]
        bi, ci = torch.from_numpy(cb), torch.from_numpy(cc)
        p_ok, g_ok = p[bi, ci][:, None].float(), g[bi, ci][:, None].float()
        sp_ok = [list(spacings[b]) for b in cb]
        with warnings.catch_warnings():
            # MONAI 1.6 warns about its own internal use of a deprecated argument of get_mask_edges.
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            hd[cb, cc] = compute_hausdorff_distance(p_ok, g_ok, include_background=True, spacing=sp_ok)[:, 0]
            if hd95_convention == "monai":
                hd95[cb, cc] = compute_hausdorff_distance(
                    p_ok, g_ok, include_background=True, percentile=95, spacing=sp_ok
                )[:, 0]
            else:
                for k, b in enumerate(cb):
                    hd95[b, cc[k]] = _pooled_hd95(p_ok[k, 0], g_ok[k, 0], spacings[b])

    rad = np.full(n_gt.shape, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        rad[n_gt > 0] = np.abs(n_pred[n_gt > 0] - n_gt[n_gt > 0]) / n_gt[n_gt > 0]
    rad[status == "gt_empty"] = np.inf
    # Explicit conventions (see the module docstring), whatever MONAI returned for these entries.
    dice[status == "both_empty"] = 1.0 if empty_dice == "one" else np.nan
    dice[(status == "gt_empty") | (status == "pred_empty")] = 0.0
    sens[(status == "both_empty") | (status == "gt_empty")] = np.nan
    sens[status == "pred_empty"] = 0.0

    out: list[CaseMetrics] = []
    for b in range(p.shape[0]):
        for c, name in enumerate(names):
            out.append(
                CaseMetrics(
                    case_id=case_ids[b],
                    class_name=name,
                    dice=float(dice[b, c]),
                    sensitivity=float(sens[b, c]),
                    rad=float(rad[b, c]),
                    hd=float(hd[b, c]),
                    hd95=float(hd95[b, c]),
                    status=str(status[b, c]),
                    n_gt=int(n_gt[b, c]),
                    n_pred=int(n_pred[b, c]),
                )
            )
    return out


def evaluate_case(
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    num_classes: int,
    class_names: Sequence[str],
    spacing: Sequence[float] | float,
    case_id: str,
    include_background: bool = False,
    hd95_convention: str = "monai",
    empty_dice: str = "one",
) -> list[CaseMetrics]:
    """Metrics of one case, per class, from integer label maps (2D slice or 3D patient volume).

    For paper 2's volume Dice and surface Hausdorff distance, stack the slice predictions of a patient into
    a 3D volume and pass the voxel spacing of each axis in mm. ``class_names`` names every class, background
    first; the background is skipped unless ``include_background``. See the module docstring for the HD95
    convention (``"monai"``: max of the directed 95th percentiles; ``"pooled"``: medpy-style) and for the
    empty-mask conventions (``empty_dice="nan"``: nnU-Net's both-empty Dice).
    """
    pred, gt = _check_inputs(pred, gt, num_classes, class_names, case_id, hd95_convention, empty_dice=empty_dice)
    sp = _check_spacing(spacing, pred.ndim, case_id)
    return _evaluate_batch(
        pred[None],
        gt[None],
        num_classes=num_classes,
        class_names=class_names,
        spacings=[sp],
        case_ids=[case_id],
        include_background=include_background,
        hd95_convention=hd95_convention,
        empty_dice=empty_dice,
    )


def evaluate_slices(
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    num_classes: int,
    class_names: Sequence[str],
    spacing: Sequence[float] | float | Sequence[Sequence[float]],
    case_ids: Sequence[str] | None = None,
    include_background: bool = False,
    hd95_convention: str = "monai",
    empty_dice: str = "one",
) -> list[CaseMetrics]:
    """Per-slice metrics of 2D label maps (N, H, W), e.g. paper 1's one labelled slice per patient.

    ``spacing`` is one in-plane (row, column) spacing in mm for all slices, or one pair per slice (a flat
    pair of numbers always means the shared spacing, even for two slices).
    ``case_ids`` names the slices (default ``slice_000``, ``slice_001``, ...). All slices are evaluated in
    one batched MONAI call per metric.
    """
    pred, gt = _check_inputs(
        pred, gt, num_classes, class_names, "slices", hd95_convention, spatial_ndim=3, empty_dice=empty_dice
    )
    n = pred.shape[0]
    if case_ids is None:
        case_ids = [f"slice_{i:03d}" for i in range(n)]
    if len(case_ids) != n:
        raise DataError(f"{len(case_ids)} case ids for {n} slices", "slices")
    if np.isscalar(spacing) or (len(spacing) == 2 and all(np.isscalar(s) for s in spacing)):  # type: ignore[arg-type]
        spacings = [_check_spacing(spacing, 2, "slices")] * n  # type: ignore[arg-type]
    else:
        if len(spacing) != n:  # type: ignore[arg-type]
            raise DataError(f"{len(spacing)} spacings for {n} slices", "slices")  # type: ignore[arg-type]
        spacings = [_check_spacing(s, 2, case_ids[i]) for i, s in enumerate(spacing)]  # type: ignore[arg-type]
    return _evaluate_batch(
        pred,
        gt,
        num_classes=num_classes,
        class_names=class_names,
        spacings=spacings,
        case_ids=list(case_ids),
        include_background=include_background,
        hd95_convention=hd95_convention,
        empty_dice=empty_dice,
    )


def region_masks(label_array: np.ndarray, regions: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    """Boolean mask of each region, the union of its label values (nnU-Net's ``region_or_label_to_mask``).

    A plain label is a region of one value (``{"mass": [1]}``); BraTS' ``{"whole tumor": [1, 2, 3], "tumor
    core": [2, 3], "enhancing tumor": [3]}`` gives three overlapping masks.
    """
    array = np.asarray(label_array)
    out: dict[str, np.ndarray] = {}
    for name, values in regions.items():
        values = [values] if np.isscalar(values) else list(values)  # type: ignore[list-item]
        if not values or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"region {name!r} must be a non-empty list of integer label values, got {values!r}")
        out[name] = np.isin(array, np.asarray(values, dtype=np.int64))
    return out


def confusion_counts(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None) -> dict[str, int]:
    """``TP``, ``FP``, ``FN``, ``TN`` voxel counts of two boolean masks, only where ``valid`` (nnU-Net's
    ``compute_tp_fp_fn_tn``: ``valid`` is the complement of the reference's ignore label)."""
    p, g = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    use = np.ones(p.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    tp = int(np.count_nonzero(p & g & use))
    fp = int(np.count_nonzero(p & ~g & use))
    fn = int(np.count_nonzero(~p & g & use))
    return {"TP": tp, "FP": fp, "FN": fn, "TN": int(np.count_nonzero(use)) - tp - fp - fn}


def evaluate_masks(
    pred: Mapping[str, np.ndarray],
    gt: Mapping[str, np.ndarray],
    *,
    spacing: Sequence[float] | float,
    case_id: str,
    valid: np.ndarray | None = None,
    hd95_convention: str = "monai",
    empty_dice: str = "one",
) -> list[CaseMetrics]:
    """Metrics of one case from boolean masks per class or region (``class_name`` = the mask's name).

    Masks may overlap (regions, see :func:`region_masks`). ``valid`` (same shape; False = not scored) is the
    nnU-Net ignore label: both masks are cleared outside it before any metric, so a prediction that differs
    from the reference only there scores Dice 1 and HD 0. Conventions as in :func:`evaluate_case`.
    """
    _check_conventions(hd95_convention, empty_dice)
    names = list(gt)
    if not names or list(pred) != names:
        raise ConfigError(f"prediction masks {list(pred)} and reference masks {names} must name the same classes")
    shape = np.shape(gt[names[0]])
    if len(shape) not in (2, 3):
        raise DataError(f"expected 2D or 3D masks, got shape {shape}", case_id)
    use = None if valid is None else np.asarray(valid, dtype=bool)
    for what, masks in (("prediction", pred), ("reference", gt)):
        for name in names:
            if np.shape(masks[name]) != shape:
                raise DataError(f"{what} mask {name!r} has shape {np.shape(masks[name])}, not {shape}", case_id)
    if use is not None and use.shape != shape:
        raise DataError(f"valid mask has shape {use.shape}, not {shape}", case_id)
    sp = _check_spacing(spacing, len(shape), case_id)

    def stack(masks: Mapping[str, np.ndarray]) -> torch.Tensor:
        arr = np.stack([np.asarray(masks[n], dtype=bool) if use is None else (np.asarray(masks[n], bool) & use)
                        for n in names])
        return torch.from_numpy(arr.astype(np.uint8))[None]

    return _evaluate_onehot(stack(pred), stack(gt), names=names, spacings=[sp], case_ids=[case_id],
                            hd95_convention=hd95_convention, empty_dice=empty_dice)


def _excluded_reason(values: np.ndarray, statuses: Sequence[str]) -> tuple[int, str]:
    """Count and describe the non-finite values left out of a mean, e.g. ``"pred_empty: 2 (inf)"``."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return 0, ""
    counts: dict[tuple[str, str], int] = {}
    for v, s in zip(values[bad], np.asarray(statuses, dtype=object)[bad], strict=True):
        key = (s, "NaN" if np.isnan(v) else "inf")
        counts[key] = counts.get(key, 0) + 1
    reason = "; ".join(f"{s}: {k} ({kind})" for (s, kind), k in sorted(counts.items()))
    return int(bad.sum()), reason


def aggregate(
    metrics: Iterable[CaseMetrics],
    by: Sequence[str] = ("class_name",),
    metric_names: Sequence[str] = METRIC_NAMES,
    *,
    sd_of_one: float | None = 0.0,
) -> list[dict]:
    """Mean and s.d. (over cases) of each metric per group, with the exclusions spelled out.

    One dict per group (in order of first appearance) with the ``by`` keys, ``n_cases``, the number of cases
    per status (``n_ok``, ``n_both_empty``, ...) and, for each metric ``m``: ``m_mean``, ``m_sd`` (ddof=1;
    ``sd_of_one`` for one value: 0 as in the paper tables, or None where no spread should be shown, e.g.
    ``modalseg evaluate``; NaN for none), ``m_n`` (values used), ``m_n_excluded`` and ``m_excluded`` (e.g.
    ``"pred_empty: 2 (inf)"``). NaN and inf values are left out of the means (a nanmean), never silently.
    """
    groups: dict[tuple, list[CaseMetrics]] = {}
    for m in metrics:
        try:
            key = tuple(getattr(m, k) for k in by)
        except AttributeError as exc:
            raise ConfigError(f"cannot group metrics by {list(by)}: {exc}") from None
        groups.setdefault(key, []).append(m)
    rows: list[dict] = []
    for key, items in groups.items():
        row: dict = dict(zip(by, key, strict=True))
        row["n_cases"] = len(items)
        statuses = [m.status for m in items]
        for s in STATUSES:
            row[f"n_{s}"] = statuses.count(s)
        for name in metric_names:
            values = np.array([getattr(m, name) for m in items], dtype=float)
            n_excl, reason = _excluded_reason(values, statuses)
            finite = values[np.isfinite(values)]
            mean, sd = mean_sd(finite)
            row[f"{name}_mean"] = mean
            row[f"{name}_sd"] = sd_of_one if finite.size == 1 else sd
            row[f"{name}_n"] = int(finite.size)
            row[f"{name}_n_excluded"] = n_excl
            row[f"{name}_excluded"] = reason
        rows.append(row)
    if not rows:
        warnings.warn("aggregate: no metrics to aggregate", stacklevel=2)
    return rows
