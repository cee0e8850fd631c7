"""Geometry that must not be trusted silently (issue 11, items 11, 12 and 13a), through the real CLI.

* A label whose origin is off its image's (same shape, spacing and direction), or a prediction off its
  reference's, by more than half a voxel is refused by ``verify``, ``train`` and ``evaluate``; modalities whose
  origins differ stay a *warning* in ``verify`` (registration is the user's job).
* A voxel size of 0 (NIfTI ``pixdim`` or affine) and sheared (non-orthogonal) voxel axes (NIfTI sform, NRRD
  space directions, MetaImage TransformMatrix) are refused when read, with one line and no nibabel chatter;
  oblique but orthogonal grids are accepted.
* ``evaluate`` skips probability maps (``CASE_prob_<class>`` beside ``CASE``) and says how many; a case that is
  merely *named* ``a_prob_x`` is evaluated; two files for one case id are refused.

Every refusal: exit code 2, exactly one stderr line naming the file and the problem, no traceback, nothing
written. Volumes are 16x16x2, models tiny (unet, base width 4, one step).
"""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from modalseg.data.io import read_volume, write_volume
from modalseg.data.types import Volume

AFF = np.diag([0.8, 0.8, 3.0, 1.0])
SHAPE = (16, 16, 2)


# ------------------------------------------------------------------------------------------------ helpers
from test_reliability import _img, _lab, assert_refused, make_dataset, run_cli  # noqa: E402
from test_reliability import train_args as _train_args  # noqa: E402


def _label_array(value=1) -> np.ndarray:
    arr = np.zeros(SHAPE, np.uint8)
    arr[4:10, 5:11, :] = value
    return arr


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return _train_args(data, out, "--set", "max_steps=1", *extra)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _shifted(dx: float, base=AFF) -> np.ndarray:
    affine = np.array(base, dtype=np.float64)
    affine[:3, 3] += [dx, 0.0, 0.0]
    return affine


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _oblique(origin=(-12.5, 40.0, 7.25)) -> np.ndarray:
    """An oblique scanner grid: rotated about all three axes (orthogonal), anisotropic voxels, an origin."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(0.35, -0.6, 0.9) @ np.diag([0.8, 0.8, 3.0])
    affine[:3, 3] = origin
    return affine


SHEAR = np.array([[0.8, 0.3, 0.0, 0.0], [0.0, 0.8, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def _raw_nifti(path: Path, pixdim=(0.8, 0.0, 3.0), array=None) -> Path:
    """A NIfTI whose orientation comes from ``pixdim`` alone (qform/sform codes 0), as written by tools that
    store no orientation; nibabel keeps the header as given when no affine is passed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        array = np.random.default_rng(7).normal(100, 20, size=SHAPE).astype(np.float32)
    img = nib.Nifti1Image(array, None)
    img.header["pixdim"][1:4] = pixdim
    nib.save(img, str(path))
    return path


def _itk_sheared(path: Path, array: np.ndarray) -> Path:
    """An NRRD/MetaImage file with a sheared direction (the ITK formats store any 3x3 direction)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    img.SetSpacing((0.8, 0.8, 3.0))
    img.SetDirection((1.0, 0.3, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path))
    return path


def _evaluate(capsys, pred: Path, ref: Path, out: Path, *extra: str):
    return run_cli(capsys, ["evaluate", "--pred", str(pred), "--labels", str(ref), "--output", str(out), *extra])


def _eval_folders(tmp_path: Path, cases=("c0", "c1")) -> tuple[Path, Path]:
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    for case in cases:
        _lab(ref / f"{case}.nii.gz")
        _lab(pred / f"{case}.nii.gz")
    return pred, ref


def _metric_cases(out: Path) -> set[str]:
    with open(out / "metrics.csv", newline="") as fh:
        return {row["case_id"] for row in csv.DictReader(fh)}


# ------------------------------------------------------------------------------ item 11: origins
def test_verify_refuses_label_off_its_image(tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds")
    bad = _lab(ds / "labelsTr" / "c1.nii.gz", affine=_shifted(40.0))
    image = ds / "imagesTr" / "c1_0000.nii.gz"
    code, out, err = run_cli(capsys, ["verify", str(ds)])
    line = assert_refused(code, err, bad, f"label origin (40, 0, 0) differs from image {image} (0, 0, 0) by 40 mm "
                                          "(more than half a voxel)")
    assert line == (f"{bad}: label origin (40, 0, 0) differs from image {image} (0, 0, 0) by 40 mm "
                    "(more than half a voxel)")
    assert "OK" not in out.split()


def test_train_refuses_label_off_its_image_and_writes_nothing(tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds")
    bad = _lab(ds / "labelsTr" / "c2.nii.gz", affine=_shifted(40.0))
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, train_args(ds, out))
    line = assert_refused(code, err, bad, "label origin (40, 0, 0) differs from image",
                          str(ds / "imagesTr" / "c2_0000.nii.gz"), "by 40 mm (more than half a voxel)")
    assert line.startswith("modalseg train: error: ")
    assert not out.exists()
    assert files_under(tmp_path / ".modalseg_cache") == []


def test_evaluate_refuses_prediction_off_its_reference(tmp_path, capsys):
    """Today this scores Dice 1.0, HD 0 mm: the masks are equal voxel for voxel, 40 mm apart in the world."""
    pred, ref = _eval_folders(tmp_path)
    bad = _lab(pred / "c1.nii.gz", affine=_shifted(40.0))
    out = tmp_path / "out"
    code, _, err = _evaluate(capsys, pred, ref, out)
    assert_refused(code, err, bad, f"prediction origin (40, 0, 0) differs from reference {ref / 'c1.nii.gz'} "
                                   "(0, 0, 0) by 40 mm (more than half a voxel)")
    assert files_under(out) == []


def test_origin_within_half_a_voxel_is_accepted_and_modality_origins_stay_a_warning(tmp_path, capsys):
    """0.3 mm < half of the 0.8 mm voxel: a label and a prediction that close are on the grid (rounding of
    real headers). A modality 40 mm off channel 0 is only a warning in verify, as before."""
    ds = make_dataset(tmp_path / "ds")
    _lab(ds / "labelsTr" / "c1.nii.gz", affine=_shifted(0.3))
    moved = _img(ds / "imagesTr" / "c2_0001.nii.gz", seed=12, affine=_shifted(40.0))
    code, out, err = run_cli(capsys, ["verify", str(ds)])
    assert code == 0 and err == [] and out.rstrip().endswith("OK"), (out, err)
    warnings = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and str(moved) in warnings[0] and "origin differs" in warnings[0]

    pred, ref = _eval_folders(tmp_path)
    _lab(pred / "c1.nii.gz", affine=_shifted(0.3))
    code, out, err = _evaluate(capsys, pred, ref, tmp_path / "out")
    assert code == 0 and err == [], err
    assert "label_1: Dice 1.0000" in out


def test_prediction_on_an_oblique_reference_grid_evaluates(tmp_path, capsys):
    """A prediction written with its reference's oblique geometry (NIfTI and NRRD) is on the same grid."""
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    for case in ("c0", "c1"):
        _lab(ref / f"{case}.nii.gz", affine=_oblique())
    write_volume(pred / "c0.nii.gz", _label_array(), read_volume(ref / "c0.nii.gz", kind="label"))
    write_volume(pred / "c1.nrrd", _label_array(), read_volume(ref / "c1.nii.gz", kind="label"))
    code, out, err = _evaluate(capsys, pred, ref, tmp_path / "out")
    assert code == 0 and err == [], err
    assert "label_1: Dice 1.0000" in out and "skipped" not in out
    assert _metric_cases(tmp_path / "out") == {"c0", "c1"}


# ------------------------------------------------------------------------------ item 12: degenerate grids
def test_verify_refuses_zero_voxel_size_in_nifti_header(tmp_path, capsys, caplog, recwarn):
    """nibabel turns pixdim 0 into 1 mm (and logs about it on stderr): refused with one line instead."""
    ds = make_dataset(tmp_path / "ds")
    bad = _raw_nifti(ds / "imagesTr" / "c1_0001.nii.gz", pixdim=(0.8, 0.0, 3.0))
    with caplog.at_level(logging.DEBUG):
        code, _, err = run_cli(capsys, ["verify", str(ds)])
    assert_refused(code, err, bad, "voxel size 0 along array axis 1 in the NIfTI header (pixdim[1:4] = (0.8, 0, 3))")
    assert not [r for r in caplog.records if r.name.startswith("nibabel")], caplog.records
    assert not [w for w in recwarn.list if "nibabel" in str(w.filename)]


@pytest.mark.parametrize("pixdim", [(0.8, 0.8, 0.0), (0.8, np.nan, 3.0)])
def test_train_refuses_zero_or_nan_voxel_size(pixdim, tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds")
    bad = _raw_nifti(ds / "labelsTr" / "c1.nii.gz", pixdim=pixdim, array=_label_array())
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, train_args(ds, out))
    axis, value = (2, "0") if pixdim[2] == 0 else (1, "nan")
    assert_refused(code, err, bad, f"voxel size {value} along array axis {axis} in the NIfTI header")
    assert not out.exists()
    assert files_under(tmp_path / ".modalseg_cache") == []


def test_zero_voxel_size_gives_exactly_one_line_on_the_real_stderr(tmp_path):
    """The real process stderr (nibabel's log handler writes to the interpreter's stderr, not to pytest's
    capture): exactly the one problem line (verify prints its problems as ``PATH: problem``)."""
    ds = make_dataset(tmp_path / "ds", n=2)
    bad = _raw_nifti(ds / "imagesTr" / "c0_0000.nii.gz", pixdim=(0.0, 0.8, 3.0))
    proc = subprocess.run([sys.executable, "-m", "modalseg.cli.main", "verify", str(ds)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"{bad}: voxel size 0 along array axis 0 in the NIfTI header "
        "(pixdim[1:4] = (0, 0.8, 3))"
    ]


def test_zero_column_in_the_sform_is_refused(tmp_path, capsys):
    """pixdim is fine but the sform (which nibabel uses) has no extent along axis 1."""
    pred, ref = _eval_folders(tmp_path)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(SHAPE)
    hdr.set_data_dtype(np.uint8)
    hdr["pixdim"][1:4] = [0.8, 0.8, 3.0]
    hdr.set_sform(np.diag([0.8, 0.0, 3.0, 1.0]), code=1)
    bad = pred / "c1.nii.gz"
    nib.save(nib.Nifti1Image(_label_array(), None, header=hdr), str(bad))
    out = tmp_path / "out"
    code, _, err = _evaluate(capsys, pred, ref, out)
    assert_refused(code, err, bad, "voxel size 0 along array axis 1 in the voxel-to-world affine "
                                   "(voxel sizes (0.8, 0, 3) mm)")
    assert files_under(out) == []


@pytest.mark.parametrize("command", ["verify", "train"])
def test_sheared_nifti_is_refused(command, tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds")
    bad = _img(ds / "imagesTr" / "c1_0001.nii.gz", seed=11, affine=SHEAR)
    argv = ["verify", str(ds)] if command == "verify" else train_args(ds, tmp_path / "run")
    code, _, err = run_cli(capsys, argv)
    assert_refused(code, err, bad, "sheared (non-orthogonal) voxel axes: array axes 0 and 1 are at 69.44 degrees, "
                                   "not 90")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
def test_sheared_nrrd_and_metaimage_are_refused(ext, tmp_path, capsys):
    pred, ref = _eval_folders(tmp_path)
    (pred / "c1.nii.gz").unlink()
    bad = _itk_sheared(pred / f"c1{ext}", _label_array())
    out = tmp_path / "out"
    code, _, err = _evaluate(capsys, pred, ref, out)
    assert_refused(code, err, bad, "sheared (non-orthogonal) voxel axes: array axes 0 and 1 are at 73.3 degrees")
    assert files_under(out) == []


def test_oblique_orthogonal_grids_are_accepted(tmp_path, capsys):
    """Oblique scanner data (rotated about three axes, float32 sform) reads and verifies; so does an NRRD with
    that direction, and cosines off orthogonal by 1e-6 (the rounding of DICOM ImageOrientationPatient)."""
    ds = make_dataset(tmp_path / "ds", affine=_oblique())
    code, out, err = run_cli(capsys, ["verify", str(ds)])
    assert code == 0 and err == [] and out.rstrip().endswith("OK"), (out, err)
    vol = read_volume(ds / "imagesTr" / "c0_0000.nii.gz")
    np.testing.assert_allclose(vol.affine, _oblique(), atol=1e-5)
    write_volume(tmp_path / "oblique.nrrd", vol.array, vol)
    back = read_volume(tmp_path / "oblique.nrrd")
    np.testing.assert_allclose(back.affine, _oblique(), atol=1e-5)
    rounded = _oblique()
    rounded[:3, 1] += 1e-6 * rounded[:3, 0]  # |cos(axis 0, axis 1)| = 1e-6
    assert read_volume(_img(tmp_path / "rounded.nii.gz", affine=rounded)).shape == SHAPE


# ------------------------------------------------------------------------------ item 13a: evaluate's file list
def test_evaluate_skips_probability_maps_and_says_how_many(tmp_path, capsys):
    pred, ref = _eval_folders(tmp_path)
    probs = np.full(SHAPE, 0.5, np.float32)
    for case in ("c0", "c1"):
        for cls in ("background", "mass"):
            _img(pred / f"{case}_prob_{cls}.nii.gz", array=probs)
    code, out, err = _evaluate(capsys, pred, ref, tmp_path / "out")
    assert code == 0 and err == [], err
    lines = [ln for ln in out.splitlines() if "probability map" in ln]
    assert lines == [f"skipped 4 probability maps (CASE_prob_<class> files beside their CASE): 4 in {pred}"]
    assert _metric_cases(tmp_path / "out") == {"c0", "c1"}


def test_evaluate_scores_a_case_merely_named_prob(tmp_path, capsys):
    """``a_prob_x`` with no case ``a`` is a case, not a probability map: today it is silently dropped."""
    pred, ref = _eval_folders(tmp_path, cases=("c0", "a_prob_x"))
    code, out, err = _evaluate(capsys, pred, ref, tmp_path / "out")
    assert code == 0 and err == [], err
    assert "skipped" not in out
    assert _metric_cases(tmp_path / "out") == {"c0", "a_prob_x"}
    # ... so its missing prediction is listed as not scored, not a silently smaller evaluation
    (pred / "a_prob_x.nii.gz").unlink()
    code, out, err = _evaluate(capsys, pred, ref, tmp_path / "out2")
    assert code == 0 and err == [], err
    assert "1 reference case(s) have no prediction and are not scored: a_prob_x\n" in out
    assert _metric_cases(tmp_path / "out2") == {"c0"}


@pytest.mark.parametrize("folder", ["pred", "ref"])
def test_evaluate_refuses_two_files_for_one_case(folder, tmp_path, capsys):
    pred, ref = _eval_folders(tmp_path)
    where = pred if folder == "pred" else ref
    first = where / "c1.nii.gz"
    second = where / "c1.nrrd"
    write_volume(second, _label_array(), Volume(_label_array(), AFF))
    out = tmp_path / "out"
    code, _, err = _evaluate(capsys, pred, ref, out)
    assert_refused(code, err, second, f"a second file for case 'c1' beside {first}", "one file per case")
    assert files_under(out) == []
