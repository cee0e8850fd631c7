"""Batched slice inference shared by validation, evaluation and ``modalseg predict``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from modalseg.training.precision import Precision

#: Pixels per forward pass: 8 slices of 256x256, the fastest batch measured on 2 CPU cores (docs/benchmarks.md).
#: Prediction memory follows pixels, not slices: one 2048x2048 slice is 64 slices of 256x256.
DEFAULT_PIXELS_PER_BATCH = 8 * 256 * 256


def slices_per_batch(
    batch_size: int, height: int, width: int, max_pixels: int | None = DEFAULT_PIXELS_PER_BATCH
) -> int:
    """At most ``batch_size`` slices and at most ``max_pixels`` pixels per forward pass (never fewer than 1 slice)."""
    if max_pixels is None:
        return batch_size
    return max(1, min(batch_size, max_pixels // max(1, height * width)))


def input_size_rule(model: nn.Module) -> tuple[int, int]:
    """(multiple, minimum) the model's input sides need: its ``size_multiple`` and ``min_size`` (1 if undeclared)."""
    return max(1, int(getattr(model, "size_multiple", 1))), max(1, int(getattr(model, "min_size", 1)))


def _padding(side: int, multiple: int, minimum: int) -> tuple[int, int]:
    """(before, after) zero padding that makes ``side`` >= ``minimum`` and a multiple of ``multiple``, centred."""
    target = max(side, minimum)
    target += (-target) % multiple
    total = target - side
    return total // 2, total - total // 2


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    precision: Precision,
    *,
    batch_size: int = 8,
    modality: int | None = None,
    max_pixels: int | None = DEFAULT_PIXELS_PER_BATCH,
) -> np.ndarray:
    """Softmax probabilities (N, C, H, W) float32 for slices ``images`` (N, M, H, W).

    ``modality`` selects the modality branch of unpaired models (``model(x, modality=k)``). Slices smaller than
    the model's ``min_size`` (e.g. 2**depth) or not multiples of its ``size_multiple`` are zero-padded (zero is the
    mean after z-score normalisation) and the logits cropped back, so any slice size can be predicted.
    """
    model.eval()
    out: list[np.ndarray] = []
    if len(images) == 0:
        return np.zeros((0,), np.float32)
    height, width = int(images.shape[-2]), int(images.shape[-1])
    multiple, minimum = input_size_rule(model)
    (top, bottom), (left, right) = _padding(height, multiple, minimum), _padding(width, multiple, minimum)
    step = slices_per_batch(batch_size, height + top + bottom, width + left + right, max_pixels)
    # One autocast region for all batches: autocast caches the low-precision copy of each weight until the
    # region ends, so the weights are cast once per volume instead of once per batch.
    with precision.autocast():
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            x = torch.as_tensor(np.ascontiguousarray(chunk), dtype=torch.float32)
            if top or bottom or left or right:
                x = torch.nn.functional.pad(x, (left, right, top, bottom))
            x = precision.to_input(x)
            logits = model(x) if modality is None else model(x, modality=modality)
            logits = logits[..., top : top + height, left : left + width]
            out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return np.concatenate(out, axis=0)


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
