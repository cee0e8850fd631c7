"""Memory-mapped cache of preprocessed 2D slices, so training epochs never re-read NIfTI files.

Layout: ``cache_dir`` is a root that holds one folder per fingerprint (``cache_dir/<fingerprint[:16]>/``), so
caches of different configurations or case subsets (e.g. cross-validation folds) live side by side::

    images.npy   (N, M, H, W) float32   M = modality channels (paired) or 1 (unpaired)
    labels.npy   (N, H, W)    uint8     class indices (spec.label_lut() applied)
    index.json   format version, fingerprint, spec name, preprocessing config, class names, modalities and
                 one record per slice: case_id, patient_id, modality, z, spacing (processed pixel size, mm),
                 slice_thickness (voxel size along the slice axis, mm), geometry (SliceGeometry.to_dict()),
                 foreground (whether the original slice had any)

The fingerprint hashes the preprocessing config, the dataset's labels/modalities and, for every file, its
resolved path, size and ``mtime_ns``: editing or replacing a file gives a new cache; an existing cache with
the same fingerprint is opened without reading any image.

Atomicity: a cache is built in a temporary folder beside its final folder and renamed into place only when
complete (``index.json`` is written last). An exception or Ctrl-C removes the temporary folder; a killed
process leaves a ``.tmp-*`` folder that is never read as a cache and is removed by the next build on the same
host. Two processes building the same cache at once (DDP ranks) both succeed; the first rename wins. The
engine should build on rank 0 and open it elsewhere after a barrier to avoid duplicated work.

Memory: each case is read once (all its image files and its label), processed, and written to a per-case
chunk; the final arrays are then assembled with :func:`numpy.lib.format.open_memmap` chunk by chunk, so RAM
holds at most one case (the disk briefly holds the data twice).
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalseg.data import io as mio
from modalseg.data.geometry import ORIGIN_TOL_VOXELS, geometry_problems, onto_grid, to_canonical
from modalseg.data.preprocess import PreprocessConfig, SliceGeometry, preprocess_volume
from modalseg.data.types import CaseFiles, DatasetSpec
from modalseg.data.verify import intensity_problems
from modalseg.errors import ConfigError, DataError, OutputError
from modalseg.utils.atomic import atomic_write_text, folder_mode

log = logging.getLogger(__name__)

# 2: label/image origins and degenerate grids are checked while building (caches of format 1 were not).
# 3: every volume is brought to the canonical (closest to RAS) voxel order and assistants/labels onto the master's
#    grid before slicing (format 2 sliced in each file's stored order).
CACHE_FORMAT = 3
_IMAGES, _LABELS, _INDEX = "images.npy", "labels.npy", "index.json"


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
class SliceCache:
    """A built slice cache, opened read-only and memory-mapped.

    ``images`` (N,M,H,W) float32 and ``labels`` (N,H,W) uint8 are ``np.memmap`` views; ``records[i]``
    describes slice ``i``. Picklable (DataLoader workers reopen the memory maps instead of copying them).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index_path = self.path / _INDEX
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError("slice cache index not found", index_path) from None
        except (OSError, ValueError) as exc:
            raise DataError(f"unreadable slice cache index ({exc})", index_path) from None
        if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
            raise DataError(f"unsupported slice cache format (expected {CACHE_FORMAT})", index_path)
        self.fingerprint: str = index["fingerprint"]
        self.spec_name: str = index["spec_name"]
        self.config = PreprocessConfig.from_dict(index["config"])
        self.modalities: list[str] = list(index["modalities"])
        self.class_names: list[str] = list(index["class_names"])
        self.paired: bool = bool(index["paired"])
        self.records: list[dict[str, Any]] = index["records"]
        self._open()
        cases = [r["case_id"] for r in self.records]
        self.case_ids: list[str] = list(dict.fromkeys(cases))
        case_pos = {c: i for i, c in enumerate(self.case_ids)}
        self._case_index = np.array([case_pos[c] for c in cases], dtype=np.int64)
        self._modality = np.array([r["modality"] or "" for r in self.records], dtype=object)
        self.patients: dict[str, list[str]] = {}
        for r in self.records:
            ids = self.patients.setdefault(r["patient_id"], [])
            if r["case_id"] not in ids:
                ids.append(r["case_id"])

    def _open(self) -> None:
        try:
            self.images = np.load(self.path / _IMAGES, mmap_mode="r")
            self.labels = np.load(self.path / _LABELS, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(f"unreadable slice cache arrays ({exc})", self.path) from None
        n = len(self.records)
        if (
            self.images.ndim != 4
            or self.labels.ndim != 3
            or self.images.shape[0] != n
            or self.labels.shape != (n,) + self.images.shape[2:]
        ):
            shapes = f"{self.images.shape}/{self.labels.shape}"
            raise DataError(f"slice cache arrays {shapes} do not match {n} records", self.path)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("images", None)
        state.pop("labels", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"SliceCache({str(self.path)!r}, slices={len(self)}, shape={tuple(self.images.shape[1:])})"

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

        The memory map is read once with sorted unique indices (sequential access); the rows are then put back
        in the requested order in RAM (only when the request was not already sorted and unique).
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError("empty batch")
        if idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"slice index out of range [0, {len(self)})")
        uniq, inverse = np.unique(idx, return_inverse=True)
        images = np.asarray(self.images[uniq])
        labels = np.asarray(self.labels[uniq])
        if uniq.size != idx.size or not np.array_equal(uniq, idx):
            inverse = inverse.reshape(-1)
            images = images[inverse]
            labels = labels[inverse]
        return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))

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
    if spec.num_classes > 256:
        raise ConfigError(f"{spec.num_classes} classes do not fit the cache's uint8 labels")
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


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _read_case(
    spec: DatasetSpec, case: CaseFiles, lut: dict[int, int], *, strict: bool = False, notes: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], list[int]]:
    """Read one case: (M,X,Y,Z) float32 images, (X,Y,Z) class indices, spacing, normalisation channels.

    Arrays and spacing are in the canonical voxel order (closest to RAS, :func:`modalseg.data.geometry.to_canonical`),
    so ``slice_axis`` is the same anatomical axis for every file. Assistant modalities and the label are put on the
    master (first) image's grid first (:func:`modalseg.data.geometry.onto_grid`); each such case adds one line to
    ``notes`` (printed when ``notes`` is None). ``strict`` refuses any grid difference instead, as before.
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
            vol, note = onto_grid(vol, ref, name=names[i], ref_name=names[0], case=case.case_id)
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
        lab, note = onto_grid(lab, ref, name="label", ref_name="image", grid_name="the image's", kind="label",
                              case=case.case_id, fill=background, origin_tol_voxels=ORIGIN_TOL_VOXELS)
        if note:
            messages.append(note)
    labels = map_labels(lab.array, lut, case.label)
    canonical, reo = to_canonical(ref)
    for note in messages:
        if notes is None:
            print(note, flush=True)
        else:
            notes.append(note)
    return reo.apply(np.stack(arrays)), reo.apply(labels), canonical.spacing, channels


def _build_into(
    tmp: Path,
    spec: DatasetSpec,
    cfg: PreprocessConfig,
    cases: list[CaseFiles],
    fingerprint: str,
    progress: bool,
    strict: bool = False,
) -> None:
    lut = spec.label_lut()
    records: list[dict[str, Any]] = []
    chunks: list[tuple[Path, Path, int]] = []
    shape: tuple[int, int, int] | None = None  # (M, H, W)
    iterator: Any = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc=f"caching {spec.name}", unit="case")
    for n, case in enumerate(iterator):
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
        img_chunk, lab_chunk = tmp / f"chunk{n:06d}_img.npy", tmp / f"chunk{n:06d}_lab.npy"
        np.save(img_chunk, np.stack([s.image for s in slices]).astype(np.float32, copy=False))
        np.save(lab_chunk, np.stack([s.label for s in slices]).astype(np.uint8))  # type: ignore[misc]
        chunks.append((img_chunk, lab_chunk, len(slices)))
        for s in slices:
            records.append(
                {
                    "case_id": case.case_id,
                    "patient_id": case.patient_id,
                    "modality": case.modality,
                    "z": int(s.z),
                    "spacing": [float(v) for v in s.spacing],
                    "slice_thickness": float(spacing[cfg.slice_axis]),
                    "geometry": s.geometry.to_dict(),
                    "foreground": bool(s.has_foreground),
                }
            )
    if shape is None:
        raise DataError(f"no slices to cache in dataset {spec.name!r} (all cases empty)", spec.root)
    total = len(records)
    out_img = np.lib.format.open_memmap(tmp / _IMAGES, mode="w+", dtype=np.float32, shape=(total, *shape))
    out_lab = np.lib.format.open_memmap(tmp / _LABELS, mode="w+", dtype=np.uint8, shape=(total, *shape[1:]))
    pos = 0
    for img_chunk, lab_chunk, count in chunks:
        out_img[pos : pos + count] = np.load(img_chunk, mmap_mode="r")
        out_lab[pos : pos + count] = np.load(lab_chunk, mmap_mode="r")
        pos += count
        img_chunk.unlink()
        lab_chunk.unlink()
    out_img.flush()
    out_lab.flush()
    del out_img, out_lab
    _fsync_file(tmp / _IMAGES)
    _fsync_file(tmp / _LABELS)
    index = {
        "format": CACHE_FORMAT,
        "fingerprint": fingerprint,
        "spec_name": spec.name,
        "paired": spec.paired,
        "modalities": list(spec.modalities),
        "class_names": spec.class_names,
        "config": cfg.to_dict(),
        "shape": [total, *shape],
        "records": records,
    }
    atomic_write_text(tmp / _INDEX, json.dumps(index))
