"""Validation scores of slice predictions; slice inference itself lives in :mod:`modalseg.inference`
(re-exported here for callers of the earlier location).

nnU-Net's extras in validation (docs/conventions.md): a region-based model is scored per region (its label values
in the painted prediction and in the target, as ``modalseg evaluate --dataset`` scores files), and voxels of the
``ignore`` label count nowhere: not in the Dice, not in the empty / all-foreground check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from modalseg.inference.inferers import (  # noqa: F401  (re-exported)
    DEFAULT_PIXELS_PER_BATCH,
    SliceInferer,
    ensemble_probabilities,
    input_size_rule,
    predict_probabilities,
    slices_per_batch,
)


def foreground_dice_per_group(
    pred: np.ndarray, target: np.ndarray, groups: Sequence[str], num_classes: int, *,
    classes: Sequence[Sequence[int]] | None = None, ignore_index: int | None = None,
) -> dict[str, float]:
    """Mean foreground Dice per group (e.g. patient: slices stacked in 3D). Both empty counts as 1.

    ``classes``: the label-map values of each scored class or region (a region is their union; default: the
    classes 1..num_classes-1). ``ignore_index``: target voxels with this value are scored in no class (both
    prediction and target are cleared there, as nnU-Net's evaluation does).
    """
    result: dict[str, float] = {}
    groups_arr = np.asarray(groups)
    for g in dict.fromkeys(groups):
        sel = groups_arr == g
        p, t = pred[sel], target[sel]
        valid = None if ignore_index is None else t != ignore_index
        dices = []
        for c in (range(1, num_classes) if classes is None else classes):
            if classes is None:
                pc, tc = p == c, t == c
            else:
                pc, tc = np.isin(p, c), np.isin(t, c)
            if valid is not None:
                pc, tc = pc & valid, tc & valid
            denom = pc.sum() + tc.sum()
            dices.append(1.0 if denom == 0 else 2.0 * np.logical_and(pc, tc).sum() / denom)
        result[g] = float(np.mean(dices)) if dices else float("nan")
    return result


@dataclass(frozen=True)
class GroupScores:
    """Validation of one split: Dice per group, and per group whether the prediction is empty / all foreground."""

    dice: dict[str, float]
    empty: list[bool]
    full: list[bool]
    any_foreground: bool


def score_groups(
    pred: np.ndarray, target: np.ndarray, groups: Sequence[str], num_classes: int, *,
    classes: Sequence[Sequence[int]] | None = None, ignore_index: int | None = None,
) -> GroupScores:
    """:func:`foreground_dice_per_group` and the facts of the degenerate-prediction check, over the scored
    (not ignored) voxels only: a prediction is "empty" or "all foreground" where the labels are annotated."""
    dice = foreground_dice_per_group(pred, target, groups, num_classes, classes=classes, ignore_index=ignore_index)
    groups_arr = np.asarray(groups)
    empty, full = [], []
    for g in dice:
        p = pred[groups_arr == g]
        if ignore_index is not None:
            p = p[target[groups_arr == g] != ignore_index]
            if p.size == 0:  # nothing annotated: neither empty nor full
                continue
        empty.append(not (p > 0).any())
        full.append(bool((p > 0).all()))
    fg = target > 0 if ignore_index is None else (target > 0) & (target != ignore_index)
    return GroupScores(dice, empty, full, bool(fg.any()))
