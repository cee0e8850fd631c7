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


def make_splits(
    patients: list[str], folds: int, seed: int = 0, strata: dict[str, str] | None = None
) -> list[dict[str, list[str]]]:
    """K-fold split of the unique patient ids (shuffled with ``seed``), each fold {"train": [...], "val": [...]}.

    ``strata`` (patient -> group, e.g. its modality in an unpaired dataset, where each modality has its own
    patients) splits every group separately, so each fold validates on every group.
    """
    unique = sorted(set(patients))
    groups: dict[str, list[str]] = {}
    for p in unique:
        groups.setdefault((strata or {}).get(p, ""), []).append(p)
    for name, members in groups.items():
        if len(members) < folds:
            what = f" of {name}" if name else ""
            raise DataError(f"{len(members)} patient(s){what} cannot be split into {folds} folds; lower `folds`")
    rng = np.random.default_rng(seed)
    parts: list[list[str]] = [[] for _ in range(folds)]
    offset = 0
    for name in sorted(groups):
        members = groups[name]
        shuffled = [members[i] for i in rng.permutation(len(members))]
        for i, p in enumerate(shuffled):  # continue the round robin so fold sizes stay balanced
            parts[(offset + i) % folds].append(p)
        offset += len(members)
    return [
        {"train": sorted(p for j, part in enumerate(parts) if j != k for p in part), "val": sorted(parts[k])}
        for k in range(folds)
    ]


def load_or_create_splits(
    path: str | Path, patients: list[str], folds: int, seed: int = 0, strata: dict[str, str] | None = None
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
    splits = make_splits(patients, folds, seed, strata)
    atomic_write_text(path, json.dumps(splits, indent=2))
    return splits
