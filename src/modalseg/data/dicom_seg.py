"""DICOM Segmentation (DICOM-SEG) output for predictions of DICOM inputs, and a reader for the round-trip check.

``modalseg predict --output-format dicom-seg`` writes one Segmentation instance per case (``CASE.dcm``) with
highdicom (the optional extra ``pip install 'modalseg[dicom]'``), so that a PACS or viewer shows it over the series
it was computed from:

* It refers to the case's reference input: the DICOM series of its first (master) modality, chosen in the folder
  exactly as :func:`modalseg.data.io.read_volume` chooses it. The SEG copies that series' patient, study and frame
  of reference, and each of its frames names the source image it segments (ReferencedSOPInstanceUID).
* Segmentation type BINARY, one segment per foreground class (every class but the first, the background, in class
  order; segment numbers 1, 2, ...), the class name as SegmentLabel. The prediction holds no anatomy, so every
  segment gets the same neutral coded category and type, SCT 85756007 "Tissue" (what 3D Slicer gives a segment it
  knows nothing about); a per-class mapping (a dataset.json ``"dicom_seg": {"mass": {"category": ..., "type": ...}}``
  entry) would be the place for real codes. Algorithm type AUTOMATIC, family "Artificial Intelligence", name
  modalseg; manufacturer "modalseg", software version :data:`modalseg.__version__`; new UIDs from highdicom.
* The label volume is in the reference Volume's voxel order (x, y, z). Each source image is mapped onto that grid by
  its own ImagePositionPatient / ImageOrientationPatient / PixelSpacing (never by file order or instance number);
  every voxel must be hit by exactly one pixel of one image, within a quarter of a voxel, else nothing is written.

:func:`read_dicom_seg` reads a SEG back onto the grid of its source series the same way (each frame placed by its own
plane position, its ReferencedSOPInstanceUID checked against the series): the round trip gives the label volume
exactly. Only single-frame source series are supported (one image per file, the common case for CT and MR).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modalseg.data.io import DicomSeries, choose_series, dicom_series, is_dicom_series, read_volume
from modalseg.data.types import Volume
from modalseg.errors import ConfigError, DataError, OutputError
from modalseg.utils.atomic import atomic_path

#: SOP Class UID of the Segmentation Storage IOD.
SEGMENTATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: The file ending of a DICOM-SEG output.
SEG_ENDING = ".dcm"
#: Coded category and type of every segment: SCT "Tissue", neutral about what the class is (see the module text).
TISSUE = ("85756007", "SCT", "Tissue")
#: Largest distance (in voxels) of a pixel centre from the voxel it is mapped to.
GRID_TOL = 0.25
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
INSTALL_HINT = "pip install 'modalseg[dicom]'"


def require_highdicom() -> None:
    """Refuse ``--output-format dicom-seg`` in one line when the optional extra is not installed."""
    try:
        import highdicom  # noqa: F401
        import pydicom  # noqa: F401
    except ImportError as exc:
        missing = getattr(exc, "name", None) or "highdicom"
        raise ConfigError(f"--output-format dicom-seg needs highdicom and pydicom ({missing} is not installed): "
                          f"{INSTALL_HINT}") from None


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise ConfigError(f"reading DICOM-SEG needs pydicom (not installed): {INSTALL_HINT}") from None
    return pydicom


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pydicom/highdicom report oddities of valid files as warnings and log records (stderr); what matters is
    checked here and raised as one line instead."""
    loggers = [logging.getLogger(name) for name in ("highdicom", "pydicom")]
    before = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, state in zip(loggers, before, strict=True):
            lg.disabled = state


def source_series(path: str | Path) -> DicomSeries:
    """The series :func:`read_volume` reads for ``path`` (a DICOM folder or an ``ImageRef`` naming its series): the
    one described by the ref's series, else by the folder's name (the same choice and fallback as io's reader)."""
    folder = Path(path)
    want = getattr(path, "series", None)
    series = dicom_series(folder)
    try:
        return choose_series(folder, series, want or folder.name)
    except DataError as first:
        if not want or _squash(want) == _squash(folder.name):
            raise
        try:
            return choose_series(folder, series, folder.name)
        except DataError:
            raise first from None


def _squash(text: str) -> str:
    """As io's: case, spaces and punctuation ignored when a description is matched to a name."""
    return re.sub(r"[^0-9a-z]+", "", text.casefold())


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str | bytes) and not value.strip()) or (
        hasattr(value, "__len__") and not isinstance(value, str | bytes) and len(value) == 0)


def _numbers(value: Any) -> list[float] | None:
    """A DICOM decimal string value (one number or several) as finite floats, else ``None``."""
    try:
        values = [float(v) for v in (value if hasattr(value, "__iter__") and not isinstance(value, str) else [value])]
    except (TypeError, ValueError):
        return None
    return values if all(np.isfinite(values)) else None


def _first(value: Any) -> Any:
    return value[0] if value is not None and len(value) else None


def read_source_headers(path: str | Path) -> tuple[DicomSeries, list[Any]]:
    """The source series of ``path`` and its files' pydicom headers (no pixel data), in the series' order.

    Refuses (one line naming the folder or file) what a SEG cannot refer to: a multi-frame file, an image without
    its geometry, SOP or frame-of-reference UIDs, and files of one series from different studies or frames of
    reference."""
    pydicom = _pydicom()
    folder = Path(path)
    series = source_series(path)
    headers = []
    with _quiet():
        for f in series.files:
            try:
                headers.append(pydicom.dcmread(f, stop_before_pixels=True))
            except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a damaged file
                raise DataError(f"cannot read the DICOM header ({type(exc).__name__}: {str(exc)[:120]})", f) from None
    what = f"DICOM series {series.description!r}" if series.description else "DICOM series"
    required = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
                "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
    for f, ds in zip(series.files, headers, strict=True):
        missing = [k for k in required if _empty(ds.get(k))]
        if missing:
            raise DataError(f"{what}: no {', '.join(missing)} in this file; a DICOM-SEG needs "
                            f"{'it' if len(missing) == 1 else 'them'} to refer to the image and place the "
                            "segmentation on it", f)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DataError(f"{what}: a multi-frame (enhanced) DICOM file; DICOM-SEG output supports series of "
                            "single-frame files", f)
        for key, n in (("ImagePositionPatient", 3), ("ImageOrientationPatient", 6), ("PixelSpacing", 2)):
            values = _numbers(ds.get(key))
            if values is None or len(values) != n or (key == "PixelSpacing" and min(values) <= 0):
                raise DataError(f"{what}: {key} is {ds.get(key)!r} in this file, not {n} finite numbers"
                                f"{' above 0' if key == 'PixelSpacing' else ''}", f)
    for key in ("StudyInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(key)) for ds in headers}
        if len(values) > 1:
            raise DataError(f"{what}: its {len(headers)} files have {len(values)} different {key}s; the files of "
                            "one series belong to one study and one frame of reference", folder)
    return series, headers


def _frame_voxels(position: Sequence[float], orientation: Sequence[float], pixel_spacing: Sequence[float],
                  rows: int, cols: int, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray | None:
    """Voxel indices (3, rows, cols) of each pixel of a DICOM frame on the grid of ``affine`` (voxel -> RAS), or
    ``None`` when a pixel lies off the grid (more than :data:`GRID_TOL` voxels from a voxel centre, or outside).

    DICOM: pixel (r, c) is at ImagePositionPatient + c * PixelSpacing[1] * row cosines + r * PixelSpacing[0] *
    column cosines, in LPS; the grid is RAS."""
    ipp = np.asarray([float(v) for v in position], dtype=np.float64)
    iop = np.asarray([float(v) for v in orientation], dtype=np.float64)
    along_row, along_col = iop[:3], iop[3:]
    ps = [float(v) for v in pixel_spacing]
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    lin, off = inverse[:3, :3], inverse[:3, 3]
    origin = lin @ (_LPS_TO_RAS * ipp) + off
    step_c = lin @ (_LPS_TO_RAS * along_row * ps[1])
    step_r = lin @ (_LPS_TO_RAS * along_col * ps[0])
    r = np.arange(rows, dtype=np.float64)[None, :, None]
    c = np.arange(cols, dtype=np.float64)[None, None, :]
    frac = origin[:, None, None] + step_r[:, None, None] * r + step_c[:, None, None] * c
    index = np.rint(frac)
    if float(np.abs(frac - index).max()) > GRID_TOL:
        return None
    index = index.astype(np.int64)
    bounds = np.asarray(shape, dtype=np.int64)[:, None, None]
    if (index < 0).any() or (index >= bounds).any():
        return None
    return index


def segments(class_labels: Mapping[str, int]) -> list[tuple[int, str, int]]:
    """``(segment number, class name, label value)`` of each foreground class: every class but the first (the
    background), in class order, numbered from 1 as DICOM requires."""
    return [(n, name, int(value)) for n, (name, value) in enumerate(list(class_labels.items())[1:], start=1)]


def write_dicom_seg(path: str | Path, labels: np.ndarray, reference: Volume, source: str | Path,
                    class_labels: Mapping[str, int], *, model_name: str = "") -> Path:
    """Write ``labels`` (label values, the reference Volume's (x, y, z) order) as one DICOM-SEG at ``path``
    (atomically), referring to the DICOM series ``source`` that ``reference`` was read from.

    Raises :class:`DataError` (one line naming the series) when the series cannot be referred to or does not fit
    the label grid, :class:`ConfigError` without highdicom, ``ValueError`` for a shape mismatch or label values that
    are no class (programming errors)."""
    require_highdicom()
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from modalseg import __version__

    path = Path(path)
    labels = np.asarray(labels)
    if labels.shape != tuple(reference.array.shape):
        raise ValueError(f"label shape {labels.shape} differs from the reference {reference.shape}")
    if not is_dicom_series(source):
        raise DataError("not a DICOM series folder: a DICOM-SEG refers to the DICOM images it segments", source)
    described = segments(class_labels)
    if not described:
        raise DataError("the model has no foreground class: a DICOM-SEG needs at least one segment", source)
    seg_map = np.zeros(labels.shape, dtype=np.uint8 if len(described) < 256 else np.uint16)
    known = np.isin(labels, [int(v) for v in class_labels.values()])
    if not known.all():
        raise ValueError(f"label values {np.unique(labels[~known])[:5].tolist()} are not among the classes' values")
    for number, _, value in described:
        seg_map[labels == value] = number
    series, headers = read_source_headers(source)
    what = f"DICOM series {series.description!r}" if series.description else "DICOM series"
    frames = np.zeros((len(headers), int(headers[0].Rows), int(headers[0].Columns)), dtype=seg_map.dtype)
    if frames.size != labels.size:
        raise DataError(f"{what}: {frames.shape[0]} images of {frames.shape[1]}x{frames.shape[2]} pixels where the "
                        f"volume read from it has {labels.shape} voxels; nothing was written", source)
    # as many pixels as voxels: every voxel hit means each is hit exactly once
    covered = np.zeros(labels.shape, dtype=bool)
    for k, (f, ds) in enumerate(zip(series.files, headers, strict=True)):
        rows, cols = int(ds.Rows), int(ds.Columns)
        index = None
        if (rows, cols) == frames.shape[1:]:
            index = _frame_voxels(ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing, rows, cols,
                                  reference.affine, labels.shape)
        if index is None:
            raise DataError(f"{what}: this image ({rows}x{cols} at ImagePositionPatient "
                            f"{[float(v) for v in ds.ImagePositionPatient]}) does not lie on the grid of the volume "
                            f"read from the series {reference.shape}; nothing was written", f)
        frames[k] = seg_map[index[0], index[1], index[2]]
        covered[index[0], index[1], index[2]] = True
    if not covered.all():
        raise DataError(f"{what}: its images miss {int((~covered).sum())} voxel(s) of the volume read from it (and "
                        "cover others twice); nothing was written", source)
    tissue = hd.sr.CodedConcept(*TISSUE)
    algorithm = hd.AlgorithmIdentificationSequence(name="modalseg", family=codes.cid7162.ArtificialIntelligence,
                                                   version=__version__)
    descriptions = [
        hd.seg.SegmentDescription(segment_number=number, segment_label=name, segmented_property_category=tissue,
                                  segmented_property_type=tissue, algorithm_type="AUTOMATIC",
                                  algorithm_identification=algorithm)
        for number, name, _ in described
    ]
    number = headers[0].get("SeriesNumber")  # the SEG is listed after its source series
    series_number = int(number) + 1000 if isinstance(number, int) and 0 <= int(number) < 2**31 - 1000 else 1000
    try:
        with _quiet():
            seg = hd.seg.Segmentation(
                source_images=headers, pixel_array=frames, segmentation_type="BINARY",
                segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=series_number,
                sop_instance_uid=hd.UID(), instance_number=1, manufacturer="modalseg",
                manufacturer_model_name=(model_name or "modalseg")[:64], software_versions=__version__,
                device_serial_number="none", series_description=f"modalseg {model_name}".strip()[:64],
                # an all-background prediction still needs frames: write them all (empty) rather than none
                omit_empty_frames=bool(frames.any()),
            )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        detail = " ".join(str(exc).split())[:160]
        raise DataError(f"{what}: cannot make a DICOM-SEG referring to it (highdicom: {detail})", source) from None
    with atomic_path(path) as tmp:
        seg.save_as(os.fspath(tmp))
    return path


def check_dicom_seg_inputs(cases: Mapping[str, Sequence[Path]], first_modality: str) -> None:
    """Refuse ``--output-format dicom-seg`` for a case whose reference input (the first modality) is not a DICOM
    series, and check each series can be referred to, before any model runs or anything is written."""
    for case, files in cases.items():
        ref = files[0]
        if not is_dicom_series(ref):
            raise DataError(f"--output-format dicom-seg: case {case}'s {first_modality} input is not a DICOM series "
                            "(a DICOM-SEG refers to the DICOM images it segments); use --output-format image", ref)
        read_source_headers(ref)


def series_input_files(cases: Mapping[str, Sequence[Path]]) -> dict[str, list[Path]]:
    """Each case's inputs plus the files inside its DICOM folders, so that an output check sees the DICOM files a
    ``CASE.dcm`` could replace."""
    out: dict[str, list[Path]] = {}
    for case, files in cases.items():
        extra = [f for p in files if Path(p).is_dir() for f in sorted(Path(p).iterdir()) if f.is_file()]
        out[case] = [*files, *extra]
    return out


def check_outside_series_folders(planned: Mapping[str, Sequence[Path]], cases: Mapping[str, Sequence[Path]]) -> None:
    """Refuse a ``CASE.dcm`` written into an input DICOM folder: it would join the series it refers to (the next read
    of that folder would find one more series)."""
    folders = {Path(p).resolve(): Path(p) for files in cases.values() for p in files if Path(p).is_dir()}
    for case, paths in planned.items():
        for p in paths:
            hit = folders.get(Path(p).parent.resolve())
            if hit is not None and p.name.lower().endswith(SEG_ENDING):
                raise OutputError(f"refused: the DICOM-SEG of case {case!r} would be written into the input DICOM "
                                  f"folder {hit}; choose another --output", p)


def _group(groups: Sequence[Any], sequence: str) -> Any:
    """The first item of a functional group macro, per-frame before shared (where the standard allows either)."""
    return next((g.get(sequence)[0] for g in groups if g.get(sequence)), None)


def read_dicom_seg(path: str | Path, reference_series_folder: str | Path,
                   labels: Mapping[str, int] | None = None) -> np.ndarray:
    """The label volume of a DICOM-SEG on the grid of its source series (x, y, z, as :func:`read_volume` reads the
    folder): the round-trip check of :func:`write_dicom_seg`.

    Each frame is placed by its own plane position and orientation; its ReferencedSOPInstanceUID must be an image of
    the series. Values are segment numbers (0 outside every segment) or, with ``labels`` (class name -> value, the
    background first), the value of the class named by each SegmentLabel (the background value outside). Needs only
    pydicom. Raises :class:`DataError` for a file that is no binary SEG of that series, or overlapping segments."""
    pydicom = _pydicom()
    path = Path(path)
    with _quiet():
        try:
            ds = pydicom.dcmread(os.fspath(path))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a damaged file
            raise DataError(f"cannot read as DICOM ({type(exc).__name__}: {str(exc)[:120]})", path) from None
    if str(ds.get("SOPClassUID", "")) != SEGMENTATION_SOP_CLASS:
        raise DataError("not a DICOM Segmentation (SOP Class UID "
                        f"{ds.get('SOPClassUID', 'missing')}, expected {SEGMENTATION_SOP_CLASS})", path)
    if ds.get("SegmentationType") != "BINARY":
        raise DataError(f"segmentation type {ds.get('SegmentationType')}; only BINARY is read", path)
    reference = read_volume(reference_series_folder)  # its grid: the label volume's voxel order and geometry
    series, headers = read_source_headers(reference_series_folder)
    referenced = {str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", [])}
    if series.uid not in referenced:
        raise DataError(f"the segmentation refers to series {sorted(referenced)}, not to {series.uid} in "
                        f"{reference_series_folder}", path)
    if str(ds.get("FrameOfReferenceUID")) != str(headers[0].FrameOfReferenceUID):
        raise DataError("the segmentation's FrameOfReferenceUID differs from its source series'", path)
    instances = {str(h.SOPInstanceUID) for h in headers}
    value_of: dict[int, int] = {}
    background = 0
    if labels is not None:
        background = int(next(iter(labels.values())))
    for item in ds.SegmentSequence:
        number = int(item.SegmentNumber)
        if labels is None:
            value_of[number] = number
        elif str(item.SegmentLabel) in labels:
            value_of[number] = int(labels[str(item.SegmentLabel)])
        else:
            raise DataError(f"segment {number} is labelled {str(item.SegmentLabel)!r}, which is no class of "
                            f"{list(labels)}", path)
    with _quiet():
        pixels = np.asarray(ds.pixel_array)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = pixels.reshape(n, int(ds.Rows), int(ds.Columns))
    shared = _first(ds.get("SharedFunctionalGroupsSequence"))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or [None] * n
    out = np.full(reference.shape, background, dtype=np.int32)
    owner = np.zeros(reference.shape, dtype=np.int32)  # segment number that set each voxel
    for f in range(n):
        groups = [g for g in (per_frame[f], shared) if g is not None]
        position, orientation = _group(groups, "PlanePositionSequence"), _group(groups, "PlaneOrientationSequence")
        measures, segment = _group(groups, "PixelMeasuresSequence"), _group(groups, "SegmentIdentificationSequence")
        if any(x is None for x in (position, orientation, measures, segment)):
            raise DataError(f"frame {f + 1} has no plane position, orientation, pixel spacing or segment number", path)
        source = _group(groups, "DerivationImageSequence")
        source = _first(source.get("SourceImageSequence")) if source is not None else None
        if source is not None and str(source.ReferencedSOPInstanceUID) not in instances:
            raise DataError(f"frame {f + 1} refers to image {source.ReferencedSOPInstanceUID}, which is not in the "
                            f"series in {reference_series_folder}", path)
        index = _frame_voxels(position.ImagePositionPatient, orientation.ImageOrientationPatient,
                              measures.PixelSpacing, pixels.shape[1], pixels.shape[2], reference.affine,
                              reference.shape)
        if index is None:
            raise DataError(f"frame {f + 1} does not lie on the grid of the series in {reference_series_folder}", path)
        number = int(segment.ReferencedSegmentNumber)
        if number not in value_of:
            raise DataError(f"frame {f + 1} refers to segment {number}, which the file does not describe", path)
        mask = pixels[f] != 0
        i, j, k = (a[mask] for a in index)
        clash = (owner[i, j, k] != 0) & (owner[i, j, k] != number)
        if clash.any():
            raise DataError(f"segments {int(owner[i, j, k][clash][0])} and {number} overlap; one label per voxel "
                            "cannot hold both", path)
        owner[i, j, k] = number
        out[i, j, k] = value_of[number]
    return out
