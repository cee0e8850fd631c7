"""How a volume becomes network inputs: batched slices for 2D networks (sliding windows for 3D come next).

An inferer takes any :class:`~modalseg.inference.backends.Backend` (MONAI's "inferer over any callable"
idea): the same slice batching serves validation, evaluation, ``modalseg predict`` and exported models.
Importing it does not import torch (the torch-free runtime of ``modalseg.deploy`` runs this inferer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from modalseg.inference.backends import Backend, TorchBackend, input_size_rule

if TYPE_CHECKING:
    import torch
    from torch import nn

    from modalseg.training.precision import Precision

__all__ = ["DEFAULT_PIXELS_PER_BATCH", "SliceInferer", "ensemble_probabilities", "input_size_rule",
           "predict_probabilities", "slices_per_batch"]

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


def _padding(side: int, multiple: int, minimum: int) -> tuple[int, int]:
    """(before, after) zero padding that makes ``side`` >= ``minimum`` and a multiple of ``multiple``, centred."""
    target = max(side, minimum)
    target += (-target) % multiple
    total = target - side
    return total // 2, total - total // 2


class SliceInferer:
    """Softmax probabilities (N, K, H, W) float32 for slices (N, C, H, W), ``batch_size`` slices and at most
    ``max_pixels`` pixels per forward pass.

    Slices smaller than the backend's ``min_size`` (e.g. 2**depth) or not multiples of its ``size_multiple`` are
    zero-padded (zero is the mean after z-score normalisation) and the logits cropped back, so any slice size
    can be predicted.
    """

    def __init__(self, batch_size: int = 8, max_pixels: int | None = DEFAULT_PIXELS_PER_BATCH) -> None:
        self.batch_size = batch_size
        self.max_pixels = max_pixels

    def __call__(self, backend: Backend, images: np.ndarray | torch.Tensor, modality: int | None = None) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0,), np.float32)
        height, width = int(images.shape[-2]), int(images.shape[-1])
        multiple, minimum = backend.size_multiple, backend.min_size
        (top, bottom), (left, right) = _padding(height, multiple, minimum), _padding(width, multiple, minimum)
        step = slices_per_batch(self.batch_size, height + top + bottom, width + left + right, self.max_pixels)
        pad = ((0, 0), (0, 0), (top, bottom), (left, right))
        out: list[np.ndarray] = []
        with backend.session():
            for start in range(0, len(images), step):
                chunk = images[start: start + step]
                x = chunk if isinstance(chunk, np.ndarray) else chunk.numpy()  # a torch tensor
                x = np.ascontiguousarray(x, dtype=np.float32)
                if top or bottom or left or right:
                    x = np.pad(x, pad)
                out.append(backend(x, modality, (top, height, left, width)))
        return np.concatenate(out, axis=0)


def predict_probabilities(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    precision: Precision,
    *,
    batch_size: int = 8,
    modality: int | None = None,
    max_pixels: int | None = DEFAULT_PIXELS_PER_BATCH,
) -> np.ndarray:
    """Softmax probabilities (N, C, H, W) of a torch ``model`` for slices ``images`` (N, M, H, W): a
    :class:`SliceInferer` over a :class:`TorchBackend`. ``modality`` selects the unpaired model's branch."""
    return SliceInferer(batch_size, max_pixels)(TorchBackend(model, precision), images, modality)


def ensemble_probabilities(prob_list: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of several models' probabilities (fold ensembling)."""
    return np.mean(np.stack(prob_list, axis=0), axis=0)
