"""The training loop shared by both papers: data -> cache -> split -> model -> steps -> checkpoints -> logs.

Layout of a run (``cfg.output`` = experiment folder)::

    <output>/splits.json                 patient-level CV folds (editable, reused)
    <output>/fold_K/config.yaml          the resolved configuration
    <output>/fold_K/latest.pt, best.pt   checkpoints (atomic; weights_only-loadable)
    <output>/fold_K/log.csv              one row per epoch
    <output>/fold_K/progress.png         loss and validation Dice per epoch
    <output>/fold_K/tensorboard/         TensorBoard scalars
    <output>/fold_K/validation.csv       per-patient, per-class metrics of the best model on the fold

Exact resume: checkpoints store model, optimiser, scheduler, torch RNG state, epoch and the position inside
the epoch; batch order is a pure function of (seed, epoch) (see ``modalseg.data.sampling``), so a run killed
at any point and resumed reaches the same weights as an uninterrupted run on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from modalseg.data.cache import SliceCache, build_slice_cache
from modalseg.data.layouts import load_dataset
from modalseg.data.preprocess import PreprocessConfig
from modalseg.data.types import DatasetSpec
from modalseg.errors import CheckpointError, ConfigError, TrainingError
from modalseg.inference.backends import TorchBackend
from modalseg.training.callbacks import Callback, EpochEnd, default_callbacks
from modalseg.training.checkpoint import TrainedCheckpoint, first_non_finite, read_checkpoint, save_checkpoint
from modalseg.training.config import TrainConfig
from modalseg.training.distributed import DistInfo, barrier, init_distributed
from modalseg.training.inference import input_size_rule, score_groups
from modalseg.training.layout import check_layout
from modalseg.training.model_meta import decode_outputs, regions_of
from modalseg.training.precision import Precision, resolve_device, resolve_precision
from modalseg.training.splits import resolve_splits
from modalseg.training.step import NonFiniteStep, StepResult, TrainStep
from modalseg.training.tasks import ModelMeta, SplitPrediction, TrainBatch, build_network, task_for
from modalseg.utils.atomic import atomic_write_text
from modalseg.utils.names import child_path
from modalseg.utils.run_lock import RunLock
from modalseg.utils.seed import seed_everything

#: Files of a finished or interrupted training in a fold folder: a new training never silently replaces them.
RUN_OUTPUTS = ("latest.pt", "best.pt", "log.csv", "config.yaml", "validation.csv", "progress.png")

#: Options that may differ on ``--resume`` without changing what the run computes (they are applied and recorded
#: in config.yaml); any other difference is refused. ``epochs``/``max_steps`` only move the end of the run.
RESUMABLE_CHANGES = frozenset({
    "epochs", "max_steps", "val_every", "checkpoint_every", "progress", "tensorboard", "num_threads", "device",
    "output",
    # a resumed 3D run keeps the plan recorded in its checkpoint, so the planner's budget no longer matters
    "memory_budget_mb",
})


def previous_outputs(run_dir: Path) -> list[str]:
    """Names of :data:`RUN_OUTPUTS` present in ``run_dir``."""
    return [name for name in RUN_OUTPUTS if (run_dir / name).exists()]


def changed_options(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Options of ``current`` that differ from the checkpoint's ``saved`` config and alter the run.

    An option the checkpoint does not record (written by a release that did not have it) counts as what that
    release did: the option's default, or for ``foreground_fraction`` 0 (no oversampling before it existed) and for
    ``augmentation`` off (no augmentation before it existed).
    """
    defaults = {**TrainConfig().to_dict(), "foreground_fraction": 0.0, "augmentation": "off"}

    def same(key: str) -> bool:
        a, b = saved.get(key, defaults.get(key)), current.get(key)
        if key in ("data", "cache_dir") and isinstance(a, str) and isinstance(b, str):
            return Path(a).resolve() == Path(b).resolve()
        return a == b

    return sorted(k for k in set(saved) | set(current) if k not in RESUMABLE_CHANGES and not same(k))

def resolve_recipe(cfg: TrainConfig, spec: DatasetSpec) -> TrainConfig:
    """Fill ``None``/``auto`` options from the dataset (its :class:`~modalseg.training.tasks.Task` decides).

    Optimisation follows the paper that matches the data (paired: paper 1, unpaired: paper 2). Preprocessing
    does not for paired data: ``auto`` is the ``default`` preset (every slice, robust z-score, aspect kept; see
    :meth:`PreprocessConfig.default`) because paper 1's recipe (labelled slices only, per-slice max scaling,
    stretched to 256x256) misleads on user data; the paper presets are chosen by name (``experiment paper1`` and
    the paper configs do). Unpaired data keeps paper 2's presets (the only unpaired recipe). ``model: auto``:
    one channel -> ``unet``, two or more -> ``master_assistant``, unpaired -> ``dilated_fcn``.
    """
    return task_for(spec).resolve(cfg)


def describe_auto_model(cfg: TrainConfig, spec: DatasetSpec) -> str:
    """The one line ``model: auto`` prints before any cache is built."""
    return task_for(spec).describe_auto_model(cfg)


def make_preprocess(cfg: TrainConfig, spec: DatasetSpec | None = None) -> PreprocessConfig:
    """The preset of ``cfg`` with its ``preprocess_options``. With ``spec``, the ``default`` preset normalises CT
    channels as nnU-Net does (``ct_dataset``: the training cases' foreground statistics, data/intensity.py,
    computed once per set of files and kept beside the slice cache) instead of per volume; an explicit
    ``normalization`` option wins. In 3D (``dims: 3``) the ``default`` preset's in-plane ``target_size`` is the
    data's own (:func:`~modalseg.data.preprocess.native_square_side`: the median case's longer in-plane side)
    rather than the 2D networks' 256x256; an explicit ``target_size`` wins."""
    presets = {
        "default": PreprocessConfig.default,
        "paper1": PreprocessConfig.paper1,
        "paper2_mscmrseg": PreprocessConfig.paper2_mscmrseg,
        "paper2_mmwhs": PreprocessConfig.paper2_mmwhs,
        # Synthetic cardiac slices are already heart-centred: z-score per slice (paper 2), no crop.
        "paper2_synth": lambda: PreprocessConfig(normalization="zscore_slice", target_size=None, crop="none"),
    }
    if cfg.preprocess not in presets:
        raise ConfigError(f"unknown preprocess preset {cfg.preprocess!r}; known: {', '.join(presets)}")
    base = presets[cfg.preprocess]().to_dict()
    if spec is not None and cfg.preprocess == "default" and "normalization" not in cfg.preprocess_options:
        from modalseg.data.intensity import ct_channels, dataset_intensity_stats

        ct = ct_channels(spec)
        if ct:
            base["normalization"] = ["ct_dataset" if i in ct else base["normalization"]
                                     for i in range(len(spec.modalities))]
            base["intensity_stats"] = dataset_intensity_stats(spec, ct, memo_dir=cache_folder(cfg, spec))
    if spec is not None and cfg.preprocess == "default" and cfg.dims == 3 and "target_size" not in \
            cfg.preprocess_options:
        from modalseg.data.preprocess import native_square_side

        side = native_square_side([c.images[0] for c in spec.cases],
                                  int(cfg.preprocess_options.get("slice_axis", base["slice_axis"])))
        base["target_size"] = [side, side]
    base.update(cfg.preprocess_options)
    return PreprocessConfig.from_dict(base)


def cache_folder(cfg: TrainConfig, spec: DatasetSpec) -> Path:
    """``<cache_dir or output/../.modalseg_cache>/<dataset name>``: slice caches and dataset statistics."""
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output).parent / ".modalseg_cache"
    return child_path(cache_root, spec.name)  # the dataset's name is data, never a path


def prepare_cache(cfg: TrainConfig, spec: DatasetSpec, pp: PreprocessConfig, info: DistInfo) -> SliceCache:
    """Build (rank 0) or reuse the slice cache of the whole dataset."""
    cache_dir = cache_folder(cfg, spec)
    cache = None
    if info.is_main:
        cache = build_slice_cache(spec, pp, cache_dir, progress=cfg.progress, strict=cfg.strict_geometry)
    barrier(info)
    if cache is None:
        cache = build_slice_cache(spec, pp, cache_dir, strict=cfg.strict_geometry)
    return cache


class Trainer:
    """Train one fold of one run. ``Trainer(cfg).fit()``; ``resume=True`` continues from ``latest.pt``.

    The trainer runs steps (:meth:`train_step`) and asks its :class:`~modalseg.training.tasks.Task` everything
    that differs between paired and unpaired learning; validation, checkpoints, logs and console lines are
    callbacks (training/callbacks.py; ``callbacks=`` replaces the default list). Public state: ``cfg``,
    ``spec``, ``task``, ``cache``, ``split``, ``meta``, ``network``, ``precision``, ``run_dir``, ``epoch``,
    ``batch_in_epoch``, ``global_step``, ``best``, ``best_epoch``, ``history``.
    """

    def __init__(
        self, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, console: bool = True,
        callbacks: list[Callback] | None = None,
    ) -> None:
        #: print the lines a person reads (auto choices, one line per epoch); off for ``train --json``
        self.console = console
        self.callbacks: list[Callback] = default_callbacks() if callbacks is None else list(callbacks)
        self.device = resolve_device(cfg.device)
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.run_dir = Path(cfg.output) / ("fold_all" if cfg.train_all else f"fold_{cfg.fold}")
        self.resume, self.overwrite = resume, overwrite
        self._latest: TrainedCheckpoint | None = None  # latest.pt of a resumed run, read once
        self._check_run_folder()  # before any cache is built: a refused run costs nothing
        self.spec = load_dataset(cfg.data, cfg.layout)
        for warning in self.spec.warnings:
            self._say(f"warning: {warning}")
        self.task = task_for(self.spec)
        model_was_auto = cfg.model == "auto"
        self.cfg = cfg = self.task.resolve(cfg)
        if model_was_auto:
            self._say(self.task.describe_auto_model(cfg))
        self.precision: Precision = resolve_precision(self.device, cfg.precision, cfg.channels_last)
        self.pp = make_preprocess(cfg, self.spec)
        check_layout(cfg, self.pp.only_labelled_slices)  # 2.5D / 3D options, before any cache is built
        self.cache: SliceCache = prepare_cache(cfg, self.spec, self.pp, self.dist)
        patients = sorted(self.cache.patients)
        if cfg.train_all:  # nnU-Net's `-f all`: one model on every case, nothing held out
            self.split = {"train": patients, "val": []}
        else:
            # our splits.json (patient ids), else nnU-Net's splits_final.json (case ids), else a new split
            splits = resolve_splits(cfg.output, self.cache.patients, cfg.folds, cfg.split_seed,
                                    self.task.strata(self.cache), dataset_root=cfg.data, log=self._say)
            self.split = splits[cfg.fold]
        self._build_model()
        self._build_data()
        self._build_optimiser()
        self.epoch = 0
        self.batch_in_epoch = 0
        self.global_step = 0
        self.best = -math.inf
        self.best_epoch: int | None = None
        self.last_validation_degenerate = False
        self.history: list[dict[str, float]] = []
        self.epoch_images = 0  # images stepped in the current epoch (all processes)
        if resume:
            self._resume()
        self.task.start(self.loss_module, cfg, self.batch_in_epoch)

    # ------------------------------------------------------------------ construction
    def _check_run_folder(self) -> None:
        """``--resume`` needs a checkpoint; a fresh run never replaces another run's files unless ``overwrite``."""
        found = previous_outputs(self.run_dir)
        if self.resume and "latest.pt" not in found:
            raise ConfigError("nothing to resume: no latest.pt in this folder (start without --resume)", self.run_dir)
        if not self.resume and found and not self.overwrite:
            raise ConfigError(
                f"holds a previous training ({', '.join(found)}); pass --resume to continue it or --overwrite to "
                "replace it", self.run_dir)

    def _build_model(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        modalities = self.task.model_modalities(cfg)
        # 2.5D channels or the 3D plan (kernels, poolings, patch) of this data; nothing in 2D
        # a resumed 3D run keeps its recorded plan (the checkpoint is read once, here, and checked in _resume)
        recorded = self._resumed_checkpoint().state.get("meta") if self.resume and cfg.dims == 3 else None
        shape, plan_line = self.task.network_layout(cfg, self.cache, self.device, recorded)
        if plan_line:
            self._say(plan_line)
        self.meta = ModelMeta(
            kind=self.task.kind,
            model=cfg.model,
            model_options=shape.pop("model_options", dict(cfg.model_options)),
            modalities=modalities,
            num_classes=len(self.spec.output_labels),  # region models: one channel per region, no background
            labels=self.spec.output_labels,
            preprocess=self.pp.to_dict(),
            setting=self.task.setting(cfg),
            feature_layers=list(cfg.feature_layers) if cfg.feature_layers else None,
            channel_names=list(self.spec.modalities),
            regions=regions_of(self.spec),
            ignore_label=self.spec.ignore_label,
            **self.task.meta_fields(cfg),
            **shape,
        )
        self.network = build_network(self.meta)
        loss_module = self.task.build_loss(self.network, cfg)
        if cfg.sync_bn and self.dist.enabled and self.device.type == "cuda":
            loss_module = nn.SyncBatchNorm.convert_sync_batchnorm(loss_module)
        if cfg.precision == "auto":
            self.precision = self._choose_precision(loss_module)
        loss_module = self.precision.prepare_model(loss_module)
        self.network = loss_module.network
        self.loss_module = loss_module
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_module: nn.Module = nn.parallel.DistributedDataParallel(loss_module, device_ids=ids)
        else:
            self.step_module = loss_module

    def _choose_precision(self, loss_module: nn.Module) -> Precision:
        """``precision: auto``: time the candidate modes on this very model (training/precision_probe.py) on rank
        0 and use its choice on every rank (ranks must agree, and each probe would cost its ~2 s budget)."""
        from modalseg.training.precision_probe import choose_precision

        choice: list[Any] = [None]
        if self.dist.is_main:
            precision, line = choose_precision(loss_module, self._probe_example, self.device, "train",
                                               channels_last=self.cfg.channels_last, model_name=self.cfg.model,
                                               budget_s=self.task.probe_budget_s)
            self._say(line)
            choice = [precision]
        if self.dist.enabled:
            import torch.distributed as tdist

            label = [choice[0].label if choice[0] is not None else None]
            tdist.broadcast_object_list(label, src=0)
            return choice[0] if self.dist.is_main else Precision.from_label(self.device, label[0])
        return choice[0]

    def _probe_example(self) -> tuple:
        """A training batch for the precision probe (the task's (images, labels) from the cache)."""
        self.task.cache = self.cache
        return self.task.probe_example(self.cfg.batch_size or 2)

    def _build_data(self) -> None:
        cfg = self.cfg
        cases_of = self.cache.patients  # patient id -> its case ids
        train_cases = sorted(c for p in self.split["train"] for c in cases_of.get(p, ()))
        val_cases = sorted(c for p in self.split["val"] for c in cases_of.get(p, ()))
        multiple, minimum = input_size_rule(self.network)
        height, width = (int(v) for v in self.cache.images.shape[-2:])
        # 3D patches and sliding windows are sized by the plan (and padded); slices must fit the network as they are
        if self.meta.patch_size is None and (height % multiple or width % multiple or min(height, width) < minimum):
            need = max(minimum, height + (-height) % multiple), max(minimum, width + (-width) % multiple)
            raise ConfigError(
                f"slices are {height}x{width} but model {cfg.model} needs sides of at least {minimum} that are "
                f"multiples of {multiple} (its downsampling); set preprocess_options target_size (e.g. "
                f"[{need[0] + (-need[0]) % multiple}, {need[1] + (-need[1]) % multiple}]) or a smaller depth")
        ws = self.dist.world_size
        if cfg.batch_size % ws:
            raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {ws} processes")
        self.steps_per_epoch = self.task.plan(self.cache, train_cases, val_cases, cfg, self.dist.rank, ws)

    def _build_optimiser(self) -> None:
        cfg = self.cfg
        # fused Adam: one kernel over all parameters (3.7x faster optimiser step than foreach on CPU, same maths)
        self.optimizer = torch.optim.Adam(
            self.loss_module.parameters(), lr=cfg.lr, amsgrad=bool(cfg.amsgrad), fused=True
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
        self.stepper = TrainStep(self.loss_module, self.optimizer, self.precision, forward_module=self.step_module,
                                 scheduler=self.scheduler, per_iteration=cfg.lr_step_unit == "iteration")

    @property
    def scaler(self) -> torch.amp.GradScaler:
        """The fp16 loss scaler (a pass-through for bf16 and fp32)."""
        return self.stepper.scaler

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "model_state": self.network.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "scaler_state": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "rng_torch": torch.get_rng_state(),
            "best": self.best,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "callbacks": {type(c).__name__: c.state_dict() for c in self.callbacks if c.state_dict()},
            "meta": self.meta.to_dict(),
            "config": self.cfg.to_dict(),
        }

    def save(self, name: str) -> None:
        """Write a checkpoint, never one with non-finite weights (a diverged model must not become best.pt)."""
        if not self.dist.is_main:
            return
        non_finite = first_non_finite(self.network.state_dict())
        if non_finite:
            raise TrainingError(
                f"weights became non-finite ({non_finite[0]}) by epoch {self.epoch + 1}, step {self.global_step} "
                f"(lr {self.optimizer.param_groups[0]['lr']:.3g}); {name} was not written, the last good "
                "checkpoint is kept; lower lr or check the inputs", self.run_dir / name)
        save_checkpoint(self._state(), self.run_dir / name)

    def _resumed_checkpoint(self) -> TrainedCheckpoint:
        """``latest.pt`` of the run being resumed, read once (a 3D plan needs it before the model is built)."""
        if self._latest is None:
            self._latest = read_checkpoint(self.run_dir / "latest.pt")
        return self._latest

    def _resume(self) -> None:
        path = self.run_dir / "latest.pt"
        checkpoint = self._resumed_checkpoint()
        self._latest = None  # the weights and states are loaded below; do not keep a second copy
        state = checkpoint.state
        if state.get("meta") != self.meta.to_dict():
            theirs = checkpoint.meta.describe()
            raise CheckpointError(
                f"was written for a different model {theirs}; this run is {self.meta.describe()}", path
            )
        saved_cfg = state.get("config")
        if not isinstance(saved_cfg, dict):
            raise CheckpointError("has no training configuration to resume with", path)
        changed = changed_options(saved_cfg, self.cfg.to_dict())
        if changed:
            def before(k: str) -> str:
                return repr(saved_cfg[k]) if k in saved_cfg else "(not recorded: an older release)"

            shown = "; ".join(f"{k}: {before(k)} -> {getattr(self.cfg, k, None)!r}" for k in changed[:6])
            raise ConfigError(
                f"--resume with changed option(s) that alter the run ({shown}); resume with the original options "
                "or start a new run (--overwrite or another --output)", path)
        checkpoint.load_weights(self.network)
        try:
            self.optimizer.load_state_dict(state["optimizer_state"])
            self.scheduler.load_state_dict(state["scheduler_state"])
            self.stepper.load_state_dict(state)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"optimiser state does not match ({exc})", path) from None
        torch.set_rng_state(state["rng_torch"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.global_step = int(state["global_step"])
        self.best = float(state["best"])
        self.best_epoch = state.get("best_epoch")
        self.history = list(state["history"])
        saved_callbacks = state.get("callbacks") or {}
        for c in self.callbacks:
            if type(c).__name__ in saved_callbacks:
                c.load_state_dict(saved_callbacks[type(c).__name__])

    # ------------------------------------------------------------------ steps
    def train_step(self, batch: TrainBatch) -> StepResult:
        """One optimisation step on ``batch`` (from ``task.batches``); advances the step counters.

        A non-finite loss or gradient norm stops the run with one line before the weights change.
        """
        try:
            result = self.stepper(*batch.args)
        except NonFiniteStep as bad:
            parts = ", ".join(f"{k}={v:.4g}" for k, v in bad.parts.items())
            where = f"at epoch {self.epoch + 1}, step {self.global_step + 1}"
            if bad.what == "loss":
                message = (f"loss became {bad.value} {where} ({parts}); lower lr or check the inputs; the last "
                           "checkpoint is kept")
            else:
                message = (f"gradient norm became {bad.value} {where} (loss {bad.parts.get('loss', math.nan):.4g}, "
                           f"lr {self.optimizer.param_groups[0]['lr']:.3g}); the step was not applied, the last "
                           "checkpoint is kept; lower lr or check the inputs")
            raise TrainingError(message, self.run_dir / "latest.pt") from None
        except ValueError as exc:
            if "Expected more than 1 value per channel" not in str(exc):
                raise
            raise ConfigError(
                f"batch_size {self.cfg.batch_size} leaves one value per channel at the network's deepest BatchNorm "
                "(image too small for the network's depth); use a larger batch_size or image size"
            ) from None
        self.batch_in_epoch += 1
        self.global_step += 1
        self.epoch_images += batch.num_images * self.dist.world_size
        return result

    def fit(self) -> dict[str, Any]:
        """Train to ``cfg.epochs`` (or ``cfg.max_steps``), validating, logging and checkpointing."""
        if not self.dist.is_main:
            return self._fit()
        with RunLock(self.run_dir):
            self._check_run_folder()  # again, under the lock: another process may have finished meanwhile
            if self.overwrite and not self.resume:
                self._remove_previous_outputs()
            return self._fit()

    def _remove_previous_outputs(self) -> None:
        import shutil

        for name in previous_outputs(self.run_dir):
            (self.run_dir / name).unlink()
        shutil.rmtree(self.run_dir / "tensorboard", ignore_errors=True)

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        t_fit = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self._call("on_fit_start")
        self.fit_completed = False  # on_fit_end also runs when training stops with an error
        try:
            stop = False
            while self.epoch < cfg.epochs and not stop:
                stop = self._run_epoch()
            self.fit_completed = True
        finally:
            self._call("on_fit_end")
        barrier(self.dist)
        return {"best_val_dice": self.best, "best_epoch": self.best_epoch, "val_scope": self.val_scope,
                "epochs": self.epoch, "steps": self.global_step, "run_dir": str(self.run_dir),
                "wall_s": time.perf_counter() - t_fit}

    def _run_epoch(self) -> bool:
        """The rest of the current epoch; returns whether ``max_steps`` stopped the run."""
        cfg = self.cfg
        self.network.train()
        losses: list[float] = []
        ratios: list[float] = []
        self.epoch_images, t0 = 0, time.perf_counter()
        stop = False
        self._call("on_epoch_start")
        for batch in self.task.batches(self.epoch, self.batch_in_epoch, self.precision):
            result = self.train_step(batch)
            losses.append(result.loss)
            if "aux_grad_ratio" in result.parts:
                ratios.append(result.parts["aux_grad_ratio"])
            self._call("on_step_end", result)
            if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
                stop = True
                break
        self._call("on_train_epoch_end")
        epoch_done = self.batch_in_epoch >= self.steps_per_epoch
        if epoch_done:
            if cfg.lr_step_unit == "epoch":
                self.scheduler.step()
            self.epoch += 1
            self.batch_in_epoch = 0
        if not (epoch_done or stop):
            return stop
        record = {"epoch": self.epoch, "step": self.global_step,
                  "train_loss": float(np.mean(losses)) if losses else float("nan"),
                  "lr": self.optimizer.param_groups[0]["lr"],
                  "img_per_s": self.epoch_images / max(time.perf_counter() - t0, 1e-9)}
        if ratios:  # does the auxiliary loss act? ||grad(lambda L_aux)|| / ||grad(Dice+CE)|| (paper 2)
            record["aux_grad_ratio"] = float(np.mean(ratios))
        end = EpochEnd(record, stopped=stop)
        self._call("on_validation", end)
        record["time_s"] = time.perf_counter() - t0
        self.history.append(record)
        self._call("on_epoch_end", end)
        return stop

    @property
    def val_scope(self) -> str:
        """What validation scores: whole volumes (every slice cached) or only the labelled slices (paper 1)."""
        return "labelled-slice" if self.pp.only_labelled_slices else "volume"

    def _say(self, line: str) -> None:
        """A line for the person at the console (main process only; silent under ``train --json``)."""
        if self.console and self.dist.is_main:
            print(line, flush=True)

    # ------------------------------------------------------------------ validation
    def guard_precision(self) -> None:
        """Once, at the first validation: an ``auto``-chosen low precision is kept only if its validation
        predictions match fp32's (precision_probe.accuracy_guard); else training continues in fp32 with the same
        memory format (so parameters and optimiser state keep their layout). Rank 0 decides for all ranks."""
        info = self.precision.auto
        if info is None or self.precision.dtype is None or getattr(self, "_precision_guarded", False):
            return
        self._precision_guarded = True
        from modalseg.training.precision_probe import accuracy_guard

        label: list[str | None] = [None]
        if self.dist.is_main:
            group, idx = next(((g, v[:16]) for g, v in self.task.groups("val").items() if len(v)), (None, None))
            if idx is not None:
                target = np.asarray(self.cache.labels[idx])
                fp32 = "fp32+channels_last" if self.precision.channels_last else "fp32"
                candidate = dataclasses.replace(self.precision, auto=dataclasses.replace(info, fp32_fallback=fp32))
                valid = target != self.meta.ignore_index  # all True without an ignore label
                chosen, line = accuracy_guard(
                    candidate,
                    # decoded label maps: class indices, or for region models painted label values (as target)
                    lambda p: decode_outputs(self.task.predict(self._backend(p), group, idx), self.meta) * valid,
                    target=target * valid, num_classes=self.meta.num_classes)
                self.network.train()
                self._say(line)
                label = [chosen.label]
        if self.dist.enabled:
            import torch.distributed as tdist

            tdist.broadcast_object_list(label, src=0)
        if label[0] is not None and label[0] != self.precision.label:
            self.precision = Precision.from_label(self.device, label[0])
            self.stepper.precision = self.precision

    def validate(self) -> float:
        """Mean foreground Dice per validation patient (slices stacked), averaged (over modalities if unpaired).

        With the default preset every slice of a validation case is cached, so this is the volume Dice; with the
        paper presets it is the Dice of the labelled slices (:attr:`val_scope`). Sets
        ``last_validation_degenerate`` when every case is predicted empty (while some has foreground) or all
        foreground: such an epoch never becomes ``best.pt``. Region models score each region (its label values in
        the painted prediction and in the target); nnU-Net's ignore voxels are scored nowhere, in this check
        neither (``ModelMeta.scoring``, ``training.inference.score_groups``).
        """
        self.last_validation_degenerate = False
        if not self.dist.is_main:
            return float("nan")
        scores = []
        empty, full, any_foreground = [], [], False
        for split in self.predict_split().values():
            result = score_groups(split.pred, split.target, split.patients, self.meta.num_classes,
                                  **self.meta.scoring())
            scores.extend(result.dice.values())
            empty += result.empty
            full += result.full
            any_foreground = any_foreground or result.any_foreground
        self.last_validation_degenerate = bool(empty) and ((all(empty) and any_foreground) or all(full))
        return float(np.mean(scores)) if scores else float("nan")

    def _backend(self, precision: Precision) -> TorchBackend:
        """The network as an inference backend in ``precision`` (softmax, or sigmoid per region)."""
        return TorchBackend(self.network, precision, activation=self.meta.activation)

    def predict_split(self, which: str = "val") -> dict[str, SplitPrediction]:
        """Predictions on the fold's validation (or training) slices, per task group, with their records: argmax
        class indices, or for region models the regions painted with their label values (``decode_outputs``)."""
        out = {}
        for group, idx in self.task.groups(which).items():
            if len(idx) == 0:
                continue
            probs = self.task.predict(self._backend(self.precision), group, idx)
            target = np.asarray(self.cache.labels[idx])
            records = [self.cache.records[i] for i in idx]
            out[group] = SplitPrediction(decode_outputs(probs, self.meta), target, records, idx)
        self.network.train()
        return out
