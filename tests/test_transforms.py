"""Invertible preprocessing transforms and the random seam (modalseg.data.transforms)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from modalseg.data.geometry import to_canonical
from modalseg.data.preprocess import (
    PreprocessConfig,
    _paste,
    _resize,
    in_plane_axes,
    preprocess_slice,
    preprocess_volume,
    preprocessing_pipeline,
    restore_volume,
    volume_box,
    volume_stats,
)
from modalseg.data.transforms import (
    CropPad,
    Normalise,
    OntoGrid,
    RandomFlip,
    Sample,
    SelectSlices,
    ToCanonical,
    ToSliceMajor,
    invert,
)
from modalseg.data.types import Volume

RNG = np.random.default_rng(3)
CT = [{"lo": 20.0, "hi": 250.0, "mean": 120.0, "std": 40.0}, None]


def _case(shape=(2, 11, 9, 6)):
    images = (RNG.random(shape) * 300).astype(np.float32)
    images[1, :, :, 2] = 5.0  # a constant slice of one channel
    label = np.zeros(shape[1:], np.uint8)
    label[3:7, 2:6, 1:3] = 1
    label[4, 3, 4] = 2
    return images, label


def _reference(images, label, cfg, spacing, all_slices):
    """The per-slice implementation preprocess_volume had before it became transforms (preprocess_slice of each
    slice with the volume's box and statistics), kept here as the bit-for-bit reference."""
    modes = cfg.modes_for(images.shape[0])
    stats = volume_stats(images, modes) if any("_volume" in m for m in modes) else None
    if "ct_dataset" in modes:
        stats = stats or [None] * images.shape[0]
        for i, mode in enumerate(modes):
            if mode == "ct_dataset":
                stats[i] = cfg.intensity_stats[i]
    axis = cfg.slice_axis
    a, b = in_plane_axes(axis)
    box = volume_box((images.shape[1 + a], images.shape[1 + b]), label, cfg)
    out = []
    for z in range(images.shape[1 + axis]):
        lab2d = np.take(label, z, axis=axis) if label is not None else None
        fg = bool(lab2d is not None and (lab2d > 0).any())
        if cfg.only_labelled_slices and label is not None and not fg and not all_slices:
            continue
        img, lab, geom = preprocess_slice(np.take(images, z, axis=1 + axis), lab2d, cfg, box, stats=stats)
        px = (spacing[a], spacing[b])
        out.append((z, img, lab, geom, geom.processed_spacing(px), fg))
    return out


CONFIGS = [
    dict(slice_axis=axis, normalization=norm, crop=crop, target_size=target, only_labelled_slices=only)
    for axis, norm, crop, target, only in itertools.product(
        [0, 2], ["zscore_slice", "zscore_volume_robust", "max_slice", ["minmax_slice", "max_volume"],
                 ["ct_dataset", "none"]],
        ["none", "bbox", "square"], [None, (13, 7)], [False, True])
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_preprocess_volume_is_bit_identical_to_the_per_slice_code(kw):
    kw = dict(kw)
    if kw["crop"] == "bbox":
        kw["crop_size"] = (7, 10)
    cfg = PreprocessConfig(**kw, intensity_stats=CT if "ct_dataset" in kw["normalization"] else None)
    images, label = _case()
    for lab, all_slices in ((label, False), (label, True), (None, False)):
        got = preprocess_volume(images, lab, cfg, spacing=(0.7, 1.3, 2.9), all_slices=all_slices)
        want = _reference(images, lab, cfg, (0.7, 1.3, 2.9), all_slices)
        assert len(got) == len(want) > 0
        for s, (z, img, lab2d, geom, px, fg) in zip(got, want, strict=True):
            assert (s.z, s.geometry, s.spacing, s.has_foreground) == (z, geom, px, fg)
            assert s.image.dtype == img.dtype and s.image.shape == img.shape and s.image.tobytes() == img.tobytes()
            assert s.image.flags.c_contiguous
            assert (s.label is None) == (lab2d is None)
            if lab2d is not None:
                assert s.label.dtype == lab2d.dtype and s.label.tobytes() == lab2d.tobytes()


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_restore_volume_is_bit_identical_to_resize_then_paste(axis):
    images, label = _case()
    cfg = PreprocessConfig(slice_axis=axis, crop="bbox", crop_size=(7, 10), target_size=(12, 5))
    slices = preprocess_volume(images, label, cfg)
    probs = [RNG.random((3, 12, 5)).astype(np.float32) for _ in slices]
    labels = [RNG.integers(0, 3, (12, 5)) for _ in slices]
    bg = np.array([1, 0, 0], np.float32)
    ref_p = np.stack([_paste(_resize(p, s.geometry.crop_shape, is_label=False), s.geometry.box,
                             s.geometry.orig_shape, bg) for p, s in zip(probs, slices, strict=True)], axis=1 + axis)
    ref_l = np.stack([_paste(_resize(v, s.geometry.crop_shape, is_label=True), s.geometry.box,
                             s.geometry.orig_shape, 0) for v, s in zip(labels, slices, strict=True)], axis=axis)
    got_p = restore_volume(probs, [s.geometry for s in slices], axis, is_label=False)
    got_l = restore_volume(labels, [s.geometry for s in slices], axis, is_label=True)
    assert got_p.shape == ref_p.shape == (3, *label.shape) and got_p.tobytes() == ref_p.tobytes()
    assert got_l.dtype == ref_l.dtype and got_l.tobytes() == ref_l.tobytes()


# ------------------------------------------------------------------------------------------------ inversion
def test_trace_inverts_labels_probabilities_and_dropped_slices():
    images, label = _case()
    cfg = PreprocessConfig(slice_axis=2, crop="bbox", crop_size=(9, 8), only_labelled_slices=True)
    sample = preprocessing_pipeline(cfg, 2)(Sample(images, label))
    assert [type(a.transform) for a in sample.trace] == [Normalise, ToSliceMajor, SelectSlices, CropPad,
                                                         type(sample.trace[-1].transform)]
    assert sample.image.shape == (2, 3, 9, 8) and sample.label.shape == (3, 9, 8)  # z = 1, 2, 4 kept
    back = invert(sample.label, sample.trace, "label")
    np.testing.assert_array_equal(back, label)  # the box encloses the foreground; dropped slices are background
    onehot = np.moveaxis(np.eye(3, dtype=np.float32)[sample.label], -1, 0)
    probs = invert(onehot, sample.trace, "probabilities")
    assert probs.shape == (3, *label.shape)
    np.testing.assert_array_equal(probs.sum(0), 1.0)
    np.testing.assert_array_equal(probs.argmax(0), label)
    assert (probs[0, :, :, [0, 3, 5]] == 1).all()  # slices without foreground were not kept: background
    with pytest.raises(ValueError, match="kind"):
        invert(sample.label, sample.trace, "labels")


@pytest.mark.parametrize("mode", ["zscore_slice", "zscore_volume", "max_slice", "max_volume", "minmax_slice", "none",
                                  "ct_dataset"])
def test_normalisation_inverts_to_the_intensities(mode):
    images, _ = _case()
    images = np.clip(images, 25, 240)  # inside the ct_dataset clip bounds, so nothing is lost
    t = Normalise([mode, mode], slice_axis=1, dataset_stats=[CT[0], CT[0]])
    sample = t(Sample(images))
    assert sample.image.dtype == np.float32
    assert np.array_equal(sample.image, images) == (mode == "none")
    back = invert(sample.image, sample.trace, "image")
    np.testing.assert_allclose(back, images, rtol=2e-5, atol=2e-4)
    labels = np.ones((11, 9, 6), np.int64)
    np.testing.assert_array_equal(invert(labels, sample.trace, "label"), labels)


LPS_AFF = np.array([[-0.8, 0, 0, 10.0], [0, 0, 3.0, -4.0], [0, -0.7, 0, 6.0], [0, 0, 0, 1.0]])


def test_canonical_pipeline_is_the_predict_path_and_inverts_to_the_file_order():
    images, _ = _case((2, 10, 7, 8))
    cfg = PreprocessConfig(normalization="zscore_volume", crop="square", target_size=(12, 12))
    sample = preprocessing_pipeline(cfg, 2, all_slices=True, canonical=True)(
        Sample(images, None, affine=LPS_AFF))
    canonical, reo = to_canonical(Volume(images[0], LPS_AFF))
    assert not reo.is_identity and sample.trace[0].record["file_codes"] == "LIA"
    slices = preprocess_volume(reo.apply(images), None, cfg, spacing=canonical.spacing, all_slices=True)
    np.testing.assert_array_equal(np.stack([s.image for s in slices], axis=1), sample.image)
    probs = RNG.random((3, *sample.image.shape[1:])).astype(np.float32)
    probs /= probs.sum(0, keepdims=True)
    predicted = reo.invert(restore_volume(list(np.moveaxis(probs, 1, 0)), [s.geometry for s in slices],
                                          cfg.slice_axis, is_label=False))
    got = invert(probs, sample.trace, "probabilities")
    assert got.shape == (3, 10, 7, 8) and got.tobytes() == np.ascontiguousarray(predicted).tobytes()
    # ToCanonical alone is exact both ways
    t = ToCanonical()(Sample(images, images[0].astype(np.int64), affine=LPS_AFF))
    np.testing.assert_array_equal(invert(t.image, t.trace, "image"), images)
    np.testing.assert_array_equal(invert(t.label, t.trace, "label"), images[0].astype(np.int64))
    assert t.spacing == pytest.approx(canonical.spacing)


def test_onto_grid_records_how_and_inverts():
    ref = Volume(RNG.random((6, 5, 4)).astype(np.float32) + 1, np.diag([1.0, 1.0, 2.0, 1.0]))
    same, note, record = OntoGrid(ref, name="T2W", ref_name="T1C").apply(Volume(ref.array * 2, ref.affine))
    assert note is None and record["how"] == "same"
    # the same grid stored x-flipped: reoriented without interpolation, inverted exactly
    flip = np.array(ref.affine)
    flip[0, 0], flip[0, 3] = -1.0, 5.0
    stored = Volume(np.ascontiguousarray(ref.array[::-1] * 3), flip)
    t = OntoGrid(ref, name="T2W", ref_name="T1C", case="c1")
    aligned, note, record = t.apply(stored)
    assert record["how"] == "reoriented" and note.startswith("case c1: T2W reoriented onto T1C's grid")
    np.testing.assert_array_equal(aligned.array, ref.array * 3)
    np.testing.assert_array_equal(t.inverse(aligned.array, record, "image"), stored.array)
    # another grid: resampled, and the inverse lands on the stored grid again
    fine = Volume(np.repeat(ref.array, 2, axis=0), np.diag([0.5, 1.0, 2.0, 1.0]))
    fine.affine[0, 3] = -0.25
    t = OntoGrid(ref, name="T2W", ref_name="T1C")
    aligned, note, record = t.apply(fine)
    assert record["how"] == "resampled" and "resampled (linear)" in note and aligned.shape == ref.shape
    labels = (ref.array > 1.5).astype(np.int64)
    back = t.inverse(labels, record, "label")
    assert back.shape == fine.shape and set(np.unique(back)) <= {0, 1}
    np.testing.assert_array_equal(back[::2], labels)  # nearest neighbour from the coarse grid


# ------------------------------------------------------------------------------------------------ random
def _flipped(a: np.ndarray, axes: tuple[bool, ...], lead: int) -> np.ndarray:
    flipped = [lead + i for i, f in enumerate(axes) if f]
    return np.flip(a, tuple(flipped)) if flipped else a


def test_random_flip_depends_only_on_seed_step_and_sample():
    x = RNG.random((10, 2, 3, 4, 5)).astype(np.float32)
    y = RNG.integers(0, 3, (10, 3, 4, 5))
    flip = RandomFlip(axes=(0, 1, 2), p=0.5, seed=7)
    ax, ay = flip.batch(x, y, step=4)
    bx, by = RandomFlip(axes=(0, 1, 2), p=0.5, seed=7).batch(x, y, step=4)
    np.testing.assert_array_equal(ax, bx)
    np.testing.assert_array_equal(ay, by)
    # ranks (or workers) taking any share in any order draw what the whole batch drew
    parts = [flip.batch(x[i:i + 5], y[i:i + 5], step=4, first_index=i) for i in (5, 0)]
    np.testing.assert_array_equal(np.concatenate([parts[1][0], parts[0][0]]), ax)
    for i in reversed(range(10)):
        s = flip(Sample(x[i], y[i]), step=4, index=i)
        np.testing.assert_array_equal(s.image, ax[i])
        np.testing.assert_array_equal(s.label, ay[i])
    # image and label flip together, and the draws vary with step and index
    combos = set()
    for step, index in itertools.product(range(6), range(6)):
        s = flip(Sample(x[0], y[0]), step=step, index=index)
        (axes,) = [f for f in itertools.product((False, True), repeat=3)
                   if np.array_equal(s.image, _flipped(x[0], f, lead=1))]
        np.testing.assert_array_equal(s.label, _flipped(y[0], axes, lead=0))
        combos.add(axes)
    assert len(combos) >= 4
    assert not np.array_equal(RandomFlip(p=0.5, seed=8).batch(x, y, step=4)[0], ax)
    assert not np.array_equal(flip.batch(x, y, step=5)[0], ax)
    assert not np.array_equal(RandomFlip(p=0.5, seed=7, key="other").batch(x, y, step=4)[0], ax)
    np.testing.assert_array_equal(RandomFlip(p=0.0).batch(x, y, step=0)[0], x)
    np.testing.assert_array_equal(RandomFlip(axes=(2,), p=1.0).batch(x, y, step=0)[0], np.flip(x, 4))
    with pytest.raises(ValueError):
        flip.generator(-1, 0)
