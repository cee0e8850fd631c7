"""Device and numeric precision: bf16 autocast + channels_last on CPUs with native bf16, CUDA AMP on GPUs.

CPUs with native bf16 matrix instructions (AMX-BF16, or AVX512-BF16 as on the AMD EPYC of our CI machine)
train paper-1 networks 1.5-7x faster with bf16 autocast + channels_last than in fp32, with the same validation
Dice (docs/benchmarks.md has both measurements). ``auto`` therefore picks bf16 on such CPUs and on CUDA devices
that support bf16 (fp16 AMP on older GPUs), fp32 elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from modalseg.errors import ConfigError


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether the CPU lists AMX-BF16 or AVX512-BF16 (Linux ``/proc/cpuinfo`` flags)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None = fp32
    channels_last: bool

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.dtype):
                yield

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA device is available")
    return torch.device(name)


def resolve_precision(device: torch.device, precision: str = "auto", channels_last: bool | None = None) -> Precision:
    """Pick the autocast dtype and memory format for ``device``."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if dtype is torch.float16 and device.type == "cpu":
        raise ConfigError("fp16 autocast is for CUDA; use bf16 or fp32 on CPU")
    if channels_last is None:
        channels_last = dtype is not None
    return Precision(device, dtype, channels_last)
