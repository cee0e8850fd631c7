"""The model card of an export (``model.json``): everything needed to run the graphs without modalseg's code.

An export folder holds one graph per fold (per fold and modality for unpaired networks) and this card. The card
states, in plain JSON:

* ``model_meta``: the checkpoint's model description verbatim (the machine-readable truth the runtime uses);
* ``modalities`` (input order), ``channel_names``, ``labels`` (class index order = output channel order);
* ``preprocessing``: every step from input files to network input and back, each with its rule in words, the
  per-modality normalisation (mode, rule, dataset intensity statistics where the mode uses them) and the
  preprocessing dictionary itself;
* ``input`` / ``output``: tensor names, dtype, layout, the size rule (``size_multiple``, ``min_size``, padding);
* ``ensemble``: the mean of the folds' softmax probabilities, then the argmax mapped to label values;
* ``folds``: per fold its source checkpoint and its graph file(s) with SHA-256 and measured agreement;
* ``software``: the versions that wrote the export.

Reading a card checks its format and version, the model description (names that become file names included)
and, before any graph is used, each graph's SHA-256. Imports no torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modalseg.errors import CheckpointError

__all__ = ["CARD_NAME", "FORMAT", "VERSION", "ExportCard", "GraphFile", "describe_preprocessing", "is_export",
           "read_card", "sha256_file"]

CARD_NAME = "model.json"
FORMAT = "modalseg-export"
VERSION = 1

#: What each normalisation mode of data/preprocess.py computes (statistics always of the whole original slice or
#: volume of that modality, before any crop; a std below 1e-8 counts as 1, a max or range below 1e-8 divides by 1).
NORMALIZATION_RULES = {
    "zscore_slice": "(x - mean) / std, mean and std of the whole 2D slice",
    "zscore_volume": "(x - mean) / std, mean and std of the whole volume",
    "zscore_volume_robust": "x clipped to the volume's 0.5 and 99.5 percentiles, then (x - mean) / std with the "
                            "clipped volume's mean and std",
    "ct_dataset": "x clipped to [lo, hi] (the training cases' foreground 0.5/99.5 percentiles), then "
                  "(x - mean) / std with the training foreground's mean and std (dataset_stats)",
    "max_slice": "x / max of the whole 2D slice",
    "max_volume": "x / max of the whole volume",
    "minmax_slice": "(x - min) / (max - min) of the whole 2D slice (0 where the slice is constant)",
    "none": "x as float32",
}

_AXIS_NAMES = {0: "sagittal (canonical axis 0, towards Right)", 1: "coronal (canonical axis 1, towards Anterior)",
               2: "axial (canonical axis 2, towards Superior)"}


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _modes(preprocess: dict[str, Any], kind: str, modalities: Sequence[str], channel_names: Sequence[str]) -> list[str]:
    """The normalisation mode of each modality as :class:`~modalseg.inference.Predictor` applies it."""
    norm = preprocess.get("normalization", "zscore_slice")
    if isinstance(norm, str):
        return [norm] * len(modalities)
    # paired and unpaired alike: each modality's entry by its place among the dataset's channel names
    names = list(channel_names or modalities)
    return [norm[names.index(m)] for m in modalities]


def describe_preprocessing(
    preprocess: dict[str, Any], *, kind: str, modalities: Sequence[str], channel_names: Sequence[str] | None,
    size_multiple: int, min_size: int, regions: bool = False, context_slices: int = 0,
    patch_size: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The card's ``preprocessing`` section: the steps and their inverse in words, the per-modality normalisation
    (with the dataset statistics of ``ct_dataset``) and the preprocessing dictionary (``config``)."""
    channel_names = list(channel_names or modalities)
    axis = int(preprocess.get("slice_axis", 2))
    crop, crop_size, target = preprocess.get("crop", "none"), preprocess.get("crop_size"), preprocess.get("target_size")
    stats = preprocess.get("intensity_stats") or []
    thickness = preprocess.get("slice_thickness_mm")
    normalization = []
    for m, mode in zip(modalities, _modes(preprocess, kind, modalities, channel_names), strict=True):
        k = channel_names.index(m) if m in channel_names else None
        entry: dict[str, Any] = {"modality": m, "mode": mode, "rule": NORMALIZATION_RULES.get(mode, mode)}
        if mode == "ct_dataset":
            entry["dataset_stats"] = stats[k] if k is not None and k < len(stats) else None
        normalization.append(entry)
    crop_rule = {
        "none": "the whole slice",
        "center": f"a {crop_size} box centred on the slice (at prediction; training used the same box)",
        "bbox": f"a {crop_size} box centred on the slice at prediction (training centred it on the labels' "
                "foreground; test volumes have no labels)",
        "square": "the centred square of side max(h, w) (the short side padded, aspect ratio kept)",
    }.get(crop, crop)
    steps = [
        "assistant modalities onto the first modality's grid: kept as they are where shape, spacing (relative "
        "1e-3) and direction cosines (1e-3) agree; the same grid in another voxel order is reoriented exactly; any "
        "other grid is resampled by world coordinates (SimpleITK, linear), points outside it filled with that "
        "volume's minimum (modalseg predict --strict-geometry refuses instead)",
        "voxel order closest to RAS (nibabel as_closest_canonical: axis permutation and flips only, no "
        "interpolation)",
        "per-modality intensity normalisation over the whole original slice or volume (see normalization)",
        f"2D slices along canonical array axis {axis}: {_AXIS_NAMES.get(axis, axis)}; every slice is predicted",
        *([f"slices resampled along the slice axis to about {thickness:g} mm (linear; the volume's extent kept: "
           "round(depth x thickness / target) slices)"] if thickness else []),
        f"crop: {crop_rule}; parts outside the image are zero (after normalisation)",
        (f"resize to {target} (bilinear, align_corners=False, no antialiasing)" if target else
         "no resize"),
        f"network input: modalities stacked as channels in the order of 'modalities', float32 (N, C, H, W); sides "
        f"zero-padded (centred, the odd pixel after) to at least {min_size} and a multiple of {size_multiple}",
        *([f"2.5D: each slice with its {context_slices} neighbours on either side, modality-major (modality m's "
           f"slices d-{context_slices} .. d+{context_slices} are channels m*{2 * context_slices + 1} ...); "
           "neighbours beyond the first and last slice are zeros"] if context_slices else []),
        *([f"3D: the processed slices stacked as a volume (C, D, H, W) and predicted in Gaussian-weighted sliding "
           f"windows of {list(patch_size)} (input.windows)"] if patch_size else []),
    ]
    inverse = [
        "probabilities cropped back from the padding",
        "mean of the folds' probabilities (ensemble)",
        (f"resized from {target} back to the crop box size (bilinear, align_corners=False)" if target else
         "no resize to undo"),
        ("pasted into the crop box of the slice; outside the box: probability 0 for every region" if regions else
         "pasted into the crop box of the slice; outside the box: background (class 0 probability 1)"),
        *(["slices resampled back to the file's number of slices (linear)"] if thickness else []),
        "slices stacked back along the slice axis, then the inverse of the canonical reorientation: the first "
        "modality's voxel order and geometry (affine, spacing, origin, direction) are the output's",
        ("labels: on background 0, each region painted with its value where its probability > 0.5, in 'labels' "
         "order" if regions else "labels: argmax over classes, class index k -> label value labels[k]"),
    ]
    return {"steps": steps, "inverse": inverse, "slice_axis": axis, "normalization": normalization,
            "config": dict(preprocess)}


@dataclass(frozen=True)
class GraphFile:
    """One graph of a fold: its file (relative to the export folder), checksum and the modality it serves."""

    file: str
    sha256: str
    modality: str | None  # unpaired: the branch's modality; paired: None (one graph)


@dataclass(frozen=True)
class ExportCard:
    """A read and checked ``model.json`` (:func:`read_card`)."""

    path: Path
    data: dict[str, Any]

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def model_meta(self) -> dict[str, Any]:
        return dict(self.data["model_meta"])

    @property
    def size_multiple(self) -> int:
        return int(self.data["input"]["size_multiple"])

    @property
    def min_size(self) -> int:
        return int(self.data["input"]["min_size"])

    @property
    def precision(self) -> str:
        return str(self.data.get("precision", "fp32"))

    def folds(self) -> list[dict[str, Any]]:
        return list(self.data["folds"])

    def graphs(self, fold: dict[str, Any]) -> list[GraphFile]:
        return [GraphFile(str(g["file"]), str(g["sha256"]), g.get("modality")) for g in fold["graphs"]]

    def verify(self, graph: GraphFile) -> Path:
        """The graph's path once its SHA-256 matches the card (else one line: the file is not the exported one)."""
        path = self.folder / graph.file
        if not path.is_file():
            raise CheckpointError(f"graph {graph.file} named by {CARD_NAME} is missing", self.folder)
        if sha256_file(path) != graph.sha256:
            raise CheckpointError(f"refused: its SHA-256 differs from {CARD_NAME}'s (changed or damaged since the "
                                  "export)", path)
        return path


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is an export folder (holds a ``model.json`` of this format) or such a card file."""
    path = Path(path)
    card = path / CARD_NAME if path.is_dir() else path
    if card.name != CARD_NAME or not card.is_file():
        return False
    try:
        data = json.loads(card.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def read_card(path: str | Path) -> ExportCard:
    """Read and check an export folder's card (or the card file); every problem is one :class:`CheckpointError`."""
    from modalseg.data.preprocess import PreprocessConfig
    from modalseg.errors import ConfigError
    from modalseg.utils.names import check_name, check_names

    path = Path(path)
    card = path / CARD_NAME if path.is_dir() else path
    if not card.is_file():
        raise CheckpointError(f"not an export folder (no {CARD_NAME}; `modalseg export` writes one)", path)
    try:
        data = json.loads(card.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"unreadable model card ({' '.join(str(exc).split())[:120]})", card) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"not a modalseg export card (format is not {FORMAT!r})", card)
    if data.get("version") != VERSION:
        raise CheckpointError(f"refused: export card version {data.get('version')!r}, this modalseg reads version "
                              f"{VERSION}", card)

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"invalid model card ({what})", card)

    meta = data.get("model_meta")
    if not isinstance(meta, dict):
        raise bad("model_meta must be a mapping")
    if meta.get("kind") not in ("paired", "unpaired"):
        raise bad(f"kind {meta.get('kind')!r} is not paired or unpaired")
    mods, labels = meta.get("modalities"), meta.get("labels")
    if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
        raise bad("modalities must be a non-empty list of names")
    if not isinstance(labels, dict) or not labels or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in labels.items()):
        raise bad("labels must map class names to integer values")
    if meta.get("num_classes") != len(labels):
        raise bad(f"{meta.get('num_classes')!r} classes but {len(labels)} labels")
    check_names(labels, "class name", card, CheckpointError)  # they become file names (CASE_prob_<class>)
    check_names(mods + list(meta.get("channel_names") or []), "modality name", card, CheckpointError)
    try:
        PreprocessConfig.from_dict(meta.get("preprocess"))
    except ConfigError as exc:
        raise bad(f"preprocessing: {exc}") from None
    rule = data.get("input")
    if not isinstance(rule, dict) or not all(
            isinstance(rule.get(k), int) and rule[k] >= 1 for k in ("size_multiple", "min_size")):
        raise bad("input must give size_multiple and min_size (positive integers)")
    folds = data.get("folds")
    if not isinstance(folds, list) or not folds:
        raise bad("no folds")
    wanted = [None] if meta["kind"] == "paired" else list(mods)
    for fold in folds:
        graphs = fold.get("graphs") if isinstance(fold, dict) else None
        if not isinstance(graphs, list) or [g.get("modality") if isinstance(g, dict) else 0 for g in graphs] != wanted:
            raise bad(f"each fold needs one graph per {'model' if meta['kind'] == 'paired' else 'modality'} "
                      f"({', '.join(m or 'paired' for m in wanted)})")
        for g in graphs:
            if not isinstance(g.get("file"), str) or not isinstance(g.get("sha256"), str):
                raise bad("a graph needs file and sha256")
            check_name(g["file"], "graph file name", card, CheckpointError)
    return ExportCard(card, data)
