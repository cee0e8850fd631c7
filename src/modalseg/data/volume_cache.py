"""Per-case, memory-mapped store of preprocessed volumes: the cache's on-disk format (format 4).

Why per case: a 3D patch is a box of one case's volume, and cases may differ in depth; 2D training reads slices,
which are depth-1 patches of the same volumes (:class:`modalseg.data.cache.SliceCache` is the slice *view* over
this store). Layout of one cache folder (``<cache_dir>/<fingerprint[:16]>/``)::

    cases/000000_image.npy  (C, D, H, W) float32   preprocessed channels, D along the slice axis (slice-major)
    cases/000000_label.npy  (D, H, W)    uint8     class indices (region datasets: the label values; nnU-Net's
                                                   ignore label: 255, data/types.py IGNORE_INDEX)
    cases/000000_fg.npy     (K, 4)       int32     rows (class, d, h, w): up to 10,000 voxels of each foreground
                                                   class (all when fewer), for foreground-centred patches
    index.json              written last: format, fingerprint, spec name, preprocessing config, class names,
                            modalities, one entry per case (``cases``: case_id, patient_id, modality, files, shape,
                            spacing of (D, H, W) in mm, ``first`` slice record, ``contiguous``) and one record per
                            cached slice (``records``, in case order: case_id, patient_id, modality, z, spacing,
                            slice_thickness, geometry, foreground), so global slice ``i`` is depth
                            ``i - cases[k].first`` of case ``k``.

What a "volume" is: the stack of a case's *cached* slices, each preprocessed as 2D (normalised, cropped to the
case's box, resized in-plane). With every slice cached (presets ``default``, ``paper2_mscmrseg``,
``paper2_mmwhs``: ``only_labelled_slices`` off) depth ``d`` is slice ``z = d`` and the volume is the case's
anatomy; patches of any depth are allowed. Under ``only_labelled_slices`` (preset ``paper1``: only the labelled
central slices) the volume is the stack of the labelled slices, which need not be adjacent: only depth-1 (2D)
patches are allowed and deeper ones raise :class:`~modalseg.errors.ConfigError`
(:meth:`VolumeCache.check_patch_depth`).

Open files: each case's arrays are memory-mapped when first read and kept open for the :data:`MAX_OPEN` most
recently used cases (each map holds a file descriptor), so a dataset of thousands of cases never exhausts them.
Picklable: DataLoader workers reopen the maps instead of copying arrays.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalseg.data.patches import PatchRef, read_patch
from modalseg.data.preprocess import PreprocessConfig, SliceGeometry
from modalseg.data.types import IGNORE_INDEX
from modalseg.errors import ConfigError, DataError

# 2: label/image origins and degenerate grids are checked while building (caches of format 1 were not).
# 3: every volume is brought to the canonical (closest to RAS) voxel order and assistants/labels onto the master's
#    grid before slicing (format 2 sliced in each file's stored order).
# 4: one memory-mapped (C, D, H, W) / (D, H, W) pair per case plus sampled foreground voxels (format 3 held one
#    (N, C, H, W) array of all slices); the slice records are unchanged.
CACHE_FORMAT = 4
INDEX = "index.json"
CASES_DIR = "cases"
#: cases whose memory maps stay open (two file descriptors each)
MAX_OPEN = 128
#: foreground voxels kept per class and case for foreground-centred patches (nnU-Net keeps 10,000)
FOREGROUND_PER_CLASS = 10_000


@dataclass(frozen=True)
class CaseRecord:
    """One cached case: ``shape`` ``(C, D, H, W)``, ``spacing`` of ``(D, H, W)`` in mm (slice thickness, processed
    pixel size), ``first`` global slice index of depth 0, and per cached slice its original index ``z`` along the
    slice axis, whether it had foreground and its :class:`SliceGeometry`."""

    position: int
    case_id: str
    patient_id: str
    modality: str | None
    shape: tuple[int, int, int, int]
    spacing: tuple[float, float, float]
    first: int
    z: tuple[int, ...]
    foreground: tuple[bool, ...]
    geometry: tuple[SliceGeometry, ...]
    files: dict[str, str]

    @property
    def depth(self) -> int:
        return self.shape[1]

    @property
    def contiguous(self) -> bool:
        """Whether the cached slices are adjacent (``z`` runs without gaps): deeper patches make sense."""
        return all(b == a + 1 for a, b in zip(self.z, self.z[1:], strict=False))


def case_files(position: int) -> dict[str, str]:
    """File names (relative to the cache folder) of the case at ``position``: ids never become paths."""
    stem = f"{CASES_DIR}/{position:06d}"
    return {"image": f"{stem}_image.npy", "label": f"{stem}_label.npy", "foreground": f"{stem}_fg.npy"}


def foreground_sample(label: np.ndarray, case_id: str, per_class: int = FOREGROUND_PER_CLASS) -> np.ndarray:
    """Rows ``(class, d, h, w)`` of up to ``per_class`` voxels of every foreground class of ``label`` (D, H, W),
    drawn deterministically from the case id (all voxels when fewer), sorted. nnU-Net's ignore voxels
    (:data:`~modalseg.data.types.IGNORE_INDEX`) are not foreground: no patch is centred on them."""
    parts = []
    for cls in np.unique(label):
        if cls == 0 or cls == IGNORE_INDEX:
            continue
        coords = np.argwhere(label == cls)
        if len(coords) > per_class:
            seq = np.random.SeedSequence([zlib.crc32(case_id.encode("utf-8")), int(cls)])
            keep = np.sort(np.random.Generator(np.random.PCG64(seq)).choice(len(coords), per_class, replace=False))
            coords = coords[keep]
        parts.append(np.column_stack([np.full(len(coords), cls), coords]))
    if not parts:
        return np.zeros((0, 4), dtype=np.int32)
    return np.concatenate(parts).astype(np.int32)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def write_case(folder: Path, position: int, case_id: str, image: np.ndarray, label: np.ndarray) -> dict[str, str]:
    """Write one case's arrays into the (temporary) cache ``folder`` with ``numpy.save`` and fsync them."""
    files = case_files(position)
    (folder / CASES_DIR).mkdir(exist_ok=True)
    arrays = {"image": np.asarray(image, dtype=np.float32), "label": np.asarray(label, dtype=np.uint8),
              "foreground": foreground_sample(label, case_id)}
    for key, arr in arrays.items():
        np.save(folder / files[key], arr)
        _fsync_file(folder / files[key])
    return files


class VolumeCache:
    """A built cache opened read-only: per-case volumes, their records, and patches of them."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index_path = self.path / INDEX
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError("slice cache index not found", index_path) from None
        except (OSError, ValueError) as exc:
            raise DataError(f"unreadable slice cache index ({exc})", index_path) from None
        if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
            raise DataError(f"unsupported slice cache format (expected {CACHE_FORMAT})", index_path)
        try:
            self.fingerprint: str = index["fingerprint"]
            self.spec_name: str = index["spec_name"]
            self.config = PreprocessConfig.from_dict(index["config"])
            self.modalities: list[str] = list(index["modalities"])
            self.class_names: list[str] = list(index["class_names"])
            self.paired: bool = bool(index["paired"])
            self.records: list[dict[str, Any]] = index["records"]
            self.cases: list[CaseRecord] = [self._case(k, c) for k, c in enumerate(index["cases"])]
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise DataError(f"slice cache index is incomplete ({type(exc).__name__}: {exc})", index_path) from None
        self._handles: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._foreground: dict[int, np.ndarray] = {}
        self._validate()
        self.case_ids: list[str] = [c.case_id for c in self.cases]
        self._position = {c: k for k, c in enumerate(self.case_ids)}
        self.patients: dict[str, list[str]] = {}
        for c in self.cases:
            self.patients.setdefault(c.patient_id, []).append(c.case_id)

    def _case(self, k: int, entry: dict[str, Any]) -> CaseRecord:
        shape = tuple(int(v) for v in entry["shape"])
        first = int(entry["first"])
        rows = self.records[first : first + shape[1]]
        if len(shape) != 4 or len(rows) != shape[1] or any(r["case_id"] != entry["case_id"] for r in rows):
            raise ValueError(f"case {entry['case_id']!r}: shape {shape} does not match its slice records")
        return CaseRecord(
            position=k, case_id=entry["case_id"], patient_id=entry["patient_id"], modality=entry["modality"],
            shape=shape, spacing=tuple(float(v) for v in entry["spacing"]), first=first,  # type: ignore[arg-type]
            z=tuple(int(r["z"]) for r in rows), foreground=tuple(bool(r["foreground"]) for r in rows),
            geometry=tuple(SliceGeometry.from_dict(r["geometry"]) for r in rows), files=dict(entry["files"]),
        )

    def _validate(self) -> None:
        """Every case's arrays exist with the shapes and types of the index (a half-deleted cache is unusable)."""
        for c in self.cases:
            image, label = self._load(c)
            if image.shape != c.shape or label.shape != c.shape[1:] or image.dtype != np.float32 \
                    or label.dtype != np.uint8:
                raise DataError(f"slice cache arrays of case {c.case_id} are {image.shape} {image.dtype} / "
                                f"{label.shape} {label.dtype}, the index says {c.shape}", self.path)
            if not (self.path / c.files["foreground"]).is_file():
                raise DataError(f"slice cache file {c.files['foreground']} is missing", self.path)
            if len(self._handles) < MAX_OPEN:
                self._handles[c.position] = (image, label)

    def _load(self, c: CaseRecord) -> tuple[np.ndarray, np.ndarray]:
        try:
            return (np.load(self.path / c.files["image"], mmap_mode="r"),
                    np.load(self.path / c.files["label"], mmap_mode="r"))
        except (OSError, ValueError) as exc:
            raise DataError(f"unreadable slice cache arrays of case {c.case_id} ({exc})", self.path) from None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        state["_foreground"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------------------------------------- volumes
    @property
    def num_cases(self) -> int:
        return len(self.cases)

    def volume(self, case: int) -> tuple[np.ndarray, np.ndarray]:
        """Case ``case``'s memory-mapped ``(C, D, H, W)`` float32 image and ``(D, H, W)`` uint8 label."""
        handles = self._handles.get(case)
        if handles is None:
            if not 0 <= case < len(self.cases):
                raise IndexError(f"case position {case} out of range [0, {len(self.cases)})")
            handles = self._handles[case] = self._load(self.cases[case])
            while len(self._handles) > MAX_OPEN:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(case)
        return handles

    def foreground_locations(self, case: int) -> np.ndarray:
        """Rows ``(class, d, h, w)`` of sampled foreground voxels of case ``case`` (see the module docstring)."""
        locs = self._foreground.get(case)
        if locs is None:
            try:
                locs = np.load(self.path / self.cases[case].files["foreground"])
            except (OSError, ValueError) as exc:
                raise DataError(f"unreadable foreground voxels of case {self.cases[case].case_id} ({exc})",
                                self.path) from None
            self._foreground[case] = locs
        return locs

    def case_position(self, case_id: str) -> int:
        """Position of ``case_id`` in :attr:`cases` (what a :class:`PatchRef` names)."""
        try:
            return self._position[case_id]
        except KeyError:
            raise DataError(f"case {case_id!r} is not in this cache", self.path) from None

    def positions(self, case_ids: Sequence[str] | None = None, modality: str | None = None) -> list[int]:
        """Positions of the cached cases among ``case_ids`` (all when None) of ``modality`` (any when None); ids
        without cached slices select nothing, as :meth:`SliceCache.indices_for`."""
        wanted = None if case_ids is None else set(case_ids)
        return [c.position for c in self.cases
                if (wanted is None or c.case_id in wanted) and (modality is None or (c.modality or "") == modality)]

    def array_files(self) -> list[Path]:
        """Every array file of the cache (e.g. to drop them from the page cache in a benchmark)."""
        return [self.path / c.files[k] for c in self.cases for k in ("image", "label", "foreground")]

    # ------------------------------------------------------------------------------------------- patches
    def check_patch_depth(self, depth: int) -> None:
        """Refuse patches deeper than one slice where the cached slices of a case are not adjacent."""
        if int(depth) <= 1:
            return
        if self.config.only_labelled_slices:
            raise ConfigError(
                f"patches of depth {depth} need every slice of a case, but this cache holds only the labelled slices "
                "(preprocess only_labelled_slices, e.g. the paper1 preset); use depth 1 (2D) or a preset that caches "
                "every slice (default, paper2_mscmrseg, paper2_mmwhs)")
        gaps = [c.case_id for c in self.cases if not c.contiguous]
        if gaps:
            raise ConfigError(
                f"patches of depth {depth} need adjacent slices, but case {gaps[0]} has gaps; use depth 1")

    def get_patches(self, refs: Iterable[PatchRef], *, image_fill: float = 0.0, label_fill: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images (B, C, D, H, W) float32, labels (B, D, H, W) int64)`` of ``refs`` (all of one size), in order.

        The part of a patch outside its volume is ``image_fill`` (0: the cache pads normalised images with 0) and
        ``label_fill`` (background). Depth-1 patches squeeze to the 2D batch (:func:`modalseg.data.patches.
        squeeze_depth`)."""
        refs = [PatchRef.of(r) for r in refs]
        if not refs:
            raise ValueError("empty batch")
        size = refs[0].size
        if any(r.size != size for r in refs):
            raise ValueError(f"patches of one batch must have one size, got {sorted({r.size for r in refs})}")
        self.check_patch_depth(size[0])
        channels = self.cases[refs[0].case].shape[0] if 0 <= refs[0].case < len(self.cases) else 0
        images = np.empty((len(refs), channels, *size), dtype=np.float32)
        labels = np.empty((len(refs), *size), dtype=np.int64)
        for i, r in enumerate(refs):
            image, label = self.volume(r.case)
            read_patch(image, label, r.start, size, images[i], labels[i], image_fill=image_fill,
                       label_fill=label_fill)
        return torch.from_numpy(images), torch.from_numpy(labels)
