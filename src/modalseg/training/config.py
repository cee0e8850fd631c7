"""Training configuration: one dataclass, every option with a default and a documented meaning.

Options left at ``None`` are resolved from the dataset: paired datasets get paper 1's recipe (Li et al.:
Adam + AMSGrad, lr 1e-4 halved every 30 epochs, batch 4, 256x256, Dice + CE), unpaired datasets get paper 2's
(Chen et al.: Adam, lr 1e-4 x 0.95 every 1000 iterations, 8 slices per modality per step, Dice + CE + 0.5 CSA).
Files may be YAML (``.yaml``/``.yml``) or TOML (``.toml``); unknown keys are an error naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modalseg.errors import ConfigError


def _opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    # --- data ---
    data: str = _opt("", "dataset folder (nnU-Net raw, MS-CMRSeg, MM-WHS or modalseg folder layout)")
    layout: str = _opt("auto", "dataset layout: auto | nnunet | mscmrseg | mmwhs | folder")
    modalities: list[str] | None = _opt(
        None, "paired: channel names to use, master first (default: dataset order); unpaired: modalities to train on"
    )
    preprocess: str = _opt(
        "auto", "preprocessing preset: auto | paper1 | paper2_mscmrseg | paper2_mmwhs | paper2_synth"
    )
    preprocess_options: dict = _opt({}, "overrides of PreprocessConfig fields, e.g. {target_size: [128, 128]}")
    cache_dir: str | None = _opt(None, "slice cache folder (default: <output>/../.cache)")
    # --- model ---
    model: str = _opt(
        "auto", "paired: a registered model name (see `modalseg.models.list_models()`); unpaired: backbone name"
    )
    model_options: dict = _opt({}, "keyword options of the model builder, e.g. {base_width: 16}")
    setting: str = _opt("csa", "unpaired only: single | joint | msbn | ummkd | affinity | csa (paper 2)")
    feature_layers: list[str] | None = _opt(None, "unpaired only: layers whose features feed the (CSA) affinity loss")
    # --- optimisation ---
    epochs: int = _opt(100, "number of epochs (unpaired: an epoch is `steps_per_epoch` iterations)")
    steps_per_epoch: int | None = _opt(
        None, "unpaired only: iterations per epoch (default: one pass of the largest modality)"
    )
    batch_size: int | None = _opt(
        None, "global batch (paired, paper 1: 4) or slices per modality per step (paper 2: 8)"
    )
    lr: float = _opt(1e-4, "initial learning rate (both papers: 1e-4)")
    amsgrad: bool | None = _opt(None, "Adam with AMSGrad (paper 1: yes; paper 2: no)")
    lr_step: int | None = _opt(None, "step decay period: paper 1 30 epochs; paper 2 1000 iterations")
    lr_gamma: float | None = _opt(None, "step decay factor: paper 1 0.5; paper 2 0.95")
    lr_step_unit: str | None = _opt(None, "epoch | iteration (paper 1: epoch; paper 2: iteration)")
    ce_weight: float = _opt(
        1.0, "weight of cross-entropy relative to Dice (paper 1 Eq. 1 alpha; paper 2 Eq. 5 beta/alpha)"
    )
    affinity_weight: float = _opt(0.5, "unpaired: weight lambda of the (CSA) affinity loss (paper 2 Eq. 5)")
    kd_weight: float = _opt(0.5, "unpaired, ummkd: weight of the knowledge-distillation loss")
    kd_temperature: float = _opt(2.0, "unpaired, ummkd: softmax temperature T")
    conv_l2: float | None = _opt(None, "L2 penalty on conv kernels (UMMKD: 1e-4; others 0)")
    # --- cross-validation and seeds ---
    folds: int = _opt(5, "number of cross-validation folds, split by patient")
    fold: int = _opt(0, "which fold to train (0-based); `all` is handled by the CLI")
    seed: int = _opt(0, "seed of weights init, dropout and batch order")
    split_seed: int = _opt(0, "seed of the patient split (kept fixed across repeated runs)")
    # --- run ---
    output: str = _opt("runs/run", "output folder of this run")
    device: str = _opt("auto", "auto | cpu | cuda")
    precision: str = _opt("auto", "auto | bf16 | fp16 | fp32; auto = bf16 autocast on AMX CPUs and CUDA, else fp32")
    channels_last: bool | None = _opt(None, "channels_last memory format (default: on with bf16/fp16)")
    num_threads: int | None = _opt(None, "torch CPU threads (default: torch's choice)")
    val_every: int = _opt(1, "validate every N epochs")
    checkpoint_every: int = _opt(0, "also write the latest checkpoint every N iterations (0: only at epoch ends)")
    max_steps: int | None = _opt(None, "stop after this many iterations in total (short runs, tests)")
    progress: bool = _opt(True, "show a progress bar per epoch")
    tensorboard: bool = _opt(True, "write TensorBoard scalars to <output>/tensorboard")
    sync_bn: bool = _opt(False, "multi-GPU: convert BatchNorm to SyncBatchNorm (CUDA only)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; see `modalseg train --help-config`", source)
        cfg = cls(**values)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        def bad(msg: str) -> None:
            raise ConfigError(msg, source)

        if self.setting not in {"single", "joint", "msbn", "ummkd", "affinity", "csa"}:
            bad(f"setting must be one of single, joint, msbn, ummkd, affinity, csa (got {self.setting!r})")
        for name in ("epochs", "folds", "val_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(f"{name} must be a positive integer (got {value!r})")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            bad(f"batch_size must be a positive integer (got {self.batch_size!r})")
        if not 0 <= self.fold < self.folds:
            bad(f"fold must be in 0..{self.folds - 1} (got {self.fold})")
        if self.precision not in {"auto", "bf16", "fp16", "fp32"}:
            bad(f"precision must be auto, bf16, fp16 or fp32 (got {self.precision!r})")
        if self.device not in {"auto", "cpu", "cuda"}:
            bad(f"device must be auto, cpu or cuda (got {self.device!r})")
        if self.lr_step_unit not in {None, "epoch", "iteration"}:
            bad(f"lr_step_unit must be epoch or iteration (got {self.lr_step_unit!r})")
        if not isinstance(self.lr, (int, float)) or self.lr <= 0:
            bad(f"lr must be a positive number (got {self.lr!r})")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML or TOML config file; ``overrides`` (e.g. from the command line) win."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in {".yaml", ".yml"}:
            values = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            values = tomllib.loads(text)
        elif path.suffix == ".json":
            values = json.loads(text)
        else:
            raise ConfigError("config must be .yaml, .yml, .toml or .json", path)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"cannot parse config: {first}", path) from None
    if not isinstance(values, dict):
        raise ConfigError("config must be a mapping of option: value", path)
    values.update(overrides or {})
    return TrainConfig.from_dict(values, source=str(path))


def describe_options() -> str:
    """Human-readable list of every option, its default and meaning (``modalseg train --help-config``)."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"{f.name:18s} default {default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
