"""Cross-validation split by patient, saved as an editable ``splits.json`` (as nnU-Net does).

A patient's slices are never on both sides of a split. If ``splits.json`` exists it is used as is (after
checking that it names known patients and that no patient is on both sides of a fold), so users can edit it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from modalseg.errors import DataError
from modalseg.utils.atomic import atomic_write_text


def make_splits(patients: list[str], folds: int, seed: int = 0) -> list[dict[str, list[str]]]:
    """K-fold split of the unique patient ids (shuffled with ``seed``), each fold {"train": [...], "val": [...]}."""
    unique = sorted(set(patients))
    if len(unique) < folds:
        raise DataError(f"{len(unique)} patient(s) cannot be split into {folds} folds; lower `folds`")
    order = np.random.default_rng(seed).permutation(len(unique))
    shuffled = [unique[i] for i in order]
    parts = [shuffled[k::folds] for k in range(folds)]
    return [
        {"train": sorted(p for j, part in enumerate(parts) if j != k for p in part), "val": sorted(parts[k])}
        for k in range(folds)
    ]


def load_or_create_splits(
    path: str | Path, patients: list[str], folds: int, seed: int = 0
) -> list[dict[str, list[str]]]:
    """Load ``splits.json`` if present (validated), else create it atomically."""
    path = Path(path)
    known = set(patients)
    if path.exists():
        try:
            splits = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot parse splits ({exc})", path) from None
        if not isinstance(splits, list) or not all(
            isinstance(s, dict) and isinstance(s.get("train"), list) and isinstance(s.get("val"), list) for s in splits
        ):
            raise DataError('must be a list of {"train": [...], "val": [...]} folds', path)
        for k, split in enumerate(splits):
            unknown = (set(split["train"]) | set(split["val"])) - known
            if unknown:
                raise DataError(f"fold {k} names unknown patient(s) {sorted(unknown)[:5]}", path)
            both = set(split["train"]) & set(split["val"])
            if both:
                raise DataError(f"fold {k} has patient(s) on both sides: {sorted(both)[:5]}", path)
        if len(splits) != folds:
            raise DataError(f"has {len(splits)} folds but {folds} were requested", path)
        return splits
    splits = make_splits(patients, folds, seed)
    atomic_write_text(path, json.dumps(splits, indent=2))
    return splits
