"""``modalseg predict``'s file layer: which files form a case (and in which modality order), what the outputs
are named and that none replaces an input, and writing them. Applying the models is
:class:`modalseg.inference.Predictor`'s (in-memory) job; several models (folds) are ensembled by averaging
their softmax probabilities (region-based models: their per-region sigmoid probabilities, as nnU-Net).

Probability files are named after ``meta.labels``, the network's output channels: ``CASE_prob_<class>`` for
every class (background included), or for a region model ``CASE_prob_<region>`` for every region (BraTS:
``CASE_prob_whole tumor``...; there is no background channel). The label file of a region model holds the
``regions_class_order`` values painted in order (:func:`modalseg.training.model_meta.paint_regions`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modalseg.data.io import (
    ImageRef,
    dicom_series,
    header_shape,
    is_dicom_series,
    is_supported,
    output_ending_for,
    strip_extension,
    write_volume,
)
from modalseg.data.types import Volume
from modalseg.errors import DataError, OutputError
from modalseg.inference.inferers import inferer_for
from modalseg.inference.predictor import LoadedModel, Predictor, load_models  # noqa: F401  (re-exported)
from modalseg.training.model_meta import ModelMeta, check_missing
from modalseg.utils.names import check_name, child_path

_CHANNEL_RE = re.compile(r"^(.*)_(\d{4})$")


def __getattr__(name: str) -> Any:
    """``CHECKPOINT_CHOICES`` and ``find_checkpoints`` (re-exported) come from the checkpoint module, which imports
    torch: imported on first use, so that this file layer also serves the torch-free runtime of exported models."""
    if name in ("CHECKPOINT_CHOICES", "find_checkpoints"):
        from modalseg.training import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def find_cases(inputs: Sequence[str | Path], meta: ModelMeta,
               missing: Sequence[str] | None = None) -> dict[str, list[Path]]:
    """Group inputs into cases, each a list of images in ``meta.modalities`` order.

    ``missing`` (``--missing``; a model trained with modality dropout only, :func:`check_missing`): modalities no
    case has; the cases are found and ordered as if the model read the others only. A case that lacks a modality
    not in ``missing`` is refused in one line naming it (and saying when ``--missing`` would do).

    Accepted: a folder of nnU-Net-named files (``CASE_0000.nii.gz`` ...; channel k = the training dataset's k-th
    channel) or of 4D files (``BRATS_001.nii.gz``, one per case, channel k likewise); a folder holding one image per
    modality, ``<modality>.<ext>`` files or ``<modality>/`` DICOM series folders (one case, named after the folder;
    names case-insensitive); a folder of such case folders (the folder layout's root: one case per sub-folder); a
    folder holding the DICOM series of every modality (chosen by SeriesDescription); or explicit files / DICOM
    folders of one case, put in modality order by their names (``_NNNN`` channel index or a modality name) where
    these say it, else taken in the order given (one printed line says which is which). A 4D file given alone is
    one case whose channels are the modalities. 4D channels and DICOM series are :class:`ImageRef` paths.
    """
    paths = [p if isinstance(p, Path) else Path(p) for p in inputs]
    for p in paths:
        if not p.exists():
            raise DataError("input not found", p)
    absent = check_missing(meta, missing)
    if absent:  # the rest reads the model as one of the modalities present (channel_names keep the file indices)
        meta = dataclasses.replace(meta, channel_names=list(meta.channel_names or meta.modalities),
                                   modalities=[m for m in meta.modalities if m not in absent])
    channel_names = list(meta.channel_names or meta.modalities)
    # file channel index of each modality the model reads (unpaired models read one image)
    needed = [channel_names.index(m) for m in meta.modalities] if meta.kind == "paired" else [0]
    if len(paths) == 1 and paths[0].is_dir():
        cases = _cases_in_folder(paths[0], meta, channel_names, needed)
        if cases is not None:
            return cases
    return _explicit_case(paths, meta, channel_names, needed)


def _missing_hint(meta: ModelMeta, missing: Sequence[str]) -> str:
    """``; ... pass --missing T2W ...`` when the model may predict without ``missing`` (trained with modality
    dropout that dropped each of them), else nothing: the message then only names what is missing."""
    dropped = meta.modality_dropout or {}
    if missing and meta.kind == "paired" and all(dropped.get(m, 0) > 0 for m in missing):
        return (f"; this model was trained with modality dropout: pass --missing {' '.join(missing)} to predict "
                "without it")
    return ""


def _listing(folder: Path, limit: int = 8) -> str:
    """What a folder holds, for messages: ``a.nii.gz, T1C/, ...`` (hidden entries left out)."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith("."))
    if not names:
        return "nothing"
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _entries(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files of a supported format, sub-folders) of ``folder``, hidden entries left out."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    return [p for p in entries if p.is_file() and is_supported(p)], [p for p in entries if p.is_dir()]


def _modality_inputs(folder: Path, modalities: Sequence[str]) -> dict[str, Path]:
    """Modality -> its image in ``folder``: a file ``<modality>.<ext>`` or a DICOM folder ``<modality>/`` (an
    :class:`ImageRef` whose series is that modality), names compared case-insensitively; two for one are refused."""
    files, dirs = _entries(folder)
    found: dict[str, Path] = {}
    for m in modalities:
        key = m.casefold()
        hits = [f for f in files if strip_extension(f.name).casefold() == key]
        hits += [d for d in dirs if d.name.casefold() == key]
        if len(hits) > 1:
            raise DataError(f"two inputs for modality {m}: {hits[0].name} and {hits[1].name}; keep one", folder)
        if hits:
            found[m] = ImageRef.make(hits[0], series=m) if hits[0].is_dir() else hits[0]
    return found


def _cases_in_folder(
    folder: Path, meta: ModelMeta, channel_names: Sequence[str], needed: Sequence[int]
) -> dict[str, list[Path]] | None:
    """The cases of a folder given alone; ``None`` when the folder is itself one DICOM input."""
    paired = meta.kind == "paired"
    mods = ", ".join(meta.modalities)
    files, dirs = _entries(folder)
    found = _modality_inputs(folder, meta.modalities) if paired else {}
    if paired and len(found) == len(meta.modalities):
        return {folder.name: [found[m] for m in meta.modalities]}
    by_stem = _one_file_per_case(files, lambda f: strip_extension(f.name))
    cases: dict[str, dict[int, Path]] = {}
    four_d: dict[str, Path] = {}
    for stem, f in by_stem.items():
        match = _CHANNEL_RE.match(stem)
        if match:
            cases.setdefault(match.group(1), {})[int(match.group(2))] = f
        elif len(channel_names) > 1 and f not in found.values():
            shape = header_shape(f)
            if shape is not None and len(shape) == 4 and shape[3] == len(channel_names):
                four_d[stem] = f
    if cases or four_d:
        result: dict[str, list[Path]] = {}
        for case, channels in sorted(cases.items()):
            missing = [k for k in needed if k not in channels]
            if missing:
                k = missing[0]
                name = channel_names[k] if k < len(channel_names) else f"channel {k}"
                raise DataError(f"case {case}: missing modality {name} (expected {case}_{k:04d} file)"
                                + _missing_hint(meta, [channel_names[j] for j in missing if j < len(channel_names)]),
                                folder)
            result[case] = [channels[k] for k in needed]
        for case, f in sorted(four_d.items()):
            if case in result:
                raise DataError(f"two inputs for case {case}: a 4D file and {case}_NNNN files; keep one", f)
            result[case] = [ImageRef.make(f, channel=k) for k in needed]
        return dict(sorted(result.items()))
    if not files and is_dicom_series(folder):  # the folder is one DICOM input (maybe every modality's series)
        return None
    if paired and not found and dirs:
        # a folder of case folders (the folder layout's root): each sub-folder holding every modality is a case
        result = {}
        for d in dirs:
            got = _modality_inputs(d, meta.modalities)
            if len(got) == len(meta.modalities):
                result[d.name] = [got[m] for m in meta.modalities]
            elif got:
                lacking = [m for m in meta.modalities if m not in got]
                raise DataError(f"case {d.name}: missing modality {', '.join(lacking)} (expected one image per "
                                f"modality ({mods}) as <modality>.nii.gz-style files or DICOM folders; found "
                                f"{_listing(d)})" + _missing_hint(meta, lacking), d)
        if result:
            return result
    if found:
        lacking = [m for m in meta.modalities if m not in found]
        raise DataError(f"missing modality {', '.join(lacking)} (expected one image per modality ({mods}) as "
                        f"<modality>.nii.gz-style files or <modality>/ DICOM folders, names case-insensitive; found "
                        f"{_listing(folder)})" + _missing_hint(meta, lacking), folder)
    raise DataError(
        f"no input images found (expected CASE_0000.nii.gz-style files, one 4D file per case, <modality>.nii.gz-style "
        f"files or <modality>/ DICOM folders ({mods}), one folder per case holding those, or a folder holding DICOM "
        f"series; found {_listing(folder)})",
        folder,
    )


def _explicit_case(
    paths: list[Path], meta: ModelMeta, channel_names: Sequence[str], needed: Sequence[int]
) -> dict[str, list[Path]]:
    """One case from explicitly given files or DICOM folders (or one 4D file, or one folder of DICOM series)."""
    expected = len(needed)
    mods = ", ".join(meta.modalities)
    for p in paths:
        if p.is_dir() and not is_dicom_series(p):
            raise DataError("a folder with no DICOM files in it, given with other inputs (give image files or DICOM "
                            "series folders, or one folder of cases alone)", p)
    shapes = {i: header_shape(p) for i, p in enumerate(paths) if getattr(p, "channel", None) is None}
    four_d = {i: s for i, s in shapes.items() if s is not None and len(s) == 4}
    if len(paths) == 1 and four_d:
        f, shape = paths[0], four_d[0]
        if shape[3] != len(channel_names):
            raise DataError(f"4D image (shape {shape}) with {shape[3]} channels, but the model's dataset has "
                            f"{len(channel_names)} ({', '.join(channel_names)})", f)
        refs: list[Path] = [ImageRef.make(f, channel=k) for k in needed]
        taken = ", ".join(f"{k} as {channel_names[k]}" for k in needed)
        print(f"{f.name}: 4D image with {shape[3]} channels; channel {taken}", flush=True)
        return {explicit_case_name(refs, needed): refs}
    if four_d:
        i, shape = next(iter(four_d.items()))
        raise DataError(
            f"4D image (shape {shape}) with {shape[3]} channels, given as one of {len(paths)} inputs where the model "
            f"reads {expected} separate images, one per modality ({mods}); pass a 4D file alone to use its channels "
            "as the modalities",
            paths[i],
        )
    if len(paths) == 1 and paths[0].is_dir() and meta.kind == "paired" and expected > 1:
        folder = paths[0]
        series = dicom_series(folder)
        if len(series) < expected:
            raise DataError(
                f"{len(series)} DICOM series in this folder, but the model reads {expected} ({mods}); put each "
                "modality's series in a folder named after it and give those folders (or the folder holding them)",
                folder,
            )
        return {folder.name: [ImageRef.make(folder, series=m) for m in meta.modalities]}
    if len(paths) != expected:
        lacking = _unclaimed(paths, meta) if len(paths) < expected else []
        said = f" (missing modality {', '.join(lacking)})" + _missing_hint(meta, lacking) if lacking else ""
        raise DataError(f"the model needs {expected} file(s), one per modality ({mods}); got {len(paths)}{said}",
                        paths[0])
    ordered, note = order_inputs(paths, meta)
    if note:
        print(note, flush=True)
    if meta.kind == "paired":  # a DICOM folder's series is chosen by its modality's name when it holds several
        ordered = [ImageRef.make(p, series=m) if p.is_dir() and not getattr(p, "series", None) else p
                   for p, m in zip(ordered, meta.modalities, strict=True)]
    return {explicit_case_name(ordered, needed, meta.modalities): ordered}


def _unclaimed(paths: Sequence[Path], meta: ModelMeta) -> list[str]:
    """The model's modalities that none of too few explicit inputs names (by ``_NNNN`` index or modality name);
    empty when some input's name says nothing (then which one is missing is unknown)."""
    channel_names = list(meta.channel_names or meta.modalities)
    claimed = set()
    for p in paths:
        match = _CHANNEL_RE.match(_input_stem(p))
        named = named_modalities(p, channel_names)
        if match and int(match.group(2)) < len(channel_names):
            claimed.add(channel_names[int(match.group(2))])
        elif len(named) == 1:
            claimed.add(named[0])
        else:
            return []
    return [m for m in meta.modalities if m not in claimed]


def _input_stem(path: Path) -> str:
    return path.name if path.is_dir() else strip_extension(path.name)


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^0-9a-z]+", text.casefold()) if w]


def named_modalities(path: Path, names: Sequence[str]) -> list[str]:
    """The modality names that a file or folder name contains as whole words, case-insensitively (``t2w.nii.gz``,
    ``case_T1C.nrrd``, ``T1C/``; ``T1`` is not in ``T1C``). A name inside a longer one found too (``T1`` in
    ``T1_post`` beside ``T1 post``) is dropped."""
    words = _words(_input_stem(path))
    found = []
    for name in names:
        w = _words(name)
        if w and any(words[i : i + len(w)] == w for i in range(len(words) - len(w) + 1)):
            found.append((name, w))
    return [n for n, w in found if not any(len(o) > len(w) and " ".join(w) in " ".join(o) for _, o in found)]


def order_inputs(paths: Sequence[Path], meta: ModelMeta) -> tuple[list[Path], str | None]:
    """Explicit inputs in the model's modality order, by what their names say, and a line to print (or ``None``).

    A name says which modality it is by an nnU-Net channel index (``CASE_0001``; used only when every input has one
    naming a channel of the model's dataset) or by a modality name as a word (:func:`named_modalities`). Inputs
    whose names say nothing fill the remaining places in the order given. Refused: a name naming two modalities,
    index and name disagreeing, a modality the model does not read, two inputs for one modality.
    """
    paths = list(paths)
    if meta.kind != "paired" or len(paths) < 2:
        return paths, None
    channel_names = list(meta.channel_names or meta.modalities)
    wanted = list(meta.modalities)
    given = ", ".join(p.name for p in paths)
    indices: list[int] = []
    for p in paths:
        match = _CHANNEL_RE.match(_input_stem(p))
        if not match or int(match.group(2)) >= len(channel_names):
            indices = []
            break
        indices.append(int(match.group(2)))
    owner: dict[str, Path] = {}
    claims: list[str | None] = []
    for k, p in enumerate(paths):
        named = named_modalities(p, channel_names)
        if len(named) > 1:
            raise DataError(f"the name names {len(named)} modalities ({', '.join(named)}); expected one image per "
                            f"modality ({', '.join(wanted)}), given {given}", p)
        by_index = channel_names[indices[k]] if indices else None
        ref_channel = getattr(p, "channel", None)  # an ImageRef to one channel of a 4D file says it itself
        if ref_channel is not None and 0 <= ref_channel < len(channel_names):
            by_index = channel_names[ref_channel]
        claim = by_index or (named[0] if named else None)
        if by_index and named and named[0] != by_index:
            raise DataError(f"the name says {named[0]} but its channel index _{indices[k]:04d} is {by_index}", p)
        if claim is not None and claim not in wanted:
            raise DataError(f"the name says {claim}, which this model does not read (it reads {', '.join(wanted)}); "
                            f"given {given}", p)
        if claim is not None and claim in owner:
            raise DataError(f"two inputs for modality {claim}: {owner[claim].name} and {p.name}; expected one image "
                            f"per modality ({', '.join(wanted)}), given {given}", p)
        if claim is not None:
            owner[claim] = p
        claims.append(claim)
    free = [p for p, c in zip(paths, claims, strict=True) if c is None]
    ordered = [owner[m] if m in owner else free.pop(0) for m in wanted]
    pairs = ", ".join(f"{p.name} as {m}" for p, m in zip(ordered, wanted, strict=True))
    if not owner:
        return ordered, f"taking {pairs} (the order given: no input name says its modality)"
    if len(owner) < len(wanted):
        named_ones = ", ".join(owner[m].name for m in wanted if m in owner)
        return ordered, f"taking {pairs} ({named_ones} by name, the others in the order given)"
    if any(a is not b for a, b in zip(ordered, paths, strict=True)):  # identity: channels of one 4D file are equal
        return ordered, f"reordered by name: taking {pairs}"
    return ordered, None


def explicit_case_name(paths: Sequence[Path], needed: Sequence[int], modalities: Sequence[str] = ()) -> str:
    """The case name of explicitly given inputs: the first file's name without its extension, and without a
    ``_NNNN`` channel suffix only where nnU-Net naming is in use, i.e. every file is ``CASE_NNNN`` with one CASE
    and the indices are the channels the model reads (``patient7_0301.nrrd`` stays ``patient7_0301``). DICOM folders
    named exactly after the ``modalities`` (``STUDY/T1C/ STUDY/T2W/``) are named after the folder holding them, as
    ``--input STUDY/`` is; explicit files keep the first file's name (``t1c.nii.gz`` -> ``t1c``)."""
    stems = [_input_stem(p) for p in paths]
    matches = [_CHANNEL_RE.match(s) for s in stems]
    if all(matches) and len({m.group(1) for m in matches}) == 1 and [int(m.group(2)) for m in matches] == list(needed):
        return matches[0].group(1)
    parents = {Path(p).absolute().parent for p in paths}
    named = [s.casefold() for s in stems] == [m.casefold() for m in modalities]
    if modalities and named and len(parents) == 1 and next(iter(parents)).name and all(p.is_dir() for p in paths):
        return next(iter(parents)).name
    return stems[0]


def predict_case(
    models: Sequence[LoadedModel],
    files: Sequence[Path],
    *,
    modality: str | None = None,
    batch_size: int = 8,
    strict: bool = False,
    case: str | None = None,
    tta: str = "none",
    missing: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, Volume]:
    """(label volume in file label values, probabilities (C, X, Y, Z), reference volume) of one case's files:
    :meth:`modalseg.inference.Predictor.predict_files` with the case named as ``find_cases`` names explicitly
    given files (the name appears in the lines that say an assistant was resampled); ``tta="flip"`` averages the
    in-plane mirrored predictions (inference/tta.py); ``missing``: modalities not among ``files`` (a model trained
    with modality dropout)."""
    from modalseg.inference.tta import tta_axes, with_tta

    # the model's own inferer: slices (2D), slices with neighbours (2.5D) or sliding windows (3D)
    meta = models[0].meta
    predictor = Predictor(models, inferer=with_tta(inferer_for(meta, batch_size), tta,
                                                   tta_axes(getattr(meta, "spatial_dims", 2))))
    if case is None:
        meta = predictor.meta
        needed = [(meta.channel_names or meta.modalities).index(m) for m in predictor.input_names(None, missing)] \
            if meta.kind == "paired" else [0]
        case = explicit_case_name([f if isinstance(f, Path) else Path(f) for f in files], needed)
    result = predictor.predict_files(files, modality=modality, strict=strict, case=case, missing=missing)
    return result.labels, result.probabilities, result.reference


def output_ending(files: Sequence[Path], file_ending: str | None = None) -> str:
    """The file ending of a case's outputs: ``file_ending`` when given (``--file-ending``), else the format of the
    case's first input (``.nrrd`` gives ``.nrrd``; DICOM gives ``.nii.gz``)."""
    return file_ending if file_ending else output_ending_for(files[0])


def write_prediction(
    out_dir: Path, case: str, labels: np.ndarray, probs: np.ndarray | None, reference: Volume, class_names: list[str],
    file_ending: str | None = None,
) -> list[Path]:
    """Write ``CASE<ending>`` (labels) and optionally ``CASE_prob_<class><ending>`` with the input's geometry (and
    its dimensionality: a 2D input gives 2D files). ``file_ending=None``: the reference's own format."""
    if file_ending is None:
        file_ending = output_ending_for(reference.path) if reference.path is not None else ".nii.gz"
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


def dicom_seg_output_paths(out_dir: Path, case: str, class_names: Sequence[str] | None, file_ending: str) -> list[Path]:
    """``CASE.dcm`` (the DICOM-SEG) and, with ``class_names``, ``CASE_prob_<class><file_ending>`` (probabilities stay
    images: a DICOM-SEG holds labels), each a checked direct child of ``out_dir`` as in :func:`output_paths`."""
    from modalseg.data.dicom_seg import SEG_ENDING

    probs = output_paths(out_dir, case, class_names, file_ending)[1:] if class_names else []
    return [output_paths(out_dir, case, None, SEG_ENDING)[0], *probs]


def write_dicom_seg_prediction(
    out_dir: Path, case: str, labels: np.ndarray, probs: np.ndarray | None, reference: Volume, source: Path,
    class_labels: dict[str, int], *, model_name: str = "", file_ending: str = ".nii.gz",
) -> list[Path]:
    """``--output-format dicom-seg``: write ``CASE.dcm``, one DICOM Segmentation referring to the DICOM series
    ``source`` (the case's first input, which ``reference`` was read from), and optionally the probabilities as
    images with the series' geometry; the paths are :func:`dicom_seg_output_paths`."""
    from modalseg.data.dicom_seg import write_dicom_seg

    paths = dicom_seg_output_paths(out_dir, case, list(class_labels) if probs is not None else None, file_ending)
    segments = dict(class_labels)
    if 0 not in segments.values():  # a region model's labels name its regions only: every one is a segment
        segments = {"background": 0, **segments}
    write_dicom_seg(paths[0], np.asarray(labels), reference, source, segments, model_name=model_name)
    if probs is not None:
        for c, p in enumerate(paths[1:]):
            write_volume(p, probs[c].astype(np.float32), reference)
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

