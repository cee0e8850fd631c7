"""What happens around the training steps, as callbacks of :meth:`Trainer.fit` (validation, checkpoints, logs).

The trainer runs steps; everything else hooks in (nnU-Net's ``on_epoch_end`` seams without the god class):

* ``on_fit_start(trainer)`` / ``on_fit_end(trainer)`` (also after an error; ``trainer.fit_completed`` says which)
* ``on_epoch_start(trainer)``, ``on_step_end(trainer, result)`` after every step,
  ``on_train_epoch_end(trainer)`` when the epoch's steps are done (or the run stops),
* ``on_validation(trainer, end)``: may add scores to ``end.record`` and set ``end.improved``,
* ``on_epoch_end(trainer, end)``: the record is final (``time_s`` included) and in ``trainer.history``.

Callbacks run in list order. State a callback needs for exact resume is in :meth:`Callback.state_dict`; the
trainer stores it in the checkpoint under ``callbacks`` (keyed by class name). The default list
(:func:`default_callbacks`) keeps the order the loop had before it was cut: validate, then ``best.pt`` and
``latest.pt``, then log.csv / progress.png / TensorBoard, then the console line.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from modalseg.training.step import StepResult
from modalseg.utils.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from modalseg.training.config import TrainConfig
    from modalseg.training.distributed import DistInfo
    from modalseg.training.precision import Precision
    from modalseg.training.tasks import Task


class Trainer(Protocol):
    """What the callbacks read and call of :class:`modalseg.training.engine.Trainer` (a contract, so that this
    module does not import the engine that imports it)."""

    cfg: TrainConfig
    dist: DistInfo
    task: Task
    network: nn.Module
    precision: Precision
    run_dir: Path
    console: bool
    history: list[dict[str, Any]]
    epoch: int
    batch_in_epoch: int
    global_step: int
    steps_per_epoch: int
    epoch_images: int
    best: float
    best_epoch: int | None
    last_validation_degenerate: bool
    fit_completed: bool

    @property
    def val_scope(self) -> str: ...

    def save(self, name: str) -> None: ...

    def validate(self) -> float: ...

    def guard_precision(self) -> None: ...


@dataclass
class EpochEnd:
    """The end of an epoch (or of a run stopped by ``max_steps``): its log record and what callbacks decided."""

    record: dict[str, Any]
    stopped: bool = False
    improved: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Callback:
    """Base class: every hook is a no-op; override what you need."""

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_epoch_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None: ...

    def on_train_epoch_end(self, trainer: Trainer) -> None: ...

    def on_validation(self, trainer: Trainer, end: EpochEnd) -> None: ...

    def on_epoch_end(self, trainer: Trainer, end: EpochEnd) -> None: ...

    def on_fit_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class Validation(Callback):
    """Validate every ``val_every`` epochs and at the end; track the best epoch.

    A NaN score never wins (NaN > x is False), nor does a degenerate epoch (empty or all-foreground predictions
    on every validation case), however its Dice compares. ``trainer.best`` / ``trainer.best_epoch`` are the
    run's state (checkpointed with it).
    """

    def on_validation(self, trainer: Trainer, end: EpochEnd) -> None:
        cfg = trainer.cfg
        if not (trainer.epoch % cfg.val_every == 0 or end.stopped or trainer.epoch == cfg.epochs):
            return
        trainer.guard_precision()
        end.record["val_dice"] = trainer.validate()
        end.record["degenerate"] = int(trainer.last_validation_degenerate)
        end.improved = end.record["val_dice"] > trainer.best and not trainer.last_validation_degenerate
        if end.improved:
            trainer.best, trainer.best_epoch = end.record["val_dice"], trainer.epoch


class Checkpoints(Callback):
    """``latest.pt`` every ``checkpoint_every`` steps and at every epoch end; ``best.pt`` when validation improved."""

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        every = trainer.cfg.checkpoint_every
        if every and trainer.global_step % every == 0:
            trainer.save("latest.pt")

    def on_epoch_end(self, trainer: Trainer, end: EpochEnd) -> None:
        if end.improved:
            trainer.save("best.pt")
        trainer.save("latest.pt")


#: log.csv's columns, in order
LOG_COLUMNS = ["epoch", "step", "train_loss", "aux_grad_ratio", "val_dice", "degenerate", "lr", "img_per_s",
               "time_s"]


class Logs(Callback):
    """log.csv (all epochs, rewritten atomically), progress.png, and TensorBoard scalars when enabled."""

    def __init__(self) -> None:
        self.writer = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.cfg.tensorboard and trainer.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(trainer.run_dir / "tensorboard"))

    def on_epoch_end(self, trainer: Trainer, end: EpochEnd) -> None:
        if not trainer.dist.is_main:
            return
        record = end.record
        if self.writer is not None:
            for key, value in record.items():
                if key not in {"epoch", "step"}:
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in trainer.history:
            w.writerow({c: row.get(c, "") for c in LOG_COLUMNS})
        atomic_write_bytes(trainer.run_dir / "log.csv", buf.getvalue().encode())
        from modalseg.evaluation.figures import plot_progress

        plot_progress(trainer.history, trainer.run_dir / "progress.png")

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class ProgressBar(Callback):
    """A tqdm bar per epoch (``progress``); it disappears when the epoch's steps are done."""

    def __init__(self) -> None:
        self.bar = None
        self.t0 = 0.0
        self.images = 0

    def on_epoch_start(self, trainer: Trainer) -> None:
        if not (trainer.cfg.progress and trainer.dist.is_main):
            return
        from tqdm.auto import tqdm

        self.t0, self.images = time.perf_counter(), 0
        self.bar = tqdm(total=trainer.steps_per_epoch, initial=trainer.batch_in_epoch,
                        desc=f"epoch {trainer.epoch + 1}/{trainer.cfg.epochs}", leave=False, dynamic_ncols=True)

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if self.bar is None:
            return
        self.images = trainer.epoch_images
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{result.loss:.4f}", img_s=f"{self.images / (time.perf_counter() - self.t0):.2f}")

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_fit_end = on_train_epoch_end


class ConsoleLines(Callback):
    """One line per epoch for a person (main process; silent under ``train --json``)."""

    def on_epoch_end(self, trainer: Trainer, end: EpochEnd) -> None:
        if not (trainer.console and trainer.dist.is_main):
            return
        record = end.record
        parts = [f"epoch {record['epoch']}/{trainer.cfg.epochs}", f"train loss {record['train_loss']:.4f}"]
        if "val_dice" in record:
            val = f"val {trainer.val_scope} Dice {record['val_dice']:.4f}"
            if end.improved:
                val += " (best)"
            elif record.get("degenerate"):
                val += " (degenerate prediction: not eligible for best.pt)"
            parts.append(val)
        parts.append(f"{record['time_s']:.1f} s")
        print(", ".join(parts), flush=True)


class BatchNormRecalibration(Callback):
    """At the end of training, :func:`recalibrate_batch_norm` (paper 2's optional ``--recalibrate-bn``): BN
    statistics re-estimated on the training slices with dropout off, before the final weights are saved.

    Place it before :class:`Checkpoints` only if ``latest.pt`` should hold the recalibrated statistics; the
    default list does not include it (neither paper's recipe has it)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        if not trainer.fit_completed:  # a run that failed keeps its last good checkpoint
            return
        recalibrate_batch_norm(trainer)
        trainer.save("latest.pt")


def default_callbacks() -> list[Callback]:
    """What ``modalseg train`` runs: progress bar, validation, checkpoints, logs, console lines."""
    return [ProgressBar(), Validation(), Checkpoints(), Logs(), ConsoleLines()]


def recalibrate_batch_norm(trainer: Trainer) -> None:
    """Re-estimate every BN layer's running mean/variance on the fold's training slices, dropout off.

    Why: a network with dropout before BN (paper 2's dilated FCN) measures each BN's running variance on
    dropout-perturbed activations; at inference dropout is off and the activations have a smaller variance
    ("variance shift", Li et al., CVPR 2019), which over many stacked layers can ruin eval-mode predictions. A
    cumulative average (``momentum=None``) over all training slices, per task group in cache order (per
    modality for unpaired data, so each MSBN set sees only its modality), in ``trainer.cfg.batch_size`` batches;
    training data only. Ends in eval mode. Not part of either paper's recipe (``--recalibrate-bn``).
    """
    import torch
    from torch import nn

    net = trainer.network
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
    net.train()
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    bs = trainer.cfg.batch_size
    try:
        with torch.no_grad():
            for group, idx in trainer.task.groups("train").items():
                for start in range(0, len(idx), bs):
                    images, modality = trainer.task.inputs(group, idx[start:start + bs])
                    x = torch.as_tensor(np.asarray(images))
                    with trainer.precision.autocast():
                        x = trainer.precision.to_input(x)
                        net(x) if modality is None else net(x, modality=modality)
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        net.eval()
