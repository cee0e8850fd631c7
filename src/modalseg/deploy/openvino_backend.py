"""OpenVINO as an inference backend (the :class:`~modalseg.inference.backends.Backend` contract).

OpenVINO reads the exported ONNX graphs directly and compiles them for the CPU once (dynamic batch and sides).
Deviation from OpenVINO's default: its CPU plugin runs in bf16 wherever the CPU has bf16 instructions (AVX512-BF16,
AMX); here the inference precision is f32 unless ``precision="bf16"`` is asked for, so that an "openvino" result is
the fp32 network's. Imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modalseg.deploy._graph_backend import GraphBackend, Window
from modalseg.errors import ConfigError

__all__ = ["OPENVINO_PRECISIONS", "OpenVinoBackend", "require_openvino"]

#: ``precision`` -> OpenVINO's INFERENCE_PRECISION_HINT
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


def require_openvino() -> Any:
    """The ``openvino`` module, or one line saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise ConfigError("the openvino backend needs OpenVINO: pip install 'modalseg[openvino]'") from None
    return openvino


class OpenVinoBackend(GraphBackend):
    """Exported graphs (one, or one per unpaired modality index) compiled by OpenVINO for the CPU."""

    def __init__(
        self, graphs: Mapping[int | None, str | Path], *, size_multiple: int = 1, min_size: int = 1,
        threads: int | None = None, precision: str = "fp32",
    ) -> None:
        if precision not in OPENVINO_PRECISIONS:
            raise ConfigError(f"openvino precision must be {' or '.join(OPENVINO_PRECISIONS)}, got {precision!r}")
        ov = require_openvino()
        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.size_multiple, self.min_size = int(size_multiple), int(min_size)
        self.compiled = {key: core.compile_model(core.read_model(str(path)), "CPU", config)
                         for key, path in graphs.items()}
        self.requests = {key: c.create_infer_request() for key, c in self.compiled.items()}
        self.label = f"openvino {precision}"

    def __call__(self, x: np.ndarray, modality: int | None, window: Window) -> np.ndarray:
        request = self.graph_for(self.requests, modality)
        request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return self.crop(request.get_output_tensor(0).data, window)
