"""nnU-Net-style planning of a 3D network: kernels, poolings, patch size and batch size from the data's geometry.

``plan_3d(spacing_mm, median_shape, num_modalities, memory_budget_mb=..., model=..., base_width=...)`` returns a
:class:`Plan` whose :meth:`Plan.model_options` build the model (``create_model(plan.model, **...)``) and whose
``patch_size`` / ``batch_size`` are what the trainer samples. Axes are ``(z, y, x)`` throughout, which is the
cache's slice-major ``(D, H, W)`` order (docs/data-pipeline.md): the first axis is the slice axis.

The rules are those nnU-Net documents (Isensee et al., Nature Methods 2021, and its planner's documentation),
written here in our own code:

* **Topology** (:func:`plan_topology`): level by level, an axis gets kernel 3 once its current spacing is
  within 2x of the finest current spacing (ratio < 2; 1 before that, 3 ever after), and it is pooled by 2 while
  its feature map keeps at least ``min_feature_size`` (4) voxels after pooling and its spacing is within 2x of the
  finest spacing among the axes that can still be pooled. Pooling an axis doubles its spacing, so thick-slice data
  (6.5 x 1 x 1 mm) gets ``(1, 3, 3)`` kernels and ``(1, 2, 2)`` pooling until the in-plane spacing has caught up
  (here after two levels), then isotropic levels; an axis too short to pool further (few slices) lets the others
  go on. Deviation: at most
  ``max_poolings`` (default 4, the papers' U-Net depth, so widths and SA blocks stay the papers'); nnU-Net pools
  until the feature map is 4 voxels (5-6 stages in 3D) and caps its widths at 320.
* **Patch size**: start from the median shape (rounded to the topology's divisibility), then, while the memory
  estimate for the smallest batch (2, nnU-Net's minimum) exceeds the budget, shrink the axis whose patch is the
  largest fraction of the median shape by one divisibility step and re-plan the topology for the new patch. The
  sequence of candidates does not depend on the budget and never grows, so a larger budget never gives a
  smaller patch. Every side is a multiple of the product of its axis's pooling steps. Deviation: nnU-Net starts
  from a 512 mm isotropic cube clipped to the median shape and pads the patch *up* to divisibility; we round
  *down* (so the sequence is monotone) and start at the median shape.
* **Batch size**: as many samples as the budget holds, at least 2, at most ``max_batch_size`` and (when
  ``num_cases`` is given) at most what covers 5% of the dataset's voxels (nnU-Net's cap).
* **Target spacing** (:func:`target_spacing`): the median spacing per axis; when the data are anisotropic
  (coarsest/finest > 3) the coarse axis gets the 10th percentile of its spacings instead. :func:`plan_3d` takes
  the spacing the data will have (no resampling is planned here) and reports it as ``target_spacing``.

**Memory estimate: measured, not guessed.** The model is built on PyTorch's ``meta`` device (no memory, no
compute) and one training-mode forward pass of one sample is run under ``torch.autograd.graph.saved_tensors_hooks``,
which sees every tensor autograd keeps for the backward pass (deduplicated; parameters excluded). That is the
activation memory of a training step, exact for the model's real layers, in float32. For patches divisible by the
poolings it is an affine function of the patch volume (feature maps scale with it, per-channel statistics do not),
so it is measured at two small patches per topology and extrapolated exactly. The total is
``batch x forwards_per_step x activations + 5 x 4 bytes x parameters`` (weights, gradients, and AMSGrad's three
optimiser states, an upper bound for Adam). Not counted: transient gradient buffers during backward, cuDNN
workspaces, the allocator's fragmentation and the CUDA context, so give the planner some 70-80% of the device's
memory. Mixed precision (bf16/fp16 autocast) roughly halves the activations; the estimate stays float32.

Unpaired models (a single-input backbone, paper 2) run one forward pass per modality per step
(``forwards_per_step = num_modalities``), whose activations are all alive at the backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from modalseg.errors import ConfigError
from modalseg.models.registry import builder_options, create_model, model_card

__all__ = [
    "MIN_BATCH_SIZE",
    "Plan",
    "activation_bytes",
    "estimate_memory_mb",
    "plan_3d",
    "plan_topology",
    "target_spacing",
]

#: nnU-Net's smallest batch: the patch is shrunk until two samples fit.
MIN_BATCH_SIZE = 2
#: Bytes per parameter in a training step: weights, gradients and three optimiser states (AMSGrad), float32.
PARAMETER_BYTES = 5 * 4
#: nnU-Net's cap: one batch covers at most this fraction of the dataset's voxels (with ``num_cases``).
MAX_DATASET_FRACTION = 0.05

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class Plan:
    """A planned 3D configuration: what the trainer samples and how the network is built.

    Axes are ``(z, y, x)`` = the cache's ``(D, H, W)``. ``kernel_sizes`` has one entry per encoder level
    (``depth + 1``), ``strides`` one per pooling (``depth``); both go to the model unchanged
    (:meth:`model_options`). ``memory_mb`` is the estimate for ``batch_size`` samples (module docstring).
    """

    model: str
    patch_size: Triple
    kernel_sizes: tuple[Triple, ...]
    strides: tuple[Triple, ...]
    batch_size: int
    target_spacing: tuple[float, float, float]
    base_width: int
    num_modalities: int
    num_classes: int = 2
    in_channels: int = 1
    forwards_per_step: int = 1
    memory_mb: float = 0.0
    memory_budget_mb: float = 0.0
    median_shape: Triple = (0, 0, 0)
    notes: tuple[str, ...] = field(default=())

    @property
    def depth(self) -> int:
        """Number of poolings."""
        return len(self.strides)

    @property
    def divisibility(self) -> Triple:
        """Per axis, the product of the pooling steps: every patch side is a multiple of it."""
        return divisibility(self.strides)

    def model_options(self) -> dict[str, Any]:
        """``create_model`` options of the planned network (lists, so they round-trip through JSON/YAML)."""
        return {
            "spatial_dims": 3,
            "base_width": self.base_width,
            "depth": self.depth,
            "kernel_sizes": [list(k) for k in self.kernel_sizes],
            "strides": [list(s) for s in self.strides],
        }

    def build_model(self, **overrides: Any) -> nn.Module:
        """The planned network (``overrides`` replace options, e.g. ``norm="instance"`` or a tiny ``base_width``)."""
        single = model_card(self.model).inputs == "single"
        options: dict[str, Any] = {
            "num_modalities": 1 if single else self.num_modalities,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            **self.model_options(),
            **overrides,
        }
        return create_model(self.model, **options)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (tuples as lists); :meth:`from_dict` reads it back."""
        return {key: _listify(value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """The plan of :meth:`to_dict` (unknown keys refused)."""
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"plan: unknown key(s) {', '.join(unknown)}")
        d = dict(data)
        for key in ("patch_size", "median_shape"):
            if key in d:
                d[key] = tuple(int(v) for v in d[key])
        for key in ("kernel_sizes", "strides"):
            if key in d:
                d[key] = tuple(tuple(int(v) for v in k) for k in d[key])
        if "target_spacing" in d:
            d["target_spacing"] = tuple(float(v) for v in d["target_spacing"])
        if "notes" in d:
            d["notes"] = tuple(str(v) for v in d["notes"])
        return cls(**d)

    def summary(self) -> str:
        """One line for logs."""
        return (
            f"{self.model} 3D plan: patch {'x'.join(map(str, self.patch_size))} (z, y, x), batch {self.batch_size}, "
            f"{self.depth} poolings {[list(s) for s in self.strides]}, kernels {[list(k) for k in self.kernel_sizes]}, "
            f"~{self.memory_mb:.0f} of {self.memory_budget_mb:.0f} MB"
        )


def _listify(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_listify(v) for v in value]
    return value


def _triple(value: Sequence[Any], what: str, kind: type = int) -> tuple[Any, Any, Any]:
    try:
        items = tuple(kind(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"plan_3d: {what} must be three numbers (z, y, x), got {value!r}") from None
    if len(items) != 3 or any(not math.isfinite(v) or v <= 0 for v in items):
        raise ConfigError(f"plan_3d: {what} must be three positive numbers (z, y, x), got {value!r}")
    return items  # type: ignore[return-value]


def divisibility(strides: Sequence[Sequence[int]]) -> Triple:
    """Per axis, the product of the pooling steps: what every side of an input must be a multiple of."""
    total = [1, 1, 1]
    for step in strides:
        for a in range(3):
            total[a] *= int(step[a])
    return (total[0], total[1], total[2])


def plan_topology(
    spacing_mm: Sequence[float],
    patch_size: Sequence[int] | None = None,
    *,
    max_poolings: int = 4,
    min_feature_size: int = 4,
) -> tuple[tuple[Triple, ...], tuple[Triple, ...]]:
    """Kernel sizes (``depth + 1``) and pooling strides (``depth``) for data of ``spacing_mm`` (the module's rule).

    ``patch_size`` limits the poolings (an axis is pooled only while it keeps ``min_feature_size`` voxels);
    ``None`` plans for an unbounded patch (the spacing rule and ``max_poolings`` alone).
    """
    spacing = [float(s) for s in _triple(spacing_mm, "spacing_mm", float)]
    size = [math.inf] * 3 if patch_size is None else [int(v) for v in _triple(patch_size, "patch_size")]
    kernels: list[Triple] = []
    strides: list[Triple] = []
    kernel = [1, 1, 1]
    for level in range(max_poolings + 1):
        finest = min(spacing)
        # kernel 3 once an axis is within 2x of the finest spacing; it stays 3 at the coarser levels
        kernel = [3 if k == 3 or s / finest < 2.0 else 1 for k, s in zip(kernel, spacing, strict=True)]
        kernels.append((kernel[0], kernel[1], kernel[2]))
        if level == max_poolings:
            break
        poolable = [a for a in range(3) if size[a] >= 2 * min_feature_size]
        if not poolable:
            break
        # within 2x of the finest spacing among the axes that can still be pooled (an axis too short to pool
        # does not hold the others back)
        finest_poolable = min(spacing[a] for a in poolable)
        pool = tuple(2 if a in poolable and spacing[a] / finest_poolable < 2.0 else 1 for a in range(3))
        strides.append(pool)  # type: ignore[arg-type]
        spacing = [s * p for s, p in zip(spacing, pool, strict=True)]
        size = [n / p for n, p in zip(size, pool, strict=True)]
    return tuple(kernels), tuple(strides)


def target_spacing(
    spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]] | None = None
) -> tuple[float, float, float]:
    """nnU-Net's target spacing of a dataset from its cases' spacings (``(z, y, x)`` mm each).

    The median per axis; if the median is anisotropic (coarsest/finest > 3) and, when ``shapes`` are given, the
    coarse axis also has few voxels (3 x its median voxels < the other axes' smallest median), the coarse axis
    gets the 10th percentile of its spacings (never below the finest axis), so that resampling does not blur
    the finer cases too much.
    """
    sp = np.asarray([_triple(s, "spacing", float) for s in spacings], dtype=np.float64)
    if sp.size == 0:
        raise ConfigError("target_spacing: no spacings given")
    target = np.median(sp, axis=0)
    coarse = int(np.argmax(target))
    finest = float(target.min())
    if target[coarse] / finest > 3.0:
        few_voxels = True
        if shapes is not None:
            med_shape = np.median(np.asarray([_triple(s, "shape") for s in shapes], dtype=np.float64), axis=0)
            others = [med_shape[a] for a in range(3) if a != coarse]
            few_voxels = med_shape[coarse] * 3.0 < min(others)
        if few_voxels:
            target[coarse] = max(float(np.percentile(sp[:, coarse], 10)), finest)
    return (float(target[0]), float(target[1]), float(target[2]))


def _count_saved(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one forward pass (deduplicated, parameters excluded)."""
    saved: dict[int, int] = {}
    keep: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not (t.is_leaf and t.requires_grad):  # parameters are counted separately
            saved[id(t)] = t.numel() * t.element_size()
            keep.append(t)  # ids stay unique while the graph lives
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(saved.values())


@lru_cache(maxsize=256)
def _measure(
    model: str, options: tuple[tuple[str, Any], ...], channels: int, patch: Triple
) -> tuple[int, int]:
    """(activation bytes of one sample at ``patch``, parameter count), measured on the meta device."""
    opts = {k: _tuplify(v) for k, v in options}
    with torch.device("meta"):
        net = create_model(model, **opts)
        net.train()
        x = torch.empty(1, channels, *patch)
        acts = _count_saved(net, x)
    params = sum(p.numel() for p in net.parameters())
    return acts, params


def _tuplify(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_tuplify(v) for v in value)
    return value


def activation_bytes(
    model: str, options: Mapping[str, Any], channels: int, patch_size: Sequence[int]
) -> tuple[int, int]:
    """(float32 activation bytes autograd keeps for one sample of ``patch_size``, parameter count) of a model.

    ``options`` are ``create_model`` options. With ``strides`` and a patch divisible by their products, every saved
    tensor is either proportional to the patch volume (feature maps) or constant (per-channel statistics), so the
    bytes are ``a + b * volume``: measured at two small patches and extrapolated, exactly. Other patches are
    measured as they are.
    """
    opts = {k: _tuplify(v) for k, v in options.items()}
    key = tuple(sorted(opts.items()))
    patch = tuple(int(v) for v in patch_size)
    strides = opts.get("strides")
    if strides is not None:
        div = divisibility(strides)
        if all(p % d == 0 for p, d in zip(patch, div, strict=True)):
            small = (2 * div[0], 2 * div[1], 2 * div[2])
            large = (4 * div[0], 2 * div[1], 2 * div[2])
            a_small, params = _measure(model, key, int(channels), small)  # type: ignore[arg-type]
            a_large, _ = _measure(model, key, int(channels), large)  # type: ignore[arg-type]
            per_voxel = (a_large - a_small) / float(np.prod(small))  # the large patch has twice the volume
            constant = a_small - per_voxel * float(np.prod(small))
            return int(round(constant + per_voxel * float(np.prod(patch)))), params
    return _measure(model, key, int(channels), patch)  # type: ignore[arg-type]


def estimate_memory_mb(activations: int, params: int, batch_size: int, forwards_per_step: int = 1) -> float:
    """The training-step estimate of the module docstring, in MiB."""
    return (batch_size * forwards_per_step * activations + PARAMETER_BYTES * params) / 2**20


def _shrink_axis(patch: Sequence[int], median: Sequence[int], divisor: Sequence[int], floor: Sequence[int]) -> int:
    """The axis to shrink next: the largest fraction of the median shape among those above their floor."""
    best, best_ratio = -1, -1.0
    for a in range(3):
        if patch[a] - divisor[a] < floor[a]:
            continue
        ratio = patch[a] / median[a]
        if ratio > best_ratio + 1e-12:
            best, best_ratio = a, ratio
    return best


def has_planned_topology(model: str) -> bool:
    """Whether ``model``'s kernels and poolings are per-level options the planner chooses (the paper-1 U-Net
    family); FuseNet and the dilated FCN have fixed topologies."""
    return "strides" in builder_options(model) and model_card(model).family == "fusion_unet"


def plan_3d(
    spacing_mm: Sequence[float],
    median_shape: Sequence[int],
    num_modalities: int,
    *,
    memory_budget_mb: float,
    model: str = "master_assistant",
    base_width: int | None = None,
    num_classes: int = 2,
    in_channels: int = 1,
    max_poolings: int = 4,
    min_feature_size: int = 4,
    max_batch_size: int | None = None,
    num_cases: int | None = None,
    model_options: Mapping[str, Any] | None = None,
) -> Plan:
    """Plan a 3D ``model`` for data of ``spacing_mm`` and ``median_shape`` (both ``(z, y, x)``) within a budget.

    ``base_width`` defaults to the model card's (paper) width; ``model_options`` are further builder options
    (e.g. ``norm``) measured with the plan. Raises :class:`ConfigError` (one line) when two samples of the
    smallest patch do not fit, or when the model has no configurable topology (FuseNet, ``dilated_fcn``).
    See the module docstring for the rules.
    """
    card = model_card(model)
    if not has_planned_topology(model):
        raise ConfigError(
            f"plan_3d: model {model} has a fixed topology (no per-level kernel_sizes/strides); plan a U-Net-family "
            "model (unet, unet_sa, fuse_unet, master_assistant, ...)"
        )
    spacing = tuple(float(s) for s in _triple(spacing_mm, "spacing_mm", float))
    median = tuple(int(round(v)) for v in _triple(median_shape, "median_shape", float))
    if isinstance(num_modalities, bool) or not isinstance(num_modalities, int) or num_modalities < 1:
        raise ConfigError(f"plan_3d: num_modalities must be an integer >= 1, got {num_modalities!r}")
    budget = float(memory_budget_mb)
    if not math.isfinite(budget) or budget <= 0:
        raise ConfigError(f"plan_3d: memory_budget_mb must be a positive number, got {memory_budget_mb!r}")
    width = card.default_width if base_width is None else int(base_width)
    single = card.inputs == "single"
    forwards = num_modalities if single else 1
    channels = in_channels * (1 if single else num_modalities)
    extra = dict(model_options or {})
    for key in ("spatial_dims", "kernel_sizes", "strides", "depth", "base_width"):
        if key in extra:
            raise ConfigError(f"plan_3d: model option {key!r} is what the plan decides; remove it")
    fixed = {
        "num_modalities": 1 if single else num_modalities,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "spatial_dims": 3,
        "base_width": width,
        **extra,
    }

    def topo(patch: Sequence[int]) -> tuple[tuple[Triple, ...], tuple[Triple, ...]]:
        return plan_topology(spacing, patch, max_poolings=max_poolings, min_feature_size=min_feature_size)

    def normalise(patch: Sequence[int]) -> tuple[list[int], tuple[Triple, ...], tuple[Triple, ...]]:
        p = [int(v) for v in patch]
        while True:
            kernels, strides = topo(p)
            div = divisibility(strides)
            q = [max(d, (v // d) * d) for v, d in zip(p, div, strict=True)]
            if q == p:
                return p, kernels, strides
            p = q

    def memory(patch: Sequence[int], kernels: Any, strides: Any, batch: int) -> float:
        options = {**fixed, "depth": len(strides), "kernel_sizes": kernels, "strides": strides}
        acts, params = activation_bytes(model, options, channels, patch)
        return estimate_memory_mb(acts, params, batch, forwards)

    # the first candidate: the median shape, rounded up to its topology's divisibility
    _, strides0 = topo(median)
    if not strides0:
        raise ConfigError(
            f"plan_3d: median shape {list(median)} is too small to pool once (every axis needs "
            f"{2 * min_feature_size} voxels)"
        )
    div0 = divisibility(strides0)
    patch, kernels, strides = normalise([-(-m // d) * d for m, d in zip(median, div0, strict=True)])
    floor = [min(m, 2 * min_feature_size) for m in median]
    while not strides or memory(patch, kernels, strides, MIN_BATCH_SIZE) > budget:
        axis = _shrink_axis(patch, median, divisibility(strides) if strides else (1, 1, 1), floor)
        if axis < 0 or not strides:
            need = memory(patch, kernels, strides, MIN_BATCH_SIZE) if strides else float("nan")
            raise ConfigError(
                f"plan_3d: a memory budget of {budget:.0f} MB does not hold {MIN_BATCH_SIZE} samples of the smallest "
                f"patch {'x'.join(map(str, patch))} of {model} at base width {width} (needs ~{need:.0f} MB)"
            )
        smaller = list(patch)
        smaller[axis] -= divisibility(strides)[axis]
        patch, kernels, strides = normalise(smaller)

    acts, params = activation_bytes(
        model, {**fixed, "depth": len(strides), "kernel_sizes": kernels, "strides": strides}, channels, patch
    )
    per_sample = forwards * acts
    batch = int((budget * 2**20 - PARAMETER_BYTES * params) // per_sample) if per_sample else MIN_BATCH_SIZE
    notes = []
    if max_batch_size is not None:
        batch = min(batch, int(max_batch_size))
    if num_cases is not None:
        cap = int(MAX_DATASET_FRACTION * int(num_cases) * float(np.prod(median)) // float(np.prod(patch)))
        if cap < batch:
            notes.append(f"batch capped at {max(cap, MIN_BATCH_SIZE)} (a batch covers at most 5% of the dataset)")
        batch = min(batch, cap)
    batch = max(MIN_BATCH_SIZE, batch)
    if tuple(patch) != median:
        notes.append(f"patch {'x'.join(map(str, patch))} for median shape {'x'.join(map(str, median))}")
    return Plan(
        model=model,
        patch_size=(patch[0], patch[1], patch[2]),
        kernel_sizes=tuple(kernels),
        strides=tuple(strides),
        batch_size=batch,
        target_spacing=spacing,  # type: ignore[arg-type]
        base_width=width,
        num_modalities=num_modalities,
        num_classes=num_classes,
        in_channels=in_channels,
        forwards_per_step=forwards,
        memory_mb=round(estimate_memory_mb(acts, params, batch, forwards), 3),
        memory_budget_mb=budget,
        median_shape=median,  # type: ignore[arg-type]
        notes=tuple(notes),
    )
