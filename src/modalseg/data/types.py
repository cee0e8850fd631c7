"""Plain data types shared by the data layer and everything downstream of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


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

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def class_names(self) -> list[str]:
        return list(self.labels)

    def label_lut(self) -> dict[int, int]:
        """File label value -> class index (values sent to background included)."""
        lut = {value: index for index, value in enumerate(self.labels.values())}
        for value in self.labels_to_background:
            lut.setdefault(value, 0)
        return lut

    def cases_of(self, modality: str) -> list[CaseFiles]:
        """Unpaired datasets: the cases of one modality."""
        return [c for c in self.cases if c.modality == modality]
