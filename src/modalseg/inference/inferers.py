"""How a volume becomes network inputs: batched slices (2D), slices with their neighbours (2.5D) or
overlapping 3D windows (3D).

An inferer takes any :class:`~modalseg.inference.backends.Backend` (MONAI's "inferer over any callable"
idea) and one volume's slice stack ``(N, C, H, W)`` (``N`` along the slice axis, the cache's slice-major order)
and returns probabilities ``(N, K, H, W)``: the same contract for all three, so validation, evaluation,
``modalseg predict``, test-time augmentation and fold ensembling do not care which one runs, and the
prediction's geometry (un-resize, un-crop, reorientation) is restored by the same inverse transforms.
Importing it does not import torch (the torch-free runtime of ``modalseg.deploy`` runs these inferers); the
sliding-window inferer uses MONAI's ``sliding_window_inference`` where torch is installed and its NumPy twin
(:func:`numpy_sliding_window`, tested equal) where it is not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from modalseg.inference.backends import Backend, TorchBackend, input_size_rule

if TYPE_CHECKING:
    import torch
    from torch import nn

    from modalseg.training.precision import Precision

__all__ = ["DEFAULT_PIXELS_PER_BATCH", "ContextSliceInferer", "Inferer", "SlidingWindowInferer", "SliceInferer",
           "ensemble_probabilities", "inferer_for", "input_size_rule", "layout_inferer", "predict_probabilities",
           "slices_per_batch", "with_context"]

class Inferer(Protocol):
    """One volume's slice stack ``(N, C, H, W)`` -> probabilities ``(N, K, H, W)`` through ``backend``."""

    def __call__(self, backend: Backend, images: np.ndarray, modality: int | None = None) -> np.ndarray: ...


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


def with_context(images: np.ndarray, context: int) -> np.ndarray:
    """2.5D input of one volume's slices ``(N, C, H, W)``: each slice with its ``context`` neighbours on either side,
    ``(N, C * (2 * context + 1), H, W)``, modality-major (modality ``c``'s slices ``d - context .. d + context`` are
    channels ``c * (2 context + 1) ...``: the paired networks split their input into per-modality blocks of
    ``in_channels``). Beyond the first and last slice the neighbours are zeros (the mean after z-scoring; what the
    training patches are padded with)."""
    images = np.asarray(images, dtype=np.float32)
    n, c = images.shape[:2]
    width = 2 * int(context) + 1
    padded = np.zeros((n + 2 * context, c, *images.shape[2:]), dtype=np.float32)
    padded[context: context + n] = images
    # window j of slice d is padded[d + j]: (N, width, C, H, W) -> (N, C, width, H, W)
    stacked = np.stack([padded[j: j + n] for j in range(width)], axis=1)
    return np.ascontiguousarray(stacked.transpose(0, 2, 1, 3, 4).reshape(n, c * width, *images.shape[2:]))


class ContextSliceInferer:
    """2.5D: a :class:`SliceInferer` over every slice of one volume with its ``context`` neighbours as extra channels
    per modality (:func:`with_context`). ``images`` must be the volume's whole slice stack, in slice order."""

    def __init__(self, context: int, inner: SliceInferer | None = None, chunk: int = 64) -> None:
        if int(context) < 1:
            raise ValueError(f"context must be >= 1 slice, got {context}")
        self.context, self.inner, self.chunk = int(context), inner or SliceInferer(), int(chunk)

    def __call__(self, backend: Backend, images: np.ndarray | torch.Tensor, modality: int | None = None) -> np.ndarray:
        images = images if isinstance(images, np.ndarray) else images.numpy()
        n, k = len(images), self.context
        if n == 0:
            return np.zeros((0,), np.float32)
        out = []
        for start in range(0, n, self.chunk):  # a chunk of slices at a time, each with its real neighbours
            lo, hi = max(0, start - k), min(n, start + self.chunk + k)
            stacked = with_context(images[lo:hi], k)[start - lo: start - lo + min(self.chunk, n - start)]
            out.append(self.inner(backend, stacked, modality))
        return np.concatenate(out, axis=0)


class SlidingWindowInferer:
    """3D: overlapping windows of ``patch_size`` (d, h, w) over one volume, Gaussian-weighted (nnU-Net's
    prediction; MONAI's :func:`~monai.inferers.sliding_window_inference` does the tiling and blending).

    ``images`` is the volume's slice stack ``(N, C, H, W)``, i.e. depth ``N``; the result is ``(N, K, H, W)``.
    Deviations from MONAI's defaults, stated: ``overlap`` 0.5 (MONAI 0.25; nnU-Net's step of half a patch) and
    ``mode="gaussian"`` (MONAI: constant) with MONAI's ``sigma_scale`` 0.125 (nnU-Net's 1/8 of the patch). The
    windows' *probabilities* are blended (the backend contract returns probabilities), as fold ensembling and
    test-time augmentation average probabilities. A volume smaller than the window along an axis is zero-padded by
    MONAI (the mean after z-scoring) and cropped back, so any volume size is predicted; a window must itself suit
    the network (``patch_size`` comes from the planner, a multiple of the network's poolings).
    """

    def __init__(self, patch_size: Sequence[int], *, overlap: float = 0.5, batch_size: int = 2,
                 mode: str = "gaussian") -> None:
        size = tuple(int(v) for v in patch_size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"patch_size must be 3 positive sizes (d, h, w), got {patch_size!r}")
        if not 0.0 <= float(overlap) < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.patch_size, self.overlap, self.batch_size, self.mode = size, float(overlap), int(batch_size), mode

    def __call__(self, backend: Backend, images: np.ndarray | torch.Tensor, modality: int | None = None) -> np.ndarray:
        images = images if isinstance(images, np.ndarray) else images.numpy()
        if len(images) == 0:
            return np.zeros((0,), np.float32)
        # (1, C, D, H, W), a writable copy (the cache's volumes are read-only memory maps)
        volume = np.array(np.moveaxis(np.asarray(images, dtype=np.float32), 0, 1)[None], order="C")
        try:
            import torch
            from monai.inferers import sliding_window_inference
        except ImportError:  # the torch-free runtime of an exported 3D model: the same windows in NumPy
            with backend.session():
                probs = numpy_sliding_window(volume[0], self.patch_size, self.overlap, self.batch_size,
                                             lambda x: backend(x, modality, (0, x.shape[-2], 0, x.shape[-1])),
                                             mode=self.mode)
            return np.ascontiguousarray(np.moveaxis(probs, 1, 0))  # (D, K, H, W)

        def window_probabilities(x: torch.Tensor) -> torch.Tensor:
            h, w = int(x.shape[-2]), int(x.shape[-1])
            return torch.from_numpy(backend(x.numpy(), modality, (0, h, 0, w)))

        with backend.session(), torch.no_grad():
            probs = sliding_window_inference(
                torch.from_numpy(volume), self.patch_size, self.batch_size, window_probabilities,
                overlap=self.overlap, mode=self.mode, padding_mode="constant", cval=0.0)
        probs = probs.as_tensor() if hasattr(probs, "as_tensor") else probs
        return np.ascontiguousarray(np.moveaxis(probs[0].float().numpy(), 1, 0))  # (D, K, H, W)


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """MONAI's ``compute_importance_map(patch_size, mode="gaussian", sigma_scale)`` in NumPy float32 (tested equal):
    a separable Gaussian over the window, sigma = ``sigma_scale`` x side, centred, floored at max(min, 1e-3)."""
    weights = np.ones((), np.float32)
    for side in patch_size:
        x = np.arange(-(side - 1) / 2.0, (side - 1) / 2.0 + 1, dtype=np.float32)[:side]
        g = np.exp(x ** 2 / np.float32(-2 * (side * sigma_scale) ** 2)).astype(np.float32)
        weights = weights[..., None] * g
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """MONAI's window starts along one axis (``_get_scan_interval`` + ``dense_patch_slices``): a step of
    ``int(window x (1 - overlap))`` (the window itself when it fits exactly), the last window flush with the end."""
    step = window if window == size else max(int(window * (1 - overlap)), 1)
    count = next((d for d in range(-(-size // step)) if d * step + window >= size), 0) + 1
    return [i * step - max(i * step + window - size, 0) for i in range(count)]


def numpy_sliding_window(volume: np.ndarray, patch_size: Sequence[int], overlap: float, batch_size: int,
                         predict: Callable[[np.ndarray], np.ndarray], *, mode: str = "gaussian") -> np.ndarray:
    """MONAI's Gaussian ``sliding_window_inference`` of one volume ``(C, D, H, W)`` in NumPy, for runtimes without
    torch: zero padding (centred, the odd voxel after) to at least the window, windows in MONAI's order,
    ``predict`` on ``batch_size`` windows at a time (``(B, C, d, h, w)`` -> ``(B, K, d, h, w)`` probabilities),
    probabilities x weights summed, divided by the summed weights, the padding cropped. Returns ``(K, D, H, W)``.
    ``mode``: ``gaussian`` (:func:`gaussian_importance`) or ``constant`` (weights 1), as MONAI's."""
    if mode not in ("gaussian", "constant"):
        raise ValueError(f"mode must be gaussian or constant, got {mode!r}")
    patch = tuple(int(v) for v in patch_size)
    shape = volume.shape[1:]
    pads = [((max(p - n, 0)) // 2, max(p - n, 0) - (max(p - n, 0)) // 2) for p, n in zip(patch, shape, strict=True)]
    padded = np.pad(volume, [(0, 0), *pads]) if any(a or b for a, b in pads) else volume
    size = padded.shape[1:]
    starts = [window_starts(n, p, overlap) for n, p in zip(size, patch, strict=True)]
    corners = np.stack([g.ravel() for g in np.meshgrid(*starts, indexing="ij")], axis=1)
    weights = gaussian_importance(patch) if mode == "gaussian" else np.ones(patch, np.float32)
    total = count = None
    step = max(1, int(batch_size))
    for b in range(0, len(corners), step):
        boxes = [tuple(slice(int(c), int(c) + p) for c, p in zip(corner, patch, strict=True))
                 for corner in corners[b: b + step]]
        probs = np.asarray(predict(np.stack([padded[(slice(None), *box)] for box in boxes])), dtype=np.float32)
        if total is None:
            total = np.zeros((probs.shape[1], *size), np.float32)
            count = np.zeros(size, np.float32)
        for box, p in zip(boxes, probs, strict=True):
            total[(slice(None), *box)] += p * weights
            count[box] += weights
    total /= count
    crop = tuple(slice(a, a + n) for (a, _), n in zip(pads, shape, strict=True))
    return np.ascontiguousarray(total[(slice(None), *crop)])


def layout_inferer(patch_size: Sequence[int] | None, context_slices: int = 0, batch_size: int = 8, *,
                   overlap: float = 0.5) -> Inferer:
    """The inferer of a network layout: sliding windows of ``patch_size`` (3D), neighbours as channels
    (``context_slices``, 2.5D), else batched slices."""
    if patch_size:
        return SlidingWindowInferer(patch_size, overlap=overlap, batch_size=max(1, min(int(batch_size), 2)))
    if context_slices:
        return ContextSliceInferer(int(context_slices), SliceInferer(batch_size))
    return SliceInferer(batch_size)


def inferer_for(meta: object, batch_size: int = 8, *, overlap: float = 0.5) -> Inferer:
    """The inferer a trained model needs, from its description (``ModelMeta``: ``patch_size``, ``context_slices``;
    :func:`layout_inferer`)."""
    return layout_inferer(getattr(meta, "patch_size", None), int(getattr(meta, "context_slices", 0) or 0),
                          batch_size, overlap=overlap)


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
