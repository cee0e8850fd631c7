"""Patches of cached volumes, and samplers that choose them as a pure function of (seed, step, rank).

A :class:`PatchRef` names a box of one cached case's slice-major volume: ``case`` (its position in
``VolumeCache.cases``), ``start`` ``(d, h, w)`` (may be negative or reach past the end: that part is padding) and
``size`` ``(d, h, w)``. ``VolumeCache.get_patches(refs)`` reads them as ``(B, C, D, H, W)`` / ``(B, D, H, W)``.

**2D is depth 1.** A 2D slice is the patch ``(case, (d, 0, 0), (1, H, W))``; :func:`squeeze_depth` turns a batch of
them into today's ``(B, C, H, W)`` / ``(B, H, W)``. Today's 2D batch orders are kept exactly:
:class:`SlicePatchSampler` and :class:`UnpairedSlicePatchSampler` express :class:`~modalseg.data.sampling.
EpochBatchSampler` and :class:`~modalseg.data.sampling.UnpairedBatchSampler` (same slices, same order, same
foreground oversampling) as depth-1 patches, so ``get_patches`` of their refs equals ``SliceCache.get_batch`` of
the samplers' indices bit for bit.

**N-d patches** (:class:`PatchSampler`, nnU-Net's policy): every sample of a step's *global* batch draws from its own
generator ``SeedSequence([seed, stream, step, index])`` (``index`` = position in the global batch), so a rank
computes only its share, a resumed run repeats every step, and the shares of all ranks concatenate to the batch of
one process with ``batch_size * world_size``. A sample picks a case uniformly, then a patch position: uniform
where the patch fits along an axis, centred where it is larger than the volume (the rest is padding). The last
``round(foreground_fraction * global batch)`` samples are centred on a foreground voxel instead (a random class of
those the case has, then a random voxel of it from the cache's sample of 10,000 per class), shifted to stay inside
the volume where it fits, so the patch always contains that voxel; a case without foreground falls back to
uniform.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from modalseg.data.sampling import EpochBatchSampler, UnpairedBatchSampler, _check_rank


class SliceRefSource(Protocol):
    """What the 2D samplers need of a cache (``SliceCache``): global slice indices as depth-1 patch refs."""

    def slice_refs(self, indices: Sequence[int] | np.ndarray) -> list[PatchRef]: ...


class PatchVolumes(Protocol):
    """What :class:`PatchSampler` needs of a cache (``VolumeCache``): the cases' shapes and foreground voxels.

    A contract rather than the cache class, so that the caches can import the patch refs without a cycle."""

    cases: Sequence[Any]  # each with ``shape`` (C, D, H, W)

    @property
    def num_cases(self) -> int: ...

    def check_patch_depth(self, depth: int) -> None: ...

    def foreground_locations(self, case: int) -> np.ndarray: ...

Triple = tuple[int, int, int]
_PATCH_TAG = 0x9A7C4  # separates patch draws from other users of (seed, step, index)


class PatchRef(NamedTuple):
    """A box of case ``case``'s cached volume: ``start`` and ``size`` along (depth, height, width)."""

    case: int
    start: Triple
    size: Triple

    @classmethod
    def of(cls, ref: Any) -> PatchRef:
        """A validated PatchRef from a PatchRef or a ``(case, start, size)`` triple."""
        case, start, size = ref
        start = tuple(int(v) for v in start)
        size = tuple(int(v) for v in size)
        if len(start) != 3 or len(size) != 3 or min(size) < 1:
            raise ValueError(f"a patch needs a 3-value start and a positive 3-value size, got {start}, {size}")
        return cls(int(case), start, size)  # type: ignore[arg-type]

    @property
    def depth(self) -> int:
        return self.size[0]


def read_patch(
    image: np.ndarray,
    label: np.ndarray,
    start: Sequence[int],
    size: Sequence[int],
    out_image: np.ndarray,
    out_label: np.ndarray,
    *,
    image_fill: float = 0.0,
    label_fill: int = 0,
) -> None:
    """Copy the ``size`` box at ``start`` of ``image`` (C, D, H, W) / ``label`` (D, H, W) into ``out_image`` /
    ``out_label``; where the box lies outside the volume they get the fill values."""
    shape = image.shape[1:]
    lo = [max(int(s), 0) for s in start]
    hi = [min(int(s) + int(p), int(n)) for s, p, n in zip(start, size, shape, strict=True)]
    inside = all(a == s and b == s + p for a, b, s, p in zip(lo, hi, start, size, strict=True))
    if not inside:
        out_image[...] = image_fill
        out_label[...] = label_fill
    if any(b <= a for a, b in zip(lo, hi, strict=True)):
        return
    src = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))
    out_image[(slice(None), *dst)] = image[(slice(None), *src)]
    out_label[dst] = label[src]


def squeeze_depth(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of depth-1 patches ``(B, C, 1, H, W)`` / ``(B, 1, H, W)`` as the 2D ``(B, C, H, W)`` / ``(B, H, W)``."""
    if images.ndim != 5 or labels.ndim != 4 or images.shape[2] != 1 or labels.shape[1] != 1:
        raise ValueError(f"expected depth-1 patches, got {tuple(images.shape)} / {tuple(labels.shape)}")
    return images[:, :, 0], labels[:, 0]


# ------------------------------------------------------------------------------------------------ 2D policies
class SlicePatchSampler:
    """Today's paired 2D order (:class:`EpochBatchSampler`: seed, epoch, batch, rank, foreground oversampling) as
    depth-1 patches of the cache's volumes."""

    def __init__(self, cache: SliceRefSource, sampler: EpochBatchSampler) -> None:
        self.cache, self.sampler = cache, sampler

    def num_batches(self, epoch: int = 0) -> int:
        return self.sampler.num_batches(epoch)

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[list[PatchRef]]:
        """This rank's batches of ``epoch`` from ``start_batch``, as :meth:`EpochBatchSampler.batches`."""
        for idx in self.sampler.batches(epoch, start_batch=start_batch):
            yield self.cache.slice_refs(idx)

    def batch_at(self, step: int) -> list[PatchRef]:
        """This rank's batch of global step ``step`` (= ``epoch * num_batches + batch``)."""
        return self.cache.slice_refs(self.sampler.batch_at(step))


class UnpairedSlicePatchSampler:
    """Today's unpaired 2D order (:class:`UnpairedBatchSampler`: one batch per modality and step) as depth-1
    patches."""

    def __init__(self, cache: SliceRefSource, sampler: UnpairedBatchSampler) -> None:
        self.cache, self.sampler = cache, sampler

    def batch_at(self, step: int) -> dict[str, list[PatchRef]]:
        return {m: self.cache.slice_refs(idx) for m, idx in self.sampler.batch_at(step).items()}

    def steps(self, start_step: int, num_steps: int) -> Iterator[dict[str, list[PatchRef]]]:
        for step in range(int(start_step), int(start_step) + int(num_steps)):
            yield self.batch_at(step)


# ------------------------------------------------------------------------------------------------ N-d policy
def _uniform_start(rng: np.random.Generator, extent: int, size: int) -> int:
    if size > extent:
        return -((size - extent) // 2)
    return int(rng.integers(0, extent - size + 1))


def _centred_start(voxel: int, extent: int, size: int) -> int:
    if size > extent:
        return -((size - extent) // 2)
    return min(max(int(voxel) - size // 2, 0), extent - size)


class PatchSampler:
    """Patches of ``patch_size`` (d, h, w) from the cached cases ``cases`` (positions; all by default): batch of
    ``step`` for ``rank`` is a pure function of ``(seed, stream, step, rank, world_size)`` (module docstring).

    ``stream`` separates independent streams of one seed (e.g. :func:`modalseg.data.transforms.stream_key` of an
    unpaired modality). A depth above 1 on a cache without adjacent slices raises ``ConfigError``.
    """

    def __init__(
        self,
        cache: PatchVolumes,
        patch_size: Sequence[int],
        batch_size: int,
        *,
        cases: Sequence[int] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        foreground_fraction: float = 1.0 / 3.0,
        stream: int = 0,
    ) -> None:
        _check_rank(batch_size, rank, world_size)
        size = tuple(int(v) for v in patch_size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"patch_size must be 3 positive sizes (d, h, w), got {patch_size!r}")
        if not 0.0 <= float(foreground_fraction) <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        cache.check_patch_depth(size[0])
        self.cases = list(range(cache.num_cases)) if cases is None else [int(c) for c in cases]
        if not self.cases:
            raise ValueError("need at least one case to sample patches from")
        self.cache = cache
        self.patch_size: Triple = size  # type: ignore[assignment]
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.seed, self.stream = int(seed), int(stream)
        self.foreground_fraction = float(foreground_fraction)
        self._classes: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def _forced(self, index: int) -> bool:
        g = self.global_batch_size
        return index >= g - int(round(self.foreground_fraction * g))

    def _locations(self, case: int) -> tuple[np.ndarray, list[np.ndarray]]:
        found = self._classes.get(case)
        if found is None:
            locs = self.cache.foreground_locations(case)
            classes = np.unique(locs[:, 0]) if len(locs) else np.zeros(0, np.int32)
            found = self._classes[case] = (classes, [locs[locs[:, 0] == c, 1:] for c in classes])
        return found

    def draw(self, step: int, index: int) -> PatchRef:
        """The patch of sample ``index`` of the global batch of ``step``."""
        if int(step) < 0 or not 0 <= int(index) < self.global_batch_size:
            raise ValueError(f"need step >= 0 and 0 <= index < {self.global_batch_size}, got {step}, {index}")
        seq = np.random.SeedSequence([self.seed, self.stream, int(step), int(index), _PATCH_TAG])
        rng = np.random.Generator(np.random.PCG64(seq))
        case = self.cases[int(rng.integers(len(self.cases)))]
        shape = self.cache.cases[case].shape[1:]
        size = self.patch_size
        if self._forced(int(index)):
            classes, voxels = self._locations(case)
            if len(classes):
                rows = voxels[int(rng.integers(len(classes)))]
                voxel = rows[int(rng.integers(len(rows)))]
                start = tuple(_centred_start(v, n, p) for v, n, p in zip(voxel, shape, size, strict=True))
                return PatchRef(case, start, size)  # type: ignore[arg-type]
        start = tuple(_uniform_start(rng, n, p) for n, p in zip(shape, size, strict=True))
        return PatchRef(case, start, size)  # type: ignore[arg-type]

    def global_batch(self, step: int) -> list[PatchRef]:
        """All ``batch_size * world_size`` patches of ``step`` (what one process with the global batch gets)."""
        return [self.draw(step, j) for j in range(self.global_batch_size)]

    def batch_at(self, step: int) -> list[PatchRef]:
        """This rank's contiguous share ``[rank * batch_size, (rank + 1) * batch_size)`` of ``step``."""
        lo = self.rank * self.batch_size
        return [self.draw(step, j) for j in range(lo, lo + self.batch_size)]

    def steps(self, start_step: int, num_steps: int) -> Iterator[list[PatchRef]]:
        for step in range(int(start_step), int(start_step) + int(num_steps)):
            yield self.batch_at(step)
