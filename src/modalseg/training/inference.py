"""Batched slice inference shared by validation, evaluation and ``modalseg predict``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from modalseg.training.precision import Precision


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    precision: Precision,
    *,
    batch_size: int = 8,
    modality: int | None = None,
) -> np.ndarray:
    """Softmax probabilities (N, C, H, W) float32 for slices ``images`` (N, M, H, W).

    ``modality`` selects the modality branch of unpaired models (``model(x, modality=k)``).
    """
    model.eval()
    out: list[np.ndarray] = []
    # One autocast region for all batches: autocast caches the low-precision copy of each weight until the
    # region ends, so the weights are cast once per volume instead of once per batch.
    with precision.autocast():
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            x = precision.to_input(torch.as_tensor(np.ascontiguousarray(chunk), dtype=torch.float32))
            logits = model(x) if modality is None else model(x, modality=modality)
            out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0,), np.float32)


def ensemble_probabilities(prob_list: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of several models' probabilities (fold ensembling)."""
    return np.mean(np.stack(prob_list, axis=0), axis=0)


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
