"""Tests of modalseg.data.layouts: each layout built in tmp_path, auto-detection, bad dataset.json."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from modalseg.data.layouts import MMWHS_LABELS, detect_layout, load_dataset
from modalseg.errors import DataError


def _vol(path: Path, value: int = 1, dtype=np.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((8, 8, 2), value, dtype=dtype)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return path


def _nnunet(root: Path, cases=("b_case", "a_case"), channels=("T1C", "T2W"), **extra) -> Path:
    for case in cases:
        for i in range(len(channels)):
            _vol(root / "imagesTr" / f"{case}_{i:04d}.nii.gz")
        _vol(root / "labelsTr" / f"{case}.nii.gz", dtype=np.uint8)
    meta = {
        "channel_names": {str(i): c for i, c in enumerate(channels)},
        "labels": {"background": 0, "mass": 1},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    meta.update(extra)
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_nnunet_paired(tmp_path):
    root = _nnunet(tmp_path / "ds", name="Breast", case_patient={"a_case": "P1", "b_case": "P1"})
    spec = load_dataset(root)
    assert spec.layout == "nnunet" and spec.paired and spec.name == "Breast"
    assert spec.modalities == ["T1C", "T2W"]
    assert spec.labels == {"background": 0, "mass": 1}
    assert [c.case_id for c in spec.cases] == ["a_case", "b_case"]  # sorted
    first = spec.cases[0]
    assert first.images == (root / "imagesTr/a_case_0000.nii.gz", root / "imagesTr/a_case_0001.nii.gz")
    assert first.label == root / "labelsTr/a_case.nii.gz"
    assert first.patient_id == "P1" and first.modality is None


def test_nnunet_missing_channel_is_declared(tmp_path):
    root = _nnunet(tmp_path / "ds")
    (root / "imagesTr/a_case_0001.nii.gz").unlink()
    spec = load_dataset(root, "nnunet")
    # still listed, so that verify can report it
    assert spec.cases[0].images[1] == root / "imagesTr/a_case_0001.nii.gz"
    assert not spec.cases[0].images[1].exists()


def test_nnunet_test_split(tmp_path):
    root = _nnunet(tmp_path / "ds")
    with pytest.raises(DataError, match="imagesTs"):
        load_dataset(root, split="test")
    for i in range(2):
        _vol(root / "imagesTs" / f"t9_{i:04d}.nii.gz")
    spec = load_dataset(root, split="test")
    assert [c.case_id for c in spec.cases] == ["t9"] and spec.cases[0].label is None
    _vol(root / "labelsTs" / "t9.nii.gz", dtype=np.uint8)
    assert load_dataset(root, split="test").cases[0].label == root / "labelsTs/t9.nii.gz"


def test_nnunet_unpaired_with_custom_label_values(tmp_path):
    root = _nnunet(
        tmp_path / "ds",
        cases=("ct1", "mr1", "mr2"),
        channels=("image",),
        paired=False,
        modalities=["CT", "MR"],
        case_modality={"ct1": "CT", "mr1": "MR", "mr2": "MR"},
        labels={"background": 0, "LV": 500, "Myo": 200, "RV": 600},
        labels_to_background=[421],
    )
    spec = load_dataset(root)
    assert not spec.paired and spec.modalities == ["CT", "MR"]
    assert [c.modality for c in spec.cases] == ["CT", "MR", "MR"]
    assert all(len(c.images) == 1 for c in spec.cases)
    assert spec.label_lut() == {0: 0, 500: 1, 200: 2, 600: 3, 421: 0}
    assert [c.case_id for c in spec.cases_of("MR")] == ["mr1", "mr2"]


def test_nnunet_unpaired_case_without_modality(tmp_path):
    root = _nnunet(
        tmp_path / "ds",
        cases=("ct1", "mr1"),
        channels=("image",),
        paired=False,
        modalities=["CT", "MR"],
        case_modality={"ct1": "CT"},
    )
    with pytest.raises(DataError, match=r"dataset.json: key 'case_modality' has no entry for case 'mr1'"):
        load_dataset(root)


def test_msd_v1_style(tmp_path):
    root = tmp_path / "Task02_Heart"
    for case in ("la_003", "la_004"):
        _vol(root / "imagesTr" / f"{case}.nii.gz")
        _vol(root / "labelsTr" / f"{case}.nii.gz", dtype=np.uint8)
    meta = {
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "left atrium"},
        "numTraining": 2,
        "training": [
            {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
            for c in ("la_003", "la_004")
        ],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    spec = load_dataset(root)
    assert spec.modalities == ["MRI"] and spec.labels == {"background": 0, "left atrium": 1}
    assert spec.cases[0].images == (root / "imagesTr/la_003.nii.gz",)
    assert spec.cases[1].label == root / "labelsTr/la_004.nii.gz"


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"drop": "channel_names"}, "missing key 'channel_names'"),
        ({"drop": "labels"}, "missing key 'labels'"),
        ({"drop": "file_ending"}, "missing key 'file_ending'"),
        ({"drop": "numTraining"}, "missing key 'numTraining'"),
        ({"numTraining": "2"}, "key 'numTraining' must be an integer, found string"),
        ({"numTraining": 3}, "numTraining is 3 but imagesTr has 2"),
        ({"labels": ["background", "mass"]}, "key 'labels' must be an object"),
        ({"labels": {"background": 0, "mass": "1"}}, "value of 'mass' must be an integer"),
        # region-based labels train (tests/test_ignore_regions.py) once the painting order is given
        ({"labels": {"background": 0, "whole": [1, 2], "core": 2}}, "'regions_class_order' is required"),
        ({"labels": {"background": 0, "mass": 1, "ignore": 1}}, "the ignore label 1 is also the value of 'mass'"),
        ({"labels": {"mass": 1, "background": 0}}, "first entry must be the background"),
        ({"channel_names": ["T1C", "T2W"]}, "key 'channel_names' must be"),
        ({"channel_names": {"0": "T1C", "2": "T2W"}}, "indices must be 0..N-1"),
        ({"file_ending": ".png"}, "unsupported file ending"),
        ({"file_ending": 3}, "key 'file_ending' must be"),
        ({"paired": "no"}, "key 'paired' must be true or false"),
        ({"case_patient": ["x"]}, "key 'case_patient' must be an object"),
    ],
)
def test_bad_dataset_json(tmp_path, change, pattern):
    root = _nnunet(tmp_path / "ds")
    meta = json.loads((root / "dataset.json").read_text())
    if "drop" in change:
        del meta[change["drop"]]
    else:
        meta.update(change)
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=pattern) as info:
        load_dataset(root)
    assert str(root / "dataset.json") in str(info.value)
    assert "\n" not in str(info.value)


def test_invalid_json_reports_line_and_column(tmp_path):
    root = _nnunet(tmp_path / "ds")
    (root / "dataset.json").write_text('{\n  "labels": {"background": 0,}\n}')
    with pytest.raises(DataError, match=r"dataset.json: invalid JSON at line 2, column \d+"):
        load_dataset(root)


def test_nnunet_file_without_channel_index(tmp_path):
    root = _nnunet(tmp_path / "ds")
    _vol(root / "imagesTr" / "stray.nii.gz")
    with pytest.raises(DataError, match="stray.nii.gz: file name does not end in a 4-digit channel index"):
        load_dataset(root)


def test_nnunet_undeclared_channel(tmp_path):
    root = _nnunet(tmp_path / "ds")
    _vol(root / "imagesTr" / "a_case_0002.nii.gz")
    with pytest.raises(DataError, match="a_case_0002.nii.gz: channel 2 is not declared"):
        load_dataset(root)


def test_mscmrseg(tmp_path):
    root = tmp_path / "mscmr"
    for n in (10, 2, 1):
        for code in ("C0", "LGE", "T2"):
            _vol(root / "images" / f"patient{n}_{code}.nii.gz")
            if not (n == 10 and code == "LGE"):
                _vol(root / "labels" / f"patient{n}_{code}_manual.nii.gz", 200, np.int16)
    assert detect_layout(root) == "mscmrseg"
    spec = load_dataset(root)
    assert spec.layout == "mscmrseg" and not spec.paired
    assert spec.modalities == ["LGE", "bSSFP"]
    assert spec.labels == {"background": 0, "LV": 500, "Myo": 200, "RV": 600}
    assert [c.case_id for c in spec.cases] == [
        "patient1_LGE",
        "patient2_LGE",
        "patient1_C0",
        "patient2_C0",
        "patient10_C0",
    ]
    c = spec.cases[4]
    assert c.modality == "bSSFP" and c.patient_id == "patient10"
    assert c.images == (root / "images/patient10_C0.nii.gz",)
    assert c.label == root / "labels/patient10_C0_manual.nii.gz"
    test = load_dataset(root, "mscmrseg", split="test")
    assert [c.case_id for c in test.cases] == ["patient10_LGE"] and test.cases[0].label is None
    only = load_dataset(root, "mscmrseg", modalities=("bSSFP", "T2"))
    assert only.modalities == ["bSSFP", "T2"] and len(only.cases) == 6


def test_mmwhs(tmp_path):
    root = tmp_path / "mmwhs"
    for mod in ("ct", "mr"):
        for n in (1002, 1001):
            _vol(root / f"{mod}_train" / f"{mod}_train_{n}_image.nii.gz")
            _vol(root / f"{mod}_train" / f"{mod}_train_{n}_label.nii.gz", 205, np.int16)
    (root / "mr_train" / "mr_train_1002_label.nii.gz").unlink()
    assert detect_layout(root) == "mmwhs"
    spec = load_dataset(root)
    assert spec.modalities == ["CT", "MR"] and not spec.paired
    assert spec.labels == MMWHS_LABELS and spec.num_classes == 5
    assert set(spec.labels_to_background) == {550, 600, 850, 421}
    assert [c.case_id for c in spec.cases] == [
        "ct_train_1001",
        "ct_train_1002",
        "mr_train_1001",
        "mr_train_1002",
    ]
    assert spec.cases[3].label == root / "mr_train/mr_train_1002_label.nii.gz"  # declared though missing
    assert spec.label_lut()[600] == 0 and spec.label_lut()[820] == 4
    assert load_dataset(root, "mmwhs", labels_to_background=(550,)).labels_to_background == (550,)


def test_folder(tmp_path):
    root = tmp_path / "fold"
    for case in ("c2", "c1"):
        _vol(root / case / "T1C.nii.gz")
        _vol(root / case / "T2W.nii.gz")
        _vol(root / case / "label.nii.gz", dtype=np.uint8)
    (root / "modalseg.json").write_text(
        json.dumps(
            {
                "modalities": ["T1C", "T2W"],
                "labels": {"background": 0, "mass": 1},
                "case_patient": {"c1": "p"},
            }
        )
    )
    spec = load_dataset(root)
    assert spec.layout == "folder" and spec.paired and spec.modalities == ["T1C", "T2W"]
    assert [c.case_id for c in spec.cases] == ["c1", "c2"]
    assert spec.cases[0].images == (root / "c1/T1C.nii.gz", root / "c1/T2W.nii.gz")
    assert spec.cases[0].label == root / "c1/label.nii.gz"
    assert [c.patient_id for c in spec.cases] == ["p", "c2"]


def test_folder_bad_json(tmp_path):
    root = tmp_path / "fold"
    root.mkdir()
    (root / "modalseg.json").write_text(json.dumps({"labels": {"background": 0}}))
    with pytest.raises(DataError, match="modalseg.json: missing key 'modalities'"):
        load_dataset(root)


def test_auto_fails_with_tried_layouts(tmp_path):
    (tmp_path / "x.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match="tried nnunet.*folder.*mscmrseg.*mmwhs"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="dataset folder not found"):
        load_dataset(tmp_path / "missing")
