"""Multi-process training with PyTorch DDP under ``torchrun`` (we never write our own engine).

``torchrun --nproc_per_node=N -m modalseg.cli.main train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; we then
use NCCL on CUDA and gloo on CPU. The configured batch size is the *global* batch: each rank takes its
contiguous share of every global batch (see :class:`modalseg.data.sampling.EpochBatchSampler`), so N ranks
see exactly the batches a single process would. Note on BatchNorm: plain DDP normalises with per-rank batch
statistics; on CUDA ``sync_bn: true`` makes them global (SyncBatchNorm is CUDA-only in PyTorch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Initialise the process group when launched by torchrun; a no-op for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item() / info.world_size)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
