"""Plain data types shared by the data layer and everything downstream of it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Class index of nnU-Net's ``ignore`` label in the cache's uint8 label arrays. Never a network class: losses,
#: validation, foreground flags and crop boxes leave these voxels out; 255 so that it stays apart from every class
#: index (at most 255 classes, 0..254) and every region label value (below 255).
IGNORE_INDEX = 255


def foreground_mask(label: np.ndarray) -> np.ndarray:
    """Voxels of a class-index label map that are foreground: not background (0) and not ignored
    (:data:`IGNORE_INDEX`: an unannotated voxel is not foreground, nnU-Net's rule for oversampling)."""
    arr = np.asarray(label)
    return (arr > 0) & (arr != IGNORE_INDEX)


#: A region is predicted where its sigmoid probability exceeds this (nnU-Net's threshold).
REGION_THRESHOLD = 0.5


def paint_regions(probs: np.ndarray, order: Sequence[int], axis: int = 1) -> np.ndarray:
    """Region probabilities -> a label map, nnU-Net's way: each region where its probability > 0.5, painted with
    its ``order`` value onto background 0 in region order (a later region overwrites an earlier one)."""
    probs = np.asarray(probs)
    if probs.shape[axis] != len(order):
        raise ValueError(f"{probs.shape[axis]} region channels for {len(order)} regions_class_order values")
    dtype = np.uint8 if max(order, default=0) <= np.iinfo(np.uint8).max else np.int32
    out = np.zeros(probs.shape[:axis] + probs.shape[axis + 1:], dtype=dtype)
    for k, value in enumerate(order):
        out[np.take(probs, k, axis=axis) > REGION_THRESHOLD] = value
    return out


@dataclass
class Volume:
    """An image volume with its geometry.

    ``array`` is in the file's voxel order (nibabel convention: axes i, j, k), 3D unless stated.
    ``affine`` maps voxel indices to RAS+ world coordinates in mm (4x4). ``meta`` keeps what a writer
    needs to reproduce the source file's geometry exactly (e.g. the NIfTI header, or SimpleITK origin,
    spacing and direction).
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis (norms of the affine's columns)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case.

    Paired datasets: ``images`` holds one file per modality in channel order (master first).
    Unpaired datasets: ``images`` holds one file and ``modality`` names its modality.
    ``patient_id`` groups cases for cross-validation splits (defaults to ``case_id``).
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    patient_id: str
    modality: str | None = None


@dataclass
class DatasetSpec:
    """A dataset on disk, whatever its layout (nnU-Net raw, MS-CMRSeg, MM-WHS, paired folders).

    ``labels`` maps a class name to its value *in the label files*, in class order (background first);
    class index ``i`` of the network is the ``i``-th entry. ``modalities`` are the channel names
    (paired) or the modality names (unpaired).

    nnU-Net's extras (docs/conventions.md): ``ignore_label`` is the file value of the ``ignore`` label (not in
    ``labels``; cached as :data:`IGNORE_INDEX`). Region-based datasets (BraTS) have ``regions`` (region name ->
    the file values it unites, in the dataset's order) and ``labels`` is then ``{"background": 0, region:
    regions_class_order value}``: the value painted for each region at prediction. Their cache keeps the file
    values themselves (region targets are built from them on the fly).
    """

    root: Path
    name: str
    modalities: list[str]
    labels: dict[str, int]
    cases: list[CaseFiles]
    paired: bool = True
    file_ending: str = ".nii.gz"
    layout: str = "nnunet"
    # Label values present in files that map to background (e.g. MM-WHS classes paper 2 does not use).
    labels_to_background: tuple[int, ...] = ()
    #: one line per harmless oddity found while listing (e.g. an unknown dataset.json key); callers show them
    warnings: list[str] = field(default_factory=list)
    #: file value of nnU-Net's ``ignore`` label (None: every voxel is annotated)
    ignore_label: int | None = None
    #: region-based labels: region name -> its file label values (None: plain classes)
    regions: dict[str, tuple[int, ...]] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def class_names(self) -> list[str]:
        return list(self.labels)

    @property
    def output_labels(self) -> dict[str, int]:
        """The network's output channels, name -> label value: every class (background first), or for a region
        dataset one sigmoid channel per region (no background channel) -> the value painted for it."""
        if self.regions is None:
            return dict(self.labels)
        return {name: value for name, value in self.labels.items() if name in self.regions}

    def label_lut(self) -> dict[int, int]:
        """File label value -> cached value: the class index, or for a region dataset the value itself (values
        sent to background included; the ignore label -> :data:`IGNORE_INDEX`)."""
        if self.regions is None:
            lut = {value: index for index, value in enumerate(self.labels.values())}
        else:
            values = {0, *self.labels.values(), *(v for vs in self.regions.values() for v in vs)}
            lut = {value: value for value in sorted(values)}
        if self.ignore_label is not None:
            lut[self.ignore_label] = IGNORE_INDEX
        for value in self.labels_to_background:
            lut.setdefault(value, 0)
        return lut

    def cases_of(self, modality: str) -> list[CaseFiles]:
        """Unpaired datasets: the cases of one modality."""
        return [c for c in self.cases if c.modality == modality]
