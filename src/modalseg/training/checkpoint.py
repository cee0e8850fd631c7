"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain containers (dicts, lists, numbers, strings), so it loads with the
safe unpickler; a file carrying any other pickled object is refused, never executed.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modalseg.errors import CheckpointError
from modalseg.utils.atomic import atomic_torch_save

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
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise CheckpointError(
            f"refused: the file contains pickled objects that are not plain weights ({reason[:160]})", path
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable or corrupt checkpoint ({str(exc).splitlines()[0][:160]})", path) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError("not a modalseg checkpoint", path)
    return state


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
