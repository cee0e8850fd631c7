"""What the backends of exported graphs (ONNX Runtime, OpenVINO) share: the per-modality lookup, the empty
per-volume session and the crop to the requested window. Imports no torch."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TypeVar

import numpy as np

from modalseg.errors import ConfigError

__all__ = ["GraphBackend", "Window"]

Window = tuple[int, int, int, int]
_Graph = TypeVar("_Graph")


class GraphBackend:
    """Base of a backend whose graphs (one, or one per unpaired modality index) are prepared once, at construction."""

    size_multiple: int
    min_size: int
    label: str

    def session(self) -> contextlib.AbstractContextManager[None]:
        """Nothing to open per volume: the graphs are made once."""
        return contextlib.nullcontext()

    @staticmethod
    def graph_for(graphs: Mapping[int | None, _Graph], modality: int | None) -> _Graph:
        """The graph of ``modality`` (``None``: the paired model's one), or one line saying there is none."""
        graph = graphs.get(modality)
        if graph is None:
            raise ConfigError(f"this exported model has no graph for modality index {modality!r}")
        return graph

    @staticmethod
    def crop(probs: np.ndarray, window: Window) -> np.ndarray:
        """``window`` (of the last two axes) of the probabilities ``(N, K, H, W)`` or ``(N, K, D, H, W)`` as a float32
        copy: softmax is per pixel, so cropping after it equals cropping the logits before it; a copy, since a
        runtime may reuse its output buffer."""
        top, height, left, width = window
        return np.array(probs[..., top: top + height, left: left + width], dtype=np.float32)
