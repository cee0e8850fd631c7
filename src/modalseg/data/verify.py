"""Dataset integrity check: every file of a :class:`DatasetSpec` is read once and checked.

Training on a dataset with a misaligned modality, a label file of the wrong size or a stray label
value fails late (or, worse, silently learns the wrong thing). :func:`verify_dataset` reads every
declared file once and collects *all* problems, each as ``"PATH: problem"``, so that a user can fix
them in one pass:

* a declared file (modality image or training label) is missing or unreadable;
* within a paired case, a modality that covers no part of channel 0's field of view (``strict``: whose
  shape, spacing (relative tolerance) or orientation (direction cosines, absolute tolerance) differs at all);
* a label that covers no part of its image, or that lies on its image's grid (same shape, spacing and
  orientation) with an origin more than half the image's smallest voxel size off (:data:`ORIGIN_TOL_VOXELS`);
  ``strict``: any shape, spacing, orientation or origin difference;
* label values outside the declared values and ``labels_to_background``;
* NaN/inf voxels; a constant (empty) image.

Warnings (not problems): spacing anisotropy above ``max_anisotropy``, origins of paired modalities
that differ by more than half a voxel, declared classes that no label file contains, a modality or label on
another grid than its master image (training and predict resample it, :mod:`modalseg.data.geometry`), and
cases stored in different voxel orientations (all are brought to RAS before slicing). The summary gives each
case's orientation and which stored array axis the slices are taken along.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modalseg.data.geometry import (
    CANONICAL,
    ORIGIN_TOL_VOXELS,
    PLANES,
    axcodes,
    describe_grids,
    fmt_tuple,
    geometry_problems,
    grid_coverage,
    no_overlap_message,
    origin_problem,
    reorientation_of,
    same_grid_in_other_order,
)
from modalseg.data.io import read_volume
from modalseg.data.types import DatasetSpec, Volume
from modalseg.errors import DataError


@dataclass
class VerifyReport:
    """Result of :func:`verify_dataset`. ``problems`` make the dataset unusable; ``warnings`` do not."""

    num_cases: int
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    modalities: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    shape_min: tuple[int, ...] | None = None
    shape_max: tuple[int, ...] | None = None
    spacing_min: tuple[float, ...] | None = None
    spacing_max: tuple[float, ...] | None = None
    label_values: list[int] = field(default_factory=list)
    cases_per_modality: dict[str, int] = field(default_factory=dict)
    #: case id -> axis codes of its (master) image as stored, e.g. "LPS"
    orientations: dict[str, str] = field(default_factory=dict)
    #: case id -> the stored array axis that becomes the slice axis once the case is brought to RAS
    stored_slice_axes: dict[str, int] = field(default_factory=dict)
    slice_axis: int = 2

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary_lines(self) -> list[str]:
        """Human-readable summary (used by ``modalseg verify``)."""

        def fmt(values: tuple | None, spec: str) -> str:
            return "?" if values is None else "(" + ", ".join(format(v, spec) for v in values) + ")"

        lines = [f"cases: {self.num_cases}"]
        if self.cases_per_modality:
            per = ", ".join(f"{m} {n}" for m, n in self.cases_per_modality.items())
            lines.append(f"modalities: {', '.join(self.modalities)} (unpaired: {per})")
        else:
            lines.append(f"modalities: {', '.join(self.modalities)} (paired)")
        lines.append(f"classes: {len(self.class_names)} ({', '.join(self.class_names)})")
        lines.append(f"shape: {fmt(self.shape_min, 'd')} .. {fmt(self.shape_max, 'd')}")
        lines.append(f"spacing (mm): {fmt(self.spacing_min, '.4g')} .. {fmt(self.spacing_max, '.4g')}")
        if self.label_values:
            lines.append(f"label values found: {', '.join(str(v) for v in self.label_values)}")
        lines += self.orientation_lines()
        return lines

    def orientation_lines(self) -> list[str]:
        """One line per (orientation, stored slice axis) group, naming its cases (the first 10 of a group)."""
        if not self.orientations:
            return []
        plane = PLANES[self.slice_axis]
        lines = [f"orientation (shape and spacing above are in {CANONICAL} voxel order; every case is brought to "
                 f"{CANONICAL} before slicing along axis {self.slice_axis}, {plane}):"]
        groups: dict[tuple[str, int], list[str]] = {}
        for case, codes in self.orientations.items():
            groups.setdefault((codes, self.stored_slice_axes.get(case, self.slice_axis)), []).append(case)
        for (codes, axis), cases in sorted(groups.items(), key=lambda item: -len(item[1])):
            shown = ", ".join(cases[:10]) + (f", ... ({len(cases) - 10} more)" if len(cases) > 10 else "")
            lines.append(f"  {codes}: {len(cases)} case(s), {plane} slices along stored axis {axis}: {shown}")
        return lines


def _grid_note(vol: Volume, ref: Volume, what: str, ref_name: str, grid: str, how: str) -> tuple[str, bool]:
    """(line, usable) for ``vol`` on another grid than ``ref``: what training and predict will do with it, or
    (the refusal, False) when it covers no part of ``ref``."""
    if same_grid_in_other_order(vol, ref) is not None:
        return (f"{vol.path}: {what} is on the grid of {ref_name} {ref.path} stored in voxel order "
                f"{axcodes(vol.affine)} instead of {axcodes(ref.affine)}; it will be reoriented onto {grid} grid (no "
                "interpolation)", True)
    coverage = grid_coverage(vol, ref)
    if coverage == 0.0:
        return f"{vol.path}: {no_overlap_message(what, grid, ref)}", False
    return (f"{vol.path}: {what} is on another grid than {ref_name} {ref.path} ({describe_grids(vol, ref)}); it "
            f"will be resampled ({how}) onto {grid} grid (covering {100 * coverage:.3g}% of it)", True)


def _read(path: Path, kind: str, problems: list[str], what: str) -> Volume | None:
    if not path.exists():
        problems.append(f"{path}: {what} file not found")
        return None
    try:
        return read_volume(path, kind=kind)
    except DataError as err:
        problems.append(str(err))
        return None


def verify_dataset(
    spec: DatasetSpec,
    *,
    spacing_tol: float = 1e-3,
    direction_tol: float = 1e-3,
    max_anisotropy: float = 20.0,
    strict: bool = False,
    slice_axis: int | None = None,
) -> VerifyReport:
    """Read every file of ``spec`` once and collect all problems and warnings (see module docstring).

    ``spacing_tol`` is relative (``|s - s0| <= tol * s0`` per axis); ``direction_tol`` is absolute on the
    direction cosines (unit columns of the affine). ``strict`` makes any grid difference between a case's files
    a problem (training and predict with ``strict`` refuse it; otherwise they resample). ``slice_axis`` (of the
    RAS voxel order) is only reported; default: that of the dataset's preset, 1 (coronal) for MM-WHS, else 2
    (axial).
    """
    if slice_axis is None:
        slice_axis = 1 if spec.layout == "mmwhs" else 2
    tolerances = {"spacing_tol": spacing_tol, "direction_tol": direction_tol}
    report = VerifyReport(
        num_cases=len(spec.cases), modalities=list(spec.modalities), class_names=spec.class_names,
        slice_axis=int(slice_axis),
    )
    if not spec.paired:
        report.cases_per_modality = {m: len(spec.cases_of(m)) for m in spec.modalities}
    if not spec.cases:
        report.problems.append(f"{spec.root}: no cases found ({spec.layout} layout)")
        return report
    problems, warnings = report.problems, report.warnings
    allowed = set(spec.label_lut())  # classes, labels_to_background, region values and nnU-Net's ignore label
    allowed_text = ", ".join(str(v) for v in sorted(allowed))
    found_values: set[int] = set()
    shapes: list[tuple[int, ...]] = []
    spacings: list[tuple[float, ...]] = []

    for case in spec.cases:
        names = [case.modality] if not spec.paired and case.modality else list(spec.modalities)
        if spec.paired and len(case.images) != len(spec.modalities):
            problems.append(
                f"{spec.root}: case {case.case_id} has {len(case.images)} image(s), expected "
                f"{len(spec.modalities)} ({', '.join(spec.modalities)})"
            )
        ref: Volume | None = None
        for index, path in enumerate(case.images):
            name = names[index] if index < len(names) else f"channel {index}"
            # an ImageRef (channel of a 4D file) is a Path already; Path(ref) would drop its channel
            vol = _read(path if isinstance(path, Path) else Path(path), "image", problems,
                        f"{name} image of case {case.case_id}:")
            if vol is None:
                continue
            _check_intensities(vol, problems)
            if index == 0:
                ref = vol
                reo = reorientation_of(vol)
                report.orientations[case.case_id] = reo.file_codes
                report.stored_slice_axes[case.case_id] = reo.stored_axis(slice_axis)
                canonical_spacing = tuple(vol.spacing[reo.stored_axis(a)] for a in range(3))
                shapes.append(reo.canonical_shape)
                spacings.append(canonical_spacing)
                sp = np.asarray(vol.spacing)
                if sp.min() > 0 and sp.max() / sp.min() > max_anisotropy:
                    warnings.append(
                        f"{vol.path}: spacing {fmt_tuple(vol.spacing)} is anisotropic "
                        f"(ratio {sp.max() / sp.min():.1f} > {max_anisotropy:g})"
                    )
            elif ref is not None:
                differences = geometry_problems(vol, ref, name, f"{names[0]}", **tolerances)
                if differences and strict:
                    problems.extend(differences)
                    continue
                if differences:
                    line, usable = _grid_note(vol, ref, name, names[0], f"{names[0]}'s", "linear")
                    (warnings if usable else problems).append(line)
                    continue
                shift = float(np.linalg.norm(vol.affine[:3, 3] - ref.affine[:3, 3]))
                if shift > 0.5 * min(ref.spacing):
                    warnings.append(
                        f"{vol.path}: origin differs from {ref.path} by {shift:.3g} mm "
                        "(more than half a voxel)"
                    )
        if case.label is None:
            continue
        label = _read(Path(case.label), "label", problems, f"label of training case {case.case_id}:")
        if label is None:
            continue
        if ref is not None:
            differences = geometry_problems(label, ref, "label", "image", **tolerances)
            if strict or not differences:
                off = origin_problem(label, ref, "label", "image", ORIGIN_TOL_VOXELS)
                problems.extend(differences + [off] if off else differences)
            else:
                line, usable = _grid_note(label, ref, "label", "image", "the image's", "nearest neighbour")
                (warnings if usable else problems).append(line)
        values = {int(v) for v in np.unique(label.array)}
        found_values |= values
        unexpected = sorted(values - allowed)
        if unexpected:
            problems.append(
                f"{label.path}: unexpected label values {', '.join(map(str, unexpected))} "
                f"(declared: {allowed_text})"
            )

    if shapes:
        arr = np.asarray([s for s in shapes if len(s) == len(shapes[0])])
        report.shape_min = tuple(int(v) for v in arr.min(axis=0))
        report.shape_max = tuple(int(v) for v in arr.max(axis=0))
        sp_arr = np.asarray(spacings)
        report.spacing_min = tuple(float(v) for v in sp_arr.min(axis=0))
        report.spacing_max = tuple(float(v) for v in sp_arr.max(axis=0))
    report.label_values = sorted(found_values)
    kinds: dict[str, int] = {}
    for codes in report.orientations.values():
        kinds[codes] = kinds.get(codes, 0) + 1
    if len(kinds) > 1:
        listed = ", ".join(f"{codes} ({n})" for codes, n in sorted(kinds.items(), key=lambda item: -item[1]))
        warnings.append(
            f"{spec.root}: {len(kinds)} orientations among {len(report.orientations)} cases: {listed}; "
            f"all are brought to {CANONICAL} before slicing"
        )
    if found_values:
        for cname, value in list(spec.labels.items())[1:]:
            if value not in found_values:
                warnings.append(f"{spec.root}: class {cname!r} (value {value}) appears in no label file")
    return report


def _check_intensities(vol: Volume, problems: list[str]) -> None:
    arr = vol.array
    finite = np.isfinite(arr)
    bad = int(arr.size - np.count_nonzero(finite))
    if bad:
        problems.append(f"{vol.path}: {bad} NaN/inf voxel(s)")
        if bad == arr.size:
            return
        arr = arr[finite]
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        problems.append(f"{vol.path}: constant image (every voxel is {lo:g})")


def intensity_problems(vol: Volume) -> list[str]:
    """``"PATH: problem"`` lines for NaN/inf voxels or a constant image (as :func:`verify_dataset`)."""
    problems: list[str] = []
    _check_intensities(vol, problems)
    return problems


def check_dataset(spec: DatasetSpec, **kwargs) -> VerifyReport:
    """:func:`verify_dataset`, raising :class:`DataError` with the first problem if there is any."""
    report = verify_dataset(spec, **kwargs)
    if report.problems:
        more = len(report.problems) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise DataError(report.problems[0] + suffix)
    return report
