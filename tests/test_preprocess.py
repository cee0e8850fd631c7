"""Slicing, normalisation, crop/resize and restore (modalseg.data.preprocess)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modalseg.data.preprocess import (
    PreprocessConfig,
    SliceGeometry,
    bbox_for_volume,
    center_box,
    crop_slice,
    preprocess_slice,
    preprocess_volume,
    restore_slice,
    restore_volume,
)
from modalseg.errors import ConfigError

RNG = np.random.default_rng(0)


def _images(m: int = 2, h: int = 24, w: int = 20, scale: float = 300.0) -> np.ndarray:
    return (RNG.random((m, h, w)) * scale + 10.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------- config
def test_config_validation_and_round_trip():
    with pytest.raises(ConfigError, match="unknown mode 'zscore'"):
        PreprocessConfig(normalization="zscore")
    with pytest.raises(ConfigError, match="unknown mode"):
        PreprocessConfig(normalization=["max_slice", "bogus"])
    with pytest.raises(ConfigError, match="unknown crop"):
        PreprocessConfig(crop="random")
    with pytest.raises(ConfigError, match="crop_size: required"):
        PreprocessConfig(crop="bbox")
    with pytest.raises(ConfigError, match="slice_axis"):
        PreprocessConfig(slice_axis=3)
    with pytest.raises(ConfigError, match="target_size"):
        PreprocessConfig(target_size=(0, 32))
    with pytest.raises(ConfigError, match="unknown option"):
        PreprocessConfig.from_dict({"slice_axis": 2, "normalisation": "max_slice"})

    cfg = PreprocessConfig(normalization=["max_slice", "zscore_volume"], crop="center", crop_size=48,
                           target_size=[32, 40], only_labelled_slices=True)
    assert cfg.crop_size == (48, 48) and cfg.target_size == (32, 40)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert PreprocessConfig.from_dict(data) == cfg


def test_paper_presets():
    p1 = PreprocessConfig.paper1()
    assert (p1.normalization, p1.target_size, p1.crop, p1.slice_axis) == ("max_slice", (256, 256), "none", 2)
    assert p1.only_labelled_slices
    ms = PreprocessConfig.paper2_mscmrseg()
    assert (ms.normalization, ms.crop, ms.crop_size) == ("zscore_slice", "bbox", (224, 224))
    assert ms.target_size is None
    wh = PreprocessConfig.paper2_mmwhs()
    assert (wh.slice_axis, wh.normalization, wh.crop, wh.crop_size) == (1, "zscore_slice", "bbox", (256, 256))
    for cfg in (p1, ms, wh):
        assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------------- normalisation
def test_zscore_slice_and_max_slice():
    imgs = _images()
    out, lab, geom = preprocess_slice(imgs, None, PreprocessConfig(normalization="zscore_slice"))
    assert lab is None and out.dtype == np.float32 and out.shape == imgs.shape
    np.testing.assert_allclose(out.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2)), 1.0, atol=1e-4)
    assert geom == SliceGeometry((24, 20), (0, 0, 24, 20), (24, 20))

    out, _, _ = preprocess_slice(imgs, None, PreprocessConfig(normalization="max_slice"))
    np.testing.assert_allclose(out.max(axis=(1, 2)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out, imgs / imgs.max(axis=(1, 2), keepdims=True), rtol=1e-6)

    out, _, _ = preprocess_slice(imgs, None, PreprocessConfig(normalization="minmax_slice"))
    np.testing.assert_allclose(out.min(axis=(1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(out.max(axis=(1, 2)), 1.0, atol=1e-6)

    out, _, _ = preprocess_slice(imgs, None, PreprocessConfig(normalization="none"))
    np.testing.assert_array_equal(out, imgs)


def test_per_channel_modes_and_constant_slice():
    imgs = _images()
    imgs[1] = 7.0  # constant channel: no division by ~0, no NaN
    cfg = PreprocessConfig(normalization=["max_slice", "zscore_slice"])
    out, _, _ = preprocess_slice(imgs, None, cfg)
    assert np.isfinite(out).all()
    assert out[0].max() == pytest.approx(1.0)
    np.testing.assert_array_equal(out[1], 0.0)
    with pytest.raises(ConfigError, match="lists 2 mode"):
        preprocess_slice(_images(m=3), None, cfg)


def test_volume_modes_use_volume_statistics():
    vol = (RNG.random((1, 10, 12, 6)) * 50 + RNG.random((1, 1, 1, 6)) * 500).astype(np.float32)
    slices = preprocess_volume(vol, None, PreprocessConfig(normalization="zscore_volume"))
    stacked = np.stack([s.image[0] for s in slices], axis=-1)
    assert stacked.mean() == pytest.approx(0.0, abs=1e-5)
    assert stacked.std() == pytest.approx(1.0, abs=1e-4)
    # per slice the statistics are NOT 0/1 (slices have different offsets)
    assert max(abs(float(s.image.mean())) for s in slices) > 0.1
    slices = preprocess_volume(vol, None, PreprocessConfig(normalization="max_volume"))
    assert max(float(s.image.max()) for s in slices) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="volume statistics"):
        preprocess_slice(vol[:, :, :, 0], None, PreprocessConfig(normalization="zscore_volume"))


def test_normalisation_statistics_do_not_depend_on_the_crop():
    imgs = _images(h=32, w=32)
    full, _, _ = preprocess_slice(imgs, None, PreprocessConfig())
    box = (3, 5, 19, 21)
    cropped, _, geom = preprocess_slice(imgs, None, PreprocessConfig(crop="center", crop_size=16), box)
    np.testing.assert_allclose(cropped, full[:, 3:19, 5:21], rtol=1e-6)
    assert geom.box == box


# ------------------------------------------------------------------------------------------ resize/restore
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    h=st.integers(4, 40),
    w=st.integers(4, 40),
    oh=st.integers(3, 48),
    ow=st.integers(3, 48),
    values=st.lists(st.integers(0, 9), min_size=1, max_size=5, unique=True),
    seed=st.integers(0, 2**16),
)
def test_resize_and_restore_never_invent_label_values(h, w, oh, ow, values, seed):
    rng = np.random.default_rng(seed)
    label = rng.choice(np.array(values), size=(h, w))
    cfg = PreprocessConfig(normalization="none", target_size=(oh, ow))
    img, lab, geom = preprocess_slice(np.zeros((1, h, w), np.float32), label, cfg)
    assert lab.shape == (oh, ow) and img.shape == (1, oh, ow)
    assert set(np.unique(lab)) <= set(np.unique(label))
    back = restore_slice(lab, geom, is_label=True)
    assert back.shape == (h, w)
    assert set(np.unique(back)) <= set(np.unique(label))


def test_crop_restore_round_trip_exact_without_resize():
    label = np.zeros((30, 26, 4), np.int64)
    label[8:14, 5:12, 1] = 1
    label[10:16, 9:15, 2] = 2
    cfg = PreprocessConfig(crop="bbox", crop_size=(16, 12))
    slices = preprocess_volume(RNG.random((1, 30, 26, 4)).astype(np.float32), label, cfg)
    for s in slices:
        assert s.image.shape == (1, 16, 12) and not s.geometry.resized
        back = restore_slice(s.label, s.geometry, is_label=True)
        np.testing.assert_array_equal(back, label[:, :, s.z])  # the box encloses all foreground
        onehot = np.eye(3, dtype=np.float32)[s.label].transpose(2, 0, 1)
        probs = restore_slice(onehot, s.geometry, is_label=False)
        np.testing.assert_array_equal(probs.argmax(0), label[:, :, s.z])
        np.testing.assert_array_equal(probs.sum(0), 1.0)
    vol = restore_volume([s.label for s in slices], [s.geometry for s in slices], 2, is_label=True)
    np.testing.assert_array_equal(vol, label)


def test_restore_probabilities_resized_sum_to_one_and_background_outside_box():
    geom = SliceGeometry(orig_shape=(20, 22), box=(2, 4, 18, 20), out_shape=(8, 8))
    p = RNG.random((3, 8, 8)).astype(np.float32)
    p /= p.sum(0, keepdims=True)
    out = restore_slice(p, geom, is_label=False)
    assert out.shape == (3, 20, 22)
    np.testing.assert_allclose(out.sum(0), 1.0, rtol=1e-5)
    assert (out[0, :2] == 1).all() and (out[1:, :, :4] == 0).all() and (out[0, :, 20:] == 1).all()


def test_padding_when_image_smaller_than_box():
    imgs = _images(m=1, h=10, w=30)
    label = np.zeros((10, 30), np.int64)
    label[3:6, 10:14] = 2
    cfg = PreprocessConfig(normalization="max_slice", crop="center", crop_size=(16, 16))
    img, lab, geom = preprocess_slice(imgs, label, cfg)
    assert geom.box == (-3, 7, 13, 23)
    assert img.shape == (1, 16, 16)
    np.testing.assert_array_equal(img[:, :3], 0.0)  # padding after normalisation
    np.testing.assert_array_equal(img[:, 13:], 0.0)
    np.testing.assert_allclose(img[0, 3:13], imgs[0, :, 7:23] / imgs.max(), rtol=1e-6)
    np.testing.assert_array_equal(restore_slice(lab, geom, is_label=True), label)


def test_processed_spacing_and_slice_axis():
    vol = RNG.random((1, 16, 12, 10)).astype(np.float32)
    label = np.zeros((16, 12, 10), np.int64)
    label[4:8, :, 3:5] = 1
    cfg = PreprocessConfig(slice_axis=1, target_size=(8, 20))
    slices = preprocess_volume(vol, label, cfg, spacing=(0.5, 2.0, 3.0))
    assert len(slices) == 12
    assert slices[0].geometry.orig_shape == (16, 10)  # (X, Z) for coronal-like axis 1
    assert slices[0].spacing == pytest.approx((0.5 * 16 / 8, 3.0 * 10 / 20))
    lab_only = preprocess_volume(vol, label, PreprocessConfig(slice_axis=2, only_labelled_slices=True))
    assert [s.z for s in lab_only] == [3, 4] and all(s.has_foreground for s in lab_only)
    every = preprocess_volume(vol, label, PreprocessConfig(only_labelled_slices=True), all_slices=True)
    assert len(every) == 10


# ---------------------------------------------------------------------------------------------- boxes
@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(8, 40), st.integers(8, 40), st.integers(1, 5)),
    size=st.tuples(st.integers(4, 48), st.integers(4, 48)),
    axis=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_bbox_contains_all_foreground(shape, size, axis, seed):
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.int64)
    plane = [d for i, d in enumerate(shape) if i != axis]
    # a foreground blob that fits in the box (random position, random slices)
    eh, ew = rng.integers(1, min(size[0], plane[0]) + 1), rng.integers(1, min(size[1], plane[1]) + 1)
    r0, c0 = rng.integers(0, plane[0] - eh + 1), rng.integers(0, plane[1] - ew + 1)
    mask2d = np.zeros(plane, bool)
    mask2d[r0 : r0 + eh, c0 : c0 + ew] = rng.random((eh, ew)) < 0.7
    mask2d[r0, c0] = mask2d[r0 + eh - 1, c0 + ew - 1] = True
    z = rng.integers(0, shape[axis])
    np.moveaxis(label, axis, 0)[z][mask2d] = 3
    box = bbox_for_volume(label, axis, size)
    assert (box[2] - box[0], box[3] - box[1]) == size
    rows, cols = np.nonzero(mask2d)
    assert box[0] <= rows.min() and rows.max() < box[2]
    assert box[1] <= cols.min() and cols.max() < box[3]
    for k in (0, 1):  # inside the image when the image is large enough
        if plane[k] >= size[k]:
            assert 0 <= box[k] and box[k + 2] <= plane[k]


def test_bbox_without_foreground_and_predict_fallback_is_centre():
    assert bbox_for_volume(np.zeros((20, 30, 3)), 2, 10) == center_box((20, 30), (10, 10)) == (5, 10, 15, 20)
    cfg = PreprocessConfig(crop="bbox", crop_size=10)
    slices = preprocess_volume(RNG.random((1, 20, 30, 3)).astype(np.float32), None, cfg)
    assert all(s.geometry.box == (5, 10, 15, 20) for s in slices) and slices[0].label is None


def test_crop_slice_outside_parts_are_fill():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = crop_slice(a, (-1, 2, 2, 6), fill=-5)
    np.testing.assert_array_equal(out, [[-5, -5, -5, -5], [2, 3, -5, -5], [6, 7, -5, -5]])
