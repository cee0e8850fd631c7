"""Read and write image volumes with their geometry (NIfTI via nibabel, NRRD/MetaImage via SimpleITK).

Conventions (see :class:`modalseg.data.types.Volume`):

* ``array`` is in the file's voxel order (i, j, k), i.e. nibabel's order. SimpleITK's
  ``GetArrayFromImage`` returns (z, y, x); it is transposed to (x, y, z) here so that every format
  gives the same array for the same image.
* ``affine`` maps voxel indices to RAS+ world coordinates in mm. ITK geometry is LPS, so the affine
  built from SimpleITK's origin/spacing/direction has its first two rows negated.
* ``meta`` keeps what :func:`write_volume` needs to reproduce the source geometry exactly:
  ``format`` ("nifti" or "itk"), and the NIfTI header (``header``, ``qform_code``, ``sform_code``)
  or the ITK ``origin``, ``spacing`` and ``direction`` (3D, row-major 3x3).

``kind="image"`` gives float32 (NIfTI ``scl_slope``/``scl_inter`` applied); ``kind="label"`` gives
int32 and rejects files whose values are not integers. A file whose geometry is unusable is refused
(:func:`affine_problem`): a voxel size of 0 or a non-finite one (NIfTI ``pixdim`` or affine), and a
sheared grid, i.e. voxel axes that are not orthogonal (|cosine| between two axes above
:data:`ORTHOGONALITY_TOL`). Oblique but orthogonal grids are ordinary scanner data and are accepted.
nibabel's header fix-up messages (``logging``) and warnings are silenced while reading, so that a refused
file gives one line and an accepted one none. 2D files become one slice ``(X, Y, 1)`` and remember it
(``meta["ndim"] == 2``), so that :func:`write_volume` writes a result of a 2D input as a 2D file again; trailing
singleton dimensions beyond the third are squeezed.

Every consumer expects one 3D volume per image, so two more kinds of input are named by the path itself:

* **4D files** (Decathlon / BraTS: ``X x Y x Z x C``, one channel per modality): an :class:`ImageRef` (a ``Path``
  with ``channel=k``) or ``read_volume(path, channel=k)`` reads channel ``k``; a 4D file read without a channel
  is an error, as before.
* **DICOM series**: a folder holding a series is read with SimpleITK's GDCM series reader (slices sorted by
  position, geometry from ImagePositionPatient / ImageOrientationPatient, LPS -> RAS as for NRRD); ``meta`` is
  ITK-style, so results are written as NIfTI (the default for DICOM inputs, :func:`output_ending_for`) or NRRD
  with the series' geometry. Several series in one folder: the one whose SeriesDescription contains the wanted
  modality (``ImageRef(series=...)``, else the folder's name) is read; otherwise the folder is refused with a
  line listing its series. Unevenly spaced or duplicate slice positions are refused (a missing slice).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modalseg.data.types import Volume
from modalseg.errors import DataError, OutputError
from modalseg.utils.atomic import atomic_path, make_temp_folder

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
ITK_EXTENSIONS = (".nrrd", ".nhdr", ".mha", ".mhd")
# Longest first so that ".nii.gz" wins over ".nii"-like matches.
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_DETACHED = (".nhdr", ".mhd")  # header + separate data file
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_F32_MAX = float(np.finfo(np.float32).max)
# Largest |cosine| accepted between two voxel axes (unit columns of the affine). Orthogonal oblique data
# deviates by float32 rounding of the NIfTI sform (~1e-7) or the decimals of DICOM ImageOrientationPatient
# (~1e-6); 1e-4 (0.006 degrees from a right angle) keeps a wide margin above that and refuses any real shear
# (gantry tilt, hand-edited or resampled affines), which ITK-based viewers would show in another orientation.
ORTHOGONALITY_TOL = 1e-4


def _extension(path: str | Path) -> str | None:
    name = str(path).lower()
    for ext in SUPPORTED_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return None


def strip_extension(name: str | Path) -> str:
    """``"case_0000.nii.gz"`` -> ``"case_0000"``. Only a supported extension (or, failing that, the
    last suffix) is removed, so dots inside a case identifier survive."""
    text = str(name)
    ext = _extension(text)
    if ext is not None:
        return text[: -len(ext)]
    suffix = Path(text).suffix
    return text[: -len(suffix)] if suffix else text


def is_supported(path: str | Path) -> bool:
    """Whether ``path`` has one of :data:`SUPPORTED_EXTENSIONS` (case-insensitive). A pure name check: a DICOM
    series is a folder, see :func:`is_dicom_series`."""
    return _extension(path) is not None


def output_ending_for(path: str | Path) -> str:
    """The file ending a result of input ``path`` is written with by default: the input's own format (``.nrrd``
    gives ``.nrrd``), and ``.nii.gz`` for a DICOM series (modalseg writes no DICOM) or anything else."""
    ext = _extension(path)
    return ext if ext is not None and not Path(path).is_dir() else ".nii.gz"


class ImageRef(type(Path())):  # type: ignore[misc]
    """A path plus which image inside it: channel ``k`` of a 4D file, or the DICOM series of a modality when one
    folder holds several. It is a ``Path`` so that code which only lists, stats or names input files (verify,
    the slice cache's fingerprint, predict's output checks) needs no change; :func:`read_volume` reads the part it
    names. Paths derived from it (``parent``, ``resolve()``) and ``Path(ref)`` carry no channel or series."""

    channel: int | None = None
    series: str | None = None

    @classmethod
    def make(cls, path: str | Path, *, channel: int | None = None, series: str | None = None) -> ImageRef:
        ref = cls(os.fspath(path))
        ref.channel = None if channel is None else int(channel)
        ref.series = series
        return ref

    def __reduce__(self):  # keep channel/series through pickling (worker processes)
        return (_image_ref, (os.fspath(self), self.channel, self.series))

    def __repr__(self) -> str:
        parts = (("channel", self.channel), ("series", self.series))
        extra = "".join(f", {k}={v!r}" for k, v in parts if v is not None)
        return f"ImageRef({os.fspath(self)!r}{extra})"

    def describe(self) -> str:
        """``file.nii.gz (channel 2)``: for messages (``str(ref)`` stays the plain path)."""
        if self.channel is not None:
            return f"{os.fspath(self)} (channel {self.channel})"
        return f"{os.fspath(self)} (series {self.series!r})" if self.series else os.fspath(self)


def _image_ref(path: str, channel: int | None, series: str | None) -> ImageRef:
    return ImageRef.make(path, channel=channel, series=series)


# ----------------------------------------------------------------------------------------------------
# DICOM series
# ----------------------------------------------------------------------------------------------------

_DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")


def _is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file ('DICM' at byte 128) or one named ``*.dcm``/``*.ima``."""
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_series(path: str | Path) -> bool:
    """Whether ``path`` is a folder that directly holds DICOM files (what :func:`read_volume` reads as a series)."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    try:
        return any(
            not f.name.startswith(".") and f.is_file() and _is_dicom_file(f) for f in sorted(folder.iterdir())
        )
    except OSError:
        return False


@dataclass(frozen=True)
class DicomSeries:
    """One series of a DICOM folder: SeriesInstanceUID, SeriesDescription ('' if absent), files by slice position."""

    uid: str
    description: str
    files: tuple[str, ...]


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """ITK/GDCM warnings go straight to stderr; problems that matter are raised as :class:`DataError`."""
    import SimpleITK as sitk

    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)


def _dicom_tag(file: str, tag: str) -> str:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
        return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""
    except (RuntimeError, UnicodeDecodeError):
        return ""


def dicom_series(folder: str | Path) -> list[DicomSeries]:
    """The DICOM series directly in ``folder``, largest first (GDCM groups files by SeriesInstanceUID and sorts each
    series by slice position). Raises :class:`DataError` when GDCM cannot scan the folder."""
    import SimpleITK as sitk

    folder = Path(folder)
    try:
        with _quiet_itk():
            ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
            out = []
            for uid in ids:
                files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
                if files:
                    out.append(DicomSeries(uid, _dicom_tag(files[0], "0008|103e"), files))
    except RuntimeError as exc:
        raise _corrupt(folder, _itk_message(exc)) from None
    # GDCM's order follows the UIDs; messages list the largest series first, then by description
    return sorted(out, key=lambda s: (-len(s.files), s.description.casefold(), s.uid))


def _squash(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", text.casefold())


def _describes(description: str, modality: str) -> bool:
    """SeriesDescription names the modality: case-insensitive substring, spaces and punctuation ignored."""
    want = _squash(modality)
    return bool(want) and want in _squash(description)


def _series_listing(series: Sequence[DicomSeries]) -> str:
    return ", ".join(
        f"{s.description or '(no description)'!r} ({len(s.files)}{' files' if i == 0 else ''})"
        for i, s in enumerate(series)
    )


def choose_series(folder: Path, series: Sequence[DicomSeries], want: str | None) -> DicomSeries:
    """The series to read: the only one, else the one whose description names ``want`` (a modality, or the folder's
    name); a tie is broken by a description whose words are exactly ``want``'s. Refused with the list otherwise."""
    if not series:
        raise DataError("no DICOM series that GDCM can read in this folder", folder)
    if len(series) == 1:
        return series[0]
    matches = [s for s in series if want and _describes(s.description, want)]
    if len(matches) > 1:
        words = re.split(r"[^0-9a-z]+", (want or "").casefold())
        exact = [s for s in matches if re.split(r"[^0-9a-z]+", s.description.casefold()) == words]
        matches = exact if len(exact) == 1 else matches
    if len(matches) == 1:
        return matches[0]
    why = ""
    if want:
        why = f"; {len(matches)} are described as {want!r}" if matches else f"; none is described as {want!r}"
    raise DataError(
        f"{len(series)} DICOM series in one folder: {_series_listing(series)}{why}; put one series per folder or "
        "name the folder after the modality",
        folder,
    )


def _read_dicom(folder: Path, want: str | None) -> tuple[np.ndarray, np.ndarray, dict]:
    import SimpleITK as sitk

    series = dicom_series(folder)
    try:
        chosen = choose_series(folder, series, want or folder.name)
    except DataError as first:
        if not want or _squash(want) == _squash(folder.name):
            raise
        try:  # the modality's name describes no series uniquely: the folder's own name may (``t1_post/``)
            chosen = choose_series(folder, series, folder.name)
        except DataError:
            raise first from None
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(chosen.files))
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with _quiet_itk():
            img = reader.Execute()
            data = sitk.GetArrayFromImage(img)
    except RuntimeError as exc:
        raise _corrupt(folder, _itk_message(exc)) from None
    _check_slice_positions(folder, reader, chosen, img)
    data, affine, meta = _from_sitk(img, data, folder)
    meta.update(source="dicom", series=chosen.description)
    return data, affine, meta


def _check_slice_positions(folder: Path, reader, chosen: DicomSeries, img) -> None:
    """Refuse slices that are not evenly spaced along the slice normal: ITK takes the spacing from the first two
    positions, so a missing or duplicated slice would silently give a wrong geometry."""
    n = len(chosen.files)
    if n < 3:
        return
    try:
        positions = np.array(
            [[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)], dtype=np.float64
        )
    except (RuntimeError, ValueError):
        return  # no ImagePositionPatient: nothing to check against
    if positions.shape != (n, 3):
        return
    normal = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    gaps = np.diff(positions @ normal)
    mean = float(np.mean(gaps))
    worst = int(np.argmax(np.abs(gaps - mean)))
    if abs(mean) < 1e-6 or abs(float(gaps[worst]) - mean) > 0.01 * abs(mean):
        a, b = Path(chosen.files[worst]).name, Path(chosen.files[worst + 1]).name
        raise DataError(
            f"DICOM series {chosen.description!r}: slices are not evenly spaced ({abs(float(gaps[worst])):.4g} mm "
            f"between {a} and {b}, {abs(mean):.4g} mm on average; a missing or duplicate slice?)",
            folder,
        )


# ----------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------


def read_volume(
    path: str | Path, *, kind: str = "image", channel: int | None = None, series: str | None = None
) -> Volume:
    """Read one 3D volume (``kind`` "image" -> float32, "label" -> int32) with its RAS affine.

    ``path`` is an image file, a folder holding a DICOM series, or an :class:`ImageRef`; ``channel`` (default: the
    ref's) reads one channel of a 4D file, ``series`` (default: the ref's, else the folder name) picks the DICOM
    series by its description. Raises :class:`DataError` (one line naming the file) for a missing, unsupported,
    corrupt, empty, 4D (without a channel) or, for labels, non-integer file.
    """
    if kind not in ("image", "label"):
        raise ValueError(f"kind must be 'image' or 'label', not {kind!r}")
    if channel is None:
        channel = getattr(path, "channel", None)
    if series is None:
        series = getattr(path, "series", None)
    path = Path(path)
    ext = _extension(path)
    if path.is_dir():
        if not is_dicom_series(path):
            raise DataError(
                "a folder with no DICOM files in it (an image is a file, or a folder holding one DICOM series)", path
            )
        if channel is not None:
            raise DataError(f"a DICOM series has one channel; channel {channel} requested", path)
        data, affine, meta = _read_dicom(path, series)
        selected = False
    elif ext is None:
        if path.is_file() and _is_dicom_file(path):
            raise DataError(
                "unsupported file type: one DICOM file; give the folder holding its series (supported: "
                f"{', '.join(SUPPORTED_EXTENSIONS)}, or a folder holding a DICOM series)",
                path,
            )
        if not path.exists() and not path.suffix:
            raise DataError("not found (no image file or DICOM folder of that name)", path)
        raise DataError(
            f"unsupported file type (supported: {', '.join(SUPPORTED_EXTENSIONS)}, or a folder holding a DICOM "
            "series)",
            path,
        )
    elif not path.exists():
        raise DataError("file not found", path)
    elif not path.is_file():
        raise DataError("not a file", path)
    elif ext in NIFTI_EXTENSIONS:
        data, affine, meta, selected = _read_nifti(path, kind, channel)
    else:
        data, affine, meta = _read_itk(path)
        selected = False
    ndim = data.ndim
    if channel is not None and not selected:
        data = _select_channel(data, channel, path)
    elif channel is None:
        data = _to_3d(data, path)
    if data.size == 0:
        raise DataError(f"zero-size volume (shape {tuple(data.shape)})", path)
    array = _convert(data, kind, path)
    problem = affine_problem(affine)
    if problem:
        raise DataError(problem, path)
    meta["ndim"] = 2 if ndim == 2 else 3
    if channel is not None:
        meta["channel"] = int(channel)
    return Volume(array=array, affine=affine, path=path, meta=meta)


def header_shape(path: str | Path) -> tuple[int, ...] | None:
    """An image file's voxel grid read from its header only (trailing singleton dimensions beyond the third
    dropped), e.g. ``(240, 240, 155, 4)`` for a BraTS file; ``None`` for a folder or a file whose header cannot be
    read (:func:`read_volume` then says why)."""
    path = Path(path)
    ext = _extension(path)
    if ext is None or not path.is_file():
        return None
    try:
        if ext in NIFTI_EXTENSIONS:
            import nibabel as nib

            with _quiet_nibabel():
                shape = tuple(int(v) for v in nib.load(str(path)).shape)
        else:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            with _quiet_itk():
                reader.ReadImageInformation()
            shape = tuple(int(v) for v in reader.GetSize())
    except Exception:  # noqa: BLE001 - only a hint; read_volume reports the real problem
        return None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def nifti_header_grid(path: str | Path) -> tuple[tuple[int, int, int], np.ndarray] | None:
    """(first three sizes, affine) of a NIfTI file from its header alone; ``None`` for other formats, folders and
    unreadable headers (:func:`read_volume` then says why)."""
    path = Path(path)
    if _extension(path) not in NIFTI_EXTENSIONS or not path.is_file():
        return None
    try:
        import nibabel as nib

        with _quiet_nibabel():
            img = nib.load(str(path))
            shape = tuple(int(v) for v in (*img.shape[:3], 1, 1)[:3])
            return shape, np.asarray(img.affine, dtype=np.float64)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - only a hint
        return None


def _select_channel(data: np.ndarray, channel: int, path: Path) -> np.ndarray:
    """Channel ``channel`` of a 4D ``(X, Y, Z, C)`` array; refuses a 2D/3D file or a missing channel."""
    shape = tuple(data.shape)
    while data.ndim > 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 4:
        raise DataError(
            f"{len(shape)}D image (shape {shape}) where a 4D file with one channel per modality is expected "
            f"(channel {channel} requested)",
            path,
        )
    if not 0 <= channel < data.shape[3]:
        raise DataError(f"4D image (shape {shape}) has {data.shape[3]} channel(s); channel {channel} requested", path)
    return np.ascontiguousarray(data[..., channel])


def affine_problem(affine: np.ndarray, tol: float = ORTHOGONALITY_TOL) -> str | None:
    """Why a voxel-to-world ``affine`` is unusable, or ``None``: non-finite entries, a voxel size of 0, or
    voxel axes that are not orthogonal (largest |cosine| between two unit columns above ``tol``)."""
    a = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(a[:3]).all():
        return f"non-finite values in the voxel-to-world affine {_fmt(a[:3].ravel())}"
    m = a[:3, :3]
    sizes = np.linalg.norm(m, axis=0)
    if np.any(sizes == 0):
        axis = int(np.flatnonzero(sizes == 0)[0])
        return f"voxel size 0 along array axis {axis} in the voxel-to-world affine (voxel sizes {_fmt(sizes)} mm)"
    unit = m / sizes
    gram = np.abs(unit.T @ unit)
    np.fill_diagonal(gram, 0.0)
    worst = float(gram.max())
    if worst > tol:
        i, j = (int(v) for v in np.unravel_index(int(np.argmax(gram)), gram.shape))
        angle = float(np.degrees(np.arccos(np.clip(float(unit[:, i] @ unit[:, j]), -1.0, 1.0))))
        return (
            f"sheared (non-orthogonal) voxel axes: array axes {min(i, j)} and {max(i, j)} are at {angle:.4g} "
            f"degrees, not 90 (|cosine| {worst:.2g} > {tol:g}); resample it onto an orthogonal grid"
        )
    return None


def _fmt(values) -> str:
    return "(" + ", ".join(format(float(v), ".4g") for v in values) + ")"


@contextlib.contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """Silence nibabel while it reads: header fix-ups are logged on the ``nibabel.global`` logger (with its
    own stderr handler) and numpy/nibabel warnings go through :mod:`warnings`. Problems that matter are
    checked and raised as :class:`DataError` instead."""
    from nibabel import imageglobals

    logger = imageglobals.logger if isinstance(imageglobals.logger, logging.Logger) else None
    disabled = logger.disabled if logger is not None else False
    if logger is not None:
        logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if logger is not None:
            logger.disabled = disabled


def _corrupt(path: Path, exc: BaseException) -> DataError:
    detail = str(exc).splitlines()[0].strip() if str(exc).strip() else type(exc).__name__
    # SimpleITK messages are long multi-line ITK exception dumps; keep the last informative part.
    if len(detail) > 160:
        detail = detail[:157] + "..."
    return DataError(f"cannot read (truncated or corrupt file: {detail})", path)


def _read_nifti(path: Path, kind: str, channel: int | None = None) -> tuple[np.ndarray, np.ndarray, dict, bool]:
    """(data, affine, meta, whether ``channel`` was already selected). One channel of a 4D file is read through
    nibabel's array proxy, so the other channels are never converted."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    selected = False
    try:
        with _quiet_nibabel():
            img = nib.load(str(path))
            if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
                raise DataError(f"not a NIfTI file ({type(img).__name__})", path)
            _check_pixdim(path, type(img.header))
            if channel is not None and len(img.shape) == 4 and 0 <= channel < img.shape[3]:
                data = np.asanyarray(img.dataobj[..., channel])  # scl_slope/scl_inter applied
                affine, header, selected = np.asarray(img.affine, dtype=np.float64), img.header.copy(), True
            else:
                data, affine, header = _nifti_contents(img, kind, path)
    except DataError:
        raise
    except (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError) as exc:
        if path.name.lower().endswith(".gz") and not _has_gzip_magic(path):
            # A plain .nii (or another format) saved under a .gz name: say so rather than "corrupt".
            raise DataError(
                "named .gz but not gzip-compressed (wrong file extension? an uncompressed NIfTI is .nii)", path
            ) from None
        raise _corrupt(path, exc) from None
    qform_code = int(header["qform_code"])
    sform_code = int(header["sform_code"])
    meta = {"format": "nifti", "header": header, "qform_code": qform_code, "sform_code": sform_code}
    return data, affine, meta, selected


def _check_pixdim(path: Path, header_class) -> None:
    """Refuse a voxel size of 0 or a non-finite one in the header's ``pixdim`` (for the dimensions the file
    has). nibabel silently replaces 0 by 1 mm while loading, so the header is re-read unchecked; ITK-based
    tools take the voxel size from ``pixdim`` whatever the sform says."""
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as fh:
        raw = header_class.from_fileobj(fh, check=False)
    n = min(max(int(raw["dim"][0]), 1), 3)
    sizes = np.asarray(raw["pixdim"], dtype=np.float64)[1 : n + 1]
    bad = ~np.isfinite(sizes) | (sizes == 0)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"voxel size {sizes[k]:g} along array axis {k} in the NIfTI header (pixdim[1:{n + 1}] = {_fmt(sizes)})",
            path,
        )


def _nifti_contents(img, kind: str, path: Path) -> tuple[np.ndarray, np.ndarray, object]:
    if kind == "image":
        # get_fdata applies scl_slope/scl_inter; float32 is enough for intensities and safe for
        # every integer type up to 2**24 (larger values are rounded, never wrapped).
        data = _fdata(img, path)
    else:
        data = np.asanyarray(img.dataobj)  # scaled only if the header asks for it
    return data, np.asarray(img.affine, dtype=np.float64), img.header.copy()


def _has_gzip_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(2) == b"\x1f\x8b"
    except OSError:
        return True  # unreadable: let the caller report the original error


def _fdata(img, path: Path) -> np.ndarray:
    raw_dtype = img.get_data_dtype()
    if np.issubdtype(raw_dtype, np.floating) and raw_dtype.itemsize > 4:
        data = img.get_fdata(dtype=np.float64)
        _check_float32_range(data, path)
        return data.astype(np.float32)
    return img.get_fdata(dtype=np.float32)


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    import SimpleITK as sitk

    try:
        with _quiet_itk():
            img = sitk.ReadImage(str(path))
            data = sitk.GetArrayFromImage(img)
    except RuntimeError as exc:
        text = str(exc)
        # ITK refuses these while building the image; they are geometry problems, not corruption.
        if "Zero-valued spacing" in text:
            raise DataError("voxel size 0 in the file header (zero-valued spacing)", path) from None
        if "determinant is 0" in text:
            raise DataError("degenerate voxel axes in the file header (direction matrix with determinant 0)",
                            path) from None
        raise _corrupt(path, _itk_message(exc)) from None
    return _from_sitk(img, data, path)


def _from_sitk(img, data: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """SimpleITK image + its array -> (x, y, z, ...) array, RAS affine and ITK meta (3D, padded for 2D)."""
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{img.GetNumberOfComponentsPerPixel()}-component (vector/RGB) image where a scalar volume "
            "is expected",
            path,
        )
    dim = img.GetDimension()
    # GetArrayFromImage is (..., z, y, x): reverse the axes to (x, y, z, ...).
    data = np.ascontiguousarray(np.transpose(data, tuple(range(data.ndim - 1, -1, -1))))
    spacing = np.ones(3)
    origin = np.zeros(3)
    direction = np.eye(3)
    n = min(dim, 3)
    spacing[:n] = img.GetSpacing()[:n]
    origin[:n] = img.GetOrigin()[:n]
    full_dir = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)
    direction[:n, :n] = full_dir[:n, :n]
    affine = _affine_from_itk(origin, spacing, direction)
    meta = {
        "format": "itk",
        "origin": tuple(float(v) for v in origin),
        "spacing": tuple(float(v) for v in spacing),
        "direction": tuple(float(v) for v in direction.ravel()),
        "pixel_type": img.GetPixelIDTypeAsString(),
    }
    return data, affine, meta


def _itk_message(exc: RuntimeError) -> Exception:
    """The informative line of an ITK exception dump (skipping the source location and a stale errno)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception thrown", "Reason:"))]
    text = useful[-1] if useful else "SimpleITK could not read the file"
    text = re.sub(r"^ITK ERROR: \w+\(0x[0-9a-fA-F]+\): ", "", text)
    return RuntimeError(text)


def _affine_from_itk(origin: np.ndarray, spacing: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """ITK (LPS) origin/spacing/direction -> 4x4 RAS affine."""
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ (direction @ np.diag(spacing))
    affine[:3, 3] = _LPS_TO_RAS @ origin
    return affine


def _itk_from_affine(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4x4 RAS affine -> ITK (LPS) origin, spacing, direction (columns normalised)."""
    lps = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    if np.any(spacing == 0):
        raise ValueError(f"degenerate affine (zero-length column): {affine.tolist()}")
    direction = lps / spacing
    origin = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)[:3, 3]
    return origin, spacing, direction


def _to_3d(data: np.ndarray, path: Path) -> np.ndarray:
    if data.ndim < 2:
        raise DataError(f"{data.ndim}D data (shape {tuple(data.shape)}) where a 3D volume is expected", path)
    if data.ndim == 2:
        return data[:, :, np.newaxis]
    shape = tuple(data.shape)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise DataError(f"{len(shape)}D image (shape {shape}) where a 3D volume is expected", path)
    return data


def _check_float32_range(data: np.ndarray, path: Path) -> None:
    finite = data[np.isfinite(data)]
    if finite.size and float(np.abs(finite).max()) > _F32_MAX:
        raise DataError("intensities exceed the float32 range", path)


def _convert(data: np.ndarray, kind: str, path: Path) -> np.ndarray:
    data = np.asarray(data)
    if kind == "image":
        if data.dtype == np.float32:
            return np.ascontiguousarray(data)
        if data.dtype.kind == "b":
            return data.astype(np.float32)
        if data.dtype.kind == "f" and data.dtype.itemsize > 4:
            _check_float32_range(data, path)
        if data.dtype.kind not in "biuf":
            raise DataError(f"unsupported voxel type {data.dtype}", path)
        # Converting from the integer value itself (not a wrapped intermediate) can never overflow.
        return data.astype(np.float32)
    # labels
    if data.dtype.kind == "b":
        return data.astype(np.int32)
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            raise DataError(f"label file has {int((~finite).sum())} NaN/inf voxels", path)
        frac = data != np.round(data)
        if frac.any():
            examples = ", ".join(f"{v:g}" for v in np.unique(data[frac])[:3])
            raise DataError(f"label file has non-integer values (e.g. {examples})", path)
    elif data.dtype.kind not in "iu":
        raise DataError(f"unsupported voxel type {data.dtype} for a label file", path)
    info = np.iinfo(np.int32)
    lo, hi = data.min(), data.max()
    if lo < info.min or hi > info.max:
        raise DataError(f"label values out of the int32 range ({lo}..{hi})", path)
    return data.astype(np.int32)


# ----------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------


def _default_dtype(array: np.ndarray) -> np.dtype:
    """Smallest safe on-disk type: integer data (labels) -> uint8 / int16 / int32 as the values fit;
    bool -> uint8; float16 -> float32; other floats unchanged."""
    if array.dtype.kind == "b":
        return np.dtype(np.uint8)
    if array.dtype.kind in "iu":
        if array.size == 0:
            return np.dtype(np.uint8)
        lo, hi = int(array.min()), int(array.max())
        for cand in (np.uint8, np.int16, np.int32):
            info = np.iinfo(cand)
            if info.min <= lo and hi <= info.max:
                return np.dtype(cand)
        return np.dtype(np.int64)
    if array.dtype.kind == "f":
        return np.dtype(np.float32) if array.dtype.itemsize < 4 else array.dtype
    raise ValueError(f"cannot write arrays of type {array.dtype}")


def _cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast without silent wrap-around or truncation (ValueError instead)."""
    if array.dtype == dtype:
        return array
    if dtype.kind in "iu":
        if array.dtype.kind == "f":
            if not np.isfinite(array).all() or np.any(array != np.round(array)):
                raise ValueError(f"cannot write non-integer values as {dtype}")
        if array.size:
            info = np.iinfo(dtype)
            lo, hi = array.min(), array.max()
            if lo < info.min or hi > info.max:
                raise ValueError(f"values {lo}..{hi} do not fit in {dtype}")
    return array.astype(dtype)


def write_volume(path: str | Path, array: np.ndarray, reference: Volume, *, dtype=None) -> None:
    """Write ``array`` with ``reference``'s geometry; the format follows ``path``'s extension.

    A reference read from a 2D file (``meta["ndim"] == 2``) gives a 2D file again (as NRRD/MetaImage only where its
    geometry lies in the x-y plane, else a one-slice 3D file).

    The output is written atomically. A NIfTI output keeps the reference header's qform/sform codes (a
    reference from NRRD/MetaImage gets code 1, scanner); an NRRD/MetaImage output reuses the reference's
    ITK origin/spacing/direction when it has them, else derives them from the affine. ``dtype=None``
    picks the smallest safe type (labels: uint8, then int16, ...); no intensity scaling is written.

    Raises ``ValueError`` for a shape mismatch or values that do not fit ``dtype`` (programming errors),
    :class:`OutputError` for an unsupported extension or an unwritable location.
    """
    path = Path(path)
    array = np.asarray(array)
    if tuple(array.shape) != tuple(reference.array.shape):
        raise ValueError(f"array shape {tuple(array.shape)} differs from the reference {reference.shape}")
    ext = _extension(path)
    if ext is None:
        raise OutputError(
            f"unsupported output file type (supported: {', '.join(SUPPORTED_EXTENSIONS)})", path
        )
    out_dtype = np.dtype(dtype) if dtype is not None else _default_dtype(array)
    data = _cast(array, out_dtype)
    # A reference read from a 2D file gives a 2D file again (same 2D origin, spacing and direction).
    two_d = (reference.meta or {}).get("ndim") == 2 and data.ndim == 3 and data.shape[2] == 1
    if ext in NIFTI_EXTENSIONS:
        _write_nifti(path, data[:, :, 0] if two_d else data, reference)
    else:
        _write_itk(path, data, reference, ext, two_d)


def _write_nifti(path: Path, data: np.ndarray, reference: Volume) -> None:
    import nibabel as nib

    affine = np.asarray(reference.affine, dtype=np.float64)
    meta = reference.meta or {}
    if meta.get("format") == "nifti" and meta.get("header") is not None:
        header = meta["header"].copy()
        qcode, scode = int(meta.get("qform_code", 1)), int(meta.get("sform_code", 1))
    else:
        header, qcode, scode = None, 1, 1
    if isinstance(header, nib.Nifti2Header):
        img = nib.Nifti2Image(data, affine, header=header)
    else:
        img = nib.Nifti1Image(data, affine, header=header)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(np.nan, np.nan)  # data are written as they are, never rescaled
    img.header["cal_min"], img.header["cal_max"] = 0, 0
    if qcode == 0 and scode == 0:
        # The reference had no orientation (fallback affine from pixdim): keep it that way.
        img.set_qform(affine, code=0)
        img.set_sform(affine, code=0)
        img.header.set_zooms(reference.spacing[: len(img.header.get_zooms())])
    else:
        img.set_qform(affine, code=qcode)
        img.set_sform(affine, code=scode)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def _write_itk(path: Path, data: np.ndarray, reference: Volume, ext: str, two_d: bool = False) -> None:
    import SimpleITK as sitk

    meta = reference.meta or {}
    if meta.get("format") == "itk" and {"origin", "spacing", "direction"} <= set(meta):
        origin = np.asarray(meta["origin"], dtype=np.float64)
        spacing = np.asarray(meta["spacing"], dtype=np.float64)
        direction = np.asarray(meta["direction"], dtype=np.float64).reshape(3, 3)
    else:
        origin, spacing, direction = _itk_from_affine(reference.affine)
    # A 2D ITK image has no third axis: only an in-plane geometry (z origin 0, no tilt out of the plane) fits it.
    in_plane = origin[2] == 0 and not direction[2, :2].any() and not direction[:2, 2].any()
    if two_d and in_plane:
        img = sitk.GetImageFromArray(np.ascontiguousarray(data[:, :, 0].T))
        origin, spacing, direction = origin[:2], spacing[:2], direction[:2, :2]
    else:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetSpacing(tuple(float(v) for v in spacing))
    img.SetDirection(tuple(float(v) for v in direction.ravel()))
    try:
        if ext in _DETACHED:
            _write_detached(path, img)
        else:
            with atomic_path(path) as tmp:
                sitk.WriteImage(img, str(tmp), True)
    except RuntimeError as exc:
        raise OutputError(f"cannot write ({_itk_message(exc)})", path) from None


def _write_detached(path: Path, img) -> None:
    """Header + data file (.nhdr/.mhd): the header names its data file, so write both under their
    final names in a private temporary folder, then move the data file and finally the header."""
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    # named after this host and process, so a killed writer's folder is removed by the next write (atomic.py)
    tmpdir = make_temp_folder(path.parent)
    try:
        sitk.WriteImage(img, str(tmpdir / path.name), True)
        produced = sorted(tmpdir.iterdir(), key=lambda p: p.name == path.name)  # header last
        for item in produced:
            with open(item, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
