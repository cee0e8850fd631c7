"""How a network runs: the backend contract and the PyTorch backend.

A backend turns a batch of network inputs into class probabilities. The contract (``Backend``) is small so
that runtimes without PyTorch modules (ONNX Runtime, OpenVINO; issue 17) can implement it:

* ``size_multiple`` / ``min_size``: what input sides the network accepts (its downsampling);
* ``session()``: a context for one volume's batches (the torch backend opens one autocast region there, so
  low-precision weight copies are made once per volume, not once per batch);
* ``__call__(x, modality, window)``: softmax probabilities (N, K, *window size*) float32 for the float32 batch
  ``x`` (N, C, H, W); ``window`` = ``(top, height, left, width)`` selects the part of the (padded) input whose
  probabilities are wanted (logits are cropped before the softmax); ``modality`` is the unpaired branch index.

This module imports torch only where the torch backend runs (not at import), so that the inferer and the
exported-model runtime (``modalseg.deploy``) work in an environment without PyTorch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from modalseg.training.precision import Precision

Window = tuple[int, int, int, int]


@runtime_checkable
class Backend(Protocol):
    """What an inferer needs from a network runtime (see the module docstring)."""

    size_multiple: int
    min_size: int

    def session(self) -> contextlib.AbstractContextManager[None]: ...

    def __call__(self, x: np.ndarray, modality: int | None, window: Window) -> np.ndarray: ...


def input_size_rule(model: object) -> tuple[int, int]:
    """(multiple, minimum) the model's input sides need: its ``size_multiple`` and ``min_size`` (1 if undeclared)."""
    return max(1, int(getattr(model, "size_multiple", 1))), max(1, int(getattr(model, "min_size", 1)))


#: How logits become probabilities: softmax over classes, or one sigmoid per channel (region-based models).
ACTIVATIONS = ("softmax", "sigmoid")


class TorchBackend:
    """An ``nn.Module`` (already prepared by ``precision``: device, memory format) in eval mode under autocast.

    ``activation="sigmoid"`` gives region-based models' independent per-region probabilities (nnU-Net's
    ``regions_class_order`` models) instead of the softmax."""

    def __init__(self, network: nn.Module, precision: Precision, activation: str = "softmax") -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.network = network
        self.precision = precision
        self.activation = activation
        self.size_multiple, self.min_size = input_size_rule(network)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        import torch

        self.network.eval()
        with torch.no_grad(), self.precision.autocast():
            yield

    def __call__(self, x: np.ndarray, modality: int | None, window: Window) -> np.ndarray:
        import torch

        top, height, left, width = window
        t = self.precision.to_input(torch.as_tensor(x, dtype=torch.float32))
        logits = self.network(t) if modality is None else self.network(t, modality=modality)
        logits = logits[..., top: top + height, left: left + width]
        if self.activation == "sigmoid":
            return torch.sigmoid(logits.float()).cpu().numpy()
        return torch.softmax(logits.float(), dim=1).cpu().numpy()
