"""Optional int8 post-training quantization of exported graphs (``modalseg export --int8 --calibration-data DS``).

ONNX Runtime's static quantizer (``onnxruntime.quantization.quantize_static``): QDQ format, int8 weights per output
channel, uint8 activations whose ranges are the minimum/maximum seen on calibration slices (MinMax). The calibration
slices are training slices of the given dataset put through exactly what ``modalseg predict`` does before the
network (the checkpoint's reorientation, normalisation, crop, resize and the graph's zero padding): a recording
backend inside :class:`modalseg.inference.Predictor` collects them, so there is no second copy of the preprocessing.

Deviation from the quantizer's defaults: ``per_channel=True`` (the default is per tensor: the networks' folded
convolutions have very different ranges per output channel) and uint8 activations (its default int8 activations
need a symmetric range, which the non-negative post-ReLU activations would waste half of). The graph's final softmax
(sigmoid) stays float (quantizing probabilities would round them to multiples of 1/255).

Each quantized graph is compared with its fp32 graph on the calibration slices (label agreement and the largest
probability difference go into the card). Imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modalseg.errors import ConfigError, DataError

if TYPE_CHECKING:
    from modalseg.training.model_meta import ModelMeta

__all__ = ["RecordingBackend", "calibration_batches", "label_agreement", "quantize_graph"]


class RecordingBackend:
    """A backend that keeps every network input it is given (and answers uniform probabilities): the inputs
    ``modalseg predict`` would feed the graph, for calibration."""

    def __init__(self, num_classes: int, size_multiple: int, min_size: int) -> None:
        self.num_classes, self.size_multiple, self.min_size = num_classes, size_multiple, min_size
        self.inputs: list[np.ndarray] = []

    def session(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def __call__(self, x: np.ndarray, modality: int | None, window: tuple[int, int, int, int]) -> np.ndarray:
        self.inputs.extend(np.array(s[None]) for s in x)
        _, height, _, width = window
        return np.full((len(x), self.num_classes, height, width), 1.0 / self.num_classes, np.float32)


def calibration_batches(
    dataset: str | Path, meta: ModelMeta, *, size_multiple: int, min_size: int, limit: int = 64, seed: int = 0,
) -> dict[str | None, list[np.ndarray]]:
    """Up to ``limit`` network inputs (1, C, H, W) per graph (``None``: a paired model's; else an unpaired
    modality's), slices of the dataset's training cases drawn at random (``seed``) after predict's preprocessing."""
    from modalseg.data.layouts import load_dataset
    from modalseg.inference.inferers import SliceInferer
    from modalseg.inference.predictor import LoadedModel, Predictor

    spec = load_dataset(dataset)
    branches: list[str | None] = [None] if meta.kind == "paired" else list(meta.modalities)
    rng = np.random.default_rng(seed)
    out: dict[str | None, list[np.ndarray]] = {}
    for branch in branches:
        if branch is None:
            missing = [m for m in meta.modalities if m not in spec.modalities]
            if missing:
                raise DataError(f"calibration data has no modality {missing[0]} (its channels: "
                                f"{', '.join(spec.modalities)})", spec.root)
            cases = [[c.images[spec.modalities.index(m)] for m in meta.modalities] for c in spec.cases]
        else:
            cases = [[c.images[0]] for c in spec.cases if (c.modality or spec.modalities[0]) == branch]
        if not cases:
            raise DataError(f"calibration data has no case of modality {branch}", spec.root)
        recorder = RecordingBackend(meta.num_classes, size_multiple, min_size)
        predictor = Predictor([LoadedModel(recorder, meta, Path(dataset))], inferer=SliceInferer(batch_size=8))
        order = rng.permutation(len(cases))
        for k in order:
            with contextlib.redirect_stdout(io.StringIO()):  # "resampled onto ..." lines: not the export's
                predictor.predict_files(cases[k], modality=branch)
            if len(recorder.inputs) >= 4 * limit:
                break
        picks = rng.permutation(len(recorder.inputs))[:limit]
        out[branch] = [recorder.inputs[i] for i in sorted(picks)]
    return out


@contextlib.contextmanager
def _restore_level(logger: logging.Logger, level: int) -> Iterator[None]:
    try:
        yield
    finally:
        logger.setLevel(level)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of inputs."""

    def __init__(self, name: str, batches: Sequence[np.ndarray]) -> None:
        self._it: Iterator[np.ndarray] = iter(batches)
        self.name = name

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {self.name: x}


def label_agreement(fp32: bytes, int8: bytes, batches: Sequence[np.ndarray], activation: str = "softmax"
                    ) -> tuple[float, float]:
    """(fraction of pixels whose label agrees, largest probability difference) of two graphs on ``batches``: the
    argmax for softmax graphs; for sigmoid (region) graphs every region's probability > 0.5 must agree."""
    from modalseg.deploy.onnx_backend import require_onnxruntime, session_options

    ort = require_onnxruntime()
    a = ort.InferenceSession(fp32, session_options(), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(int8, session_options(), providers=["CPUExecutionProvider"])
    name = a.get_inputs()[0].name
    same = total = 0
    worst = 0.0
    for x in batches:
        pa, pb = a.run(None, {name: x})[0], b.run(None, {name: x})[0]
        if activation == "sigmoid":
            same += int(((pa > 0.5) == (pb > 0.5)).all(axis=1).sum())
        else:
            same += int((pa.argmax(1) == pb.argmax(1)).sum())
        total += pa[:, 0].size
        worst = max(worst, float(np.abs(pa - pb).max()))
    return same / max(total, 1), worst


def quantize_graph(data: bytes, batches: Sequence[np.ndarray], *, source: str | Path | None = None,
                   activation: str = "softmax") -> tuple[bytes, dict[str, Any]]:
    """(int8 graph, report) of an fp32 graph, calibrated on ``batches`` (see the module docstring)."""
    from modalseg.deploy.onnx_backend import require_onnxruntime

    require_onnxruntime()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not batches:
        raise ConfigError("int8 quantization needs calibration slices", source)
    import onnx

    model = onnx.load_from_string(data)
    name = model.graph.input[0].name
    final = [n.name for n in model.graph.node if n.op_type in ("Softmax", "Sigmoid")][-1:]  # the output's
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # the quantizer's advice lines (pre-processing) on the root logger
    with tempfile.TemporaryDirectory(prefix="modalseg-int8-") as tmp, contextlib.redirect_stdout(io.StringIO()), \
            _restore_level(root_logger, level):
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(data)
        quantize_static(str(src), str(dst), _Reader(name, batches), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=final)
        quantized = dst.read_bytes()
    agreement, worst = label_agreement(data, quantized, batches, activation)
    return quantized, {
        "method": "onnxruntime quantize_static: QDQ, int8 weights per channel, uint8 activations, MinMax "
                  "calibration; the final softmax (sigmoid) kept in float",
        "calibration_slices": len(batches),
        "label_agreement": agreement,
        "max_abs_diff": worst,
        "fp32_sha256": hashlib.sha256(data).hexdigest(),
    }
