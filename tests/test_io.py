"""Tests of modalseg.data.io: round trips through every format, geometry, dtype handling, errors."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from modalseg.data.io import SUPPORTED_EXTENSIONS, read_volume, strip_extension, write_volume
from modalseg.errors import DataError, OutputError

OBLIQUE = np.array(
    [
        [0.8, 0.3, 0.12, 12.5],
        [-0.3, 0.8, 0.32, -40.0],
        [0.0, -0.1, 2.92, 7.25],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _image(shape=(8, 8, 2), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 30.0, size=shape).astype(np.float32)


def _save_nifti(path, array, affine=OBLIQUE, **header_kw):
    img = nib.Nifti1Image(array, affine)
    for key, value in header_kw.items():
        img.header[key] = value
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"])
def test_round_trip_keeps_array_affine_spacing(tmp_path, ext):
    src = _save_nifti(tmp_path / "src.nii.gz", _image())
    ref = read_volume(src)
    out = tmp_path / f"out{ext}"
    write_volume(out, ref.array, ref)
    back = read_volume(out)
    np.testing.assert_array_equal(back.array, ref.array)
    np.testing.assert_allclose(back.affine, ref.affine, atol=1e-6)
    np.testing.assert_allclose(back.spacing, ref.spacing, rtol=1e-6)
    # ... and back again to NIfTI from the ITK-format reference (cross-format both ways)
    write_volume(tmp_path / "again.nii.gz", back.array, back)
    again = read_volume(tmp_path / "again.nii.gz")
    np.testing.assert_allclose(again.affine, OBLIQUE, atol=1e-6)
    np.testing.assert_array_equal(again.array, ref.array)
    # no temporary files left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_itk_array_order_and_ras_affine(tmp_path):
    """A SimpleITK-written image reads as (x, y, z) with an RAS affine (LPS rows 0-1 flipped)."""
    arr_xyz = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2)
    img = sitk.GetImageFromArray(arr_xyz.transpose(2, 1, 0))
    img.SetSpacing((0.5, 0.7, 3.0))
    img.SetOrigin((10.0, 20.0, 30.0))
    sitk.WriteImage(img, str(tmp_path / "a.mha"))
    vol = read_volume(tmp_path / "a.mha")
    np.testing.assert_array_equal(vol.array, arr_xyz.astype(np.float32))
    expected = np.diag([-0.5, -0.7, 3.0, 1.0])
    expected[:3, 3] = [-10.0, -20.0, 30.0]
    np.testing.assert_allclose(vol.affine, expected)
    assert vol.meta["format"] == "itk" and vol.meta["spacing"] == (0.5, 0.7, 3.0)
    # NIfTI written from it has the same world geometry as nibabel sees it
    write_volume(tmp_path / "a.nii.gz", vol.array, vol)
    np.testing.assert_allclose(nib.load(str(tmp_path / "a.nii.gz")).affine, expected)


def test_oblique_nrrd_reference_to_nifti(tmp_path):
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    theta = 0.3
    rot = np.array([[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]])
    direction = rot @ direction
    img = sitk.GetImageFromArray(_image((3, 5, 6)))  # (z, y, x) -> x=6, y=5, z=3
    img.SetDirection(tuple(direction.ravel()))
    img.SetSpacing((1.5, 0.9, 4.0))
    img.SetOrigin((-3.0, 4.0, 5.0))
    sitk.WriteImage(img, str(tmp_path / "a.nrrd"))
    vol = read_volume(tmp_path / "a.nrrd")
    assert vol.shape == (6, 5, 3)
    np.testing.assert_allclose(vol.spacing, (1.5, 0.9, 4.0))
    write_volume(tmp_path / "b.nii.gz", vol.array, vol)
    back = read_volume(tmp_path / "b.nii.gz")
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-6)
    write_volume(tmp_path / "c.nrrd", back.array, back)
    again = sitk.ReadImage(str(tmp_path / "c.nrrd"))
    np.testing.assert_allclose(again.GetDirection(), direction.ravel(), atol=1e-6)
    np.testing.assert_allclose(again.GetOrigin(), (-3.0, 4.0, 5.0), atol=1e-6)


def test_nifti_codes_kept_and_label_dtype(tmp_path):
    src = nib.Nifti1Image(_image(), OBLIQUE)
    src.set_qform(OBLIQUE, code=1)
    src.set_sform(OBLIQUE, code=4)
    nib.save(src, str(tmp_path / "img.nii.gz"))
    ref = read_volume(tmp_path / "img.nii.gz")
    small = np.random.default_rng(1).integers(0, 3, size=ref.shape)
    write_volume(tmp_path / "small.nii.gz", small, ref)
    h = nib.load(str(tmp_path / "small.nii.gz"))
    assert h.get_data_dtype() == np.uint8
    assert int(h.header["qform_code"]) == 1 and int(h.header["sform_code"]) == 4
    assert np.isnan(h.header["scl_slope"]) or float(h.header["scl_slope"]) in (0.0, 1.0)
    big = small * 300  # 0, 300, 600: needs int16
    write_volume(tmp_path / "big.nii.gz", big, ref)
    assert nib.load(str(tmp_path / "big.nii.gz")).get_data_dtype() == np.int16
    lab = read_volume(tmp_path / "big.nii.gz", kind="label")
    assert lab.array.dtype == np.int32
    np.testing.assert_array_equal(lab.array, big)
    # explicit dtype that cannot hold the values is refused, not wrapped
    with pytest.raises(ValueError):
        write_volume(tmp_path / "bad.nii.gz", big, ref, dtype=np.uint8)


def test_write_shape_mismatch_and_bad_extension(tmp_path):
    ref = read_volume(_save_nifti(tmp_path / "a.nii.gz", _image()))
    with pytest.raises(ValueError, match="shape"):
        write_volume(tmp_path / "b.nii.gz", np.zeros((8, 8, 3)), ref)
    with pytest.raises(OutputError, match=r"b\.png: unsupported output file type"):
        write_volume(tmp_path / "b.png", ref.array, ref)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]


@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        (np.uint16, [0, 1, 40000, 65535]),
        (np.int8, [-128, -1, 0, 127]),
        (np.int16, [-32768, 0, 32767, 5]),
        (np.uint8, [0, 255, 128, 7]),
    ],
)
@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_integer_images_read_without_overflow(tmp_path, dtype, values, ext):
    arr = np.resize(np.asarray(values, dtype=dtype), (8, 8, 2))
    if ext == ".nii.gz":
        path = _save_nifti(tmp_path / f"a{ext}", arr)
    else:
        path = tmp_path / f"a{ext}"
        sitk.WriteImage(sitk.GetImageFromArray(arr.transpose(2, 1, 0)), str(path))
    vol = read_volume(path)
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, arr.astype(np.float64))
    assert vol.array.max() == max(values) and vol.array.min() == min(values)


def test_float64_image_and_scl_slope(tmp_path):
    arr = np.resize(np.array([0, 10, 20, 30], dtype=np.int16), (8, 8, 2))
    img = nib.Nifti1Image(arr, OBLIQUE)
    img.header.set_slope_inter(0.5, -3.0)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    vol = read_volume(tmp_path / "s.nii.gz")
    np.testing.assert_allclose(vol.array, arr * 0.5 - 3.0)
    f64 = _image().astype(np.float64) * 1e3
    vol = read_volume(_save_nifti(tmp_path / "d.nii", f64))
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array, f64, rtol=1e-6)


def test_label_with_non_integer_values_is_error(tmp_path):
    arr = np.zeros((8, 8, 2), dtype=np.float32)
    arr[0, 0, 0] = 1.5
    path = _save_nifti(tmp_path / "lab.nii.gz", arr)
    with pytest.raises(DataError, match="non-integer") as info:
        read_volume(path, kind="label")
    assert str(path) in str(info.value)
    arr[0, 0, 0] = 2.0  # integer-valued floats are fine
    _save_nifti(path, arr)
    assert read_volume(path, kind="label").array.max() == 2


def test_2d_and_trailing_singletons(tmp_path):
    vol = read_volume(_save_nifti(tmp_path / "flat.nii.gz", _image((8, 6))))
    assert vol.shape == (8, 6, 1)
    vol = read_volume(_save_nifti(tmp_path / "five.nii.gz", _image((8, 6, 2, 1, 1))))
    assert vol.shape == (8, 6, 2)
    img2d = sitk.GetImageFromArray(_image((6, 8)))  # (y, x)
    img2d.SetSpacing((0.5, 0.25))
    sitk.WriteImage(img2d, str(tmp_path / "flat.mha"))
    vol = read_volume(tmp_path / "flat.mha")
    assert vol.shape == (8, 6, 1)
    np.testing.assert_allclose(vol.spacing, (0.5, 0.25, 1.0))


def test_4d_file_is_error(tmp_path):
    path = _save_nifti(tmp_path / "four.nii.gz", _image((8, 8, 2, 3)))
    with pytest.raises(DataError, match=r"4D image \(shape \(8, 8, 2, 3\)\) where a 3D volume is expected"):
        read_volume(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found") as info:
        read_volume(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(info.value)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "scan.dcm"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match="unsupported") as info:
        read_volume(path)
    msg = str(info.value)
    assert "scan.dcm" in msg and ".nii.gz" in msg and ".nrrd" in msg and "\n" not in msg


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_file_is_data_error(tmp_path, ext):
    src = _save_nifti(tmp_path / "src.nii.gz", _image((16, 16, 8)))
    ref = read_volume(src)
    path = tmp_path / f"t{ext}"
    write_volume(path, ref.array, ref)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        read_volume(path)
    err = info.value
    assert str(path) in str(err) and "\n" not in str(err)
    assert err.__cause__ is None and err.__suppress_context__


def test_garbage_gzip_is_data_error(tmp_path):
    path = tmp_path / "g.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti header at all" * 3))
    with pytest.raises(DataError, match="g.nii.gz"):
        read_volume(path)


def test_zero_size_volume(tmp_path):
    path = _save_nifti(tmp_path / "empty.nii", np.zeros((0, 8, 2), dtype=np.float32))
    with pytest.raises(DataError, match="zero-size"):
        read_volume(path)


def test_strip_extension():
    assert strip_extension("case_0000.nii.gz") == "case_0000"
    assert strip_extension("a.b.NII.GZ") == "a.b"
    assert strip_extension("x.nrrd") == "x"
    assert strip_extension("x.mhd") == "x"
    assert strip_extension("dir/y.nii") == "dir/y"
    assert set(SUPPORTED_EXTENSIONS) == {".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"}
