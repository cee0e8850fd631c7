"""Validation scores of slice predictions; slice inference itself lives in :mod:`modalseg.inference`
(re-exported here for callers of the earlier location)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from modalseg.inference.inferers import (  # noqa: F401  (re-exported)
    DEFAULT_PIXELS_PER_BATCH,
    ensemble_probabilities,
    input_size_rule,
    predict_probabilities,
    slices_per_batch,
)


def foreground_dice_per_group(
    pred: np.ndarray, target: np.ndarray, groups: Sequence[str], num_classes: int
) -> dict[str, float]:
    """Mean foreground Dice per group (e.g. patient: slices stacked in 3D). Both empty counts as 1."""
    result: dict[str, float] = {}
    groups_arr = np.asarray(groups)
    for g in dict.fromkeys(groups):
        sel = groups_arr == g
        p, t = pred[sel], target[sel]
        dices = []
        for c in range(1, num_classes):
            pc, tc = p == c, t == c
            denom = pc.sum() + tc.sum()
            dices.append(1.0 if denom == 0 else 2.0 * np.logical_and(pc, tc).sum() / denom)
        result[g] = float(np.mean(dices)) if dices else float("nan")
    return result
