"""Cross-validation split by patient, saved as an editable ``splits.json`` (as nnU-Net does).

A patient's slices are never on both sides of a split. If ``splits.json`` exists it is used as is (after
checking that it names known patients and that no patient is on both sides of a fold), so users can edit it.

Where we deviate from nnU-Net: our ``splits.json`` lists **patient** ids, nnU-Net's ``splits_final.json`` lists
**case** ids (same shape: a list of ``{"train": [...], "val": [...]}``). :func:`resolve_splits` reads an
nnU-Net split (``<output>/splits_final.json`` or ``<dataset>/splits_final.json``) when no ``splits.json``
exists, converts it to patients with :func:`load_nnunet_splits` (refusing a patient split across both sides)
and saves the result as ``splits.json``, so every fold of the run uses the same split. :func:`all_cases_split`
is nnU-Net's ``-f all`` (one model on every case; nnU-Net then validates on its training cases, we leave
``val`` empty).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

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


def read_split_list(path: Path, ids: str) -> list[dict[str, list[str]]]:
    """A JSON list of {"train": [ids], "val": [ids]} folds, refused in one line otherwise."""
    try:
        splits: Any = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse splits ({exc})", path) from None
    except OSError as exc:
        raise DataError(f"cannot read ({exc.strerror or exc})", path) from None
    if not isinstance(splits, list) or not splits or not all(
        isinstance(s, dict) and isinstance(s.get("train"), list) and isinstance(s.get("val"), list)
        and all(isinstance(x, str) for x in s["train"] + s["val"]) for s in splits
    ):
        raise DataError(f'must be a non-empty list of {{"train": [{ids}], "val": [{ids}]}} folds', path)
    return splits


def load_nnunet_splits(path: str | Path, case_to_patient: Mapping[str, str]) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json`` (case ids) as our patient-id folds (sorted ids, one entry per fold).

    Refused, in one line naming the file and the fold: unknown case ids, a case on both sides of a fold, and a
    patient whose cases are on both sides or only partly listed (training on a patient's other cases would leak
    it into validation, or train on cases the split left out).
    """
    path = Path(path)
    splits = read_split_list(path, "case ids")
    cases_of: dict[str, set[str]] = {}
    for case, patient in case_to_patient.items():
        cases_of.setdefault(patient, set()).add(case)
    out: list[dict[str, list[str]]] = []
    for k, split in enumerate(splits):
        train, val = set(split["train"]), set(split["val"])
        unknown = sorted((train | val) - set(case_to_patient))
        if unknown:
            raise DataError(f"fold {k} names {len(unknown)} unknown case id(s), e.g. {unknown[:5]}", path)
        both = sorted(train & val)
        if both:
            raise DataError(f"fold {k} has case(s) on both sides: {both[:5]}", path)
        p_train = {case_to_patient[c] for c in train}
        p_val = {case_to_patient[c] for c in val}
        split_patients = sorted(p_train & p_val)
        if split_patients:
            p = split_patients[0]
            tr = sorted(cases_of[p] & train)
            va = sorted(cases_of[p] & val)
            raise DataError(f"fold {k} puts patient {p!r} on both sides (train {tr[:3]}, val {va[:3]}); keep a "
                            "patient's cases on one side", path)
        for p in sorted(p_train | p_val):
            missing = sorted(cases_of[p] - train - val)
            if missing:
                raise DataError(f"fold {k} lists only some cases of patient {p!r} (not {missing[:3]}); list all "
                                "of them on one side", path)
        out.append({"train": sorted(p_train), "val": sorted(p_val)})
    return out


def all_cases_split(patients: Sequence[str] | Mapping[str, Any]) -> list[dict[str, list[str]]]:
    """nnU-Net's ``-f all``: one fold that trains on every patient and validates on none."""
    return [{"train": sorted(set(patients)), "val": []}]


def resolve_splits(
    output: str | Path,
    patients: Mapping[str, Sequence[str]],
    folds: int,
    seed: int = 0,
    strata: dict[str, str] | None = None,
    *,
    dataset_root: str | Path | None = None,
    log: Callable[[str], None] | None = print,
) -> list[dict[str, list[str]]]:
    """The run's patient folds: ``<output>/splits.json`` if present, else an nnU-Net ``splits_final.json``
    (``<output>/`` or ``<dataset_root>/``; both present and different is refused) converted to patients and
    saved as ``splits.json``, else a new split (:func:`load_or_create_splits`).

    ``patients`` maps patient id -> its case ids (``SliceCache.patients``); ``log`` receives one line saying
    which nnU-Net file was converted (pass None on non-main DDP ranks).
    """
    output = Path(output)
    ours = output / "splits.json"
    known = sorted(patients)
    if not ours.exists():
        candidates = [output / "splits_final.json"]
        if dataset_root is not None:
            candidates.append(Path(dataset_root) / "splits_final.json")
        found = [c for c in candidates if c.is_file()]
        if found:
            case_to_patient = {c: p for p, cases in patients.items() for c in cases}
            converted = [load_nnunet_splits(f, case_to_patient) for f in found]
            if len(converted) == 2 and converted[0] != converted[1]:
                raise DataError(f"differs from {found[0]}; keep one splits_final.json (or write splits.json)",
                                found[1])
            splits = converted[0]
            if len(splits) != folds:
                raise DataError(f"has {len(splits)} folds but {folds} were requested", found[0])
            atomic_write_text(ours, json.dumps(splits, indent=2))
            if log is not None:
                log(f"splits: converted nnU-Net {found[0]} (case ids) to patient folds in {ours}")
            return splits
    return load_or_create_splits(ours, known, folds, seed, strata)


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
