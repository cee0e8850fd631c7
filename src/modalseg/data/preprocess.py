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

:func:`preprocess_volume` and :func:`restore_volume` are compositions of the invertible transforms of
:mod:`modalseg.data.transforms` (``Normalise``, ``ToSliceMajor``, ``SelectSlices``, ``CropPad``, ``Resize``), which
call the per-slice primitives below in this order, so their outputs are the bytes the per-slice code gave.

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

from modalseg.data.transforms import (  # noqa: F401  (the per-slice primitives, re-exported where they were)
    _EPS,
    ROBUST_PERCENTILES,
    Box,
    Compose,
    CropPad,
    InvertibleTransform,
    Normalise,
    ResampleSlices,
    Resize,
    Sample,
    SelectSlices,
    SliceGeometry,
    ToCanonical,
    ToSliceMajor,
    _apply_normalisation,
    _normalisation_stats,
    _normalise,
    _pair,
    _paste,
    _place,
    _resize,
    _robust_stats,
    _stats,
    bbox_for_volume,
    center_box,
    crop_slice,
    find_record,
    geometry_trace,
    invert,
    resampled_depth,
    slice_geometry,
    square_box,
    volume_stats,
)
from modalseg.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NORMALIZATIONS = (
    "zscore_slice", "zscore_volume", "zscore_volume_robust", "ct_dataset", "max_slice", "max_volume", "minmax_slice",
    "none",
)
CROPS = ("none", "center", "bbox", "square")


@dataclass
class PreprocessConfig:
    """How 3D volumes become 2D network inputs (see the module docstring for the order of operations).

    ``normalization`` is one mode for all channels or a list with one mode per modality channel (paired)
    or per modality (unpaired, in ``DatasetSpec.modalities`` order). ``crop_size`` is required for
    ``center``/``bbox``. ``only_labelled_slices`` keeps only slices that contain foreground for training
    (paper 1 labelled the central slices only, so unlabelled slices are *unannotated*, not background); at
    prediction every slice is processed. Foreground, here and for the ``bbox`` crop, excludes nnU-Net's ignore
    voxels (:func:`modalseg.data.types.foreground_mask`).
    """

    slice_axis: int = 2
    normalization: str | list[str] = "zscore_slice"
    target_size: tuple[int, int] | None = None
    crop: str = "none"
    crop_size: tuple[int, int] | None = None
    only_labelled_slices: bool = False
    #: resample along the slice axis to about this thickness (mm) before slicing (None: keep the file's slices)
    slice_thickness_mm: float | None = None
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
        if self.slice_thickness_mm is not None:
            value = self.slice_thickness_mm
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
                raise ConfigError(f"preprocess.slice_thickness_mm: expected a positive number of mm, got {value!r}")
            self.slice_thickness_mm = float(value)
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
            # only when used, so that configurations without them keep their dict (and cache keys)
            **({"slice_thickness_mm": self.slice_thickness_mm} if self.slice_thickness_mm is not None else {}),
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
def in_plane_axes(slice_axis: int) -> tuple[int, int]:
    """The two array axes that remain in a slice taken along ``slice_axis``, in order."""
    return tuple(a for a in range(3) if a != slice_axis)  # type: ignore[return-value]


def in_plane_spacing(spacing: Sequence[float], slice_axis: int) -> tuple[float, float]:
    """In-plane pixel size (mm) of slices along ``slice_axis`` from the 3 voxel sizes of a volume."""
    a, b = in_plane_axes(slice_axis)
    return (float(spacing[a]), float(spacing[b]))


# ------------------------------------------------------------------------------------------- normalisation
def dataset_stats(cfg: PreprocessConfig, channel: int) -> dict[str, float]:
    """The ``ct_dataset`` statistics of ``channel`` (a one-line error if the configuration carries none)."""
    stats = cfg.intensity_stats
    if not stats or channel >= len(stats) or not stats[channel]:
        raise ConfigError(f"preprocess: normalisation ct_dataset of channel {channel} needs dataset intensity "
                          "statistics (computed when training starts; a model carries them)")
    return stats[channel]  # type: ignore[return-value]


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
    labels (H,W) are resized nearest-exact and 0 outside the box. The inverse of the ``CropPad`` and ``Resize``
    transforms that ``geom`` describes (:func:`modalseg.data.transforms.geometry_trace`).
    """
    arr = np.asarray(prob_or_label)
    if is_label:
        if arr.ndim != 2:
            raise ValueError(f"label map must be (H, W), got shape {arr.shape}")
        return invert(arr[None], geometry_trace(geom), "label")[0]
    if arr.ndim != 3:
        raise ValueError(f"probabilities must be (C, H, W), got shape {arr.shape}")
    return np.ascontiguousarray(invert(arr[:, None], geometry_trace(geom), "probabilities")[:, 0])


# ------------------------------------------------------------------------------------------------ volumes
def preprocessing_pipeline(
    cfg: PreprocessConfig,
    num_channels: int,
    *,
    channels: Sequence[int] | None = None,
    all_slices: bool = False,
    canonical: bool = False,
) -> Compose:
    """The transforms of ``cfg`` for an image of ``num_channels`` channels (``channels``: positions in the
    normalisation list, as :meth:`PreprocessConfig.modes_for`). ``all_slices`` keeps every slice even under
    ``only_labelled_slices`` (prediction, evaluation); ``canonical`` starts with :class:`ToCanonical` (the sample
    then needs its affine), so that one :func:`invert` also returns to the file's voxel order."""
    modes = cfg.modes_for(num_channels, channels)
    ct = None
    if "ct_dataset" in modes:
        positions = list(channels) if channels is not None else list(range(num_channels))
        ct = [dataset_stats(cfg, positions[i]) if mode == "ct_dataset" else None for i, mode in enumerate(modes)]
    steps: list[InvertibleTransform] = [ToCanonical()] if canonical else []
    steps += [
        Normalise(modes, cfg.slice_axis, ct),
        ToSliceMajor(cfg.slice_axis),
        *([ResampleSlices(cfg.slice_thickness_mm)] if cfg.slice_thickness_mm is not None else []),
        SelectSlices(cfg.only_labelled_slices and not all_slices),
        CropPad(cfg.crop, cfg.crop_size),
        Resize(cfg.target_size),
    ]
    return Compose(steps)


def processed_thickness(cfg: PreprocessConfig, depth: int, spacing: Sequence[float]) -> float:
    """Slice thickness (mm) of the processed slices of a volume with ``depth`` slices of ``spacing``: the file's, or
    after ``slice_thickness_mm`` resampling the actual one (the extent kept, :func:`resampled_depth`)."""
    thickness = float(spacing[cfg.slice_axis])
    if cfg.slice_thickness_mm is None:
        return thickness
    return thickness * int(depth) / resampled_depth(int(depth), thickness, cfg.slice_thickness_mm)


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
    ``all_slices`` (prediction and evaluation process every slice). The composition of the transforms of
    :func:`preprocessing_pipeline` (normalise, slice-major, select, crop/pad, resize),
    split into one :class:`PreprocessedSlice` per kept slice.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (M, X, Y, Z), got shape {images.shape}")
    axis = cfg.slice_axis
    if label is not None and tuple(label.shape) != images.shape[1:]:
        raise ValueError(f"label shape {label.shape} differs from image shape {images.shape[1:]}")
    pipeline = preprocessing_pipeline(cfg, images.shape[0], channels=channels, all_slices=all_slices)
    sample = pipeline(Sample(images, label, spacing=tuple(float(v) for v in spacing)))
    geom = slice_geometry(sample.trace)
    selected = find_record(sample.trace, SelectSlices)
    assert selected is not None
    foreground = selected["foreground"] or [False] * int(selected["depth"])
    px = geom.processed_spacing(in_plane_spacing(spacing, axis))
    out = []
    for i, z in enumerate(selected["kept"]):
        img = np.ascontiguousarray(sample.image[:, i], dtype=np.float32)
        lab = sample.label[i] if sample.label is not None else None
        out.append(PreprocessedSlice(int(z), img, lab, geom, px, bool(foreground[z])))
    return out


def restore_volume(
    slices: Sequence[np.ndarray],
    geometries: Sequence[SliceGeometry],
    slice_axis: int,
    *,
    is_label: bool,
) -> np.ndarray:
    """Stack restored slices (every slice of a volume, in order) back into a volume.

    Labels give (X, Y, Z); probabilities (C, X, Y, Z). Each slice goes back through its ``CropPad``/``Resize``
    (:func:`restore_slice`), the stack through ``ToSliceMajor``'s inverse.
    """
    if len(slices) != len(geometries) or not slices:
        raise ValueError("need one geometry per slice and at least one slice")
    restored = [restore_slice(s, g, is_label=is_label) for s, g in zip(slices, geometries, strict=True)]
    stacked = np.stack(restored, axis=0 if is_label else 1)
    kind = "label" if is_label else "probabilities"
    return np.ascontiguousarray(ToSliceMajor(slice_axis).inverse(stacked, {"slice_axis": slice_axis}, kind))


def native_square_side(images: Sequence[Any], slice_axis: int) -> int:
    """The median, over ``images`` (one reference image per case), of the longer in-plane side in the canonical
    voxel order (closest to RAS) sliced along ``slice_axis``: the side the ``square`` crop pads a typical case to.

    3D training uses it as the ``default`` preset's in-plane ``target_size`` (training/engine.py
    ``make_preprocess``), so that a typical case keeps its native in-plane grid instead of being resized to the 2D
    networks' 256x256 (64x64 volumes would become four times finer in-plane than through-plane). NIfTI sizes come
    from the header and affine only; other formats are read.
    """
    from modalseg.data.geometry import reorientation_for, reorientation_of
    from modalseg.data.io import nifti_header_grid, read_volume

    sides = []
    for ref in images:
        grid = nifti_header_grid(ref)
        # other formats are read, and so are headers whose affine read_volume refuses (it then says why)
        try:
            reo = reorientation_for(grid[1], grid[0], ref) if grid is not None else reorientation_of(read_volume(ref))
        except DataError:
            reo = reorientation_of(read_volume(ref))
        sides.append(max(s for k, s in enumerate(reo.canonical_shape) if k != slice_axis))
    if not sides:
        raise ConfigError("no case to take the in-plane size from")
    return int(round(float(np.median(sides))))
