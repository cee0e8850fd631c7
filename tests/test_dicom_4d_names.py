"""Issue 12 items 4, 6, 7, 8: DICOM series in, MSD/BraTS 4D files, modality order from names, 2D stays 2D.

DICOM series are written here with SimpleITK (one file per slice, as in SimpleITK's DicomSeriesFromArray example),
so nothing is downloaded. Images are tiny (16x16x4) and models tiny (``tiny_checkpoint``).
"""

from __future__ import annotations

import json
import locale
from itertools import count
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from modalseg.data.io import ImageRef, is_dicom_series, read_volume, write_volume
from modalseg.errors import DataError
from test_reliability import _img, _lab, _predict, assert_refused, files_under, run_cli, tiny_checkpoint, train_args

SPACING = (0.8, 0.7, 3.0)
ORIGIN = (10.0, -20.0, 5.0)
_ANGLE = 0.3
DIRECTION = np.array([[np.cos(_ANGLE), -np.sin(_ANGLE), 0.0], [np.sin(_ANGLE), np.cos(_ANGLE), 0.0], [0.0, 0.0, 1.0]])
SHAPE = (16, 16, 4)
_uids = count(1)


def _array(seed: int, shape=SHAPE) -> np.ndarray:
    """Integer-valued intensities (DICOM stores int16), (x, y, z) order."""
    return np.random.default_rng(seed).integers(20, 400, size=shape).astype(np.int16)


def write_dicom(folder: Path, array: np.ndarray, description: str, *, direction=DIRECTION, spacing=SPACING,
                origin=ORIGIN, reverse: bool = False) -> Path:
    """One MR series, one file per slice. ``reverse``: instance numbers and file names run against the slice
    positions, so the files listed in name order are upside down."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(v) for v in spacing))
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetDirection(tuple(float(v) for v in np.asarray(direction).ravel()))
    uid = f"1.2.826.0.1.3680043.2.1125.7.{next(_uids)}"
    d = img.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    n = img.GetDepth()
    for i in range(n):
        s = img[:, :, i]
        number = n - i if reverse else i + 1
        tags = {
            "0008|0060": "MR",
            "0020|000e": uid,
            "0008|0018": f"{uid}.{number}",
            "0008|103e": description,
            "0020|0013": str(number),
            "0020|0037": "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0020|0032": "\\".join(f"{v:.10g}" for v in img.TransformIndexToPhysicalPoint((0, 0, i))),
            "0028|0030": f"{spacing[1]:.10g}\\{spacing[0]:.10g}",
            "0018|0050": f"{spacing[2]:.10g}",
        }
        for tag, value in tags.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{description.replace(' ', '_')}_{number:03d}.dcm"))
        saved = locale.setlocale(locale.LC_ALL)
        try:
            writer.Execute(s)
        finally:  # GDCM's DICOM writer switches the process to the C locale (ASCII text I/O for every later test)
            locale.setlocale(locale.LC_ALL, saved)
    return folder


def ras_affine(direction=DIRECTION, spacing=SPACING, origin=ORIGIN) -> np.ndarray:
    """The RAS voxel-to-world affine of an ITK (LPS) geometry, computed independently of modalseg."""
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = lps_to_ras @ np.asarray(direction) @ np.diag(spacing)
    affine[:3, 3] = lps_to_ras @ np.asarray(origin)
    return affine


def write_nifti(path: Path, array: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.float32), ras_affine() if affine is None else affine), str(path))
    return path



@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "fuse.pt")


# ------------------------------------------------------------------------------------------------ DICOM
@pytest.mark.parametrize("order", ["instance numbers reversed", "slice axis flipped"])
def test_dicom_series_reads_with_the_geometry_of_the_same_nifti(tmp_path, order):
    array = _array(0)
    if order == "instance numbers reversed":
        write_dicom(tmp_path / "T1C", array, "T1 post", reverse=True)
        direction = DIRECTION
    else:  # slices stepping against the normal of ImageOrientationPatient (z-flipped volume)
        direction = DIRECTION @ np.diag([1.0, 1.0, -1.0])
        write_dicom(tmp_path / "T1C", array, "T1 post", direction=direction)
    nifti = read_volume(write_nifti(tmp_path / "t1c.nii.gz", array, ras_affine(direction=direction)))
    assert is_dicom_series(tmp_path / "T1C") and not is_dicom_series(tmp_path / "t1c.nii.gz")
    vol = read_volume(tmp_path / "T1C")
    assert vol.meta["source"] == "dicom" and vol.meta["series"] == "T1 post"
    if order == "instance numbers reversed":
        np.testing.assert_array_equal(vol.array, nifti.array)
        np.testing.assert_allclose(vol.affine, nifti.affine, atol=1e-4)
    else:  # read in position order: the same voxels at the same world positions, stored the other way up
        flip = np.eye(4)
        flip[2, 2], flip[2, 3] = -1.0, SHAPE[2] - 1
        np.testing.assert_array_equal(vol.array, nifti.array[:, :, ::-1])
        np.testing.assert_allclose(vol.affine, nifti.affine @ flip, atol=1e-4)
    # results of a DICOM input are written as NIfTI / NRRD with the series' geometry
    for ext in (".nii.gz", ".nrrd"):
        write_volume(tmp_path / f"out{ext}", vol.array, vol)
        back = read_volume(tmp_path / f"out{ext}")
        np.testing.assert_array_equal(back.array, vol.array)
        np.testing.assert_allclose(back.affine, vol.affine, atol=1e-6)


def test_predict_on_dicom_study_equals_predict_on_the_nifti_equivalent(ckpt, tmp_path, capsys):
    t1c, t2w = _array(1), _array(2)
    study = tmp_path / "STUDY"
    write_dicom(study / "T1C", t1c, "ax T1 post gad")
    write_dicom(study / "t2w", t2w, "T2 TSE", reverse=True)  # sub-folder names are matched case-insensitively
    nifti = tmp_path / "nifti"
    write_nifti(nifti / "T1C.nii.gz", t1c)
    write_nifti(nifti / "T2W.nii.gz", t2w)
    code, _, err = _predict(capsys, ckpt, [study], tmp_path / "out_dicom", "--probabilities")
    assert code == 0, err
    code, _, err = _predict(capsys, ckpt, [nifti], tmp_path / "out_nifti", "--probabilities")
    assert code == 0, err
    from_dicom = read_volume(tmp_path / "out_dicom" / "STUDY.nii.gz", kind="label")  # DICOM in: .nii.gz out
    from_nifti = read_volume(tmp_path / "out_nifti" / "nifti.nii.gz", kind="label")
    np.testing.assert_array_equal(from_dicom.array, from_nifti.array)
    np.testing.assert_allclose(from_dicom.affine, ras_affine(), atol=1e-4)
    p_dicom = read_volume(tmp_path / "out_dicom" / "STUDY_prob_mass.nii.gz").array
    p_nifti = read_volume(tmp_path / "out_nifti" / "nifti_prob_mass.nii.gz").array
    np.testing.assert_allclose(p_dicom, p_nifti, atol=1e-5)
    # a folder of case folders (the folder layout's root) holding DICOM sub-folders: one case per sub-folder
    root = tmp_path / "root"
    write_dicom(root / "caseA" / "T1C", t1c, "T1")
    write_dicom(root / "caseA" / "T2W", t2w, "T2")
    write_nifti(root / "caseB" / "t1c.nii.gz", t1c)
    write_nifti(root / "caseB" / "T2W.nii.gz", t2w)
    code, _, err = _predict(capsys, ckpt, [root], tmp_path / "out_root")
    assert code == 0, err
    for case in ("caseA", "caseB"):
        np.testing.assert_array_equal(read_volume(tmp_path / "out_root" / f"{case}.nii.gz", kind="label").array,
                                      from_nifti.array)


def _three_series(folder: Path) -> Path:
    write_dicom(folder, _array(3), "T1 post")
    write_dicom(folder, _array(4), "T2 TSE")
    write_dicom(folder, _array(5), "ADC")
    return folder


def test_several_series_in_one_folder_chosen_by_description_or_refused(tmp_path, capsys):
    named = _three_series(tmp_path / "T2")
    vol = read_volume(named)  # the folder is named after the modality: its series is chosen
    assert vol.meta["series"] == "T2 TSE"
    np.testing.assert_array_equal(vol.array, _array(4).astype(np.float32))
    mixed = _three_series(tmp_path / "mixed")
    assert read_volume(ImageRef.make(mixed, series="adc")).meta["series"] == "ADC"
    with pytest.raises(DataError) as info:
        read_volume(mixed)
    assert str(info.value) == (
        f"{mixed}: 3 DICOM series in one folder: 'ADC' (4 files), 'T1 post' (4), 'T2 TSE' (4); none is described as "
        "'mixed'; put one series per folder or name the folder after the modality")
    sizes = tmp_path / "sizes"  # listed largest first
    write_dicom(sizes, _array(3, (16, 16, 2)), "ADC")
    write_dicom(sizes, _array(4, (16, 16, 5)), "T1 post")
    write_dicom(sizes, _array(5, (16, 16, 3)), "T2 TSE")
    with pytest.raises(DataError, match=r"sizes: 3 DICOM series in one folder: 'T1 post' \(5 files\), 'T2 TSE' "
                                        r"\(3\), 'ADC' \(2\); none is described as 'sizes'"):
        read_volume(sizes)
    assert read_volume(ImageRef.make(sizes, series="T1")).shape == (16, 16, 5)
    # predict: a folder holding every modality's series, chosen by the model's modality names
    model = tiny_checkpoint(tmp_path / "t2_adc.pt", modalities=("T2", "ADC"))
    code, _, err = _predict(capsys, model, [mixed], tmp_path / "out")
    assert code == 0, err
    assert read_volume(tmp_path / "out" / "mixed.nii.gz", kind="label").shape == SHAPE
    # a model whose modality no series describes: one line listing the series, nothing written
    other = tiny_checkpoint(tmp_path / "flair.pt", modalities=("FLAIR",), model="unet")
    code, _, err = _predict(capsys, other, [mixed], tmp_path / "out2")
    assert_refused(code, err, mixed, "3 DICOM series in one folder: 'ADC' (4 files), 'T1 post' (4), 'T2 TSE' (4)",
                   "put one series per folder or name the folder after the modality")
    assert files_under(tmp_path / "out2") == []


def test_folder_layout_with_dicom_subfolders_verifies_and_trains(tmp_path, capsys):
    root = tmp_path / "ds"
    for k in range(4):
        write_dicom(root / f"c{k}" / "T1C", _array(10 + k), "T1 post")
        write_nifti(root / f"c{k}" / "t2w.nii.gz", _array(20 + k))  # other letter case than declared
        label = np.zeros(SHAPE, np.uint8)
        label[4:10, 5:11, :] = 1
        write_nifti(root / f"c{k}" / "label.nii.gz", label)
    (root / "modalseg.json").write_text(json.dumps({"modalities": ["T1C", "T2W"],
                                                    "labels": {"background": 0, "mass": 1}}))
    code, out, err = run_cli(capsys, ["verify", str(root)])
    assert code == 0 and err == [] and out.rstrip().endswith("OK"), (out, err)
    code, _, err = run_cli(capsys, train_args(root, tmp_path / "run", "--set", "max_steps=1"))
    assert code == 0, err


# ------------------------------------------------------------------------------------------------ 4D files
def _msd_4d(root: Path, n: int = 4) -> Path:
    """A Decathlon-style dataset: one 4D file (16x16x2x2: FLAIR, T1w) per case, dataset.json in MSD v1 spelling."""
    for k in range(n):
        _img(root / "imagesTr" / f"BRATS_{k:03d}.nii.gz", shape=(16, 16, 2, 2), seed=k)
        _lab(root / "labelsTr" / f"BRATS_{k:03d}.nii.gz")
    cases = [f"BRATS_{k:03d}" for k in range(n)]
    meta = {"name": "BRATS", "modality": {"0": "FLAIR", "1": "T1w"}, "labels": {"0": "background", "1": "tumour"},
            "numTraining": n, "tensorImageSize": "4D",
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_msd_4d_dataset_verifies_trains_and_predicts(tmp_path, capsys):
    from modalseg.data.layouts import load_dataset

    ds = _msd_4d(tmp_path / "Task01_BrainTumour")
    spec = load_dataset(ds)
    assert spec.modalities == ["FLAIR", "T1w"]
    case = spec.cases[0]
    assert [(str(p), p.channel) for p in case.images] == [(str(ds / "imagesTr/BRATS_000.nii.gz"), k) for k in (0, 1)]
    four = np.asanyarray(nib.load(str(ds / "imagesTr/BRATS_000.nii.gz")).dataobj)
    np.testing.assert_array_equal(read_volume(case.images[1]).array, four[..., 1])
    code, out, err = run_cli(capsys, ["verify", str(ds)])
    assert code == 0 and err == [] and out.rstrip().endswith("OK"), (out, err)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, train_args(ds, run, "--set", "max_steps=1", "--model", "fuse_unet"))
    assert code == 0, err
    model = run / "fold_0" / "latest.pt"
    # predict on one 4D file: its channels are the modalities, same result as the channels as separate files
    code, out, err = _predict(capsys, model, [ds / "imagesTr/BRATS_000.nii.gz"], tmp_path / "out4d", "--probabilities")
    assert code == 0, err
    assert "BRATS_000.nii.gz: 4D image with 2 channels; channel 0 as FLAIR, 1 as T1w" in out
    split = tmp_path / "split"
    for k in (0, 1):
        _img(split / f"BRATS_000_{k:04d}.nii.gz", array=four[..., k].astype(np.float32))
    code, _, err = _predict(capsys, model, [split], tmp_path / "out3d", "--probabilities")
    assert code == 0, err
    pred = read_volume(tmp_path / "out4d" / "BRATS_000.nii.gz", kind="label")
    assert pred.shape == (16, 16, 2)
    np.testing.assert_array_equal(pred.array, read_volume(tmp_path / "out3d" / "BRATS_000.nii.gz", kind="label").array)
    np.testing.assert_allclose(read_volume(tmp_path / "out4d" / "BRATS_000_prob_tumour.nii.gz").array,
                               read_volume(tmp_path / "out3d" / "BRATS_000_prob_tumour.nii.gz").array, atol=1e-6)
    # a folder of 4D files (imagesTs-style): one case per file
    code, _, err = _predict(capsys, model, [ds / "imagesTr"], tmp_path / "outdir")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "outdir").iterdir()) == [f"BRATS_{k:03d}.nii.gz" for k in range(4)]
    # a 4D label is still refused
    bad = _img(ds / "labelsTr" / "BRATS_001.nii.gz", shape=(16, 16, 2, 2))
    code, _, err = run_cli(capsys, ["verify", str(ds)])
    assert_refused(code, err, bad, "4D image (shape (16, 16, 2, 2)) where a 3D volume is expected")


def test_4d_file_where_separate_files_are_expected_says_4d(ckpt, tmp_path, capsys):
    good = _img(tmp_path / "in" / "p_0000.nii.gz", seed=1)
    four = _img(tmp_path / "in" / "q.nii.gz", shape=(16, 16, 2, 2), seed=2)
    code, _, err = _predict(capsys, ckpt, [good, four], tmp_path / "out")
    assert_refused(code, err, four, "4D image (shape (16, 16, 2, 2)) with 2 channels",
                   "the model reads 2 separate images, one per modality (T1C, T2W)", "pass a 4D file alone")
    three = _img(tmp_path / "in" / "r.nii.gz", shape=(16, 16, 2, 3), seed=3)
    code, _, err = _predict(capsys, ckpt, [three], tmp_path / "out")
    assert_refused(code, err, three, "4D image (shape (16, 16, 2, 3)) with 3 channels",
                   "the model's dataset has 2 (T1C, T2W)")
    assert files_under(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------------ names and order
def _probabilities(capsys, ckpt: Path, inputs: list[Path], out: Path) -> tuple[np.ndarray, str]:
    code, printed, err = _predict(capsys, ckpt, inputs, out, "--probabilities")
    assert code == 0, err
    (prob,) = out.glob("*_prob_mass.nii.gz")
    return read_volume(prob).array, printed


def test_explicit_files_are_ordered_by_their_names(ckpt, tmp_path, capsys):
    t1c, t2w = _array(6, (16, 16, 2)), _array(7, (16, 16, 2))
    right, _ = _probabilities(capsys, ckpt, [write_nifti(tmp_path / "a" / "x1.nii.gz", t1c),
                                            write_nifti(tmp_path / "a" / "x2.nii.gz", t2w)], tmp_path / "o_right")
    # control: names that say nothing keep the given order, and the swap changes the result
    swapped, printed = _probabilities(capsys, ckpt, [tmp_path / "a" / "x2.nii.gz", tmp_path / "a" / "x1.nii.gz"],
                                      tmp_path / "o_swapped")
    assert "taking x2.nii.gz as T1C, x1.nii.gz as T2W (the order given: no input name says its modality)" in printed
    assert np.abs(swapped - right).max() > 1e-3
    # modality names (any letter case) and nnU-Net channel indices put wrongly ordered files right
    for name, (first, second) in {"names": ("case_T2W.nii.gz", "case_t1c.nii.gz"),
                                  "indices": ("p_0001.nii.gz", "p_0000.nii.gz"),
                                  "partly": ("t2w.nii.gz", "other.nii.gz")}.items():
        folder = tmp_path / name
        files = [write_nifti(folder / first, t2w), write_nifti(folder / second, t1c)]
        probs, printed = _probabilities(capsys, ckpt, files, tmp_path / f"o_{name}")
        np.testing.assert_allclose(probs, right, atol=1e-6)
        if name == "partly":
            assert "taking other.nii.gz as T1C, t2w.nii.gz as T2W (t2w.nii.gz by name" in printed
        else:
            assert f"reordered by name: taking {second} as T1C, {first} as T2W" in printed


@pytest.mark.parametrize(("names", "fragment"), [
    (("t1c.nii.gz", "T1C_copy.nii.gz"), "two inputs for modality T1C: t1c.nii.gz and T1C_copy.nii.gz; expected one "
                                        "image per modality (T1C, T2W), given t1c.nii.gz, T1C_copy.nii.gz"),
    (("t1c_t2w.nii.gz", "x.nii.gz"), "the name names 2 modalities (T1C, T2W)"),
    (("p_0000.nii.gz", "t1c_0001.nii.gz"), "the name says T1C but its channel index _0001 is T2W"),
])
def test_ambiguous_names_are_refused(ckpt, tmp_path, capsys, names, fragment):
    files = [_img(tmp_path / "in" / n, seed=k) for k, n in enumerate(names)]
    bad = files[1] if "two inputs" in fragment or "channel index" in fragment else files[0]
    code, _, err = _predict(capsys, ckpt, files, tmp_path / "out")
    assert_refused(code, err, bad, fragment)


def test_modality_files_in_a_folder_match_case_insensitively(ckpt, tmp_path, capsys):
    folder = tmp_path / "patient"
    _img(folder / "t1c.nii.gz", seed=1)
    _img(folder / "T2w.nii.gz", seed=2)
    code, _, err = _predict(capsys, ckpt, [folder], tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "patient.nii.gz").is_file()
    (folder / "T2w.nii.gz").unlink()
    code, _, err = _predict(capsys, ckpt, [folder], tmp_path / "out2")
    assert_refused(code, err, folder, "missing modality T2W", "(T1C, T2W", "found t1c.nii.gz")


# ------------------------------------------------------------------------------------------------ 2D stays 2D
@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
def test_2d_input_gives_2d_output_with_the_same_geometry(tmp_path, capsys, ext):
    model = tiny_checkpoint(tmp_path / "one.pt", modalities=("T1C",), model="unet")
    img = sitk.GetImageFromArray(_array(8, (16, 12)).astype(np.float32).T)  # (y, x) = (12, 16)
    img.SetOrigin((5.5, -3.25))
    img.SetSpacing((0.7, 0.9))
    img.SetDirection((np.cos(0.4), -np.sin(0.4), np.sin(0.4), np.cos(0.4)))
    src = tmp_path / f"slice{ext}"
    sitk.WriteImage(img, str(src))
    code, _, err = _predict(capsys, model, [src], tmp_path / "out")
    assert code == 0, err
    out = sitk.ReadImage(str(tmp_path / "out" / f"slice{ext}"))  # the input's format by default
    img = sitk.ReadImage(str(src))  # as stored (NRRD keeps spacing x direction: 0.9 reads as 0.9000000000000001)
    assert out.GetDimension() == 2 and out.GetSize() == img.GetSize()
    assert out.GetOrigin() == img.GetOrigin() and out.GetSpacing() == img.GetSpacing()
    np.testing.assert_allclose(out.GetDirection(), img.GetDirection(), atol=1e-12)
    # an explicit --file-ending is honoured, still 2D, with the same world geometry
    code, _, err = _predict(capsys, model, [src], tmp_path / "out_nii", "--file-ending", ".nii.gz")
    assert code == 0, err
    nii = nib.load(str(tmp_path / "out_nii" / "slice.nii.gz"))
    assert nii.shape == (16, 12)
    np.testing.assert_allclose(nii.affine, read_volume(src).affine, atol=1e-6)
    np.testing.assert_array_equal(np.asanyarray(nii.dataobj),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"slice{ext}"))).T)
