"""The training cache: preprocessed cases stored as memory-mapped volumes, read as 2D slices or N-d patches.

Layout: ``cache_dir`` is a root that holds one folder per fingerprint (``cache_dir/<fingerprint[:16]>/``), so
caches of different configurations or case subsets (e.g. cross-validation folds) live side by side. Each folder is
a per-case volume store (:mod:`modalseg.data.volume_cache`: ``cases/<n>_image.npy`` (C, D, H, W) float32,
``cases/<n>_label.npy`` (D, H, W) uint8 class indices after ``spec.label_lut()`` (region datasets: the label values;
nnU-Net's ignore label: :data:`~modalseg.data.types.IGNORE_INDEX`, never foreground), sampled foreground voxels, and
``index.json`` with one entry per case and one record per cached slice). :class:`SliceCache` is the 2D *view* of
it that training uses today: global slice ``i`` is depth ``d`` of case ``k`` (cases in build order, slices in
``z`` order), ``images`` / ``labels`` read like the former ``(N, M, H, W)`` / ``(N, H, W)`` arrays and
``get_batch`` gives the very same tensors; ``get_patches`` (inherited) reads depth-1 or deeper patches.

The fingerprint hashes the cache format, the preprocessing config, the dataset's labels/modalities and, for every
file, its resolved path, size and ``mtime_ns``: editing or replacing a file gives a new cache; an existing cache
with the same fingerprint is opened without reading any image.

Atomicity: a cache is built in a temporary folder beside its final folder and renamed into place only when
complete (every array fsynced, ``index.json`` written last). An exception or Ctrl-C removes the temporary folder;
a killed process leaves a ``.tmp-*`` folder that is never read as a cache and is removed by the next build on the
same host. Two processes building the same cache at once (DDP ranks) both succeed; the first rename wins. The
engine should build on rank 0 and open it elsewhere after a barrier to avoid duplicated work.

Memory: each case is read once (all its image files and its label), processed, and written to its own files, so
RAM holds at most one case and the disk holds the data once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalseg.data import io as mio
from modalseg.data.geometry import ORIGIN_TOL_VOXELS, geometry_problems
from modalseg.data.patches import PatchRef
from modalseg.data.preprocess import PreprocessConfig, SliceGeometry, preprocess_volume, processed_thickness
from modalseg.data.transforms import OntoGrid, Sample, ToCanonical
from modalseg.data.types import IGNORE_INDEX, CaseFiles, DatasetSpec
from modalseg.data.verify import intensity_problems
from modalseg.data.volume_cache import CACHE_FORMAT, INDEX, VolumeCache, write_case
from modalseg.errors import ConfigError, DataError, OutputError
from modalseg.utils.atomic import atomic_write_text, folder_mode

log = logging.getLogger(__name__)

__all__ = ["CACHE_FORMAT", "SliceArray", "SliceCache", "build_slice_cache", "cache_fingerprint", "file_identity",
           "map_labels"]
_INDEX = INDEX


# ------------------------------------------------------------------------------------------------ fingerprint
def file_identity(path: Path) -> list[Any]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except OSError as exc:
        raise DataError(f"cannot read ({exc.strerror or exc})", path) from None
    return [str(Path(path).resolve()), int(st.st_size), int(st.st_mtime_ns)]


def cache_fingerprint(
    spec: DatasetSpec, cfg: PreprocessConfig, cases: Sequence[CaseFiles], strict: bool = False
) -> str:
    """SHA-256 of the config, the label/modality definitions and (path, size, mtime_ns) of every file."""
    payload = {
        "format": CACHE_FORMAT,
        "strict_geometry": bool(strict),
        "config": cfg.to_dict(),
        "spec": spec.name,
        "paired": spec.paired,
        "modalities": list(spec.modalities),
        "lut": sorted(spec.label_lut().items()),
        "cases": [
            {
                "case_id": c.case_id,
                "patient_id": c.patient_id,
                "modality": c.modality,
                "images": [file_identity(Path(p)) for p in c.images],
                "label": file_identity(Path(c.label)) if c.label is not None else None,
            }
            for c in cases
        ],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _select_cases(spec: DatasetSpec, cases: list[str] | None) -> list[CaseFiles]:
    if cases is None:
        return list(spec.cases)
    by_id = {c.case_id: c for c in spec.cases}
    unknown = [c for c in cases if c not in by_id]
    if unknown:
        shown = ", ".join(map(repr, unknown))
        raise DataError(f"unknown case id(s) {shown} in dataset {spec.name!r}", spec.root)
    return [by_id[c] for c in cases]


# ------------------------------------------------------------------------------------------------ labels
def map_labels(array: np.ndarray, lut: dict[int, int], path: Path | str | None = None) -> np.ndarray:
    """File label values -> class indices (uint8). Values not in ``lut`` raise :class:`DataError`."""
    values, inverse = np.unique(np.asarray(array), return_inverse=True)
    missing = [int(v) for v in values if int(v) not in lut]
    if missing:
        shown = ", ".join(str(v) for v in missing[:10]) + (", ..." if len(missing) > 10 else "")
        declared = ", ".join(str(v) for v in sorted(lut))
        raise DataError(
            f"label value(s) {shown} not declared in the dataset's labels (declared: {declared}); "
            "add them to labels or labels_to_background",
            path,
        )
    mapped = np.array([lut[int(v)] for v in values], dtype=np.uint8)
    return mapped[inverse.reshape(-1)].reshape(array.shape)


# ------------------------------------------------------------------------------------------------ cache
class SliceArray:
    """The read-only ``(N, ...)`` array of all cached slices (images ``(N, M, H, W)`` float32 or labels
    ``(N, H, W)`` uint8) over the per-case volumes: row ``i`` is depth ``d`` of case ``k``.

    Indexing (an int, a slice, an integer or boolean array, optionally followed by more indices) returns the same
    ``numpy.ndarray`` the former single memory-mapped array gave; the volumes are read once per request, case by
    case with sorted depths (sequential access)."""

    def __init__(self, cache: SliceCache, which: str) -> None:
        self._cache, self._which = cache, which
        first = cache.cases[0].shape
        item = first[:1] + first[2:] if which == "image" else first[2:]
        self.shape: tuple[int, ...] = (len(cache.records), *item)
        self.dtype = np.dtype(np.float32 if which == "image" else np.uint8)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"SliceArray({self._which}, shape={self.shape}, dtype={self.dtype})"

    def __iter__(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self), 256):
            yield from self._take(np.arange(start, min(start + 256, len(self)), dtype=np.int64))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self._take(np.arange(len(self), dtype=np.int64))
        return out if dtype is None else out.astype(dtype, copy=False)

    def _take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted, unique, in range) as one new array."""
        cache = self._cache
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        if not len(rows):
            return out
        cases, depths = cache._slice_case[rows], cache._slice_depth[rows]
        bounds = [0, *(np.flatnonzero(np.diff(cases)) + 1).tolist(), len(rows)]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            image, label = cache.volume(int(cases[a]))
            d = depths[a:b]
            sel: Any = slice(int(d[0]), int(d[-1]) + 1) if int(d[-1]) - int(d[0]) + 1 == b - a else d
            if self._which == "image":
                out[a:b] = np.moveaxis(image[:, sel], 1, 0)
            else:
                out[a:b] = label[sel]
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        n = len(self)
        if first is Ellipsis or first is None:
            return np.asarray(self)[key]
        if isinstance(first, (int, np.integer)):
            i = int(first)
            if not -n <= i < n:
                raise IndexError(f"slice index {i} out of range [0, {n})")
            return self._take(np.array([i % n], dtype=np.int64))[(0, *rest)]
        if isinstance(first, slice):
            rows = np.arange(n, dtype=np.int64)[first]
        else:
            arr = np.asarray(first)
            if arr.dtype == bool:
                if arr.shape != (n,):
                    raise IndexError(f"boolean index of shape {arr.shape} for {n} slices")
                rows = np.flatnonzero(arr)
            elif arr.dtype.kind in "iu":
                rows = arr.astype(np.int64)
            else:
                raise IndexError(f"slice indices must be integers or booleans, not {arr.dtype}")
        flat = rows.reshape(-1)
        if flat.size and (flat.min() < -n or flat.max() >= n):
            raise IndexError(f"slice index out of range [0, {n})")
        flat = np.where(flat < 0, flat + n, flat)
        uniq, inverse = np.unique(flat, return_inverse=True)
        block = self._take(uniq)
        if rows.ndim == 1 and np.array_equal(uniq, flat):
            return block[(slice(None), *rest)] if rest else block
        return block[(inverse.reshape(rows.shape), *rest)]


class SliceCache(VolumeCache):
    """A built cache opened read-only, seen as 2D slices (the API training, evaluation and experiments use).

    ``images`` ``(N, M, H, W)`` float32 and ``labels`` ``(N, H, W)`` uint8 are :class:`SliceArray` views over the
    memory-mapped per-case volumes; ``records[i]`` describes slice ``i``. Everything of :class:`VolumeCache`
    (``cases``, ``volume``, ``get_patches``) is available too. Picklable (DataLoader workers reopen the memory maps
    instead of copying them). The slice view needs every case to have the same ``(M, H, W)``.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        n = len(self.records)
        if not self.cases or sum(c.depth for c in self.cases) != n:
            raise DataError(f"slice cache cases do not cover its {n} slice records", self.path)
        shapes = {c.shape[:1] + c.shape[2:] for c in self.cases}
        if len(shapes) != 1:
            raise DataError(f"slice cache volumes have different slice shapes {sorted(shapes)}; the 2D view needs one",
                            self.path)
        self._slice_case = np.repeat(np.arange(len(self.cases), dtype=np.int64), [c.depth for c in self.cases])
        self._slice_depth = np.concatenate([np.arange(c.depth, dtype=np.int64) for c in self.cases])
        if any(c.first != int(np.searchsorted(self._slice_case, k)) for k, c in enumerate(self.cases)):
            raise DataError("slice cache case entries are not in slice order", self.path)
        cases = [r["case_id"] for r in self.records]
        case_pos = {c: i for i, c in enumerate(self.case_ids)}
        self._case_index = np.array([case_pos[c] for c in cases], dtype=np.int64)
        self._modality = np.array([r["modality"] or "" for r in self.records], dtype=object)
        self._views()

    def _views(self) -> None:
        self.images = SliceArray(self, "image")
        self.labels = SliceArray(self, "label")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("images", None)
        state.pop("labels", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._views()

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (f"SliceCache({str(self.path)!r}, slices={len(self)}, cases={self.num_cases}, "
                f"shape={tuple(self.images.shape[1:])})")

    def indices_for(self, case_ids: Sequence[str] | None = None, modality: str | None = None) -> np.ndarray:
        """Sorted slice indices of the given cases and/or modality (all slices when both are ``None``).

        Case ids without slices in this cache (e.g. no foreground under ``only_labelled_slices``) select
        nothing rather than raising.
        """
        keep = np.ones(len(self), dtype=bool)
        if case_ids is not None:
            pos = {c: i for i, c in enumerate(self.case_ids)}
            wanted = [pos[c] for c in case_ids if c in pos]
            keep &= np.isin(self._case_index, np.asarray(wanted, dtype=np.int64))
        if modality is not None:
            keep &= self._modality == modality
        return np.flatnonzero(keep).astype(np.int64)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images (B,M,H,W) float32, labels (B,H,W) int64)`` in the order of ``indices``.

        The volumes are read once with sorted unique indices (sequential access); the rows are then put back
        in the requested order in RAM (only when the request was not already sorted and unique).
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError("empty batch")
        if idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"slice index out of range [0, {len(self)})")
        uniq, inverse = np.unique(idx, return_inverse=True)
        images = self.images._take(uniq)
        labels = self.labels._take(uniq)
        if uniq.size != idx.size or not np.array_equal(uniq, idx):
            inverse = inverse.reshape(-1)
            images = images[inverse]
            labels = labels[inverse]
        return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))

    def slice_position(self, index: int) -> tuple[int, int]:
        """``(case position, depth)`` of global slice ``index``."""
        if not 0 <= int(index) < len(self):
            raise IndexError(f"slice index {index} out of range [0, {len(self)})")
        return int(self._slice_case[index]), int(self._slice_depth[index])

    def slice_refs(self, indices: Sequence[int] | np.ndarray) -> list[PatchRef]:
        """Global slice indices as depth-1 whole-slice patches: ``get_patches`` of them, squeezed, is
        ``get_batch(indices)``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"slice index out of range [0, {len(self)})")
        size = (1, int(self.images.shape[-2]), int(self.images.shape[-1]))
        return [PatchRef(int(k), (int(d), 0, 0), size)  # type: ignore[arg-type]
                for k, d in zip(self._slice_case[idx], self._slice_depth[idx], strict=True)]

    def spacing(self, index: int) -> tuple[float, float]:
        """Processed in-plane pixel size (mm) of slice ``index`` (for Hausdorff distances in mm)."""
        sy, sx = self.records[index]["spacing"]
        return (float(sy), float(sx))

    def geometry(self, index: int) -> SliceGeometry:
        return SliceGeometry.from_dict(self.records[index]["geometry"])


# ------------------------------------------------------------------------------------------------ build
def build_slice_cache(
    spec: DatasetSpec,
    cfg: PreprocessConfig,
    cache_dir: str | Path,
    *,
    cases: list[str] | None = None,
    progress: bool = False,
    strict: bool = False,
) -> SliceCache:
    """Return the slice cache of ``cases`` (default: all) of ``spec`` under ``cfg``, building it if needed.

    An existing cache with the same fingerprint is reused without reading any image. Each case is read once;
    label values go through ``spec.label_lut()`` (undeclared values raise :class:`DataError` naming the file).
    """
    selected = _select_cases(spec, cases)
    if not selected:
        raise DataError(f"no cases to cache in dataset {spec.name!r}", spec.root)
    if spec.num_classes > IGNORE_INDEX:
        raise ConfigError(f"{spec.num_classes} classes do not fit the cache's uint8 labels (at most {IGNORE_INDEX}: "
                          f"index {IGNORE_INDEX} is kept for nnU-Net's ignore label)")
    fingerprint = cache_fingerprint(spec, cfg, selected, strict)
    root = Path(cache_dir)
    final = root / fingerprint[:16]
    existing = _open_existing(final, fingerprint)
    if existing is not None:
        log.info("reusing slice cache %s", final)
        return existing
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create cache folder ({exc.strerror or exc})", root) from None
    _remove_stale_tmp(root)
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname()) or "host"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{fingerprint[:16]}-{host}-{os.getpid()}-", dir=root))
        os.chmod(tmp, folder_mode())  # mkdtemp gives 0700: colleagues must be able to read the cache
    except OSError as exc:
        raise OutputError(f"cannot write the slice cache ({exc.strerror or exc})", root) from None
    try:
        _build_into(tmp, spec, cfg, selected, fingerprint, progress, strict)
        if final.exists():  # invalid leftover (checked above) or a concurrent builder's finished cache
            if _open_existing(final, fingerprint) is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return SliceCache(final)
            trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=root))
            os.replace(final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if _open_existing(final, fingerprint) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        _fsync_dir(root)
    except OSError as exc:  # disk full, quota, permissions while writing the cache (reads raise DataError)
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write the slice cache ({exc.strerror or exc}); nothing was kept", root) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built slice cache %s (%d slices)", final, len(SliceCache(final)))
    return SliceCache(final)


def _open_existing(final: Path, fingerprint: str) -> SliceCache | None:
    if not (final / _INDEX).exists():
        return None
    try:
        cache = SliceCache(final)
    except DataError as exc:
        log.warning("ignoring unusable slice cache: %s", exc)
        return None
    return cache if cache.fingerprint == fingerprint else None


def _remove_stale_tmp(root: Path) -> None:
    """Remove ``.tmp-*`` folders of killed builds on this host (their process no longer exists)."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname()) or "host"
    for entry in root.glob(".tmp-*"):
        parts = entry.name.split("-")
        # .tmp-<fingerprint16>-<host>-<pid>-<random>
        if len(parts) < 5 or parts[2] != host or not parts[3].isdigit():
            continue
        pid = int(parts[3])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_case(
    spec: DatasetSpec, case: CaseFiles, lut: dict[int, int], *, strict: bool = False, notes: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], list[int]]:
    """Read one case: (M,X,Y,Z) float32 images, (X,Y,Z) class indices, spacing, normalisation channels.

    Arrays and spacing are in the canonical voxel order (closest to RAS, the ``ToCanonical`` transform), so
    ``slice_axis`` is the same anatomical axis for every file. Assistant modalities and the label are put on the
    master (first) image's grid first (the ``OntoGrid`` transform, :func:`modalseg.data.geometry.onto_grid`); each
    such case adds one line to ``notes`` (printed when ``notes`` is None). ``strict`` refuses any grid difference
    instead, as before.
    """
    if case.label is None:
        raise DataError(
            f"case {case.case_id!r} has no label file; the training slice cache needs labels", spec.root
        )
    if spec.paired:
        if len(case.images) != len(spec.modalities):
            raise DataError(
                f"case {case.case_id!r} has {len(case.images)} image file(s) but the dataset declares "
                f"{len(spec.modalities)} modalities",
                case.images[0] if case.images else spec.root,
            )
        channels = list(range(len(case.images)))
    else:
        if len(case.images) != 1:
            raise DataError(f"unpaired case {case.case_id!r} must have exactly one image file", spec.root)
        if case.modality not in spec.modalities:
            raise DataError(f"modality {case.modality!r} is not one of {spec.modalities}", case.images[0])
        channels = [spec.modalities.index(case.modality)]
    # The cache is the only place training reads files, so it refuses what `modalseg verify` calls a problem
    # (NaN/inf, constant image, grids that cannot be aligned) instead of training silently on garbage.
    names = list(spec.modalities) if spec.paired else [str(case.modality)]
    messages: list[str] = []
    arrays = []
    ref = None
    for i, p in enumerate(case.images):
        vol = mio.read_volume(p, kind="image")
        problems = []
        if i == 0:
            ref = vol
        elif strict:
            if vol.shape != ref.shape:
                raise DataError(f"shape {vol.shape} differs from modality 0 {ref.shape}", p)
            problems += geometry_problems(vol, ref, names[i], names[0])
        problems += intensity_problems(vol)
        if problems:
            raise DataError(problems[0])
        if i and not strict:
            vol, note, _ = OntoGrid(ref, name=names[i], ref_name=names[0], case=case.case_id).apply(vol)
            if note:
                messages.append(note)
        arrays.append(np.asarray(vol.array, dtype=np.float32))
    assert ref is not None
    lab = mio.read_volume(case.label, kind="label")
    if strict:
        if lab.shape != ref.shape:
            raise DataError(f"label shape {lab.shape} differs from image shape {ref.shape}", case.label)
        # A label must lie on its image's grid: its origin is checked too, as `modalseg verify` does.
        problems = geometry_problems(lab, ref, "label", "image", origin_tol_voxels=ORIGIN_TOL_VOXELS)
        if problems:
            raise DataError(problems[0])
    else:
        # Same grid: the origin must match (else the label is off its image); another grid is resampled
        # (nearest) with background outside, e.g. a 3D Slicer .seg.nrrd cropped to its bounding box.
        background = next(iter(spec.labels.values()), 0)
        lab, note, _ = OntoGrid(ref, name="label", ref_name="image", grid_name="the image's", kind="label",
                                case=case.case_id, fill=background, origin_tol_voxels=ORIGIN_TOL_VOXELS).apply(lab)
        if note:
            messages.append(note)
    labels = map_labels(lab.array, lut, case.label)
    canonical = ToCanonical()(Sample(np.stack(arrays), labels, affine=ref.affine, path=ref.path))
    for note in messages:
        if notes is None:
            print(note, flush=True)
        else:
            notes.append(note)
    return canonical.image, canonical.label, canonical.spacing, channels  # type: ignore[return-value]


def _build_into(
    tmp: Path,
    spec: DatasetSpec,
    cfg: PreprocessConfig,
    cases: list[CaseFiles],
    fingerprint: str,
    progress: bool,
    strict: bool = False,
) -> None:
    """Preprocess every case into its own volume files in ``tmp`` (fsynced), then write ``index.json`` last."""
    lut = spec.label_lut()
    records: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    shape: tuple[int, int, int] | None = None  # (M, H, W)
    iterator: Any = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc=f"caching {spec.name}", unit="case")
    for case in iterator:
        notes: list[str] = []
        images, labels, spacing, channels = _read_case(spec, case, lut, strict=strict, notes=notes)
        for note in notes:  # resampling/reorientation lines, printed above the progress bar
            if progress:
                from tqdm import tqdm

                tqdm.write(note)
            else:
                print(note, flush=True)
        if len(spacing) != 3:
            raise DataError(f"expected a 3D volume, got spacing {spacing}", case.images[0])
        slices = preprocess_volume(images, labels, cfg, spacing=spacing, channels=channels)
        thickness = processed_thickness(cfg, images.shape[1 + cfg.slice_axis], spacing)
        del images, labels
        if not slices:
            log.warning("case %s has no slices (no foreground with only_labelled_slices)", case.case_id)
            continue
        this = tuple(slices[0].image.shape)
        if shape is None:
            shape = this  # type: ignore[assignment]
        elif this != shape:
            raise DataError(
                f"processed slices are {this[1:]} with {this[0]} channel(s) but earlier cases gave "
                f"{shape[1:]} with {shape[0]}; set preprocess.target_size or a crop so all slices match",
                case.images[0],
            )
        volume = np.stack([s.image for s in slices], axis=1).astype(np.float32, copy=False)  # (M, D, H, W)
        label_volume = np.stack([s.label for s in slices]).astype(np.uint8)  # type: ignore[misc]
        files = write_case(tmp, len(entries), case.case_id, volume, label_volume)
        entries.append({
            "case_id": case.case_id,
            "patient_id": case.patient_id,
            "modality": case.modality,
            "files": files,
            "shape": list(volume.shape),
            "spacing": [thickness, *(float(v) for v in slices[0].spacing)],
            "first": len(records),
            "contiguous": all(b.z == a.z + 1 for a, b in zip(slices, slices[1:], strict=False)),
        })
        del volume, label_volume
        for s in slices:
            records.append(
                {
                    "case_id": case.case_id,
                    "patient_id": case.patient_id,
                    "modality": case.modality,
                    "z": int(s.z),
                    "spacing": [float(v) for v in s.spacing],
                    "slice_thickness": thickness,
                    "geometry": s.geometry.to_dict(),
                    "foreground": bool(s.has_foreground),
                }
            )
    if shape is None:
        raise DataError(f"no slices to cache in dataset {spec.name!r} (all cases empty)", spec.root)
    _fsync_dir(tmp / "cases")
    index = {
        "format": CACHE_FORMAT,
        "fingerprint": fingerprint,
        "spec_name": spec.name,
        "paired": spec.paired,
        "modalities": list(spec.modalities),
        "class_names": spec.class_names,
        "config": cfg.to_dict(),
        "shape": [len(records), *shape],
        "cases": entries,
        "records": records,
    }
    atomic_write_text(tmp / _INDEX, json.dumps(index))
