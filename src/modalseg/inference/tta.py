"""Test-time augmentation: the mean of the predictions of mirrored inputs, mirrored back (``--tta flip``).

For a 2D slice network the mirror axes are the two in-plane axes (mirroring along the slice axis would change
nothing: every slice is predicted on its own), so ``flip`` averages 4 predictions: none, rows, columns, both —
nnU-Net's mirroring for 2D configurations. A 3D network (sliding windows over the slice stack) also mirrors the
slice axis (axis 0 of the stack): 8 predictions, nnU-Net's 3D mirroring (:func:`tta_axes`). The wrapper is an
inferer over any inferer and any backend.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from modalseg.errors import ConfigError
from modalseg.inference.backends import Backend

#: ``--tta`` choices: ``none`` (one prediction) or ``flip`` (every combination of in-plane mirrors)
TTA_MODES = ("none", "flip")


def flip_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes``, the empty one first: ``(-2, -1)`` -> ``[(), (-2,), (-1,), (-2, -1)]``."""
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


class FlipTTA:
    """Wrap ``inferer``: predict every mirrored copy of the slices, mirror each result back, average them.

    ``axes`` are axes of the slice stack ``(N, C, H, W)``: -2 and -1 (rows, columns; the default) and, for a 3D
    network, 0 (the slice axis).
    """

    def __init__(self, inferer, axes: Sequence[int] = (-2, -1)) -> None:  # noqa: ANN001  (any inferer)
        if not axes or any(a not in (0, -2, -1) for a in axes):
            raise ConfigError(f"test-time flips are axes 0 (slices, 3D), -2 and -1 of a slice stack, got "
                              f"{tuple(axes)}")
        self.inferer = inferer
        self.flips = flip_combinations(tuple(dict.fromkeys(axes)))

    def __call__(self, backend: Backend, images: np.ndarray, modality: int | None = None) -> np.ndarray:
        images = np.asarray(images)
        total: np.ndarray | None = None
        for axes in self.flips:
            x = np.flip(images, axis=axes) if axes else images
            probs = self.inferer(backend, np.ascontiguousarray(x), modality)
            probs = np.flip(probs, axis=axes) if axes else probs
            total = probs.astype(np.float64) if total is None else total + probs
        return (total / len(self.flips)).astype(np.float32)


def tta_axes(spatial_dims: int) -> tuple[int, ...]:
    """The mirror axes of ``--tta flip`` for a network of ``spatial_dims``: in-plane for 2D (and 2.5D), every axis
    for 3D."""
    return (0, -2, -1) if int(spatial_dims) == 3 else (-2, -1)


def with_tta(inferer, mode: str, axes: Sequence[int] = (-2, -1)):  # noqa: ANN001, ANN201  (inferer in and out)
    """``inferer`` wrapped for ``--tta mode`` (mirroring ``axes``, :func:`tta_axes`)."""
    if mode not in TTA_MODES:
        raise ConfigError(f"--tta must be one of {', '.join(TTA_MODES)}, got {mode!r}")
    return inferer if mode == "none" else FlipTTA(inferer, axes)
