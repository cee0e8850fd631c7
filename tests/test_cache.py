"""Preprocessed-slice cache (modalseg.data.cache)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import modalseg.data.io as mio
from modalseg.data.cache import SliceArray, SliceCache, _read_case, build_slice_cache, cache_fingerprint
from modalseg.data.preprocess import PreprocessConfig, preprocess_volume
from modalseg.data.types import CaseFiles, DatasetSpec
from modalseg.errors import DataError

SHAPE = (20, 18, 5)
LABELS = {"background": 0, "lv": 500, "myo": 200}


def _save(path: Path, array: np.ndarray, spacing=(1.0, 1.5, 4.0)) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))
    return path


def _label(rng: np.random.Generator, z_fg=(1, 2, 3)) -> np.ndarray:
    lab = np.zeros(SHAPE, np.int16)
    for z in z_fg:
        r, c = rng.integers(2, 10, size=2)
        lab[r : r + 6, c : c + 6, z] = 200
        lab[r + 2 : r + 4, c + 2 : c + 4, z] = 500
    return lab


def _paired_spec(root: Path, n_cases: int = 3, seed: int = 0) -> DatasetSpec:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n_cases):
        imgs = tuple(
            _save(root / f"case{i}_{m:04d}.nii.gz", (rng.random(SHAPE) * 100 * (m + 1)).astype(np.float32))
            for m in range(2)
        )
        lab = _save(root / f"case{i}.nii.gz", _label(rng))
        cases.append(CaseFiles(f"case{i}", imgs, lab, patient_id=f"p{i // 2}"))
    return DatasetSpec(root=root, name="toy", modalities=["T1C", "T2W"], labels=dict(LABELS), cases=cases)


def _unpaired_spec(root: Path) -> DatasetSpec:
    rng = np.random.default_rng(1)
    cases = []
    for mod in ("C0", "LGE"):
        for i in range(2):
            img = _save(root / f"p{i}_{mod}.nii.gz", (rng.random(SHAPE) * 50).astype(np.float32))
            lab = _save(root / f"p{i}_{mod}_manual.nii.gz", _label(rng))
            cases.append(CaseFiles(f"p{i}_{mod}", (img,), lab, patient_id=f"p{i}", modality=mod))
    return DatasetSpec(root=root, name="toyu", modalities=["C0", "LGE"], labels=dict(LABELS), cases=cases,
                       paired=False)


CFG = PreprocessConfig(normalization=["zscore_slice", "max_slice"], crop="bbox", crop_size=12,
                       target_size=(8, 8))


@pytest.fixture
def spec(tmp_path: Path) -> DatasetSpec:
    data = tmp_path / "data"
    data.mkdir()
    return _paired_spec(data)


def test_build_contents_match_direct_preprocessing(spec, tmp_path):
    cache = build_slice_cache(spec, CFG, tmp_path / "cache")
    assert len(cache) == 3 * SHAPE[2]
    assert cache.images.shape == (15, 2, 8, 8) and cache.images.dtype == np.float32
    assert cache.labels.shape == (15, 8, 8) and cache.labels.dtype == np.uint8
    # format 4: the slice arrays are views over memory-mapped per-case volumes (C, D, H, W) / (D, H, W)
    assert isinstance(cache.images, SliceArray) and isinstance(cache.labels, SliceArray)
    assert all(isinstance(a, np.memmap) for k in range(cache.num_cases) for a in cache.volume(k))
    assert [c.shape for c in cache.cases] == [(2, 5, 8, 8)] * 3
    assert set(np.unique(cache.labels)) == {0, 1, 2}  # 500 -> 1 (lv), 200 -> 2 (myo)
    assert cache.case_ids == ["case0", "case1", "case2"]
    assert cache.patients == {"p0": ["case0", "case1"], "p1": ["case2"]}
    assert cache.config == CFG and cache.spec_name == "toy" and cache.class_names == list(LABELS)
    rec = cache.records[7]
    assert (rec["case_id"], rec["z"], rec["patient_id"]) == ("case1", 2, "p0")
    assert rec["spacing"] == pytest.approx([1.0 * 12 / 8, 1.5 * 12 / 8])
    assert rec["slice_thickness"] == pytest.approx(4.0)
    # same numbers as preprocessing the volume directly
    imgs = np.stack([mio.read_volume(p).array for p in spec.cases[1].images])
    raw = mio.read_volume(spec.cases[1].label, kind="label").array
    lab = np.select([raw == 500, raw == 200], [1, 2], 0)
    direct = preprocess_volume(imgs, lab, CFG, spacing=(1.0, 1.5, 4.0))
    np.testing.assert_allclose(cache.images[5:10], np.stack([s.image for s in direct]), rtol=1e-6)
    np.testing.assert_array_equal(cache.labels[5:10], np.stack([s.label for s in direct]))
    assert cache.geometry(7) == direct[2].geometry
    assert cache.indices_for(["case2"]).tolist() == list(range(10, 15))


def test_get_batch_order_duplicates_and_types(spec, tmp_path):
    cache = build_slice_cache(spec, CFG, tmp_path / "cache")
    idx = np.array([9, 2, 14, 2, 0])
    x, y = cache.get_batch(idx)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (5, 2, 8, 8) and y.shape == (5, 8, 8)
    np.testing.assert_array_equal(x.numpy(), cache.images[idx])
    np.testing.assert_array_equal(y.numpy(), cache.labels[idx])
    xs, _ = cache.get_batch([1, 3, 4])
    np.testing.assert_array_equal(xs.numpy(), cache.images[[1, 3, 4]])
    with pytest.raises(IndexError):
        cache.get_batch([15])


def test_second_build_reuses_without_reading(spec, tmp_path, monkeypatch):
    first = build_slice_cache(spec, CFG, tmp_path / "cache")

    def boom(*args, **kwargs):
        raise AssertionError("read_volume called on a cache hit")

    monkeypatch.setattr(mio, "read_volume", boom)
    second = build_slice_cache(spec, CFG, tmp_path / "cache")
    assert second.path == first.path and second.fingerprint == first.fingerprint
    np.testing.assert_array_equal(second.images, first.images)
    # a different config is a different cache (and would have to read)
    with pytest.raises(AssertionError, match="cache hit"):
        build_slice_cache(spec, PreprocessConfig(target_size=(8, 8)), tmp_path / "cache")


def test_fingerprint_changes_when_a_file_changes(spec, tmp_path):
    cache_dir = tmp_path / "cache"
    first = build_slice_cache(spec, CFG, cache_dir)
    fp0 = cache_fingerprint(spec, CFG, spec.cases)
    assert fp0 == first.fingerprint
    path = spec.cases[0].label
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched, same content
    assert cache_fingerprint(spec, CFG, spec.cases) != fp0
    lab = mio.read_volume(path, kind="label").array.astype(np.int16)
    lab[:, :, 4] = 500  # real content change
    _save(path, lab)
    second = build_slice_cache(spec, CFG, cache_dir)
    assert second.fingerprint != fp0 and second.path != first.path
    assert second.labels[4].any() and not first.labels[4].any()
    assert cache_fingerprint(spec, CFG, spec.cases[:2]) != second.fingerprint  # subsets differ too


def test_undeclared_label_value_names_file_and_values(spec, tmp_path):
    bad = spec.cases[1].label
    lab = mio.read_volume(bad, kind="label").array.astype(np.int16)
    lab[0, 0, 0] = 600
    lab[1, 0, 0] = 7
    _save(bad, lab)
    with pytest.raises(DataError) as err:
        build_slice_cache(spec, CFG, tmp_path / "cache")
    msg = str(err.value)
    assert str(bad) in msg and "7, 600" in msg and "not declared" in msg
    # nothing half-built is left behind
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []
    # declaring the value as background fixes it
    spec.labels_to_background = (600, 7)
    assert len(build_slice_cache(spec, CFG, tmp_path / "cache")) == 15


def test_interrupted_build_leaves_no_cache(spec, tmp_path, monkeypatch):
    real = mio.read_volume
    calls = {"n": 0}

    def flaky(path, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return real(path, **kwargs)

    monkeypatch.setattr(mio, "read_volume", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_slice_cache(spec, CFG, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(mio, "read_volume", real)
    assert len(build_slice_cache(spec, CFG, tmp_path / "cache")) == 15


def test_shape_mismatch_between_modalities_is_reported(spec, tmp_path):
    """``strict``: another grid is refused (by default it is resampled, but a constant image stays refused)."""
    other = spec.cases[2].images[1]
    _save(other, np.zeros((20, 18, 6), np.float32))
    with pytest.raises(DataError, match=r"differs from modality 0"):
        _read_case(spec, spec.cases[2], spec.label_lut(), strict=True)
    with pytest.raises(DataError, match=r"constant image"):
        build_slice_cache(spec, CFG, tmp_path / "cache")


def test_unpaired_cache_modalities_and_only_labelled(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    spec = _unpaired_spec(data)
    cfg = PreprocessConfig(normalization=["zscore_slice", "max_slice"], crop="center", crop_size=(16, 16),
                           only_labelled_slices=True)
    cache = build_slice_cache(spec, cfg, tmp_path / "cache", cases=["p0_C0", "p1_LGE", "p0_LGE"])
    assert cache.images.shape == (9, 1, 16, 16)  # 3 cases x 3 foreground slices, one channel
    assert cache.case_ids == ["p0_C0", "p1_LGE", "p0_LGE"]
    lge = cache.indices_for(modality="LGE")
    assert lge.tolist() == list(range(3, 9))
    assert [cache.records[i]["z"] for i in lge] == [1, 2, 3, 1, 2, 3]
    assert all(r["foreground"] for r in cache.records)
    # per-modality normalisation: C0 slices are z-scored over the full slice, LGE slices max-scaled
    c0 = cache.images[cache.indices_for(modality="C0")]
    assert c0.min() < 0
    assert cache.images[lge].max() <= 1.0 + 1e-6 and cache.images[lge].min() >= 0
    assert cache.indices_for(["p0_LGE"], modality="C0").size == 0
    with pytest.raises(DataError, match="unknown case id"):
        build_slice_cache(spec, cfg, tmp_path / "cache", cases=["nope"])


def test_stale_tmp_of_dead_process_is_removed(spec, tmp_path):
    import re
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname()) or "host"
    cache_dir = tmp_path / "cache"
    stale = cache_dir / f".tmp-0123456789abcdef-{host}-{dead.pid}-abc_12"
    alive = cache_dir / f".tmp-0123456789abcdef-{host}-{os.getpid()}-xyz_34"
    other_host = cache_dir / f".tmp-0123456789abcdef-elsewhere-{dead.pid}-q"
    for d in (stale, alive, other_host):
        (d / "junk").mkdir(parents=True)
    cache = build_slice_cache(spec, CFG, cache_dir, progress=True)
    assert not stale.exists() and alive.exists() and other_host.exists()
    assert sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith(".")) == [cache.path.name]


def test_pickle_reopens_memmap(spec, tmp_path):
    cache = build_slice_cache(spec, CFG, tmp_path / "cache")
    blob = pickle.dumps(cache)
    assert len(blob) < 20_000  # the arrays are not copied into the pickle
    again = pickle.loads(blob)
    assert isinstance(again.volume(0)[0], np.memmap)
    np.testing.assert_array_equal(again.get_batch([3])[0].numpy(), cache.images[[3]])
    assert SliceCache(cache.path).fingerprint == cache.fingerprint
