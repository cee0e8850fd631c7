"""Dataset layouts on disk -> :class:`~modalseg.data.types.DatasetSpec`.

``load_dataset(root, layout="auto", *, split="train", **options)`` lists a dataset's files without
reading any image (use :func:`modalseg.data.verify.verify_dataset` for that). Files a layout declares
but that are missing (a channel of a case, a training label) still appear in the spec, so that the
integrity check can report every one of them at once. Problems with the layout itself (no
``dataset.json``, a key of the wrong type, a file name that fits no pattern) raise :class:`DataError`.

Test cases: ``split="test"`` returns the held-out cases: nnU-Net ``imagesTs`` (with
``labelsTs/CASE{file_ending}`` as label where that file exists, else ``label=None``), MS-CMRSeg images
that have no ``*_manual`` label, MM-WHS ``{ct,mr}_test_*_image`` (``label=None``). The "folder" layout
has no test split.

Layouts
-------
``"nnunet"`` -- nnU-Net v2 raw / Medical Segmentation Decathlon style::

    root/dataset.json
    root/imagesTr/CASE_0000.nii.gz, CASE_0001.nii.gz, ...   (one file per channel, 4-digit index)
    root/labelsTr/CASE.nii.gz
    root/imagesTs/CASE_0000.nii.gz, ...                      (optional, split="test")
    root/labelsTs/CASE.nii.gz                                (optional)

  ``dataset.json`` keys: ``channel_names`` ({"0": "T1C", "1": "T2W"}), ``labels``
  ({"background": 0, "mass": 1}; integer values, background first with value 0; nnU-Net's
  ``"ignore": K`` label (K the highest value) and region lists with ``regions_class_order`` are read as
  nnU-Net does, see docs/conventions.md), ``file_ending`` (".nii.gz", ".nrrd", ".mha", ...), ``numTraining``
  (must equal the number of cases found in imagesTr). The MSD v1 spellings ``modality`` (for
  ``channel_names``) and ``labels`` as {"0": "background", ...} are accepted. MSD datasets (a
  ``training`` list in dataset.json) whose image files carry no ``_0000`` suffix hold one file per case:
  a 3D file for one channel, a 4D file ``X x Y x Z x C`` with one channel per modality otherwise
  (BraTS: ``imagesTr/BRATS_001.nii.gz`` with FLAIR, T1w, T1gd, T2w); such a case's ``images`` are
  :class:`~modalseg.data.io.ImageRef` paths to that one file, channel 0..C-1, which every reader of
  ``CaseFiles.images`` reads as separate volumes. Labels stay 3D.

  modalseg extensions (all optional):

  * ``"case_patient": {case_id: patient_id}`` -- groups cases of one patient for cross-validation
    splits (default: each case is its own patient).
  * unpaired datasets: ``"paired": false``, ``"modalities": ["CT", "MR"]``,
    ``"case_modality": {case_id: modality}`` (every case listed), and ``channel_names`` with a single
    channel (``{"0": "image"}``). Each case then has one image and its ``modality`` set.
  * label values need not be consecutive: ``{"background": 0, "LV": 500, "Myo": 200, "RV": 600}``;
    the network's class index is the position in this dict.
  * ``"labels_to_background": [550, 600]`` -- values present in label files that map to background.

``"mscmrseg"`` -- MS-CMRSeg 2019: ``patient{N}_{C0,LGE,T2}.nii.gz`` images and
  ``patient{N}_{C0,LGE,T2}_manual.nii.gz`` labels anywhere under ``root``. Unpaired; option
  ``modalities=("LGE", "C0")`` (``"bSSFP"`` is accepted for C0). The spec's modality names are the
  display names "LGE", "bSSFP", "T2". Label values 500 LV blood pool, 200 myocardium, 600 RV.
  Case id = file name without extension (``patient3_C0``), patient id ``patient3``.

``"mmwhs"`` -- MM-WHS 2017: ``{ct,mr}_train_{1001..1020}_{image,label}.nii.gz`` under ``root``.
  Unpaired, modalities "CT", "MR" (option ``modalities``). Paper 2's four classes
  ``{"background": 0, "LVM": 205, "LAC": 420, "LVC": 500, "AA": 820}``; ``labels_to_background``
  defaults to ``(550, 600, 850, 421)``: RA, RV and pulmonary artery, which paper 2 does not segment,
  plus 421, a stray value found in a few MM-WHS label files. The facts file lists only the seven
  official values; 421 is sent to background (not to LAC) because it marks a handful of voxels and
  mapping it elsewhere would be a guess. Pass ``labels_to_background=`` to change this.

``"folder"`` -- simple paired layout::

    root/modalseg.json    {"modalities": ["T1C", "T2W"], "labels": {"background": 0, "mass": 1}}
    root/CASE/T1C.nii.gz, root/CASE/T2W.nii.gz   (one file per modality, named after it)
    root/CASE/label.nii.gz

  Optional keys of ``modalseg.json``: ``name``, ``file_ending`` (default ".nii.gz"),
  ``case_patient``, ``labels_to_background``, ``regions_class_order`` (labels as in dataset.json, ``ignore``
  and regions included). Every sub-folder (not starting with ".") is a case.
  Names are matched case-insensitively (``t1c.nii.gz`` is modality T1C). Where ``<modality><ending>`` is
  absent, a sub-folder ``root/CASE/<modality>/`` holding the modality's DICOM series is used (read by
  :func:`~modalseg.data.io.read_volume`); the label stays a file, ``label<ending>`` or ``label`` with any
  supported extension (``label.nii.gz`` beside DICOM folders). Two images for one modality are refused.

``"auto"`` -- ``dataset.json`` -> nnunet; ``modalseg.json`` -> folder; MS-CMRSeg or MM-WHS file names
  -> that layout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modalseg.data.io import SUPPORTED_EXTENSIONS, ImageRef, is_supported, strip_extension
from modalseg.data.types import IGNORE_INDEX, CaseFiles, DatasetSpec
from modalseg.errors import ConfigError, DataError
from modalseg.utils.names import check_name

LAYOUTS = ("nnunet", "mscmrseg", "mmwhs", "folder")

MSCMRSEG_LABELS = {"background": 0, "LV": 500, "Myo": 200, "RV": 600}
MSCMRSEG_DISPLAY = {"C0": "bSSFP", "LGE": "LGE", "T2": "T2"}
MMWHS_LABELS = {"background": 0, "LVM": 205, "LAC": 420, "LVC": 500, "AA": 820}
MMWHS_TO_BACKGROUND = (550, 600, 850, 421)

_MSCMR_RE = re.compile(r"^patient(\d+)_(C0|LGE|T2)(_manual)?\.nii(\.gz)?$", re.IGNORECASE)
_MMWHS_RE = re.compile(r"^(ct|mr)_(train|test)_(\d+)_(image|label)\.nii(\.gz)?$", re.IGNORECASE)
_CHANNEL_RE = re.compile(r"^(.*)_(\d{4})$")

#: dataset.json keys of nnU-Net v2, the Decathlon (MSD v1) and modalseg's extensions; anything else is a warning.
NNUNET_KEYS = frozenset({
    "channel_names", "modality", "labels", "numTraining", "file_ending", "training", "test", "numTest", "name",
    "description", "reference", "licence", "license", "release", "tensorImageSize", "regions_class_order",
    "overwrite_image_reader_writer", "dataset_name", "author", "citation",
    "case_patient", "paired", "modalities", "case_modality", "labels_to_background", "modalseg_synth",
})
FOLDER_KEYS = frozenset({"modalities", "labels", "name", "file_ending", "case_patient", "labels_to_background",
                         "regions_class_order"})


def load_dataset(
    root: str | Path, layout: str = "auto", *, split: str = "train", **options: Any
) -> DatasetSpec:
    """List the cases of the dataset at ``root`` (see the module docstring for the layouts).

    ``split`` is "train" (labelled cases) or "test" (unlabelled cases, ``label=None``).
    """
    root = Path(root)
    if not root.exists():
        raise DataError("dataset folder not found", root)
    if not root.is_dir():
        raise DataError("not a folder (a dataset is a folder)", root)
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', not {split!r}")
    if layout == "auto":
        layout = detect_layout(root)
    loaders = {
        "nnunet": _load_nnunet,
        "mscmrseg": _load_mscmrseg,
        "mmwhs": _load_mmwhs,
        "folder": _load_folder,
    }
    if layout not in loaders:
        raise ConfigError(f"unknown dataset layout {layout!r} (choose from auto, {', '.join(LAYOUTS)})")
    spec = loaders[layout](root, split, **options)
    _check_spec_names(spec)
    return spec


def _check_spec_names(spec: DatasetSpec) -> None:
    """Refuse names that would be unsafe in a file name, and modality names that collide (issue: names are data).

    Dataset, class and modality names come from a JSON file, case ids from file or folder names; all of them
    end up in output or cache paths. Modality names are compared case-insensitively, because files named after
    them (``T1C.nii.gz`` / ``t1c.nii.gz``) are the same file on case-insensitive file systems.
    """
    declared = next((spec.root / n for n in ("dataset.json", "modalseg.json") if (spec.root / n).is_file()), spec.root)
    check_name(spec.name, "dataset name", declared, DataError)
    for name in spec.labels:
        check_name(name, "class name", declared, DataError)
    seen: dict[str, str] = {}
    for name in spec.modalities:
        check_name(name, "modality name", declared, DataError)
        if name.casefold() in seen:
            raise DataError(
                f"modality (channel) name {name!r} is declared twice (also {seen[name.casefold()]!r}); "
                "each channel must have its own name", declared)
        seen[name.casefold()] = name
    for case in spec.cases:
        check_name(case.case_id, "case id", case.images[0] if case.images else spec.root, DataError)


def _unknown_keys(meta: dict, known: Iterable[str], path: Path) -> list[str]:
    """One warning per key nobody reads, with the closest known key (a typo such as ``case_patients``)."""
    import difflib

    known = sorted(known)
    out = []
    for key in sorted(set(meta) - set(known)):
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        out.append(f"{path}: unknown key {key!r} is ignored{hint}")
    return out


def _spec_from_json(meta: dict, jpath: Path, known_keys: Iterable[str], *, root: Path, **fields: Any) -> DatasetSpec:
    """A spec described by a JSON file: its ``name`` (default: the folder's resolved name, never ``..``) and one
    warning per key nobody reads."""
    name = meta.get("name") if isinstance(meta.get("name"), str) else root.resolve().name
    return DatasetSpec(root=root, name=name, warnings=_unknown_keys(meta, known_keys, jpath), **fields)


def _check_case_patient(case_patient: dict[str, str], case_ids: Iterable[str], path: Path) -> None:
    """A ``case_patient`` entry naming no case is a typo that would silently leave a patient ungrouped."""
    ids = set(case_ids)
    unknown = sorted(c for c in case_patient if c not in ids)
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise DataError(f"key 'case_patient' names {len(unknown)} case(s) not in the dataset: {shown}", path)


def detect_layout(root: str | Path) -> str:
    """The layout of ``root``: dataset.json -> nnunet, modalseg.json -> folder, else by file names."""
    root = Path(root)
    if (root / "dataset.json").is_file():
        return "nnunet"
    if (root / "modalseg.json").is_file():
        return "folder"
    names = [p.name for p in root.rglob("*") if p.is_file()]
    if any(_MSCMR_RE.match(n) for n in names):
        return "mscmrseg"
    if any(_MMWHS_RE.match(n) for n in names):
        return "mmwhs"
    raise DataError(
        "cannot detect the dataset layout (tried nnunet: no dataset.json; folder: no modalseg.json; "
        "mscmrseg: no patient{N}_{C0,LGE,T2}.nii.gz; mmwhs: no {ct,mr}_train_{N}_image.nii.gz)",
        root,
    )


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read ({exc})", path) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", path) from None
    if not isinstance(data, dict):
        raise DataError(f"expected a JSON object at the top level, found {type(data).__name__}", path)
    return data


def _type_name(value: Any) -> str:
    return {
        dict: "object",
        list: "list",
        str: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
    }.get(type(value), type(value).__name__)


def _require(data: dict, key: str, kind: type | tuple[type, ...], path: Path, what: str) -> Any:
    if key not in data:
        raise DataError(f"missing key {key!r} ({what})", path)
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(f"key {key!r} must be {what}, found {_type_name(value)} {value!r}"[:200], path)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class LabelDefinition:
    """A dataset's labels as training reads them: ``labels`` (name -> file value, background first; for a region
    dataset each region's ``regions_class_order`` value), nnU-Net's ``ignore`` value and the ``regions``."""

    labels: dict[str, int]
    ignore: int | None = None
    regions: dict[str, tuple[int, ...]] | None = None


#: Region label values must fit the cache's uint8 labels beside :data:`~modalseg.data.types.IGNORE_INDEX`.
MAX_REGION_VALUE = IGNORE_INDEX - 1


def _parse_labels(labels: Any, path: Path, key: str = "labels", order: Any = None) -> LabelDefinition:
    """The ``labels`` object with nnU-Net's rules (``LabelManager``; the same checks and wording as
    ``modalseg evaluate --dataset``, training/evaluate_folder.py): ``ignore`` is one integer, the highest value,
    never a class; the dataset has regions when a value is a list of more than one label, and then
    ``regions_class_order`` (``order``) must give the value painted for each region, one of its own values."""
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"key {key!r} must be a non-empty object {{name: value}}", path)
    # MSD v1 spelling: {"0": "background", "1": "tumour"} (value -> name).
    if all(isinstance(v, str) for v in labels.values()) and all(re.fullmatch(r"\d+", str(k)) for k in labels):
        items = sorted(((int(k), v) for k, v in labels.items()), key=lambda kv: kv[0])
        labels = {name: value for value, name in items}
    ignore: int | None = None
    entries: dict[str, tuple[int, ...]] = {}
    for name, value in labels.items():
        if str(name) == "ignore":  # nnU-Net's ignore label: unannotated voxels, never a class
            if not _is_int(value) or value < 0:
                raise DataError(f"key {key!r}: the ignore label must be one integer value >= 0, found {value!r}", path)
            ignore = int(value)
            continue
        if _is_int(value):
            entries[str(name)] = (int(value),)
        elif isinstance(value, list | tuple) and value and all(_is_int(v) for v in value):
            entries[str(name)] = tuple(int(v) for v in value)
        else:
            raise DataError(f"key {key!r}: value of {name!r} must be an integer, found {value!r}", path)
        if min(entries[str(name)]) < 0:
            raise DataError(f"key {key!r}: {name!r} has a negative label value ({list(entries[str(name)])})", path)
    if not entries:
        raise DataError(f"key {key!r}: no background entry with value 0", path)
    first_name, first_values = next(iter(entries.items()))
    if first_values != (0,):
        raise DataError(
            f"key {key!r}: the first entry must be the background with value 0, found {first_name!r}: "
            f"{list(first_values) if len(first_values) > 1 else first_values[0]}",
            path,
        )
    has_regions = any(len(v) > 1 for v in entries.values())
    out: dict[str, int]
    regions: dict[str, tuple[int, ...]] | None = None
    if not has_regions:
        out = {name: values[0] for name, values in entries.items()}
        values = list(out.values())
        if len(set(values)) != len(values):
            raise DataError(f"key {key!r}: label values are not unique ({values})", path)
        used = set(values)
    else:
        regions = _parse_regions(dict(list(entries.items())[1:]), order, path, key)
        out = {first_name: 0, **{name: int(v) for name, v in zip(regions, order, strict=True)}}
        used = {0, *(v for vs in regions.values() for v in vs)}
    check_ignore_label(ignore, entries, used, path, key)
    return LabelDefinition(out, ignore, regions)


def check_ignore_label(ignore: int | None, entries: dict[str, Any], used: set[int], path: Path,
                       key: str = "labels") -> None:
    """nnU-Net's rules for its ``ignore`` label: the value of no class or region, and the highest label value."""
    if ignore is None:
        return
    clash = [n for n, vs in entries.items() if ignore in (vs if isinstance(vs, list | tuple) else [vs])]
    if clash:
        raise DataError(f"key {key!r}: the ignore label {ignore} is also the value of {clash[0]!r}", path)
    if ignore < max(used):
        raise DataError(f"key {key!r}: the ignore label {ignore} must be the highest label value "
                        f"(nnU-Net's rule; {max(used)} is higher)", path)


def _parse_regions(regions: dict[str, tuple[int, ...]], order: Any, path: Path, key: str) -> dict[str, tuple[int, ...]]:
    """Region name -> its label values, checked as nnU-Net does plus what painting the regions back needs."""
    if not regions:
        raise DataError(f"key {key!r}: no foreground label or region to train", path)
    seen: dict[frozenset[int], str] = {}
    for name, values in regions.items():
        if 0 in values:
            raise DataError(f"key {key!r}: {name!r} includes the background value 0 ({list(values)})", path)
        if frozenset(values) in seen:
            raise DataError(f"key {key!r}: regions {seen[frozenset(values)]!r} and {name!r} have the same values "
                            f"({sorted(values)})", path)
        seen[frozenset(values)] = name
        if max(values) > MAX_REGION_VALUE:
            raise DataError(f"key {key!r}: region {name!r} has label value {max(values)}; region label values must "
                            f"be at most {MAX_REGION_VALUE} (they are cached as uint8)", path)
    if order is None:
        raise DataError("key 'regions_class_order' is required with region-based labels (the label value painted "
                        "for each region at prediction, later regions over earlier ones)", path)
    if not isinstance(order, list | tuple) or not all(_is_int(v) for v in order) or len(order) != len(regions):
        raise DataError(f"key 'regions_class_order' must list one integer per region ({len(regions)}), "
                        f"found {order!r}", path)
    if len(set(order)) != len(order):
        raise DataError(f"key 'regions_class_order' must paint each region with its own value, found {order!r} (a "
                        "repeated value cannot be told apart in the painted labels)", path)
    for (name, values), value in zip(regions.items(), order, strict=True):
        if value not in values:
            raise DataError(f"key 'regions_class_order': the value {value} painted for region {name!r} is not one of "
                            f"its label values {list(values)} (the painted labels would not give the region back)",
                            path)
    return regions


def _check_to_background(labels: LabelDefinition, to_background: tuple[int, ...], path: Path) -> None:
    """The ignore label is not background: a voxel cannot be both unannotated and annotated as background."""
    if labels.ignore is not None and labels.ignore in to_background:
        raise DataError(f"key 'labels_to_background' lists the ignore label {labels.ignore}; it cannot be both", path)


def _parse_int_list(value: Any, path: Path, key: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not all(_is_int(v) for v in value):
        raise DataError(f"key {key!r} must be a list of integers, found {value!r}", path)
    return tuple(int(v) for v in value)


def _parse_str_map(value: Any, path: Path, key: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise DataError(f"key {key!r} must be an object {{case_id: string}}", path)
    return {str(k): v for k, v in value.items()}


def _check_ending(ending: Any, path: Path, key: str = "file_ending") -> str:
    if not isinstance(ending, str):
        raise DataError(f"key {key!r} must be a string, found {_type_name(ending)} {ending!r}", path)
    if ending.lower() not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"key {key!r}: unsupported file ending {ending!r} (supported: {', '.join(SUPPORTED_EXTENSIONS)})",
            path,
        )
    return ending


def _no_options(layout: str, options: dict) -> None:
    if options:
        raise ConfigError(f"layout {layout!r} takes no option {', '.join(sorted(options))}")


def _natural_key(text: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text))


def _files_with_ending(folder: Path, ending: str) -> list[Path]:
    low = ending.lower()
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.name.lower().endswith(low) and not p.name.startswith(".")
    )


# ----------------------------------------------------------------------------------------------------
# nnU-Net / MSD
# ----------------------------------------------------------------------------------------------------


def _load_nnunet(root: Path, split: str, **options: Any) -> DatasetSpec:
    _no_options("nnunet", options)
    jpath = root / "dataset.json"
    meta = _read_json(jpath)

    if "channel_names" in meta:
        channels_raw = _require(meta, "channel_names", dict, jpath, 'an object {"0": "T1C", ...}')
    elif "modality" in meta:  # MSD v1
        channels_raw = _require(meta, "modality", dict, jpath, 'an object {"0": "MRI", ...}')
    else:
        raise DataError('missing key \'channel_names\' (an object {"0": "T1C", ...})', jpath)
    try:
        indices = sorted(int(k) for k in channels_raw)
    except ValueError:
        raise DataError(
            f'key \'channel_names\': keys must be channel indices "0", "1", ... found {list(channels_raw)}',
            jpath,
        ) from None
    if indices != list(range(len(indices))) or not indices:
        raise DataError(f"key 'channel_names': indices must be 0..N-1, found {list(channels_raw)}", jpath)
    if not all(isinstance(v, str) for v in channels_raw.values()):
        raise DataError("key 'channel_names': channel names must be strings", jpath)
    by_index = {int(k): v for k, v in channels_raw.items()}
    channels = [by_index[i] for i in indices]

    labels = _parse_labels(_require(meta, "labels", dict, jpath, "an object {name: value}"), jpath,
                           order=meta.get("regions_class_order"))
    training_list = meta.get("training")
    if "file_ending" in meta or not isinstance(training_list, list):
        ending = _check_ending(_require(meta, "file_ending", str, jpath, 'a string such as ".nii.gz"'), jpath)
    else:
        ending = ".nii.gz"  # MSD v1 has no file_ending
    num_training = _require(meta, "numTraining", int, jpath, "an integer")
    to_background = _parse_int_list(meta.get("labels_to_background", []), jpath, "labels_to_background")
    case_patient = _parse_str_map(meta.get("case_patient", {}), jpath, "case_patient")

    paired = meta.get("paired", True)
    if not isinstance(paired, bool):
        raise DataError(f"key 'paired' must be true or false, found {paired!r}", jpath)
    case_modality: dict[str, str] = {}
    if paired:
        modalities = channels
    else:
        modalities = _require(meta, "modalities", list, jpath, 'a list such as ["CT", "MR"] (unpaired)')
        if not modalities or not all(isinstance(m, str) for m in modalities):
            raise DataError("key 'modalities' must be a non-empty list of strings", jpath)
        if len(channels) != 1:
            raise DataError(
                f"key 'channel_names': an unpaired dataset has one channel per case, found {len(channels)}",
                jpath,
            )
        case_modality = _parse_str_map(
            _require(meta, "case_modality", dict, jpath, "an object {case_id: modality} (unpaired)"),
            jpath,
            "case_modality",
        )

    folder = root / ("imagesTr" if split == "train" else "imagesTs")
    if split == "test" and not folder.is_dir():
        raise DataError("no test images (imagesTs not found)", folder)
    if not folder.is_dir():
        raise DataError("folder not found (nnU-Net layout expects imagesTr/)", folder)

    groups = _group_channels(folder, ending, len(channels), training_list)
    label_folder = root / ("labelsTr" if split == "train" else "labelsTs")
    cases: list[CaseFiles] = []
    for case_id in sorted(groups):
        images: tuple[Path, ...] = tuple(folder / f"{case_id}_{i:04d}{ending}" for i in range(len(channels)))
        single = groups[case_id]
        if single is not None:  # MSD: one file per case, 3D for one channel, else 4D (channel k = modality k)
            images = (single,) if len(channels) == 1 else tuple(
                ImageRef.make(single, channel=k) for k in range(len(channels)))
        modality = None
        if not paired:
            if case_id not in case_modality:
                raise DataError(f"key 'case_modality' has no entry for case {case_id!r}", jpath)
            modality = case_modality[case_id]
            if modality not in modalities:
                raise DataError(
                    f"key 'case_modality': case {case_id!r} has modality {modality!r}, "
                    f"not one of {modalities}",
                    jpath,
                )
        label: Path | None = label_folder / f"{case_id}{ending}"
        if split == "test" and not label.is_file():
            label = None  # test labels are optional (labelsTs is not part of nnU-Net's layout)
        cases.append(CaseFiles(case_id, images, label, case_patient.get(case_id, case_id), modality))

    if split == "train" and len(cases) != num_training:
        raise DataError(f"numTraining is {num_training} but imagesTr has {len(cases)} case(s)", jpath)
    if split == "train":
        _check_case_patient(case_patient, (c.case_id for c in cases), jpath)
    _check_to_background(labels, to_background, jpath)
    return _spec_from_json(meta, jpath, NNUNET_KEYS, root=root, modalities=list(modalities), labels=labels.labels,
                           cases=cases, paired=paired, file_ending=ending, layout="nnunet",
                           labels_to_background=to_background, ignore_label=labels.ignore, regions=labels.regions)


def _group_channels(
    folder: Path, ending: str, num_channels: int, training_list: Any
) -> dict[str, Path | None]:
    """case_id -> None (channels named CASE_XXXX) or the single file of an MSD v1 case (4D if several channels)."""
    groups: dict[str, Path | None] = {}
    plain: list[Path] = []
    for path in _files_with_ending(folder, ending):
        stem = path.name[: -len(ending)]
        match = _CHANNEL_RE.match(stem)
        if not match:
            plain.append(path)
            continue
        case_id, index = match.group(1), int(match.group(2))
        if index >= num_channels:
            raise DataError(
                f"channel {index} is not declared in dataset.json (channels 0..{num_channels - 1})", path
            )
        groups[case_id] = None
    if plain:
        if not groups and isinstance(training_list, list):
            return {p.name[: -len(ending)]: p for p in plain}
        raise DataError(
            f"file name does not end in a 4-digit channel index (expected CASE_0000{ending}; one file per case, "
            "4D with all channels, is read for Decathlon datasets, whose dataset.json has a 'training' list)",
            plain[0],
        )
    return groups


# ----------------------------------------------------------------------------------------------------
# MS-CMRSeg 2019
# ----------------------------------------------------------------------------------------------------


def _mscmr_code(name: str, option: str = "modalities") -> str:
    table = {"C0": "C0", "BSSFP": "C0", "LGE": "LGE", "T2": "T2"}
    key = str(name).upper()
    if key not in table:
        raise ConfigError(f"MS-CMRSeg {option}: unknown modality {name!r} (choose from LGE, C0/bSSFP, T2)")
    return table[key]


def _load_mscmrseg(
    root: Path, split: str, *, modalities: Iterable[str] = ("LGE", "C0"), **options: Any
) -> DatasetSpec:
    _no_options("mscmrseg", options)
    codes = [_mscmr_code(m) for m in modalities]
    if not codes or len(set(codes)) != len(codes):
        raise ConfigError(f"MS-CMRSeg modalities must be distinct and non-empty, got {list(modalities)}")
    images: dict[tuple[str, str], Path] = {}
    labels: dict[tuple[str, str], Path] = {}
    for path in sorted(root.rglob("*")):
        match = _MSCMR_RE.match(path.name)
        if not match or not path.is_file():
            continue
        number, code = match.group(1), _mscmr_code(match.group(2))
        key = (str(int(number)), code)
        target = labels if match.group(3) else images
        if key in target:
            raise DataError(f"duplicate MS-CMRSeg file (also {target[key]})", path)
        target[key] = path
    for key, path in labels.items():
        if key not in images:
            raise DataError("label file without its image", path)
    cases: list[CaseFiles] = []
    for code in codes:
        keys = sorted((k for k in images if k[1] == code), key=lambda k: int(k[0]))
        for key in keys:
            has_label = key in labels
            if (split == "train") != has_label:
                continue
            path = images[key]
            cases.append(
                CaseFiles(
                    case_id=f"patient{key[0]}_{code}",
                    images=(path,),
                    label=labels.get(key),
                    patient_id=f"patient{key[0]}",
                    modality=MSCMRSEG_DISPLAY[code],
                )
            )
    return DatasetSpec(
        root=root,
        name="MS-CMRSeg2019",
        modalities=[MSCMRSEG_DISPLAY[c] for c in codes],
        labels=dict(MSCMRSEG_LABELS),
        cases=cases,
        paired=False,
        file_ending=".nii.gz",
        layout="mscmrseg",
    )


# ----------------------------------------------------------------------------------------------------
# MM-WHS 2017
# ----------------------------------------------------------------------------------------------------


def _load_mmwhs(
    root: Path,
    split: str,
    *,
    modalities: Iterable[str] = ("CT", "MR"),
    labels_to_background: Iterable[int] = MMWHS_TO_BACKGROUND,
    **options: Any,
) -> DatasetSpec:
    _no_options("mmwhs", options)
    mods = [str(m).upper() for m in modalities]
    if not mods or any(m not in ("CT", "MR") for m in mods) or len(set(mods)) != len(mods):
        raise ConfigError(f"MM-WHS modalities must be distinct values of CT, MR; got {list(modalities)}")
    want = "train" if split == "train" else "test"
    images: dict[tuple[str, int], Path] = {}
    labels: dict[tuple[str, int], Path] = {}
    for path in sorted(root.rglob("*")):
        match = _MMWHS_RE.match(path.name)
        if not match or not path.is_file() or match.group(2).lower() != want:
            continue
        key = (match.group(1).upper(), int(match.group(3)))
        target = labels if match.group(4).lower() == "label" else images
        if key in target:
            raise DataError(f"duplicate MM-WHS file (also {target[key]})", path)
        target[key] = path
    cases: list[CaseFiles] = []
    for mod in mods:
        for key in sorted((k for k in images if k[0] == mod), key=lambda k: k[1]):
            path = images[key]
            case_id = f"{mod.lower()}_{want}_{key[1]}"
            label = None
            if split == "train":
                # Declared even when missing, so that verify reports it.
                label = labels.get(key, path.with_name(path.name.replace("_image", "_label")))
            # MM-WHS CT and MR volumes come from different subjects: each case is its own patient.
            cases.append(CaseFiles(case_id, (path,), label, case_id, mod))
    return DatasetSpec(
        root=root,
        name="MM-WHS2017",
        modalities=mods,
        labels=dict(MMWHS_LABELS),
        cases=cases,
        paired=False,
        file_ending=".nii.gz",
        layout="mmwhs",
        labels_to_background=tuple(int(v) for v in labels_to_background),
    )


# ----------------------------------------------------------------------------------------------------
# simple paired folders
# ----------------------------------------------------------------------------------------------------


def _load_folder(root: Path, split: str, **options: Any) -> DatasetSpec:
    _no_options("folder", options)
    jpath = root / "modalseg.json"
    meta = _read_json(jpath)
    if split == "test":
        raise DataError("the 'folder' layout has no test split", root)
    modalities = _require(meta, "modalities", list, jpath, 'a list of modality names such as ["T1C", "T2W"]')
    if not modalities or not all(isinstance(m, str) and m for m in modalities):
        raise DataError("key 'modalities' must be a non-empty list of names", jpath)
    if len(set(modalities)) != len(modalities) or "label" in modalities:
        raise DataError(
            f"key 'modalities' must be distinct names other than 'label', found {modalities}", jpath
        )
    labels = _parse_labels(_require(meta, "labels", dict, jpath, "an object {name: value}"), jpath,
                           order=meta.get("regions_class_order"))
    ending = _check_ending(meta.get("file_ending", ".nii.gz"), jpath)
    case_patient = _parse_str_map(meta.get("case_patient", {}), jpath, "case_patient")
    to_background = _parse_int_list(meta.get("labels_to_background", []), jpath, "labels_to_background")
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cid = folder.name
        images = folder_images(folder, modalities, ending)
        cases.append(CaseFiles(cid, images, _folder_label(folder, ending), case_patient.get(cid, cid)))
    _check_case_patient(case_patient, (c.case_id for c in cases), jpath)
    _check_to_background(labels, to_background, jpath)
    return _spec_from_json(meta, jpath, FOLDER_KEYS, root=root, modalities=list(modalities), labels=labels.labels,
                           cases=cases, paired=True, file_ending=ending, layout="folder",
                           labels_to_background=to_background, ignore_label=labels.ignore, regions=labels.regions)


def _entries(folder: Path) -> dict[str, list[Path]]:
    """Non-hidden entries of ``folder`` by case-folded name (``T1C.nii.gz`` and ``t1c.nii.gz`` are one name)."""
    out: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if not p.name.startswith("."):
            out.setdefault(p.name.casefold(), []).append(p)
    return out


def folder_images(folder: Path, modalities: Iterable[str], ending: str) -> tuple[Path, ...]:
    """Each modality's image in a case folder: ``<modality><ending>`` (case-insensitive), else a sub-folder named
    after the modality (a DICOM series). A missing one is declared as ``<modality><ending>``, for verify to report;
    two candidates for one modality (``T1C.nii.gz`` and ``T1C/``) are refused rather than one picked silently."""
    entries = _entries(folder)
    images = []
    for m in modalities:
        found = [p for p in entries.get(f"{m}{ending}".casefold(), []) if p.is_file()]
        found += [p for p in entries.get(m.casefold(), []) if p.is_dir()]
        if len(found) > 1:
            raise DataError(f"{len(found)} images for modality {m!r}: {', '.join(p.name for p in found)}; keep one",
                            folder)
        images.append(found[0] if found else folder / f"{m}{ending}")
    return tuple(images)


def _folder_label(folder: Path, ending: str) -> Path:
    """``label<ending>`` (case-insensitive), else the one ``label.<supported extension>`` file (e.g. a NIfTI label
    beside DICOM folders of a dataset declared with another file_ending), else the declared, missing one."""
    entries = _entries(folder)
    other = [p for p in entries.get(f"label{ending}".casefold(), []) if p.is_file()]
    if not other:
        other = [p for ps in entries.values() for p in ps
                 if p.is_file() and is_supported(p) and strip_extension(p.name).casefold() == "label"]
    if len(other) > 1:
        raise DataError(f"{len(other)} label files: {', '.join(p.name for p in other)}; keep one", folder)
    return other[0] if other else folder / f"label{ending}"
