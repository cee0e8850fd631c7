"""Issue 12 item 5: ``modalseg predict --output-format dicom-seg`` writes one DICOM Segmentation per case.

The SEG must give back the label volume of the same predict's NIfTI output voxel for voxel, on the grid of the
source series (whatever the order of its files), name the model's classes, refer to the source images, and be
refused in one line for a non-DICOM input or without the optional extra. Series are tiny (16x16x4, written with
SimpleITK by ``write_dicom``), models tiny (``tiny_checkpoint``). Tests that need highdicom skip without it.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modalseg import __version__
from modalseg.data.io import dicom_series, read_volume
from modalseg.training.checkpoint import load_checkpoint, save_checkpoint
from test_dicom_4d_names import DIRECTION, SHAPE, _array, write_dicom, write_nifti
from test_reliability import _predict, assert_no_temp_files, assert_refused, files_under, tiny_checkpoint

THREE = {"background": 0, "mass": 1, "edema": 3}  # label values need not be the segment numbers (1, 2)


def seg_checkpoint(path: Path, labels: dict[str, int] | None = None) -> Path:
    """A tiny model whose prediction holds every class over a good part of each slice: the random head's weights
    scaled up (class by feature direction, not by its near-equal biases) and the foreground biases raised."""
    tiny_checkpoint(path, labels=labels)
    state = load_checkpoint(path)
    state["model_state"]["decoder.head.weight"] *= 1000.0
    bias = state["model_state"]["decoder.head.bias"]
    bias[:] = torch.tensor([0.0] + [10.0] * (len(bias) - 1))
    save_checkpoint(state, path)
    return path


def write_series(folder: Path, array: np.ndarray, description: str, study: str, **kwargs) -> Path:
    """A series as a scanner writes it: ``write_dicom``'s files given one study, one frame of reference and a
    patient (GDCM gives each file written alone its own StudyInstanceUID and no FrameOfReferenceUID)."""
    pydicom = pytest.importorskip("pydicom")
    write_dicom(folder, array, description, **kwargs)
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = study
        ds.FrameOfReferenceUID = f"{study}.1"
        ds.PatientID, ds.PatientName, ds.SeriesNumber = "P7", "Test^Patient", 3
        ds.save_as(f)
    return folder


def write_study(root: Path, *, t1c_kwargs: dict | None = None) -> Path:
    """``root/T1C`` (files numbered against the slice positions unless told otherwise) and ``root/T2W``."""
    write_series(root / "T1C", _array(1), "ax T1 post", "1.2.826.0.1.3680043.2.1125.9.1",
                 **(t1c_kwargs if t1c_kwargs is not None else {"reverse": True}))
    write_series(root / "T2W", _array(2), "T2 TSE", "1.2.826.0.1.3680043.2.1125.9.1")
    return root



@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return seg_checkpoint(tmp_path_factory.mktemp("ckpt") / "seg.pt")


def _source_slice(volume: np.ndarray, pixels: np.ndarray) -> int:
    """Which slice of the volume (x, y, z as read) a source image is, found by its pixels alone (no geometry)."""
    hits = [k for k in range(volume.shape[2]) if np.array_equal(volume[:, :, k].T, pixels)]
    assert len(hits) == 1, hits
    return hits[0]


# ------------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("order", ["instance numbers reversed", "slice axis flipped"])
def test_dicom_seg_gives_back_the_nifti_labels_voxel_for_voxel(ckpt, tmp_path, capsys, order):
    pytest.importorskip("highdicom")
    import pydicom

    from modalseg.data.dicom_seg import read_dicom_seg

    flipped = {"direction": DIRECTION @ np.diag([1.0, 1.0, -1.0])}  # slices stepping against the normal
    study = write_study(tmp_path / "STUDY", t1c_kwargs=flipped if order == "slice axis flipped" else None)
    code, _, err = _predict(capsys, ckpt, [study], tmp_path / "nifti")
    assert code == 0, err
    code, printed, err = _predict(capsys, ckpt, [study], tmp_path / "seg", "--output-format", "dicom-seg")
    assert code == 0 and err == [], err
    seg_path = tmp_path / "seg" / "STUDY.dcm"
    assert f"STUDY: {seg_path}" in printed
    expected = read_volume(tmp_path / "nifti" / "STUDY.nii.gz", kind="label").array
    assert set(np.unique(expected)) == {0, 1}
    for k in range(SHAPE[2]):  # a label map worth checking: both classes in every slice
        assert 20 < int((expected[:, :, k] == 1).sum()) < 200
    np.testing.assert_array_equal(read_dicom_seg(seg_path, study / "T1C"), expected)
    # the same without modalseg's geometry: each SEG frame against the slice its source image is, found by pixels
    seg = pydicom.dcmread(seg_path)
    image = read_volume(study / "T1C").array
    by_uid = {str(d.SOPInstanceUID): d for d in map(pydicom.dcmread, sorted((study / "T1C").glob("*.dcm")))}
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), 16, 16)
    seen = set()
    shared = seg.SharedFunctionalGroupsSequence[0]
    for group, frame in zip(seg.PerFrameFunctionalGroupsSequence, frames, strict=True):
        uid = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        segment = (group if "SegmentIdentificationSequence" in group else shared).SegmentIdentificationSequence[0]
        assert segment.ReferencedSegmentNumber == 1
        k = _source_slice(image, by_uid[uid].pixel_array)
        np.testing.assert_array_equal(frame, (expected[:, :, k] == 1).T.astype(np.uint8))
        seen.add(k)
    assert seen == set(range(SHAPE[2]))


def test_dicom_seg_names_the_classes_and_refers_to_the_source_series(tmp_path, capsys):
    hd = pytest.importorskip("highdicom")
    import pydicom

    from modalseg.data.dicom_seg import read_dicom_seg

    model = seg_checkpoint(tmp_path / "three.pt", labels=THREE)
    study = write_study(tmp_path / "STUDY")
    code, _, err = _predict(capsys, model, [study], tmp_path / "nifti", "--probabilities")
    assert code == 0, err
    code, _, err = _predict(capsys, model, [study], tmp_path / "seg", "--output-format", "dicom-seg",
                            "--probabilities")
    assert code == 0 and err == [], err
    # the labels as CASE.dcm; probabilities stay images (.nii.gz for DICOM input), the same as in image mode
    names = ["STUDY.dcm", "STUDY_prob_background.nii.gz", "STUDY_prob_edema.nii.gz", "STUDY_prob_mass.nii.gz"]
    assert [p.name for p in files_under(tmp_path / "seg")] == names
    np.testing.assert_array_equal(read_volume(tmp_path / "seg" / "STUDY_prob_edema.nii.gz").array,
                                  read_volume(tmp_path / "nifti" / "STUDY_prob_edema.nii.gz").array)
    expected = read_volume(tmp_path / "nifti" / "STUDY.nii.gz", kind="label").array
    assert set(np.unique(expected)) == {0, 1, 3}
    seg_path = tmp_path / "seg" / "STUDY.dcm"
    np.testing.assert_array_equal(read_dicom_seg(seg_path, study / "T1C", labels=THREE), expected)
    numbers = read_dicom_seg(seg_path, study / "T1C")  # no classes given: segment numbers
    np.testing.assert_array_equal(numbers, np.select([expected == 1, expected == 3], [1, 2], 0))

    seg = pydicom.dcmread(seg_path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "mass"), (2, "edema")]
    for s in seg.SegmentSequence:
        for code_item in (s.SegmentedPropertyCategoryCodeSequence[0], s.SegmentedPropertyTypeCodeSequence[0]):
            assert (code_item.CodeValue, code_item.CodingSchemeDesignator, code_item.CodeMeaning) == (
                "85756007", "SCT", "Tissue")
        assert s.SegmentAlgorithmType == "AUTOMATIC" and s.SegmentAlgorithmName == "modalseg"
    assert seg.Manufacturer == "modalseg" and seg.ManufacturerModelName == "fuse_unet"
    assert str(seg.SoftwareVersions) == __version__
    # refers to the master modality's series (T1C), every one of its images, in its study and frame of reference
    (t1c,) = dicom_series(study / "T1C")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in t1c.files]
    (ref_series,) = seg.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == t1c.uid
    assert {str(i.ReferencedSOPInstanceUID) for i in ref_series.ReferencedInstanceSequence} == {
        str(d.SOPInstanceUID) for d in sources}
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID and seg.PatientID == "P7"
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.SeriesInstanceUID != t1c.uid and seg.SOPInstanceUID not in {d.SOPInstanceUID for d in sources}
    assert seg.SeriesNumber == 1003
    # highdicom reads it as the segmentation it wrote
    back = hd.seg.segread(seg_path)
    assert back.number_of_segments == 2 and back.get_segment_description(2).segment_label == "edema"


def test_empty_prediction_still_gives_a_readable_seg(tmp_path, capsys):
    pytest.importorskip("highdicom")
    from modalseg.data.dicom_seg import read_dicom_seg

    model = tiny_checkpoint(tmp_path / "empty.pt", bias={0: 5.0, 1: -5.0})  # background everywhere
    study = write_study(tmp_path / "STUDY")
    code, _, err = _predict(capsys, model, [study], tmp_path / "seg", "--output-format", "dicom-seg")
    assert code == 0 and err == [], err  # highdicom's notice about empty frames is not shown
    labels = read_dicom_seg(tmp_path / "seg" / "STUDY.dcm", study / "T1C")
    assert labels.shape == SHAPE and not labels.any()


# ------------------------------------------------------------------------------------------------ refusals
def test_refused_for_an_input_that_is_not_a_dicom_series(ckpt, tmp_path, capsys):
    pytest.importorskip("highdicom")
    folder = tmp_path / "patient"
    write_nifti(folder / "T1C.nii.gz", _array(1))
    write_nifti(folder / "T2W.nii.gz", _array(2))
    code, _, err = _predict(capsys, ckpt, [folder], tmp_path / "out", "--output-format", "dicom-seg")
    assert_refused(code, err, folder / "T1C.nii.gz", "--output-format dicom-seg: case patient's T1C input is not a "
                   "DICOM series", "use --output-format image")
    assert files_under(tmp_path / "out") == []


def test_refused_without_highdicom_and_for_an_unknown_format(ckpt, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "patient"
    write_nifti(folder / "T1C.nii.gz", _array(1))
    write_nifti(folder / "T2W.nii.gz", _array(2))
    code, _, err = _predict(capsys, ckpt, [folder], tmp_path / "out", "--output-format", "dicom")
    assert_refused(code, err, "--output-format", "must be image or dicom-seg, got 'dicom'")
    monkeypatch.setitem(sys.modules, "highdicom", None)  # `import highdicom` raises ImportError
    code, _, err = _predict(capsys, ckpt, [folder], tmp_path / "out", "--output-format", "dicom-seg")
    assert_refused(code, err, "--output-format dicom-seg", "needs highdicom and pydicom (highdicom is not installed)",
                   "pip install 'modalseg[dicom]'")
    assert not (tmp_path / "out").exists()


def test_refused_for_a_series_without_frame_of_reference(ckpt, tmp_path, capsys):
    pytest.importorskip("highdicom")
    study = tmp_path / "STUDY"
    write_dicom(study / "T1C", _array(1), "T1")  # GDCM alone: no FrameOfReferenceUID
    write_dicom(study / "T2W", _array(2), "T2")
    code, _, err = _predict(capsys, ckpt, [study], tmp_path / "out", "--output-format", "dicom-seg")
    first = sorted((study / "T1C").glob("*.dcm"))[0]
    assert_refused(code, err, first, "DICOM series 'T1': no FrameOfReferenceUID in this file")
    assert files_under(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------------ outputs
def test_outputs_never_overwrite_or_join_the_input_series(ckpt, tmp_path, capsys):
    pytest.importorskip("highdicom")
    study = write_study(tmp_path / "STUDY")
    (t1c,) = dicom_series(study / "T1C")
    named = Path(t1c.files[0]).rename(study / "T1C" / "STUDY.dcm")  # a source image named as the output would be
    before = {p: p.read_bytes() for p in files_under(study)}
    code, _, err = _predict(capsys, ckpt, [study], study / "T1C", "--output-format", "dicom-seg")
    assert_refused(code, err, named, "refused: the output for case 'STUDY' would overwrite the input file")
    code, _, err = _predict(capsys, ckpt, [study], study / "T2W", "--output-format", "dicom-seg")
    assert_refused(code, err, study / "T2W" / "STUDY.dcm", "the DICOM-SEG of case 'STUDY' would be written into the "
                   f"input DICOM folder {study / 'T2W'}; choose another --output")
    assert {p: p.read_bytes() for p in files_under(study)} == before


def test_seg_is_written_atomically(ckpt, tmp_path, capsys, monkeypatch):
    pytest.importorskip("highdicom")
    import pydicom

    study = write_study(tmp_path / "STUDY")
    out = tmp_path / "out"
    code, _, err = _predict(capsys, ckpt, [study], out, "--output-format", "dicom-seg")
    assert code == 0, err
    assert [p.name for p in files_under(out)] == ["STUDY.dcm"]
    assert_no_temp_files(out)
    good = (out / "STUDY.dcm").read_bytes()

    def full_disk(self, filename, *args, **kwargs):  # half a file, then the disk is full
        Path(filename).write_bytes(good[: len(good) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", full_disk)
    code, _, err = _predict(capsys, ckpt, [study], out, "--output-format", "dicom-seg")
    assert_refused(code, err, out / "STUDY.dcm", "cannot write (No space left on device)")
    assert (out / "STUDY.dcm").read_bytes() == good  # the previous file is intact, no partial or temporary file
    assert [p.name for p in files_under(out)] == ["STUDY.dcm"]
    assert_no_temp_files(out)
