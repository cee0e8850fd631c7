"""Shared helpers of the benchmark scripts: models, training steps, timing, memory, tables, machine facts.

Every script builds what it measures through the project's own code paths (``create_model``, ``PairedLoss`` /
``UnpairedLoss``, ``Precision``) so the figures describe what ``modalseg train`` / ``predict`` actually do.

Precision modes (``--modes``):

* ``fp32``: no autocast, contiguous (NCHW) tensors.
* ``bf16``: bf16 autocast + channels_last (``resolve_precision(cpu, "bf16")``).
* ``auto``: whatever ``training.precision.resolve_precision(cpu, "auto")`` picks on this machine (the
  project's default; it is bf16 + channels_last only on CPUs whose ``/proc/cpuinfo`` lists ``amx_bf16``).

Peak memory: ``peak_rss_reset()`` / ``peak_rss_mb()`` reset and read the kernel's high-water mark of this
process's resident set (``/proc/self/clear_refs`` = 5, ``VmHWM`` of ``/proc/self/status``), so configurations
measured one after another in the same process each get their own peak. Where that is unavailable the
process-wide ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is used and the tables say so. Both count all
memory of the process (weights, optimiser state, activations, allocator caches), not only Python objects.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The scripts run as ``python benchmarks/X.py``; make ``import common`` work from run_all and the tests too.
BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from modalseg.models import create_model, list_models  # noqa: E402
from modalseg.models.paper1 import PAPER1_MODELS  # noqa: E402
from modalseg.training.precision import Precision, resolve_precision  # noqa: E402
from modalseg.training.step import TrainStep  # noqa: E402
from modalseg.training.tasks import SINGLE_MODALITY_MODELS, PairedLoss, UnpairedLoss  # noqa: E402
from modalseg.utils.host_memory import keep_freed_memory  # noqa: E402

#: Like the ``modalseg`` command, the benchmarks keep freed tensor memory in the heap (glibc mmap/trim
#: thresholds, utils/host_memory.py) unless ``MODALSEG_MALLOC=default``; ``benchmarks/allocator.py`` compares.
MALLOC_KEPT = keep_freed_memory()

MONAI_MODELS: tuple[str, ...] = ("monai_basicunet", "monai_unet")
PAPER2_MODELS: tuple[str, ...] = tuple(list_models(paper="paper2"))
ALL_MODELS: tuple[str, ...] = (*PAPER1_MODELS, *PAPER2_MODELS, *MONAI_MODELS)
MODES: tuple[str, ...] = ("fp32", "bf16", "auto")
#: The reference of every ratio in train_throughput / flops.
BASELINE = ("monai_basicunet", "fp32")

#: ``--quick`` settings shared by every script (smoke tests: seconds, not minutes).
QUICK = {"size": 32, "batch": 2, "steps": 2, "warmup": 1, "width": 4}


# ------------------------------------------------------------------------------------------------ machine
def machine_info() -> dict[str, Any]:
    """CPU model, cores, load, library versions and the UTC date: the header of every result table."""
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    import monai

    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "amx_bf16": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "auto_precision": resolve_precision(torch.device("cpu"), "auto").name,
        "malloc": "keep-freed (mmap/trim threshold 1 GiB)" if MALLOC_KEPT else "glibc default",
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
    }


def print_machine(info: dict[str, Any]) -> None:
    print(
        f"# {info['date_utc']} | {info['cpu']} | {info['logical_cpus']} logical CPUs, {info['torch_threads']} torch "
        f"threads | load {info['load_avg_1_5_15']} | amx_bf16={info['amx_bf16']} avx512_bf16={info['avx512_bf16']} "
        f"| auto precision = {info['auto_precision']} | malloc {info['malloc']} | torch {info['torch']}, "
        f"monai {info['monai']}"
    )
    load = info["load_avg_1_5_15"][0]
    if info["logical_cpus"] and load > 0.5 * info["logical_cpus"]:
        print(f"# NOTE: 1-min load {load} on {info['logical_cpus']} CPUs: other processes share the machine, "
              "timings are noisy")


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(int(n))


# ------------------------------------------------------------------------------------------------ precision
def precision_for(mode: str) -> Precision:
    """``fp32`` | ``bf16`` (autocast + channels_last) | ``auto`` (the project's default on this machine)."""
    cpu = torch.device("cpu")
    if mode == "fp32":
        return resolve_precision(cpu, "fp32")
    if mode == "bf16":
        return resolve_precision(cpu, "bf16")
    if mode == "auto":
        return resolve_precision(cpu, "auto")
    raise SystemExit(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


def mode_label(mode: str) -> str:
    p = precision_for(mode)
    text = p.name + ("+CL" if p.channels_last else "")
    return text if mode != "auto" else f"auto={text}"


# ------------------------------------------------------------------------------------------------ models
@dataclass
class ModelSpec:
    """How a benchmark model is fed: ``kind`` paired (B, M, H, W) input, unpaired (one batch per modality)."""

    name: str
    network: nn.Module
    kind: str  # "paired" | "unpaired"
    num_modalities: int
    num_classes: int
    label: str = ""

    @property
    def params_m(self) -> float:
        return sum(p.numel() for p in self.network.parameters() if p.requires_grad) / 1e6


def build_model(
    name: str, *, width: int | None = None, num_modalities: int | None = None, num_classes: int | None = None
) -> ModelSpec:
    """A paper-1 model, paper 2's backbone (MSBN, two modalities) or a MONAI baseline, at full or ``width``.

    ``width`` overrides the first-level width of any model (paper-1 ``base_width``, MONAI first feature map,
    dilated FCN ``width``) for smoke tests; ``None`` keeps the published sizes.
    """
    if name in PAPER1_MODELS:
        m = 1 if name in SINGLE_MODALITY_MODELS else (num_modalities or 2)
        c = num_classes or 2
        opts = {} if width is None else {"base_width": width}
        net = create_model(name, num_modalities=m, in_channels=1, num_classes=c, **opts)
        return ModelSpec(name, net, "paired", m, c, name)
    if name == "dilated_fcn":
        from modalseg.models.unpaired import UnpairedSegmenter

        m = num_modalities or 2
        c = num_classes or 4  # MS-CMRSeg: background, LV, Myo, RV (36,979,408 parameters at width 16)
        opts = {} if width is None else {"width": width}
        net = UnpairedSegmenter("dilated_fcn", [f"mod{i}" for i in range(m)], "msbn", num_classes=c, **opts)
        return ModelSpec(name, net, "unpaired", m, c, "dilated_fcn (MSBN)")
    if name == "monai_basicunet":
        from monai.networks.nets import BasicUNet

        w = width or 64
        c = num_classes or 2
        net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=c, features=(w, 2 * w, 4 * w, 8 * w, 16 * w, w))
        return ModelSpec(name, net, "paired", 1, c, "MONAI BasicUNet")
    if name == "monai_unet":
        from monai.networks.nets import UNet

        w = width or 64
        c = num_classes or 2
        net = UNet(spatial_dims=2, in_channels=1, out_channels=c, channels=(w, 2 * w, 4 * w, 8 * w, 16 * w),
                   strides=(2, 2, 2, 2), num_res_units=2)
        return ModelSpec(name, net, "paired", 1, c, "MONAI UNet (res 2)")
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(ALL_MODELS)}")


def parse_models(text: str) -> list[str]:
    """Comma list of model names; ``all`` = every model, ``paper1`` = the ten Table 1 models."""
    out: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if item == "all":
            out.extend(ALL_MODELS)
        elif item == "paper1":
            out.extend(PAPER1_MODELS)
        elif item == "monai":
            out.extend(MONAI_MODELS)
        elif item:
            if item not in ALL_MODELS:
                raise SystemExit(f"unknown model {item!r}; choose from all, paper1, monai, {', '.join(ALL_MODELS)}")
            out.append(item)
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------------------------ steps
def synthetic_batch(spec: ModelSpec, batch: int, size: int, seed: int = 0) -> tuple[Any, ...]:
    """CPU fp32 inputs and int64 labels of the shapes the trainer feeds (labels: a disc, so Dice is non-trivial)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).long()
    y = disc.expand(batch, size, size).clone() % spec.num_classes
    if spec.kind == "paired":
        x = torch.rand(batch, spec.num_modalities, size, size, generator=g)
        return (x, y)
    xs = [torch.rand(batch, 1, size, size, generator=g) for _ in range(spec.num_modalities)]
    return (xs, [y.clone() for _ in xs])


@dataclass
class TrainCase:
    """One model prepared for training steps under one precision (the engine's step, Trainer.fit)."""

    spec: ModelSpec
    precision: Precision
    batch: int
    size: int
    step: Callable[[], float]
    forward: Callable[[], None]
    images_per_step: int
    module: nn.Module | None = None  # the loss module (network inside), for checks after training
    data: tuple[Any, ...] = ()  # the CPU batch ``synthetic_batch`` made: (images, labels)
    scaler: torch.amp.GradScaler | None = None
    #: fp16 only: steps the loss scaler skipped (inf/NaN gradients at too large a scale)
    skipped_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def make_train_case(
    spec: ModelSpec, mode: str, batch: int, size: int, lr: float = 1e-4, *, precision: Precision | None = None,
    seed: int = 0,
) -> TrainCase:
    """Wrap ``spec`` like the trainer: loss module (Dice + CE, paper 1 Eq. 1), Adam(amsgrad), ``Precision``.

    ``step()`` moves the batch with ``precision.to_input`` (labels to the device, as the trainer's task does) and
    runs the trainer's own optimisation step (``training.step.TrainStep``: zero_grad, forward under autocast,
    finite checks, backward, optimiser step through a ``GradScaler`` for fp16), and returns the loss.
    ``precision`` overrides ``mode`` (e.g. a CUDA device).
    """
    precision = precision or precision_for(mode)
    if spec.kind == "paired":
        module: nn.Module = PairedLoss(spec.network, ce_weight=1.0)
    else:
        module = UnpairedLoss(spec.network, "msbn", ce_weight=1.0, affinity_weight=0.0, kd_weight=0.0,
                              kd_temperature=2.0, conv_l2=0.0)
    module = precision.prepare_model(module).train()
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, amsgrad=True, fused=True)  # as the trainer
    train_step = TrainStep(module, optimizer, precision)
    data = synthetic_batch(spec, batch, size, seed=seed)
    dev = precision.device

    def args() -> tuple[Any, ...]:
        if spec.kind == "paired":
            x, y = data
            return (precision.to_input(x), y.to(dev))
        xs, ys = data
        return ([precision.to_input(x) for x in xs], [y.to(dev) for y in ys])

    def step() -> float:
        result = train_step(*args())
        if result.skipped:
            case.skipped_steps += 1
        return result.loss

    def forward() -> None:
        with torch.no_grad(), precision.autocast():
            a = args()
            if spec.kind == "paired":
                module.network(a[0])
            else:
                for k, x in enumerate(a[0]):
                    module.network(x, modality=k)

    n = batch * (spec.num_modalities if spec.kind == "unpaired" else 1)
    case = TrainCase(spec, precision, batch, size, step, forward, n, module=module, data=data,
                     scaler=train_step.scaler)
    return case


# ------------------------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def iqr(self) -> tuple[float, float]:
        if len(self.times) < 2:
            return (self.times[0], self.times[0])
        q = statistics.quantiles(self.times, n=4)
        return (q[0], q[2])

    def summary(self) -> dict[str, float]:
        lo, hi = self.iqr
        return {"median_s": self.median, "min_s": min(self.times), "q1_s": lo, "q3_s": hi, "n": len(self.times)}


def time_calls(fn: Callable[[], Any], steps: int, warmup: int) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``steps`` times, each timed with ``perf_counter``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, steps)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(times)


def measure_training(case: TrainCase, steps: int, warmup: int) -> dict[str, Any]:
    """Median step time, img/s and the RSS peak during the timed steps of ``case``."""
    for _ in range(warmup):
        case.step()
    peak_rss_reset()
    before = current_rss_mb()
    timing = time_calls(case.step, steps, 0)
    peak, how = peak_rss_mb()
    return {
        **timing.summary(),
        "img_per_s": case.images_per_step / timing.median,
        "peak_rss_mb": peak,
        "rss_before_mb": before,
        "peak_rss_method": how,
        "images_per_step": case.images_per_step,
    }


# ------------------------------------------------------------------------------------------------ memory
_CLEAR_REFS_OK: bool | None = None


def peak_rss_reset() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); False where not possible."""
    global _CLEAR_REFS_OK
    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _CLEAR_REFS_OK = True
    except OSError:
        _CLEAR_REFS_OK = False
    return _CLEAR_REFS_OK


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so a new peak starts from what is really in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mb() -> tuple[float, str]:
    """(peak RSS in MiB since the last reset, method): ``VmHWM`` after a reset, else ``ru_maxrss``."""
    hwm = _status_kb("VmHWM")
    if _CLEAR_REFS_OK and hwm is not None:
        return hwm / 1024, "VmHWM"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss(process)"


def current_rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return (kb or 0) / 1024


# ------------------------------------------------------------------------------------------------ FLOPs
def forward_flops(case: TrainCase) -> float:
    """FLOPs of one forward pass of ``case``'s batch (``torch.utils.flop_counter``; convs/matmuls only)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        case.forward()
    return float(counter.get_total_flops())


def dense_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 4096, repeats: int = 5) -> float:
    """The machine's measured dense peak: the best of ``repeats`` ``n x n`` matrix products in ``dtype`` with the
    current torch threads (``2 n^3`` FLOPs each), in GFLOP/s. The yardstick of "achieved FLOP/s": a convolution
    network can at best run at the speed of its matrix products."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)  # warm-up (oneDNN/BLAS kernel selection)
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def network_forward_flops(network: nn.Module, example: torch.Tensor) -> float:
    """FLOPs of one forward pass of ``network`` on ``example`` (convolutions and matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        network.eval()(example)
    return float(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------ output
def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, int]]) -> str:
    """Print a GitHub-markdown table; ``columns`` = (key, header, decimals). Returns the text."""
    header = [h for _, h, _ in columns]
    body = [[fmt(r.get(k), d) for k, _, d in columns] for r in rows]
    text_col = [all(isinstance(r.get(k), str) for r in rows) for k, _, _ in columns]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for b in body:
        cells = [c.ljust(w) if text_col[k] else c.rjust(w) for k, (c, w) in enumerate(zip(b, widths, strict=True))]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str | Path | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    from modalseg.utils.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")
    print(f"# wrote {path}")


def add_common_args(p: argparse.ArgumentParser, *, steps: int, warmup: int, size: int, batch: int) -> None:
    p.add_argument("--steps", type=int, default=steps, help=f"timed steps (median reported; default {steps})")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed warm-up steps (default {warmup})")
    p.add_argument("--size", type=int, default=size, help=f"image side in pixels (default {size})")
    p.add_argument("--batch", type=int, default=batch, help=f"images per batch (default {batch})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--width", type=int, default=None, help="override every model's first-level width (smoke tests)")
    p.add_argument("--quick", action="store_true", help="tiny smoke-test sizes (explicit options win): " + ", ".join(
        f"{k} {v}" for k, v in QUICK.items()) + ", 1 thread unless --threads")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def apply_quick(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """With ``--quick``, replace the sizes by :data:`QUICK`, except options given explicitly on the command line
    (those that differ from the parser's default)."""
    if getattr(args, "quick", False):
        for k, v in QUICK.items():
            if hasattr(args, k) and (parser is None or getattr(args, k) == parser.get_default(k)):
                setattr(args, k, v)
        if getattr(args, "threads", None) is None:
            args.threads = 1  # tiny tensors: one thread avoids OpenMP barriers on a busy machine
    return args
