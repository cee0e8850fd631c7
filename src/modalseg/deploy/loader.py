"""An export folder as models for :class:`modalseg.inference.Predictor`: one ONNX Runtime or OpenVINO backend per
fold (holding the fold's graph or, unpaired, one graph per modality), each graph checked against the card's SHA-256.
Imports no torch (the runtime's loader; ``modalseg predict --backend onnxruntime|openvino`` uses it too).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from modalseg.deploy.card import ExportCard, read_card
from modalseg.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from modalseg.inference.predictor import LoadedModel
    from modalseg.training.model_meta import ModelMeta

__all__ = ["RUNTIME_BACKENDS", "describe_backend", "load_export"]

RUNTIME_BACKENDS = ("onnxruntime", "openvino")


def _meta(card: ExportCard) -> ModelMeta:
    """The card's model description as the checkpoint's ModelMeta (plain data)."""
    from modalseg.training.model_meta import ModelMeta

    try:
        return ModelMeta.from_dict(card.model_meta)
    except TypeError as exc:
        raise CheckpointError(f"invalid model card ({' '.join(str(exc).split())[:160]})", card.path) from None


def load_export(
    folder: str | Path, backend: str = "onnxruntime", *, threads: int | None = None, precision: str = "fp32",
) -> list[LoadedModel]:
    """The folds of an export folder as :class:`~modalseg.inference.predictor.LoadedModel` (one backend per fold,
    holding its graph or, unpaired, one graph per modality), each graph's SHA-256 checked against the card.

    ``precision``: ``fp32``; OpenVINO also ``bf16`` (its CPU plugin's own low precision). An int8 export is run as
    the int8 graphs it holds.
    """
    from modalseg.inference.predictor import LoadedModel

    if backend not in RUNTIME_BACKENDS:
        raise ConfigError(f"the backend of an exported model must be {' or '.join(RUNTIME_BACKENDS)}, got {backend!r}")
    card = read_card(folder)
    meta = _meta(card)
    models: list[LoadedModel] = []
    for fold in card.folds():
        graphs = card.graphs(fold)
        paths = {(None if g.modality is None else meta.modalities.index(g.modality)): card.verify(g) for g in graphs}
        if backend == "onnxruntime":
            if precision != "fp32":
                raise ConfigError(f"the onnxruntime backend runs the exported graphs as they are (fp32 or int8), "
                                  f"not {precision}")
            from modalseg.deploy.onnx_backend import OnnxRuntimeBackend

            runner = OnnxRuntimeBackend(paths, size_multiple=card.size_multiple, min_size=card.min_size,
                                        threads=threads)
        else:
            from modalseg.deploy.openvino_backend import OpenVinoBackend

            runner = OpenVinoBackend(paths, size_multiple=card.size_multiple, min_size=card.min_size,
                                     threads=threads, precision=precision)
        epoch = fold.get("epoch")
        best = fold.get("best_score")
        models.append(LoadedModel(runner, meta, card.folder / graphs[0].file, None,
                                  epoch if isinstance(epoch, int) else None,
                                  float(best) if isinstance(best, (int, float)) else None))
    return models


def describe_backend(backend: str, card: ExportCard, precision: str = "fp32") -> str:
    """``onnxruntime fp32 on cpu``, ``openvino bf16 on cpu``, ``onnxruntime int8 on cpu``: the predict line's words."""
    mode = card.precision if card.precision != "fp32" else precision
    return f"{backend} {mode} on cpu"
