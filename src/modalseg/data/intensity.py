"""Dataset-level intensity statistics for CT (nnU-Net's CT normalisation).

CT intensities are calibrated (Hounsfield units), so nnU-Net normalises every CT volume with the same mapping:
clip to the 0.5 / 99.5 percentiles of the foreground voxels of all training cases, then subtract their mean and
divide by their standard deviation. A per-volume z-score would instead map the same tissue to different values
depending on how much air or bone a scan holds. The statistics are computed once when training starts and stored
in the model's preprocessing, so prediction applies exactly the same mapping.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from modalseg.data.io import read_volume
from modalseg.data.types import DatasetSpec
from modalseg.errors import DataError, OutputError
from modalseg.utils.atomic import atomic_write_text

#: foreground voxels sampled per case (nnU-Net samples 10,000)
VOXELS_PER_CASE = 10_000
PERCENTILES = (0.5, 99.5)


def is_ct(name: str) -> bool:
    """Whether a modality name denotes CT (``CT``, ``ct``, ``CT_venous``: the first word is ``ct``)."""
    return name.strip().lower().replace("-", "_").split("_")[0] == "ct"


def ct_channels(spec: DatasetSpec) -> list[int]:
    """Positions (in ``spec.modalities``) of the CT channels of a paired dataset."""
    return [i for i, m in enumerate(spec.modalities) if is_ct(m)] if spec.paired else []


def dataset_intensity_stats(
    spec: DatasetSpec, channels: Sequence[int], *, voxels_per_case: int = VOXELS_PER_CASE, seed: int = 0,
    memo_dir: Path | None = None,
) -> list[dict[str, float] | None]:
    """``{lo, hi, mean, std}`` of the foreground voxels of every labelled case, for each channel in ``channels``
    (``None`` elsewhere), from a deterministic sample of ``voxels_per_case`` voxels per case.

    With ``memo_dir`` the result is kept there under a key of the files' identities (path, size, mtime, as the
    slice cache's fingerprint) and the parameters, so a restart or resume does not read every CT volume again.
    """
    key = None
    if memo_dir is not None:
        key = _memo_key(spec, channels, voxels_per_case, seed)
        memo = Path(memo_dir) / f"intensity-{key[:16]}.json"
        try:
            saved = json.loads(memo.read_text(encoding="utf-8"))
            if isinstance(saved, dict) and saved.get("key") == key and isinstance(saved.get("stats"), list):
                return saved["stats"]
        except (OSError, ValueError):
            pass  # absent or unreadable: computed again below
    stats = _compute(spec, channels, voxels_per_case, seed)
    if key is not None:
        try:
            atomic_write_text(memo, json.dumps({"key": key, "stats": stats}))
        except OutputError:
            pass  # a read-only cache folder only costs the recomputation next time
    return stats


def _memo_key(spec: DatasetSpec, channels: Sequence[int], voxels_per_case: int, seed: int) -> str:
    from modalseg.data.cache import file_identity

    files = [[file_identity(Path(c.images[k])) for k in channels] + [file_identity(Path(c.label))]
             for c in spec.cases if c.label is not None]
    payload = {"channels": list(channels), "voxels": voxels_per_case, "seed": seed, "files": files,
               "percentiles": list(PERCENTILES)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _compute(
    spec: DatasetSpec, channels: Sequence[int], voxels_per_case: int, seed: int
) -> list[dict[str, float] | None]:
    samples: dict[int, list[np.ndarray]] = {c: [] for c in channels}
    for k, case in enumerate(spec.cases):
        if case.label is None:
            continue
        label = read_volume(case.label, kind="label")
        mask = label.array > 0
        if spec.ignore_label is not None:  # nnU-Net's ignore voxels are not foreground
            mask &= label.array != spec.ignore_label
        for c in channels:
            image = read_volume(case.images[c])
            if image.shape != label.shape:  # another grid: its foreground is not this mask
                continue
            values = image.array[mask]
            if values.size > voxels_per_case:
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, k, c])))
                values = values[rng.choice(values.size, voxels_per_case, replace=False)]
            samples[c].append(values.astype(np.float64))
    out: list[dict[str, float] | None] = [None] * len(spec.modalities)
    for c, parts in samples.items():
        if not parts or not sum(p.size for p in parts):
            raise DataError(f"no foreground voxels to compute {spec.modalities[c]} (CT) intensity statistics from "
                            "(CT is normalised with the training cases' foreground statistics)", spec.root)
        values = np.concatenate(parts)
        lo, hi = (float(v) for v in np.percentile(values, PERCENTILES))
        out[c] = {"lo": lo, "hi": hi, "mean": float(values.mean()), "std": float(values.std())}
    return out
