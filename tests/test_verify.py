"""Tests of modalseg.data.verify and the ``modalseg verify`` command on tiny datasets with planted faults."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from modalseg.cli.main import main
from modalseg.data.layouts import load_dataset
from modalseg.data.verify import check_dataset, verify_dataset
from modalseg.errors import DataError

AFF = np.diag([0.8, 0.8, 3.0, 1.0])


def _img(path: Path, shape=(8, 8, 2), affine=AFF, seed=0, array=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        array = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _lab(path: Path, shape=(8, 8, 2), affine=AFF, values=(0, 1)) -> Path:
    arr = np.resize(np.asarray(values, dtype=np.int16), shape)
    return _img(path, affine=affine, array=arr)


def _dataset(root: Path, cases=("c1", "c2", "c3")) -> Path:
    """A clean paired nnU-Net dataset (T1C, T2W; background, mass)."""
    for k, case in enumerate(cases):
        _img(root / "imagesTr" / f"{case}_0000.nii.gz", seed=k)
        _img(root / "imagesTr" / f"{case}_0001.nii.gz", seed=k + 10)
        _lab(root / "labelsTr" / f"{case}.nii.gz")
    meta = {
        "channel_names": {"0": "T1C", "1": "T2W"},
        "labels": {"background": 0, "mass": 1},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_clean_dataset(tmp_path):
    root = _dataset(tmp_path / "ds")
    _img(root / "imagesTr" / "c3_0000.nii.gz", shape=(10, 6, 2))
    _img(root / "imagesTr" / "c3_0001.nii.gz", shape=(10, 6, 2), seed=4)
    _lab(root / "labelsTr" / "c3.nii.gz", shape=(10, 6, 2))
    report = check_dataset(load_dataset(root))
    assert report.ok and report.problems == [] and report.warnings == []
    assert report.num_cases == 3
    assert report.shape_min == (8, 6, 2) and report.shape_max == (10, 8, 2)
    assert report.spacing_min == pytest.approx((0.8, 0.8, 3.0))
    assert report.label_values == [0, 1]


def _problems(root: Path, **kw) -> list[str]:
    return verify_dataset(load_dataset(root), **kw).problems


def test_missing_modality_file(tmp_path):
    root = _dataset(tmp_path / "ds")
    missing = root / "imagesTr" / "c2_0001.nii.gz"
    missing.unlink()
    problems = _problems(root)
    assert problems == [f"{missing}: T2W image of case c2: file not found"]


def test_missing_label_file(tmp_path):
    root = _dataset(tmp_path / "ds")
    (root / "labelsTr" / "c1.nii.gz").unlink()
    problems = _problems(root)
    assert len(problems) == 1
    assert problems[0].startswith(str(root / "labelsTr" / "c1.nii.gz"))
    assert "label of training case c1" in problems[0] and "not found" in problems[0]


def _resampling_warning(root: Path, bad: Path) -> str:
    """Without ``strict`` a modality or label on another grid is resampled by train/predict: a warning."""
    report = verify_dataset(load_dataset(root))
    assert report.problems == []
    (warning,) = [w for w in report.warnings if w.startswith(f"{bad}: ")]
    return warning


def test_mismatched_shape(tmp_path):
    root = _dataset(tmp_path / "ds")
    bad = _img(root / "imagesTr" / "c1_0001.nii.gz", shape=(8, 8, 3))
    assert "will be resampled (linear) onto T1C's grid" in _resampling_warning(root, bad)
    (problem,) = _problems(root, strict=True)
    assert problem.startswith(f"{bad}: T2W shape (8, 8, 3) differs from T1C")
    assert str(root / "imagesTr" / "c1_0000.nii.gz") in problem and "(8, 8, 2)" in problem


def test_mismatched_spacing(tmp_path):
    root = _dataset(tmp_path / "ds")
    bad = _img(root / "imagesTr" / "c2_0001.nii.gz", affine=np.diag([0.8, 0.8, 3.5, 1.0]))
    assert "spacing 0.8x0.8x3.5 -> 0.8x0.8x3 mm" in _resampling_warning(root, bad)
    (problem,) = _problems(root, strict=True)
    assert problem.startswith(f"{bad}: T2W spacing (0.8, 0.8, 3.5) differs from T1C")
    assert "(0.8, 0.8, 3)" in problem
    # within the relative tolerance: no problem
    _img(bad, affine=np.diag([0.8, 0.8, 3.0 * (1 + 1e-4), 1.0]))
    assert _problems(root, strict=True) == []


def test_mismatched_orientation(tmp_path):
    root = _dataset(tmp_path / "ds")
    flipped = np.diag([-0.8, 0.8, 3.0, 1.0])  # same spacing, L-R flipped
    bad = _img(root / "imagesTr" / "c3_0001.nii.gz", affine=flipped)
    assert "orientation LAS -> RAS" in _resampling_warning(root, bad)
    (problem,) = _problems(root, strict=True)
    assert problem.startswith(f"{bad}: T2W orientation LAS differs from T1C")
    assert "RAS (direction cosines differ by up to 2)" in problem
    # a small oblique tilt (same axis codes) is reported with the cosines
    tilt = np.eye(4)
    tilt[:3, :3] = np.array([[1, 0, 0], [0, np.cos(0.05), -np.sin(0.05)], [0, np.sin(0.05), np.cos(0.05)]])
    _img(bad, affine=tilt @ AFF)
    (problem,) = _problems(root, strict=True)
    assert "T2W orientation (1, 0, 0, 0, 0.9988" in problem and "RAS" not in problem


def test_nan_and_constant_images(tmp_path):
    root = _dataset(tmp_path / "ds")
    arr = np.random.default_rng(0).normal(size=(8, 8, 2)).astype(np.float32)
    arr[0, 0, 0] = np.nan
    arr[1, 2, 1] = np.inf
    nan_path = _img(root / "imagesTr" / "c1_0000.nii.gz", array=arr)
    flat = _img(root / "imagesTr" / "c2_0000.nii.gz", array=np.full((8, 8, 2), 7.0, np.float32))
    problems = _problems(root)
    assert f"{nan_path}: 2 NaN/inf voxel(s)" in problems
    assert f"{flat}: constant image (every voxel is 7)" in problems


def test_unknown_label_value(tmp_path):
    root = _dataset(tmp_path / "ds")
    bad = _lab(root / "labelsTr" / "c2.nii.gz", values=(0, 1, 3, 9))
    (problem,) = _problems(root)
    assert problem == f"{bad}: unexpected label values 3, 9 (declared: 0, 1)"


def test_label_image_shape_and_spacing_mismatch(tmp_path):
    root = _dataset(tmp_path / "ds")
    bad = _lab(root / "labelsTr" / "c1.nii.gz", shape=(8, 7, 2), affine=np.diag([1.0, 0.8, 3.0, 1.0]))
    assert "will be resampled (nearest neighbour) onto the image's grid" in _resampling_warning(root, bad)
    problems = _problems(root, strict=True)
    assert len(problems) == 2
    assert problems[0].startswith(f"{bad}: label shape (8, 7, 2) differs from image")
    assert problems[1].startswith(f"{bad}: label spacing (1, 0.8, 3) differs from image")


def test_corrupt_and_4d_files_collected_with_everything_else(tmp_path):
    root = _dataset(tmp_path / "ds")
    corrupt = root / "imagesTr" / "c1_0000.nii.gz"
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])
    four = _img(root / "imagesTr" / "c2_0001.nii.gz", shape=(8, 8, 2, 2))
    (root / "labelsTr" / "c3.nii.gz").unlink()
    problems = _problems(root)
    assert len(problems) == 3
    assert problems[0].startswith(f"{corrupt}: cannot read (truncated or corrupt")
    assert problems[1] == f"{four}: 4D image (shape (8, 8, 2, 2)) where a 3D volume is expected"
    assert "c3.nii.gz" in problems[2]
    with pytest.raises(DataError, match=r"\(and 2 more problems\)$"):
        check_dataset(load_dataset(root))


def test_anisotropy_is_a_warning(tmp_path):
    root = _dataset(tmp_path / "ds", cases=("c1",))
    aff = np.diag([0.5, 0.5, 12.0, 1.0])
    _img(root / "imagesTr" / "c1_0000.nii.gz", affine=aff)
    _img(root / "imagesTr" / "c1_0001.nii.gz", affine=aff, seed=3)
    _lab(root / "labelsTr" / "c1.nii.gz", affine=aff)
    report = verify_dataset(load_dataset(root))
    assert report.problems == []
    assert len(report.warnings) == 1 and "anisotropic (ratio 24.0 > 20)" in report.warnings[0]
    assert verify_dataset(load_dataset(root), max_anisotropy=30).warnings == []


def test_unpaired_mmwhs_background_values(tmp_path):
    root = tmp_path / "mmwhs"
    _img(root / "ct_train_1001_image.nii.gz")
    _lab(root / "ct_train_1001_label.nii.gz", values=(0, 205, 420, 500, 820, 550, 421))
    _img(root / "mr_train_1001_image.nii.gz", shape=(6, 6, 3))
    _lab(root / "mr_train_1001_label.nii.gz", shape=(6, 6, 3), values=(0, 205, 850, 17))
    report = verify_dataset(load_dataset(root))
    assert report.problems == [
        f"{root / 'mr_train_1001_label.nii.gz'}: unexpected label values 17 "
        "(declared: 0, 205, 420, 421, 500, 550, 600, 820, 850)"
    ]
    assert report.cases_per_modality == {"CT": 1, "MR": 1}
    assert report.shape_min == (6, 6, 2) and report.shape_max == (8, 8, 3)


def test_cli_ok(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    assert main(["verify", str(root)]) == 0
    out = capsys.readouterr().out
    assert "cases: 3" in out and "T1C, T2W" in out and "classes: 2 (background, mass)" in out
    assert "shape: (8, 8, 2) .. (8, 8, 2)" in out and "spacing (mm): (0.8, 0.8, 3)" in out
    assert out.rstrip().endswith("OK")


def test_cli_problems_exit_2(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    (root / "imagesTr" / "c1_0001.nii.gz").unlink()
    _lab(root / "labelsTr" / "c2.nii.gz", values=(0, 5))
    assert main(["verify", str(root), "--layout", "nnunet"]) == 2
    captured = capsys.readouterr()
    err_lines = captured.err.strip().splitlines()
    assert err_lines[0].startswith(str(root / "imagesTr" / "c1_0001.nii.gz"))
    assert err_lines[1].startswith(str(root / "labelsTr" / "c2.nii.gz")) and "5" in err_lines[1]
    assert "2 problems found" in err_lines[2]
    assert "OK" not in captured.out


def test_cli_load_error_is_one_line(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    meta = json.loads((root / "dataset.json").read_text())
    del meta["labels"]
    (root / "dataset.json").write_text(json.dumps(meta))
    assert main(["verify", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "dataset.json: missing key 'labels'" in err
