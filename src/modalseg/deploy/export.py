"""``modalseg export``: trained checkpoints -> ONNX graphs computing class probabilities, and a model card.

The networks are loaded exactly as ``modalseg predict`` loads them (:func:`modalseg.inference.predictor.load_models`:
weights checked, BN folded into the convolutions, fp32 on the CPU), wrapped so that the graph ends in the softmax
(sigmoid for region-based models; the runtime then needs no torch: the fold mean and the argmax are NumPy), and
exported with dynamic batch, height and width. Unpaired networks give one graph per modality: their
modality-specific BN sets make branches, and each graph is the backbone with one set selected.

Exporter: PyTorch's TorchScript-based exporter (``dynamo=False``, opset 17) first, because it exports these
networks in well under a second; networks it cannot express go through ``torch.export`` (``dynamo=True``, opset 18,
needs onnxscript), ten times slower: FuseNet (its max-unpooling with the encoder's indices fails in the tracer) and
fuse_origin_unet (tracing freezes the ``output_size`` arithmetic of its transposed convolutions, so odd sides break;
the check below finds it). The card says which exporter made each graph. Every graph is checked before anything is
written: ONNX Runtime and torch on random inputs of two sizes (:func:`check_shapes`) must agree to
:data:`CHECK_TOLERANCE` (the measured difference is in the card).

The export folder is written atomically: everything is built in a temporary folder beside it and moved in, the
card last; an output folder that holds another export, or a file the export would replace, is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modalseg import __version__
from modalseg.deploy.card import CARD_NAME, FORMAT, VERSION, describe_preprocessing
from modalseg.deploy.onnx_backend import require_onnxruntime, session_options
from modalseg.errors import CheckpointError, ConfigError, OutputError

__all__ = ["CHECK_TOLERANCE", "EXPORT_FORMATS", "ExportedGraph", "ProbabilityGraph", "export_graph", "export_run"]

EXPORT_FORMATS = ("onnx",)
#: Largest |probability difference| between ONNX Runtime and torch accepted for an fp32 graph (measured: 1e-7 to
#: 1e-5 on the registered models at width 4).
CHECK_TOLERANCE = 1e-3
TORCHSCRIPT_OPSET = 17
DYNAMO_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"


class ProbabilityGraph(nn.Module):
    """What an exported graph computes, in float32: ``softmax(network(x), dim=1)``, or for a region-based model
    (``activation="sigmoid"``, ``ModelMeta.regions``) one sigmoid per output channel, as the torch backend does."""

    def __init__(self, network: nn.Module, activation: str = "softmax") -> None:
        super().__init__()
        if activation not in ("softmax", "sigmoid"):
            raise ConfigError(f"activation must be softmax or sigmoid, got {activation!r}")
        self.network = network
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.network(x).float()
        return torch.sigmoid(logits) if self.activation == "sigmoid" else torch.softmax(logits, dim=1)


@dataclass
class ExportedGraph:
    """One exported graph: its bytes, the exporter that made it and the checked agreement with torch."""

    data: bytes
    exporter: str
    opset: int
    max_abs_diff: float
    check_shapes: list[list[int]] = field(default_factory=list)
    #: the sides the graph is right for: the network's own rule, or a stricter one (see :func:`export_graph`)
    size_multiple: int = 1


def _example_side(size_multiple: int, min_size: int, at_least: int = 64) -> int:
    """The smallest valid side >= ``at_least`` (a multiple of ``size_multiple``, >= ``min_size``)."""
    side = max(at_least, min_size)
    return side + (-side) % size_multiple


def check_shapes(channels: int, size_multiple: int, min_size: int, spatial_dims: int = 2) -> list[tuple[int, ...]]:
    """Two valid input shapes that differ in batch, height and width, the second with odd multiples of
    ``size_multiple`` (odd sides when it is 1): a graph that froze a size, or the arithmetic a decoder does for sides
    that do not halve evenly (e.g. a transposed convolution's ``output_size``), fails the check. 3D: two volumes
    that differ in batch, depth and width (sides one multiple apart: 3D inputs grow with the cube)."""
    if spatial_dims == 3:
        side = _example_side(size_multiple, min_size, at_least=16)
        return [(2, channels, side, side, side), (1, channels, side + size_multiple, side, side + size_multiple)]
    side = _example_side(size_multiple, min_size)
    return [(2, channels, side, side), (1, channels, side + 13 * size_multiple, side + 7 * size_multiple)]


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' warnings, progress prints and log lines would break the one-line-per-step output."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _dynamic_axes(example: torch.Tensor) -> dict[int, str]:
    """Batch and every spatial axis dynamic: (N, C, H, W) or (N, C, D, H, W)."""
    names = ["height", "width"] if example.dim() == 4 else ["depth", "height", "width"]
    return {0: "batch", **{2 + k: n for k, n in enumerate(names)}}


def _torchscript_export(module: nn.Module, example: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    axes = _dynamic_axes(example)
    torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=TORCHSCRIPT_OPSET,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes}, do_constant_folding=True)
    return buf.getvalue()


def _dynamo_export(module: nn.Module, example: torch.Tensor) -> bytes:
    auto = torch.export.Dim.AUTO
    program = torch.onnx.export(module, (example,), dynamo=True, opset_version=DYNAMO_OPSET,
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=({k: auto for k in _dynamic_axes(example)},), optimize=True,
                                verify=False,
                                report=False)
    return program.model_proto.SerializeToString()


def _max_difference(graph: bytes, module: nn.Module, shapes: Sequence[tuple[int, ...]], seed: int = 0) -> float:
    """max |ONNX Runtime - torch| over random N(0, 1) inputs of ``shapes`` (N(0, 1): z-scored intensities)."""
    ort = require_onnxruntime()
    options = session_options()
    options.log_severity_level = 4  # a graph failing the check is reported in the exception, not on stderr
    sess = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = 0.0
    for shape in shapes:
        x = rng.standard_normal(shape).astype(np.float32)
        with torch.no_grad():
            ref = module(torch.from_numpy(x)).numpy()
        out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        if out.shape != ref.shape:
            raise ValueError(f"output shape {out.shape} for input {shape}, torch gives {ref.shape}")
        worst = max(worst, float(np.abs(out - ref).max()))
    return worst


def _attempt(name: str, module: nn.Module, channels: int, size_multiple: int, min_size: int, spatial_dims: int = 2
             ) -> tuple[ExportedGraph | None, str, bool]:
    """(graph or None, the problem, whether a graph was built) of one exporter under one size rule."""
    if name == "dynamo":
        try:
            import onnxscript  # noqa: F401  (torch.export's ONNX translation needs it)
        except ImportError:
            return None, "dynamo: needs onnxscript (pip install 'modalseg[export]')", False
    shapes = check_shapes(channels, size_multiple, min_size, spatial_dims)
    try:
        with _quiet(), torch.no_grad():
            data = (_torchscript_export if name == "torchscript" else _dynamo_export)(module, torch.randn(*shapes[0]))
    except Exception as exc:  # noqa: BLE001  (any exporter failure: the next one is tried, all are reported)
        return None, f"{name}: {_short(exc)}", False
    try:
        diff = _max_difference(data, module, shapes)
    except Exception as exc:  # noqa: BLE001  (the graph does not run at the second size)
        return None, f"{name}: {_short(exc)}", True
    if not diff <= CHECK_TOLERANCE:
        return None, f"{name}: ONNX Runtime and torch differ by {diff:.3g} (> {CHECK_TOLERANCE:g})", True
    opset = TORCHSCRIPT_OPSET if name == "torchscript" else DYNAMO_OPSET
    return ExportedGraph(data, name, opset, diff, [list(t) for t in shapes], size_multiple), "", True


def export_graph(
    network: nn.Module, channels: int, *, size_multiple: int = 1, min_size: int = 1, exporter: str = "auto",
    source: str | Path | None = None, activation: str = "softmax", spatial_dims: int = 2,
) -> ExportedGraph:
    """An eval-mode ``network`` (logits) as an ONNX graph of its probabilities (``activation``: softmax, or sigmoid
    for region-based models), dynamic in batch, height and width,
    checked against torch (:data:`CHECK_TOLERANCE`). ``exporter``: ``auto`` (TorchScript, then torch.export where it
    fails), ``torchscript`` or ``dynamo``. Failures are one :class:`CheckpointError` naming ``source``.

    Where neither exporter gives a graph that is right for every side the network accepts, a TorchScript graph that
    is right for sides that are multiples of a power of two (up to 64) is returned with that stricter
    ``size_multiple`` (fuse_origin_unet: ONNX's ConvTranspose has no size-dependent ``output_padding``); the runtime
    then zero-pads slices to it, so its results equal torch's only for slices of such sides.
    """
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ConfigError(f"exporter must be auto, torchscript or dynamo, got {exporter!r}")
    module = ProbabilityGraph(network, activation).eval()
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    problems = []
    retry = False
    for name in order:
        graph, problem, built = _attempt(name, module, channels, size_multiple, min_size, spatial_dims)
        if graph is not None:
            return graph
        problems.append(problem)
        retry = retry or (built and name == "torchscript")
    stricter = size_multiple * 2
    while retry and stricter <= 64:
        graph, _, _ = _attempt("torchscript", module, channels, stricter, min_size, spatial_dims)
        if graph is not None:
            return graph
        stricter *= 2
    raise CheckpointError(f"cannot export the network to ONNX ({'; '.join(problems)})", source)


def _fold_name(ckpt: Path) -> str:
    """``fold_3`` for ``.../fold_3/best.pt`` (also ``fold_all``), else the checkpoint's file stem."""
    parent = ckpt.parent.name
    return parent if re.fullmatch(r"fold_(\d+|all)", parent) else ckpt.stem


def _versions(exporters: set[str]) -> dict[str, str]:
    import importlib.metadata as md

    out = {"modalseg": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__}
    for dist in ("onnx", "onnxruntime", *(["onnxscript"] if "dynamo" in exporters else [])):
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out


def check_export_folder(output: Path) -> None:
    """Refuse (one line) an output that is not a usable folder or already holds an export."""
    from modalseg.utils.atomic import check_output_folder

    check_output_folder(output)
    if (output / CARD_NAME).exists():
        raise OutputError(f"refused: the folder holds another export ({CARD_NAME}); choose another --output",
                          output)


def _refuse_overwrite(output: Path, names: Sequence[str]) -> None:
    existing = [n for n in names if (output / n).exists() or (output / n).is_symlink()]
    if existing:
        raise OutputError(f"refused: the export would overwrite {existing[0]}; choose another --output", output)


def _write_folder(output: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (name -> bytes; the card last in the dict) into ``output`` atomically: built in a temporary
    folder beside it, then renamed (a new or empty output) or moved in file by file, the card last."""
    from modalseg.utils.atomic import atomic_write_bytes, make_temp_folder

    parent = output.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder ({exc.strerror or exc})", parent) from None
    _refuse_overwrite(output, files)
    if output.is_dir() and not any(output.iterdir()):
        output.rmdir()  # an empty folder is replaced by the finished one below
    if not output.exists():
        tmp = make_temp_folder(parent)
        try:
            for name, data in files.items():
                atomic_write_bytes(tmp / name, data)
            os.rename(tmp, output)
        except OSError as exc:
            raise OutputError(f"cannot write the export ({exc.strerror or exc})", output) from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return
    written: list[Path] = []
    try:
        for name, data in files.items():  # each file atomic; the card (last) makes the folder an export
            atomic_write_bytes(output / name, data)
            written.append(output / name)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise


def export_run(
    model: str | Path, output: str | Path, *, which: str = "best", fmt: str = "onnx", exporter: str = "auto",
    int8_calibration: str | Path | None = None, calibration_slices: int = 64, calibration_method: str = "auto",
    echo: bool = True,
) -> Path:
    """Export a run folder (every fold), a fold folder or a checkpoint to ``output``; returns the card's path.

    ``int8_calibration``: a dataset whose training slices calibrate an int8 post-training quantization of every
    graph (:mod:`modalseg.deploy.quantize`; activation ranges by ``calibration_method``); off by default. ``echo``
    prints one line per graph.
    """
    from modalseg.inference.predictor import load_models
    from modalseg.training.precision import resolve_precision

    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be {' or '.join(EXPORT_FORMATS)}, got {fmt!r}")
    from modalseg.deploy.quantize import check_calibration_method

    check_calibration_method(calibration_method)  # before any export work
    model, output = Path(model), Path(output)
    check_export_folder(output)
    require_onnxruntime()  # every graph is checked with it before anything is written
    fp32 = resolve_precision(torch.device("cpu"), "fp32")
    models = load_models([model], fp32, device="cpu", which=which)
    meta = models[0].meta
    spatial_dims = 3 if meta.patch_size else 2  # 3D: graphs of windows (N, C, D, H, W); the inferer is the card's
    base = model if model.is_dir() else model.parent
    size_multiple, min_size = models[0].backend.size_multiple, models[0].backend.min_size
    channels = meta.in_channels * (len(meta.modalities) if meta.kind == "paired" else 1)
    branches: list[str | None] = [None] if meta.kind == "paired" else list(meta.modalities)
    activation = getattr(meta, "activation", "softmax")  # sigmoid: a region-based model (ModelMeta.regions)
    calibration = None
    files: dict[str, bytes] = {}
    graph_multiple = size_multiple
    folds = []
    used: set[str] = set()
    exporters: set[str] = set()
    names = []
    for m in models:
        name = _fold_name(m.path)
        while name in used:
            name += "_"
        used.add(name)
        names.append(name)
    planned = [f"{n}.onnx" if b is None else f"{n}.{b}.onnx" for n in names for b in branches]
    _refuse_overwrite(output, [*planned, CARD_NAME])  # before any export work
    for m, name in zip(models, names, strict=True):
        graphs = []
        for index, branch in enumerate(branches):
            network = m.network if branch is None else m.network.network(index)
            graph = export_graph(network, channels, size_multiple=size_multiple, min_size=min_size,
                                 exporter=exporter, source=m.path, activation=activation, spatial_dims=spatial_dims)
            exporters.add(graph.exporter)
            graph_multiple = max(graph_multiple, graph.size_multiple)
            file = f"{name}.onnx" if branch is None else f"{name}.{branch}.onnx"
            entry: dict[str, Any] = {"modality": branch, "file": file, "exporter": graph.exporter,
                                     "opset": graph.opset, "check": {"max_abs_diff": graph.max_abs_diff,
                                                                     "input_shapes": graph.check_shapes}}
            data = graph.data
            if int8_calibration is not None:
                from modalseg.deploy.quantize import calibration_batches, quantize_graph

                if calibration is None:  # once, with the graphs' size rule (all graphs share the architecture)
                    calibration = calibration_batches(int8_calibration, meta, size_multiple=graph.size_multiple,
                                                      min_size=min_size, limit=calibration_slices,
                                                      check=calibration_slices)

                data, report = quantize_graph(data, calibration[branch].calibrate, check=calibration[branch].check,
                                              source=m.path, activation=activation, method=calibration_method)
                entry["int8"] = report
            files[file] = data
            entry["sha256"] = hashlib.sha256(data).hexdigest()
            entry["bytes"] = len(data)
            graphs.append(entry)
            if echo:
                extra = (f", int8 ({entry['int8']['calibration_method']} calibration) labels agree "
                         f"{entry['int8']['label_agreement']:.4%}") if "int8" in entry else ""
                if graph.size_multiple != size_multiple:
                    extra += (f", sides must be multiples of {graph.size_multiple} (torch: {size_multiple}; other "
                              "slices are zero-padded, changing the result near their border)")
                print(f"{file}: {graph.exporter} exporter, opset {graph.opset}, max |onnxruntime - torch| "
                      f"{graph.max_abs_diff:.2g}{extra}, {len(data) / 1e6:.2f} MB", flush=True)
        folds.append({"name": name, "checkpoint": os.path.relpath(m.path, base), "epoch": m.epoch,
                      "best_score": m.best_score, "graphs": graphs})
    card = build_card(meta.to_dict(), folds, size_multiple=graph_multiple, min_size=min_size, channels=channels,
                      torch_size_multiple=size_multiple,
                      software=_versions(exporters), precision="int8" if int8_calibration is not None else "fp32",
                      checkpoint=which)
    files[CARD_NAME] = (json.dumps(card, indent=2, sort_keys=False) + "\n").encode("utf-8")
    _write_folder(output, files)
    return output / CARD_NAME


def build_card(
    meta: dict[str, Any], folds: list[dict[str, Any]], *, size_multiple: int, min_size: int, channels: int,
    software: dict[str, str], precision: str = "fp32", checkpoint: str = "best", torch_size_multiple: int | None = None,
) -> dict[str, Any]:
    """The ``model.json`` dictionary (see :mod:`modalseg.deploy.card` for the fields)."""
    kind, modalities = meta["kind"], list(meta["modalities"])
    labels = dict(meta["labels"])
    regions = meta.get("regions")
    context = int(meta.get("context_slices") or 0)  # 2.5D: neighbours of each slice as channels
    patch = list(meta.get("patch_size") or [])  # 3D: the sliding window
    spatial = ["depth", "height", "width"] if patch else ["height", "width"]
    if regions is None:
        values = "softmax probabilities over axis 1"
        rule = ("mean of softmax probabilities over the folds' graphs, then argmax over classes; class index k -> "
                "label value labels[k]")
    else:
        values = "sigmoid probability per region (independent channels; no background channel)"
        rule = ("mean of sigmoid probabilities over the folds' graphs; then, on background 0, each region in "
                "'labels' order painted with its value where its probability > 0.5 (a later region overwrites an "
                "earlier one: nnU-Net's regions_class_order)")
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": meta["model"],
        "kind": kind,
        "setting": meta.get("setting"),
        "precision": precision,
        "checkpoint": checkpoint,
        "modalities": modalities,
        "channel_names": list(meta.get("channel_names") or modalities),
        "labels": labels,
        "input": {
            "name": INPUT_NAME, "dtype": "float32", "layout": "NCDHW" if patch else "NCHW",
            "shape": ["batch", channels, *spatial],
            "channels": (modalities if kind == "paired" else ["one image of the chosen modality"]) if not context
            else [f"{m} slice d{j:+d}" if j else f"{m} slice d" for m in (modalities if kind == "paired"
                                                                           else ["the chosen modality"])
                  for j in range(-context, context + 1)],
            **({"context_slices": context} if context else {}),
            **({"patch_size": patch,
                "windows": "the volume (N slices, C, H, W as (C, D, H, W)) is covered by windows of patch_size "
                           "(MONAI sliding_window_inference: overlap 0.5, a step of int(0.5 x side), the last window "
                           "flush with the end, a volume smaller than a window zero-padded centred); each window's "
                           "probabilities are weighted by a Gaussian (sigma 1/8 of the side, floored at 1e-3) and "
                           "the weighted sum divided by the summed weights"} if patch else {}),
            "size_multiple": size_multiple, "min_size": min_size,
            "padding": f"zeros, centred (the odd pixel after), to sides >= {min_size} and multiples of "
                       f"{size_multiple}; the output is cropped back",
            "graph_per": "fold" if kind == "paired" else "fold and modality (modality-specific batch norm)",
            **({"torch_size_multiple": torch_size_multiple,
                "note": f"the torch network accepts sides that are multiples of {torch_size_multiple}; the graphs are "
                        f"right only for multiples of {size_multiple}, so other slices are zero-padded and their "
                        "results differ from torch's near the border"}
               if torch_size_multiple not in (None, size_multiple) else {}),
        },
        "output": {
            "name": OUTPUT_NAME, "dtype": "float32", "layout": "NKDHW" if patch else "NKHW",
            "shape": ["batch", len(labels), *spatial],
            "values": values, "classes": list(labels),
            **({"regions": regions} if regions is not None else {}),
        },
        "ensemble": {"rule": rule, "folds": len(folds)},
        "preprocessing": describe_preprocessing(meta["preprocess"], kind=kind, modalities=modalities,
                                                channel_names=meta.get("channel_names"),
                                                size_multiple=size_multiple, min_size=min_size,
                                                regions=regions is not None, context_slices=context,
                                                patch_size=patch or None),
        "folds": folds,
        "software": software,
        "model_meta": meta,
    }
