"""Device and numeric precision: bf16 autocast + channels_last on AMX CPUs, CUDA AMP on GPUs.

On this project's reference CPU (AMX-BF16) bf16 autocast with channels_last trains a U-Net ~4.7x faster than
fp32 (docs/benchmarks.md, which also compares validation Dice against fp32). ``auto`` therefore picks bf16 on
CPUs that report ``amx_bf16`` and on CUDA devices that support bf16, fp32 elsewhere.
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
def cpu_has_amx_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags


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
            precision = "bf16" if cpu_has_amx_bf16() else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if dtype is torch.float16 and device.type == "cpu":
        raise ConfigError("fp16 autocast is for CUDA; use bf16 or fp32 on CPU")
    if channels_last is None:
        channels_last = dtype is not None
    return Precision(device, dtype, channels_last)
