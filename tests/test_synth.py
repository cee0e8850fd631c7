"""Tests of the built-in synthetic datasets (modalseg.data.synth) and the ``modalseg synth`` command."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage, stats

from modalseg.cli.main import main
from modalseg.data.synth import (
    make_breast_dataset,
    make_cardiac_dataset,
    raw_dataset_writer,
    synth_breast_case,
    synth_cardiac_case,
)
from modalseg.errors import ConfigError, OutputError

SMALL = dict(slices=4, size=48)


def _load(path: Path) -> nib.Nifti1Image:
    return nib.load(str(path))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ breast


def test_breast_case_is_deterministic_and_seed_dependent():
    a = synth_breast_case(3, 1, **SMALL)
    b = synth_breast_case(3, 1, **SMALL)
    c = synth_breast_case(4, 1, **SMALL)
    for name in ("T1C", "T2W"):
        assert a.images[name].tobytes() == b.images[name].tobytes()
        assert not np.array_equal(a.images[name], c.images[name])
    assert np.array_equal(a.label, b.label)
    assert np.array_equal(a.affine, b.affine)
    # a case does not depend on how many cases are generated: patient 1 is its own random stream
    assert not np.array_equal(a.images["T1C"], synth_breast_case(3, 0, **SMALL).images["T1C"])


def test_breast_dataset_layout_labels_and_geometry(tmp_path):
    out = make_breast_dataset(tmp_path / "breast", num_patients=3, seed=0, **SMALL)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["name"] == "SynthBreast"
    assert meta["channel_names"] == {"0": "T1C", "1": "T2W"}
    assert meta["labels"] == {"background": 0, "mass": 1}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    assert meta["modalseg_synth"]["seed"] == 0 and meta["modalseg_synth"]["size"] == 48
    assert isinstance(meta["description"], str)
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        f"breast_{i:03d}_{c:04d}.nii.gz" for i in range(3) for c in range(2)
    ]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [
        f"breast_{i:03d}.nii.gz" for i in range(3)
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers

    all_values = set()
    spacings = set()
    for i in range(3):
        lab_img = _load(out / "labelsTr" / f"breast_{i:03d}.nii.gz")
        lab = np.asarray(lab_img.dataobj)
        assert lab.dtype == np.uint8 and lab.shape == (48, 48, 4)
        all_values |= set(np.unique(lab).tolist())
        per_slice = lab.reshape(-1, 4).any(axis=0)
        assert per_slice.any(), "every patient has a mass"
        assert not per_slice.all(), "every patient has a slice without mass"
        zooms = np.linalg.norm(lab_img.affine[:3, :3], axis=0)
        assert 0.6 <= zooms[0] <= 0.8 and zooms[0] == pytest.approx(zooms[1]) and 1.0 <= zooms[2] <= 2.0
        assert lab_img.header.get_xyzt_units()[0] == "mm"
        spacings.add(round(float(zooms[2]), 4))
        for c in range(2):
            img = _load(out / "imagesTr" / f"breast_{i:03d}_{c:04d}.nii.gz")
            assert img.get_data_dtype() == np.float32 and img.shape == (48, 48, 4)
            assert np.allclose(img.affine, lab_img.affine)
            assert np.isfinite(np.asarray(img.dataobj)).all()
        assert meta["modalseg_synth"]["cases"][f"breast_{i:03d}"]["spacing"][2] == pytest.approx(
            zooms[2], abs=1e-3
        )
    assert all_values == {0, 1}
    assert len(spacings) == 3, "spacing varies between patients"


def test_breast_dataset_files_are_byte_identical_for_a_seed(tmp_path):
    a = make_breast_dataset(tmp_path / "a", num_patients=2, seed=5, **SMALL)
    b = make_breast_dataset(tmp_path / "b", num_patients=2, seed=5, **SMALL)
    c = make_breast_dataset(tmp_path / "c", num_patients=2, seed=6, **SMALL)
    assert _files(a) == _files(b)
    fa, fc = _files(a), _files(c)
    assert fa.keys() == fc.keys()
    assert all(fa[k] != fc[k] for k in fa if k.endswith(".nii.gz"))


def _precision_recall(cases, rule) -> tuple[float, float]:
    tp = fp = pos = 0
    for case in cases:
        pred, truth = rule(case), case.label > 0
        tp += int((pred & truth).sum())
        fp += int((pred & ~truth).sum())
        pos += int(truth.sum())
    return tp / max(tp + fp, 1), tp / max(pos, 1)


def _norm(x: np.ndarray) -> np.ndarray:
    """Per-case scaling by the median body intensity (what any intensity normalisation would do)."""
    body = x > 0.08 * np.percentile(x, 99.5)
    return x / np.median(x[body])


def test_breast_mechanism_t1c_false_positives_ruled_out_by_t2w():
    """Paper 1, Fig. 2: T1C alone highlights masses AND distractors; T2W removes the distractors."""
    kw = dict(slices=6, size=64)
    train = [synth_breast_case(1, i, **kw) for i in range(6)]  # thresholds learnt on other patients
    test = [synth_breast_case(0, i, **kw) for i in range(6)]
    t1_mass = np.concatenate([_norm(c.images["T1C"])[c.label > 0] for c in train])
    t2_mass = np.concatenate([_norm(c.images["T2W"])[c.label > 0] for c in train])
    t1_thr = np.percentile(t1_mass, 10)
    t2_lo, t2_hi = np.percentile(t2_mass, [2, 98])

    def t1_only(c):
        return _norm(c.images["T1C"]) > t1_thr

    def t2_in_mass_range(c):
        t2 = _norm(c.images["T2W"])
        return (t2 >= t2_lo) & (t2 <= t2_hi)

    p1, r1 = _precision_recall(test, t1_only)
    p2, r2 = _precision_recall(test, lambda c: t1_only(c) & t2_in_mass_range(c))
    p3, r3 = _precision_recall(test, t2_in_mass_range)
    assert r1 > 0.6, "T1C is sensitive"
    assert p1 < 0.25, f"T1C alone should give many false positives (precision {p1:.3f})"
    assert p2 > 0.4 and p2 > 3 * p1, f"adding the T2W rule should raise precision ({p1:.3f} -> {p2:.3f})"
    assert r2 > 0.85 * r1, f"the T2W rule should keep most of the recall ({r1:.3f} -> {r2:.3f})"
    assert p3 < 0.1, f"masses must not be separable by T2W alone (precision {p3:.3f})"
    assert r3 > 0.8


def test_breast_difficulty_raises_noise():
    easy = synth_breast_case(0, 0, difficulty=0.3, **SMALL)
    hard = synth_breast_case(0, 0, difficulty=2.5, **SMALL)
    corner = (slice(0, 8), slice(40, 48))  # anterior corner: air
    for name in ("T1C", "T2W"):
        assert easy.images[name][corner].std() < hard.images[name][corner].std()


def test_breast_single_slice_and_bad_parameters(tmp_path):
    case = synth_breast_case(0, 0, slices=1, size=32)
    assert case.label.shape == (32, 32, 1) and case.label.any()
    with pytest.raises(ConfigError):
        synth_breast_case(0, 0, size=16)
    with pytest.raises(ConfigError):
        make_breast_dataset(tmp_path / "x", num_patients=0)
    with pytest.raises(ConfigError):
        make_breast_dataset(tmp_path / "x", difficulty=-1.0)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ cardiac


def test_cardiac_dataset_layout_and_labels(tmp_path):
    out = make_cardiac_dataset(tmp_path / "cardiac", num_patients_per_modality=2, seed=0, **SMALL)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["name"] == "SynthCardiac"
    assert meta["channel_names"] == {"0": "image"}
    assert meta["labels"] == {"background": 0, "LV": 500, "Myo": 200, "RV": 600}
    assert meta["paired"] is False and meta["modalities"] == ["CT", "MR"]
    assert meta["case_modality"] == {"ct_000": "CT", "ct_001": "CT", "mr_000": "MR", "mr_001": "MR"}
    assert meta["numTraining"] == 4 and meta["file_ending"] == ".nii.gz"
    values = set()
    for case_id, mod in meta["case_modality"].items():
        img = _load(out / "imagesTr" / f"{case_id}_0000.nii.gz")
        lab = _load(out / "labelsTr" / f"{case_id}.nii.gz")
        arr, y = np.asarray(img.dataobj), np.asarray(lab.dataobj)
        assert y.dtype == np.uint16 and y.shape == arr.shape == (48, 48, 4)
        assert np.allclose(img.affine, lab.affine)
        zooms = np.linalg.norm(img.affine[:3, :3], axis=0)
        assert zooms[2] > 3 * zooms[0], "short-axis slices are thick"
        values |= set(np.unique(y).tolist())
        if mod == "CT":
            assert arr.dtype == np.int16 and arr.min() <= -900 and arr.max() <= 500
        else:
            assert arr.dtype == np.float32 and arr.min() >= 0
    assert values == {0, 200, 500, 600}
    assert not (out / "imagesTr" / "ct_000_0001.nii.gz").exists()


def test_cardiac_anatomy_myocardium_surrounds_lv_and_rv_is_separate():
    for mod in ("CT", "MR"):
        y = synth_cardiac_case(2, mod, 0, **SMALL).label
        for k in range(y.shape[2]):
            lv, myo, rv = y[..., k] == 500, y[..., k] == 200, y[..., k] == 600
            assert lv.any() and myo.any()
            grown = ndimage.binary_dilation(lv)
            assert not (grown & ~(lv | myo)).any(), "LV blood pool is enclosed by myocardium"
            assert not (ndimage.binary_dilation(rv) & lv).any(), "RV does not touch the LV blood pool"
        assert (y[..., 0] == 600).sum() > (y[..., -1] == 600).sum(), "RV tapers towards the apex"
        assert (y[..., 0] == 500).sum() > (y[..., -1] == 500).sum(), "LV shrinks towards the apex"


def test_cardiac_unpaired_subjects_and_streams():
    ct = [synth_cardiac_case(0, "CT", i, **SMALL) for i in range(3)]
    mr = [synth_cardiac_case(0, "MR", i, **SMALL) for i in range(3)]
    for a in ct:
        for b in mr:
            assert not np.array_equal(a.label, b.label), "CT and MR subjects differ (unpaired)"
    assert np.array_equal(ct[0].label, synth_cardiac_case(0, "ct", 0, **SMALL).label)
    assert ct[0].images["CT"].tobytes() == synth_cardiac_case(0, "CT", 0, **SMALL).images["CT"].tobytes()
    assert not np.array_equal(ct[0].label, synth_cardiac_case(1, "CT", 0, **SMALL).label)


def test_cardiac_modality_streams_are_independent(tmp_path):
    both = make_cardiac_dataset(tmp_path / "both", num_patients_per_modality=1, **SMALL)
    mr_only = make_cardiac_dataset(tmp_path / "mr", num_patients_per_modality=1, modalities=("MR",), **SMALL)
    assert (both / "imagesTr" / "mr_000_0000.nii.gz").read_bytes() == (
        mr_only / "imagesTr" / "mr_000_0000.nii.gz"
    ).read_bytes()
    meta = json.loads((mr_only / "dataset.json").read_text())
    assert meta["modalities"] == ["MR"] and meta["case_modality"] == {"mr_000": "MR"}


def test_cardiac_class_intensities_differ_between_modalities():
    """The same class looks different in CT and MR (the domain gap paper 2 addresses)."""
    z = {"CT": {}, "MR": {}}
    for mod in z:
        for i in range(3):
            case = synth_cardiac_case(0, mod, i, **SMALL)
            x = case.images[mod].astype(np.float64)
            x = (x - x.mean()) / x.std()
            for value in (200, 500):
                z[mod].setdefault(value, []).append(x[case.label == value])
    myo_ct, myo_mr = np.concatenate(z["CT"][200]), np.concatenate(z["MR"][200])
    assert stats.ks_2samp(myo_ct, myo_mr).statistic > 0.4
    # blood-myocardium contrast (in units of the image's std) is much larger in bSSFP-like MR
    gap_ct = np.concatenate(z["CT"][500]).mean() - myo_ct.mean()
    gap_mr = np.concatenate(z["MR"][500]).mean() - myo_mr.mean()
    assert gap_ct > 0 and gap_mr > 2 * gap_ct


def test_cardiac_bad_modality(tmp_path):
    with pytest.raises(ConfigError, match="PET"):
        make_cardiac_dataset(tmp_path / "x", modalities=("CT", "PET"))
    with pytest.raises(ConfigError):
        make_cardiac_dataset(tmp_path / "x", modalities=("CT", "ct"))
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ writer


def test_writer_failure_leaves_nothing_behind(tmp_path):
    target = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="boom"):
        with raw_dataset_writer(target) as writer:
            writer.write_label("a", np.zeros((4, 4, 2), np.uint8), np.eye(4))
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_writer_existing_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    make_breast_dataset(empty, num_patients=1, **SMALL)  # an empty folder is filled in place
    assert (empty / "dataset.json").exists()
    with pytest.raises(OutputError, match="not empty"):
        make_breast_dataset(empty, num_patients=1, **SMALL)
    before = _files(empty)
    make_breast_dataset(empty, num_patients=2, overwrite=True, **SMALL)
    assert json.loads((empty / "dataset.json").read_text())["numTraining"] == 2
    assert _files(empty) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match="refusing"):
        make_breast_dataset(foreign, num_patients=1, overwrite=True, **SMALL)
    assert (foreign / "thesis.tex").read_text() == "precious"

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        make_cardiac_dataset(a_file, num_patients_per_modality=1, **SMALL)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_synth_breast_and_overwrite(tmp_path, capsys):
    out = tmp_path / "b"
    args = ["synth", "breast", "--output", str(out), "--patients", "2", "--slices", "3", "--size", "48"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "SynthBreast" in printed and str(out) in printed and "2 paired cases" in printed
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["modalseg_synth"]["slices"] == 3
    first = _files(out)

    assert main(args + ["--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and "Traceback" not in err
    assert _files(out) == first

    assert main(args + ["--seed", "1", "--overwrite"]) == 0
    assert _files(out) != first
    assert json.loads((out / "dataset.json").read_text())["modalseg_synth"]["seed"] == 1


def test_cli_synth_cardiac(tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["synth", "cardiac", "--output", str(out), "--patients", "1", "--slices", "2", "--size", "40"]
    assert main(argv + ["--difficulty", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "SynthCardiac" in printed and "1 CT" in printed and "1 MR" in printed
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["ct_000.nii.gz", "mr_000.nii.gz"]
    assert main(["synth", "cardiac", "--output", str(tmp_path / "d"), "--size", "8"]) == 2
    assert "size" in capsys.readouterr().err
