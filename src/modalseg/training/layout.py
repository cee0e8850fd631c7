"""What a training sample is: a 2D slice, a 2.5D slice with its neighbours, or a 3D patch of a volume.

Both tasks (training/tasks.py) ask this module the three things that change with the layout; the trainer never
sees the difference:

* **the network's shape** (:func:`network_fields`, stored in the checkpoint's ``ModelMeta``): 2.5D feeds
  ``2 * context_slices + 1`` channels per modality to a 2D network; 3D plans kernels, poolings and the patch from
  the cached volumes' median spacing and shape within a memory budget (models/planning.py, nnU-Net's rules), or
  takes the user's ``patch_size`` and plans only the topology for it;
* **training batches**: 2.5D reads each sampled slice as a depth ``2k + 1`` patch centred on it (the slice order
  and foreground oversampling of 2D training; zeros beyond the volume), transforms it as a 3D sample (so intensity
  augmentation treats a modality's neighbours alike) and folds the depth into the channels; 3D reads
  :class:`~modalseg.data.patches.PatchSampler` patches (pure in seed, step and rank: exact resume, DDP);
* **validation**: whole cached volumes through the layout's inferer (:func:`~modalseg.inference.inferers.
  layout_inferer`: sliding windows in 3D, neighbours as channels in 2.5D), then the requested slices, so the
  metrics see slices as in 2D.

Requirements: 2.5D and 3D need every slice of a case cached (not the ``paper1`` preset).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from modalseg.data.patches import PatchRef
from modalseg.errors import ConfigError

if TYPE_CHECKING:
    from modalseg.data.cache import SliceCache
    from modalseg.inference.backends import Backend
    from modalseg.inference.inferers import Inferer
    from modalseg.training.config import TrainConfig

#: the planner's budget on CPU when ``memory_budget_mb`` is not given (a GPU gets 70% of its memory)
CPU_MEMORY_BUDGET_MB = 4096.0
#: model options the 3D planner decides (a user's value would contradict the plan)
PLANNED_OPTIONS = ("spatial_dims", "kernel_sizes", "strides", "depth")


def default_memory_budget_mb(device: torch.device | str | None) -> float:
    """70% of the CUDA device's memory (nnU-Net plans for a fixed GPU budget too), else :data:`CPU_MEMORY_BUDGET_MB`."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        return 0.7 * torch.cuda.get_device_properties(dev).total_memory / 2**20
    return CPU_MEMORY_BUDGET_MB


def check_layout(cfg: TrainConfig, only_labelled_slices: bool) -> None:
    """Refuse layout options that cannot work together, in one line, before any cache is built."""
    if cfg.dims == 3 and cfg.context_slices:
        raise ConfigError("context_slices (2.5D) is for 2D networks; a 3D network (dims 3) sees the neighbours already")
    if cfg.patch_size is not None and cfg.dims != 3:
        raise ConfigError("patch_size is the 3D training patch; set dims: 3 (2D networks train on whole slices)")
    if (cfg.dims == 3 or cfg.context_slices) and only_labelled_slices:
        what = "dims 3" if cfg.dims == 3 else "context_slices (2.5D)"
        raise ConfigError(f"{what} needs every slice of a case, but preprocessing {cfg.preprocess} caches only the "
                          "labelled slices; use the default preset")
    planned = [k for k in PLANNED_OPTIONS if k in cfg.model_options]
    if cfg.dims == 3 and planned:
        raise ConfigError(f"model_options {', '.join(planned)}: the 3D planner decides them from the data's spacing "
                          "(remove them; set patch_size or memory_budget_mb to steer it)")


def median_geometry(cache: SliceCache, positions: Sequence[int] | None = None) -> tuple[list[float], list[int]]:
    """Median spacing (mm) and shape of the cached volumes, both ``(d, h, w)`` (nnU-Net plans from the medians)."""
    cases = [cache.cases[p] for p in positions] if positions is not None else list(cache.cases)
    spacing = np.median(np.array([c.spacing for c in cases], dtype=float), axis=0)
    shape = np.median(np.array([c.shape[1:] for c in cases], dtype=float), axis=0)
    return [float(v) for v in spacing], [int(round(v)) for v in shape]


def network_fields(cfg: TrainConfig, cache: SliceCache, *, model: str, num_modalities: int, num_classes: int,
                   device: torch.device | str | None = None, recorded: dict[str, Any] | None = None
                   ) -> tuple[dict[str, Any], str | None]:
    """``ModelMeta`` fields of the network for ``cfg``'s layout, and the line that says what was planned (None in
    2D). 2D: nothing (the description older releases wrote). ``recorded``: the description of the checkpoint a run
    resumes; a 3D run keeps its plan (the default memory budget follows the device, so planning again on another
    GPU could change the network under the saved weights)."""
    if cfg.dims == 3 and recorded and recorded.get("patch_size") and recorded.get("model") == model:
        patch = list(recorded["patch_size"])
        options = dict(recorded.get("model_options") or {})
        return ({"model_options": options, "patch_size": patch},
                f"3D plan: patch {'x'.join(map(str, patch))} as recorded in the checkpoint (resume)")
    if cfg.dims == 2:
        k = int(cfg.context_slices)
        if not k:
            return {}, None
        return {"in_channels": 2 * k + 1, "context_slices": k}, None
    from modalseg.models.planning import divisibility, has_planned_topology, plan_3d, plan_topology

    spacing, median = median_geometry(cache)
    if not has_planned_topology(model):
        return _fixed_topology_fields(cfg, model, median)
    options = dict(cfg.model_options)
    width = options.pop("base_width", None)
    budget = float(cfg.memory_budget_mb or default_memory_budget_mb(device))
    plan = plan_3d(spacing, median, num_modalities, memory_budget_mb=budget, model=model, base_width=width,
                   num_classes=num_classes, num_cases=cache.num_cases, model_options=options)
    kernels, strides, patch = plan.kernel_sizes, plan.strides, list(plan.patch_size)
    if cfg.patch_size is not None:
        patch = list(cfg.patch_size)
        kernels, strides = plan_topology(spacing, patch)
        div = divisibility(strides)
        if not strides or any(p % d for p, d in zip(patch, div, strict=True)):
            fit = [max(d, p - p % d) for p, d in zip(patch, div, strict=True)]
            raise ConfigError(f"patch_size {patch}: every side must be a multiple of the poolings the planner chose "
                              f"for it ({list(div)}), e.g. {fit}")
    model_options = {**cfg.model_options, "spatial_dims": 3, "base_width": plan.base_width, "depth": len(strides),
                     "kernel_sizes": [list(k) for k in kernels], "strides": [list(s) for s in strides]}
    spacing_text = " x ".join(f"{v:g}" for v in spacing)
    if cfg.patch_size is not None:
        memory = "patch_size given, memory not planned"
    else:
        batch = int(cfg.batch_size or 2)
        # the plan's estimate for its own batch, scaled to the run's (an upper bound: the weights do not scale)
        estimate = plan.memory_mb * batch / plan.batch_size
        memory = f"~{estimate:.0f} MB for batch {batch} of a {budget:.0f} MB budget"
        if estimate > budget:
            memory += " (over budget: lower batch_size or raise memory_budget_mb)"
    thick = [float(c.spacing[0]) for c in cache.cases]
    varies = (f"; note: slice thickness varies {min(thick):g}-{max(thick):g} mm across cases, so patches differ in "
              "physical depth (preprocess_options slice_thickness_mm resamples them to one)"
              if max(thick) > 1.25 * min(thick) else "")
    line = (f"3D plan: patch {'x'.join(map(str, patch))} (median volume {'x'.join(map(str, median))}, spacing "
            f"{spacing_text} mm), {len(strides)} poolings {[list(s) for s in strides]}, base width "
            f"{plan.base_width}; {memory}{varies}")
    return {"model_options": model_options, "patch_size": patch}, line


def _fixed_topology_fields(cfg: TrainConfig, model: str, median: Sequence[int]) -> tuple[dict[str, Any], str]:
    """A 3D network whose topology is fixed (FuseNet: five VGG stages pooling every axis by 2): nothing to plan, so
    the patch must be given (each side at least 32: one voxel left after the fifth pooling); the dilated FCN is
    refused (its x8 pixel shuffle needs 512 channels per class in 3D, docs/3d.md)."""
    if model == "dilated_fcn":
        raise ConfigError("dims 3: the dilated FCN's x8 pixel shuffle is a seam in 3D, not a model (309M parameters "
                          "at width 16); use the unet backbone (model: unet)")
    if cfg.patch_size is None or min(cfg.patch_size) < 32:
        raise ConfigError(f"dims 3 with {model}: its topology is fixed (five poolings by 2 on every axis), so nothing "
                          "is planned; give patch_size with every side at least 32, e.g. [32, 64, 64] (median volume "
                          f"{'x'.join(map(str, median))})")
    patch = list(cfg.patch_size)
    line = (f"3D: {model} has a fixed topology (five 2x2x2 poolings); patch {'x'.join(map(str, patch))} as given, "
            "memory not planned")
    return {"model_options": {**cfg.model_options, "spatial_dims": 3}, "patch_size": patch}, line


def steps_per_epoch_3d(cache: SliceCache, positions: Sequence[int], patch: Sequence[int], batch_size: int) -> int:
    """An epoch of 3D training covers the training voxels about once: ``ceil(voxels / (patch voxels x batch))``.

    Deviation: nnU-Net's epoch is a fixed 250 iterations whatever the dataset; ours scales with the data, so that
    ``epochs`` means about the same in 2D (one pass over the slices) and in 3D."""
    voxels = sum(int(np.prod(cache.cases[p].shape[1:])) for p in positions)
    return max(1, math.ceil(voxels / (int(np.prod(patch)) * int(batch_size))))


def context_refs(refs: Sequence[PatchRef], context: int) -> list[PatchRef]:
    """Depth-1 slice patches widened to ``2 * context + 1`` slices centred on them (2.5D)."""
    return [PatchRef(r.case, (r.start[0] - context, r.start[1], r.start[2]), (2 * context + 1, *r.size[1:]))
            for r in refs]


def fold_context(x: torch.Tensor, y: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C, 2k+1, H, W)`` / ``(B, 2k+1, H, W)`` -> the 2.5D input ``(B, C * (2k+1), H, W)`` (modality-major, as
    :func:`~modalseg.inference.inferers.with_context`) and the centre slice's label ``(B, H, W)``."""
    b, c, d = x.shape[:3]
    return x.reshape(b, c * d, *x.shape[3:]), y[:, context]


def probe_patch(fields: dict[str, Any]) -> list[int]:
    """The patch ``precision: auto`` times a 3D network on: per axis twice the network's divisibility (every layer
    runs, the deepest at 2 voxels), at most the training patch. Why smaller: a whole 3D training step can take
    longer than the probe's 2-second budget, and a probe that cannot time a second mode keeps fp32 (on the AMX Xeon
    bf16 trains this network 3x faster, docs/benchmarks.md)."""
    from modalseg.models.planning import divisibility

    patch = [int(v) for v in fields["patch_size"]]
    strides = fields["model_options"].get("strides")
    div = divisibility(strides) if strides else (32, 32, 32)  # FuseNet: five 2x poolings per axis
    return [min(p, 2 * d) for p, d in zip(patch, div, strict=True)]


def probe_refs(cache: SliceCache, positions: Sequence[int], patch: Sequence[int], count: int) -> list[PatchRef]:
    """``count`` centred patches of the first cases (a training-like batch for the precision probe)."""
    refs = []
    for j in range(count):
        case = positions[j % len(positions)]
        shape = cache.cases[case].shape[1:]
        start = tuple((n - p) // 2 for n, p in zip(shape, patch, strict=True))
        refs.append(PatchRef(case, start, tuple(int(p) for p in patch)))  # type: ignore[arg-type]
    return refs


def predict_slices(cache: SliceCache, inferer: Inferer, backend: Backend, indices: np.ndarray,
                   channels: Sequence[int] | None, modality: int | None) -> np.ndarray:
    """Probabilities ``(len(indices), K, H, W)`` of cached slices ``indices`` from whole-volume inference: each case
    they belong to goes through the layout's ``inferer`` once (sliding windows in 3D, neighbours in 2.5D), and the
    requested slices are taken from its result."""
    where = [cache.slice_position(int(i)) for i in indices]
    out: np.ndarray | None = None
    for case in dict.fromkeys(c for c, _ in where):
        image = cache.volume(case)[0]
        image = image if channels is None else image[list(channels)]
        probs = inferer(backend, np.ascontiguousarray(np.moveaxis(image, 0, 1)), modality)  # (D, K, H, W)
        if out is None:
            out = np.empty((len(indices), *probs.shape[1:]), dtype=np.float32)
        rows = [j for j, (c, _) in enumerate(where) if c == case]
        out[rows] = probs[[where[j][1] for j in rows]]
    return out if out is not None else np.zeros((0,), np.float32)
