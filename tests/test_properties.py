"""Property-based tests (hypothesis) of the paths a clinical user relies on without looking:

* preprocessing (``modalseg.data.preprocess``): volume -> slices -> volume keeps the grid and never invents a
  label value; exact where no information is lost (no crop loss, integer up-sampling); processed pixel size
  times processed size is the physical field of view of the crop; intensity normalisation is invariant to the
  intensity transforms it is meant to remove;
* ``modalseg predict`` writes every output with the input's exact shape and affine (random rotations,
  flips, spacings, origins, shapes, input and output formats), and writes label values exactly (values above
  65535 included), with a freshly initialised tiny checkpoint built the way training/engine.py builds one;
* ``modalseg evaluate`` on files: per-case Dice, sensitivity, RAD, HD and HD95 in mm taken from each file's
  affine, with non-consecutive label values, against an independent scipy computation, and the summary's
  mean and s.d. (tests/test_metrics.py covers ``evaluate_case`` on arrays; this covers the file path).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from modalseg.cli.main import main
from modalseg.data.io import read_volume, write_volume
from modalseg.data.preprocess import (
    PreprocessConfig,
    in_plane_axes,
    in_plane_spacing,
    preprocess_slice,
    preprocess_volume,
    restore_volume,
)
from modalseg.data.types import Volume
from modalseg.training.checkpoint import save_checkpoint
from modalseg.training.tasks import ModelMeta, build_network

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------------------ preprocess
def _volume(draw_shape, seed: int, values: list[int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = rng.choice(np.asarray(values), size=draw_shape)
    images = rng.normal(50, 10, size=(2, *draw_shape)).astype(np.float32)
    return images, label


def _round_trip(images, label, cfg, spacing=(1.0, 1.0, 1.0)):
    slices = preprocess_volume(images, label, cfg, spacing=spacing, all_slices=True)
    back = restore_volume([s.label for s in slices], [s.geometry for s in slices], cfg.slice_axis, is_label=True)
    return slices, back


shapes = st.tuples(st.integers(3, 20), st.integers(3, 20), st.integers(1, 4))
label_values = st.lists(st.integers(0, 6), min_size=1, max_size=4, unique=True)


@FAST
@given(shape=shapes, axis=st.integers(0, 2), values=label_values, seed=st.integers(0, 2**16),
       factor=st.integers(1, 3))
def test_integer_upsampling_without_crop_round_trips_exactly(shape, axis, values, seed, factor):
    """No crop and target = k x the slice size: nearest-exact up then down is the identity, for any axis."""
    images, label = _volume(shape, seed, values)
    a, b = in_plane_axes(axis)
    cfg = PreprocessConfig(slice_axis=axis, target_size=(factor * shape[a], factor * shape[b]))
    slices, back = _round_trip(images, label, cfg)
    assert len(slices) == shape[axis] and [s.z for s in slices] == list(range(shape[axis]))
    assert back.shape == label.shape and back.dtype.kind in "iu"
    np.testing.assert_array_equal(back, label)


@FAST
@given(shape=shapes, axis=st.integers(0, 2), values=label_values, seed=st.integers(0, 2**16),
       pad=st.tuples(st.integers(0, 6), st.integers(0, 6)))
def test_bbox_crop_enclosing_the_image_round_trips_exactly(shape, axis, values, seed, pad):
    """A bbox crop at least as large as the slice pads (never cuts): restore gives back the label volume."""
    images, label = _volume(shape, seed, values)
    a, b = in_plane_axes(axis)
    cfg = PreprocessConfig(slice_axis=axis, crop="bbox", crop_size=(shape[a] + pad[0], shape[b] + pad[1]))
    slices, back = _round_trip(images, label, cfg)
    assert all(s.image.shape == (2, shape[a] + pad[0], shape[b] + pad[1]) for s in slices)
    np.testing.assert_array_equal(back, label)


@FAST
@given(shape=shapes, axis=st.integers(0, 2), values=label_values, seed=st.integers(0, 2**16),
       crop=st.tuples(st.integers(1, 24), st.integers(1, 24)), target=st.one_of(
           st.none(), st.tuples(st.integers(2, 30), st.integers(2, 30))),
       spacing=st.tuples(*[st.floats(0.2, 5.0)] * 3))
def test_any_crop_and_resize_keeps_grid_values_and_field_of_view(shape, axis, values, seed, crop, target, spacing):
    """Centre crop of any size, any resize: the restored volume has the original shape, only original label
    values (plus background outside the crop), equals the original inside the crop box when nothing was
    resized, and processed pixel size x processed size = the crop's physical extent."""
    images, label = _volume(shape, seed, values)
    cfg = PreprocessConfig(slice_axis=axis, crop="center", crop_size=crop, target_size=target)
    slices, back = _round_trip(images, label, cfg, spacing=spacing)
    assert back.shape == label.shape
    assert set(np.unique(back)) <= set(np.unique(label)) | {0}
    px = in_plane_spacing(spacing, axis)
    a, b = in_plane_axes(axis)
    for s in slices:
        g = s.geometry
        assert g.orig_shape == (shape[a], shape[b]) and g.crop_shape == crop
        assert s.image.shape == (2, *(target or crop)) and np.isfinite(s.image).all()
        np.testing.assert_allclose(np.multiply(s.spacing, g.out_shape), np.multiply(px, crop), rtol=1e-9)
    if target is None:
        r0, c0, r1, c1 = slices[0].geometry.box
        inside = np.zeros(label.shape, bool)
        index = [slice(None)] * 3
        index[a], index[b] = slice(max(r0, 0), max(min(r1, shape[a]), 0)), slice(max(c0, 0), max(min(c1, shape[b]), 0))
        inside[tuple(index)] = True
        np.testing.assert_array_equal(back[inside], label[inside])
        assert not back[~inside].any()


@FAST
@given(x=st.lists(st.floats(-1e3, 1e3), min_size=12, max_size=12), scale=st.floats(0.01, 100.0),
       shift=st.floats(-500, 500))
def test_normalisation_removes_the_transforms_it_should(x, scale, shift):
    """z-score per slice is invariant to a*x + b (a > 0); max scaling to a*x; min-max lands in [0, 1]; a
    constant slice never yields NaN/inf."""
    img = np.asarray(x, dtype=np.float32).reshape(1, 3, 4)
    moved = (img.astype(np.float64) * scale + shift).astype(np.float32)

    def norm(arr, mode):
        return preprocess_slice(arr, None, PreprocessConfig(normalization=mode))[0]

    z0, z1 = norm(img, "zscore_slice"), norm(moved, "zscore_slice")
    assert np.isfinite(z0).all() and np.isfinite(z1).all()
    if img.std() > 1e-2 * max(1.0, float(np.abs(img).max())):  # well-conditioned: float32 keeps the shape
        np.testing.assert_allclose(z1, z0, atol=2e-2)
        assert abs(float(z0.mean())) < 1e-3 and abs(float(z0.std()) - 1) < 1e-3
    positive = np.abs(img) + 1.0
    np.testing.assert_allclose(norm(positive * scale, "max_slice"), norm(positive, "max_slice"), rtol=1e-4)
    mm = norm(img, "minmax_slice")
    assert mm.min() >= 0 and mm.max() <= 1 + 1e-6
    for mode in ("zscore_slice", "max_slice", "minmax_slice", "zscore_volume", "max_volume"):
        assert np.isfinite(
            preprocess_volume(np.full((1, 3, 4, 2), shift, np.float32), None, PreprocessConfig(normalization=mode),
                              all_slices=True)[0].image
        ).all()


# ------------------------------------------------------------------------------------------------ predict
LABELS = {"background": 0, "small": 300, "large": 70000}


def _checkpoint(path: Path, bias_class: int | None) -> Path:
    """A tiny fresh single-modality U-Net checkpoint built as training/engine.py builds one (ModelMeta +
    save_checkpoint). ``bias_class`` pushes that class's output bias so it wins everywhere."""
    meta = ModelMeta(
        kind="paired", model="unet", model_options={"base_width": 4}, modalities=["MR"], num_classes=len(LABELS),
        labels=dict(LABELS), preprocess=PreprocessConfig(normalization="zscore_slice", target_size=(16, 16)).to_dict(),
        channel_names=["MR"],
    )
    torch.manual_seed(0)
    state = build_network(meta).state_dict()
    if bias_class is not None:
        state["decoder.head.bias"][bias_class] = 100.0
    save_checkpoint({"model_state": state, "meta": meta.to_dict()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("prop_ckpt")
    return {None: _checkpoint(root / "fresh.pt", None), 2: _checkpoint(root / "large.pt", 2)}


def _rotation(angles) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


_counter = {"n": 0}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(
    shape=st.tuples(st.integers(3, 20), st.integers(3, 20), st.integers(1, 3)),
    angles=st.tuples(*[st.floats(-math.pi, math.pi)] * 3),
    flips=st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3),
    spacing=st.tuples(*[st.floats(0.1, 8.0)] * 3),
    origin=st.tuples(*[st.floats(-300, 300)] * 3),
    in_ext=st.sampled_from([".nii.gz", ".nii", ".nrrd", ".mha"]),
    out_ext=st.sampled_from([".nii.gz", ".nii", ".nrrd", ".mha"]),
    bias_class=st.sampled_from([None, 2]),
    seed=st.integers(0, 2**16),
)
def test_predict_writes_the_input_geometry_exactly(checkpoints, tmp_path, shape, angles, flips, spacing, origin,
                                                   in_ext, out_ext, bias_class, seed):
    _counter["n"] += 1
    work = tmp_path / f"ex{_counter['n']}"
    affine = np.eye(4)
    affine[:3, :3] = _rotation(angles) @ np.diag(np.multiply(flips, spacing))
    affine[:3, 3] = origin
    data = np.random.default_rng(seed).normal(100, 30, size=shape).astype(np.float32)
    src = work / f"case{in_ext}"
    work.mkdir()
    if in_ext.startswith(".nii"):
        nib.save(nib.Nifti1Image(data, affine), str(src))
    else:
        write_volume(src, data, Volume(data, affine))
    out = work / "out"
    code = main(["predict", "--model", str(checkpoints[bias_class]), "--input", str(src), "--output", str(out),
                 "--precision", "fp32", "--device", "cpu", "--file-ending", out_ext])
    assert code == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == [f"case{out_ext}"]  # nothing else, no temporary file
    ref = read_volume(src)
    pred = read_volume(out / f"case{out_ext}", kind="label")
    assert pred.shape == ref.shape == shape
    if in_ext.startswith(".nii") and out_ext.startswith(".nii"):
        np.testing.assert_array_equal(pred.affine, ref.affine)  # the same header, bit for bit
    else:
        np.testing.assert_allclose(pred.affine, ref.affine, rtol=1e-6, atol=1e-4)
    assert set(np.unique(pred.array)) <= set(LABELS.values())
    if bias_class is not None:
        assert (pred.array == 70000).all()  # beyond uint16: written exactly, never wrapped


# ------------------------------------------------------------------------------------------------ evaluate
def _edges(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _directed(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    return ndimage.distance_transform_edt(~_edges(b), sampling=spacing)[_edges(a)]


def reference_metrics(p: np.ndarray, g: np.ndarray, spacing) -> dict[str, float]:
    """Independent numpy/scipy metrics with the documented empty-mask conventions."""
    n_p, n_g = int(p.sum()), int(g.sum())
    if n_p == 0 and n_g == 0:
        return {"dice": 1.0, "sensitivity": math.nan, "rad": math.nan, "hd": 0.0, "hd95": 0.0}
    if n_g == 0:
        return {"dice": 0.0, "sensitivity": math.nan, "rad": math.inf, "hd": math.inf, "hd95": math.inf}
    if n_p == 0:
        return {"dice": 0.0, "sensitivity": 0.0, "rad": 1.0, "hd": math.inf, "hd95": math.inf}
    tp = int((p & g).sum())
    d1, d2 = _directed(p, g, spacing), _directed(g, p, spacing)
    return {
        "dice": 2 * tp / (n_p + n_g),
        "sensitivity": tp / n_g,
        "rad": abs(n_p - n_g) / n_g,
        "hd": float(max(d1.max(), d2.max())),
        "hd95": float(max(np.percentile(d1, 95), np.percentile(d2, 95))),
    }


def _same(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5)


EVAL_LABELS = {"background": 0, "myo": 200, "lv": 500}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(
    shape=st.tuples(st.integers(4, 9), st.integers(4, 9), st.integers(1, 4)),
    spacing=st.tuples(*[st.floats(0.3, 4.0)] * 3),
    seeds=st.tuples(st.integers(0, 2**16), st.integers(0, 2**16)),
    density=st.floats(0.0, 0.6),
)
def test_evaluate_files_match_scipy_in_mm(tmp_path, shape, spacing, seeds, density):
    _counter["n"] += 1
    work = tmp_path / f"ev{_counter['n']}"
    ds, pred_dir, ref_dir, out = work / "ds", work / "pred", work / "ref", work / "out"
    for d in (ds / "imagesTr", pred_dir, ref_dir):
        d.mkdir(parents=True)
    (ds / "imagesTr" / "c_0000.nii.gz").write_bytes(b"")  # listed only, never read
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": EVAL_LABELS,
                                                 "numTraining": 1, "file_ending": ".nii.gz"}))
    affine = np.diag([*spacing, 1.0])
    values = np.asarray(list(EVAL_LABELS.values()))
    arrays = {}
    for k, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        for kind, folder in (("gt", ref_dir), ("pred", pred_dir)):
            fg = rng.random(shape) < density
            arr = np.where(fg, rng.choice(values[1:], size=shape), 0).astype(np.int16)
            arrays[(f"case{k}", kind)] = arr
            nib.save(nib.Nifti1Image(arr, affine), str(folder / f"case{k}.nii.gz"))
    assert main(["evaluate", "--pred", str(pred_dir), "--labels", str(ref_dir), "--dataset", str(ds),
                 "--output", str(out)]) == 0
    sp = read_volume(ref_dir / "case0.nii.gz", kind="label").spacing  # float32 header precision
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 2  # cases x foreground classes
    per_class: dict[str, list[float]] = {}
    for row in rows:
        value = EVAL_LABELS[row["class_name"]]
        p = arrays[(row["case_id"], "pred")] == value
        g = arrays[(row["case_id"], "gt")] == value
        ref = reference_metrics(p, g, sp)
        for name, expected in ref.items():
            assert _same(float(row[name]), expected), (row, name, expected)
        per_class.setdefault(row["class_name"], []).append(ref["dice"])
    with open(out / "summary.csv") as fh:
        summary = {r["class_name"]: r for r in csv.DictReader(fh)}
    for name, dices in per_class.items():
        assert math.isclose(float(summary[name]["dice_mean"]), float(np.mean(dices)), rel_tol=1e-6, abs_tol=1e-7)
        assert math.isclose(float(summary[name]["dice_sd"]), float(np.std(dices, ddof=1)), rel_tol=1e-6, abs_tol=1e-7)
