"""Apply trained models to volumes on disk: one file per modality in, a label volume with the input's exact
geometry out (optionally per-class probabilities); several models (folds) are ensembled by averaging
their softmax probabilities.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from modalseg.data.io import is_supported, read_volume, strip_extension, write_volume
from modalseg.data.preprocess import PreprocessConfig, preprocess_volume, restore_volume
from modalseg.data.types import Volume
from modalseg.data.verify import geometry_problems, intensity_problems
from modalseg.errors import CheckpointError, ConfigError, DataError, OutputError
from modalseg.models.fold import fold_batch_norm
from modalseg.training.checkpoint import load_checkpoint, load_model_state, read_model_meta
from modalseg.training.inference import ensemble_probabilities, predict_probabilities
from modalseg.training.model_meta import ModelMeta, build_network
from modalseg.training.precision import Precision
from modalseg.utils.names import check_name, child_path

_CHANNEL_RE = re.compile(r"^(.*)_(\d{4})$")


@dataclass
class LoadedModel:
    network: nn.Module
    meta: ModelMeta
    path: Path


def find_checkpoints(path: str | Path) -> list[Path]:
    """A checkpoint file, a fold folder (best.pt, else latest.pt) or a run folder (all its fold_* folders)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError("no such checkpoint or run folder", path)
    for name in ("best.pt", "latest.pt"):
        if (path / name).is_file():
            return [path / name]
    found = []
    for fold in sorted(path.glob("fold_*")):
        for name in ("best.pt", "latest.pt"):
            if (fold / name).is_file():
                found.append(fold / name)
                break
    if not found:
        raise CheckpointError("no checkpoint (best.pt / latest.pt / fold_*/) found", path)
    return found


def load_models(paths: Sequence[str | Path], precision: Precision) -> list[LoadedModel]:
    """Load every checkpoint found under ``paths``; all must describe the same kind of model."""
    models: list[LoadedModel] = []
    for p in paths:
        for ckpt in find_checkpoints(p):
            state = load_checkpoint(ckpt)
            if "meta" not in state or "model_state" not in state:
                raise CheckpointError("checkpoint has no model description (meta)", ckpt)
            meta = read_model_meta(state, ckpt)
            try:
                PreprocessConfig.from_dict(meta.preprocess)
            except ConfigError as exc:
                raise CheckpointError(f"invalid preprocessing in the model description ({exc})", ckpt) from None
            try:
                network = build_network(meta)
            except (ConfigError, TypeError, ValueError) as exc:
                detail = " ".join(str(exc).split())[:200]
                raise CheckpointError(f"cannot rebuild the model it describes ({detail})", ckpt) from None
            if not isinstance(state["model_state"], dict):
                raise CheckpointError("checkpoint has no weights (model_state is not a mapping)", ckpt)
            check_finite_weights(state["model_state"], ckpt)
            load_model_state(network, state["model_state"], ckpt)
            fold_batch_norm(network)  # inference only: conv + eval-mode BN = one conv (models/fold.py)
            network = precision.prepare_model(network).eval()
            models.append(LoadedModel(network, meta, ckpt))
    first = models[0].meta
    for m in models[1:]:
        if (m.meta.labels, m.meta.modalities, m.meta.preprocess) != (first.labels, first.modalities, first.preprocess):
            raise CheckpointError(f"cannot ensemble: model {m.meta.describe()} differs from {first.describe()}", m.path)
    return models


def check_finite_weights(state_dict: dict, source: str | Path) -> None:
    """Refuse weights with NaN/inf: such a model predicts background everywhere, read as "no lesion"."""
    import torch

    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"refused: {bad} non-finite (NaN/inf) value(s) in weight {name}", source)


def _one_file_per_case(files: Sequence[Path], key) -> dict[str, Path]:
    """``{key(file): file}``, refusing two files with one key (``a_0000.nii.gz`` beside ``a_0000.nrrd``)."""
    found: dict[str, Path] = {}
    for f in files:
        k = key(f)
        if k is None:
            continue
        if k in found:
            raise DataError(f"two input files for one image: {found[k].name} and {f.name}; keep one", f.parent)
        found[k] = f
    return found


def find_cases(inputs: Sequence[str | Path], meta: ModelMeta) -> dict[str, list[Path]]:
    """Group input files into cases, each a list of files in ``meta.modalities`` order.

    Accepted: a folder of nnU-Net-named files (``CASE_0000.nii.gz`` ...; channel k = the training dataset's
    k-th channel); a folder holding ``<modality>.nii.gz`` files (one case, named after the folder); or
    explicit files given in modality order (one case, named after the first file).
    """
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.exists():
            raise DataError("input not found", p)
    channel_names = meta.channel_names or meta.modalities
    # file channel index of each modality the model reads (unpaired models read one image)
    needed = [channel_names.index(m) for m in meta.modalities] if meta.kind == "paired" else [0]
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".") and is_supported(f))
        by_modality = _one_file_per_case(files, lambda f: strip_extension(f.name))
        if meta.kind == "paired" and all(m in by_modality for m in meta.modalities):
            return {folder.name: [by_modality[m] for m in meta.modalities]}
        cases: dict[str, dict[int, Path]] = {}
        for stem, f in by_modality.items():
            match = _CHANNEL_RE.match(stem)
            if match:
                cases.setdefault(match.group(1), {})[int(match.group(2))] = f
        if not cases:
            raise DataError(
                "no input images found (expected CASE_0000.nii.gz-style files or <modality>.nii.gz files)", folder
            )
        result = {}
        for case, channels in sorted(cases.items()):
            missing = [k for k in needed if k not in channels]
            if missing:
                k = missing[0]
                name = channel_names[k] if k < len(channel_names) else f"channel {k}"
                raise DataError(f"case {case}: missing modality {name} (expected {case}_{k:04d} file)", folder)
            result[case] = [channels[k] for k in needed]
        return result
    expected = len(needed)
    if len(paths) != expected:
        raise DataError(
            f"the model needs {expected} file(s), one per modality ({', '.join(meta.modalities)}); got {len(paths)}",
            paths[0],
        )
    return {explicit_case_name(paths, needed): paths}


def explicit_case_name(paths: Sequence[Path], needed: Sequence[int]) -> str:
    """The case name of explicitly given files: the first file's name without its extension, and without a
    ``_NNNN`` channel suffix only where nnU-Net naming is in use, i.e. every file is ``CASE_NNNN`` with one CASE
    and the indices are the channels the model reads (``patient7_0301.nrrd`` stays ``patient7_0301``)."""
    stems = [strip_extension(p.name) for p in paths]
    matches = [_CHANNEL_RE.match(s) for s in stems]
    if all(matches) and len({m.group(1) for m in matches}) == 1 and [int(m.group(2)) for m in matches] == list(needed):
        return matches[0].group(1)
    return stems[0]


def _check_inputs(volumes: Sequence[Volume], names: Sequence[str], tol: float = 1e-3) -> None:
    """Refuse what ``modalseg verify`` refuses: NaN/inf or constant images, and modalities whose shape,
    spacing (relative ``tol``) or orientation (direction cosines, absolute ``tol``) differ from the first."""
    ref = volumes[0]
    for i, v in enumerate(volumes):
        problems = intensity_problems(v)
        if i:
            name = names[i] if i < len(names) else f"modality {i}"
            problems = geometry_problems(v, ref, name, names[0], spacing_tol=tol, direction_tol=tol) + problems
        if problems:
            raise DataError(problems[0])


def predict_case(
    models: Sequence[LoadedModel],
    files: Sequence[Path],
    precision: Precision,
    *,
    modality: str | None = None,
    batch_size: int = 8,
) -> tuple[np.ndarray, np.ndarray, Volume]:
    """Return (label volume in file label values, probabilities (C, X, Y, Z), reference volume)."""
    meta = models[0].meta
    volumes = [read_volume(f) for f in files]
    _check_inputs(volumes, list(meta.modalities) if meta.kind == "paired" else [modality or "image"])
    pp = PreprocessConfig.from_dict(meta.preprocess)
    images = np.stack([v.array for v in volumes], axis=0)
    if meta.kind == "paired":
        names = meta.channel_names or meta.modalities
        channels = [names.index(m) for m in meta.modalities]
        mod_index = None
    else:
        if modality is None:
            if len(meta.modalities) > 1:
                raise DataError(f"this unpaired model has modalities {meta.modalities}: choose one with --modality",
                                files[0])
            modality = meta.modalities[0]
        if modality not in meta.modalities:
            raise DataError(f"modality {modality!r} is not one of the model's {meta.modalities}", files[0])
        channels = None
        mod_index = meta.modalities.index(modality)
    slices = preprocess_volume(images, None, pp, spacing=volumes[0].spacing, channels=channels, all_slices=True)
    batch = np.stack([s.image for s in slices], axis=0)
    probs = ensemble_probabilities(
        [predict_probabilities(m.network, batch, precision, batch_size=batch_size, modality=mod_index) for m in models]
    )
    if not np.isfinite(probs).all():
        raise DataError(
            f"the model produced {int((~np.isfinite(probs)).sum())} non-finite (NaN/inf) probabilities for this "
            "case; nothing was written", files[0])
    restored = restore_volume(list(probs), [s.geometry for s in slices], pp.slice_axis, is_label=False)
    class_index = restored.argmax(axis=0)
    values = np.asarray(list(meta.labels.values()))
    labels = values[class_index]
    return labels, restored.astype(np.float32), volumes[0]


def write_prediction(
    out_dir: Path, case: str, labels: np.ndarray, probs: np.ndarray | None, reference: Volume, class_names: list[str],
    file_ending: str = ".nii.gz",
) -> list[Path]:
    """Write ``CASE.nii.gz`` (labels) and optionally ``CASE_prob_<class>.nii.gz`` with the input's geometry."""
    paths = output_paths(out_dir, case, class_names if probs is not None else None, file_ending)
    # dtype=None: the smallest type that holds every label value (uint8, int16, int32), never a wrapped one.
    write_volume(paths[0], np.asarray(labels), reference)
    if probs is not None:
        for c, p in enumerate(paths[1:]):
            write_volume(p, probs[c].astype(np.float32), reference)
    return paths


def output_paths(out_dir: Path, case: str, class_names: Sequence[str] | None, file_ending: str) -> list[Path]:
    """``CASE<ending>`` and, with ``class_names``, ``CASE_prob_<class><ending>``: each a checked direct child of
    ``out_dir`` (case and class names are data from file names and checkpoints, never paths)."""
    check_name(case, "case id", out_dir, OutputError)
    paths = [child_path(out_dir, f"{case}{file_ending}")]
    for name in class_names or ():
        check_name(name, "class name", out_dir, OutputError)
        paths.append(child_path(out_dir, f"{case}_prob_{name}{file_ending}"))
    return paths


def check_outputs_spare_inputs(outputs: dict[str, list[Path]], inputs: dict[str, list[Path]]) -> None:
    """Refuse a plan in which an output would replace an input file, or two cases would write one file.

    Compared by resolved path and, for files that exist, by ``os.path.samefile`` (hard links, bind mounts).
    """
    import os

    sources = [Path(f) for files in inputs.values() for f in files]
    resolved = {f.resolve(): f for f in sources}
    owner: dict[Path, str] = {}
    for case, paths in outputs.items():
        for p in paths:
            r = p.resolve()
            if r in owner:
                raise OutputError(f"cases {owner[r]!r} and {case!r} would both be written to {p.name}; "
                                  "rename one of the inputs", p.parent)
            owner[r] = case
            hit = resolved.get(r)
            if hit is None and p.exists():
                hit = next((f for f in sources if f.exists() and os.path.samefile(f, p)), None)
            if hit is not None:
                raise OutputError(f"refused: the output for case {case!r} would overwrite the input file {hit}; "
                                  "choose another --output", p)

