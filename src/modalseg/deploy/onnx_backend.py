"""ONNX Runtime as an inference backend (the :class:`~modalseg.inference.backends.Backend` contract).

The exported graphs already end in the softmax (``modalseg export``), so a call is one ``session.run`` and a
crop to the requested window: softmax is per pixel, so cropping after it equals cropping the logits before it.
Imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modalseg.deploy._graph_backend import GraphBackend, Window
from modalseg.errors import ConfigError

__all__ = ["OnnxRuntimeBackend", "require_onnxruntime", "session_options"]


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or one line saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("the onnxruntime backend needs ONNX Runtime: pip install 'modalseg[export]'") from None
    return onnxruntime


def session_options(threads: int | None = None) -> Any:
    """ONNX Runtime's defaults (all graph optimisations, one intra-op thread per physical core) except that
    ``threads`` sets the intra-op thread count and the log level is 'error' (its warnings would add lines to the
    command's one-line-per-step output)."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return options


class OnnxRuntimeBackend(GraphBackend):
    """Exported graphs (one, or one per unpaired modality index) run by ONNX Runtime on the CPU."""

    def __init__(
        self, graphs: Mapping[int | None, str | Path | bytes], *, size_multiple: int = 1, min_size: int = 1,
        threads: int | None = None,
    ) -> None:
        ort = require_onnxruntime()
        options = session_options(threads)
        self.size_multiple, self.min_size = int(size_multiple), int(min_size)
        self.sessions = {}
        for key, graph in graphs.items():
            source = graph if isinstance(graph, bytes) else str(graph)
            self.sessions[key] = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.label = "onnxruntime"

    def __call__(self, x: np.ndarray, modality: int | None, window: Window) -> np.ndarray:
        sess = self.graph_for(self.sessions, modality)
        name = sess.get_inputs()[0].name
        return self.crop(sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0], window)
