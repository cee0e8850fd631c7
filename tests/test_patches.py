"""Patch references, get_patches and the patch samplers (modalseg.data.patches): 2D is depth 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modalseg.data.cache import build_slice_cache
from modalseg.data.patches import (
    PatchRef,
    PatchSampler,
    SlicePatchSampler,
    UnpairedSlicePatchSampler,
    squeeze_depth,
)
from modalseg.data.preprocess import PreprocessConfig
from modalseg.data.sampling import EpochBatchSampler, UnpairedBatchSampler
from modalseg.errors import ConfigError
from test_cache import CFG, SHAPE, _paired_spec, _unpaired_spec


@pytest.fixture
def paired(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    return build_slice_cache(_paired_spec(data), CFG, tmp_path / "cache")


@pytest.fixture
def unpaired(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    cfg = PreprocessConfig(normalization=["zscore_slice", "max_slice"], crop="center", crop_size=(12, 12))
    return build_slice_cache(_unpaired_spec(data), cfg, tmp_path / "cache")


def _same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)
        assert x.numpy().tobytes() == y.numpy().tobytes()


# ------------------------------------------------------------------------------------------ 2D = depth 1
@pytest.mark.parametrize("world_size", [1, 2])
def test_paired_2d_policy_as_depth1_patches_equals_get_batch(paired, world_size):
    idx = paired.indices_for(["case0", "case2", "case1"])
    fg = np.array([paired.records[i]["foreground"] for i in idx])
    assert fg.any() and not fg.all()
    for rank in range(world_size):
        sampler = EpochBatchSampler(idx, 3, seed=5, drop_last=False, rank=rank, world_size=world_size,
                                    foreground=fg, foreground_fraction=0.5)
        policy = SlicePatchSampler(paired, sampler)
        step = 0
        for epoch in (0, 1, 3):
            for b, (indices, refs) in enumerate(zip(sampler.batches(epoch), policy.batches(epoch), strict=True)):
                assert [r.size for r in refs] == [(1, 8, 8)] * len(indices)
                _same(squeeze_depth(*paired.get_patches(refs)), paired.get_batch(indices))
                if epoch == 0:  # the step-based access gives the same batches
                    assert policy.batch_at(step) == refs and b == step
                    step += 1
        x, y = paired.get_patches(policy.batch_at(0))
        assert x.shape == (3, 2, 1, 8, 8) and y.shape == (3, 1, 8, 8)


def test_unpaired_2d_policy_as_depth1_patches_equals_get_batch(unpaired):
    by_mod = {m: unpaired.indices_for(modality=m) for m in ("C0", "LGE")}
    sampler = UnpairedBatchSampler(by_mod, 4, seed=9)
    policy = UnpairedSlicePatchSampler(unpaired, sampler)
    for step, refs in zip(range(3, 9), policy.steps(3, 6), strict=True):
        indices = sampler.batch_at(step)
        assert refs.keys() == indices.keys()
        for m in indices:
            _same(squeeze_depth(*unpaired.get_patches(refs[m])), unpaired.get_batch(indices[m]))
            assert {unpaired.cases[r.case].modality for r in refs[m]} == {m}


def test_squeeze_needs_depth_one(paired):
    x, y = paired.get_patches([PatchRef(0, (0, 0, 0), (2, 8, 8))])
    with pytest.raises(ValueError, match="depth-1"):
        squeeze_depth(x, y)


# ------------------------------------------------------------------------------------------ N-d patches
def test_patch_content_and_padding(paired):
    image, label = (np.asarray(a) for a in paired.volume(1))
    x, y = paired.get_patches([(1, (1, 2, 3), (3, 4, 4)), PatchRef(1, (-1, -2, 6), (3, 4, 4))])
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (2, 2, 3, 4, 4)
    np.testing.assert_array_equal(x[0].numpy(), image[:, 1:4, 2:6, 3:7])
    np.testing.assert_array_equal(y[0].numpy(), label[1:4, 2:6, 3:7])
    padded = np.pad(image, ((0, 0), (1, 0), (2, 0), (0, 2)))  # volume 5x8x8, patch from (-1, -2, 6)
    np.testing.assert_array_equal(x[1].numpy(), padded[:, 0:3, 0:4, 6:10])
    np.testing.assert_array_equal(y[1].numpy(), np.pad(label, ((1, 0), (2, 0), (0, 2)))[0:3, 0:4, 6:10])
    x, y = paired.get_patches([(0, (-5, 0, 0), (2, 8, 8))], image_fill=-7.0, label_fill=9)  # entirely outside
    assert (x == -7).all() and (y == 9).all()
    with pytest.raises(ValueError, match="one size"):
        paired.get_patches([(0, (0, 0, 0), (1, 8, 8)), (0, (0, 0, 0), (2, 8, 8))])
    with pytest.raises(IndexError):
        paired.get_patches([(3, (0, 0, 0), (1, 8, 8))])


def test_patch_sampler_is_a_pure_function_of_seed_step_and_rank(paired):
    size = (3, 5, 5)
    a = PatchSampler(paired, size, 4, seed=1, foreground_fraction=0.5)
    b = PatchSampler(paired, size, 4, seed=1, foreground_fraction=0.5)
    later = [b.batch_at(s) for s in (7, 2, 0)]  # any call order, any earlier calls
    assert later == [a.batch_at(7), a.batch_at(2), a.batch_at(0)]
    assert list(a.steps(5, 3)) == [b.batch_at(s) for s in (5, 6, 7)]
    assert a.batch_at(0) != a.batch_at(1)
    assert a.batch_at(0) != PatchSampler(paired, size, 4, seed=2, foreground_fraction=0.5).batch_at(0)
    assert a.batch_at(0) != PatchSampler(paired, size, 4, seed=1, stream=3, foreground_fraction=0.5).batch_at(0)
    # DDP: the ranks' shares concatenate to the single process's global batch
    single = PatchSampler(paired, size, 6, seed=4, foreground_fraction=1 / 3)
    ranks = [PatchSampler(paired, size, 2, seed=4, rank=r, world_size=3, foreground_fraction=1 / 3)
             for r in range(3)]
    for step in (0, 3, 11):
        assert sum((r.batch_at(step) for r in ranks), []) == single.batch_at(step) == single.global_batch(step)
    for ref in single.global_batch(0) + a.global_batch(9):
        shape = paired.cases[ref.case].shape[1:]
        assert ref.size == size
        assert all(0 <= s <= n - p for s, n, p in zip(ref.start, shape, ref.size, strict=True))


def test_foreground_oversampling_centres_the_last_fraction_on_foreground(paired):
    sampler = PatchSampler(paired, (1, 2, 2), 8, seed=0, foreground_fraction=0.25)  # last 2 of every 8
    none = PatchSampler(paired, (1, 2, 2), 8, seed=0, foreground_fraction=0.0)
    forced_hits, free_hits = [], []
    for step in range(40):
        _, y = paired.get_patches(sampler.batch_at(step))
        fg = (y > 0).flatten(1).any(1).tolist()
        assert all(fg[6:])  # every forced patch contains its foreground voxel
        forced_hits += fg[6:]
        _, y0 = paired.get_patches(none.batch_at(step))
        free_hits += (y0 > 0).flatten(1).any(1).tolist()
    assert 0 < np.mean(free_hits) < 1  # uniform 2x2 patches often miss the small foreground
    # same (seed, step, index) -> same draw whether or not other samples are forced
    assert sampler.batch_at(3)[:6] == none.batch_at(3)[:6]


def test_larger_than_volume_is_centred_and_padded(paired):
    sampler = PatchSampler(paired, (9, 8, 12), 2, seed=0, foreground_fraction=0.5)
    for ref in sampler.global_batch(0) + sampler.global_batch(1):
        assert ref.start[0] == -2 and ref.start[2] == -2  # (9 - 5) // 2, (12 - 8) // 2
    x, y = paired.get_patches(sampler.batch_at(0))
    assert x.shape == (2, 2, 9, 8, 12) and (x[:, :, :2] == 0).all() and (y[:, :, :, :2] == 0).all()


def test_deeper_patches_refused_on_labelled_slices_only(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    cfg = PreprocessConfig.paper1()
    cfg.target_size = (8, 8)
    cache = build_slice_cache(_paired_spec(data, n_cases=2), cfg, tmp_path / "cache")
    PatchSampler(cache, (1, 8, 8), 2)
    with pytest.raises(ConfigError, match="depth 2 need every slice"):
        PatchSampler(cache, (2, 8, 8), 2)
    with pytest.raises(ValueError, match="patch_size"):
        PatchSampler(cache, (0, 8, 8), 2)
    assert [c.depth for c in cache.cases] == [3, 3] and SHAPE[2] == 5
