"""Preprocessing as invertible transforms, and the seam for random (augmentation) transforms.

Why: training, prediction and evaluation must apply *the same* preprocessing, and prediction must map its output
back exactly onto the input file's grid. Each deterministic step is therefore an :class:`InvertibleTransform`
(the idea of MONAI's ``InvertibleTransform``): applying it to a :class:`Sample` appends one :class:`Applied` entry
(the transform and a JSON-able record of what it did) to ``sample.trace``; :func:`invert` walks a trace backwards
and maps an image, a label map or class probabilities back through every step.

The preprocessing of :mod:`modalseg.data.preprocess` is the composition
(:func:`modalseg.data.preprocess.preprocessing_pipeline`)::

    [ToCanonical] -> Normalise -> ToSliceMajor -> SelectSlices -> CropPad -> Resize

on an image ``(C, X, Y, Z)`` (and label ``(X, Y, Z)``) in array order; from ``ToSliceMajor`` on, arrays are
*slice-major* ``(C, D, H, W)`` / ``(D, H, W)``: ``D`` runs along ``slice_axis``, the crop box and the resize act on
the in-plane ``(H, W)`` only, slice by slice. ``preprocess_volume`` / ``restore_volume`` are these transforms
(bit for bit what the former per-slice code gave: the per-slice loops call the same primitives in the same order).
:class:`OntoGrid` is the per-file stage before channels are stacked (an assistant modality or a label onto its
master's grid, :func:`modalseg.data.geometry.onto_grid`); it works on :class:`~modalseg.data.types.Volume` objects.

Inversion by kind: ``"image"`` intensities (normalisation undone, padding 0), ``"label"`` class maps (nearest,
background 0 outside what was kept), ``"probabilities"`` ``(K, ...)`` (bilinear, background class 0 = 1 outside)
and ``"region_probabilities"`` ``(R, ...)``: one sigmoid channel per region of a region-based model (bilinear, 0
outside for every region: there is no background channel).

Foreground (crop boxes, ``only_labelled_slices``) is :func:`~modalseg.data.types.foreground_mask`: nnU-Net's
``ignore`` voxels (:data:`~modalseg.data.types.IGNORE_INDEX`) are unannotated, not foreground.

Random transforms (:class:`RandomTransform`) are *not* invertible steps of a trace: they draw from a generator
derived from ``(seed, step, sample index)`` only (``SeedSequence([seed, crc32(name), step, index])``), never from
a stream advanced by earlier draws, so a resumed run and every DDP rank (sample index = position in the *global*
batch) draw exactly what one uninterrupted single process draws, whatever the worker or rank order.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modalseg.data.geometry import (
    Reorientation,
    canonical_affine,
    onto_grid_how,
    reorientation_of,
    resample_onto,
)
from modalseg.data.types import Volume, foreground_mask
from modalseg.errors import ConfigError

log = logging.getLogger(__name__)

KINDS = ("image", "label", "probabilities", "region_probabilities")


# ------------------------------------------------------------------------------------------------ slice primitives
# The per-slice operations the transforms (and preprocess.preprocess_slice) are made of. They live here, below
# preprocess (which re-exports them), so that preprocess can compose the transforms without an import cycle.
#: Percentiles of ``zscore_volume_robust``: intensities are clipped to them before the z-score (nnU-Net clips CT
#: to the 0.5/99.5 percentiles of the dataset's foreground; here of each volume, which also tames MR artefacts).
ROBUST_PERCENTILES = (0.5, 99.5)

Box = tuple[int, int, int, int]
_EPS = 1e-8


def _pair(value: Any, name: str) -> tuple[int, int] | None:
    """``None``, an int or a 2-sequence of positive ints -> ``(H, W)``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"preprocess.{name}: expected a size (int or [H, W]), got {value!r}")
    if isinstance(value, (int, np.integer)):
        value = (int(value), int(value))
    try:
        h, w = value
        out = (int(h), int(w))
    except (TypeError, ValueError):
        raise ConfigError(f"preprocess.{name}: expected a size (int or [H, W]), got {value!r}") from None
    if out[0] != h or out[1] != w or min(out) < 1:
        raise ConfigError(f"preprocess.{name}: sizes must be positive integers, got {value!r}")
    return out


@dataclass(frozen=True)
class SliceGeometry:
    """Everything needed to map a processed slice back to its original slice grid.

    ``orig_shape`` (h, w) of the original slice; ``box`` (r0, c0, r1, c1) half-open crop box in original
    pixels (may reach outside the image: that part was padded); ``out_shape`` (H, W) of the processed slice.
    """

    orig_shape: tuple[int, int]
    box: Box
    out_shape: tuple[int, int]

    @property
    def crop_shape(self) -> tuple[int, int]:
        return (self.box[2] - self.box[0], self.box[3] - self.box[1])

    @property
    def resized(self) -> bool:
        return self.crop_shape != tuple(self.out_shape)

    def processed_spacing(self, in_plane_spacing: Sequence[float]) -> tuple[float, float]:
        """Pixel size (mm) of the processed slice: cropping keeps it, resizing scales it by crop/out size."""
        ch, cw = self.crop_shape
        oh, ow = self.out_shape
        return (float(in_plane_spacing[0]) * ch / oh, float(in_plane_spacing[1]) * cw / ow)

    def to_dict(self) -> dict[str, list[int]]:
        return {"orig_shape": list(self.orig_shape), "box": list(self.box), "out_shape": list(self.out_shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SliceGeometry:
        return cls(
            orig_shape=tuple(int(v) for v in data["orig_shape"]),  # type: ignore[arg-type]
            box=tuple(int(v) for v in data["box"]),  # type: ignore[arg-type]
            out_shape=tuple(int(v) for v in data["out_shape"]),  # type: ignore[arg-type]
        )


def center_box(shape: Sequence[int], size: Sequence[int]) -> Box:
    """A ``size`` box centred on an image of ``shape`` (h, w); reaches outside where the image is smaller."""
    r = _place(int(shape[0]), int(size[0]), shape[0] / 2.0)
    c = _place(int(shape[1]), int(size[1]), shape[1] / 2.0)
    return (r[0], c[0], r[1], c[1])


def square_box(shape: Sequence[int]) -> Box:
    """The centred square box of side max(h, w): padding the short side keeps the aspect ratio when the square
    is then resized (a 45x120 slice is padded to 120x120, not stretched 2.7x along one axis)."""
    side = max(int(shape[0]), int(shape[1]))
    return center_box(shape, (side, side))


def _place(extent: int, size: int, centre: float) -> tuple[int, int]:
    """Start/stop of a ``size`` window centred at ``centre`` and kept inside ``[0, extent)`` when it fits;
    when it does not fit the window is centred on the image (padding split evenly, extra pixel after)."""
    if size >= extent:
        start = -((size - extent) // 2)
    else:
        start = int(np.floor(centre - size / 2.0 + 0.5))
        start = min(max(start, 0), extent - size)
    return (start, start + size)


def bbox_for_volume(label_volume: np.ndarray, slice_axis: int, size: int | Sequence[int]) -> Box:
    """Fixed-size in-plane box (paper 2) centred on the union of the foreground over all slices.

    The box is shifted to stay inside the image when the image is at least as large as the box, and centred
    on the image (the rest is padding) along an axis where the image is smaller. Without foreground the box
    is the centred box. If the foreground extent exceeds the box it cannot be enclosed: the box is centred
    on the foreground and a warning is logged.
    """
    size = _pair(size, "crop_size")
    assert size is not None
    fg = foreground_mask(label_volume)
    mask = fg.any(axis=slice_axis)
    shape = mask.shape
    if not mask.any():
        return center_box(shape, size)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    lo, hi = (rows[0], cols[0]), (rows[-1] + 1, cols[-1] + 1)
    if hi[0] - lo[0] > size[0] or hi[1] - lo[1] > size[1]:
        log.warning(
            "foreground extent %dx%d exceeds the %dx%d crop box; the box cannot enclose it",
            hi[0] - lo[0], hi[1] - lo[1], size[0], size[1],
        )
    r = _place(shape[0], size[0], (lo[0] + hi[0]) / 2.0)
    c = _place(shape[1], size[1], (lo[1] + hi[1]) / 2.0)
    return (r[0], c[0], r[1], c[1])


def crop_slice(array: np.ndarray, box: Box, fill: float = 0) -> np.ndarray:
    """Crop the last two axes of ``array`` to ``box``; the part outside the image is ``fill``."""
    h, w = array.shape[-2:]
    r0, c0, r1, c1 = box
    if (r0, c0, r1, c1) == (0, 0, h, w):
        return array
    out = np.full(array.shape[:-2] + (r1 - r0, c1 - c0), fill, dtype=array.dtype)
    ir0, ic0, ir1, ic1 = max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)
    if ir1 > ir0 and ic1 > ic0:
        out[..., ir0 - r0 : ir1 - r0, ic0 - c0 : ic1 - c0] = array[..., ir0:ir1, ic0:ic1]
    return out


def _paste(
    array: np.ndarray, box: Box, orig_shape: Sequence[int], background: np.ndarray | float
) -> np.ndarray:
    """Inverse of :func:`crop_slice`: put the box content back on an ``orig_shape`` grid of ``background`` (a
    number, or one value per entry of the first axis, e.g. class 0 = 1 for probabilities ``(K, ..., h, w)``)."""
    h, w = orig_shape
    r0, c0, r1, c1 = box
    lead = array.shape[:-2]
    out = np.empty(lead + (h, w), dtype=array.dtype)
    if isinstance(background, np.ndarray):
        out[...] = background.reshape((-1,) + (1,) * (out.ndim - 1))
    else:
        out[...] = background
    ir0, ic0, ir1, ic1 = max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)
    if ir1 > ir0 and ic1 > ic0:
        out[..., ir0:ir1, ic0:ic1] = array[..., ir0 - r0 : ir1 - r0, ic0 - c0 : ic1 - c0]
    return out


def _resize(array: np.ndarray, size: Sequence[int], *, is_label: bool) -> np.ndarray:
    """Resize the last two axes: bilinear (align_corners=False, no antialias) or nearest-exact for labels."""
    if tuple(array.shape[-2:]) == tuple(size):
        return array
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:  # the torch-free runtime of exported models (modalseg.deploy.runtime)
        return _resize_numpy(array, size, is_label=is_label)
    lead = array.shape[:-2]
    t = torch.from_numpy(np.ascontiguousarray(array).reshape((1, -1) + array.shape[-2:]))
    if is_label:
        # float32 represents every class index exactly; nearest never mixes values.
        out = F.interpolate(t.to(torch.float32), size=tuple(size), mode="nearest-exact")
        return out.numpy().reshape(lead + tuple(size)).astype(array.dtype)
    out = F.interpolate(t.to(torch.float32), size=tuple(size), mode="bilinear", align_corners=False)
    return out.numpy().reshape(lead + tuple(size)).astype(array.dtype, copy=False)


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of ``bilinear`` (align_corners=False) along one axis as torch's CPU kernel
    computes them: scale ``n_in / n_out`` in float32, source position ``scale * (i + 0.5) - 0.5`` rounded once
    (its fused multiply-add) and clamped at 0, the lower neighbour and the fraction."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.float64(scale) * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    frac = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1))
    return i0, np.minimum(i0 + 1, n_in - 1), np.float32(1) - frac, frac


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source indices of ``nearest-exact`` along one axis: ``floor((i + 0.5) * n_in / n_out)`` in float32, never past
    the last entry."""
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale).astype(np.int64),
                      n_in - 1)


def _lerp(a: np.ndarray, b: np.ndarray, w0: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """``a * w0 + b * w1`` as torch's CPU kernel rounds it (the second product in float32), to float32."""
    return (a.astype(np.float64) * w0 + (b * w1).astype(np.float64)).astype(np.float32)


def _resize_numpy(array: np.ndarray, size: Sequence[int], *, is_label: bool) -> np.ndarray:
    """:func:`_resize` where torch is not installed (the exported-model runtime): the same sampling, width then
    height as torch's separable kernel; labels equal, images within a few float32 rounding steps of torch's."""
    lead = array.shape[:-2]
    h, w = array.shape[-2:]
    out_h, out_w = int(size[0]), int(size[1])
    x = np.ascontiguousarray(array).reshape((-1, h, w))
    if is_label:  # nearest-exact, rows and columns
        rows, cols = _nearest_index(h, out_h), _nearest_index(w, out_w)
        return x[:, rows][:, :, cols].reshape(lead + (out_h, out_w)).astype(array.dtype)
    x = x.astype(np.float32, copy=False)
    c0, c1, cw0, cw1 = _linear_taps(w, out_w)
    r0, r1, rw0, rw1 = _linear_taps(h, out_h)
    cols = _lerp(x[:, :, c0], x[:, :, c1], cw0, cw1)
    out = _lerp(cols[:, r0], cols[:, r1], rw0[:, None], rw1[:, None])
    return out.reshape(lead + (out_h, out_w)).astype(array.dtype, copy=False)


def volume_stats(images: np.ndarray, modes: Sequence[str] | None = None) -> list[dict[str, float]]:
    """Per-channel statistics of an (M, ...) volume for the ``*_volume`` normalisation modes (``modes``: one per
    channel; robust modes get percentile-clipped statistics)."""
    modes = modes or ["zscore_volume"] * len(images)
    return [_robust_stats(c) if m == "zscore_volume_robust" else _stats(c) for c, m in zip(images, modes, strict=True)]


def _robust_stats(x: np.ndarray) -> dict[str, float]:
    """Mean/std of the volume clipped to :data:`ROBUST_PERCENTILES`, with the clip bounds."""
    c = np.asarray(x, dtype=np.float64)
    lo, hi = (float(v) for v in np.percentile(c, ROBUST_PERCENTILES))
    clipped = np.clip(c, lo, hi)
    return {"mean": float(clipped.mean()), "std": float(clipped.std()), "max": hi, "min": lo, "clip": 1.0}


def _stats(x: np.ndarray) -> dict[str, float]:
    c = np.asarray(x, dtype=np.float64)
    return {"mean": float(c.mean()), "std": float(c.std()), "max": float(c.max()), "min": float(c.min())}


def _normalise(x: np.ndarray, mode: str, stats: dict[str, float] | None) -> np.ndarray:
    """One 2D channel. Degenerate statistics (constant slice, max <= 0) do not divide by ~0."""
    return _apply_normalisation(x, mode, _normalisation_stats(x, mode, stats))


def _normalisation_stats(x: np.ndarray, mode: str, stats: dict[str, float] | None) -> dict[str, float] | None:
    """The statistics ``mode`` uses for the 2D channel ``x``: its own (``*_slice``), the given volume or dataset
    ones, or none; kept apart from applying them so that the ``Normalise`` transform can record them."""
    if mode == "none":
        return None
    if mode == "ct_dataset":
        assert stats is not None
        return stats
    if "_volume" in mode:
        if stats is None:
            raise ValueError(f"normalisation {mode!r} needs volume statistics (see volume_stats)")
        return stats
    return _stats(x)


def _apply_normalisation(x: np.ndarray, mode: str, s: dict[str, float] | None) -> np.ndarray:
    """``x`` normalised by ``mode`` with the statistics ``s`` of :func:`_normalisation_stats`."""
    if mode == "none":
        return x.astype(np.float32, copy=False)
    assert s is not None
    if mode == "ct_dataset":  # nnU-Net's CTNormalization: clip to the dataset's foreground percentiles, z-score
        std = s["std"] if s["std"] > _EPS else 1.0
        return np.asarray((np.clip(x, s["lo"], s["hi"]) - s["mean"]) / std, dtype=np.float32)
    if mode.startswith("zscore"):
        std = s["std"] if s["std"] > _EPS else 1.0
        if s.get("clip"):
            x = np.clip(x, s["min"], s["max"])
        y = (x - s["mean"]) / std
    elif mode.startswith("max"):
        y = x / s["max"] if s["max"] > _EPS else x
    else:  # minmax_slice
        rng = s["max"] - s["min"]
        y = (x - s["min"]) / rng if rng > _EPS else np.zeros_like(x)
    return np.asarray(y, dtype=np.float32)


# ------------------------------------------------------------------------------------------------ samples
@dataclass
class Sample:
    """What flows through the transforms: ``image`` ``(C, *spatial)``, optional ``label`` ``(*spatial)``, the voxel
    size of each spatial axis, the voxel-to-RAS ``affine`` where known, and the ``trace`` of applied transforms."""

    image: np.ndarray
    label: np.ndarray | None = None
    spacing: tuple[float, ...] | None = None
    affine: np.ndarray | None = None
    path: Path | None = None
    trace: list[Applied] = field(default_factory=list)

    def replace(self, **changes: Any) -> Sample:
        """A copy with ``changes`` (arrays are shared, the trace list is copied)."""
        changes.setdefault("trace", list(self.trace))
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Applied:
    """One applied transform and the JSON-able record its :meth:`InvertibleTransform.inverse` needs."""

    transform: InvertibleTransform
    record: dict[str, Any]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")


def _background(kind: str, array: np.ndarray) -> np.ndarray | float:
    """What lies outside the kept region: 0 (also every region's sigmoid), or class 0 with probability 1 (per
    leading class axis)."""
    if kind != "probabilities":
        return 0
    bg = np.zeros(array.shape[0], dtype=array.dtype)
    bg[0] = 1
    return bg


class InvertibleTransform(ABC):
    """A deterministic step that records what it did, so that its effect can be undone on model outputs."""

    def __call__(self, sample: Sample) -> Sample:
        out, record = self.forward(sample)
        out.trace = [*sample.trace, Applied(self, record)]
        return out

    @abstractmethod
    def forward(self, sample: Sample) -> tuple[Sample, dict[str, Any]]:
        """The transformed sample (a new object) and the record for :meth:`inverse`."""

    @abstractmethod
    def inverse(self, array: np.ndarray, record: dict[str, Any], kind: str) -> np.ndarray:
        """Map ``array`` (an image, label map or probabilities of the transformed sample's layout) back."""


class Compose:
    """Transforms applied in order; the sample's trace lists each of them."""

    def __init__(self, transforms: Sequence[InvertibleTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return f"Compose({[type(t).__name__ for t in self.transforms]})"


def invert(array: np.ndarray, trace: Sequence[Applied], kind: str) -> np.ndarray:
    """Undo ``trace`` (last step first) on ``array`` of kind ``"image"``, ``"label"`` or ``"probabilities"``."""
    _check_kind(kind)
    out = np.asarray(array)
    for applied in reversed(list(trace)):
        out = applied.transform.inverse(out, applied.record, kind)
    return out


def find_record(trace: Sequence[Applied], cls: type) -> dict[str, Any] | None:
    """The record of the last ``cls`` step of ``trace`` (``None`` when there is none)."""
    for applied in reversed(list(trace)):
        if isinstance(applied.transform, cls):
            return applied.record
    return None


# ------------------------------------------------------------------------------------------------ geometry
def reorientation_record(reo: Reorientation) -> dict[str, Any]:
    """The JSON-able form of a :class:`~modalseg.data.geometry.Reorientation` (``ToCanonical.reorientation`` reads
    it back)."""
    return {"perm": list(reo.perm), "flips": list(reo.flips), "file_shape": list(reo.file_shape),
            "file_codes": reo.file_codes}


class ToCanonical(InvertibleTransform):
    """Voxel order closest to RAS (permutation and flips only, :func:`modalseg.data.geometry.to_canonical`): the
    same anatomical axis is sliced for every file. Needs ``sample.affine``; inverted exactly."""

    def forward(self, sample: Sample) -> tuple[Sample, dict[str, Any]]:
        if sample.affine is None:
            raise ValueError("ToCanonical needs the sample's affine")
        image = np.asarray(sample.image)
        shape = tuple(int(s) for s in image.shape[-3:])
        probe = Volume(array=np.broadcast_to(np.zeros((), np.uint8), shape), affine=sample.affine, path=sample.path)
        reo = reorientation_of(probe)
        record = reorientation_record(reo)
        if reo.is_identity:  # the very same arrays and affine, as to_canonical returns the volume itself
            return sample.replace(spacing=probe.spacing), record
        affine = canonical_affine(sample.affine, reo)
        label = reo.apply(sample.label) if sample.label is not None else None
        spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
        return sample.replace(image=reo.apply(image), label=label, affine=affine, spacing=spacing), record

    @staticmethod
    def reorientation(record: dict[str, Any]) -> Reorientation:
        return Reorientation(tuple(record["perm"]), tuple(bool(f) for f in record["flips"]),  # type: ignore[arg-type]
                             tuple(record["file_shape"]), record["file_codes"])  # type: ignore[arg-type]

    def inverse(self, array: np.ndarray, record: dict[str, Any], kind: str) -> np.ndarray:
        return self.reorientation(record).invert(array)


class OntoGrid:
    """An assistant modality (or a label) onto its master's grid by world coordinates (per-file stage).

    ``apply(vol)`` is :func:`modalseg.data.geometry.onto_grid` with the options given here, returning the aligned
    Volume, the one-line note (``None`` on the fast path) and a record; ``inverse`` maps an array on the master's
    grid back onto ``vol``'s grid: nothing on the fast path, the exact reorientation, or a resampling (linear for
    images and per-class probabilities, nearest neighbour for labels).
    """

    def __init__(self, ref: Volume, *, name: str, ref_name: str, kind: str = "image", **options: Any) -> None:
        self.ref, self.name, self.ref_name, self.kind, self.options = ref, name, ref_name, kind, options

    def apply(self, vol: Volume) -> tuple[Volume, str | None, dict[str, Any]]:
        out, note, how = onto_grid_how(vol, self.ref, name=self.name, ref_name=self.ref_name, kind=self.kind,
                                       **self.options)
        record: dict[str, Any] = {"how": how, "shape": list(vol.shape),
                                  "affine": np.asarray(vol.affine, dtype=np.float64).tolist()}
        if how == "reoriented":
            vol_reo, ref_reo = reorientation_of(vol), reorientation_of(self.ref)
            record["reorientations"] = [reorientation_record(vol_reo), reorientation_record(ref_reo)]
        return out, note, record

    def inverse(self, array: np.ndarray, record: dict[str, Any], kind: str) -> np.ndarray:
        _check_kind(kind)
        how = record["how"]
        if how == "same":
            return np.asarray(array)
        if how == "reoriented":
            vol_reo, ref_reo = (ToCanonical.reorientation(r) for r in record["reorientations"])
            return vol_reo.invert(ref_reo.apply(np.asarray(array)))
        target = Volume(array=np.broadcast_to(np.zeros((), np.uint8), tuple(record["shape"])),
                        affine=np.asarray(record["affine"], dtype=np.float64))
        arr = np.asarray(array)
        if kind == "label":
            return resample_onto(Volume(arr, self.ref.affine), target, kind="label")[0]
        if kind == "image":
            return np.stack([resample_onto(Volume(c, self.ref.affine), target, fill=0.0)[0] for c in arr])
        background = 0 if kind == "probabilities" else -1  # region sigmoids: 0 outside for every channel
        return np.stack([resample_onto(Volume(c, self.ref.affine), target, fill=float(k == background))[0]
                         for k, c in enumerate(arr)])


class ToSliceMajor(InvertibleTransform):
    """``(C, X, Y, Z)`` -> ``(C, D, H, W)`` with ``D`` along ``slice_axis`` (the other axes keep their order), so
    that a 2D slice is ``[:, d]`` and a 3D patch a box of ``(D, H, W)``. A view; inverted exactly."""

    def __init__(self, slice_axis: int) -> None:
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis!r}")
        self.slice_axis = int(slice_axis)

    def forward(self, sample: Sample) -> tuple[Sample, dict[str, Any]]:
        a = self.slice_axis
        image = np.moveaxis(np.asarray(sample.image), 1 + a, 1)
        label = np.moveaxis(np.asarray(sample.label), a, 0) if sample.label is not None else None
        order = [a, *(i for i in range(3) if i != a)]
        spacing = tuple(sample.spacing[i] for i in order) if sample.spacing is not None else None
        affine = None
        if sample.affine is not None:
            affine = np.asarray(sample.affine, dtype=np.float64)[:, [*order, 3]]
        return sample.replace(image=image, label=label, spacing=spacing, affine=affine), {"slice_axis": a}

    def inverse(self, array: np.ndarray, record: dict[str, Any], kind: str) -> np.ndarray:
        a = int(record["slice_axis"])
        arr = np.asarray(array)
        return np.moveaxis(arr, 0, a) if kind == "label" else np.moveaxis(arr, 1, 1 + a)


def resampled_depth(depth: int, thickness: float, target: float) -> int:
    """Slices after resampling ``depth`` slices of ``thickness`` mm to about ``target`` mm: the volume's extent is
    kept (``round(depth * thickness / target)``, at least 1), so the actual thickness is ``depth * thickness / out``."""
    return max(1, int(round(int(depth) * float(thickness) / float(target))))


def _along_depth(arr: np.ndarray, axis: int, n_out: int, is_label: bool) -> np.ndarray:
    """``arr`` resampled to ``n_out`` entries along ``axis``: linear (``align_corners=False``, the taps of
    :func:`_resize_numpy`) for images and probabilities, ``nearest-exact`` for labels; numpy only (the exported
    runtime has no torch)."""
    n_in = arr.shape[axis]
    if n_in == n_out:
        return arr
    if is_label:
        return np.take(arr, _nearest_index(n_in, n_out), axis=axis)
    i0, i1, w0, w1 = _linear_taps(n_in, n_out)
    shape = [1] * arr.ndim
    shape[axis] = n_out
    a = np.take(arr, i0, axis=axis).astype(np.float32, copy=False)
    b = np.take(arr, i1, axis=axis).astype(np.float32, copy=False)
    return _lerp(a, b, w0.reshape(shape), w1.reshape(shape))


class ResampleSlices(InvertibleTransform):
    """Resample a slice-major sample ``(C, D, H, W)`` along the slice axis to about ``thickness_mm`` per slice
    (nnU-Net's resampling to a target spacing, through-plane only: in-plane sizes follow the crop and resize).

    Images linearly, labels nearest-exact (no invented class); the volume's extent is kept
    (:func:`resampled_depth`) and the sample's spacing says the actual thickness. The inverse resamples back to the
    original number of slices (probabilities linearly: they still sum to 1). ``None`` changes nothing."""

    def __init__(self, thickness_mm: float | None) -> None:
        self.thickness_mm = None if thickness_mm is None else float(thickness_mm)

    def forward(self, sample: Sample) -> tuple[Sample, dict[str, Any]]:
        image = np.asarray(sample.image)
        depth = int(image.shape[1])
        if self.thickness_mm is None or sample.spacing is None:
            return sample.replace(), {"depth": depth, "out_depth": depth}
        out = resampled_depth(depth, sample.spacing[0], self.thickness_mm)
        record = {"depth": depth, "out_depth": out}
        if out == depth:
            return sample.replace(), record
        label = None if sample.label is None else _along_depth(np.asarray(sample.label), 0, out, True)
        spacing = (float(sample.spacing[0]) * depth / out, *sample.spacing[1:])
        return sample.replace(image=_along_depth(image, 1, out, False), label=label, spacing=spacing), record

    def inverse(self, array: np.ndarray, record: dict[str, Any], kind: str) -> np.ndarray:
        arr = np.asarray(array)
        depth = int(record["depth"])
        return _along_depth(arr, 0 if kind == "label" else 1, depth, kind == "label")


class SelectSlices(InvertibleTransform):
    """Keep only the slices with foreground (``only_foreground`` and a label given), e.g. paper 1's labelled
    central slices; records every slice's foreground flag. The inverse puts the kept slices back at their depth and
    background elsewhere."""

    def __init__(self, only_foreground: bool) -> None:
        self.only_foreground = bool(only_foreground)

    def forward(self, sample: Sample) -> tuple[Sample, dict[str, Any]]:
        depth = int(np.asarray(sample.image).shape[1])
        label = sample.label
        foreground = [bool(foreground_mask(label[d]).any()) for d in range(depth)] if label is not None else None
        if self.only_foreground and foreground is not None:
            kept = [d for d in range(depth) if foreground[d]]
        else:
            kept = list(range(depth))
        record = {"depth": depth, "kept": kept, "foreground": foreground}
        if len(kept) == depth:
            return sample.replace(), record
        idx = np.asarray(kept, dtype=np.int64)
        return sample.replace(image=np.asarray(sample.image)[:, idx],
                              label=np.asarray(label)[idx] if label is not None else None), record

    def inverse(self, array: np.ndarray, record: dict[str, Any], kind: str) -> np.ndarray:
        arr = np.asarray(array)
        kept, depth = record["kept"], int(record["depth"])
        if len(kept) == depth:
            return arr
        idx = np.asarray(kept, dtype=np.int64)
        if kind == "label":
            out = np.zeros((depth, *arr.shape[1:]), dtype=arr.dtype)
            out[idx] = arr
            return out
        out = np.zeros((arr.shape[0], depth, *arr.shape[2:]), dtype=arr.dtype)
        if kind == "probabilities":
            out[0] = 1
        out[:, idx] = arr
        return out


class CropPad(InvertibleTransform):
    """Crop the in-plane ``(H, W)`` of every slice to one box, padding with 0 where the box reaches outside
    (:mod:`modalseg.data.preprocess`: ``none``, ``square``, ``center`` or ``bbox`` of the label's foreground union,
    centred without a label), or to an explicit ``box``. The inverse pastes back with background outside."""

    def __init__(self, crop: str = "none", size: Sequence[int] | None = None, box: Box | None = None) -> None:
        self.crop, self.size = crop, tuple(size) if size is not None else None
        self.box = tuple(int(v) for v in box) if box is not None else None

    def box_for(self, plane: Sequence[int], label: np.ndarray | None) -> Box:
        """The box of a slice-major volume with in-plane shape ``plane`` (``label`` ``(D, H, W)`` or None)."""
        if self.box is not None:
            return self.box  # type: ignore[return-value]
        if self.crop == "none":
            return (0, 0, int(plane[0]), int(plane[1]))
        if self.crop == "square":
            return square_box(plane)
        if self.crop == "bbox" and label is not None:
            return bbox_for_volume(label, 0, self.size)  # type: ignore[arg-type]
        return center_box(plane, self.size)  # type: ignore[arg-type]

    def forward(self, sample: Sample) -> tuple[Sample, dict[str, Any]]:
        image = np.asarray(sample.image)
        plane = tuple(int(s) for s in image.shape[-2:])
        box = tuple(int(v) for v in self.box_for(plane, sample.label))
        label = crop_slice(np.asarray(sample.label, dtype=np.int64), box, 0) if sample.label is not None else None
        return sample.replace(image=crop_slice(image, box, 0.0), label=label), {"box": list(box), "shape": list(plane)}

    def inverse(self, array: np.ndarray, record: dict[str, Any], kind: str) -> np.ndarray:
        arr = np.asarray(array)
        return _paste(arr, tuple(record["box"]), tuple(record["shape"]), _background(kind, arr))  # type: ignore[arg-type]


class Resize(InvertibleTransform):
    """Resize the in-plane ``(H, W)`` of every slice to ``size`` (bilinear without antialiasing for images,
    nearest-exact for labels: no invented class), slice by slice; ``None`` or the same size changes nothing, so
    crop -> restore stays exact. The inverse resizes back (bilinear for probabilities: they still sum to 1)."""

    def __init__(self, size: Sequence[int] | None) -> None:
        self.size = tuple(int(v) for v in size) if size is not None else None

    @staticmethod
    def _slices(arr: np.ndarray, size: tuple[int, int], is_label: bool) -> np.ndarray:
        """Each slice of a slice-major array (``(C, D, H, W)``, or ``(D, H, W)`` labels) through ``_resize``."""
        depth_axis = 0 if is_label else 1
        depth = arr.shape[depth_axis]
        if depth == 0:
            shape = list(arr.shape)
            shape[-2:] = size
            return np.empty(shape, dtype=arr.dtype)
        parts = [_resize(arr[d] if is_label else arr[:, d], size, is_label=is_label) for d in range(depth)]
        return np.stack(parts, axis=depth_axis)

    def forward(self, sample: Sample) -> tuple[Sample, dict[str, Any]]:
        image = np.asarray(sample.image)
        plane = tuple(int(s) for s in image.shape[-2:])
        out = self.size or plane
        record = {"shape": list(plane), "out_shape": list(out)}
        if tuple(out) == plane:
            return sample.replace(), record
        spacing = sample.spacing
        if spacing is not None:
            spacing = (*spacing[:-2], spacing[-2] * plane[0] / out[0], spacing[-1] * plane[1] / out[1])
        label = self._slices(sample.label, out, True) if sample.label is not None else None  # type: ignore[arg-type]
        return sample.replace(image=self._slices(image, out, False), label=label, spacing=spacing), record  # type: ignore[arg-type]

    def inverse(self, array: np.ndarray, record: dict[str, Any], kind: str) -> np.ndarray:
        arr = np.asarray(array)
        shape = tuple(record["shape"])
        if tuple(arr.shape[-2:]) == shape:
            return arr
        return self._slices(arr, shape, kind == "label")  # type: ignore[arg-type]


class Normalise(InvertibleTransform):
    """Intensity normalisation of each channel (``modes``, one per channel, see ``preprocess.NORMALIZATIONS``)
    with statistics of each slice along ``slice_axis`` (``*_slice``), of the channel's volume (``*_volume``) or of
    the dataset (``ct_dataset``, ``dataset_stats``), always of the *whole* uncropped data. Works on ``(C, X, Y, Z)``
    before slicing. Records the statistics used, so ``inverse`` gives back intensities (clipped values stay
    clipped); labels and probabilities pass unchanged."""

    def __init__(self, modes: Sequence[str], slice_axis: int = 2,
                 dataset_stats: Sequence[dict[str, float] | None] | None = None) -> None:
        self.modes = list(modes)
        self.slice_axis = int(slice_axis)
        self.dataset_stats = list(dataset_stats) if dataset_stats is not None else None

    def forward(self, sample: Sample) -> tuple[Sample, dict[str, Any]]:
        images = np.asarray(sample.image)
        if images.ndim != 4:
            raise ValueError(f"images must be (C, X, Y, Z), got shape {images.shape}")
        m, axis, modes = images.shape[0], self.slice_axis, self.modes
        if len(modes) != m:
            raise ValueError(f"{len(modes)} normalisation modes for {m} channels")
        stats: list[dict[str, float] | None] | None = (
            volume_stats(images, modes) if any("_volume" in mode for mode in modes) else None)  # type: ignore[assignment]
        if "ct_dataset" in modes:
            stats = stats or [None] * m
            for i, mode in enumerate(modes):
                if mode == "ct_dataset":
                    stats[i] = (self.dataset_stats or [None] * m)[i]
        out = np.empty(images.shape, dtype=np.float32)
        dst = np.moveaxis(out, 1 + axis, 0)
        used: list[list[dict[str, float] | None]] = [[] for _ in range(m)]
        for z in range(images.shape[1 + axis]):
            img2d = np.take(images, z, axis=1 + axis)
            norm = []
            for i in range(m):
                s = _normalisation_stats(img2d[i], modes[i], stats[i] if stats is not None else None)
                norm.append(_apply_normalisation(img2d[i], modes[i], s))
                used[i].append(s)
            dst[z] = np.stack(norm)
        record = {"modes": list(modes), "slice_axis": axis, "stats": used}
        return sample.replace(image=out), record

    def inverse(self, array: np.ndarray, record: dict[str, Any], kind: str) -> np.ndarray:
        arr = np.asarray(array)
        if kind != "image":
            return arr
        axis = int(record["slice_axis"])
        out = np.array(arr, dtype=np.float32)
        dst = np.moveaxis(out, 1 + axis, 0)
        for i, mode in enumerate(record["modes"]):
            for z, s in enumerate(record["stats"][i]):
                dst[z, i] = _denormalise(dst[z, i], mode, s)
        return out


def _denormalise(y: np.ndarray, mode: str, s: dict[str, float] | None) -> np.ndarray:
    """Inverse of ``preprocess._apply_normalisation`` with the statistics it used."""
    if mode == "none" or s is None:
        return y
    if mode == "ct_dataset" or mode.startswith("zscore"):
        std = s["std"] if s["std"] > _EPS else 1.0
        return y * std + s["mean"]
    if mode.startswith("max"):
        return y * s["max"] if s["max"] > _EPS else y
    rng = s["max"] - s["min"]  # minmax_slice
    return y * rng + s["min"] if rng > _EPS else np.full_like(y, s["min"])


# ------------------------------------------------------------------------------------------------ pipelines
def slice_geometry(trace: Sequence[Applied]) -> SliceGeometry:
    """The :class:`SliceGeometry` (original in-plane shape, box, output shape) every slice of ``trace`` shares."""
    crop, resize = find_record(trace, CropPad), find_record(trace, Resize)
    if crop is None or resize is None:
        raise ValueError("the trace has no CropPad and Resize step")
    return SliceGeometry(orig_shape=tuple(crop["shape"]), box=tuple(crop["box"]),  # type: ignore[arg-type]
                         out_shape=tuple(resize["out_shape"]))  # type: ignore[arg-type]


def geometry_trace(geom: SliceGeometry) -> list[Applied]:
    """The in-plane steps (crop/pad then resize) of a stored :class:`SliceGeometry`, for :func:`invert`."""
    box = [int(v) for v in geom.box]
    return [Applied(CropPad(box=tuple(box)), {"box": box, "shape": list(geom.orig_shape)}),  # type: ignore[arg-type]
            Applied(Resize(geom.out_shape), {"shape": list(geom.crop_shape), "out_shape": list(geom.out_shape)})]


# ------------------------------------------------------------------------------------------------ random
def stream_key(name: str) -> int:
    """A stable 32-bit number for a name (independent of Python's hash seed), for seed sequences."""
    return zlib.crc32(name.encode("utf-8"))


class RandomTransform(ABC):
    """A random transform whose draws are a pure function of ``(seed, step, sample index)``.

    ``generator(step, index)`` is ``PCG64(SeedSequence([seed, crc32(key), step, index]))`` (``key`` defaults to
    the class name, so two random transforms draw independently). ``index`` is the sample's position in the
    *global* batch of ``step`` (``rank * batch_size + i`` under DDP), so every rank, worker order and resume draws
    the same numbers for the same sample. Augmentation and modality dropout (data/augment.py) use it.
    """

    def __init__(self, seed: int = 0, key: str | None = None) -> None:
        self.seed = int(seed)
        self.key = key or type(self).__name__

    def generator(self, step: int, index: int) -> np.random.Generator:
        if int(step) < 0 or int(index) < 0:
            raise ValueError(f"step and index must be >= 0, got {step}, {index}")
        seq = np.random.SeedSequence([self.seed, stream_key(self.key), int(step), int(index)])
        return np.random.Generator(np.random.PCG64(seq))

    def __call__(self, sample: Sample, *, step: int, index: int) -> Sample:
        return self.draw(sample, self.generator(step, index))

    @abstractmethod
    def draw(self, sample: Sample, rng: np.random.Generator) -> Sample:
        """The transformed sample; every random number comes from ``rng``."""

    def batch(self, images: np.ndarray, labels: np.ndarray | None, *, step: int, first_index: int = 0
              ) -> tuple[np.ndarray, np.ndarray | None]:
        """Apply to each sample of a batch ``(B, C, ...)`` / ``(B, ...)``; sample ``i`` has index
        ``first_index + i`` (a rank passes ``rank * batch_size``)."""
        outs, labs = [], []
        for i in range(len(images)):
            s = self(Sample(images[i], labels[i] if labels is not None else None), step=step, index=first_index + i)
            outs.append(s.image)
            labs.append(s.label)
        return np.stack(outs), (np.stack(labs) if labels is not None else None)  # type: ignore[arg-type]


class RandomFlip(RandomTransform):
    """Flip each of the spatial ``axes`` (of ``(C, *spatial)``; 0 = first spatial axis) with probability ``p``."""

    def __init__(self, axes: Sequence[int] = (0, 1, 2), p: float = 0.5, seed: int = 0, key: str | None = None) -> None:
        super().__init__(seed, key)
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.axes, self.p = [int(a) for a in axes], float(p)

    def draw(self, sample: Sample, rng: np.random.Generator) -> Sample:
        flips = [a for a, u in zip(self.axes, rng.random(len(self.axes)), strict=True) if u < self.p]
        image = np.asarray(sample.image)
        spatial = image.ndim - 1
        if any(a >= spatial for a in flips):
            raise ValueError(f"flip axes {self.axes} outside the {spatial} spatial axes")
        if not flips:
            return sample.replace()
        image = np.ascontiguousarray(np.flip(image, axis=tuple(1 + a for a in flips)))
        label = None
        if sample.label is not None:
            label = np.ascontiguousarray(np.flip(np.asarray(sample.label), axis=tuple(flips)))
        return sample.replace(image=image, label=label)
