"""``modalseg experiment paper1``: paper 1's Table 1, Fig. 4 and Fig. 5 on a paired dataset.

Li et al. (paper 1) compare ten fusion networks on breast MRI (T1C master, T2W assistant) with five-fold
cross-validation and three independent runs, reporting mean ± s.d. of Dice, sensitivity and relative area
difference in percent. Only the central slice of each patient is labelled, so the metrics are 2D, per slice.
This command repeats that protocol on any paired dataset:

* for every run ``r`` (seed ``seed + r``), every fold and every model: train with paper 1's recipe (Adam +
  AMSGrad, lr halved every 30 epochs, batch 4, Dice + CE of Eq. 1) into ``DIR/runs/<model>/run_<r>/fold_<k>``,
  then evaluate the fold's validation slices one by one (foreground class). The patient split is the same
  for every run and model: one ``DIR/splits.json`` is copied into every run folder and checked.
* each (model, run, fold) is saved as ``DIR/records/<model>_run<r>_fold<k>.json`` (per-slice metrics,
  parameter counts, timing) and ``..._val.npz`` (the validation predictions, for the figures). The grid,
  record reuse, the shared split and resume are the shared experiment runner's
  (:mod:`modalseg.experiments.runner`, docs/experiments.md): existing records are reused, so an interrupted
  experiment continues where it stopped (``--overwrite`` retrains); a record made with a different budget,
  seed or validation split is refused rather than mixed in.
* aggregation as in the paper: per run, the mean over all validation slices of all folds (CV pooled), then
  mean ± s.d. (ddof 1) over the runs -> ``DIR/table1.md`` and ``DIR/table1.csv``; numbers in ``summary.json``.
* ``DIR/figures/fig4_overlays.png`` (Fig. 4: truth white, model green, Dice in the corner) and
  ``DIR/figures/fig5_attention.png`` (Fig. 5: SA maps of the five encoder blocks, T1C and T2W streams of the
  proposed network and of FuseUNet + SA), both from run 0 and the first fold evaluated.

Weights evaluated: the final epoch's (``latest.pt``) by default, as nnU-Net reports its final weights. Paper 1
does not say how it picked its epoch; ``--checkpoint best`` evaluates ``best.pt`` instead, the epoch with the
best validation Dice on the very fold that is reported, which is optimistic for every model alike. The engine
never writes ``best.pt`` from a degenerate (all-empty or all-foreground) validation, so where it is missing
the final weights are used and the table's budget line counts those records. Beside Dice the table reports
"Empty slices": validation slices whose reference has foreground but whose argmax prediction has none (Dice
0 there; a model stuck at predicting nothing shows up here rather than only as a low mean), per run summed over
the folds, mean ± s.d. over runs, out of the slices with reference foreground; each record holds its count.

:func:`full_budget_commands` gives the commands for paper 1's full budget (a GPU job).

``--dims 3`` runs the same grid with the 3D versions of the networks (docs/3d.md): each model's kernels, poolings and
patch are planned from the data (``dims: 3``), trained on patches of whole volumes and validated by sliding
windows. The paper's preprocessing is kept except that every slice is cached (a 3D network needs its neighbours;
``only_labelled_slices`` off), and the table is still scored on the labelled slices (those with foreground, the
slices the 2D protocol caches), one by one, so its rows mean what they mean in 2D. FuseNet and FuseNet-concat have
a fixed VGG topology that is not planned in 3D: ``--models all`` leaves them out (a line says so), naming them is
refused. The Fig. 4 / Fig. 5 panels are 2D and are not drawn.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modalseg.errors import ConfigError
from modalseg.experiments.runner import Experiment, Job, Outcome, Runner, add_checkpoint_argument, grid

HELP = "paper 1 (Li et al.) Table 1, Fig. 4 and Fig. 5: ten paired fusion models, k-fold CV x repeated runs"

#: Default base width of each Table 1 model (paper 1: U-Net family and FuseNet 64; the half-width models 32).
DEFAULT_BASE_WIDTH: dict[str, int] = {
    "unet": 64,
    "unet_sa": 64,
    "fusenet": 64,
    "fusenet_concat": 64,
    "fuse_origin_unet": 64,
    "early_fuse_unet": 64,
    "late_fuse_unet": 32,
    "fuse_unet": 32,
    "fuse_unet_sa": 32,
    "master_assistant": 32,
}

#: Paper 1 Table 1 as printed: (mean, s.d.) in percent of Dice, sensitivity and relative area difference.
PAPER1_TABLE1_RESULTS: dict[str, dict[str, tuple[float, float]]] = {
    "unet": {"dice": (73.3, 0.1), "sensitivity": (79.5, 0.8), "rad": (43.7, 1.9)},
    "unet_sa": {"dice": (75.8, 0.2), "sensitivity": (82.6, 0.5), "rad": (33.9, 2.2)},
    "fusenet": {"dice": (52.8, 1.5), "sensitivity": (54.9, 2.7), "rad": (49.2, 2.7)},
    "fusenet_concat": {"dice": (73.2, 0.3), "sensitivity": (80.9, 0.8), "rad": (41.8, 1.3)},
    "fuse_origin_unet": {"dice": (75.0, 0.5), "sensitivity": (82.1, 0.5), "rad": (38.0, 4.4)},
    "early_fuse_unet": {"dice": (74.4, 0.2), "sensitivity": (81.4, 1.0), "rad": (38.1, 4.8)},
    "late_fuse_unet": {"dice": (73.8, 0.1), "sensitivity": (81.4, 1.7), "rad": (39.3, 4.1)},
    "fuse_unet": {"dice": (74.9, 0.2), "sensitivity": (82.2, 0.4), "rad": (37.9, 2.5)},
    "fuse_unet_sa": {"dice": (76.3, 0.2), "sensitivity": (83.4, 0.4), "rad": (32.4, 0.8)},
    "master_assistant": {"dice": (77.6, 0.3), "sensitivity": (84.4, 0.7), "rad": (30.9, 1.6)},
}

METRICS = ("dice", "sensitivity", "rad")
RECORD_FORMAT = "modalseg-paper1-record"
#: Version 2 added ``empty_slices`` / ``reference_slices``; version-1 records get them from the slice statuses.
RECORD_VERSION = 2
#: TrainConfig keys this command sets itself (use its own options instead of --set).
MANAGED_KEYS = frozenset({
    "data", "output", "model", "fold", "folds", "seed", "split_seed", "epochs", "batch_size", "lr",
    "precision", "preprocess", "dims",
})
#: Table 1 models with a fixed (VGG) topology: no 3D plan (models/planning.py)
FIXED_TOPOLOGY = ("fusenet", "fusenet_concat")
#: --set keys that do not change results (left out of the budget that records are matched against).
COSMETIC_KEYS = frozenset({"progress", "tensorboard", "num_threads", "checkpoint_every", "cache_dir"})
FIG5_MODELS = ("master_assistant", "fuse_unet_sa")
EMPTY_COLUMN = "Empty slices"


# ---------------------------------------------------------------------------------------------- arguments
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``modalseg experiment paper1`` (defaults follow paper 1)."""
    p.add_argument("--data", required=True, help="paired dataset folder (e.g. from `modalseg synth breast`)")
    p.add_argument("--output", required=True, help="experiment folder (records, runs, tables, figures)")
    p.add_argument("--models", default="all",
                   help="'all' (the ten Table 1 models) or a comma list, e.g. unet,fuse_unet,master_assistant")
    p.add_argument("--runs", type=int, default=3, help="independent runs, seeds seed..seed+runs-1 (paper: 3)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds, split by patient (paper: 5)")
    p.add_argument("--only-folds", default=None, help="evaluate only these folds, e.g. 0,1 (default: all)")
    p.add_argument("--epochs", type=int, default=100, help="training epochs per model and fold (default 100)")
    p.add_argument("--image-size", type=int, default=256, help="network input size in pixels (paper: 256)")
    p.add_argument("--base-width-scale", type=float, default=1.0,
                   help="multiplies every model's default base width (64, or 32 for the half-width models); "
                        "the 2:1 ratio is kept exactly")
    p.add_argument("--sa-reduction", type=int, default=16, help="SA block reduction r (paper: 16)")
    p.add_argument("--batch-size", type=int, default=4, help="batch size (paper: 4)")
    p.add_argument("--lr", type=float, default=1e-4, help="initial learning rate (paper: 1e-4)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast precision (auto: bf16 on AMX CPUs and CUDA, else fp32)")
    p.add_argument("--seed", type=int, default=0, help="seed of run 0 (run r uses seed + r)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the patient split (fixed for all runs)")
    add_checkpoint_argument(p, help="weights evaluated: latest.pt, the final epoch (default, as nnU-Net), or "
                                    "best.pt, the best validation epoch of the same fold (optimistic; latest.pt "
                                    "where no best.pt exists)")
    p.add_argument("--dims", type=int, default=2, choices=[2, 3],
                   help="2: the paper's 2D networks (default); 3: their 3D versions, planned from the data, trained "
                        "on patches of whole volumes and scored on the same labelled slices")
    p.add_argument("--robustness", action="store_true",
                   help="also evaluate every multi-modality model of run 0 with each proper subset of modalities "
                        "removed (modalseg evaluate --robustness on its folds): DIR/robustness.md")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_options",
                   help="any other training option, VALUE parsed as YAML (e.g. --set num_threads=1)")
    p.add_argument("--progress", action="store_true", help="show a progress bar per epoch")
    p.add_argument("--overwrite", action="store_true", help="retrain and replace existing records")


@dataclasses.dataclass
class Plan:
    """The validated experiment: what to train, with which budget, and where."""

    data: Path
    output: Path
    models: list[str]
    runs: int
    folds: int
    eval_folds: list[int]
    epochs: int
    image_size: int
    half_width: int
    width_scale: float
    sa_reduction: int
    batch_size: int
    lr: float
    precision: str
    seed: int
    split_seed: int
    checkpoint: str
    overrides: dict[str, Any]
    progress: bool
    overwrite: bool
    dims: int = 2
    robustness: bool = False

    def base_width(self, model: str) -> int:
        """Scaled base width; the half-width models get exactly half of the full-width ones (paper 1)."""
        return self.half_width * DEFAULT_BASE_WIDTH[model] // 32

    def model_options(self, model: str) -> dict[str, Any]:
        opts = dict(self.overrides.get("model_options") or {})
        opts.update(base_width=self.base_width(model), sa_reduction=self.sa_reduction)
        return opts

    def budget(self) -> dict[str, Any]:
        """Everything that changes a record's numbers (records made under another budget are refused)."""
        return {
            "data": str(self.data.resolve()), "folds": self.folds, "split_seed": self.split_seed,
            "epochs": self.epochs, "image_size": self.image_size, "half_width": self.half_width,
            "sa_reduction": self.sa_reduction, "batch_size": self.batch_size, "lr": self.lr,
            "precision": self.precision, "checkpoint": self.checkpoint,
            "overrides": {k: v for k, v in sorted(self.overrides.items()) if k not in COSMETIC_KEYS},
            # only 3D records say so: 2D records keep the budget they were made with
            **({"dims": self.dims} if self.dims != 2 else {}),
        }


def parse_models(text: str) -> list[str]:
    """``all`` or a comma list of Table 1 model names, in the paper's row order."""
    from modalseg.models.paper1 import PAPER1_MODELS

    if text.strip().lower() == "all":
        return list(PAPER1_MODELS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--models is empty; give 'all' or model names")
    unknown = [n for n in names if n not in PAPER1_MODELS]
    if unknown:
        raise ConfigError(f"--models: unknown model(s) {', '.join(unknown)}; known: {', '.join(PAPER1_MODELS)}")
    return [m for m in PAPER1_MODELS if m in names]


def parse_folds(text: str | None, folds: int) -> list[int]:
    """``--only-folds 0,2`` -> [0, 2] (default: every fold)."""
    if text is None or not str(text).strip():
        return list(range(folds))
    try:
        values = sorted({int(v) for v in str(text).split(",") if v.strip()})
    except ValueError:
        raise ConfigError(f"--only-folds must be comma-separated integers, got {text!r}") from None
    bad = [v for v in values if not 0 <= v < folds]
    if bad or not values:
        raise ConfigError(f"--only-folds: folds must be in 0..{folds - 1}, got {text!r}")
    return values


def _parse_set(items: list[str]) -> dict[str, Any]:
    import yaml

    from modalseg.training.config import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in known:
            raise ConfigError(f"--set: unknown training option {key!r}; see `modalseg train --help-config`")
        if key in MANAGED_KEYS:
            raise ConfigError(f"--set {key}: set by this command; use its own option (e.g. --{key.replace('_', '-')})")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse value {value!r}") from None
    mo = out.get("model_options")
    if mo is not None and (not isinstance(mo, dict) or {"base_width", "sa_reduction"} & set(mo)):
        raise ConfigError("--set model_options must be a mapping without base_width/sa_reduction "
                          "(use --base-width-scale and --sa-reduction)")
    po = out.get("preprocess_options")
    if po is not None and (not isinstance(po, dict) or "target_size" in po):
        raise ConfigError("--set preprocess_options must be a mapping without target_size (use --image-size)")
    return out


def build_plan(args: argparse.Namespace) -> Plan:
    """Validate the command line into a :class:`Plan` (one-line :class:`ConfigError` on any problem)."""
    data = Path(args.data)
    if not data.exists():
        raise ConfigError("dataset folder not found", data)
    models = parse_models(args.models)
    dims = int(getattr(args, "dims", 2))
    if dims == 3:
        fixed = [m for m in models if m in FIXED_TOPOLOGY]
        if fixed and args.models.strip().lower() != "all":
            raise ConfigError(f"--dims 3: {', '.join(fixed)} have a fixed VGG topology without a 3D plan; leave them "
                              "out of --models")
        if fixed:
            print(f"paper1: --dims 3 leaves out {', '.join(fixed)} (fixed VGG topology, no 3D plan)")
        models = [m for m in models if m not in FIXED_TOPOLOGY]
    for name in ("runs", "folds", "epochs", "batch_size", "sa_reduction"):
        value = getattr(args, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if args.folds < 2:
        raise ConfigError(f"--folds must be at least 2 for cross-validation, got {args.folds}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ConfigError(f"--lr must be a positive number, got {args.lr}")
    scale = float(args.base_width_scale)
    half = round(32 * scale) if math.isfinite(scale) else 0
    if half < 1:
        raise ConfigError(f"--base-width-scale {args.base_width_scale} gives a half-width base below 1 channel "
                          "(smallest scale: 1/32)")
    if not math.isclose(half, 32 * scale, rel_tol=1e-6):
        print(f"paper1: note: --base-width-scale {scale} rounded to {half}/32 so widths stay integers "
              f"({2 * half} and {half})")
    multiple = 32 if {"fusenet", "fusenet_concat"} & set(models) else 16
    if dims == 2 and (args.image_size < multiple or args.image_size % multiple):
        raise ConfigError(f"--image-size must be a positive multiple of {multiple} "
                          f"({'FuseNet pools 5 times' if multiple == 32 else 'U-Nets pool 4 times'}), "
                          f"got {args.image_size}")
    return Plan(
        data=data, output=Path(args.output), models=models, runs=args.runs, folds=args.folds,
        eval_folds=parse_folds(args.only_folds, args.folds), epochs=args.epochs, image_size=args.image_size,
        half_width=half, width_scale=half / 32, sa_reduction=args.sa_reduction, batch_size=args.batch_size,
        lr=float(args.lr), precision=args.precision, seed=args.seed, split_seed=args.split_seed,
        checkpoint=args.checkpoint, overrides=_parse_set(list(args.set_options or [])),
        progress=bool(args.progress), overwrite=bool(args.overwrite), dims=dims,
        robustness=bool(getattr(args, "robustness", False)),
    )


def full_budget_commands(data: str = "/data/paper1/synth_breast", output: str = "/data/paper1/table1",
                         *, seed: int = 0) -> list[str]:
    """Shell commands for paper 1's full budget on the built-in breast data (a GPU job: 150 trainings).

    Paper facts used (paper 1 = Li et al., shared/papers/000_*):

    * Sec. 2, "Breast MRI Dataset": 313 patients; only the central slice (largest cross-section) is labelled ->
      ``--patients 313 --slices 1``: one labelled slice per synthetic patient, generated at 256x256.
    * Sec. 2, "Implementation Details": five-fold cross-validation; images resized to 256x256; batch size 4;
      Adam with AMSGrad, initial lr 1e-4 halved every 30 epochs; SA block r=16, d=4; three independent runs
      (mean ± s.d.) -> ``--folds 5 --image-size 256 --batch-size 4 --lr 1e-4 --sa-reduction 16 --runs 3``.
    * Sec. 2 (FuseUNet halves every encoder layer's kernels relative to U-Net) and Table 1's parameter counts
      (U-Net 34.5M = base width 64) -> ``--base-width-scale 1`` (64, and 32 for the half-width models).

    Not stated in the paper, so this command's defaults: 100 epochs (the "every 30 epochs" schedule implies
    more than 30; 100 gives three halvings); fp32 (the paper trained on a TITAN Xp, a GPU without bf16; use
    ``--precision bf16`` for speed); the final weights (``--checkpoint latest``).
    """
    import shlex

    d, o = shlex.quote(str(data)), shlex.quote(str(output))
    return [
        f"modalseg synth breast --output {d} --patients 313 --slices 1 --size 256 --seed {seed}",
        f"modalseg experiment paper1 --data {d} --output {o} --models all --runs 3 --folds 5 --epochs 100 "
        f"--image-size 256 --base-width-scale 1 --sa-reduction 16 --batch-size 4 --lr 1e-4 --precision fp32 "
        f"--seed {seed} --split-seed {seed} --checkpoint latest",
    ]


# ---------------------------------------------------------------------------------------------- helpers
def count_parameters(model: Any) -> int:
    """Trainable parameters of a module."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def full_size_parameters(model: str, num_modalities: int, in_channels: int, num_classes: int,
                         topology: Mapping[str, Any] | None = None) -> int:
    """Parameters of ``model`` at paper 1's widths (64/32, r=16), built on the meta device (no memory);
    ``topology``: a 3D network's planned ``spatial_dims`` / ``depth`` / ``kernel_sizes`` / ``strides``."""
    import torch

    from modalseg.models import create_model

    with torch.device("meta"):
        net = create_model(model, num_modalities=num_modalities, in_channels=in_channels,
                            num_classes=num_classes, base_width=DEFAULT_BASE_WIDTH[model], sa_reduction=16,
                            **dict(topology or {}))
    return count_parameters(net)


def count_empty_slices(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """(slices whose reference has foreground but whose argmax prediction has none, slices with reference
    foreground): a model that collapses to background scores Dice 0 there, which a mean alone hides."""
    p = np.asarray(pred).reshape(len(pred), -1) > 0
    ref = (np.asarray(target).reshape(len(target), -1) > 0).any(1)
    return int((ref & ~p.any(1)).sum()), int(ref.sum())


def _empty_counts(record: dict) -> tuple[int, int]:
    """A record's (empty, reference) slice counts; version-1 records lack them, so they come from the per-class
    statuses: a slice is empty when no class is predicted (pred_empty or both_empty) and some class is
    present (pred_empty)."""
    if "empty_slices" in record:
        return int(record["empty_slices"]), int(record["reference_slices"])
    by_slice: dict[tuple[str, int], list[str]] = {}
    for s in record["slices"]:
        by_slice.setdefault((s["patient_id"], int(s["z"])), []).append(s["status"])
    empty = sum(all(st in ("pred_empty", "both_empty") for st in v) and "pred_empty" in v
                for v in by_slice.values())
    ref = sum(any(st in ("pred_empty", "ok") for st in v) for v in by_slice.values())
    return int(empty), int(ref)


def _fmt_millions(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e6:.3f}" if n >= 1e6 else f"{n / 1e6:.4g}"


def _train_config(plan: Plan, model: str, run: int, fold: int) -> Any:
    from modalseg.training.config import TrainConfig

    values: dict[str, Any] = {
        "progress": plan.progress, "tensorboard": False, "cache_dir": str(plan.output / ".modalseg_cache"),
    }
    values.update({k: v for k, v in plan.overrides.items() if k not in ("model_options", "preprocess_options")})
    values.update(
        data=str(plan.data), output=str(_run_root(plan, model, run)), model=model,
        model_options=plan.model_options(model), preprocess="paper1",
        preprocess_options={**(plan.overrides.get("preprocess_options") or {}),
                            "target_size": [plan.image_size, plan.image_size],
                            **({"only_labelled_slices": False} if plan.dims == 3 else {})},
        epochs=plan.epochs, batch_size=plan.batch_size, lr=plan.lr, precision=plan.precision,
        folds=plan.folds, fold=fold, seed=plan.seed + run, split_seed=plan.split_seed,
        **({"dims": 3} if plan.dims == 3 else {}),
    )
    return TrainConfig.from_dict(values, source="modalseg experiment paper1")


def _run_root(plan: Plan, model: str, run: int) -> Path:
    return plan.output / "runs" / model / f"run_{run}"


def _record_path(plan: Plan, model: str, run: int, fold: int) -> Path:
    return plan.output / "records" / f"{model}_run{run}_fold{fold}.json"


def _predictions_path(record_path: Path) -> Path:
    return record_path.with_name(record_path.stem + "_val.npz")


def _splits(plan: Plan, spec: Any, cache: Any) -> list[dict]:
    """``DIR/splits.json``, the one patient split of every run and model: validated if present, else made as the
    engine makes a run's split (so records of earlier versions, whose first training wrote it, still match)."""
    from modalseg.training.splits import resolve_splits
    from modalseg.training.tasks import task_for

    path = plan.output / "splits.json"
    if path.exists():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot parse splits ({exc})", path) from None
        if not isinstance(stored, list) or len(stored) != plan.folds:
            n = len(stored) if isinstance(stored, list) else "?"
            raise ConfigError(f"has {n} folds but --folds is {plan.folds}; pass --overwrite to re-split", path)
    return resolve_splits(plan.output, cache.patients, plan.folds, plan.split_seed, task_for(spec).strata(cache),
                          dataset_root=plan.data, log=lambda line: print(f"paper1: {line}", flush=True))


def labelled_slices(val: Any) -> Any:
    """The slices of a validation prediction whose reference has foreground (what the ``paper1`` preset caches)."""
    keep = [i for i, r in enumerate(val.records) if r.get("foreground")]
    return dataclasses.replace(val, pred=val.pred[keep], target=val.target[keep],
                               records=[val.records[i] for i in keep], indices=val.indices[keep])


def _save_predictions(path: Path, pred: np.ndarray, cache_index: np.ndarray, case_ids: list[str],
                      zs: list[int]) -> None:
    from modalseg.utils.atomic import atomic_path

    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, pred=pred.astype(np.uint8), cache_index=cache_index.astype(np.int64),
                            case_ids=np.asarray(case_ids, dtype=str), z=np.asarray(zs, dtype=np.int64))


class Paper1(Experiment):
    """Paper 1's grid (run x fold x model) and what one (model, run, fold) records, for the shared runner."""

    name = "paper1"

    def __init__(self, plan: Plan, splits: list[dict]) -> None:
        self.plan = plan
        self.splits = splits
        self.checkpoint = plan.checkpoint

    def keys(self) -> list[dict[str, Any]]:
        """The grid in paper 1's order: every model of a fold, every fold of a run."""
        return grid(("run", range(self.plan.runs)), ("fold", self.plan.eval_folds), ("model", self.plan.models))

    def job(self, key: Mapping[str, Any]) -> Job:
        model, run, fold = key["model"], key["run"], key["fold"]
        path = _record_path(self.plan, model, run, fold)
        options = {"format": RECORD_FORMAT, "seed": self.plan.seed + run, "budget": self.plan.budget(),
                   "val_patients": list(self.splits[fold]["val"])}
        return Job(key={"model": model, "run": run, "fold": fold}, options=options, record=path,
                   run_root=_run_root(self.plan, model, run), fold=fold, companions=(_predictions_path(path),))

    def describe(self, key: Mapping[str, Any]) -> str:
        return f"{key['model']} run {key['run']} fold {key['fold']}"

    def train_config(self, job: Job) -> Any:
        return _train_config(self.plan, job.key["model"], job.key["run"], job.fold)

    def training_note(self, job: Job) -> str:
        return f"(seed {self.plan.seed + job.key['run']})"

    def summary(self, outcome: Outcome) -> str:
        slices = outcome.record["slices"]
        dice = np.mean([s["dice"] for s in slices]) if slices else math.nan
        return f"per-slice Dice {100 * dice:.1f}% on {len(slices)} slice(s)"

    def evaluate(self, job: Job, trainer: Any, summary: dict[str, Any], train_seconds: float,
                 weights: Path) -> dict[str, Any]:
        """Per-slice metrics of the fold's validation slices (foreground class) and the saved predictions."""
        from modalseg.training.evaluate import evaluate_model_predictions

        plan, model, run, fold = self.plan, job.key["model"], job.key["run"], job.fold
        val = trainer.predict_split("val")["all"]
        if plan.dims == 3:  # scored on the labelled slices, as the 2D protocol (which caches only those)
            val = labelled_slices(val)
        n_empty, n_reference = count_empty_slices(val.pred, val.target)
        class_names = list(trainer.meta.labels)
        _per_patient, per_slice = evaluate_model_predictions(val.pred, val.target, val.records, trainer.meta)
        slices = []
        for i, m in enumerate(per_slice):
            rec = val.records[i // (len(class_names) - 1)]
            slices.append({**m.as_dict(), "patient_id": rec["patient_id"], "z": int(rec["z"])})
        meta = trainer.meta
        record = {
            "format": RECORD_FORMAT, "version": RECORD_VERSION, "model": model, "run": run, "fold": fold,
            "seed": trainer.cfg.seed, "budget": plan.budget(), "val_patients": list(trainer.split["val"]),
            "modalities": list(meta.modalities), "base_width": plan.base_width(model),
            "params_trained": count_parameters(trainer.network),
            "params_full": full_size_parameters(
                model, len(meta.modalities), meta.in_channels, meta.num_classes,
                {k: v for k, v in meta.model_options.items() if k in ("spatial_dims", "depth", "kernel_sizes",
                                                                       "strides")}),
            "precision": trainer.precision.name, "train_seconds": round(train_seconds, 2),
            "epochs_trained": summary["epochs"], "steps": summary["steps"],
            "best_val_dice_patient": summary["best_val_dice"], "checkpoint": str(weights),
            "empty_slices": n_empty, "reference_slices": n_reference,
            "slices": slices,
        }
        _save_predictions(_predictions_path(job.record), val.pred, val.indices,
                          [r["case_id"] for r in val.records], [int(r["z"]) for r in val.records])
        return record


# ---------------------------------------------------------------------------------------------- tables
def _table_records(records: list[dict]) -> list[dict]:
    from modalseg.models.paper1 import PAPER1_TABLE1_ROWS

    rows = []
    for rec in records:
        for s in rec["slices"]:
            rows.append({"model": PAPER1_TABLE1_ROWS[rec["model"]], "run": rec["run"], "fold": rec["fold"],
                         "status": s["status"], **{m: s[m] for m in METRICS}})
    return rows


def summarise_records(records: list[dict], models: list[str]) -> dict[str, dict]:
    """Per model and metric: per-run means (slices of all folds pooled) and their mean ± s.d."""
    from modalseg.evaluation.stats import mean_sd

    out: dict[str, dict] = {}
    for model in models:
        recs = [r for r in records if r["model"] == model]
        runs = sorted({r["run"] for r in recs})
        entry: dict[str, Any] = {"runs": runs}
        for metric in METRICS:
            per_run = []
            for run in runs:
                vals = [s[metric] for r in recs if r["run"] == run for s in r["slices"]]
                vals = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
                per_run.append(float(np.mean(vals)) if vals else math.nan)
            finite = [v for v in per_run if math.isfinite(v)]
            mean, sd = mean_sd(finite)
            entry[metric] = {"mean": mean, "sd": sd, "per_run": per_run}
        entry["n_slices_per_run"] = [sum(len(r["slices"]) for r in recs if r["run"] == run) for run in runs]
        counts = [[_empty_counts(r) for r in recs if r["run"] == run] for run in runs]
        per_run_empty = [sum(e for e, _ in c) for c in counts]
        mean, sd = mean_sd(per_run_empty)
        entry["empty_slices"] = {"mean": mean, "sd": sd, "per_run": per_run_empty,
                                 "reference_slices_per_run": [sum(n for _, n in c) for c in counts]}
        entry["params_trained"] = recs[0]["params_trained"] if recs else None
        entry["params_full"] = recs[0]["params_full"] if recs else None
        entry["train_seconds"] = float(sum(r["train_seconds"] for r in recs))
        out[model] = entry
    return out


def write_table1(plan: Plan, records: list[dict], wall_s: float, dataset_name: str, trained: int | None = None
                 ) -> tuple[Path, Path]:
    """``table1.md`` / ``table1.csv`` (paper 1 Table 1 layout) and ``summary.json``."""
    from scipy.stats import kendalltau

    from modalseg.evaluation.tables import markdown_table, results_table, write_table
    from modalseg.models.paper1 import PAPER1_TABLE1_PARAMS, PAPER1_TABLE1_ROWS
    from modalseg.utils.atomic import atomic_write_text

    models = [m for m in plan.models if any(r["model"] == m for r in records)]
    rows, metric_cols = results_table(_table_records(records), metrics=METRICS, row_key="model", run_key="run",
                                      row_order=[PAPER1_TABLE1_ROWS[m] for m in models])
    summary = summarise_records(records, models)
    by_row = {PAPER1_TABLE1_ROWS[m]: m for m in models}
    param_cols = ["Params (paper, M)", "Params (this build at full size, M)", "Params (as trained, M)"]
    for row in rows:
        m = by_row[row["Model"]]
        row[param_cols[0]] = f"{PAPER1_TABLE1_PARAMS[m]:.1f}"
        row[param_cols[1]] = _fmt_millions(summary[m]["params_full"])
        row[param_cols[2]] = _fmt_millions(summary[m]["params_trained"])
        empty = summary[m]["empty_slices"]
        refs = sorted(set(empty["reference_slices_per_run"]))
        of = str(refs[0]) if len(refs) == 1 else f"{refs[0]}-{refs[-1]}"
        row[EMPTY_COLUMN] = f"{empty['mean']:.1f} ± {empty['sd']:.1f} / {of}"
    columns = [metric_cols[0], *param_cols, metric_cols[1], EMPTY_COLUMN, *metric_cols[2:]]
    md_path, csv_path = plan.output / "table1.md", plan.output / "table1.csv"
    write_table(rows, columns, None, csv_path)

    paper_rows = [{"Model": PAPER1_TABLE1_ROWS[m],
                   **{lbl: "{:.1f} ± {:.1f}".format(*PAPER1_TABLE1_RESULTS[m][k])
                      for k, lbl in zip(METRICS, metric_cols[1:4], strict=True)}} for m in models]
    ours = [summary[m]["dice"]["mean"] for m in models]
    theirs = [PAPER1_TABLE1_RESULTS[m]["dice"][0] for m in models]
    ranked = sorted(models, key=lambda m: -summary[m]["dice"]["mean"] if math.isfinite(
        summary[m]["dice"]["mean"]) else math.inf)
    tau = float(kendalltau(ours, theirs).statistic) if len(models) >= 2 else math.nan
    runs_done = sorted({r["run"] for r in records})
    folds_done = sorted({r["fold"] for r in records})
    train_total = sum(r["train_seconds"] for r in records)
    fell_back = sum(Path(str(r.get("checkpoint", ""))).name != f"{plan.checkpoint}.pt" for r in records)
    weights = ("final epoch" if plan.checkpoint == "latest" else
               "best validation Dice on the reported fold: optimistic")
    if fell_back:
        weights += f"; {fell_back} record(s) without best.pt used latest.pt"
    budget = (
        ("3D networks (--dims 3: planned patches, sliding-window validation, scored on the labelled slices). "
         if plan.dims == 3 else "")
        + f"Budget: {plan.epochs} epochs, image {plan.image_size}x{plan.image_size}, base widths "
        f"{2 * plan.half_width}/{plan.half_width} (x{plan.width_scale:g} of the paper's 64/32), SA r="
        f"{plan.sa_reduction} d=4, batch {plan.batch_size}, lr {plan.lr:g} (Adam+AMSGrad, x0.5 every 30 epochs), "
        f"precision {plan.precision}, folds {','.join(map(str, folds_done))} of {plan.folds}, "
        f"{len(runs_done)} run(s) (seeds {', '.join(str(plan.seed + r) for r in runs_done)}), "
        f"weights {plan.checkpoint}.pt ({weights}). Wall time: {wall_s / 60:.1f} min this invocation"
        + (f" ({trained} trained, {len(records) - trained} reused); " if trained is not None else "; ") +
        f"training {train_total / 60:.1f} min summed over the {len(records)} (model, run, fold) records."
    )
    method = ("Metrics per validation slice (2D, foreground class), pooled over the folds of each run; "
              "mean ± s.d. (ddof 1) over runs, in %. Params (this build at full size): paper 1's widths with "
              f"this dataset's input channels; Params (as trained): the networks trained here. {EMPTY_COLUMN}: "
              "validation slices with reference foreground where the argmax prediction has none (Dice 0), "
              "per run summed over folds, mean ± s.d. over runs / slices with reference foreground. Dataset: "
              f"{dataset_name} ({plan.data}).")
    ranking = (f"Dice ranking here: {' > '.join(PAPER1_TABLE1_ROWS[m] for m in ranked)}. Kendall tau between "
               f"the Dice means here and paper 1's: {tau:.2f} over {len(models)} models.")
    text = (
        markdown_table(rows, columns, title=f"Paper 1 Table 1 reproduced on {dataset_name}")
        + f"\n{budget}\n\n{method}\n\n{ranking}\n\n"
        + markdown_table(paper_rows, ["Model", *metric_cols[1:4]], title="Paper 1 Table 1 as printed (breast MRI)")
    )
    atomic_write_text(md_path, text)
    atomic_write_text(plan.output / "summary.json", json.dumps(
        {"budget": plan.budget(), "models": summary, "kendall_tau_dice_vs_paper": tau,
         "dice_ranking": ranked, "wall_seconds": wall_s, "train_seconds_total": train_total,
         "runs": runs_done, "folds": folds_done}, indent=1))
    return md_path, csv_path


# ---------------------------------------------------------------------------------------------- figures
def _open_cache(plan: Plan, model: str) -> Any:
    """The slice cache the trainings use (opened, not rebuilt, when its fingerprint matches)."""
    from modalseg.data.cache import build_slice_cache
    from modalseg.data.layouts import load_dataset
    from modalseg.training.engine import cache_folder, make_preprocess, resolve_recipe

    cfg = _train_config(plan, model, 0, plan.eval_folds[0])
    spec = load_dataset(cfg.data, cfg.layout)
    cfg = resolve_recipe(cfg, spec)
    return build_slice_cache(spec, make_preprocess(cfg, spec), cache_folder(cfg, spec), progress=False,
                             strict=cfg.strict_geometry)


def _load_predictions(plan: Plan, model: str, run: int, fold: int, cache: Any) -> dict | None:
    path = _record_path(plan, model, run, fold)
    npz = path.with_name(path.stem + "_val.npz")
    if not npz.exists():
        return None
    with np.load(npz) as f:
        data = {k: f[k] for k in f.files}
    idx = data["cache_index"]
    if idx.size and (idx.max() >= len(cache) or
                     [cache.records[i]["case_id"] for i in idx] != [str(c) for c in data["case_ids"]]):
        return None  # the cache was rebuilt differently: these predictions do not line up any more
    return data


def _choose_examples(preds: dict[str, np.ndarray], gt: np.ndarray, models: list[str], n: int = 4
                     ) -> list[tuple[int, str]]:
    """Fig. 4 rows: a slice where T1C alone (U-Net) is fooled by a distractor, the proposed model's largest
    gain, the hardest slice and a median one (distinct slices with foreground)."""
    fg = np.flatnonzero(gt.reshape(len(gt), -1).any(1))
    if fg.size == 0:
        fg = np.arange(len(gt))
    dice = {}
    for m in models:
        p, g = preds[m] > 0, gt > 0
        inter = (p & g).reshape(len(gt), -1).sum(1)
        denom = p.reshape(len(gt), -1).sum(1) + g.reshape(len(gt), -1).sum(1)
        dice[m] = np.where(denom == 0, 1.0, 2 * inter / np.maximum(denom, 1))
    ref = "master_assistant" if "master_assistant" in models else models[-1]
    others = [m for m in models if m != ref] or [ref]
    chosen: list[tuple[int, str]] = []

    def take(order: np.ndarray, reason: str) -> None:
        for i in order:
            if int(i) not in [c for c, _ in chosen]:
                chosen.append((int(i), reason))
                return

    if "unet" in models:
        fp = ((preds["unet"] > 0) & (gt == 0)).reshape(len(gt), -1).sum(1).astype(float)
        if ref != "unet":
            fp_ref = ((preds[ref] > 0) & (gt == 0)).reshape(len(gt), -1).sum(1)
            fp = fp - fp_ref
        cand = fg[fp[fg] > 0]
        if cand.size:
            take(cand[np.argsort(-fp[cand], kind="stable")], "T1C-only false positive")
    gain = dice[ref] - np.mean([dice[m] for m in others], axis=0)
    take(fg[np.argsort(-gain[fg], kind="stable")], "largest gain")
    mean_dice = np.mean([dice[m] for m in models], axis=0)
    take(fg[np.argsort(mean_dice[fg], kind="stable")], "hardest")
    order = fg[np.argsort(dice[ref][fg], kind="stable")]
    take(np.roll(order, -(len(order) // 2)), "median")
    for i in fg:  # fill up with any remaining foreground slices
        if len(chosen) >= min(n, fg.size):
            break
        take(np.array([i]), "example")
    return chosen[:n]


def _attention_rows(plan: Plan, model: str, fold: int, image: np.ndarray) -> dict[str, list[np.ndarray]]:
    """SA maps of the run-0 model on one slice: {row label: [block 1..5 maps]}."""
    import torch

    from modalseg.models.fusion import attention_maps
    from modalseg.training.checkpoint import read_checkpoint

    path = plan.output / "runs" / model / "run_0" / f"fold_{fold}" / f"{plan.checkpoint}.pt"
    if not path.exists():  # no best.pt when no validation epoch was non-degenerate: the weights evaluated
        path = path.with_name("latest.pt")
    checkpoint = read_checkpoint(path)
    meta = checkpoint.meta
    net = checkpoint.build_network()
    net.eval()
    names = meta.channel_names or meta.modalities
    channels = [names.index(m) for m in meta.modalities]
    with torch.no_grad():  # the SA maps are the default side outputs of these models' forward_features
        _logits, features = net.forward_features(
            torch.as_tensor(np.ascontiguousarray(image[None, channels]), dtype=torch.float32))
    maps = {k: [m[0, 0].float().cpu().numpy() for m in v] for k, v in attention_maps(features).items()}
    master, assistant = meta.modalities[0], meta.modalities[1] if len(meta.modalities) > 1 else "assistant"
    if model == "master_assistant":
        return {f"Proposed {master}": maps["master"],
                f"Proposed {assistant} (= {master} map)": maps["master"]}
    return {f"FuseUNet+SA {master}": maps["master"], f"FuseUNet+SA {assistant}": maps["assistant1"]}


def make_figures(plan: Plan, cache: Any = None) -> list[Path]:
    """Fig. 4 (overlays of every model on 3-4 validation slices) and Fig. 5 (SA maps), run 0, first fold."""
    from modalseg.evaluation.figures import plot_attention_maps, plot_overlays
    from modalseg.models.paper1 import PAPER1_TABLE1_ROWS

    fold = plan.eval_folds[0]
    cache = cache if cache is not None else _open_cache(plan, plan.models[0])
    preds, data = {}, None
    for m in plan.models:
        d = _load_predictions(plan, m, 0, fold, cache)
        if d is None:
            print(f"paper1: figures: no run-0 fold-{fold} predictions of {m}; left out of Fig. 4")
            continue
        if data is not None and not np.array_equal(d["cache_index"], data["cache_index"]):
            print(f"paper1: figures: {m} was validated on other slices; left out of Fig. 4")
            continue
        data = data if data is not None else d
        preds[m] = d["pred"]
    if data is None or not len(data["cache_index"]):
        print("paper1: figures: nothing to plot")
        return []
    idx = data["cache_index"]
    gt = np.asarray(cache.labels[idx])
    models = list(preds)
    chosen = _choose_examples(preds, gt, models)
    out: list[Path] = []
    examples = [{"image": np.asarray(cache.images[idx[i], 0]), "gt": gt[i],
                 "preds": {PAPER1_TABLE1_ROWS[m]: preds[m][i] for m in models}} for i, _ in chosen]
    # One line per label: plot_overlays leaves a narrow left margin for the row labels.
    labels = [f"{data['case_ids'][i]} z{int(data['z'][i])}: {why}" for i, why in chosen]
    out.append(plot_overlays(examples, plan.output / "figures" / "fig4_overlays.png", row_labels=labels))
    streams: dict[str, list[np.ndarray]] = {}
    example = np.asarray(cache.images[idx[chosen[0][0]]])
    for m in FIG5_MODELS:
        if m not in plan.models:
            continue
        try:
            streams.update(_attention_rows(plan, m, fold, example))
        except Exception as exc:  # a missing or foreign checkpoint only costs this panel
            print(f"paper1: figures: no SA maps of {m} ({str(exc).splitlines()[0][:160]})")
    if streams:
        title = (f"SA maps, blocks 1-5 (run 0, fold {fold}, {data['case_ids'][chosen[0][0]]} "
                 f"z{int(data['z'][chosen[0][0]])})")
        out.append(plot_attention_maps(streams, plan.output / "figures" / "fig5_attention.png", title=title))
    return out


def write_robustness_tables(plan: Plan) -> Path | None:
    """``--robustness``: every multi-modality model of run 0, on the validation cases of its evaluated folds
    (pooled), with each proper subset of modalities removed (:mod:`modalseg.training.robustness`: zeros after
    normalisation, whole validation volumes scored as ``modalseg evaluate`` scores files, so the figures are volume
    metrics, not Table 1's per-slice ones). Per model ``DIR/robustness/<model>/``; all models in
    ``DIR/robustness.md``."""
    from modalseg.evaluation.tables import write_table
    from modalseg.models.paper1 import PAPER1_TABLE1_ROWS
    from modalseg.training.model_meta import single_modality_models
    from modalseg.training.robustness import evaluate_robustness, write_robustness

    rows: list[dict[str, str]] = []
    for model in plan.models:
        if model in single_modality_models():
            continue
        result = evaluate_robustness(_run_root(plan, model, 0), plan.data, which=plan.checkpoint, log=None)
        write_robustness(result, plan.output / "robustness" / model)
        for row in result.rows:
            rows.append({"Model": PAPER1_TABLE1_ROWS[model], "Removed": row["removed"], "Present": row["present"],
                         "Trained for it": row["trained"], "Cases": str(row["n_cases"]),
                         "Mean Dice (%)": f"{100 * row['dice_mean']:.2f}"})
    if not rows:
        print("paper1: robustness: no multi-modality model in --models; nothing to evaluate")
        return None
    path = plan.output / "robustness.md"
    write_table(rows, list(rows[0]), path, None,
                title=f"Robustness to missing modalities (run 0, {plan.checkpoint}.pt, validation volumes of the "
                      "evaluated folds pooled; removed modalities fed as zeros after normalisation; volume Dice)")
    return path


# ---------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    """Train/evaluate every (run, fold, model) through the shared runner (reusing records); Table 1, Figs. 4-5."""
    from modalseg.data.layouts import load_dataset

    t_start = time.perf_counter()
    plan = build_plan(args)
    spec = load_dataset(str(plan.data))
    if not spec.paired:
        raise ConfigError("paper 1's experiment needs a paired (multi-channel) dataset", plan.data)
    plan.output.mkdir(parents=True, exist_ok=True)
    if plan.overwrite:
        (plan.output / "splits.json").unlink(missing_ok=True)
    cache = _open_cache(plan, plan.models[0])
    experiment = Paper1(plan, _splits(plan, spec, cache))
    keys = experiment.keys()
    print(f"paper1: {len(plan.models)} model(s) x {plan.runs} run(s) x {len(plan.eval_folds)} fold(s) of "
          f"{plan.folds} = {len(keys)} trainings on {spec.name}; {plan.epochs} epochs, image {plan.image_size}, "
          f"widths {2 * plan.half_width}/{plan.half_width}; output {plan.output}", flush=True)
    runner = Runner(experiment, plan.output / "splits.json", experiment.splits, overwrite=plan.overwrite)
    outcomes = runner.run(keys)
    records = [o.record for o in outcomes]
    trained = sum(not o.reused for o in outcomes)
    md, csv = write_table1(plan, records, time.perf_counter() - t_start, spec.name, trained)
    print(f"paper1: {trained} trained, {len(outcomes) - trained} reused; table -> {md} and {csv}")
    print(md.read_text(encoding="utf-8").split("\n\n**Paper 1 Table 1 as printed")[0])
    if plan.dims == 3:
        print("paper1: figures: Fig. 4 / Fig. 5 are 2D panels; not drawn for --dims 3")
    else:
        for path in make_figures(plan, cache):
            print(f"paper1: figure -> {path}")
    if plan.robustness:
        path = write_robustness_tables(plan)
        if path is not None:
            print(f"paper1: robustness -> {path}")
    print(f"paper1: done in {(time.perf_counter() - t_start) / 60:.1f} min; records in {plan.output / 'records'}")
    return 0
