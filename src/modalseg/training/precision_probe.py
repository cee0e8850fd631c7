"""``precision: auto`` by measurement: time each candidate mode on the real network, cache the fastest.

Why: CPU flags do not predict speed. With AVX512-BF16 but no AMX, an Intel Xeon ran bf16 autocast +
channels_last slowest of all modes (master_assistant 0.48 img/s vs 0.66 fp32, 0.71 fp32 + channels_last; predict
65 s vs 47 s), while an AMD EPYC with the same flag ran it 2.2x faster than fp32. So :func:`choose_precision`
runs a few training steps (forward + backward) or inference batches of a deep copy of the caller's network under
each candidate mode, interleaved, in at most ``budget_s`` seconds, and keeps the fastest. The choice is cached in
a JSON file per (CPU or GPU model, torch version, model, image size class, purpose, device type, threads), so
later runs on the same machine pay nothing. :func:`accuracy_guard` demotes a low-precision choice whose
validation predictions disagree with fp32's.

Candidates: CPU fp32 (NCHW), fp32 + channels_last, bf16 autocast + channels_last; CUDA fp32, bf16 AMP +
channels_last (where supported), fp16 AMP + channels_last. An explicit ``channels_last`` keeps every candidate in
that memory format.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import json
import math
import os
import platform
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modalseg.errors import ModalsegError
from modalseg.training.precision import AutoInfo, Precision, resolve_precision

CACHE_VERSION = 1
#: a choice this close to the fastest fp32 mode is not worth the lower precision
PREFER_FP32_WITHIN = 0.03
#: the probe shrinks its crop until one call takes at most this share of the budget
CALL_SHARE = 0.25
#: pixels (batch x H x W) of the probe input; an inference batch costs about a third of a training step
PROBE_PIXELS = {"train": 2 * 64 * 64, "infer": 2 * 128 * 128}

# Indirections the tests replace (a fake clock, fake per-mode durations).
_clock: Callable[[], float] = time.perf_counter


def _time_call(run: Callable[[], None], label: str, device: torch.device) -> float:
    """Seconds one call of ``run`` takes (CUDA: synchronised before and after). ``label`` names the mode."""
    del label  # for fakes in tests
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = _clock()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return _clock() - t0


# ------------------------------------------------------------------------------------------------ machine, cache
@functools.cache
def cpu_model_name() -> str:
    """``model name`` of /proc/cpuinfo, else ``platform.processor()``, else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_model_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model_name()


def default_cache_path() -> Path:
    """``$MODALSEG_CACHE_DIR/precision.json``, else ``$XDG_CACHE_HOME/modalseg/``, else ``~/.cache/modalseg/``."""
    if os.environ.get("MODALSEG_CACHE_DIR"):
        return Path(os.environ["MODALSEG_CACHE_DIR"]) / "precision.json"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "modalseg" / "precision.json"


def size_class(height: int, width: int) -> int:
    """Rounded log2 of the pixel count: 256x256 -> 16, 192x192 -> 15; nearby sizes share a cached choice."""
    return round(math.log2(max(1, height * width)))


def cache_key(
    device: torch.device, model_name: str, n_params: int, size: int | None, purpose: str,
    channels_last: bool | None,
) -> str:
    """One string per (device model, torch, model, size class, purpose, device type, threads, memory format)."""
    parts = [
        device_model_name(device), f"torch {torch.__version__}", f"{model_name} ({n_params} params)",
        f"size 2^{size}" if size is not None else "size ?", purpose, device.type,
        f"{torch.get_num_threads()} threads", {None: "any format", True: "channels_last", False: "NCHW"}[channels_last],
    ]
    return " | ".join(parts)


def load_cache(path: Path) -> dict[str, Any]:
    """The cache's entries; ``{}`` for a missing, unreadable, corrupt or foreign file (never raises)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def store_entry(path: Path, key: str, entry: dict[str, Any]) -> str | None:
    """Write ``entry`` under ``key`` atomically; returns why it could not (read-only place, ...) or None."""
    from modalseg.utils.atomic import atomic_write_text

    entries = load_cache(path)
    entries[key] = entry
    try:
        atomic_write_text(path, json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1) + "\n")
    except (ModalsegError, OSError) as exc:
        return str(exc)
    return None


def _show_path(path: Path) -> str:
    try:
        return "~/" + str(path.resolve().relative_to(Path.home().resolve()))
    except (ValueError, RuntimeError, OSError):
        return str(path)


# ------------------------------------------------------------------------------------------------ candidates
def candidate_precisions(device: torch.device, channels_last: bool | None = None) -> list[Precision]:
    """The modes ``auto`` chooses among on ``device`` (fp32 ones first)."""
    if device.type == "cpu":
        modes = [("fp32", False), ("fp32", True), ("bf16", True)]
    elif device.type == "cuda":
        modes = [("fp32", False)]
        if torch.cuda.is_bf16_supported():
            modes.append(("bf16", True))
        modes.append(("fp16", True))
    else:
        modes = [("fp32", False)]
    if channels_last is not None:
        modes = list(dict.fromkeys((name, channels_last) for name, _ in modes))
    return [resolve_precision(device, name, cl) for name, cl in modes]


# ------------------------------------------------------------------------------------------------ probe inputs
def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _map(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _example_args(example: Any) -> tuple[Any, ...]:
    """Positional arguments of the model: a shape -> one random fp32 batch; a tensor; a tuple; a callable's."""
    if callable(example) and not isinstance(example, torch.Tensor):
        example = example()
    if isinstance(example, torch.Tensor):
        return (example,)
    if isinstance(example, (list, tuple)) and example and all(isinstance(s, int) for s in example):
        g = torch.Generator().manual_seed(0)
        return (torch.randn(*example, generator=g),)
    if isinstance(example, tuple):
        return example
    raise TypeError("example must be a shape, a tensor, a tuple of arguments or a callable returning one")


def _reference(args: Any) -> torch.Tensor | None:
    """The first 4-D (2D networks) or 5-D (3D networks) floating tensor: the image batch whose batch and in-plane
    size the probe shrinks."""
    return next((t for t in _tensors(args) if t.dim() in (4, 5) and t.is_floating_point()), None)


def _halve(side: int, minimum: int = 32) -> int | None:
    """Half of ``side``, rounded down to its power-of-two factor (<= 32) so the network's poolings still fit."""
    align = math.gcd(side, 32)
    new = (side // 2) // align * align
    return new if new >= max(align, minimum) else None


def _shrink(args: Any, ref: torch.Tensor, batch: int, h: int, w: int) -> Any:
    """Every tensor sharing the reference's batch / (H, W): the first ``batch`` items, centre crop to h x w."""
    b0, (h0, w0) = ref.shape[0], ref.shape[-2:]
    top, left = (h0 - h) // 2, (w0 - w) // 2

    def fn(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 1 and t.shape[0] == b0:
            t = t[:batch]
        if t.dim() >= 3 and tuple(t.shape[-2:]) == (h0, w0):
            t = t[..., top : top + h, left : left + w]
        return t.contiguous()

    return _map(args, fn)


def _scalar(out: Any) -> torch.Tensor:
    """A scalar to backpropagate: a loss module's ``(loss, parts)`` loss, else the mean of the outputs."""
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) and out[0].dim() == 0:
        return out[0]
    parts = [t.float().mean() for t in _tensors(out) if t.is_floating_point() and t.requires_grad]
    if not parts:
        raise TypeError("the model's output has no differentiable tensor to time a backward pass with")
    return torch.stack(parts).sum()


# ------------------------------------------------------------------------------------------------ measurement
@contextlib.contextmanager
def _rng_guard(device: torch.device) -> Iterator[None]:
    """Restore the torch (CPU and ``device``), numpy and ``random`` RNG states: the caller's seeding holds."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@dataclass
class ModeTiming:
    precision: Precision
    warmup_s: float | None = None
    times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def estimate(self) -> float | None:
        """Best timed call (background load only ever adds time), else the warm-up call (an upper bound)."""
        return min(self.times) if self.times else self.warmup_s


@dataclass
class ProbeResult:
    timings: list[ModeTiming]
    shape: str  # "2x1x128x128": the probe's image batch
    seconds: float  # the probe's own wall time
    purpose: str

    def measured(self) -> list[ModeTiming]:
        """The modes with timed calls; only if none has one, those with a warm-up call (first calls carry one-off
        costs such as kernel selection, so they never compete with timed ones)."""
        ok = [m for m in self.timings if m.error is None]
        return [m for m in ok if m.times] or [m for m in ok if m.warmup_s is not None]

    def best(self) -> Precision:
        """The fastest timed mode; the fastest fp32 mode if within ``PREFER_FP32_WITHIN`` of it or if no mode got
        a timed call (warm-up calls alone do not justify a lower precision); fp32 if nothing ran."""
        ok = self.measured()
        if not ok:
            return self.timings[0].precision
        if not any(m.times for m in ok):
            return self.fastest_fp32()
        fastest = min(ok, key=lambda m: m.estimate)
        fp32 = [m for m in ok if m.precision.dtype is None]
        if fp32:
            f = min(fp32, key=lambda m: m.estimate)
            if f.estimate <= fastest.estimate * (1 + PREFER_FP32_WITHIN):
                return f.precision
        return fastest.precision

    @property
    def untimed(self) -> list[str]:
        """Modes the budget ran out before (no timed call): the choice is then provisional and not cached."""
        return [m.precision.short_label for m in self.timings if m.error is None and not m.times]

    def fastest_fp32(self) -> Precision:
        fp32 = [m for m in self.measured() if m.precision.dtype is None]
        if fp32:
            return min(fp32, key=lambda m: m.estimate).precision
        return next(m.precision for m in self.timings if m.precision.dtype is None)

    def summary(self) -> str:
        """``fp32 41 ms, fp32+CL 36 ms, bf16+CL ~52 ms`` (``~``: warm-up call only)."""
        out = []
        for m in self.timings:
            if m.error is not None:
                out.append(f"{m.precision.short_label} failed")
            elif m.estimate is None:
                out.append(f"{m.precision.short_label} not run")
            else:
                out.append(f"{m.precision.short_label} {'' if m.times else '~'}{_fmt_s(m.estimate)}")
        return ", ".join(out)


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _eliminate(active: list[ModeTiming]) -> list[ModeTiming]:
    """Drop modes clearly slower than the leader in timed calls, to spend the budget on the close ones."""
    timed = [m for m in active if m.times]
    if not timed:
        return active
    lead = min(min(m.times) for m in timed)
    keep = []
    for m in active:
        if len(m.times) >= 2 and min(m.times) > 1.3 * lead:  # two calls: one load spike cannot drop a mode
            continue
        keep.append(m)
    return keep


class _Runner:
    """One deep copy of the network per memory format; ``call(mode)`` = one training step or inference batch."""

    def __init__(self, model: nn.Module, device: torch.device, train: bool, kwargs: dict[str, Any]) -> None:
        self.model, self.device, self.train, self.kwargs = model, device, train, kwargs
        self.copies: dict[bool, nn.Module] = {}
        self.args: Any = ()

    def _copy(self, channels_last: bool) -> nn.Module:
        if channels_last not in self.copies:
            net = copy.deepcopy(self.model)
            net = Precision(self.device, None, channels_last).prepare_model(net)
            net.train(self.train)
            for p in net.parameters():
                p.grad = None
            self.copies[channels_last] = net
        return self.copies[channels_last]

    def closure(self, p: Precision) -> Callable[[], None]:
        net = self._copy(p.channels_last)

        def move(t: torch.Tensor) -> torch.Tensor:
            return p.to_input(t) if t.is_floating_point() else t.to(p.device)

        def run() -> None:
            a = _map(self.args, move)
            if self.train:
                for q in net.parameters():
                    q.grad = None
                with p.autocast():
                    loss = _scalar(net(*a, **self.kwargs))
                loss.backward()
            else:
                with torch.no_grad(), p.autocast():
                    net(*a, **self.kwargs)

        return run


def _fit_crop(
    runner: _Runner, first: ModeTiming, full: Any, ref: torch.Tensor, cfg: tuple[int, int, int], budget_s: float,
    left: Callable[[], float], device: torch.device,
) -> None:
    """Halve the crop (at most twice) while one call of the first mode takes over ``CALL_SHARE`` of the budget.

    A first call carries one-off costs (kernel selection; the process's first oneDNN call takes 1 s+), so a
    slow one is repeated before it counts. No call starts that the remaining budget cannot pay for.
    """
    b, h, w = cfg
    run = runner.closure(first.precision)
    limit = CALL_SHARE * budget_s
    if first.warmup_s > limit and left() > first.warmup_s:
        first.warmup_s = _time_call(run, first.precision.label, device)
    for _ in range(2):
        nh, nw = _halve(h), _halve(w)
        if first.warmup_s <= limit or not (nh and nw) or left() < first.warmup_s / 2:
            return
        kept = runner.args
        runner.args = _shrink(full, ref, b, nh, nw)
        try:
            first.warmup_s = _time_call(run, first.precision.label, device)
        except Exception:  # noqa: BLE001 - too small for the network: keep the last size
            runner.args = kept
            return
        h, w = nh, nw


def measure_precisions(
    model: nn.Module,
    example: Any,
    candidates: Sequence[Precision],
    *,
    purpose: str = "train",
    budget_s: float = 2.0,
    probe_batch: int = 2,
    probe_pixels: int | None = None,
    max_rounds: int = 12,
    forward_kwargs: dict[str, Any] | None = None,
) -> ProbeResult:
    """Time every candidate on a deep copy of ``model`` within about ``budget_s`` seconds.

    The probe input is ``example``'s batch cut to ``probe_batch`` images and centre-cropped (by halving) to at
    most ``probe_pixels`` pixels in all (default :data:`PROBE_PIXELS`, sized from master_assistant's full-size
    step times so that 2 s hold a warm-up and a few timed rounds on a 2-core CPU), halved up to twice more while
    one call takes over a quarter of the budget. The crop keeps every layer and channel count. One warm-up call
    per mode, then timed rounds, one call per mode each, in rotating order (interleaved against drift); clearly
    slower modes drop out. No call starts once the budget is spent, so it overruns by at most one call. The
    caller's weights, buffers, grads, train/eval flag and the torch, numpy and ``random`` RNG states are left as
    they were.
    """
    if purpose not in ("train", "infer"):
        raise ValueError(f"purpose must be train or infer (got {purpose!r})")
    device = candidates[0].device
    start = _clock()
    timings = [ModeTiming(p) for p in candidates]
    runner = _Runner(model, device, purpose == "train", dict(forward_kwargs or {}))
    shape = "?"
    try:
        with _rng_guard(device):
            full = _example_args(example)
            ref = _reference(full)
            # inputs to try, smallest first: batch cut + crop, batch cut only, the example as given
            configs: list[tuple[int, int, int] | None] = []
            if ref is not None:
                b, h, w = min(ref.shape[0], probe_batch), *ref.shape[-2:]
                pixels = probe_pixels or PROBE_PIXELS[purpose]
                while b * h * w > pixels and _halve(h) and _halve(w):
                    h, w = _halve(h), _halve(w)
                configs += [(b, h, w), (b, *ref.shape[-2:])]
            configs.append(None)
            configs = list(dict.fromkeys(configs))
            first = timings[0]
            error: str | None = None

            def left() -> float:
                return budget_s - (_clock() - start)

            for cfg in configs:
                if error is not None and left() <= 0:
                    break  # no budget left for a larger input
                runner.args = full if cfg is None or ref is None else _shrink(full, ref, *cfg)
                try:
                    first.warmup_s = _time_call(runner.closure(first.precision), first.precision.label, device)
                except Exception as exc:  # noqa: BLE001 - a failing crop: try a larger input
                    error = f"{type(exc).__name__}: {exc}"
                    continue
                error = None
                if cfg is not None and ref is not None:
                    _fit_crop(runner, first, full, ref, cfg, budget_s, left, device)
                break
            r = _reference(runner.args)
            shape = "x".join(map(str, r.shape)) if r is not None else "?"
            if error is not None:
                first.error = error
                return ProbeResult(timings, shape, _clock() - start, purpose)

            for m in timings[1:]:  # warm-up of the other modes
                if _clock() - start >= budget_s:
                    break
                try:
                    m.warmup_s = _time_call(runner.closure(m.precision), m.precision.label, device)
                except Exception as exc:  # noqa: BLE001 - e.g. an op without a bf16 kernel: not a candidate
                    m.error = f"{type(exc).__name__}: {exc}"
            active = [m for m in timings if m.error is None and m.warmup_s is not None]
            for rnd in range(max_rounds):
                if len(active) < 2:
                    break
                k = rnd % len(active)
                stop = False
                for m in active[k:] + active[:k]:
                    if m not in active:
                        continue
                    spent = _clock() - start
                    last = m.times[-1] if m.times else m.warmup_s
                    if spent >= budget_s or (spent + last > budget_s and all(x.times for x in active)):
                        stop = True
                        break
                    try:
                        m.times.append(_time_call(runner.closure(m.precision), m.precision.label, device))
                    except Exception as exc:  # noqa: BLE001
                        m.error = f"{type(exc).__name__}: {exc}"
                        active = [x for x in active if x is not m]
                        continue
                    active = _eliminate(active)
                if stop:
                    break
    finally:
        runner.copies.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return ProbeResult(timings, shape, _clock() - start, purpose)


# ------------------------------------------------------------------------------------------------ choice
def choose_precision(
    model: nn.Module,
    example: Any,
    device: torch.device | str,
    purpose: str = "train",
    requested: str = "auto",
    channels_last: bool | None = None,
    cache_path: str | Path | None = None,
    budget_s: float = 2.0,
    *,
    model_name: str | None = None,
    use_cache: bool = True,
    forward_kwargs: dict[str, Any] | None = None,
) -> tuple[Precision, str]:
    """The precision to train (``purpose="train"``) or predict (``"infer"``) ``model`` with, and a one-line report.

    ``requested`` other than ``auto`` is returned as is (:func:`resolve_precision`; no probe). ``auto``: a valid
    cached choice for this key is reused, else :func:`measure_precisions` times the candidates and the winner is
    cached (``cache_path``, default :func:`default_cache_path`; ``use_cache=False`` neither reads nor writes).
    ``example``: the model's input: a shape ``(B, M, H, W)`` (random batch), a tensor, a tuple of positional
    arguments (e.g. a loss module's ``(images, labels)``) or a callable returning one; the image size class of
    the cache key is taken from it. ``model``: the plain network or loss module (not DDP), on any device;
    ``model_name`` (default: its class name) goes into the cache key with its parameter count.
    """
    device = torch.device(device)
    if requested != "auto":
        p = resolve_precision(device, requested, channels_last)
        return p, f"precision: {p.label} (requested)"
    candidates = candidate_precisions(device, channels_last)
    if len(candidates) == 1:
        p = candidates[0]
        return p, f"precision auto: {p.label} (the only candidate on {device.type})"
    with _rng_guard(device):  # the example is built once (a callable may draw from the global RNG)
        args = _example_args(example)
    ref = _reference(args)
    size = size_class(*ref.shape[-2:]) if ref is not None else None
    name = model_name or type(getattr(model, "network", model)).__name__
    n_params = sum(p.numel() for p in model.parameters())
    key = cache_key(device, name, n_params, size, purpose, channels_last)
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    labels = {p.label: p for p in candidates}

    if use_cache:
        entry = load_cache(path).get(key)
        if isinstance(entry, dict) and entry.get("choice") in labels and entry.get("fp32_fallback") in labels:
            measured = entry.get("measured_s") if isinstance(entry.get("measured_s"), dict) else {}
            info = AutoInfo(key, path, entry["fp32_fallback"], measured)
            p = Precision.from_label(device, entry["choice"], info)
            note = ""
            demoted = entry.get("demoted")
            if isinstance(demoted, dict) and demoted.get("mode"):
                note = f"; {demoted['mode']} demoted by the accuracy guard"
            shown = ", ".join(f"{Precision.from_label(device, k).short_label} {_fmt_s(float(v))}"
                              for k, v in measured.items() if k in labels and isinstance(v, (int, float)))
            when = str(entry.get("date", "earlier"))
            return p, (f"precision auto: {p.label} (cached choice of {when}: {shown or 'no timings'}{note}; "
                       f"{_show_path(path)})")

    result = measure_precisions(model, args, candidates, purpose=purpose, budget_s=budget_s,
                                forward_kwargs=forward_kwargs)
    best, fallback = result.best(), result.fastest_fp32()
    measured = {m.precision.label: m.estimate for m in result.measured()}
    head = f"precision auto: {best.label} ({purpose} probe {result.shape}: {result.summary()}; " \
           f"probe {result.seconds:.1f} s"
    if not result.measured():
        reason = result.timings[0].error or "nothing measured"
        return resolve_precision(device, "fp32", channels_last), f"{head}; probe failed ({reason[:200]}), not cached)"
    info = AutoInfo(key, path if use_cache else None, fallback.label, measured)
    chosen = Precision(best.device, best.dtype, best.channels_last, info)
    if not use_cache:
        return chosen, f"{head}; not cached)"
    if result.untimed:
        chosen = Precision(best.device, best.dtype, best.channels_last, AutoInfo(key, None, fallback.label, measured))
        return chosen, f"{head}; budget spent before timing {', '.join(result.untimed)}: not cached)"
    entry = {
        "choice": best.label, "fp32_fallback": fallback.label, "measured_s": measured, "probe": result.shape,
        "probe_s": round(result.seconds, 3),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    problem = store_entry(path, key, entry)
    if problem is not None:
        return Precision(best.device, best.dtype, best.channels_last, AutoInfo(key, None, fallback.label, measured)), \
            f"{head}; not cached: {problem[:200]})"
    return chosen, f"{head}; cached in {_show_path(path)})"


# ------------------------------------------------------------------------------------------------ accuracy guard
def _labels(pred: np.ndarray | torch.Tensor) -> np.ndarray:
    """Class labels of (N, C, H, W) probabilities/logits (argmax over C) or of (N, H, W) labels."""
    a = pred.detach().float().cpu().numpy() if isinstance(pred, torch.Tensor) and pred.is_floating_point() else \
        np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred)
    if a.ndim == 4 and np.issubdtype(a.dtype, np.floating):
        return a.argmax(axis=1)
    return a.astype(np.int64)


def foreground_dice(a: np.ndarray, b: np.ndarray, num_classes: int) -> float:
    """Mean over foreground classes of the pooled Dice of two label arrays (both empty counts as 1)."""
    scores = []
    for c in range(1, num_classes):
        ac, bc = a == c, b == c
        denom = int(ac.sum()) + int(bc.sum())
        scores.append(1.0 if denom == 0 else 2.0 * int(np.logical_and(ac, bc).sum()) / denom)
    return float(np.mean(scores)) if scores else 1.0


def accuracy_guard(
    precision: Precision,
    predict: Callable[[Precision], np.ndarray | torch.Tensor],
    *,
    target: np.ndarray | torch.Tensor | None = None,
    num_classes: int | None = None,
    dice_tolerance: float = 0.01,
    min_agreement: float = 0.995,
) -> tuple[Precision, str]:
    """Keep an ``auto``-chosen low-precision mode only if its predictions match fp32's; else demote it.

    Call once at the first validation. ``predict(p)`` returns the validation batch's probabilities or logits
    (N, C, H, W) or labels (N, H, W) under precision ``p``; it is called for ``precision`` and for the fastest
    fp32 mode the probe measured. Demoted when the voxel label agreement is below ``min_agreement`` or the
    foreground Dice differs by more than ``dice_tolerance`` (against ``target`` when given: |Dice(low, target) -
    Dice(fp32, target)|; else 1 - Dice(low, fp32)). A demotion returns the fp32 mode and marks the cache entry,
    so later runs start in fp32. fp32 and explicitly requested modes are returned unchanged, with ``""``.
    """
    info = precision.auto
    if precision.dtype is None or info is None:
        return precision, ""
    fp32 = Precision.from_label(precision.device, info.fp32_fallback, info)
    low, ref = _labels(predict(precision)), _labels(predict(fp32))
    if num_classes is None:
        num_classes = int(max(low.max(initial=0), ref.max(initial=0))) + 1
    agreement = float((low == ref).mean()) if low.size else 1.0
    if target is not None:
        t = _labels(target)
        num_classes = max(num_classes, int(t.max(initial=0)) + 1)
        d_low, d_ref = foreground_dice(low, t, num_classes), foreground_dice(ref, t, num_classes)
        dice_diff = abs(d_low - d_ref)
        dice_text = f"Dice {d_low:.4f} vs fp32 {d_ref:.4f}"
    else:
        dice_diff = 1.0 - foreground_dice(low, ref, num_classes)
        dice_text = f"Dice vs fp32 {1.0 - dice_diff:.4f}"
    facts = f"labels agree {100 * agreement:.2f} %, {dice_text}"
    if agreement >= min_agreement and dice_diff <= dice_tolerance:
        return precision, f"precision guard: {precision.label} kept ({facts})"
    note = "not cached"
    if info.cache_path is not None:
        entries = load_cache(info.cache_path)
        entry = entries.get(info.key) if isinstance(entries.get(info.key), dict) else {}
        entry.update(choice=fp32.label, fp32_fallback=fp32.label, measured_s=dict(info.measured_s),
                     demoted={"mode": precision.label, "agreement": agreement, "dice_diff": dice_diff})
        problem = store_entry(info.cache_path, info.key, entry)
        note = f"cache marked: {_show_path(info.cache_path)}" if problem is None else f"cache not marked: {problem}"
    return fp32, (f"precision guard: {precision.label} demoted to {fp32.label} ({facts}; limits "
                  f"{100 * min_agreement:.1f} %, Dice +-{dice_tolerance}; {note})")
