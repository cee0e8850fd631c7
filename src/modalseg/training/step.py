"""One optimisation step, the only copy: the trainer, the benchmarks and anyone who steps a loss module use it.

zero_grad -> forward under the precision's autocast -> finite-loss check -> (scaled) backward -> finite-gradient
check -> optimiser step (through the fp16 loss scaler) -> per-iteration scheduler step. A non-finite loss or
gradient raises :class:`NonFiniteStep` *before* the optimiser touches the weights, so the weights a caller
checkpoints are never the diverged ones; the trainer turns it into a one-line :class:`TrainingError` that names
the epoch, step and checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modalseg.training.precision import Precision


class NonFiniteStep(Exception):
    """The loss or the gradient norm of a step was NaN/inf (``what``: ``"loss"`` | ``"gradient norm"``)."""

    def __init__(self, what: str, value: float, parts: dict[str, float]) -> None:
        self.what, self.value, self.parts = what, value, parts
        super().__init__(f"{what} became {value}")


@dataclass(frozen=True)
class StepResult:
    """What one step reports: the loss module's parts (``loss`` always) and whether the fp16 scaler skipped it."""

    parts: dict[str, float]
    skipped: bool = False

    @property
    def loss(self) -> float:
        return self.parts["loss"]


class TrainStep:
    """Step ``module`` (a loss module: ``forward(*args) -> (loss, parts)``) with ``optimizer``.

    ``forward_module`` is what is called (the DDP wrapper of ``module`` in distributed runs; ``module`` itself
    otherwise); gradients are checked on ``module``'s parameters. fp16 autocast uses a ``GradScaler`` against
    gradient underflow, which skips non-finite steps by design (they are then not an error, only ``skipped``);
    bf16 and fp32 do not need one (the scaler is then a pass-through). ``scheduler`` is stepped after every
    step when ``per_iteration`` (paper 2's decay per iteration), else left to the caller (paper 1: per epoch).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: Precision,
        *,
        forward_module: nn.Module | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        per_iteration: bool = False,
    ) -> None:
        self.module = module
        self.forward_module = forward_module if forward_module is not None else module
        self.optimizer = optimizer
        self.precision = precision
        self.scheduler = scheduler
        self.per_iteration = per_iteration
        self.scaler = torch.amp.GradScaler(precision.device.type, enabled=precision.dtype is torch.float16)
        #: BN running statistics and counters (every buffer): copied before each forward, restored if the step fails
        self._buffers = list(module.buffers())

    def __call__(self, *args: Any) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        saved = [b.clone() for b in self._buffers]
        with self.precision.autocast():
            loss, parts = self.forward_module(*args)
        if not torch.isfinite(loss):
            self._restore(saved)
            raise NonFiniteStep("loss", float(loss.detach()), parts)
        self.scaler.scale(loss).backward()
        if not self.scaler.is_enabled():  # fp16's scaler skips non-finite steps by design
            norm = self.gradient_norm()
            if not math.isfinite(norm):
                self._restore(saved)
                raise NonFiniteStep("gradient norm", norm, parts)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale
        if self.per_iteration and self.scheduler is not None:
            self.scheduler.step()
        return StepResult(parts, skipped)

    def _restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for buffer, value in zip(self._buffers, saved, strict=True):
                buffer.copy_(value)
        self.optimizer.zero_grad(set_to_none=True)

    def gradient_norm(self) -> float:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"scaler_state": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("scaler_state"):
            self.scaler.load_state_dict(state["scaler_state"])
