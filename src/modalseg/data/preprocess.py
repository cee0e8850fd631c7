"""3D volume -> preprocessed 2D slices, and processed slices -> original slice grid.

Both papers train 2D networks on slices of 3D volumes:

* Paper 1 (paired breast T1C + T2W): "all the images along with the label images were resized to 256x256 and
  intensity normalized"; the authors' code divides each grey slice by its maximum. Only the central slices
  (largest cross-section) carry labels.
* Paper 2 (unpaired MS-CMRSeg / MM-WHS): "we crop the image and get regions of interest with a fixed
  bounding box (224x224) enclosing all the annotated regions" (MM-WHS: 256x256 in the coronal plane) and
  "z-score normalization to calibrate the intensity of each 2D slice".

Pipeline of one slice (fixed order, the same at training and prediction time)::

    original slice (M,h,w) --normalise--> --crop (box, zero padding)--> --resize--> (M,H,W)

Decisions (documented here once, relied upon everywhere):

* **Normalisation comes first** and its statistics are taken over the *whole original* slice (``*_slice``)
  or the whole volume of that channel (``*_volume``), never over the crop. The intensity mapping is
  therefore the same whether the box comes from the labels (training) or from the image centre (prediction
  without labels).
* **Padding**: where a crop box extends outside the image (image smaller than the box) images are padded
  with 0 *after* normalisation (the mean for z-score, black for max scaling) and labels with 0 (background).
* **Resizing** uses :func:`torch.nn.functional.interpolate`: images and probabilities ``bilinear`` with
  ``align_corners=False`` and no antialiasing; labels ``nearest-exact``, so a resized label map only ever
  contains values of the input (no value is invented). When the crop already has the target size nothing is
  interpolated, so crop -> restore is exact.
* **Restoring** (prediction): a processed (C,H,W) probability map is resized back bilinearly (convex
  combinations, so probabilities still sum to 1) and pasted into the crop box of an (C,h,w) map whose
  outside is background (probability 1 for class 0); label maps are resized back with ``nearest-exact`` and
  0 outside the box.
* **Box at prediction time**: ``crop="bbox"`` needs labels. Without a label volume (``modalseg predict``)
  the box falls back to a box of the same size centred on the image (:func:`center_box`). This is a
  deliberate, documented deviation: the paper does not say how test volumes were cropped.
* **Geometry**: a box is ``(r0, c0, r1, c1)`` in original slice pixels, half-open, possibly extending
  outside the image. A slice taken along ``slice_axis`` keeps the other two array axes in order, e.g. axis 2
  of an (i,j,k) volume gives (i,j) slices.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from modalseg.errors import ConfigError

log = logging.getLogger(__name__)

NORMALIZATIONS = (
    "zscore_slice", "zscore_volume", "zscore_volume_robust", "ct_dataset", "max_slice", "max_volume", "minmax_slice",
    "none",
)
CROPS = ("none", "center", "bbox", "square")
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


@dataclass
class PreprocessConfig:
    """How 3D volumes become 2D network inputs (see the module docstring for the order of operations).

    ``normalization`` is one mode for all channels or a list with one mode per modality channel (paired)
    or per modality (unpaired, in ``DatasetSpec.modalities`` order). ``crop_size`` is required for
    ``center``/``bbox``. ``only_labelled_slices`` keeps only slices that contain foreground for training
    (paper 1 labelled the central slices only, so unlabelled slices are *unannotated*, not background); at
    prediction every slice is processed.
    """

    slice_axis: int = 2
    normalization: str | list[str] = "zscore_slice"
    target_size: tuple[int, int] | None = None
    crop: str = "none"
    crop_size: tuple[int, int] | None = None
    only_labelled_slices: bool = False
    #: dataset statistics per channel for ``ct_dataset`` (None for other channels): the 0.5/99.5 percentiles and
    #: mean/std of the training cases' foreground voxels (data/intensity.py), stored with the model
    intensity_stats: list[dict[str, float] | None] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.slice_axis, bool) or self.slice_axis not in (0, 1, 2):
            raise ConfigError(f"preprocess.slice_axis: must be 0, 1 or 2, got {self.slice_axis!r}")
        self.slice_axis = int(self.slice_axis)
        modes = [self.normalization] if isinstance(self.normalization, str) else self.normalization
        if not isinstance(modes, (list, tuple)) or not modes:
            raise ConfigError(f"preprocess.normalization: expected a name or a list of names, got {modes!r}")
        for mode in modes:
            if mode not in NORMALIZATIONS:
                choices = ", ".join(NORMALIZATIONS)
                raise ConfigError(f"preprocess.normalization: unknown mode {mode!r}; choose from {choices}")
        if not isinstance(self.normalization, str):
            self.normalization = list(self.normalization)
        if self.crop not in CROPS:
            raise ConfigError(f"preprocess.crop: unknown crop {self.crop!r}; choose from {', '.join(CROPS)}")
        self.target_size = _pair(self.target_size, "target_size")
        self.crop_size = _pair(self.crop_size, "crop_size")
        if self.intensity_stats is not None and (
            not isinstance(self.intensity_stats, (list, tuple))
            or not all(s is None or (isinstance(s, dict) and {"lo", "hi", "mean", "std"} <= set(s))
                       for s in self.intensity_stats)
        ):
            raise ConfigError("preprocess.intensity_stats: expected one {lo, hi, mean, std} mapping (or null) per "
                              f"channel, got {self.intensity_stats!r}"[:200])
        if self.crop in ("center", "bbox") and self.crop_size is None:
            raise ConfigError(f"preprocess.crop_size: required when crop is {self.crop!r}")
        self.only_labelled_slices = bool(self.only_labelled_slices)

    # ----------------------------------------------------------------------------------------- presets
    @classmethod
    def default(cls) -> PreprocessConfig:
        """For user data (not a paper's recipe): every slice of a case, each modality z-scored over its volume
        after clipping to its 0.5/99.5 percentiles (robust to bright artefacts and CT's HU range), each slice
        padded to a square (aspect ratio kept) and resized to 256x256. Inverted exactly at prediction time."""
        return cls(slice_axis=2, normalization="zscore_volume_robust", target_size=(256, 256), crop="square",
                   only_labelled_slices=False)

    @classmethod
    def paper1(cls) -> PreprocessConfig:
        """Paper 1 (paired breast MRI, T1C master + T2W assistant): each axial slice divided by its maximum
        (authors' code), resized to 256x256, no crop; only the labelled (central) slices are used.

        The authors' further replication to 3 channels with ImageNet mean/std belongs to the model input,
        not to this cache.
        """
        return cls(slice_axis=2, normalization="max_slice", target_size=(256, 256), crop="none",
                   only_labelled_slices=True)

    @classmethod
    def paper2_mscmrseg(cls) -> PreprocessConfig:
        """Paper 2 on MS-CMRSeg 2019 (bSSFP/C0 + LGE): z-score of each 2D slice, fixed 224x224 box enclosing
        all annotated regions of the volume, no resize. Which slices were used is not stated; all are kept."""
        return cls(slice_axis=2, normalization="zscore_slice", crop="bbox", crop_size=(224, 224))

    @classmethod
    def paper2_mmwhs(cls) -> PreprocessConfig:
        """Paper 2 on MM-WHS 2017 (CT + MR): coronal slices (array axis 1 of an (i,j,k) volume), z-score of
        each slice, fixed 256x256 box enclosing the annotated regions, no resize. Slice selection is not
        stated in the paper; all slices are kept (``only_labelled_slices`` trains on foreground only)."""
        return cls(slice_axis=1, normalization="zscore_slice", crop="bbox", crop_size=(256, 256))

    # ----------------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (stored in checkpoints and cache indexes)."""
        return {
            "slice_axis": self.slice_axis,
            "normalization": (
                self.normalization if isinstance(self.normalization, str) else list(self.normalization)
            ),
            "target_size": list(self.target_size) if self.target_size else None,
            "crop": self.crop,
            "crop_size": list(self.crop_size) if self.crop_size else None,
            "only_labelled_slices": self.only_labelled_slices,
            # only when used, so that configurations without dataset statistics keep their dict (and cache keys)
            **({"intensity_stats": [dict(s) if s else None for s in self.intensity_stats]}
               if self.intensity_stats is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError` (typos must not pass)."""
        if not isinstance(data, dict):
            raise ConfigError(f"preprocess: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"preprocess: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)

    def modes_for(self, num_channels: int, channels: Sequence[int] | None = None) -> list[str]:
        """Normalisation mode of each of ``num_channels`` image channels.

        ``channels`` are positions in the normalisation list (default ``0..num_channels-1``); unpaired
        datasets pass the index of the case's modality.
        """
        if channels is None:
            channels = range(num_channels)
        if len(channels) != num_channels:
            raise ValueError(f"{len(channels)} channel positions for {num_channels} channels")
        if isinstance(self.normalization, str):
            return [self.normalization] * num_channels
        n = len(self.normalization)
        if any(c < 0 or c >= n for c in channels):
            raise ConfigError(
                f"preprocess.normalization: lists {n} mode(s) but the data has modality channel(s) "
                f"{', '.join(str(c) for c in channels)}"
            )
        return [self.normalization[c] for c in channels]


# ------------------------------------------------------------------------------------------------ geometry
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


def in_plane_axes(slice_axis: int) -> tuple[int, int]:
    """The two array axes that remain in a slice taken along ``slice_axis``, in order."""
    return tuple(a for a in range(3) if a != slice_axis)  # type: ignore[return-value]


def in_plane_spacing(spacing: Sequence[float], slice_axis: int) -> tuple[float, float]:
    """In-plane pixel size (mm) of slices along ``slice_axis`` from the 3 voxel sizes of a volume."""
    a, b = in_plane_axes(slice_axis)
    return (float(spacing[a]), float(spacing[b]))


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
    fg = np.asarray(label_volume) > 0
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
    """Inverse of :func:`crop_slice`: put the box content back on an ``orig_shape`` grid of ``background``."""
    h, w = orig_shape
    r0, c0, r1, c1 = box
    lead = array.shape[:-2]
    out = np.empty(lead + (h, w), dtype=array.dtype)
    if isinstance(background, np.ndarray):
        out[...] = background.reshape(lead + (1, 1))
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
    lead = array.shape[:-2]
    t = torch.from_numpy(np.ascontiguousarray(array).reshape((1, -1) + array.shape[-2:]))
    if is_label:
        # float32 represents every class index exactly; nearest never mixes values.
        out = F.interpolate(t.to(torch.float32), size=tuple(size), mode="nearest-exact")
        return out.numpy().reshape(lead + tuple(size)).astype(array.dtype)
    out = F.interpolate(t.to(torch.float32), size=tuple(size), mode="bilinear", align_corners=False)
    return out.numpy().reshape(lead + tuple(size)).astype(array.dtype, copy=False)


# ------------------------------------------------------------------------------------------- normalisation
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


def dataset_stats(cfg: PreprocessConfig, channel: int) -> dict[str, float]:
    """The ``ct_dataset`` statistics of ``channel`` (a one-line error if the configuration carries none)."""
    stats = cfg.intensity_stats
    if not stats or channel >= len(stats) or not stats[channel]:
        raise ConfigError(f"preprocess: normalisation ct_dataset of channel {channel} needs dataset intensity "
                          "statistics (computed when training starts; a model carries them)")
    return stats[channel]  # type: ignore[return-value]


def _normalise(x: np.ndarray, mode: str, stats: dict[str, float] | None) -> np.ndarray:
    """One 2D channel. Degenerate statistics (constant slice, max <= 0) do not divide by ~0."""
    if mode == "none":
        return x.astype(np.float32, copy=False)
    if mode == "ct_dataset":  # nnU-Net's CTNormalization: clip to the dataset's foreground percentiles, z-score
        assert stats is not None
        std = stats["std"] if stats["std"] > _EPS else 1.0
        return np.asarray((np.clip(x, stats["lo"], stats["hi"]) - stats["mean"]) / std, dtype=np.float32)
    if "_volume" in mode:
        if stats is None:
            raise ValueError(f"normalisation {mode!r} needs volume statistics (see volume_stats)")
        s = stats
    else:
        s = _stats(x)
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


# ------------------------------------------------------------------------------------------------ slices
def preprocess_slice(
    images: np.ndarray,
    label: np.ndarray | None,
    cfg: PreprocessConfig,
    box: Box | None = None,
    *,
    stats: list[dict[str, float]] | None = None,
    channels: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, SliceGeometry]:
    """Normalise, crop and resize one slice.

    ``images`` (M,h,w) float, ``label`` (h,w) class indices or ``None``. ``box`` overrides the crop box (the
    volume-level box for ``bbox``); by default ``crop="center"`` uses :func:`center_box`, ``"bbox"`` the
    foreground of this slice's label (centre fallback without label) and ``"none"`` the whole slice.
    ``stats`` are :func:`volume_stats` of the volume for ``*_volume`` modes. Returns (M,H,W) float32,
    (H,W) int64 or ``None``, and the :class:`SliceGeometry`.
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images must be (M, h, w), got shape {images.shape}")
    m, h, w = images.shape
    if label is not None and tuple(label.shape) != (h, w):
        raise ValueError(f"label shape {label.shape} differs from image slice shape {(h, w)}")
    modes = cfg.modes_for(m, channels)
    norm = np.stack(
        [_normalise(images[i], modes[i], stats[i] if stats is not None else None) for i in range(m)]
    )
    if box is None:
        if cfg.crop == "none":
            box = (0, 0, h, w)
        elif cfg.crop == "square":
            box = square_box((h, w))
        elif cfg.crop == "bbox" and label is not None:
            box = bbox_for_volume(label[:, :, None], 2, cfg.crop_size)  # type: ignore[arg-type]
        else:
            box = center_box((h, w), cfg.crop_size)  # type: ignore[arg-type]
    box = tuple(int(v) for v in box)  # type: ignore[assignment]
    img = crop_slice(norm, box, 0.0)
    lab = crop_slice(np.asarray(label, dtype=np.int64), box, 0) if label is not None else None
    out_shape = cfg.target_size or (box[2] - box[0], box[3] - box[1])
    img = _resize(img, out_shape, is_label=False)
    if lab is not None:
        lab = _resize(lab, out_shape, is_label=True)
    geom = SliceGeometry(orig_shape=(h, w), box=box, out_shape=tuple(out_shape))  # type: ignore[arg-type]
    return np.ascontiguousarray(img, dtype=np.float32), lab, geom


def restore_slice(prob_or_label: np.ndarray, geom: SliceGeometry, *, is_label: bool) -> np.ndarray:
    """Map a processed slice back to the original (h, w) grid (undo resize, paste into the crop box).

    Probabilities (C,H,W) are resized bilinearly and the outside of the box is background (class 0 = 1);
    labels (H,W) are resized nearest-exact and 0 outside the box.
    """
    arr = np.asarray(prob_or_label)
    if is_label:
        if arr.ndim != 2:
            raise ValueError(f"label map must be (H, W), got shape {arr.shape}")
        arr = _resize(arr, geom.crop_shape, is_label=True)
        return _paste(arr, geom.box, geom.orig_shape, 0)
    if arr.ndim != 3:
        raise ValueError(f"probabilities must be (C, H, W), got shape {arr.shape}")
    arr = _resize(arr, geom.crop_shape, is_label=False)
    bg = np.zeros(arr.shape[0], dtype=arr.dtype)
    bg[0] = 1
    return _paste(arr, geom.box, geom.orig_shape, bg)


# ------------------------------------------------------------------------------------------------ volumes
@dataclass
class PreprocessedSlice:
    """One processed slice of a volume: ``z`` is its index along the slice axis."""

    z: int
    image: np.ndarray
    label: np.ndarray | None
    geometry: SliceGeometry
    spacing: tuple[float, float]
    has_foreground: bool = field(default=False)


def volume_box(shape2d: Sequence[int], label: np.ndarray | None, cfg: PreprocessConfig) -> Box:
    """The crop box shared by all slices of a volume (bbox from labels, centre fallback without)."""
    if cfg.crop == "none":
        return (0, 0, int(shape2d[0]), int(shape2d[1]))
    if cfg.crop == "square":
        return square_box(shape2d)
    if cfg.crop == "bbox" and label is not None:
        return bbox_for_volume(label, cfg.slice_axis, cfg.crop_size)  # type: ignore[arg-type]
    return center_box(shape2d, cfg.crop_size)  # type: ignore[arg-type]


def preprocess_volume(
    images: np.ndarray,
    label: np.ndarray | None,
    cfg: PreprocessConfig,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    channels: Sequence[int] | None = None,
    all_slices: bool = False,
) -> list[PreprocessedSlice]:
    """Slice an (M, X, Y, Z) image volume (and its (X, Y, Z) class-index label) along ``cfg.slice_axis``.

    Slices without foreground are skipped when ``cfg.only_labelled_slices`` and a label is given, unless
    ``all_slices`` (prediction and evaluation process every slice).
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (M, X, Y, Z), got shape {images.shape}")
    axis = cfg.slice_axis
    if label is not None and tuple(label.shape) != images.shape[1:]:
        raise ValueError(f"label shape {label.shape} differs from image shape {images.shape[1:]}")
    modes = cfg.modes_for(images.shape[0], channels)
    stats = volume_stats(images, modes) if any("_volume" in m for m in modes) else None
    if "ct_dataset" in modes:
        positions = list(channels) if channels is not None else list(range(images.shape[0]))
        stats = stats or [None] * images.shape[0]  # type: ignore[list-item]
        for i, mode in enumerate(modes):
            if mode == "ct_dataset":
                stats[i] = dataset_stats(cfg, positions[i])
    a, b = in_plane_axes(axis)
    box = volume_box((images.shape[1 + a], images.shape[1 + b]), label, cfg)
    px = in_plane_spacing(spacing, axis)
    out = []
    for z in range(images.shape[1 + axis]):
        lab2d = np.take(label, z, axis=axis) if label is not None else None
        fg = bool(lab2d is not None and (lab2d > 0).any())
        if cfg.only_labelled_slices and label is not None and not fg and not all_slices:
            continue
        img2d = np.take(images, z, axis=1 + axis)
        img, lab, geom = preprocess_slice(img2d, lab2d, cfg, box, stats=stats, channels=channels)
        out.append(PreprocessedSlice(z, img, lab, geom, geom.processed_spacing(px), fg))
    return out


def restore_volume(
    slices: Sequence[np.ndarray],
    geometries: Sequence[SliceGeometry],
    slice_axis: int,
    *,
    is_label: bool,
) -> np.ndarray:
    """Stack restored slices (every slice of a volume, in order) back into a volume.

    Labels give (X, Y, Z); probabilities (C, X, Y, Z).
    """
    if len(slices) != len(geometries) or not slices:
        raise ValueError("need one geometry per slice and at least one slice")
    restored = [restore_slice(s, g, is_label=is_label) for s, g in zip(slices, geometries, strict=True)]
    return np.stack(restored, axis=slice_axis if is_label else 1 + slice_axis)
