"""Post-processing of predicted label volumes, and nnU-Net's rule for choosing it by cross-validation.

Operations (per foreground class, on the class's mask in the file's voxel grid, 3D connectivity of faces —
``scipy.ndimage.label``'s default structure, as nnU-Net's connected components):

* ``largest-component``: keep only the largest connected component of the class;
* ``min-size=N``: remove components of fewer than ``N`` voxels.

Removed voxels become background (label value 0). ``modalseg postprocess --determine RUN`` applies
``largest-component`` to each class of the cross-validation predictions of RUN's folds and keeps it for a class
only when the mean Dice over the validation cases improves (nnU-Net's rule; a tie keeps nothing), writing the
decision as ``postprocessing.json`` beside the folds; ``modalseg predict`` applies that file when it finds it
(and says so), unless ``--postprocess none``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from modalseg.errors import ConfigError

POSTPROCESSING_FILE = "postprocessing.json"
_MIN_SIZE = re.compile(r"^min-size=(\d+)$")


@dataclass(frozen=True)
class PostProcessing:
    """What to do to which label value: ``{label value: operation}`` (``largest-component`` | ``min-size=N``)."""

    rules: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for value, op in self.rules.items():
            parse_operation(op)
            if value == 0:
                raise ConfigError("post-processing applies to foreground label values, not background 0")

    @classmethod
    def for_all(cls, operation: str, label_values: Sequence[int]) -> PostProcessing:
        """``operation`` for every foreground label value (``--postprocess largest-component``)."""
        if operation == "none":
            return cls({})
        parse_operation(operation)
        return cls({int(v): operation for v in label_values if int(v) != 0})

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """A copy of ``labels`` (file label values) with every rule applied."""
        out = np.array(labels, copy=True)
        for value, op in self.rules.items():
            mask = out == value
            if not mask.any():
                continue
            kept = _apply_operation(mask, op)
            out[mask & ~kept] = 0
        return out

    def describe(self) -> str:
        if not self.rules:
            return "no post-processing"
        return "; ".join(f"label {v}: {op}" for v, op in sorted(self.rules.items()))

    def to_dict(self) -> dict[str, Any]:
        return {"format": "modalseg-postprocessing", "version": 1,
                "rules": {str(v): op for v, op in sorted(self.rules.items())}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: Path | None = None) -> PostProcessing:
        where = f"{path}: " if path else ""
        if not isinstance(data, Mapping) or data.get("format") != "modalseg-postprocessing":
            raise ConfigError(f"{where}not a modalseg post-processing file")
        rules = data.get("rules")
        if not isinstance(rules, Mapping) or not all(isinstance(k, str) and k.isdigit() for k in rules):
            raise ConfigError(f"{where}rules must map label values to operations")
        return cls({int(k): str(v) for k, v in rules.items()})


def parse_operation(op: str) -> tuple[str, int]:
    """``("largest", 0)`` or ``("min_size", N)``; anything else is one line."""
    if op == "largest-component":
        return "largest", 0
    match = _MIN_SIZE.match(str(op))
    if match and int(match.group(1)) >= 1:
        return "min_size", int(match.group(1))
    raise ConfigError(f"unknown post-processing {op!r}: use largest-component, min-size=N (N >= 1 voxels) or none")


def _apply_operation(mask: np.ndarray, op: str) -> np.ndarray:
    """The voxels of ``mask`` that ``op`` keeps."""
    kind, size = parse_operation(op)
    components, count = ndimage.label(mask)
    if count <= 1 and kind == "largest":
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    if kind == "largest":
        return components == int(sizes.argmax())
    keep = sizes >= size
    keep[0] = False
    return keep[components]


def load_postprocessing(run: Path) -> PostProcessing | None:
    """The decision ``postprocess --determine`` wrote beside RUN's folds (None if there is none)."""
    path = Path(run) / POSTPROCESSING_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable post-processing file ({exc})") from None
    return PostProcessing.from_dict(data, path)


def mean_dice(pairs: Sequence[tuple[np.ndarray, np.ndarray]], value: int) -> float:
    """Mean over cases of the Dice of label ``value`` (a case where both are empty scores 1)."""
    scores = []
    for pred, ref in pairs:
        p, r = pred == value, ref == value
        denom = int(p.sum()) + int(r.sum())
        scores.append(1.0 if denom == 0 else 2.0 * int(np.logical_and(p, r).sum()) / denom)
    return float(np.mean(scores)) if scores else float("nan")


def determine(pairs: Sequence[tuple[np.ndarray, np.ndarray]], label_values: Sequence[int],
              operation: str = "largest-component") -> tuple[PostProcessing, list[dict[str, Any]]]:
    """nnU-Net's rule on cross-validation (prediction, reference) pairs: per foreground label, keep ``operation``
    only if it raises the mean Dice; returns the decision and one row per label (Dice before/after)."""
    rules: dict[int, str] = {}
    rows = []
    for value in (int(v) for v in label_values if int(v) != 0):
        single = PostProcessing({value: operation})
        before = mean_dice(pairs, value)
        after = mean_dice([(single.apply(p), r) for p, r in pairs], value)
        kept = after > before
        if kept:
            rules[value] = operation
        rows.append({"label": value, "operation": operation, "dice_before": before, "dice_after": after,
                     "kept": kept})
    return PostProcessing(rules), rows
