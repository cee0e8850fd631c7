"""One canonical voxel orientation before slicing, and modalities/labels on their master's grid (issue 12, items 2,
3 and 9; modalseg.data.geometry).

* The same physical image stored as RAS NIfTI, LPS NRRD or with permuted axes gives *identical* predictions, each
  written with its input's exact geometry; training on LAS, RAS and sagittally stored cases slices the same
  (axial) plane with the same pixel sizes; ``verify`` reports every case's orientation and warns on a mixture.
* A T2W on a finer grid with another field of view is resampled onto the T1C's grid (one line), a label cropped
  to its bounding box is put back into its image's grid, volumes outside the master's field of view are refused
  with one line, ``strict=True`` keeps the old refusal, and equal grids are read bit for bit as before.
* Distances in mm (``modalseg evaluate``, the cache's pixel sizes) do not depend on the voxel order of the files.

Volumes are 16x16x4 (0.8 x 0.8 x 3 mm), models tiny (base width 4).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import modalseg.data.geometry as mgeometry
from modalseg.data.cache import SliceCache, _read_case, build_slice_cache, map_labels
from modalseg.data.geometry import onto_grid, resample_onto, to_canonical
from modalseg.data.io import read_volume
from modalseg.data.layouts import load_dataset
from modalseg.data.preprocess import PreprocessConfig
from modalseg.data.types import Volume
from modalseg.data.verify import verify_dataset
from modalseg.errors import DataError
from modalseg.training.precision import resolve_precision
from modalseg.training.predict import load_models, predict_case
from test_reliability import _predict, assert_refused, files_under, run_cli, tiny_checkpoint, train_args

SHAPE = (16, 16, 4)
AFF = np.array([[0.8, 0, 0, -6.0], [0, 0.8, 0, -6.0], [0, 0, 3.0, -4.5], [0, 0, 0, 1.0]])
LPS = np.diag([-1.0, -1.0, 1.0])

# storage of the canonical (RAS) array in a file: file axis i holds canonical axis perm[i], reversed if flips[i]
RAS = ((0, 1, 2), (False, False, False))
LAS = ((0, 1, 2), (True, False, False))
LPS_ORDER = ((0, 1, 2), (True, True, False))
IRA = ((2, 0, 1), (True, False, False))  # permuted axes: the axial axis stored first, reversed
ASL = ((1, 2, 0), (False, False, True))  # sagittal storage: slices along the last stored axis are sagittal


# ------------------------------------------------------------------------------------------------ helpers
def _image(seed: int, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    blob = 60.0 * np.exp(-((x - 7) ** 2 + (y - 9) ** 2) / 18.0) * (1 + 0.2 * z)
    return (100 + blob + rng.normal(0, 5, size=shape)).astype(np.float32)


def _label() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[4:10, 5:11, 1:3] = 1
    return lab


def _stored(array: np.ndarray, affine: np.ndarray, order) -> tuple[np.ndarray, np.ndarray]:
    """The canonical ``array``/``affine`` re-expressed in another voxel order (same world point per voxel)."""
    perm, flips = order
    out = np.transpose(array, perm)
    m = np.zeros((4, 4))
    m[3, 3] = 1
    for i, (axis, flip) in enumerate(zip(perm, flips, strict=True)):
        if flip:
            out = np.flip(out, axis=i)
            m[axis, i], m[axis, 3] = -1.0, array.shape[axis] - 1
        else:
            m[axis, i] = 1.0
    return np.ascontiguousarray(out), affine @ m


def _save(path: Path, array: np.ndarray, affine: np.ndarray = AFF, order=RAS) -> Path:
    """Write with nibabel (.nii.gz) or SimpleITK (.nrrd), in the voxel order ``order``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data, aff = _stored(array, affine, order)
    if path.name.endswith(".nii.gz"):
        nib.save(nib.Nifti1Image(data, aff), str(path))
        return path
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    img.SetSpacing([float(v) for v in spacing])
    img.SetDirection([float(v) for v in (LPS @ aff[:3, :3] / spacing).ravel()])
    img.SetOrigin([float(v) for v in LPS @ aff[:3, 3]])
    sitk.WriteImage(img, str(path), True)
    return path


def _dataset(root: Path, orders, *, t2w=None, label=None) -> Path:
    """A paired nnU-Net dataset whose case k is the same physical case stored in voxel order ``orders[k]``."""
    for k, order in enumerate(orders):
        _save(root / "imagesTr" / f"c{k}_0000.nii.gz", _image(1), order=order)
        _save(root / "imagesTr" / f"c{k}_0001.nii.gz", _image(2), order=order)
        _save(root / "labelsTr" / f"c{k}.nii.gz", _label(), order=order)
    meta = {"channel_names": {"0": "T1C", "1": "T2W"}, "labels": {"background": 0, "mass": 1},
            "numTraining": len(orders), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root



def _canonical(path: Path, kind: str = "label") -> np.ndarray:
    return to_canonical(read_volume(path, kind=kind))[0].array


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    # a bias that splits the (random) network's decision on these images, so that both classes are predicted
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "fuse.pt", target=(16, 16), bias={1: -0.28})


@pytest.fixture(scope="module")
def fp32():
    return resolve_precision(torch.device("cpu"), "fp32")


# ------------------------------------------------------------------------------------------------ item 2
def test_reorientation_is_a_permutation_with_a_correct_affine():
    """A pure permutation/flip: exact round trip with a leading channel axis; the affine keeps every voxel's world
    point, so the spacing follows the permuted axes."""
    data, aff = _stored(_image(1), AFF, ASL)
    vol = Volume(array=data, affine=aff)
    canonical, reo = to_canonical(vol)
    assert reo.file_codes == "ASL" and not reo.is_identity and reo.stored_axis(2) == 1
    assert np.array_equal(canonical.array, _image(1)) and np.allclose(canonical.affine, AFF)
    assert canonical.spacing == pytest.approx((0.8, 0.8, 3.0)) and vol.spacing == pytest.approx((0.8, 3.0, 0.8))
    stacked = np.stack([data, data + 1])
    assert np.array_equal(reo.invert(reo.apply(stacked)), stacked)
    assert to_canonical(Volume(array=_image(1), affine=AFF))[0].array is not None
    same, identity = to_canonical(Volume(array=_image(1), affine=AFF))
    assert identity.is_identity and identity.apply(same.array) is same.array


def test_predict_agrees_exactly_across_orientations_and_keeps_each_input_geometry(ckpt, tmp_path, capsys):
    storages = {
        "ras_nifti": [_save(tmp_path / "ras" / f"case_000{m}.nii.gz", _image(m + 1)) for m in range(2)],
        "lps_nrrd": [_save(tmp_path / "lps" / f"case_000{m}.nrrd", _image(m + 1), order=LPS_ORDER) for m in range(2)],
        "permuted": [_save(tmp_path / "ira" / f"case_000{m}.nii.gz", _image(m + 1), order=IRA) for m in range(2)],
        # T1C as RAS NIfTI, T2W as LPS NRRD: the same grid in another voxel order, reoriented without interpolation
        "mixed": [_save(tmp_path / "mix" / "case_0000.nii.gz", _image(1)),
                  _save(tmp_path / "mix" / "case_0001.nrrd", _image(2), order=LPS_ORDER)],
    }
    labels, probs = {}, {}
    for name, files in storages.items():
        ending = ".nrrd" if files[0].suffix == ".nrrd" else ".nii.gz"
        out = tmp_path / f"out_{name}"
        code, stdout, err = _predict(capsys, ckpt, files, out, "--probabilities", "--file-ending", ending)
        assert code == 0 and err == [], err
        notes = [ln for ln in stdout.splitlines() if "onto T1C's grid" in ln]
        if name == "mixed":
            assert notes == ["case case: T2W reoriented onto T1C's grid (voxel order LPS -> RAS, no interpolation)"]
        else:
            assert notes == []
        written = out / f"case{ending}"
        # the input's exact geometry: same shape, same header affine bit for bit (NIfTI) / same ITK geometry (NRRD)
        assert read_volume(written, kind="label").shape == read_volume(files[0]).shape
        if ending == ".nii.gz":
            src, dst = nib.load(files[0]), nib.load(written)
            assert np.array_equal(dst.affine, src.affine)
            assert np.array_equal(dst.get_sform(), src.get_sform()) and np.array_equal(dst.get_qform(), src.get_qform())
        else:
            src, dst = sitk.ReadImage(str(files[0])), sitk.ReadImage(str(written))
            assert (dst.GetOrigin(), dst.GetSpacing(), dst.GetDirection()) == (
                src.GetOrigin(), src.GetSpacing(), src.GetDirection())
        labels[name] = _canonical(written)
        probs[name] = _canonical(out / f"case_prob_mass{ending}", kind="image")
    assert len(np.unique(labels["ras_nifti"])) == 2  # a real segmentation, not one class everywhere
    for name in storages:
        assert np.array_equal(labels[name], labels["ras_nifti"]), name
        assert np.array_equal(probs[name], probs["ras_nifti"]), name


def test_training_on_mixed_orientations_slices_the_same_plane(tmp_path, capsys):
    """LAS, RAS and a sagittally stored case of one physical scan: every case gives its 4 axial slices with the
    same pixel size and identical content (stored order, the sagittal case gave 16 stretched sagittal slices)."""
    ds = _dataset(tmp_path / "ds", [RAS, LAS, ASL])
    _save(ds / "imagesTr" / "c1_0001.nii.gz", _image(2), order=RAS)  # T2W in another voxel order than its T1C
    code, out, err = run_cli(capsys, train_args(ds, tmp_path / "run", "--set", "max_steps=1"))
    assert code == 0, err
    assert "case c1: T2W reoriented onto T1C's grid (voxel order RAS -> LAS, no interpolation)" in out.splitlines()
    cache = SliceCache(next((tmp_path / ".modalseg_cache" / ds.name).glob("*/index.json")).parent)
    per_case = {c: cache.indices_for([c]) for c in ("c0", "c1", "c2")}
    for case, idx in per_case.items():
        assert len(idx) == SHAPE[2], case
        assert [cache.records[i]["spacing"] for i in idx] == [cache.records[per_case["c0"][0]]["spacing"]] * SHAPE[2]
        assert cache.records[idx[0]]["spacing"] == pytest.approx([0.8, 0.8])
        assert [cache.records[i]["slice_thickness"] for i in idx] == [3.0] * SHAPE[2]
        assert np.array_equal(cache.images[idx], cache.images[per_case["c0"]]), case
        assert np.array_equal(cache.labels[idx], cache.labels[per_case["c0"]]), case


def test_verify_reports_orientations_and_slice_axes_and_warns(tmp_path, capsys):
    ds = _dataset(tmp_path / "ds", [RAS, RAS, LAS, ASL])
    t2w = _save(ds / "imagesTr" / "c1_0001.nii.gz", _image(2), order=LAS)
    code, out, err = run_cli(capsys, ["verify", str(ds)])
    assert code == 0 and err == [] and out.rstrip().endswith("OK"), (out, err)
    lines = out.splitlines()
    assert f"warning: {t2w}: T2W is on the grid of T1C {ds / 'imagesTr' / 'c1_0000.nii.gz'} stored in voxel order " \
           "LAS instead of RAS; it will be reoriented onto T1C's grid (no interpolation)" in lines
    assert f"warning: {ds}: 3 orientations among 4 cases: RAS (2), LAS (1), ASL (1); all are brought to RAS before " \
           "slicing" in lines
    assert "  RAS: 2 case(s), axial slices along stored axis 2: c0, c1" in lines
    assert "  LAS: 1 case(s), axial slices along stored axis 2: c2" in lines
    assert "  ASL: 1 case(s), axial slices along stored axis 1: c3" in lines
    assert "shape: (16, 16, 4) .. (16, 16, 4)" in out  # in RAS voxel order, also for the sagittal case
    report = verify_dataset(load_dataset(ds))
    assert report.orientations == {"c0": "RAS", "c1": "RAS", "c2": "LAS", "c3": "ASL"}
    assert report.stored_slice_axes == {"c0": 2, "c1": 2, "c2": 2, "c3": 1}


# ------------------------------------------------------------------------------------------------ item 3
def _ramp_at(affine: np.ndarray, shape) -> np.ndarray:
    """A linear function of world coordinates sampled at the voxel centres of a grid (linear interpolation
    reproduces it exactly inside the extent)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    return (50 + 2.0 * world[..., 0] - 1.5 * world[..., 1] + 0.5 * world[..., 2]).astype(np.float32)


FINE = np.array([[0.6, 0, 0, -5.0], [0, 0.6, 0, -6.3], [0, 0, 1.5, -6.0], [0, 0, 0, 1.0]])
FINE_SHAPE = (20, 20, 8)


def test_t2w_on_a_finer_grid_with_another_field_of_view_is_resampled(ckpt, fp32, tmp_path, capsys):
    t1c = _save(tmp_path / "in" / "case_0000.nii.gz", _image(1))
    t2w = _save(tmp_path / "in" / "case_0001.nii.gz", _ramp_at(FINE, FINE_SHAPE), affine=FINE)
    out = tmp_path / "out"
    code, stdout, err = _predict(capsys, ckpt, [t1c, t2w], out)
    assert code == 0 and err == [], err
    notes = [ln for ln in stdout.splitlines() if "resampled" in ln]
    assert len(notes) == 1
    assert notes[0].startswith("case case: T2W resampled (linear) onto T1C's grid (shape 20x20x8 -> 16x16x4, "
                               "spacing 0.6x0.6x1.5 -> 0.8x0.8x3 mm); it covers ")
    assert np.array_equal(nib.load(out / "case.nii.gz").affine, nib.load(t1c).affine)
    # physically right: inside its extent the resampled T2W is the ramp at the T1C's voxel centres, outside it
    # is the T2W's minimum
    master, other = read_volume(t1c), read_volume(t2w)
    moved, note = onto_grid(other, master, name="T2W", ref_name="T1C")
    # T2W voxel centres span [first, last] in T1C voxel units; its extent reaches half a T2W voxel further
    first = np.linalg.solve(AFF, [*FINE[:3, 3], 1])[:3]
    last = np.linalg.solve(AFF, [*(FINE[:3, :3] @ np.subtract(FINE_SHAPE, 1) + FINE[:3, 3]), 1])[:3]
    half = 0.5 * np.diag(FINE)[:3] / np.diag(AFF)[:3]
    inside, outside = np.ones(SHAPE, bool), np.zeros(SHAPE, bool)
    for axis in range(3):
        pos = np.arange(SHAPE[axis]).reshape([-1 if a == axis else 1 for a in range(3)])
        inside &= (pos >= first[axis]) & (pos <= last[axis])
        outside |= (pos < first[axis] - half[axis] - 1e-6) | (pos > last[axis] + half[axis] + 1e-6)
    assert moved.shape == SHAPE and note is not None and inside.any() and outside.any()
    np.testing.assert_allclose(moved.array[inside], _ramp_at(AFF, SHAPE)[inside], atol=1e-3)
    assert np.all(moved.array[outside] == other.array.min())
    models = load_models([ckpt], fp32)
    with pytest.raises(DataError) as info:
        predict_case(models, [t1c, t2w], strict=True)
    assert str(info.value).startswith(f"{t2w}: T2W shape (20, 20, 8) differs from T1C")


def test_training_resamples_the_other_grid_and_strict_refuses_it(tmp_path, capsys):
    ds = _dataset(tmp_path / "ds", [RAS, RAS])
    bad = _save(ds / "imagesTr" / "c1_0001.nii.gz", _ramp_at(FINE, FINE_SHAPE), affine=FINE)
    spec = load_dataset(ds)
    with pytest.raises(DataError, match=r"shape \(20, 20, 8\) differs from modality 0") as info:
        _read_case(spec, spec.cases[1], spec.label_lut(), strict=True)
    assert str(bad) in str(info.value)
    (warning,) = verify_dataset(spec).warnings
    assert warning.startswith(f"{bad}: T2W is on another grid than T1C") and "will be resampled (linear)" in warning
    assert verify_dataset(spec, strict=True).problems[0].startswith(f"{bad}: T2W shape (20, 20, 8) differs")
    code, out, err = run_cli(capsys, train_args(ds, tmp_path / "run", "--set", "max_steps=1"))
    assert code == 0, err
    notes = [ln for ln in out.splitlines() if ln.startswith("case c1: ")]
    assert len(notes) == 1 and "T2W resampled (linear) onto T1C's grid (shape 20x20x8 -> 16x16x4" in notes[0]


def test_cropped_label_grid_is_resampled_into_the_image_grid(tmp_path, capsys):
    """A 3D Slicer .seg.nrrd bounding-box export: same spacing and direction, a 6x6x2 grid whose origin is the
    image's voxel (4, 5, 1). The cache's labels are the full label, voxel for voxel."""
    ds = _dataset(tmp_path / "ds", [RAS, LAS])
    crop = np.ones((6, 6, 2), np.uint8)
    crop[0, 0, 0] = 0  # one background voxel inside the box: positions must be exact
    cropped_aff = AFF.copy()
    cropped_aff[:3, 3] = AFF[:3, :3] @ [4, 5, 1] + AFF[:3, 3]
    for case in ("c0", "c1"):
        (ds / "labelsTr" / f"{case}.nii.gz").unlink()
    spec_json = json.loads((ds / "dataset.json").read_text())
    spec_json["file_ending"] = ".nrrd"
    (ds / "dataset.json").write_text(json.dumps(spec_json))
    for case, order in (("c0", RAS), ("c1", LAS)):
        for m in range(2):
            src = ds / "imagesTr" / f"{case}_000{m}.nii.gz"
            _save(ds / "imagesTr" / f"{case}_000{m}.nrrd", _image(m + 1), order=order)
            src.unlink()
        _save(ds / "labelsTr" / f"{case}.nrrd", crop, affine=cropped_aff, order=RAS)
    expected = np.zeros(SHAPE, np.uint8)
    expected[4:10, 5:11, 1:3] = crop
    spec = load_dataset(ds)
    capsys.readouterr()
    images, labels, spacing, _ = _read_case(spec, spec.cases[0], spec.label_lut())
    assert np.array_equal(labels, expected) and spacing == pytest.approx((0.8, 0.8, 3.0))
    assert capsys.readouterr().out.splitlines() == [
        "case c0: label resampled (nearest neighbour) onto the image's grid (shape 6x6x2 -> 16x16x4, "
        "spacing 0.8x0.8x3 -> 0.8x0.8x3 mm); it covers 7.03% of the image's field of view, the rest is 0"]
    with pytest.raises(DataError, match=r"label shape \(6, 6, 2\) differs from image shape \(16, 16, 4\)"):
        _read_case(spec, spec.cases[0], spec.label_lut(), strict=True)
    cfg = PreprocessConfig(normalization="zscore_slice")
    cache = build_slice_cache(spec, cfg, tmp_path / "cache")
    for case in ("c0", "c1"):  # c1's image is stored LAS: its cropped RAS label lands on the same anatomy
        idx = cache.indices_for([case])
        assert np.array_equal(np.moveaxis(np.asarray(cache.labels[idx]), 0, -1), expected), case


def test_outside_the_field_of_view_is_refused_with_one_line(ckpt, tmp_path, capsys):
    far = FINE.copy()
    far[:3, 3] += (100.0, 0.0, 0.0)
    t1c = _save(tmp_path / "in" / "case_0000.nii.gz", _image(1))
    t2w = _save(tmp_path / "in" / "case_0001.nii.gz", _ramp_at(far, FINE_SHAPE), affine=far)
    out = tmp_path / "out"
    code, _, err = _predict(capsys, ckpt, [t1c, t2w], out)
    line = assert_refused(code, err, t2w, f"T2W covers no part of T1C's field of view ({t1c})")
    assert line == f"modalseg predict: error: {t2w}: T2W covers no part of T1C's field of view ({t1c})"
    assert files_under(out) == []
    # a label on another grid, far away: verify and train refuse it with one line, nothing written
    ds = _dataset(tmp_path / "ds", [RAS, RAS])
    far_label = far.copy()
    far_label[:3, :3] = AFF[:3, :3]
    bad = _save(ds / "labelsTr" / "c1.nii.gz", np.ones((4, 4, 2), np.uint8), affine=far_label)
    code, _, err = run_cli(capsys, ["verify", str(ds)])
    assert_refused(code, err, bad, "label covers no part of the image's field of view")
    code, _, err = run_cli(capsys, train_args(ds, tmp_path / "run", "--set", "max_steps=1"))
    assert_refused(code, err, bad, "label covers no part of the image's field of view")
    assert not (tmp_path / "run").exists() and files_under(tmp_path / ".modalseg_cache") == []


def test_equal_grids_take_the_fast_path_bit_for_bit(ckpt, tmp_path, capsys, monkeypatch):
    """Geometry equal within today's tolerances (spacing off by 1e-5 relative, cosines by 1e-5) is never
    resampled: the arrays are those read from the files, unchanged."""
    ds = _dataset(tmp_path / "ds", [RAS, RAS])
    a = 1e-5
    near = AFF.copy()
    near[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag(
        [0.8 * (1 + 1e-5), 0.8, 3.0])
    t2w = _save(ds / "imagesTr" / "c1_0001.nii.gz", _image(7), affine=near)

    def refuse(*args, **kwargs):
        raise AssertionError("resampled although the grids agree")

    monkeypatch.setattr(mgeometry, "_resample", refuse)
    monkeypatch.setattr(mgeometry, "same_grid_in_other_order", refuse)
    spec = load_dataset(ds)
    capsys.readouterr()
    for case in spec.cases:
        images, labels, spacing, _ = _read_case(spec, case, spec.label_lut())
        direct = [read_volume(p) for p in case.images]
        assert np.array_equal(images, np.stack([v.array for v in direct]))
        lab = read_volume(case.label, kind="label")
        assert np.array_equal(labels, map_labels(lab.array, spec.label_lut()))
        assert spacing == direct[0].spacing
    assert capsys.readouterr().out == ""
    code, stdout, err = _predict(capsys, ckpt, [spec.cases[1].images[0], t2w], tmp_path / "out")
    assert code == 0 and err == [] and "resampled" not in stdout and "reoriented" not in stdout
    assert verify_dataset(spec).warnings == []
    # just beyond the tolerance (spacing off by 2e-3) the other grid is resampled, not refused
    monkeypatch.undo()
    beyond = np.diag([0.8 * (1 + 2e-3), 0.8, 3.0, 1.0])
    beyond[:3, 3] = AFF[:3, 3]
    _save(t2w, _image(7), affine=beyond)
    capsys.readouterr()
    images, _, _, _ = _read_case(spec, spec.cases[1], spec.label_lut())
    (note,) = capsys.readouterr().out.splitlines()
    assert note.startswith("case c1: T2W resampled (linear) onto T1C's grid (shape 16x16x4 -> 16x16x4, spacing ")
    assert not np.array_equal(images[1], read_volume(t2w).array)


def test_resample_onto_keeps_label_values_and_fills_background():
    """Nearest neighbour never mixes label values; outside the label's extent is the fill value."""
    label = Volume(array=np.full((4, 4, 2), 7, np.int32), affine=AFF)
    target = Volume(array=np.zeros(SHAPE, np.float32), affine=AFF)
    out, coverage = resample_onto(label, target, kind="label", fill=0)
    assert out.dtype == np.int32 and set(np.unique(out)) == {0, 7}
    assert coverage == pytest.approx(4 * 4 * 2 / np.prod(SHAPE)) and np.all(out[:4, :4, :2] == 7)


# ------------------------------------------------------------------------------------------------ item 9
def test_distances_in_mm_do_not_depend_on_the_voxel_order(tmp_path, capsys):
    """HD/HD95 of ``modalseg evaluate`` (prediction and reference stored the same way each time) and the cache's
    pixel sizes and slice thickness are the same for the RAS and the sagittally stored copy of a case."""
    ref = _label()
    pred = np.zeros(SHAPE, np.uint8)
    pred[5:12, 5:9, 0:3] = 1
    rows = {}
    for name, order in (("ras", RAS), ("asl", ASL)):
        _save(tmp_path / name / "ref" / "c0.nii.gz", ref, order=order)
        _save(tmp_path / name / "pred" / "c0.nii.gz", pred, order=order)
        code, _, err = run_cli(capsys, ["evaluate", "--pred", str(tmp_path / name / "pred"), "--labels",
                                        str(tmp_path / name / "ref"), "--output", str(tmp_path / name / "out")])
        assert code == 0, err
        import csv

        with open(tmp_path / name / "out" / "metrics.csv", newline="") as fh:
            rows[name] = [r for r in csv.DictReader(fh) if r["class_name"] != "background"]
    assert rows["ras"] and [(r["hd"], r["hd95"], r["dice"]) for r in rows["ras"]] == [
        (r["hd"], r["hd95"], r["dice"]) for r in rows["asl"]]
    assert float(rows["ras"][0]["hd"]) > 0
    ds = _dataset(tmp_path / "ds", [RAS, ASL])
    cache = build_slice_cache(load_dataset(ds), PreprocessConfig(normalization="zscore_slice"), tmp_path / "cache")
    records = {c: [(r["spacing"], r["slice_thickness"]) for r in cache.records if r["case_id"] == c]
               for c in ("c0", "c1")}
    assert records["c0"] == records["c1"] == [records["c0"][0]] * SHAPE[2]
    assert records["c0"][0][0] == pytest.approx([0.8, 0.8]) and records["c0"][0][1] == 3.0
