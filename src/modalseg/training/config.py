"""Training configuration: one dataclass, every option with a default, a declared type/range and a meaning.

Options left at ``None`` are resolved from the dataset: paired datasets get paper 1's recipe (Li et al.:
Adam + AMSGrad, lr 1e-4 halved every 30 epochs, batch 4, 256x256, Dice + CE), unpaired datasets get paper 2's
(Chen et al.: Adam, lr 1e-4 x 0.95 every 1000 iterations, 8 slices per modality per step, Dice + CE + 0.5 CSA).
Files may be YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON; unknown or duplicated keys are an error naming
the file. Every option declares its type and range (:class:`OptionCheck`) and :meth:`TrainConfig.validate` checks
them all before any work starts, so a bad value is one line naming the option instead of a crash epochs later.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modalseg.errors import ConfigError

# A decimal or scientific literal as users write it ("1e-3", "5E-4", "1.0e-4", "-2e+1"). YAML 1.1 reads the
# forms without a dot or without an exponent sign as strings; "nan"/"inf" deliberately do not match.
_FLOAT_LITERAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


class _Invalid(Exception):
    """Raised by :meth:`OptionCheck.coerce`; the caller turns it into a ConfigError with the option's name."""


@dataclass(frozen=True)
class OptionCheck:
    """Declared type and range of one option.

    ``kind``: int | float | bool | str | path | mapping | names (a list of strings) | probabilities (a number, or
    a mapping of names to numbers: one value for all or one per name) | sizes (three positive integers).
    ``ge``/``gt``/``le`` bound numbers (each
    value of ``probabilities``); ``choices`` restricts strings; ``nullable`` (set when the default is None) allows
    None = "resolve from the dataset". Floats must be finite; bools are never ints and ints never floats.
    """

    kind: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] = ()
    nullable: bool = False

    def expected(self) -> str:
        """What a valid value looks like, e.g. ``a finite number in (0, 1] or null``."""
        if self.kind in ("int", "float"):
            text = ("an integer" if self.kind == "int" else "a finite number") + self._range()
        elif self.kind == "probabilities":
            text = f"a number{self._range()} or a mapping {{name: number{self._range()}}}"
        elif self.choices:
            text = "one of " + ", ".join(self.choices)
        else:
            text = {"bool": "true or false", "str": "a string", "path": "a path (string)",
                    "mapping": "a mapping with string keys ({key: value})",
                    "names": "a non-empty list of strings ([a, b])",
                    "sizes": "three positive integers ([d, h, w])"}[self.kind]
        if self.nullable:
            return "true, false or null" if self.kind == "bool" else f"{text} or null"
        return text

    def _range(self) -> str:
        low = self.gt if self.gt is not None else self.ge
        if low is not None and self.le is not None:
            if self.kind == "int":
                return f" in {_num(low)}..{_num(self.le)}"
            return f" in {'(' if self.gt is not None else '['}{_num(low)}, {_num(self.le)}]"
        if low is not None:
            return f" {'>' if self.gt is not None else '>='} {_num(low)}"
        return f" <= {_num(self.le)}" if self.le is not None else ""

    def coerce(self, value: Any) -> Any:
        """``value`` converted to the declared type (e.g. ``"1e-3"`` -> 0.001 for floats); raises _Invalid."""
        if value is None:
            if self.nullable:
                return None
            raise _Invalid
        kind = self.kind
        if kind == "bool":
            if not isinstance(value, bool):
                raise _Invalid
            return value
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise _Invalid
            value = int(value)
        elif kind == "float":
            if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
                value = float(value.strip())
            elif isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise _Invalid
            try:
                value = float(value)
            except OverflowError:
                raise _Invalid from None
            if not math.isfinite(value):
                raise _Invalid
        elif kind == "str":
            if isinstance(value, bool) and self.choices:
                # YAML 1.1 reads on/off (yes/no) as booleans: `augmentation: off` means the word
                word = "on" if value else "off"
                if word in self.choices:
                    return word
                raise _Invalid
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise _Invalid
            return value
        elif kind == "path":
            if not isinstance(value, (str, os.PathLike)):
                raise _Invalid
            return os.fspath(value)
        elif kind == "mapping":
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise _Invalid
            return dict(value)
        elif kind == "probabilities":
            number = OptionCheck("float", ge=self.ge, gt=self.gt, le=self.le)
            if isinstance(value, dict):
                if not all(isinstance(k, str) for k in value):
                    raise _Invalid
                return {k: number.coerce(v) for k, v in value.items()}
            return number.coerce(value)
        elif kind == "names":
            if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
                raise _Invalid
            return list(value)
        elif kind == "sizes":
            if (not isinstance(value, (list, tuple)) or len(value) != 3
                    or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in value)):
                raise _Invalid
            return [int(v) for v in value]
        else:  # pragma: no cover - a declaration error, not a user error
            raise ValueError(f"unknown option kind {kind!r}")
        if ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                or (self.le is not None and value > self.le)):
            raise _Invalid
        return value


def _opt(default: Any, help: str, kind: str, **check: Any) -> Any:
    """A dataclass field with its help text and its :class:`OptionCheck` (None default -> nullable)."""
    metadata = {"help": help, "check": OptionCheck(kind, nullable=default is None, **check)}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


_SEED_MAX = 2**32 - 1  # NumPy's seed range


@dataclass
class TrainConfig:
    # --- data ---
    data: str = _opt("", "dataset folder (nnU-Net raw, MS-CMRSeg, MM-WHS or modalseg folder layout)", "path")
    layout: str = _opt("auto", "dataset layout", "str", choices=("auto", "nnunet", "mscmrseg", "mmwhs", "folder"))
    modalities: list[str] | None = _opt(
        None, "paired: channel names to use, master first (default: dataset order); unpaired: modalities to train on",
        "names",
    )
    preprocess: str = _opt(
        "auto", "preprocessing preset: auto (paired data: default; unpaired: paper 2's for its layout), default "
        "(for your data: every slice, robust z-score per volume, aspect kept, 256x256; in 3D the data's own "
        "in-plane size), or a paper preset", "str",
        choices=("auto", "default", "paper1", "paper2_mscmrseg", "paper2_mmwhs", "paper2_synth"),
    )
    preprocess_options: dict = _opt(
        {}, "overrides of PreprocessConfig fields, e.g. {target_size: [128, 128]}", "mapping"
    )
    cache_dir: str | None = _opt(None, "slice cache folder (default: <output>/../.cache)", "path")
    strict_geometry: bool = _opt(
        False, "refuse modalities or labels on another grid (default: resample them onto the master image's grid "
        "by physical coordinates, one line per case)", "bool")
    # --- model ---
    model: str = _opt(
        "auto", "paired: a registered model name (see `modalseg.models.list_models()`); unpaired: backbone name", "str"
    )
    model_options: dict = _opt({}, "keyword options of the model builder, e.g. {base_width: 16}", "mapping")
    setting: str = _opt(
        "csa", "unpaired only: the setting of paper 2", "str",
        choices=("single", "joint", "msbn", "ummkd", "affinity", "csa"),
    )
    feature_layers: list[str] | None = _opt(
        None, "unpaired only: layers whose features feed the (CSA) affinity loss", "names"
    )
    dims: int = _opt(
        2, "network dimensionality: 2 (slices; both papers) or 3 (patches of whole volumes, kernels and poolings "
        "planned from the spacing, sliding-window inference; docs/3d.md)", "int", ge=2, le=3)
    context_slices: int = _opt(
        0, "2.5D (dims 2 only): each slice with this many neighbours on either side as extra input channels per "
        "modality; 0 = plain 2D", "int", ge=0, le=8)
    patch_size: list | None = _opt(
        None, "dims 3: training patch and inference window (d, h, w) (default: planned from the data's median shape "
        "and spacing within memory_budget_mb, models/planning.py)", "sizes")
    memory_budget_mb: float | None = _opt(
        None, "dims 3: memory the planner may fill with a training step (default: 70% of the GPU's memory, 4096 "
        "on CPU)", "float", gt=0)
    # --- optimisation ---
    epochs: int = _opt(100, "number of epochs (unpaired: an epoch is `steps_per_epoch` iterations)", "int", ge=1)
    steps_per_epoch: int | None = _opt(
        None, "unpaired and 3D: iterations per epoch (default: one pass of the largest modality's slices; 3D: the "
        "training voxels covered about once)", "int", ge=1
    )
    batch_size: int | None = _opt(
        None, "global batch (paired, paper 1: 4) or slices per modality per step (paper 2: 8)", "int", ge=1
    )
    lr: float = _opt(1e-4, "initial learning rate (both papers: 1e-4)", "float", gt=0)
    amsgrad: bool | None = _opt(None, "Adam with AMSGrad (paper 1: yes; paper 2: no)", "bool")
    lr_step: int | None = _opt(None, "step decay period: paper 1 30 epochs; paper 2 1000 iterations", "int", ge=1)
    # a decay factor: > 1 would grow the learning rate without bound, 1 keeps it constant
    lr_gamma: float | None = _opt(None, "step decay factor: paper 1 0.5; paper 2 0.95", "float", gt=0, le=1)
    lr_step_unit: str | None = _opt(
        None, "paper 1: epoch; paper 2: iteration", "str", choices=("epoch", "iteration")
    )
    ce_weight: float = _opt(
        1.0, "weight of cross-entropy relative to Dice (paper 1 Eq. 1 alpha; paper 2 Eq. 5 beta/alpha)", "float", ge=0
    )
    affinity_weight: float = _opt(
        0.5, "unpaired: weight lambda of the (CSA) affinity loss (paper 2 Eq. 5)", "float", ge=0
    )
    kd_weight: float = _opt(0.5, "unpaired, ummkd: weight of the knowledge-distillation loss", "float", ge=0)
    kd_temperature: float = _opt(2.0, "unpaired, ummkd: softmax temperature T", "float", gt=0)
    conv_l2: float | None = _opt(None, "L2 penalty on conv kernels (UMMKD: 1e-4; others 0)", "float", ge=0)
    csa_reading: str = _opt(
        "literal", "unpaired, csa/affinity: reading of paper 2 Eq. 4: literal (as printed: squared difference of the "
        "per-class mean affinity entries) or mean_squared (mean of the squared entry differences)", "str",
        choices=("literal", "mean_squared"))
    csa_region_norm: bool = _opt(
        True, "unpaired, csa/affinity: divide every affinity entry by the class region size S_c (Eq. 3 as printed; "
        "the cosine is already size-invariant, 1/S_c rescales entries by region size); false = plain cosine", "bool")
    dice_form: str = _opt(
        "per_image", "unpaired: Dice term of every setting: per_image (per image, foreground, eps 1) or ummkd_batch "
        "(UMMKD's: whole batch, background included, squared softmax in the denominator)", "str",
        choices=("per_image", "ummkd_batch"))
    kd_absent_classes: str = _opt(
        "skip", "unpaired, ummkd: classes absent from a batch: skip (mean over classes present in both) or ummkd "
        "(UMMKD's code: uniform prediction, mean over all classes)", "str", choices=("skip", "ummkd"))
    grad_ratio_every: int | None = _opt(
        None, "unpaired, csa/affinity/ummkd: log ||grad(lambda L_aux)|| / ||grad(Dice+CE)|| on the shared kernels "
        "every N iterations (log.csv aux_grad_ratio; no effect on training); default: first step of each epoch; "
        "0 = never", "int", ge=0)
    # --- cross-validation and seeds ---
    folds: int = _opt(5, "number of cross-validation folds, split by patient (1 fold would train on nobody)",
                      "int", ge=2)
    fold: int = _opt(0, "which fold to train (0-based, < folds); `cv` (every fold) is handled by the CLI", "int",
                     ge=0)
    train_all: bool = _opt(False, "train one model on every case, without validation (nnU-Net's `-f all`; "
                           "`--fold all`); written to <output>/fold_all", "bool")
    foreground_fraction: float | None = _opt(
        None, "share of every batch forced to contain foreground (default: 1/3 with the default preset, as "
        "nnU-Net; 0 with the paper presets, which train on labelled slices only)", "float", ge=0, le=1)
    # --- augmentation and modality dropout (data/augment.py, docs/augmentation.md) ---
    augmentation: str = _opt(
        "auto", "per-sample augmentation of training batches: auto (medium with the default preset, off with the "
        "paper presets), off, on (= medium), light, medium or strong (docs/augmentation.md)", "str",
        choices=("auto", "off", "on", "light", "medium", "strong"))
    augmentation_options: dict = _opt(
        {}, "overrides of the augmentation strength's probabilities and ranges, e.g. {rotate_p: 0, gamma_range: "
        "[0.8, 1.2]} (data/augment.py AugmentConfig)", "mapping")
    modality_dropout: float | dict = _opt(
        0.0, "paired: drop (zero, after normalisation) each assistant modality of a training sample with this "
        "probability, or per modality {T2W: 0.3}; never all modalities; 0 = off. A model trained so can predict "
        "with modalities missing (predict --missing)", "probabilities", ge=0, le=1)
    modality_dropout_master: bool = _opt(
        False, "paired: let modality dropout drop the master (first) modality too (master_assistant: its attention "
        "maps then gate every stream from a blank image); default: the master is always present", "bool")
    seed: int = _opt(0, "seed of weights init, dropout and batch order", "int", ge=0, le=_SEED_MAX)
    split_seed: int = _opt(0, "seed of the patient split (kept fixed across repeated runs)", "int", ge=0,
                           le=_SEED_MAX)
    # --- run ---
    output: str = _opt("runs/run", "output folder of this run", "path")
    device: str = _opt("auto", "auto = cuda if available, else cpu", "str", choices=("auto", "cpu", "cuda"))
    precision: str = _opt(
        "auto", "autocast precision (auto: chosen for this machine, see training/precision.py)", "str",
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    channels_last: bool | None = _opt(None, "channels_last memory format (default: on with bf16/fp16)", "bool")
    num_threads: int | None = _opt(None, "torch CPU threads (default: torch's choice)", "int", ge=1)
    val_every: int = _opt(1, "validate every N epochs", "int", ge=1)
    checkpoint_every: int = _opt(
        0, "also write the latest checkpoint every N iterations (0: only at epoch ends)", "int", ge=0
    )
    max_steps: int | None = _opt(None, "stop after this many iterations in total (short runs, tests)", "int", ge=1)
    progress: bool = _opt(True, "show a progress bar per epoch", "bool")
    tensorboard: bool = _opt(True, "write TensorBoard scalars to <output>/tensorboard", "bool")
    sync_bn: bool = _opt(False, "multi-GPU: convert BatchNorm to SyncBatchNorm (CUDA only)", "bool")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in values if k not in known)  # keys may be non-strings in YAML
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; see `modalseg train --help-config`", source)
        cfg = cls(**values)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """Check (and normalise, e.g. ``"1e-3"`` -> 0.001) every option by its declared type and range."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_option(f.name, getattr(self, f.name), source=source))
        if not self.fold < self.folds:
            raise ConfigError(f"fold must be in 0..{self.folds - 1} for folds {self.folds} (got {self.fold})", source)


_CHECKS: dict[str, OptionCheck] = {f.name: f.metadata["check"] for f in dataclasses.fields(TrainConfig)}


def check_option(name: str, value: Any, label: str | None = None, source: str | Path | None = None) -> Any:
    """``value`` of option ``name`` checked against its declaration and normalised; else a one-line ConfigError.

    ``label`` is how the user gave it (``--set lr``, ``--epochs``), default the option name.
    """
    check = _CHECKS.get(name)
    if check is None:
        raise ConfigError(f"unknown option {name}; see `modalseg train --help-config`", source)
    try:
        return check.coerce(value)
    except _Invalid:
        raise ConfigError(f"{label or name}: expected {check.expected()}, got {value!r}", source) from None


def option_kind(name: str) -> str | None:
    """Declared kind of option ``name`` (int, float, bool, str, path, mapping, names, probabilities), None if
    unknown."""
    check = _CHECKS.get(name)
    return check.kind if check else None


def cli_int(flag: str, text: object, minimum: int = 1) -> int:
    """An integer command-line value (argparse's ``type=int`` would print usage on a second line)."""
    value = text
    if isinstance(text, str):
        value = int(text) if re.fullmatch(r"\s*[+-]?[0-9]+\s*", text) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{flag}: expected an integer >= {minimum}, got {text!r}")
    return value


class _DuplicateKey(yaml.YAMLError):
    """A YAML mapping names one key twice; PyYAML would silently keep the last value."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicated mapping keys at any nesting level (merge keys ``<<`` are fine)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key: SafeLoader's own error follows
                continue
            if first is not None:
                where = f"line {line}" if first == line else f"lines {first} and {line}"
                raise _DuplicateKey(f"duplicate key {key!r} ({where})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicated keys (used for config files and ``--set`` values)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML, TOML or JSON config file; ``overrides`` (e.g. from the command line) win."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})", path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config ({exc.strerror or exc})", path) from None

    def unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError(f"cannot parse config: duplicate key {key!r}", path)
            out[key] = value
        return out

    try:
        if path.suffix in {".yaml", ".yml"}:
            values = parse_yaml(text) or {}
        elif path.suffix == ".toml":
            values = tomllib.loads(text)  # refuses duplicated keys itself
        elif path.suffix == ".json":
            values = json.loads(text, object_pairs_hook=unique_pairs)
        else:
            raise ConfigError("config must be .yaml, .yml, .toml or .json", path)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        first = str(exc).splitlines()[0]
        at = re.search(r"at line (\d+)", first) if isinstance(exc, tomllib.TOMLDecodeError) else None
        lines = text.splitlines()
        if at and 0 < int(at.group(1)) <= len(lines):  # tomllib does not name the key: show the line
            first += f": {lines[int(at.group(1)) - 1].strip()[:80]!r}"
        raise ConfigError(f"cannot parse config: {first}", path) from None
    if not isinstance(values, dict):
        raise ConfigError("config must be a mapping of option: value", path)
    values.update(overrides or {})
    return TrainConfig.from_dict(values, source=str(path))


def describe_options() -> str:
    """Every option with its type/range, default and meaning (``modalseg train --help-config``)."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"{f.name:18s} {_CHECKS[f.name].expected()}; default {default!r}: {f.metadata['help']}")
    return "\n".join(lines)
