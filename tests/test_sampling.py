"""Deterministic, resumable batch samplers (modalseg.data.sampling)."""

from __future__ import annotations

import numpy as np
import pytest

from modalseg.data.sampling import EpochBatchSampler, UnpairedBatchSampler
from modalseg.errors import DataError

INDICES = np.arange(100, 137)  # 37 indices, not a multiple of any batch size used below


def _all(sampler: EpochBatchSampler, epoch: int, start: int = 0) -> list[np.ndarray]:
    return list(sampler.batches(epoch, start_batch=start))


def test_epoch_sampler_deterministic_and_covers_every_index_once():
    a = EpochBatchSampler(INDICES, 4, seed=7)
    b = EpochBatchSampler(INDICES.copy(), 4, seed=7)
    for epoch in (0, 1, 5):
        ba, bb = _all(a, epoch), _all(b, epoch)
        assert len(ba) == a.num_batches(epoch) == 10
        assert all(np.array_equal(x, y) for x, y in zip(ba, bb, strict=True))
        flat = np.concatenate(ba)
        assert sorted(flat.tolist()) == INDICES.tolist()
        assert [len(x) for x in ba] == [4] * 9 + [1]
    assert not np.array_equal(np.concatenate(_all(a, 0)), np.concatenate(_all(a, 1)))
    assert not np.array_equal(a.order(0), EpochBatchSampler(INDICES, 4, seed=8).order(0))
    # the documented formula
    expected = INDICES[np.random.Generator(np.random.PCG64(7 + 3 * 1_000_003)).permutation(37)]
    np.testing.assert_array_equal(a.order(3), expected)


def test_no_shuffle_and_drop_last():
    s = EpochBatchSampler(INDICES, 5, shuffle=False, drop_last=True)
    batches = _all(s, 3)
    assert len(batches) == 7 and np.array_equal(np.concatenate(batches), INDICES[:35])


def test_resume_mid_epoch_equals_uninterrupted():
    s = EpochBatchSampler(INDICES, 3, seed=11)
    full = _all(s, 2)
    for start in (0, 1, 6, len(full) - 1, len(full)):
        resumed = _all(EpochBatchSampler(INDICES, 3, seed=11), 2, start)
        assert len(resumed) == len(full) - start
        assert all(np.array_equal(x, y) for x, y in zip(resumed, full[start:], strict=True))
    with pytest.raises(ValueError, match="start_batch"):
        _all(s, 2, len(full) + 1)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ddp_shares_concatenate_to_single_process_batches(world_size, drop_last):
    per_rank = 2
    single = EpochBatchSampler(INDICES, per_rank * world_size, seed=3, drop_last=drop_last)
    ranks = [
        EpochBatchSampler(INDICES, per_rank, seed=3, drop_last=drop_last, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    counts = {r.num_batches(1) for r in ranks}
    assert len(counts) == 1  # every rank runs the same number of steps
    shares = [_all(r, 1) for r in ranks]
    ref = _all(single, 1)
    n_full = len(INDICES) // (per_rank * world_size)
    for b in range(counts.pop()):
        parts = [shares[r][b] for r in range(world_size)]
        assert all(len(p) >= 1 for p in parts)  # never an empty batch
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
        # full global batches and the kept short last one alike: the same samples in the same order
        np.testing.assert_array_equal(np.concatenate(parts), ref[b])
        if b >= n_full:
            assert not drop_last
    # mid-epoch resume on a rank
    np.testing.assert_array_equal(_all(ranks[1], 1, 2)[0], shares[1][2])


def test_batch_at_step_is_batch_of_epoch():
    fg = (INDICES % 3 == 0)
    s = EpochBatchSampler(INDICES, 4, seed=2, rank=1, world_size=2, drop_last=True, foreground=fg,
                          foreground_fraction=0.5)
    n = s.num_batches(0)
    assert n == 4
    for epoch in (0, 2):
        for b, batch in enumerate(_all(s, epoch)):
            np.testing.assert_array_equal(s.batch_at(epoch * n + b), batch)
    with pytest.raises(ValueError, match="step"):
        s.batch_at(-1)
    with pytest.raises(ValueError, match="no batches"):
        EpochBatchSampler(INDICES, 40, drop_last=True).batch_at(0)


def test_short_last_batch_smaller_than_world_size_is_dropped():
    idx = np.arange(9)  # 9 = 2*4 + 1: the last global batch has 1 item for 4 ranks
    ranks = [EpochBatchSampler(idx, 2, rank=r, world_size=4) for r in range(4)]
    assert [r.num_batches(0) for r in ranks] == [1, 1, 1, 1]
    assert EpochBatchSampler(idx, 8).num_batches(0) == 2  # single process keeps it


def test_sampler_argument_checks():
    with pytest.raises(ValueError):
        EpochBatchSampler(INDICES, 0)
    with pytest.raises(ValueError):
        EpochBatchSampler(INDICES, 2, rank=2, world_size=2)
    with pytest.raises(DataError, match="'LGE' has no training slices"):
        UnpairedBatchSampler({"C0": np.arange(5), "LGE": np.array([], int)}, 2)


# ---------------------------------------------------------------------------------------------- unpaired
MODS = {"C0": np.arange(0, 24), "LGE": np.arange(1000, 1010)}


def test_unpaired_deterministic_and_resumable():
    a = UnpairedBatchSampler(MODS, 4, seed=5)
    run = list(a.steps(0, 12))
    again = list(UnpairedBatchSampler({k: v.copy() for k, v in MODS.items()}, 4, seed=5).steps(0, 12))
    resumed = list(UnpairedBatchSampler(MODS, 4, seed=5).steps(7, 5))
    for x, y in zip(run, again, strict=True):
        assert x.keys() == {"C0", "LGE"}
        assert all(np.array_equal(x[m], y[m]) for m in x)
    for x, y in zip(run[7:], resumed, strict=True):
        assert all(np.array_equal(x[m], y[m]) for m in x)
    other = list(UnpairedBatchSampler(MODS, 4, seed=6).steps(0, 12))
    assert any(not np.array_equal(x["C0"], y["C0"]) for x, y in zip(run, other, strict=True))
    assert all(len(b[m]) == 4 for b in run for m in b)


def test_unpaired_per_modality_coverage_without_replacement():
    s = UnpairedBatchSampler(MODS, 4, seed=0)
    steps = list(s.steps(0, 30))  # 120 draws: 5 epochs of C0, 12 of LGE
    for m, idx in MODS.items():
        stream = np.concatenate([b[m] for b in steps])
        assert set(stream.tolist()) <= set(idx.tolist())
        n = len(idx)
        epochs = [stream[e * n : (e + 1) * n] for e in range(len(stream) // n)]
        for e, chunk in enumerate(epochs):
            assert sorted(chunk.tolist()) == sorted(idx.tolist())  # every slice exactly once per epoch
            if e:
                assert not np.array_equal(chunk, epochs[0])  # reshuffled every epoch
    assert s.epoch_of("LGE", 5) == 2 and s.epoch_of("C0", 5) == 0
    # modalities are shuffled independently even with identical index sets
    twin = UnpairedBatchSampler({"a": np.arange(16), "b": np.arange(16)}, 16, seed=0)
    first = twin.batch_at(0)
    assert not np.array_equal(first["a"], first["b"])


def test_unpaired_ddp_shares_concatenate_to_global_batch():
    single = UnpairedBatchSampler(MODS, 6, seed=2)
    ranks = [UnpairedBatchSampler(MODS, 2, seed=2, rank=r, world_size=3) for r in range(3)]
    for step in (0, 3, 17):
        ref = single.batch_at(step)
        parts = [r.batch_at(step) for r in ranks]
        for m in MODS:
            np.testing.assert_array_equal(np.concatenate([p[m] for p in parts]), ref[m])
