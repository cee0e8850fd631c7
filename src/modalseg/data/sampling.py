"""Deterministic, resumable batch order for training (single process and DDP).

The order of samples is a pure function of the seed and the epoch (paired, :class:`EpochBatchSampler`) or
of the seed and the step (unpaired, :class:`UnpairedBatchSampler`). Nothing depends on how many batches were
drawn before, so a run resumed at (epoch, batch) or at a step sees exactly the batches of an uninterrupted
run, and a DDP run sees exactly the global batches of a single-process run with ``batch_size * world_size``.

DDP sharding: every *global* batch of ``batch_size * world_size`` samples is split into contiguous per-rank
shares (rank ``r`` gets items ``[r*batch_size, (r+1)*batch_size)``); concatenating the shares of all ranks in
rank order gives the global batch.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping

import numpy as np

from modalseg.errors import DataError

_EPOCH_STRIDE = 1_000_003


def _check_rank(batch_size: int, rank: int, world_size: int) -> None:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class EpochBatchSampler:
    """Epoch-wise batches over ``indices`` (e.g. ``SliceCache.indices_for(train_cases)``).

    The permutation of epoch ``e`` is ``Generator(PCG64(seed + e * 1_000_003)).permutation(len(indices))``
    (identity when ``shuffle=False``).

    Last incomplete global batch (``len(indices)`` not a multiple of ``batch_size * world_size``):

    * ``drop_last=True``: dropped on every rank (recommended for DDP: every rank then has the same batch size
      and DDP's gradient average equals the single-process mean exactly).
    * ``drop_last=False`` (default): kept and split into ``world_size`` contiguous shares as evenly as
      possible (sizes differ by at most 1; with ``world_size=1`` it is simply the short batch). If it has
      fewer items than ``world_size`` it is dropped, so that no rank ever gets an empty batch and every rank
      runs the same number of steps (required by DDP's collective calls).
    """

    def __init__(
        self,
        indices: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        foreground: np.ndarray | None = None,
        foreground_fraction: float = 0.0,
    ) -> None:
        _check_rank(batch_size, rank, world_size)
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        # Foreground oversampling (nnU-Net forces a third of every batch to contain foreground): the last
        # round(fraction * global batch) positions of each global batch that hold a slice without foreground are
        # replaced by foreground slices drawn from (seed, epoch, batch), so resume and DDP stay exact.
        self.foreground_fraction = float(foreground_fraction)
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        fg = np.zeros(len(self.indices), bool) if foreground is None else np.asarray(foreground, bool).reshape(-1)
        if len(fg) != len(self.indices):
            raise ValueError("foreground mask must have one entry per index")
        self._is_fg = dict(zip(self.indices.tolist(), fg.tolist(), strict=True))
        self._fg_pool = self.indices[fg]
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def num_batches(self, epoch: int = 0) -> int:
        """Batches per epoch (the same on every rank; independent of ``epoch``)."""
        n, g = len(self.indices), self.global_batch_size
        full, rest = divmod(n, g)
        keep_last = not self.drop_last and rest >= self.world_size
        return full + int(keep_last)

    def __len__(self) -> int:
        return self.num_batches(0)

    def order(self, epoch: int) -> np.ndarray:
        """All indices of ``epoch`` in visiting order (before sharding)."""
        if not self.shuffle:
            return self.indices.copy()
        rng = np.random.Generator(np.random.PCG64(self.seed + int(epoch) * _EPOCH_STRIDE))
        return self.indices[rng.permutation(len(self.indices))]

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[np.ndarray]:
        """This rank's batches of ``epoch``, starting at batch ``start_batch`` (mid-epoch resume)."""
        total = self.num_batches(epoch)
        if not 0 <= int(start_batch) <= total:
            raise ValueError(f"start_batch {start_batch} outside [0, {total}] for epoch {epoch}")
        order = self.order(epoch)
        g = self.global_batch_size
        for b in range(int(start_batch), total):
            glob = self._oversample(order[b * g : (b + 1) * g], epoch, b)
            if len(glob) == g:
                yield glob[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            else:
                yield np.array_split(glob, self.world_size)[self.rank]

    def batch_at(self, step: int) -> np.ndarray:
        """This rank's batch of global step ``step``, i.e. batch ``step % num_batches`` of epoch
        ``step // num_batches`` (the trainer's step count), for step-based callers such as the patch samplers."""
        total = self.num_batches(0)
        if total < 1:
            raise ValueError("the sampler has no batches (fewer indices than one global batch)")
        if int(step) < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, batch = divmod(int(step), total)
        return next(self.batches(epoch, start_batch=batch))

    def _oversample(self, glob: np.ndarray, epoch: int, batch: int) -> np.ndarray:
        forced = int(round(self.foreground_fraction * len(glob)))
        if not forced or not len(self._fg_pool):
            return glob
        glob = glob.copy()
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(epoch), int(batch), 7])))
        for pos in range(len(glob) - forced, len(glob)):
            if not self._is_fg[int(glob[pos])]:
                glob[pos] = self._fg_pool[rng.integers(len(self._fg_pool))]
        return glob


def _modality_key(name: str) -> int:
    """Stable per-modality seed component (independent of dict order and of Python's hash seed)."""
    return zlib.crc32(name.encode("utf-8"))


class UnpairedBatchSampler:
    """One independent batch per modality and step (paper 2: 8 unpaired slices per modality per step).

    Each modality's indices are visited as an endless stream of epochs; epoch ``e`` of modality ``m`` is a
    permutation drawn from ``SeedSequence([seed, crc32(m), e])``, so no slice repeats within an epoch of its
    modality and every slice is seen once per epoch. Step ``s`` takes stream positions
    ``[s*G, (s+1)*G)`` (``G = batch_size * world_size``) of every modality, and rank ``r`` its contiguous
    share ``[r*batch_size, (r+1)*batch_size)``. A batch that straddles an epoch boundary takes the tail of one
    epoch and the head of the next; if a modality has fewer than ``G`` slices a batch can repeat a slice.
    Everything depends only on (seed, step): resuming at any step reproduces the same batches.
    """

    def __init__(
        self,
        indices_per_modality: Mapping[str, np.ndarray],
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_rank(batch_size, rank, world_size)
        if not indices_per_modality:
            raise ValueError("need at least one modality")
        self.indices = {m: np.asarray(v, dtype=np.int64).reshape(-1) for m, v in indices_per_modality.items()}
        for m, v in self.indices.items():
            if v.size == 0:
                raise DataError(f"modality {m!r} has no training slices")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self._perm_cache: dict[tuple[str, int], np.ndarray] = {}

    @property
    def modalities(self) -> list[str]:
        return list(self.indices)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def steps_per_epoch(self, modality: str) -> float:
        """How many steps one pass over ``modality`` takes (fractional)."""
        return len(self.indices[modality]) / self.global_batch_size

    def epoch_of(self, modality: str, step: int) -> int:
        """The epoch of ``modality`` in which ``step`` starts."""
        return (int(step) * self.global_batch_size) // len(self.indices[modality])

    def _epoch_order(self, modality: str, epoch: int) -> np.ndarray:
        key = (modality, epoch)
        perm = self._perm_cache.get(key)
        if perm is None:
            seq = np.random.SeedSequence([self.seed, _modality_key(modality), epoch])
            order = np.random.Generator(np.random.PCG64(seq)).permutation(len(self.indices[modality]))
            perm = self.indices[modality][order]
            if len(self._perm_cache) > 4 * len(self.indices):
                self._perm_cache.clear()
            self._perm_cache[key] = perm
        return perm

    def _global(self, modality: str, step: int) -> np.ndarray:
        n, g = len(self.indices[modality]), self.global_batch_size
        start, stop = step * g, (step + 1) * g
        parts = []
        pos = start
        while pos < stop:
            epoch, offset = divmod(pos, n)
            take = min(n - offset, stop - pos)
            parts.append(self._epoch_order(modality, epoch)[offset : offset + take])
            pos += take
        return np.concatenate(parts)

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This rank's batch of every modality at ``step``."""
        if int(step) < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return {m: self._global(m, int(step))[lo:hi] for m in self.indices}

    def steps(self, start_step: int, num_steps: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches of steps ``start_step .. start_step + num_steps - 1``."""
        for step in range(int(start_step), int(start_step) + int(num_steps)):
            yield self.batch_at(step)
