"""Optional int8 post-training quantization of exported graphs (``modalseg export --int8 --calibration-data DS``).

ONNX Runtime's static quantizer (``onnxruntime.quantization.quantize_static``): QDQ format, int8 weights per output
channel, uint8 activations whose ranges come from calibration slices. The calibration
slices are training slices of the given dataset put through exactly what ``modalseg predict`` does before the
network (the checkpoint's reorientation, normalisation, crop, resize and the graph's zero padding): a recording
backend inside :class:`modalseg.inference.Predictor` collects them, so there is no second copy of the preprocessing.

Deviation from the quantizer's defaults: ``per_channel=True`` (the default is per tensor: the networks' folded
convolutions have very different ranges per output channel) and uint8 activations (its default int8 activations
need a symmetric range, which the non-negative post-ReLU activations would waste half of). The graph's final softmax
(sigmoid) stays float (quantizing probabilities would round them to multiples of 1/255).

Activation ranges (``method``): ``percentile`` clips each activation's range to the 99.99th percentile of its
calibration values (``CalibPercentile`` 99.99; the quantizer's own default percentile is 99.999); ``minmax`` (the
quantizer's default method) takes the full range seen; ``auto`` (ours) quantizes with both and keeps the graph
whose labels agree most with the fp32 graph's on check slices, training slices not used for calibration (see
:func:`quantize_graph`).

Each quantized graph is compared with its fp32 graph on the check slices (label agreement, the largest and the
mean probability difference go into the card, for every method tried). Imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modalseg.errors import ConfigError, DataError

if TYPE_CHECKING:
    from modalseg.training.model_meta import ModelMeta

__all__ = ["CALIBRATION_METHODS", "CalibrationSlices", "RecordingBackend", "UniformBackend", "calibration_batches",
           "check_calibration_method", "label_agreement", "quantize_graph"]

#: activation-range rules of the calibration (see the module docstring); ``auto`` (the default) tries the others
CALIBRATION_METHODS = ("auto", "percentile", "minmax")
#: the percentile of ``percentile`` calibration (ONNX Runtime's own default: 99.999)
CALIBRATION_PERCENTILE = 99.99


def check_calibration_method(method: str, what: str = "--calibration-method") -> None:
    """One line naming ``what`` unless ``method`` is one of :data:`CALIBRATION_METHODS`."""
    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"{what} must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")


class UniformBackend:
    """A backend that answers uniform probabilities at once, for slices ``(N, C, H, W)`` and 3D windows
    ``(N, C, D, H, W)`` alike: predict with it runs everything but a network."""

    def __init__(self, num_classes: int, size_multiple: int = 1, min_size: int = 1) -> None:
        self.num_classes, self.size_multiple, self.min_size = num_classes, size_multiple, min_size

    def session(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def __call__(self, x: np.ndarray, modality: int | None, window: tuple[int, int, int, int]) -> np.ndarray:
        _, height, _, width = window
        depth = tuple(x.shape[2:-2])  # 3D windows: (N, C, D, H, W)
        return np.full((len(x), self.num_classes, *depth, height, width), 1.0 / self.num_classes, np.float32)


class RecordingBackend(UniformBackend):
    """A :class:`UniformBackend` that keeps every network input it is given: the inputs ``modalseg predict`` would
    feed the graph, for calibration."""

    def __init__(self, num_classes: int, size_multiple: int, min_size: int) -> None:
        super().__init__(num_classes, size_multiple, min_size)
        self.inputs: list[np.ndarray] = []

    def __call__(self, x: np.ndarray, modality: int | None, window: tuple[int, int, int, int]) -> np.ndarray:
        self.inputs.extend(np.array(s[None]) for s in x)
        return super().__call__(x, modality, window)


@dataclass
class CalibrationSlices:
    """Network inputs (1, C, H, W) of one graph: ``calibrate`` sets the activation ranges, ``check`` (other slices
    of the same cases) chooses between calibration methods and measures the result."""

    calibrate: list[np.ndarray]
    check: list[np.ndarray]


def calibration_batches(
    dataset: str | Path, meta: ModelMeta, *, size_multiple: int, min_size: int, limit: int = 64, check: int = 0,
    seed: int = 0,
) -> dict[str | None, CalibrationSlices]:
    """Up to ``limit`` calibration and ``check`` further network inputs per graph (``None``: a paired model's;
    else an unpaired modality's), slices of the dataset's training cases drawn at random (``seed``) after
    predict's preprocessing. With fewer slices than asked, the check set gets at most a third of them."""
    from modalseg.data.layouts import load_dataset
    from modalseg.inference.inferers import inferer_for
    from modalseg.inference.predictor import LoadedModel, Predictor

    spec = load_dataset(dataset)
    branches: list[str | None] = [None] if meta.kind == "paired" else list(meta.modalities)
    rng = np.random.default_rng(seed)
    out: dict[str | None, CalibrationSlices] = {}
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
        # the model's own inferer: a 2.5D graph is calibrated on slices with their neighbours as channels
        predictor = Predictor([LoadedModel(recorder, meta, Path(dataset))], inferer=inferer_for(meta, 8))
        order = rng.permutation(len(cases))
        for k in order:
            with contextlib.redirect_stdout(io.StringIO()):  # "resampled onto ..." lines: not the export's
                predictor.predict_files(cases[k], modality=branch)
            if len(recorder.inputs) >= 4 * (limit + check):
                break
        n = len(recorder.inputs)
        n_check = min(check, n // 3)
        picks = rng.permutation(n)[:min(limit, n - n_check) + n_check]
        out[branch] = CalibrationSlices([recorder.inputs[i] for i in sorted(picks[n_check:])],
                                        [recorder.inputs[i] for i in sorted(picks[:n_check])])
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
    agreement, worst, _ = _agreement(_outputs(fp32, batches), int8, batches, activation)
    return agreement, worst


def _outputs(graph: bytes, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The graph's probabilities on each of ``batches`` (ONNX Runtime, CPU)."""
    from modalseg.deploy.onnx_backend import require_onnxruntime, session_options

    ort = require_onnxruntime()
    session = ort.InferenceSession(graph, session_options(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [session.run(None, {name: x})[0] for x in batches]


def _agreement(reference: Sequence[np.ndarray], int8: bytes, batches: Sequence[np.ndarray], activation: str
               ) -> tuple[float, float, float]:
    """:func:`label_agreement` of ``int8`` against the fp32 graph's outputs ``reference`` on ``batches`` (computed
    once for every method tried), and the mean absolute probability difference."""
    same = total = 0
    worst = summed = 0.0
    for pa, pb in zip(reference, _outputs(int8, batches), strict=True):
        if activation == "sigmoid":
            same += int(((pa > 0.5) == (pb > 0.5)).all(axis=1).sum())
        else:
            same += int((pa.argmax(1) == pb.argmax(1)).sum())
        total += pa[:, 0].size
        difference = np.abs(pa - pb)
        worst, summed = max(worst, float(difference.max())), summed + float(difference.sum(dtype=np.float64))
    classes = reference[0].shape[1] if len(reference) else 1
    return same / max(total, 1), worst, summed / max(total * classes, 1)


def _quantize(data: bytes, batches: Sequence[np.ndarray], method: str) -> tuple[bytes, str]:
    """(int8 graph, the rule in words) of ``data`` calibrated on ``batches`` with one concrete ``method``."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method == "percentile":
        calibrate, extra, rule = CalibrationMethod.Percentile, {"CalibPercentile": CALIBRATION_PERCENTILE}, \
            f"Percentile calibration ({CALIBRATION_PERCENTILE} %)"
    else:
        calibrate, extra, rule = CalibrationMethod.MinMax, {}, "MinMax calibration"
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
                        calibrate_method=calibrate, nodes_to_exclude=final, extra_options=extra)
        return dst.read_bytes(), rule


def quantize_graph(data: bytes, batches: Sequence[np.ndarray], *, check: Sequence[np.ndarray] = (),
                   source: str | Path | None = None, activation: str = "softmax",
                   method: str = CALIBRATION_METHODS[0]) -> tuple[bytes, dict[str, Any]]:
    """(int8 graph, report) of an fp32 graph, calibrated on ``batches`` with ``method`` (see the module
    docstring) and measured against the fp32 graph on ``check`` (other slices; the calibration slices without).

    ``auto`` quantizes with every method and keeps the graph whose labels agree most with fp32's on ``check``
    (ties: the smaller mean probability difference); a method the quantizer cannot apply (percentile histograms of
    an activation that is constant on every calibration slice, as in some untrained networks) is skipped and named
    in the report. Which method calibrates best differs between trained
    models: on one master_assistant percentile ranges kept 99.985 % of fp32's labels and MinMax 99.979 %, on
    another MinMax 99.992 % and percentile 99.990 % (docs/deployment.md), so the export measures instead of
    guessing; the report lists every method's figures.
    """
    from modalseg.deploy.onnx_backend import require_onnxruntime

    check_calibration_method(method, "the calibration method")
    require_onnxruntime()
    if not batches:
        raise ConfigError("int8 quantization needs calibration slices", source)
    measured_on = list(check) if check else list(batches)
    candidates = [m for m in CALIBRATION_METHODS if m != "auto"] if method == "auto" else [method]
    reference = _outputs(data, measured_on)
    tried: dict[str, dict[str, Any]] = {}
    graphs: dict[str, tuple[bytes, str]] = {}
    failed: dict[str, str] = {}
    for candidate in candidates:
        try:
            graphs[candidate] = _quantize(data, batches, candidate)
        except (ValueError, RuntimeError) as exc:  # e.g. percentile histograms of a (near-)constant activation
            failed[candidate] = f"{type(exc).__name__}: {exc}"[:200]
            continue
        agreement, worst, mean = _agreement(reference, graphs[candidate][0], measured_on, activation)
        tried[candidate] = {"label_agreement": agreement, "max_abs_diff": worst, "mean_abs_diff": mean}
    if not tried:
        reason = "; ".join(f"{m}: {why}" for m, why in failed.items())
        other = " (try --calibration-method minmax)" if method == "percentile" else ""
        raise ConfigError(f"int8 calibration failed{other}: {reason}", source)
    chosen = max(tried, key=lambda m: (tried[m]["label_agreement"], -tried[m]["mean_abs_diff"]))
    quantized, rule = graphs[chosen]
    return quantized, {
        "method": f"onnxruntime quantize_static: QDQ, int8 weights per channel, uint8 activations, {rule}; "
                  "the final softmax (sigmoid) kept in float",
        "calibration_method": chosen,
        "requested_method": method,
        "calibration_slices": len(batches),
        "check_slices": len(check),
        "measured_on": "check slices (training slices not used for calibration)" if check else
                       "the calibration slices (too few slices for a separate check set)",
        **tried[chosen],
        "methods": tried,
        **({"failed_methods": failed} if failed else {}),
        "fp32_sha256": hashlib.sha256(data).hexdigest(),
    }
