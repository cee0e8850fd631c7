"""Write a dataset in the nnU-Net raw layout, atomically.

Layout (Medical Segmentation Decathlon / nnU-Net v2 raw)::

    out_dir/dataset.json
    out_dir/imagesTr/<case>_<channel:04d>.nii.gz
    out_dir/labelsTr/<case>.nii.gz

Why the care: a crash half-way must never leave something that looks like a complete dataset.
``dataset.json`` is written last, so a partial folder has none. When ``out_dir`` does not exist (or is
replaced with ``overwrite=True``) everything is built in a hidden sibling folder that is renamed to
``out_dir`` only at the end, so ``out_dir`` appears complete or not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from modalseg.errors import OutputError
from modalseg.utils.atomic import atomic_path, atomic_write_text

# What an nnU-Net raw dataset folder may hold; anything else makes us refuse to delete it.
_DATASET_ENTRIES = {"dataset.json", "imagesTr", "labelsTr", "imagesTs", "labelsTs", "splits_final.json"}


def centred_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """Axis-aligned RAS+ affine with voxel size ``spacing`` (mm) whose volume centre is at world (0, 0, 0)."""
    affine = np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
    centre = (np.asarray(shape, dtype=float) - 1.0) / 2.0
    affine[:3, 3] = -centre * np.asarray(spacing, dtype=float)
    return affine


def save_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Save ``array`` as NIfTI-1 through an atomic temporary file.

    The array's dtype is kept (float32 images, uint8/uint16 labels); units are mm, qform and sform are
    both set to the affine (code 1, scanner) so every reader agrees on the geometry. nibabel writes
    ``.nii.gz`` with a deterministic gzip header (no time stamp), so equal arrays give equal bytes.
    """
    path = Path(path)
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


class RawDatasetWriter:
    """Writes the files of one nnU-Net raw dataset into ``root`` (a staging folder or the target)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.images_dir = self.root / "imagesTr"
        self.labels_dir = self.root / "labelsTr"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.labels_dir.mkdir(parents=True, exist_ok=True)
        self.file_ending = ".nii.gz"
        self.dataset_json: dict | None = None
        self.written: list[Path] = []

    def write_image(self, case_id: str, channel: int, array: np.ndarray, affine: np.ndarray) -> Path:
        path = self.images_dir / f"{case_id}_{channel:04d}{self.file_ending}"
        self.written.append(save_nifti(path, array, affine))
        return path

    def write_label(self, case_id: str, array: np.ndarray, affine: np.ndarray) -> Path:
        path = self.labels_dir / f"{case_id}{self.file_ending}"
        self.written.append(save_nifti(path, array, affine))
        return path

    def set_dataset_json(self, content: dict) -> None:
        """Remember ``dataset.json``; it is written when the dataset is finished, never before."""
        self.dataset_json = content

    def _finish(self) -> None:
        if self.dataset_json is None:
            raise RuntimeError("dataset.json was never set")
        text = json.dumps(self.dataset_json, indent=2, sort_keys=False) + "\n"
        atomic_write_text(self.root / "dataset.json", text)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to delete a folder that does not look like a dataset (protects a mistyped --output)."""
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in _DATASET_ENTRIES)
    if foreign:
        shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise OutputError(
            f"refusing to overwrite: the folder holds files that are not part of a dataset ({shown})",
            out_dir,
        )


@contextlib.contextmanager
def raw_dataset_writer(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[RawDatasetWriter]:
    """Context manager that yields a :class:`RawDatasetWriter` and publishes the dataset on success.

    * ``out_dir`` missing: build in a hidden sibling temp folder, write ``dataset.json``, rename.
    * ``out_dir`` an empty folder: write in place, ``dataset.json`` last.
    * ``out_dir`` non-empty: :class:`OutputError` unless ``overwrite``; with ``overwrite`` the new
      dataset is built beside it and swapped in, and only then is the old one removed.

    On any exception the staging folder is removed and ``out_dir`` is left as it was.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError("exists and is not a folder", out_dir)
    in_place = _is_empty_dir(out_dir)
    if out_dir.is_dir() and not in_place:
        if not overwrite:
            raise OutputError("folder is not empty; choose another --output or pass --overwrite", out_dir)
        _check_replaceable(out_dir)

    parent = out_dir.parent
    if in_place:
        stage = out_dir
    else:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=parent))
        except OSError as exc:
            raise OutputError(f"cannot create folder ({exc.strerror or exc})", parent) from None

    try:
        writer = RawDatasetWriter(stage)
        yield writer
        writer._finish()
    except BaseException:
        if not in_place:
            shutil.rmtree(stage, ignore_errors=True)
        else:  # leave the (empty) target empty again
            for child in stage.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise

    if in_place:
        return
    try:
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=parent))
            os.replace(out_dir, old)  # replaces the empty temp dir 'old' (POSIX rename onto empty dir)
            os.replace(stage, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out_dir)
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise OutputError(
            f"cannot move the finished dataset into place ({exc.strerror or exc})", out_dir
        ) from None


# --------------------------------------------------------------------------------------------------
# Image-formation helpers shared by the breast and cardiac generators.
# --------------------------------------------------------------------------------------------------


def case_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """An independent NumPy Generator per (seed, stream, case index).

    Each case has its own stream, so case ``i`` is identical whatever the number of cases, and the
    streams of different modalities (unpaired data) never share draws.
    """
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream), int(index)]))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to zero mean and unit standard deviation (float64)."""
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="reflect")
    field -= field.mean()
    std = field.std()
    return field / std if std > 0 else field


def bias_field(rng: np.random.Generator, shape: tuple[int, int, int], amplitude: float) -> np.ndarray:
    """Smooth multiplicative field ``exp(amplitude * f)``, f a random low-order polynomial in x, y, z.

    Mimics coil-sensitivity shading (MR intensity non-uniformity); values stay within about
    ``exp(+-amplitude)``.
    """
    axes = [np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    terms = [x, y, x * y, x * x, y * y, z, x * z, y * z]
    coeff = rng.uniform(-1.0, 1.0, size=len(terms))
    coeff[5:] *= 0.3  # weaker variation across slices than within a slice
    field = sum(c * t for c, t in zip(coeff, terms, strict=True))
    peak = np.abs(field).max()
    if peak > 0:
        field = field / peak
    return np.exp(amplitude * field)


def rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise on both channels: the Rician MR noise model.

    Air becomes Rayleigh-distributed, bright tissue nearly Gaussian, as in magnitude MR images.
    """
    real = signal + rng.normal(0.0, sigma, size=signal.shape)
    imag = rng.normal(0.0, sigma, size=signal.shape)
    return np.sqrt(real * real + imag * imag)
