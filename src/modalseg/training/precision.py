"""Device and numeric precision: the autocast dtype and memory format of training and inference.

``precision: auto`` is decided by *measurement*, not by CPU flags: on an Intel Xeon with AVX512-BF16 but no AMX
bf16 autocast + channels_last was the slowest mode (master_assistant training 0.48 img/s vs 0.66 fp32 and 0.71
fp32 + channels_last), on an AMD EPYC with the same flag it was 2.2x fp32. ``precision_probe.choose_precision``
times the candidate modes on the real network and caches the winner; :func:`resolve_precision` handles the
explicit modes and, having no model to measure, maps ``auto`` to fp32.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modalseg.errors import ConfigError

_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether the CPU lists AMX-BF16 or AVX512-BF16 (Linux ``/proc/cpuinfo``); informational, not a speed test."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


@dataclass(frozen=True)
class AutoInfo:
    """How ``auto`` chose a mode: what the accuracy guard needs to demote it and mark the cache entry."""

    key: str
    cache_path: Path | None
    fp32_fallback: str  # label of the fastest fp32 mode measured (e.g. "fp32+channels_last")
    measured_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None = fp32
    channels_last: bool
    #: set when ``auto`` chose this mode (precision_probe.choose_precision); not part of equality
    auto: AutoInfo | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def label(self) -> str:
        """``fp32``, ``fp32+channels_last``, ``bf16+channels_last``, ...: the mode including the memory format."""
        return self.name + ("+channels_last" if self.channels_last else "")

    @property
    def short_label(self) -> str:
        return self.name + ("+CL" if self.channels_last else "")

    @classmethod
    def from_label(cls, device: torch.device, label: str, auto: AutoInfo | None = None) -> Precision:
        """Inverse of :attr:`label`; raises ``ValueError`` on an unknown label."""
        name, _, fmt = label.partition("+")
        if name not in _DTYPES or fmt not in ("", "channels_last", "CL"):
            raise ValueError(f"unknown precision label {label!r}")
        return cls(device, _DTYPES[name], bool(fmt), auto)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.dtype):
                yield

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the device; with ``channels_last``, channels-last for its dimensionality (NHWC for a 2D batch,
        NDHWC for a 3D one: PyTorch's ``channels_last`` / ``channels_last_3d``)."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() in (4, 5):
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        return x

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` on the device; with ``channels_last`` its conv weights channels-last (a 3D network's 5D weights
        as ``channels_last_3d``: ``torch.channels_last`` refuses rank-5 tensors)."""
        model = model.to(self.device)
        if self.channels_last:
            volumetric = any(p.dim() == 5 for p in model.parameters())
            model = model.to(memory_format=torch.channels_last_3d if volumetric else torch.channels_last)
        return model


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA device is available")
    return torch.device(name)


def resolve_precision(device: torch.device, precision: str = "auto", channels_last: bool | None = None) -> Precision:
    """The explicit mode ``precision`` on ``device``; channels_last defaults to on for autocast modes.

    ``auto`` needs a model to measure (``precision_probe.choose_precision``); without one it is fp32, the mode
    that is never wrong, only possibly slower.
    """
    if precision == "auto":
        precision = "fp32"
    if precision not in _DTYPES:
        raise ConfigError(f"precision must be auto, bf16, fp16 or fp32 (got {precision!r})")
    dtype = _DTYPES[precision]
    if dtype is torch.float16 and device.type == "cpu":
        raise ConfigError("fp16 autocast is for CUDA; use bf16 or fp32 on CPU")
    if channels_last is None:
        channels_last = dtype is not None
    return Precision(device, dtype, channels_last)
