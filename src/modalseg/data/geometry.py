"""Voxel orientation and grids: one canonical voxel order for slicing, and every modality (and label) on its
master's grid.

Why: the networks are 2D and slice along an *array* axis (``PreprocessConfig.slice_axis``). Files store the
same anatomy in any voxel order (RAS NIfTI, LPS NRRD, a sagittally stored series, a z-flipped DICOM read), so
slicing the stored array would cut different planes, flipped or transposed, for the same anatomy. Hence:

* **Canonical orientation** (:func:`to_canonical`): every volume is brought to the voxel order closest to RAS
  (nibabel's ``as_closest_canonical``: array axis 0 runs towards Right, 1 towards Anterior, 2 towards Superior)
  by an axis permutation and flips only -- no interpolation, every voxel value is kept. Axis 2 of the
  canonical array is then the axial axis, 1 the coronal one, 0 the sagittal one, for every file. For a file
  already in that order it is the identity and the very same :class:`Volume` is returned. The canonical
  Volume's affine maps the reoriented indices to the same world points, so its ``spacing`` follows the
  permutation (Hausdorff distances, pixel sizes and slice thicknesses stay in the right mm).
  :class:`Reorientation` maps arrays (also with leading channel axes) there and back, so predictions return to
  the input file's own voxel order exactly.
* **One grid per case** (:func:`onto_grid`): an assistant modality (or a label) whose shape, spacing or
  orientation differs from its master's (beyond the tolerances of :func:`modalseg.data.verify.geometry_problems`)
  is put on the master's grid by physical (world) coordinates: by a pure reorientation when both are the same
  grid in another voxel order, else resampled with SimpleITK, linear for images and nearest neighbour for
  labels. Points of the master's grid outside the other volume's extent are filled with that volume's minimum
  (images) or with background (labels). A volume that covers no part of the master's field of view is refused;
  ``strict=True`` refuses any difference, as before resampling existed. Geometry that already agrees takes a
  fast path: nothing is resampled and the array is returned untouched (origins of modalities are not compared
  on that path, as before: registration is the user's job).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from modalseg.data.types import Volume
from modalseg.errors import DataError

#: Axis codes of the canonical voxel order (see the module docstring).
CANONICAL = "RAS"
#: Anatomical plane of the slices taken along each canonical axis.
PLANES = ("sagittal", "coronal", "axial")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def axcodes(affine: np.ndarray) -> str:
    """Axis codes of a voxel-to-RAS affine, e.g. ``"LPS"`` (nibabel's nearest-axis convention)."""
    from nibabel.orientations import aff2axcodes

    return "".join(str(c) for c in aff2axcodes(np.asarray(affine, dtype=np.float64)))


# ------------------------------------------------------------------------------------------------ comparison
def fmt_tuple(values: tuple, spec: str = ".4g") -> str:
    return "(" + ", ".join(format(v, spec) for v in values) + ")"


def _direction(volume: Volume) -> np.ndarray:
    m = np.asarray(volume.affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    norms[norms == 0] = 1.0
    return m / norms


# A label (or a prediction) must lie on its image's (reference's) voxel grid: origins (affine translations,
# RAS mm) further apart than half the smallest voxel size put every voxel on another one's neighbour.
ORIGIN_TOL_VOXELS = 0.5


def origin_problem(vol: Volume, ref: Volume, what: str, ref_name: str, tol_voxels: float) -> str | None:
    """``vol``'s origin against ``ref``'s: a problem when they are more than ``tol_voxels`` of ``ref``'s
    smallest voxel size apart (Euclidean distance of the affine translations, in mm)."""
    o = np.asarray(vol.affine, dtype=np.float64)[:3, 3] + 0.0  # + 0.0: no "-0" in the message
    o0 = np.asarray(ref.affine, dtype=np.float64)[:3, 3] + 0.0
    shift = float(np.linalg.norm(o - o0))
    limit = tol_voxels * min(ref.spacing)
    if not shift > limit:
        return None
    how = "half a voxel" if tol_voxels == 0.5 else f"{tol_voxels:g} voxel(s)"
    return (
        f"{vol.path}: {what} origin {fmt_tuple(tuple(o))} differs from {ref_name} {ref.path} "
        f"{fmt_tuple(tuple(o0))} by {shift:.3g} mm (more than {how})"
    )


def geometry_problems(
    vol: Volume,
    ref: Volume,
    what: str,
    ref_name: str,
    *,
    spacing_tol: float = 1e-3,
    direction_tol: float = 1e-3,
    origin_tol_voxels: float | None = None,
) -> list[str]:
    """``"PATH: problem"`` lines for a shape, spacing or orientation difference of ``vol`` from ``ref``.

    One check for every command that compares grids (``modalseg verify``, the training cache, ``predict``,
    ``evaluate``, :func:`onto_grid`), so that they refuse what verify refuses. With ``origin_tol_voxels`` (e.g.
    :data:`ORIGIN_TOL_VOXELS`), origins further apart than that many of ``ref``'s smallest voxel size are a
    problem too: for a label against its image and a prediction against its reference, never between
    modalities (whose registration is the user's job).
    """
    out = []
    if vol.shape != ref.shape:
        out.append(f"{vol.path}: {what} shape {vol.shape} differs from {ref_name} {ref.path} {ref.shape}")
    sp, sp0 = np.asarray(vol.spacing), np.asarray(ref.spacing)
    if np.any(np.abs(sp - sp0) > spacing_tol * np.maximum(np.abs(sp0), 1e-12)):
        out.append(
            f"{vol.path}: {what} spacing {fmt_tuple(tuple(sp))} differs from {ref_name} {ref.path} "
            f"{fmt_tuple(tuple(sp0))}"
        )
    d, d0 = _direction(vol), _direction(ref)
    diff = float(np.max(np.abs(d - d0)))
    if diff > direction_tol:
        codes, codes0 = axcodes(vol.affine), axcodes(ref.affine)
        if codes != codes0:
            detail, detail0 = codes, codes0
        else:  # same nearest axes: an oblique difference, show the cosines
            detail = fmt_tuple(tuple(np.round(d, 4).ravel()), ".4g")
            detail0 = fmt_tuple(tuple(np.round(d0, 4).ravel()), ".4g")
        out.append(
            f"{vol.path}: {what} orientation {detail} differs from {ref_name} {ref.path} {detail0} "
            f"(direction cosines differ by up to {diff:.3g})"
        )
    if origin_tol_voxels is not None:
        problem = origin_problem(vol, ref, what, ref_name, origin_tol_voxels)
        if problem:
            out.append(problem)
    return out


# ------------------------------------------------------------------------------------------------ orientation
@dataclass(frozen=True)
class Reorientation:
    """The permutation/flip from a file's voxel order to the canonical one (and back).

    ``perm[i]`` is the canonical axis of stored axis ``i``; ``flips[i]`` whether stored axis ``i`` is reversed.
    Arrays may carry leading axes (channels, classes): only the last three are moved.
    """

    perm: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    file_shape: tuple[int, int, int]
    file_codes: str = CANONICAL

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flips)

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        shape = [0, 0, 0]
        for i, j in enumerate(self.perm):
            shape[j] = self.file_shape[i]
        return tuple(shape)  # type: ignore[return-value]

    def stored_axis(self, canonical_axis: int) -> int:
        """The stored array axis that becomes ``canonical_axis`` (e.g. which stored axis is sliced)."""
        return self.perm.index(int(canonical_axis))

    def _check(self, array: np.ndarray, shape: tuple[int, int, int], what: str) -> int:
        lead = array.ndim - 3
        if lead < 0 or tuple(array.shape[lead:]) != tuple(shape):
            raise ValueError(f"{what} array of shape {array.shape} does not end with {shape}")
        return lead

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Stored voxel order -> canonical voxel order (the array itself when the identity)."""
        arr = np.asarray(array)
        lead = self._check(arr, self.file_shape, "stored")
        if self.is_identity:
            return arr
        index = [slice(None)] * arr.ndim
        for i, flip in enumerate(self.flips):
            if flip:
                index[lead + i] = slice(None, None, -1)
        inverse = np.argsort(self.perm)
        axes = [*range(lead), *(lead + int(inverse[j]) for j in range(3))]
        return np.ascontiguousarray(np.transpose(arr[tuple(index)], axes))

    def invert(self, array: np.ndarray) -> np.ndarray:
        """Canonical voxel order -> the file's stored voxel order (exact inverse of :meth:`apply`)."""
        arr = np.asarray(array)
        lead = self._check(arr, self.canonical_shape, "canonical")
        if self.is_identity:
            return arr
        axes = [*range(lead), *(lead + self.perm[i] for i in range(3))]
        out = np.transpose(arr, axes)
        index = [slice(None)] * arr.ndim
        for i, flip in enumerate(self.flips):
            if flip:
                index[lead + i] = slice(None, None, -1)
        return np.ascontiguousarray(out[tuple(index)])


def reorientation_of(volume: Volume) -> Reorientation:
    """The :class:`Reorientation` that brings ``volume`` to the voxel order closest to RAS."""
    return reorientation_for(volume.affine, volume.shape, volume.path)


def reorientation_for(affine: np.ndarray, shape: Sequence[int], path: object = None) -> Reorientation:
    """The :class:`Reorientation` of a grid of ``shape`` (3 sizes) with ``affine`` (e.g. from a file's header
    alone); :class:`DataError` naming ``path`` when an axis has no anatomical direction."""
    from nibabel.orientations import io_orientation

    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    if not np.isfinite(ornt).all():  # degenerate affines are refused when read; never guess an axis here
        raise DataError(f"cannot tell the anatomical direction of every voxel axis (affine "
                        f"{np.asarray(affine).tolist()})", path)
    perm = tuple(int(v) for v in ornt[:, 0])
    flips = tuple(bool(v < 0) for v in ornt[:, 1])
    return Reorientation(perm, flips, tuple(int(s) for s in shape), axcodes(affine))  # type: ignore[arg-type]


def to_canonical(volume: Volume) -> tuple[Volume, Reorientation]:
    """``volume`` in the voxel order closest to RAS (permutation/flips only) and the mapping used.

    The result's affine is correct for the reoriented array (same world point for every voxel), so its
    ``spacing`` follows the permutation. Its ``meta`` is empty: write outputs with the *input* Volume after
    :meth:`Reorientation.invert`. A volume already in canonical order is returned as it is.
    """
    reo = reorientation_of(volume)
    if reo.is_identity:
        return volume, reo
    affine = canonical_affine(volume.affine, reo)
    return Volume(array=reo.apply(volume.array), affine=affine, path=volume.path, meta={}), reo


def canonical_affine(affine: np.ndarray, reo: Reorientation) -> np.ndarray:
    """The affine of the array ``reo.apply`` gives (same world point per voxel): what :func:`to_canonical` attaches,
    for callers that reorient arrays without building a Volume (the ``ToCanonical`` transform)."""
    from nibabel.orientations import inv_ornt_aff

    if reo.is_identity:
        return np.asarray(affine, dtype=np.float64)
    ornt = np.column_stack([np.asarray(reo.perm, dtype=float), np.where(reo.flips, -1.0, 1.0)])
    return np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(ornt, reo.file_shape)


# ------------------------------------------------------------------------------------------------ resampling
def _itk_geometry(affine: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """RAS affine -> ITK (LPS) origin, spacing, direction (row-major, unit columns)."""
    a = np.asarray(affine, dtype=np.float64)
    lps = _LPS_TO_RAS @ a[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    direction = lps / spacing
    origin = _LPS_TO_RAS @ a[:3, 3]
    return [float(v) for v in origin], [float(v) for v in spacing], [float(v) for v in direction.ravel()]


def _to_sitk(array: np.ndarray, affine: np.ndarray):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    origin, spacing, direction = _itk_geometry(affine)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    return img


def _resample(array: np.ndarray, affine: np.ndarray, ref: Volume, *, nearest: bool, pixel_type,
              default: float) -> np.ndarray:
    """``array`` (on ``affine``'s grid) sampled at every voxel centre of ``ref``; ``default`` outside its extent."""
    import SimpleITK as sitk

    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in ref.shape])
    origin, spacing, direction = _itk_geometry(ref.affine)
    f.SetOutputOrigin(origin)
    f.SetOutputSpacing(spacing)
    f.SetOutputDirection(direction)
    f.SetInterpolator(sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear)
    f.SetDefaultPixelValue(float(default))
    f.SetOutputPixelType(pixel_type)
    out = f.Execute(_to_sitk(array, affine))
    return np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0)))


def resample_onto(vol: Volume, ref: Volume, *, kind: str = "image", fill: float | None = None
                  ) -> tuple[np.ndarray, float]:
    """``vol``'s data on ``ref``'s grid by world coordinates, and the fraction of ``ref``'s voxels it covers.

    Images: linear interpolation, float32, outside filled with ``fill`` (default: ``vol``'s minimum, i.e.
    "nothing there" for MR/CT intensities). Labels: nearest neighbour, int32, outside ``fill`` (default 0,
    background); label values are never mixed.
    """
    import SimpleITK as sitk

    if kind not in ("image", "label"):
        raise ValueError(f"kind must be 'image' or 'label', not {kind!r}")
    if kind == "label":  # nearest neighbour on int32: values are copied, never mixed
        out = _resample(np.asarray(vol.array, dtype=np.int32), vol.affine, ref, nearest=True,
                        pixel_type=sitk.sitkInt32, default=0 if fill is None else fill)
        return out, grid_coverage(vol, ref)
    # images: NaN marks the outside (NaN voxels are refused before), then becomes the fill value
    out = _resample(np.asarray(vol.array, dtype=np.float32), vol.affine, ref, nearest=False,
                    pixel_type=sitk.sitkFloat32, default=float("nan"))
    inside = np.isfinite(out)
    coverage = float(inside.mean()) if out.size else 0.0
    out[~inside] = float(np.min(vol.array)) if fill is None else fill
    return out, coverage


def grid_coverage(vol: Volume, ref: Volume) -> float:
    """Fraction of ``ref``'s voxel centres that lie inside ``vol``'s extent (what resampling would fill)."""
    import SimpleITK as sitk

    ones = np.ones(vol.shape, dtype=np.uint8)
    out = _resample(ones, vol.affine, ref, nearest=True, pixel_type=sitk.sitkUInt8, default=0)
    return float(out.mean()) if out.size else 0.0


def _dims(values: Sequence[float]) -> str:
    return "x".join(format(float(v), "g") for v in values)


def describe_grids(vol: Volume, ref: Volume) -> str:
    """``shape 20x20x4 -> 16x16x2, spacing 0.6x0.6x1.5 -> 0.8x0.8x3 mm[, orientation LAS -> RAS]``."""
    text = (f"shape {_dims(vol.shape)} -> {_dims(ref.shape)}, "
            f"spacing {_dims(np.round(vol.spacing, 4))} -> {_dims(np.round(ref.spacing, 4))} mm")
    codes, ref_codes = axcodes(vol.affine), axcodes(ref.affine)
    if codes != ref_codes:
        text += f", orientation {codes} -> {ref_codes}"
    return text


def no_overlap_message(name: str, grid: str, ref: Volume) -> str:
    """The refusal of a volume outside its master's field of view (``grid``: "T1C's", "the image's")."""
    return f"{name} covers no part of {grid} field of view ({ref.path})"


def same_grid_in_other_order(vol: Volume, ref: Volume, *, spacing_tol: float = 1e-3,
                             direction_tol: float = 1e-3) -> Reorientation | None:
    """When ``vol`` is ``ref``'s grid stored in another voxel order (e.g. a z-flipped DICOM read), the
    reorientation of ``ref``: then ``ref_reo.invert(to_canonical(vol)[0].array)`` is ``vol`` on ``ref``'s grid
    without interpolation. Origins must agree within half a voxel (a flip moves the origin)."""
    cv, _ = to_canonical(vol)
    cr, rr = to_canonical(ref)
    problems = geometry_problems(cv, cr, "", "", spacing_tol=spacing_tol, direction_tol=direction_tol,
                                 origin_tol_voxels=ORIGIN_TOL_VOXELS)
    return None if problems else rr


def onto_grid(vol: Volume, ref: Volume, **options: Any) -> tuple[Volume, str | None]:
    """``vol`` on ``ref``'s grid, and one line saying what was done (``None`` on the fast path).

    Fast path (shape, spacing and orientation within the tolerances of ``geometry_problems``): ``vol`` itself.
    Else, unless ``strict`` (which raises today's refusal): the same grid in another voxel order is reoriented
    exactly, any other grid is resampled (:func:`resample_onto`). With ``origin_tol_voxels`` (labels), an
    origin further off on the fast path is refused, as ``modalseg verify`` does. A ``vol`` that covers no part
    of ``ref`` raises :class:`DataError` (one line naming ``vol``'s file). ``grid_name`` names ``ref``'s grid in
    the line (default ``"<ref_name>'s"``). The keyword options are :func:`onto_grid_how`'s (``name`` and
    ``ref_name`` required); an unknown one is a ``TypeError`` there, never ignored.
    """
    out, note, _ = onto_grid_how(vol, ref, **options)
    return out, note


def onto_grid_how(
    vol: Volume, ref: Volume, *, name: str, ref_name: str, kind: str = "image", strict: bool = False,
    case: str | None = None, fill: float | None = None, origin_tol_voxels: float | None = None,
    grid_name: str | None = None, spacing_tol: float = 1e-3, direction_tol: float = 1e-3,
) -> tuple[Volume, str | None, str]:
    """:func:`onto_grid` plus how it mapped (``"same"``, ``"reoriented"`` or ``"resampled"``), which the
    ``OntoGrid`` transform records to map a result on ``ref``'s grid back onto ``vol``'s."""
    problems = geometry_problems(vol, ref, name, ref_name, spacing_tol=spacing_tol, direction_tol=direction_tol)
    if not problems or strict:
        if origin_tol_voxels is not None:
            off = origin_problem(vol, ref, name, ref_name, origin_tol_voxels)
            problems = problems + [off] if off else problems
        if problems:
            raise DataError(problems[0])
        return vol, None, "same"
    prefix = f"case {case}: " if case else ""
    grid = grid_name or f"{ref_name}'s"
    ref_reo = same_grid_in_other_order(vol, ref, spacing_tol=spacing_tol, direction_tol=direction_tol)
    if ref_reo is not None:
        array = ref_reo.invert(to_canonical(vol)[0].array)
        how = "reoriented"
        note = (f"{prefix}{name} reoriented onto {grid} grid (voxel order {axcodes(vol.affine)} -> "
                f"{axcodes(ref.affine)}, no interpolation)")
    else:
        array, coverage = resample_onto(vol, ref, kind=kind, fill=fill)
        if coverage == 0.0:
            raise DataError(no_overlap_message(name, grid, ref), vol.path)
        how = "resampled"
        interp = "nearest neighbour" if kind == "label" else "linear"
        note = f"{prefix}{name} resampled ({interp}) onto {grid} grid ({describe_grids(vol, ref)})"
        if coverage < 1.0:
            filled = float(fill) if fill is not None else (float(np.min(vol.array)) if kind == "image" else 0.0)
            note += f"; it covers {100 * coverage:.3g}% of {grid} field of view, the rest is {filled:g}"
    return Volume(array=array, affine=np.array(ref.affine, dtype=np.float64), path=vol.path, meta={}), note, how
