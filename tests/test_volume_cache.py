"""Per-case memory-mapped volume store (modalseg.data.volume_cache) and the SliceCache view over it."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

import modalseg.data.cache as mcache
import modalseg.data.volume_cache as mvc
from modalseg.data.cache import SliceCache, build_slice_cache
from modalseg.data.preprocess import PreprocessConfig
from modalseg.data.volume_cache import CACHE_FORMAT, VolumeCache, foreground_sample
from modalseg.errors import ConfigError, DataError, OutputError
from test_cache import CFG, SHAPE, _paired_spec, _unpaired_spec


@pytest.fixture
def built(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    return build_slice_cache(_paired_spec(data), CFG, tmp_path / "cache")


def test_one_memory_mapped_volume_per_case_with_its_records(built):
    cache = built
    assert CACHE_FORMAT == 4
    index = json.loads((cache.path / "index.json").read_text())
    assert index["format"] == 4 and len(index["cases"]) == 3 and len(index["records"]) == 15
    assert not (cache.path / "images.npy").exists()  # format 3's single array is gone
    assert sorted(p.name for p in (cache.path / "cases").iterdir()) == sorted(
        f"{k:06d}_{kind}.npy" for k in range(3) for kind in ("image", "label", "fg"))
    for k, c in enumerate(cache.cases):
        image, label = cache.volume(k)
        assert isinstance(image, np.memmap) and image.shape == (2, SHAPE[2], 8, 8) and image.dtype == np.float32
        assert isinstance(label, np.memmap) and label.shape == (SHAPE[2], 8, 8) and label.dtype == np.uint8
        assert (c.position, c.case_id, c.first, c.depth) == (k, f"case{k}", 5 * k, 5)
        assert c.z == (0, 1, 2, 3, 4) and c.contiguous
        assert c.foreground == (False, True, True, True, False)  # _label puts foreground on z = 1, 2, 3
        assert c.spacing == pytest.approx((4.0, 1.5, 2.25))  # thickness, then 1.0 and 1.5 mm resized 12 -> 8
        assert c.geometry == tuple(cache.geometry(c.first + d) for d in range(5))
        # the slice view is the volume, slice by slice: global index first + d is depth d of case k
        np.testing.assert_array_equal(cache.images[c.first : c.first + 5], np.moveaxis(np.asarray(image), 1, 0))
        np.testing.assert_array_equal(cache.labels[c.first : c.first + 5], label)
        assert [cache.slice_position(c.first + d) for d in range(5)] == [(k, d) for d in range(5)]
    assert cache.positions(["case2", "nope", "case0"]) == [0, 2] and cache.case_position("case1") == 1
    assert len(cache.array_files()) == 9 and all(p.is_file() for p in cache.array_files())


def test_slice_array_indexes_like_the_former_single_array(built):
    for view in (built.images, built.labels):
        dense = np.asarray(view)
        assert dense.shape == view.shape and dense.dtype == view.dtype and view.nbytes == dense.nbytes
        assert len(view) == 15 and view.ndim == dense.ndim
        mask = np.zeros(15, bool)
        mask[[0, 7, 8, 14]] = True
        keys = [3, -1, np.int64(9), slice(2, 9, 3), slice(None, None, -2), slice(20, 30), [9, 2, 14, 2, 0],
                np.array([[1, 2], [13, 4]]), mask, (4, 0), (np.array([5, 1]), 1), (slice(1, 4), 0, 2), Ellipsis,
                (Ellipsis, 0), [-1, 0]]
        for key in keys:
            got, want = view[key], dense[key]
            assert isinstance(got, (np.ndarray, np.generic)) and not isinstance(got, np.memmap)
            np.testing.assert_array_equal(got, want, err_msg=repr(key))
            assert np.shape(got) == np.shape(want), key
        np.testing.assert_array_equal(np.stack(list(view)), dense)
        for bad in (15, -16, [0, 15], np.array([0.5])):
            with pytest.raises(IndexError):
                view[bad]


def test_only_labelled_volumes_stack_the_labelled_slices_and_refuse_deeper_patches(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    spec = _unpaired_spec(data)
    cfg = PreprocessConfig(normalization="zscore_slice", crop="center", crop_size=(16, 16), only_labelled_slices=True)
    cache = build_slice_cache(spec, cfg, tmp_path / "cache")
    assert [c.shape for c in cache.cases] == [(1, 3, 16, 16)] * 4
    assert all(c.z == (1, 2, 3) and all(c.foreground) for c in cache.cases)
    cache.check_patch_depth(1)
    with pytest.raises(ConfigError, match="depth 3 need every slice.*only_labelled_slices.*paper1") as err:
        cache.check_patch_depth(3)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="depth 2"):
        cache.get_patches([(0, (0, 0, 0), (2, 4, 4))])
    # all slices cached: deeper patches are fine
    full = build_slice_cache(spec, PreprocessConfig(crop="center", crop_size=(16, 16)), tmp_path / "cache")
    assert [c.depth for c in full.cases] == [SHAPE[2]] * 4 and all(c.contiguous for c in full.cases)
    full.check_patch_depth(SHAPE[2])


def test_gaps_between_cached_slices_are_recorded(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    spec = _paired_spec(data, n_cases=1)
    lab = np.asarray(mcache.mio.read_volume(spec.cases[0].label, kind="label").array)
    lab[:, :, 2] = 0  # foreground on z = 1 and 3 only
    from test_cache import _save

    _save(spec.cases[0].label, lab.astype(np.int16))
    cfg = PreprocessConfig(normalization="max_slice", target_size=(8, 8), only_labelled_slices=True)
    (case,) = build_slice_cache(spec, cfg, tmp_path / "cache").cases
    assert case.z == (1, 3) and not case.contiguous


def test_open_maps_are_bounded_and_reopened(built, monkeypatch):
    monkeypatch.setattr(mvc, "MAX_OPEN", 2)
    cache = SliceCache(built.path)
    assert len(cache._handles) == 2
    dense = np.asarray(built.images)
    for i in (0, 7, 12, 3, 14, 5):
        np.testing.assert_array_equal(cache.images[i], dense[i])
        assert len(cache._handles) <= 2
    assert list(cache._handles) == [2, 1]  # least recently used first


def test_pickle_carries_no_arrays_and_reopens(built):
    again = pickle.loads(pickle.dumps(built))
    assert len(again._handles) == 0
    np.testing.assert_array_equal(again.get_batch([4, 11])[0].numpy(), built.images[[4, 11]])
    assert isinstance(again, SliceCache) and again.images.shape == built.images.shape


def test_missing_or_wrong_case_file_is_refused_and_rebuilt(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    spec = _paired_spec(data)
    cache = build_slice_cache(spec, CFG, tmp_path / "cache")
    (cache.path / "cases" / "000001_label.npy").unlink()
    with pytest.raises(DataError, match="unreadable slice cache arrays of case case1"):
        VolumeCache(cache.path)
    rebuilt = build_slice_cache(spec, CFG, tmp_path / "cache")
    assert rebuilt.path == cache.path and (rebuilt.path / "cases" / "000001_label.npy").is_file()
    np.save(rebuilt.path / "cases" / "000002_image.npy", np.zeros((2, 4, 8, 8), np.float32))
    with pytest.raises(DataError, match="case case2 are \\(2, 4, 8, 8\\)"):
        SliceCache(rebuilt.path)
    # a cache of the former format is not read (and a build beside it makes a new one)
    index = json.loads((cache.path / "index.json").read_text())
    index["format"] = 3
    (cache.path / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="unsupported slice cache format \\(expected 4\\)"):
        SliceCache(cache.path)


def test_failure_before_the_index_leaves_nothing(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    spec = _paired_spec(data)

    def full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mcache, "atomic_write_text", full)
    with pytest.raises(OutputError, match="No space left on device"):
        build_slice_cache(spec, CFG, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_foreground_voxels_are_sampled_per_class_deterministically(built):
    for k in range(built.num_cases):
        locs = built.foreground_locations(k)
        label = np.asarray(built.volume(k)[1])
        assert locs.dtype == np.int32 and locs.shape[1] == 4
        assert len(locs) == int((label > 0).sum())  # fewer than 10,000: every voxel
        np.testing.assert_array_equal(label[tuple(locs[:, 1:].T)], locs[:, 0])
    label = np.zeros((3, 30, 30), np.uint8)
    label[:, :20] = 1
    label[1, 25:, :5] = 2
    a, b = foreground_sample(label, "x", per_class=50), foreground_sample(label, "x", per_class=50)
    np.testing.assert_array_equal(a, b)
    assert (a[:, 0] == 1).sum() == 50 and (a[:, 0] == 2).sum() == 25  # class 2 has only 25 voxels
    assert (label[tuple(a[:, 1:].T)] == a[:, 0]).all()
    assert not np.array_equal(foreground_sample(label, "y", per_class=50), a)  # another case draws others
