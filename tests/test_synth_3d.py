"""The 3D synthetic datasets (SynthBreast3D, SynthCardiac3D), ``modalseg synth --dims 3``, and the 2D generators'
bytes, which must not change."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from modalseg.cli.main import main
from modalseg.data.io import read_volume
from modalseg.data.layouts import load_dataset
from modalseg.data.synth import (
    make_breast_dataset,
    make_breast_dataset_3d,
    make_cardiac_dataset,
    make_cardiac_dataset_3d,
    synth_breast_case_3d,
    synth_cardiac_case_3d,
)
from modalseg.data.synth.breast3d import rim_gain
from modalseg.data.verify import verify_dataset
from modalseg.errors import ConfigError
from test_protocols import _digest  # file digest, NIfTI hashed uncompressed

TINY = dict(size=16, slices=8)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# Recorded with the generators of the commit before the 3D generators existed (and checked against it): the
# slice generators' output for their existing arguments must not change a byte (conftest's datasets, golden runs).
SLICE_GENERATOR_SHA256 = {
    "breast_conftest": "f73b8ba534dbbc01f6487228888fa0f8ee32b9e78d580c47c1a91bbfc62f45ca",
    "breast_difficult": "77a656f29e1fe3da40651cdcce392a97522ca30e8d6a0ca75b4d8ff1d062a4b3",
    "cardiac_conftest": "29ee509036fe97c78133e5526c4b58f494f4abbfde073a604b612f26c1732748",
    "cardiac_gap": "5b3c4447d15b9d6c83b35a9f7cc0f5f1eafddaa35ddec891a8913a485a5010e9",
}


def test_slice_generators_write_the_same_bytes_as_before(tmp_path: Path) -> None:
    made = {
        "breast_conftest": make_breast_dataset(tmp_path / "a", num_patients=5, slices=3, size=32, seed=1),
        "breast_difficult": make_breast_dataset(tmp_path / "b", num_patients=3, slices=4, size=48, seed=7,
                                                difficulty=2.0),
        "cardiac_conftest": make_cardiac_dataset(tmp_path / "c", num_patients_per_modality=5, slices=3, size=32,
                                                 seed=2),
        "cardiac_gap": make_cardiac_dataset(tmp_path / "d", num_patients_per_modality=2, slices=4, size=40, seed=5,
                                            modality_gap=0.3, patients_per_modality={"CT": 3}),
    }
    assert {k: _digest(v) for k, v in made.items()} == SLICE_GENERATOR_SHA256


# ------------------------------------------------------------------------------------------------ breast 3D


@pytest.mark.parametrize("thickness", [None, 3.0, 6.5])
def test_breast_3d_loads_verifies_and_has_the_spacing(tmp_path: Path, thickness: float | None) -> None:
    out = make_breast_dataset_3d(tmp_path / "b", num_patients=2, size=16, slice_thickness_mm=thickness, seed=3)
    spec = load_dataset(out)
    assert spec.layout == "nnunet" and list(spec.modalities) == ["T1C", "T2W"] and len(spec.cases) == 2
    report = verify_dataset(spec)
    assert not report.problems, report.problems
    meta = json.loads((out / "dataset.json").read_text())
    synth = meta["modalseg_synth"]
    assert meta["name"] == "SynthBreast3D" and synth["dims"] == 3
    expected = (0.7, 0.7, 0.7 if thickness is None else thickness)
    assert tuple(synth["spacing"]) == pytest.approx(expected)
    for case in spec.cases:
        for path in (*case.images, case.label):
            img = nib.load(str(path))
            assert img.shape == (16, 16, synth["slices"])
            assert tuple(np.linalg.norm(img.affine[:3, :3], axis=0)) == pytest.approx(expected)
            assert img.header.get_xyzt_units()[0] == "mm" and int(img.header["qform_code"]) == 1
            assert np.allclose(img.affine @ [*((np.array(img.shape) - 1) / 2), 1], [0, 0, 0, 1], atol=1e-4)  # centred
        vol = read_volume(case.images[0])
        assert vol.spacing == pytest.approx(expected)
    if thickness == 6.5:
        assert synth["slices"] == 5  # the default covers the breasts: few thick slices


@pytest.mark.parametrize("kwargs", [dict(size=32), dict(size=32, slice_thickness_mm=6.5), dict(TINY)])
def test_every_breast_lesion_spans_at_least_three_slices(kwargs: dict) -> None:
    for seed in (0, 1):
        for index in range(4):
            case = synth_breast_case_3d(seed, index, **kwargs)
            assert case.label.any()
            components, n = ndimage.label(case.label)
            for k in range(1, n + 1):
                slices = np.flatnonzero((components == k).any(axis=(0, 1)))
                assert slices.size >= 3 and np.all(np.diff(slices) == 1), (seed, index, slices)
            for mass in case.info["masses"]:
                first, last = mass["slices"]
                assert last - first + 1 >= 3
            assert len(case.info["mass_slices"]) < case.label.shape[2] or case.label.shape[2] <= 5


def test_breast_3d_appearance_t1c_enhances_the_mass_and_its_rim() -> None:
    # the enhancement factor is highest on the surface of the mass, in 3D: the caps above and below too
    lab = np.zeros((15, 15, 15), dtype=bool)
    lab[2:13, 2:13, 2:13] = True
    for strong in (False, True):
        gain = rim_gain(lab, 6.0, strong, (1.0, 1.0, 1.0))
        assert gain[2, 7, 7] == gain[7, 7, 2] == gain[7, 7, 12] == pytest.approx(1.25 if strong else 1.1)
        assert gain[7, 7, 7] == pytest.approx(0.75 if strong else 0.9)
    # in the images: T1C shows the mass far above its surroundings, T2W much less (paper 1: T1C is sensitive)
    t1_ratio, t2_ratio = [], []
    for index in range(6):
        case = synth_breast_case_3d(5, index, size=32)
        lab = case.label.astype(bool)
        around = (ndimage.distance_transform_edt(~lab) <= 3) & ~lab
        t1_ratio.append(case.images["T1C"][lab].mean() / case.images["T1C"][around].mean())
        t2_ratio.append(case.images["T2W"][lab].mean() / case.images["T2W"][around].mean())
        assert case.images["T1C"].dtype == np.float32 and case.images["T1C"].shape == case.label.shape
    assert np.median(t1_ratio) > 1.8 and np.median(t1_ratio) > np.median(t2_ratio) + 0.4


def test_breast_3d_is_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    a = make_breast_dataset_3d(tmp_path / "a", num_patients=2, seed=4, **TINY)
    b = make_breast_dataset_3d(tmp_path / "b", num_patients=2, seed=4, **TINY)
    c = make_breast_dataset_3d(tmp_path / "c", num_patients=2, seed=5, **TINY)
    assert _files(a) == _files(b)
    assert _files(a) != _files(c)
    # a case does not depend on the number of cases
    one = synth_breast_case_3d(4, 1, **TINY)
    assert np.array_equal(np.asarray(nib.load(str(a / "labelsTr" / "breast3d_001.nii.gz")).dataobj), one.label)


# ------------------------------------------------------------------------------------------------ cardiac 3D


@pytest.mark.parametrize("thickness", [None, 6.5])
def test_cardiac_3d_loads_verifies_and_structures_span_slices(tmp_path: Path, thickness: float | None) -> None:
    out = make_cardiac_dataset_3d(tmp_path / "c", num_patients_per_modality=2, size=24, slice_thickness_mm=thickness,
                                  seed=1)  # from 24 pixels on, LV, Myo and RV all span three slices or more
    spec = load_dataset(out)
    assert not spec.paired and set(spec.modalities) == {"CT", "MR"} and len(spec.cases) == 4
    assert not verify_dataset(spec).problems
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["name"] == "SynthCardiac3D" and meta["paired"] is False
    assert meta["labels"] == {"background": 0, "LV": 500, "Myo": 200, "RV": 600}
    for case in spec.cases:
        img = nib.load(str(case.label))
        mod = meta["case_modality"][case.case_id]
        in_plane = {"CT": 0.75, "MR": 1.4}[mod]
        zooms = np.linalg.norm(img.affine[:3, :3], axis=0)
        assert tuple(zooms) == pytest.approx((in_plane, in_plane, thickness or in_plane))
        label = np.asarray(img.dataobj)
        assert label.dtype == np.uint16
        for value in (500, 200, 600):
            assert np.count_nonzero((label == value).any(axis=(0, 1))) >= 3, (case.case_id, value)
        # the LV closes at the apex: its cross-section shrinks from the base towards the apex
        areas = (label == 500).sum(axis=(0, 1))
        present = np.flatnonzero(areas)
        assert areas[present[0]] < areas[present].max() or areas[present[-1]] < areas[present].max()


def test_cardiac_3d_keeps_the_ct_mr_gap() -> None:
    ct = synth_cardiac_case_3d(0, "CT", 0, size=48)
    mr = synth_cardiac_case_3d(0, "MR", 0, size=48)
    near_ct = synth_cardiac_case_3d(0, "MR", 0, size=48, modality_gap=0.0)
    assert ct.images["CT"].dtype == np.int16 and mr.images["MR"].dtype == np.float32
    assert np.array_equal(mr.label, near_ct.label)  # the gap changes contrast, never anatomy

    def myo_over_lv(case, mod):
        img = case.images[mod].astype(np.float64)
        return img[case.label == 200].mean() / img[case.label == 500].mean()

    ct_hu = ct.images["CT"].astype(np.float64)
    assert ct_hu[ct.label == 500].mean() > 200 and 50 < ct_hu[ct.label == 200].mean() < 200  # HU-like
    # bSSFP: a dark myocardium against the blood pool; modality gap 0 gives MR the (weaker) CT-like contrast
    assert myo_over_lv(mr, "MR") < myo_over_lv(near_ct, "MR") - 0.2
    assert mr.images["MR"].min() >= 0.0 and ct_hu.min() < -900  # MR magnitudes; CT air at about -1000 HU
    # different subjects: the modalities have their own random streams
    assert not np.array_equal(ct.label, mr.label)


def test_cardiac_3d_is_deterministic(tmp_path: Path) -> None:
    kw = dict(num_patients_per_modality=1, size=16, seed=2, patients_per_modality={"MR": 2})
    a = make_cardiac_dataset_3d(tmp_path / "a", **kw)
    b = make_cardiac_dataset_3d(tmp_path / "b", **kw)
    assert _files(a) == _files(b)
    meta = json.loads((a / "dataset.json").read_text())
    assert sorted(meta["case_modality"].values()) == ["CT", "MR", "MR"]


def test_3d_parameters_are_checked_in_one_line() -> None:
    for call in (
        lambda: synth_breast_case_3d(0, 0, size=8),
        lambda: synth_breast_case_3d(0, 0, size=16, slices=2),
        lambda: synth_breast_case_3d(0, 0, size=16, slice_thickness_mm=-1.0),
        lambda: synth_cardiac_case_3d(0, "PET", 0, size=16),
    ):
        with pytest.raises(ConfigError) as err:
            call()
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_synth_dims_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    argv = ["synth", "breast", "--dims", "3", "--output", str(out), "--patients", "1", "--size", "16",
            "--slice-thickness", "2.5"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "SynthBreast3D" in printed and "0.7x0.7x2.5 mm" in printed
    assert main(["verify", str(out)]) == 0
    capsys.readouterr()
    c = tmp_path / "c"
    assert main(["synth", "cardiac", "--dims", "3", "-o", str(c), "--patients", "1", "--size", "16",
                 "--slices", "6", "--in-plane", "1.0"]) == 0
    assert "CT 16x16x6 voxels of 1x1x1 mm" in capsys.readouterr().out
    assert main(["verify", str(c)]) == 0
    capsys.readouterr()
    assert main(["synth", "breast", "-o", str(tmp_path / "x"), "--slice-thickness", "3"]) == 2
    assert "--dims 3" in capsys.readouterr().err
