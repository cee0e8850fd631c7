"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain containers (dicts, lists, numbers, strings), so it loads with the
safe unpickler; a file carrying any other pickled object is refused, never executed.
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from modalseg.errors import CheckpointError, ConfigError
from modalseg.utils.atomic import atomic_torch_save
from modalseg.utils.names import check_names

if TYPE_CHECKING:
    from modalseg.training.model_meta import ModelMeta

FORMAT = "modalseg-checkpoint"
VERSION = 1


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomically write ``state`` (plus a format tag) to ``path``; the previous file survives any failure."""
    atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a modalseg checkpoint safely; any problem is a one-line :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint not found", path)
    try:
        with warnings.catch_warnings():
            # torch warns (on stderr) about unusual pickle protocols before refusing them: the refusal is the
            # message, the warning would only add lines.
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused: not a plain-weights checkpoint ({_unpickling_reason(exc)}); nothing in it was executed", path
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable or corrupt checkpoint ({_first_sentence(exc)})", path) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError("not a modalseg checkpoint", path)
    version = state.get("version")
    if version != VERSION:
        raise CheckpointError(
            f"refused: checkpoint format version {version!r}, this modalseg reads version {VERSION} "
            "(written by another modalseg release?)", path)
    return state


def _first_sentence(exc: BaseException, limit: int = 120) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unpickling_reason(exc: BaseException) -> str:
    """What torch's weights-only unpickler refused (a global such as ``posix.system``, or a pickle opcode).

    torch's message is several paragraphs whose wording changes between versions; only the refused global or
    opcode is kept.
    """
    text = str(exc)
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        return f"it references {match.group(1).rstrip('.')}, which is not a tensor or plain container"
    match = re.search(r"Unsupported operand (\d+)", text)
    if match:
        return f"unsupported pickle opcode {match.group(1)}"
    return "content that is not tensors or plain containers"


def first_non_finite(state_dict: dict[str, Any]) -> tuple[str, int] | None:
    """(name, count) of the first floating-point tensor with NaN/inf values, or ``None``: such weights are never
    saved (training) nor used (predict): a NaN model predicts background everywhere, read as "no lesion"."""
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                return name, bad
    return None


def read_model_meta(state: dict[str, Any], ckpt: str | Path) -> ModelMeta:
    """The checkpoint's :class:`ModelMeta`; a missing or malformed description is a one-line
    :class:`CheckpointError` (not a ``TypeError`` from the dataclass)."""
    from modalseg.training.model_meta import ModelMeta

    if "meta" not in state:
        raise CheckpointError("checkpoint has no model description (meta)", ckpt)
    raw = state["meta"]
    if not isinstance(raw, dict):
        raise CheckpointError(f"invalid model description (meta is a {type(raw).__name__}, not a mapping)", ckpt)
    try:
        meta = ModelMeta.from_dict(raw)
    except TypeError as exc:
        raise CheckpointError(f"invalid model description ({' '.join(str(exc).split())[:160]})", ckpt) from None
    _check_meta_types(meta, ckpt)
    if meta.num_classes != len(meta.labels):
        raise CheckpointError(
            f"invalid model description ({meta.num_classes} classes but {len(meta.labels)} labels)", ckpt
        )
    # Names from a checkpoint become file names (CASE_prob_<class>): data, never paths.
    check_names(meta.labels, "class name", ckpt, CheckpointError)
    for names in (meta.modalities, meta.channel_names or []):
        check_names(names, "modality name", ckpt, CheckpointError)
        if len({n.casefold() for n in names}) != len(names):
            raise CheckpointError(f"invalid model description (modality names repeat: {names})", ckpt)
    return meta


def _check_meta_types(meta: ModelMeta, ckpt: str | Path) -> None:
    """Every field of the description has its declared type (a hostile or damaged file is one line, no crash)."""
    def bad(what: str) -> None:
        raise CheckpointError(f"invalid model description ({what})", ckpt)

    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if meta.kind not in ("paired", "unpaired"):
        bad(f"kind {meta.kind!r} is not paired or unpaired")
    if not isinstance(meta.model, str) or not meta.model:
        bad("model must be a name")
    mods = meta.modalities
    if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
        bad("modalities must be a non-empty list of names")
    if meta.channel_names is not None and (
        not isinstance(meta.channel_names, list) or not all(isinstance(m, str) for m in meta.channel_names)
    ):
        bad("channel_names must be a list of names")
    if meta.kind == "paired" and meta.channel_names and any(m not in meta.channel_names for m in meta.modalities):
        bad(f"modalities {meta.modalities} are not all among channel_names {meta.channel_names}")
    if not isinstance(meta.labels, dict) or not meta.labels or not all(
        isinstance(k, str) and is_int(v) for k, v in meta.labels.items()
    ):
        bad("labels must be a non-empty mapping of class name to integer value")
    if not is_int(meta.num_classes) or meta.num_classes < 1:
        bad(f"num_classes {meta.num_classes!r} is not a positive integer")
    if not is_int(meta.in_channels) or meta.in_channels < 1:
        bad(f"in_channels {meta.in_channels!r} is not a positive integer")
    if not isinstance(meta.preprocess, dict) or not isinstance(meta.model_options, dict):
        bad("preprocess and model_options must be mappings")
    if meta.setting is not None and not isinstance(meta.setting, str):
        bad("setting must be a name")
    if meta.feature_layers is not None and (
        not isinstance(meta.feature_layers, list) or not all(isinstance(m, str) for m in meta.feature_layers)
    ):
        bad("feature_layers must be a list of layer names")
    if meta.ignore_label is not None and (not is_int(meta.ignore_label) or meta.ignore_label < 0):
        bad(f"ignore_label {meta.ignore_label!r} is not an integer >= 0")
    if meta.modality_dropout is not None:
        # predict --missing trusts these names and numbers: the model's own channels, probabilities in (0, 1]
        drop = meta.modality_dropout
        if meta.kind != "paired" or not isinstance(drop, dict) or not drop or not all(
            isinstance(k, str) and k in mods and isinstance(v, (int, float)) and not isinstance(v, bool)
            and 0 < v <= 1 for k, v in drop.items()
        ):
            bad("modality_dropout must map some of a paired model's modalities to probabilities in (0, 1]")
        if len(drop) == len(mods) and all(v >= 1 for v in drop.values()):
            bad("modality_dropout drops every modality with probability 1")
    if meta.regions is not None:
        # a region model paints labels[name] where region `name` is predicted: every region needs its value
        if not isinstance(meta.regions, dict) or list(meta.regions) != list(meta.labels) or not all(
            isinstance(v, list) and v and all(is_int(x) and x > 0 for x in v) for v in meta.regions.values()
        ):
            bad("regions must map each label name, in order, to a non-empty list of positive label values")
        if any(meta.labels[name] not in values for name, values in meta.regions.items()):
            bad("each region's painted label value must be one of the region's values")


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str | Path, meta: str = "") -> None:
    """Load weights, turning key or shape mismatches into one clear line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or wrong:
        detail = []
        if wrong:
            k = wrong[0]
            detail.append(f"{k} has shape {tuple(state_dict[k].shape)} in the checkpoint, {tuple(own[k].shape)} here")
        if missing:
            detail.append(f"{len(missing)} parameter(s) missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        prefix = f"checkpoint {meta} does not match this model: " if meta else "checkpoint does not match this model: "
        raise CheckpointError(prefix + "; ".join(detail), source)
    model.load_state_dict(state_dict)


@dataclass(frozen=True)
class TrainedCheckpoint:
    """A checkpoint read and checked once: its state, its model description and where it came from.

    The one way every part of modalseg reads a trained model (predict, evaluation, resume, experiments):
    ``read_checkpoint(path)`` then :meth:`build_network` (a fresh network with the weights) or
    :meth:`load_weights` (into an existing one). Weights with NaN/inf are refused either way.
    """

    path: Path
    state: dict[str, Any]
    meta: ModelMeta

    @property
    def epoch(self) -> int | None:
        """Epochs completed when the checkpoint was written (None if not recorded)."""
        value = self.state.get("epoch")
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def best_score(self) -> float | None:
        """The best validation score so far (None if not recorded or not finite)."""
        value = self.state.get("best")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        return None

    def load_weights(self, network: nn.Module) -> None:
        """Load the weights into ``network`` (one line naming the first mismatch or non-finite tensor)."""
        weights = self.state["model_state"]
        non_finite = first_non_finite(weights)
        if non_finite:
            raise CheckpointError(f"refused: {non_finite[1]} non-finite (NaN/inf) value(s) in weight "
                                  f"{non_finite[0]}", self.path)
        load_model_state(network, weights, self.path)

    def build_network(self) -> nn.Module:
        """The network the description names, with these weights (train mode, fp32, on the CPU)."""
        from modalseg.training.model_meta import build_network

        try:
            network = build_network(self.meta)
        except (ConfigError, TypeError, ValueError) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise CheckpointError(f"cannot rebuild the model it describes ({detail})", self.path) from None
        self.load_weights(network)
        return network


def read_checkpoint(path: str | Path) -> TrainedCheckpoint:
    """Read a trained model's checkpoint safely (``weights_only``) and check its description and preprocessing."""
    from modalseg.data.preprocess import PreprocessConfig

    path = Path(path)
    state = load_checkpoint(path)
    if "meta" not in state or "model_state" not in state:
        raise CheckpointError("checkpoint has no model description (meta)", path)
    meta = read_model_meta(state, path)
    try:
        PreprocessConfig.from_dict(meta.preprocess)
    except ConfigError as exc:
        raise CheckpointError(f"invalid preprocessing in the model description ({exc})", path) from None
    if not isinstance(state["model_state"], dict):
        raise CheckpointError("checkpoint has no weights (model_state is not a mapping)", path)
    return TrainedCheckpoint(path, state, meta)


CHECKPOINT_CHOICES = ("best", "latest")


def find_checkpoints(path: str | Path, which: str = "best") -> list[Path]:
    """A checkpoint file, a fold folder or a run folder (its ``fold_<K>`` folders; ``fold_all`` when it has none).

    ``which="best"`` takes ``best.pt`` and falls back to ``latest.pt`` where a fold has no best (its validation
    never produced a usable score); ``which="latest"`` takes ``latest.pt`` (the final weights, nnU-Net's choice).
    """
    if which not in CHECKPOINT_CHOICES:
        raise ConfigError(f"--checkpoint must be best or latest, got {which!r}")
    names = ("best.pt", "latest.pt") if which == "best" else ("latest.pt",)
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError("no such checkpoint or run folder", path)
    for name in names:
        if (path / name).is_file():
            return [path / name]
    folds = sorted((p for p in path.glob("fold_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    if not folds and (path / "fold_all").is_dir():
        folds = [path / "fold_all"]
    found = []
    for fold in folds:
        for name in names:
            if (fold / name).is_file():
                found.append(fold / name)
                break
    if not found:
        raise CheckpointError(f"no checkpoint ({' / '.join(names)} in this folder or its fold_*/) found", path)
    return found
