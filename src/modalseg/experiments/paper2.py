"""``modalseg experiment paper2``: paper 2's comparison of six unpaired settings (Tables 1-3, Wilcoxon, Fig. 6).

Chen et al., "Deep class-specific affinity-guided convolutional network for multimodal unpaired image
segmentation", Sec. 3: six settings trained on the same data with the same network -- Single, UMMKD, Joint,
MSBN, Affinity and CSA (ours) -- evaluated with the volume Dice score and the surface Hausdorff distance per
modality and class, a patient-level Wilcoxon signed-rank test of CSA against UMMKD, and Fig. 6 (masks of every
setting on one slice per modality).

What this command does, per setting (in the paper's row order), run and fold:

1. trains ``Trainer(TrainConfig(setting=..., model=backbone, ...)).fit()`` with paper 2's recipe for unpaired
   data (Adam lr 1e-4, x0.95 every 1000 iterations, ``--batch-size`` slices per modality per step, loss
   Dice + CE per modality + 0.5 x the setting's auxiliary loss, Eq. 5) for ``--iterations`` iterations. All
   settings share one patient split (``DIR/splits.json``, stratified by modality; fold 0 of 5 is the paper's
   80/20 split), one slice cache and the same seeds (run ``r`` uses seed ``--seed + r``);
2. predicts the fold's validation slices with the **final** weights (``--checkpoint latest``, default; the
   former spelling ``last`` is still accepted). The paper has no separate validation set: its 20 % are the
   test set, so choosing ``best.pt`` by validation Dice (``--checkpoint best``) selects on the test patients
   and is optimistic; it is offered for comparison;
3. stacks each validation patient's slices of a modality into a volume and computes, per class, Dice and the
   Hausdorff distances in mm with the voxel spacing (slice thickness, processed in-plane pixel size) and, with
   the same MONAI call at spacing 1, in voxels (``hd_vox``, ``hd95_vox``);
4. saves those per-patient records (``DIR/records/<setting>/run<r>_fold<k>.json``) with the slices for Fig. 6
   (``..._fig.npz``). The grid, record reuse, the shared split and resume are the shared experiment runner's
   (:mod:`modalseg.experiments.runner`, docs/experiments.md): records are reused on a later call with the same
   options (``--overwrite`` retrains), a record of other options is refused, and a training killed half-way
   resumes from its ``latest.pt``.

Outputs: ``DIR/table_dice.{md,csv}`` (%), ``DIR/table_hd.{md,csv}`` and ``DIR/table_hd95.{md,csv}`` (mm, or
voxels with ``--hd-units voxels``), rows = settings, columns = modality x class (+ the class average the paper
quotes in its text); cells are means over patients, or medians with ``--aggregate median``;
``DIR/wilcoxon.{md,csv}``; ``DIR/figures/fig6_masks.png``; ``DIR/records.csv`` (every per-patient value).

Distances: ``HD`` is MONAI's symmetric Hausdorff distance between the mask edges (``percentile=None``), which
stands for paper 2's "surface Hausdorff distance"; ``HD95`` is MONAI's, the maximum of the two directed 95th
percentiles (medpy pools the directions instead). An empty prediction of a present class has no surface: its
HD is inf, left out of the mean and counted in the tables' ``Excluded`` column, never dropped silently.

Paper 2's own conventions, for comparison with its tables (defaults = this package's; every choice is printed
in the tables' notes):

* ``--hd-units voxels`` and ``--aggregate median``: nearly all of paper 2's HD values are square roots of
  integers (3.00, 2.24 = sqrt 5, 4.12 = sqrt 17, 5.39 = sqrt 29 ...), which a mean of patients' distances in mm
  almost never is and a median over an odd number of patients of distances on the unit voxel grid always is
  (Table 1: 9 test patients).
  ``voxels`` computes the distances with spacing 1 on every axis; ``median`` takes, per setting, modality,
  class and run, the median over patients (non-finite values excluded and counted, as for the mean). The
  median applies to every table (Dice included).
* ``--dice-form ummkd_batch`` (every setting): UMMKD's Dice loss, one soft Dice per class over the whole
  batch, background included (paper 2 builds on UMMKD's code); default: per image, foreground (DiceCELoss).
* ``--kd-absent-classes ummkd`` (UMMKD row): UMMKD's code averages the KD term over all classes, an absent
  class contributing with a uniform soft prediction; default: such classes are skipped (losses.kd).
* ``--csa-reading mean_squared`` and ``--csa-region-norm false`` (CSA and Affinity rows): the element-wise
  reading of Eq. 4 and Eq. 3 without the 1/S_c rescaling (losses.affinity); defaults: Eq. 3-4 as printed.
  ``--feature-layers a,b,c``: every consecutive pair (a-b, b-c) is used and the pair losses averaged.

Data conventions (chosen automatically from the dataset layout, preprocess preset ``auto``):

* MS-CMRSeg 2019 (layout ``mscmrseg``): LGE + bSSFP (C0), classes LV / Myo / RV from label values
  500 / 200 / 600, z-score per slice, fixed 224x224 box enclosing the annotations. Patients have both
  modalities, so a patient's LGE and bSSFP volumes fall on the same side of the split.
* MM-WHS 2017 (layout ``mmwhs``): CT + MR, classes LVM / LAC / LVC / AA (205 / 420 / 500 / 820; the other
  structures are background), coronal slices, z-score per slice, 256x256 box. CT and MR are different
  subjects: each volume is its own patient.
* Built-in synthetic cardiac data (``modalseg synth cardiac``, nnU-Net layout with ``"paired": false``):
  z-score per slice, no crop (the slices are already heart-centred); different subjects per modality.

Dropout and BN (``--recalibrate-bn``, ``--dropout``): the dilated FCN puts dropout (p = 0.25) after every
convolution and a BN right after it, so the BN running statistics are collected on dropout-perturbed
activations that inference never sees (the dropout/BN "variance shift", Li et al., CVPR 2019). Measured on the
synthetic data (width 8, 300 iterations), eval-mode predictions reached a mean foreground Dice of about 0.2
while the same weights with statistics re-estimated without dropout reached about 0.62. ``--recalibrate-bn``
re-estimates the statistics on the training slices before evaluation (training data only, no test
information); ``--dropout 0`` removes dropout instead. Both deviate from paper 2, which describes neither,
so both are off by default and recorded in the table notes.

The split is stratified by modality (each fold's 20 % holds about 20 % of every modality's patients) because
with per-modality patients an unstratified split can leave a modality without validation patients.
The paper does not state its number of training iterations; ``--iterations`` defaults to 20,000
(about 300 passes over MS-CMRSeg's training slices at 8 per step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modalseg.errors import ConfigError, DataError
from modalseg.experiments.runner import (
    DEPRECATED_CHECKPOINTS,
    Experiment,
    Job,
    Outcome,
    Runner,
    add_checkpoint_argument,
    checkpoint_name,
    grid,
)

HELP = "reproduce paper 2's Tables 1-3 (six unpaired settings), its Wilcoxon test and Fig. 6 on a dataset"

#: Settings in the row order of paper 2's tables.
SETTING_ORDER: tuple[str, ...] = ("single", "ummkd", "joint", "msbn", "affinity", "csa")
DISPLAY: dict[str, str] = {
    "single": "Single", "ummkd": "UMMKD", "joint": "Joint", "msbn": "MSBN", "affinity": "Affinity", "csa": "CSA",
}
TABLE_METRICS: dict[str, tuple[str, str]] = {
    "dice": ("table_dice", "Volume Dice (%)"),
    "hd": ("table_hd", "Surface Hausdorff distance HD (mm)"),
    "hd95": ("table_hd95", "95th-percentile Hausdorff distance HD95 (mm)"),
}
#: Per-patient record fields of the distances in voxels (spacing 1), beside ``hd`` and ``hd95`` in mm.
VOXEL_FIELDS: dict[str, str] = {"hd": "hd_vox", "hd95": "hd95_vox"}
#: Loss conventions: option -> (TrainConfig field, default, settings it applies to; None = every setting).
LOSS_OPTIONS: dict[str, tuple[str, Any, tuple[str, ...] | None]] = {
    "csa_reading": ("csa_reading", "literal", ("csa", "affinity")),
    "csa_region_norm": ("csa_region_norm", True, ("csa", "affinity")),
    "dice_form": ("dice_form", "per_image", None),
    "kd_absent_classes": ("kd_absent_classes", "skip", ("ummkd",)),
}
RECORD_VERSION = 1
DEFAULT_ITERATIONS = 20000
DEFAULT_EVAL_EVERY = 1000


# ---------------------------------------------------------------------------------------------- arguments
def _settings_arg(text: str) -> list[str]:
    if text.strip().lower() == "all":
        return list(SETTING_ORDER)
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in SETTING_ORDER]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown setting(s) {unknown or text!r}; choose 'all' or from {', '.join(SETTING_ORDER)}"
        )
    return [s for s in SETTING_ORDER if s in names]  # the paper's order, duplicates removed


def _pair_arg(text: str) -> tuple[str, str]:
    names = [t.strip().lower() for t in text.split(",")]
    if len(names) != 2 or any(n not in SETTING_ORDER for n in names) or names[0] == names[1]:
        raise argparse.ArgumentTypeError(f"--compare needs two different settings a,b (got {text!r})")
    return names[0], names[1]


def _layers_arg(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"--feature-layers needs two or more distinct layer names a,b[,c...] (got {text!r})")
    return names


def _bool_arg(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value == "true"


def _folds_arg(text: str) -> list[int] | None:
    if text.strip().lower() == "all":
        return None
    try:
        folds = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--only-folds takes 'all' or fold numbers such as 0,1 (got {text!r})"
        ) from None
    if not folds or min(folds) < 0:
        raise argparse.ArgumentTypeError(f"--only-folds takes non-negative fold numbers (got {text!r})")
    return folds


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` (the one-line error comes from the CLI's parser)."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_count_arg = _int_at_least(0)
_positive = _int_at_least(1)


#: The string options whose default is their first choice (paper 2 as printed, or the usual report; the others are
#: mostly UMMKD's code's readings): flag, choices, help.
_CHOICE_OPTIONS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("--csa-reading", ("literal", "mean_squared"),
     "Eq. 4 reading for CSA and Affinity: literal (as printed, default: squared difference of the per-class mean "
     "entries) or mean_squared (mean squared entry difference)"),
    ("--dice-form", ("per_image", "ummkd_batch"),
     "Dice loss of every setting: per_image (default: per image, foreground) or ummkd_batch (UMMKD's: over the "
     "whole batch, background included)"),
    ("--kd-absent-classes", ("skip", "ummkd"),
     "UMMKD's KD term for classes absent from a batch: skip (default) or ummkd (UMMKD's code: uniform soft "
     "prediction, mean over all classes)"),
    ("--hd-units", ("mm", "voxels"), "units of the HD/HD95 tables: mm (default, voxel spacing) or voxels (spacing 1)"),
    ("--aggregate", ("mean", "median"),
     "per-patient aggregate of every table: mean (default) or median (over patients)"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``modalseg experiment paper2`` (see the module docstring)."""
    p.add_argument("--data", required=True, help="unpaired dataset: MS-CMRSeg, MM-WHS or nnU-Net raw with paired=false")
    p.add_argument("--output", required=True, type=Path, help="experiment folder (tables, records, runs)")
    p.add_argument("--settings", type=_settings_arg, default=list(SETTING_ORDER),
                   help="'all' (default) or a comma list of single,joint,msbn,ummkd,affinity,csa")
    p.add_argument("--backbone", choices=["dilated_fcn", "unet"], default="dilated_fcn",
                   help="dilated_fcn: paper 2's (UMMKD) network (default); unet: paper 1's U-Net (the 3D backbone)")
    p.add_argument("--dims", type=int, choices=[2, 3], default=2,
                   help="2: paper 2's 2D networks (default); 3 (with --backbone unet): the U-Net in 3D with MSBN "
                        "and the 3D class-specific affinity, planned from the data, trained on patches, "
                        "sliding-window validation (docs/3d.md)")
    p.add_argument("--iterations", type=_positive, default=DEFAULT_ITERATIONS,
                   help=f"training iterations per setting (default {DEFAULT_ITERATIONS}; not stated in the paper)")
    p.add_argument("--eval-every", type=_positive, default=DEFAULT_EVAL_EVERY,
                   help=f"validate (log val Dice, keep best.pt) every N iterations (default {DEFAULT_EVAL_EVERY})")
    p.add_argument("--batch-size", type=_positive, default=8, help="slices per modality per step (paper 2: 8)")
    p.add_argument("--lr", type=float, default=1e-4, help="initial learning rate (paper 2: 1e-4)")
    p.add_argument("--width", type=_positive, default=None,
                   help="backbone width: dilated_fcn base width (default 16), unet base_width (default 64)")
    p.add_argument("--dropout", type=float, default=None,
                   help="dilated_fcn drop probability after every conv (default 0.25, see models.dilated_fcn)")
    p.add_argument("--recalibrate-bn", action="store_true",
                   help="before evaluating, re-estimate BN running statistics on the training slices with "
                        "dropout off (see the module docstring)")
    p.add_argument("--feature-layers", type=_layers_arg, default=None,
                   help="two or more layer names for the (CSA) affinity, e.g. group5,group6 (default for "
                        "dilated_fcn); every consecutive pair is used and the pair losses averaged")
    p.add_argument("--csa-region-norm", type=_bool_arg, default=True, metavar="{true,false}",
                   help="Eq. 3's division of every affinity entry by the region size S_c (default true)")
    for flag, choices, text in _CHOICE_OPTIONS:
        p.add_argument(flag, choices=list(choices), default=choices[0], help=text)
    p.add_argument("--grad-ratio-every", type=_count_arg, default=None,
                   help="log ||grad(lambda L_aux)|| / ||grad(Dice+CE)|| every N iterations (aux_grad_ratio in "
                        "log.csv; 0 = never; default: the training default). Does not change the results")
    p.add_argument("--folds", type=_positive, default=5, help="cross-validation folds (default 5: 80/20)")
    p.add_argument("--only-folds", type=_folds_arg, default=[0],
                   help="folds to run: comma list or 'all' (default 0: the paper's single 80/20 split)")
    p.add_argument("--runs", type=_positive, default=1, help="independent runs (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=0, help="seed of run 0 and of the patient split")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto = bf16 autocast on AMX CPUs and CUDA, else fp32")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's choice)")
    add_checkpoint_argument(p, help="weights evaluated: latest.pt, the final weights (default; 'last', the former "
                                    "spelling, still works), or best.pt by validation Dice (selects on test data)")
    p.add_argument("--compare", type=_pair_arg, default=("csa", "ummkd"),
                   help="Wilcoxon signed-rank test of setting a against b (default csa,ummkd)")
    p.add_argument("--figure-slices", type=int, choices=[1, 2], default=1,
                   help="validation slices per modality in Fig. 6 (default 1)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars per run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="retrain even where records exist")


# ---------------------------------------------------------------------------------------------- splits
def stratified_splits(
    patient_modalities: Mapping[str, Sequence[str]], folds: int, seed: int = 0
) -> list[dict[str, list[str]]]:
    """K-fold patient split, stratified by each patient's set of modalities.

    Patients with the same modalities form a stratum; each stratum is shuffled (``seed``) and dealt round-robin
    over the folds, continuing where the previous stratum stopped, so every fold holds about 1/K of every
    modality's patients and the fold sizes differ by at most one.
    """
    if len(patient_modalities) < folds:
        raise DataError(f"{len(patient_modalities)} patient(s) cannot be split into {folds} folds; lower --folds")
    strata: dict[tuple[str, ...], list[str]] = {}
    for patient in sorted(patient_modalities):
        strata.setdefault(tuple(sorted(set(patient_modalities[patient]))), []).append(patient)
    rng = np.random.default_rng(seed)
    parts: list[list[str]] = [[] for _ in range(folds)]
    offset = 0
    for key in sorted(strata):
        members = strata[key]
        for i, j in enumerate(rng.permutation(len(members))):
            parts[(offset + i) % folds].append(members[j])
        offset += len(members)
    everyone = set(patient_modalities)
    return [{"train": sorted(everyone - set(part)), "val": sorted(part)} for part in parts]


def _shared_splits(out: Path, spec, folds: int, seed: int) -> list[dict[str, list[str]]]:
    """``DIR/splits.json``: reused (validated) if present, else a new stratified split."""
    from modalseg.training.splits import load_or_create_splits
    from modalseg.utils.atomic import atomic_write_text

    patient_modalities: dict[str, list[str]] = {}
    for case in spec.cases:
        patient_modalities.setdefault(case.patient_id, []).append(case.modality)
    path = out / "splits.json"
    if not path.exists():
        atomic_write_text(path, json.dumps(stratified_splits(patient_modalities, folds, seed), indent=2))
    return load_or_create_splits(path, sorted(patient_modalities), folds, seed)


# ---------------------------------------------------------------------------------------------- one run
def _signature(args: argparse.Namespace, spec, setting: str, run: int, split: dict) -> dict[str, Any]:
    """Everything that changes a run's result; records are reused only when it matches."""
    sig = {
        "version": RECORD_VERSION,
        "data": str(Path(args.data).resolve()),
        "dataset": spec.name,
        "modalities": list(spec.modalities),
        "setting": setting,
        "backbone": args.backbone,
        **({"dims": 3} if getattr(args, "dims", 2) == 3 else {}),  # 2D records keep their signature
        "width": args.width,
        "feature_layers": list(args.feature_layers) if args.feature_layers else None,
        "dropout": args.dropout,
        "recalibrate_bn": args.recalibrate_bn,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed + run,
        "precision": args.precision,
        "checkpoint": checkpoint_name(args.checkpoint),
        "split": {"train": list(split["train"]), "val": list(split["val"])},
    }
    if sig["checkpoint"] == "best":
        sig["eval_every"] = args.eval_every
    sig.update(_loss_options(args, setting))  # only non-default conventions: older records stay valid
    return sig


def _loss_options(args: argparse.Namespace, setting: str) -> dict[str, Any]:
    """The loss conventions that differ from their defaults and apply to ``setting`` (TrainConfig field -> value)."""
    options: dict[str, Any] = {}
    for arg, (field, default, settings) in LOSS_OPTIONS.items():
        value = getattr(args, arg, default)
        if value != default and (settings is None or setting in settings):
            options[field] = value
    return options


def _train_config(args: argparse.Namespace, setting: str, run: int, fold: int, run_out: Path, out: Path):
    from modalseg.training.config import TrainConfig

    spe = min(args.eval_every, args.iterations)
    options: dict[str, Any] = {}
    if args.width is not None:
        options["width" if args.backbone == "dilated_fcn" else "base_width"] = args.width
    if args.dropout is not None:
        options["dropout"] = args.dropout
    extra = _loss_options(args, setting)
    if getattr(args, "grad_ratio_every", None) is not None:
        extra["grad_ratio_every"] = args.grad_ratio_every
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    missing = [k for k in extra if k not in known]
    if missing:
        raise ConfigError(f"this installation's training configuration has no option(s) {', '.join(missing)} "
                          f"(needed by --{missing[0].replace('_', '-')}); use the default")
    return TrainConfig(
        data=str(args.data), output=str(run_out), setting=setting, model=args.backbone, model_options=options,
        feature_layers=list(args.feature_layers) if args.feature_layers else None,
        epochs=math.ceil(args.iterations / spe), steps_per_epoch=spe, max_steps=args.iterations,
        batch_size=args.batch_size, lr=args.lr, folds=args.folds, fold=fold, seed=args.seed + run,
        split_seed=args.seed, cache_dir=str(out / ".cache"), precision=args.precision, device=args.device,
        num_threads=args.threads, val_every=1, progress=not args.quiet and sys.stderr.isatty(),
        tensorboard=args.tensorboard, **extra, **({"dims": 3} if getattr(args, "dims", 2) == 3 else {}),
    )


def _figure_slices(records: list[dict], target: np.ndarray, count: int = 2) -> list[int]:
    """Positions of up to ``count`` slices for Fig. 6: most classes present, then largest foreground;
    the second from another patient when possible. Depends on the ground truth only, so every setting
    picks the same slices."""
    scores = [(len(np.unique(t[t > 0])), int((t > 0).sum()), -i) for i, t in enumerate(target)]
    order = sorted(range(len(target)), key=lambda i: scores[i], reverse=True)
    chosen: list[int] = []
    for i in order:
        if len(chosen) >= count:
            break
        if chosen and records[i]["patient_id"] in {records[c]["patient_id"] for c in chosen}:
            continue
        chosen.append(i)
    for i in order:  # fewer patients than slices wanted: fill from the same patient
        if len(chosen) >= count:
            break
        if i not in chosen:
            chosen.append(i)
    return chosen


def _record_path(out: Path, setting: str, run: int, fold: int) -> Path:
    return out / "records" / setting / f"run{run}_fold{fold}.json"


def _figure_path(record_path: Path) -> Path:
    return record_path.with_name(record_path.stem + "_fig.npz")


class Paper2(Experiment):
    """Paper 2's grid (setting x run x fold) and what one run records, for the shared runner."""

    name = "paper2"

    def __init__(self, args: argparse.Namespace, spec: Any, splits: list[dict[str, list[str]]],
                 folds: list[int]) -> None:
        self.args = args
        self.spec = spec
        self.splits = splits
        self.folds = folds
        self.out = Path(args.output)
        self.checkpoint = checkpoint_name(args.checkpoint)

    def keys(self) -> list[dict[str, Any]]:
        """The grid in the tables' row order: every fold of a run, every run of a setting."""
        return grid(("setting", list(self.args.settings)), ("run", range(self.args.runs)), ("fold", self.folds))

    def job(self, key: Mapping[str, Any]) -> Job:
        setting, run, fold = key["setting"], key["run"], key["fold"]
        path = _record_path(self.out, setting, run, fold)
        sig = _signature(self.args, self.spec, setting, run, self.splits[fold])
        return Job(key={"setting": setting, "run": run, "fold": fold}, options={"signature": sig}, record=path,
                   run_root=self.out / "runs" / setting / f"run_{run}", fold=fold, companions=(_figure_path(path),))

    def describe(self, key: Mapping[str, Any]) -> str:
        return f"{DISPLAY[key['setting']]} run {key['run']} fold {key['fold']}"

    def upgrade(self, record: dict[str, Any]) -> dict[str, Any]:
        """Records written before the one checkpoint vocabulary said ``last`` for the final weights."""
        sig = record.get("signature")
        if isinstance(sig, dict) and sig.get("checkpoint") in DEPRECATED_CHECKPOINTS:
            record = {**record, "signature": {**sig, "checkpoint": DEPRECATED_CHECKPOINTS[sig["checkpoint"]]}}
        if record.get("weights") in DEPRECATED_CHECKPOINTS:
            record = {**record, "weights": DEPRECATED_CHECKPOINTS[record["weights"]]}
        return record

    def check_record(self, job: Job, record: dict[str, Any]) -> None:
        if _units(self.args) == "voxels" and any(VOXEL_FIELDS["hd"] not in r for r in record["per_patient"]):
            raise ConfigError("records were made before voxel distances were recorded (no hd_vox); pass "
                              "--overwrite to retrain or use --hd-units mm", job.record)

    def train_config(self, job: Job) -> Any:
        return _train_config(self.args, job.key["setting"], job.key["run"], job.fold, job.run_root, self.out)

    def training_note(self, job: Job) -> str:
        return f"{self.args.iterations} iterations ({self.args.backbone})"

    def summary(self, outcome: Outcome) -> str:
        dice: dict[str, list[float]] = {}
        for r in outcome.record["per_patient"]:
            dice.setdefault(r["modality"], []).append(r["dice"])
        line = "mean Dice (%) " + ", ".join(f"{m} {100 * np.mean(v):.1f}" for m, v in dice.items())
        missing = outcome.record["modalities_without_validation"]
        if missing:
            line += f"; warning: no validation patients of {missing} in fold {outcome.job.fold}"
        return line

    def evaluate(self, job: Job, trainer: Any, summary: dict[str, Any], train_seconds: float,
                 weights: Path) -> dict[str, Any]:
        """Per-patient volume metrics of every modality's validation patients and the Fig. 6 slices."""
        from modalseg.training.evaluate import evaluate_model_predictions
        from modalseg.utils.atomic import atomic_write

        setting, run, fold = job.key["setting"], job.key["run"], job.fold
        if self.args.recalibrate_bn:
            recalibrate_bn(trainer)
        class_names = list(trainer.meta.labels)
        rows: list[dict] = []
        figure: list[dict] = []
        arrays: dict[str, np.ndarray] = {}
        missing_modalities = []
        predictions = trainer.predict_split("val")
        for modality in trainer.meta.modalities:
            if modality not in predictions:
                missing_modalities.append(modality)
                continue
            val = predictions[modality]
            per_patient, _per_slice = evaluate_model_predictions(val.pred, val.target, val.records, trainer.meta)
            voxels = voxel_distances(val.pred, val.target, val.records, class_names)
            rows += [
                m.as_dict(setting=DISPLAY[setting], setting_key=setting, run=run, fold=fold, modality=modality,
                          patient_id=m.case_id, **voxels[(m.case_id, m.class_name)])
                for m in per_patient
            ]
            for j, pos in enumerate(_figure_slices(val.records, val.target)):
                key = f"fig{len(figure)}"
                rec = val.records[pos]
                figure.append({"key": key, "modality": modality, "rank": j, "case_id": rec["case_id"],
                               "patient_id": rec["patient_id"], "z": int(rec["z"])})
                arrays[f"{key}_image"] = np.asarray(trainer.cache.images[val.indices[pos], 0], dtype=np.float32)
                arrays[f"{key}_gt"] = np.asarray(val.target[pos], dtype=np.uint8)
                arrays[f"{key}_pred"] = np.asarray(val.pred[pos], dtype=np.uint8)
        record = {
            "signature": job.options["signature"],
            "setting": setting,
            "run": run,
            "fold": fold,
            "train_seconds": round(train_seconds, 1),
            "steps": summary["steps"],
            "best_val_dice": summary["best_val_dice"],
            "weights": "best" if weights.name == "best.pt" else "latest",
            "precision": trainer.precision.name,
            "class_names": class_names,
            "modalities": list(trainer.meta.modalities),
            "modalities_without_validation": missing_modalities,
            "per_patient": rows,
            "figure": figure,
        }
        atomic_write(_figure_path(job.record), lambda fh: np.savez_compressed(fh, **arrays))
        return record


def voxel_distances(
    pred: np.ndarray, target: np.ndarray, records: list[dict], class_names: list[str]
) -> dict[tuple[str, str], dict[str, float]]:
    """Per patient and class, HD and HD95 in voxels: ``{(patient, class): {"hd_vox": .., "hd95_vox": ..}}``.

    The patient volumes are stacked exactly as :func:`modalseg.training.evaluate.evaluate_predictions` does
    (slices in ``(case_id, z)`` order) and scored by the same MONAI call with spacing 1 on every axis, so the
    values are the mm distances of a unit grid. Why: paper 2's HD values look like voxel distances (see the
    module docstring, ``--hd-units``).
    """
    from modalseg.evaluation.metrics import evaluate_case

    patients = [r["patient_id"] for r in records]
    out: dict[tuple[str, str], dict[str, float]] = {}
    for patient in dict.fromkeys(patients):
        sel = sorted((i for i, q in enumerate(patients) if q == patient),
                     key=lambda i: (records[i]["case_id"], records[i]["z"]))
        for m in evaluate_case(pred[sel], target[sel], num_classes=len(class_names), class_names=class_names,
                               spacing=1.0, case_id=patient):
            out[(patient, m.class_name)] = {"hd_vox": m.hd, "hd95_vox": m.hd95}
    return out


def recalibrate_bn(trainer: Any) -> None:
    """Re-estimate every BN layer's running mean/variance on the fold's training slices, dropout off.

    Why: the dilated FCN applies dropout after every convolution and BN right after it, so during training
    each BN's running variance is measured on dropout-perturbed activations; at inference dropout is off and
    the activations have a smaller variance ("variance shift", Li et al., CVPR 2019). Over ~35 stacked layers
    this can ruin eval-mode predictions while batch-statistics predictions are good. The pass
    (:func:`modalseg.training.callbacks.recalibrate_batch_norm`: a cumulative average over all training slices,
    per modality, so each MSBN set sees only its modality) uses training data only. It is off by default
    because paper 2 does not describe it.
    """
    from modalseg.training.callbacks import recalibrate_batch_norm

    recalibrate_batch_norm(trainer)


# ---------------------------------------------------------------------------------------------- reporting
def _units(args: argparse.Namespace) -> str:
    return "voxels" if getattr(args, "hd_units", "mm") == "voxels" else "mm"


def _conventions_line(args: argparse.Namespace) -> str:
    """One line naming every loss and evaluation convention of the tables (paper preset or not)."""
    from modalseg.models.unpaired import DEFAULT_FEATURE_LAYERS

    three_d = getattr(args, "dims", 2) == 3
    # a 3D U-Net's default pair follows its planned depth (models/unpaired.py): name it generically
    layers = list(args.feature_layers or (["master.blocks.<depth-1>", "decoder.ups.0"] if three_d
                                          else DEFAULT_FEATURE_LAYERS.get(args.backbone, ())))
    reading = getattr(args, "csa_reading", "literal")
    norm = getattr(args, "csa_region_norm", True)
    dice = getattr(args, "dice_form", "per_image")
    absent = getattr(args, "kd_absent_classes", "skip")
    units = _units(args)
    parts = [
        f"CSA/Affinity: Eq. 4 reading {reading}"
        + (" (as printed)" if reading == "literal" else " (mean squared entry difference)")
        + f", 1/S_c region normalisation {'on (Eq. 3 as printed)' if norm else 'off (plain cosine)'}, layers "
        + "-".join(layers) + (" (consecutive pairs averaged)" if len(layers) > 2 else ""),
        "Dice loss " + ("per image, foreground classes" if dice == "per_image"
                        else "UMMKD's, over the whole batch, background included"),
        "UMMKD KD " + ("skips classes absent from a batch" if absent == "skip"
                       else "averages over all classes, absent ones as uniform predictions (UMMKD's code)"),
        "distances in " + ("mm (voxel spacing)" if units == "mm" else "voxels (spacing 1 on every axis)"),
        f"per-patient aggregate: {getattr(args, 'aggregate', 'mean')}",
    ]
    return "Conventions: " + "; ".join(parts) + "."


def _table_note(metric: str, n_patients: Mapping[str, int], args: argparse.Namespace, folds: list[int]) -> str:
    per_mod = ", ".join(f"{m}: {n}" for m, n in n_patients.items())
    units = _units(args)
    scale = "with the voxel spacing in mm" if units == "mm" else "in voxels (spacing 1 on every axis)"
    what = {
        "dice": "Volume Dice (%): each validation patient's slices of a modality stacked into one volume.",
        "hd": f"HD ({units}): MONAI's symmetric Hausdorff distance between the mask edges (percentile=None) of "
              f"each patient volume, {scale}; this stands for paper 2's 'surface Hausdorff distance'.",
        "hd95": f"HD95 ({units}): MONAI's 95th-percentile Hausdorff distance, the maximum of the two directed "
                f"95th percentiles (medpy pools both directions instead), per patient volume, {scale}.",
    }[metric]
    stat = "medians" if getattr(args, "aggregate", "mean") == "median" else "means"
    three_d = getattr(args, "dims", 2) == 3
    in_3d = " in 3D (--dims 3: planned patches, sliding-window validation)" if three_d else ""
    samples = "patches" if three_d else "slices"
    lines = [
        "",
        f"Note: {what} Values are {stat} over validation patients (patients per modality: {per_mod}) of "
        f"fold(s) {', '.join(map(str, folds))} of {args.folds}; with several runs ({args.runs} here) the mean "
        f"of the per-run {stat} (± s.d. over runs). 'Avg' is the mean of the class columns.",
        f"Backbone {args.backbone}{in_3d}, width {args.width or 'default'}, {args.iterations} iterations, "
        f"{args.batch_size} {samples} per modality per step, lr {args.lr:g}, {args.checkpoint} weights"
        + (f", dropout {args.dropout:g}" if args.dropout is not None else "")
        + (", BN statistics re-estimated on the training slices (dropout off)" if args.recalibrate_bn else "")
        + ".",
        _conventions_line(args),
    ]
    if metric != "dice":
        lines.append("An empty prediction of a present class (or a prediction of an absent one) has an "
                     f"infinite distance: such values are left out of the {stat} and counted in 'Excluded'.")
    return "\n".join(lines) + "\n"


def _write_class_tables(rows: list[dict], out: Path, args: argparse.Namespace, folds: list[int]) -> dict:
    from modalseg.evaluation.tables import class_table, markdown_table, write_table
    from modalseg.utils.atomic import atomic_write_text

    n_patients: dict[str, int] = {}
    for r in rows:
        n_patients.setdefault(r["modality"], 0)
    for m in n_patients:
        n_patients[m] = len({(r["fold"], r["patient_id"]) for r in rows if r["modality"] == m})
    order = [DISPLAY[s] for s in SETTING_ORDER]
    units = _units(args)
    source = with_hd_units(rows, units)
    tables = {}
    for metric, (stem, title) in TABLE_METRICS.items():
        if metric != "dice":
            title = title.replace("(mm)", f"({units})")
        records = median_records(source, metric) if getattr(args, "aggregate", "mean") == "median" else source
        table_rows, columns = class_table(
            records, metrics=(metric,), row_key="setting", column_keys=("modality", "class_name"), run_key="run",
            digits=2, show_sd=args.runs > 1, class_average=True, row_order=order,
        )
        text = markdown_table(table_rows, columns, title=f"Paper 2: {title}") + _table_note(
            metric, n_patients, args, folds)
        atomic_write_text(out / f"{stem}.md", text)
        write_table(table_rows, columns, None, out / f"{stem}.csv")
        tables[metric] = text
    return tables


def with_hd_units(rows: list[dict], units: str) -> list[dict]:
    """``rows`` with ``hd``/``hd95`` in ``units``: as recorded (mm) or replaced by ``hd_vox``/``hd95_vox``."""
    if units == "mm":
        return rows
    if units != "voxels":
        raise ConfigError(f"hd units must be mm or voxels, got {units!r}")
    return [{**r, **{metric: r[field] for metric, field in VOXEL_FIELDS.items()}} for r in rows]


def median_records(rows: list[dict], metric: str,
                   keys: Sequence[str] = ("setting", "modality", "class_name", "run")) -> list[dict]:
    """One record per ``keys`` group holding the median of its finite ``metric`` values, plus its non-finite
    records unchanged, so that :func:`modalseg.evaluation.tables.class_table`'s per-run mean of one value is
    the median over patients and its ``Excluded`` column still counts the non-finite ones (median of an even
    count: mean of the two middle values, numpy's)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out: list[dict] = []
    for key, recs in groups.items():
        values = [float(r[metric]) for r in recs if r.get(metric) is not None and math.isfinite(float(r[metric]))]
        if values:
            out.append({**dict(zip(keys, key, strict=True)), metric: float(np.median(values)), "status": "ok"})
        out += [r for r in recs if r.get(metric) is None or not math.isfinite(float(r[metric]))]
    return out


def _patient_mean_dice(rows: list[dict], setting: str, modality: str) -> dict[str, float]:
    """Per-patient mean foreground Dice (mean over classes, then over runs) of one setting and modality."""
    per: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if r["setting_key"] == setting and r["modality"] == modality:
            per.setdefault((r["patient_id"], r["run"]), []).append(float(r["dice"]))
    by_patient: dict[str, list[float]] = {}
    for (patient, _run), values in per.items():
        by_patient.setdefault(patient, []).append(float(np.mean(values)))
    return {p: float(np.mean(v)) for p, v in by_patient.items()}


def _wilcoxon(rows: list[dict], settings: list[str], modalities: list[str], pair: tuple[str, str],
              out: Path) -> list[dict]:
    """Paper 2's patient-level Wilcoxon signed-rank test (reported p = 0.010 LGE, 0.048 bSSFP for CSA vs UMMKD)."""
    from modalseg.errors import EvaluationError
    from modalseg.evaluation.stats import wilcoxon_test
    from modalseg.evaluation.tables import markdown_table, write_table
    from modalseg.utils.atomic import atomic_write_text

    a, b = pair
    results = []
    for modality in modalities:
        row: dict[str, Any] = {"modality": modality, "a": DISPLAY[a], "b": DISPLAY[b], "n": 0,
                               "mean_dice_a": math.nan, "mean_dice_b": math.nan, "median_diff": math.nan,
                               "statistic": math.nan, "p_two_sided": math.nan, "p_a_greater": math.nan,
                               "note": ""}
        missing = [s for s in (a, b) if s not in settings]
        if missing:
            row["note"] = f"n/a: setting(s) {', '.join(DISPLAY[s] for s in missing)} not run"
            results.append(row)
            continue
        da, db = _patient_mean_dice(rows, a, modality), _patient_mean_dice(rows, b, modality)
        patients = sorted(set(da) & set(db))
        x = [da[p] for p in patients]
        y = [db[p] for p in patients]
        row["mean_dice_a"] = float(np.mean(x)) if x else math.nan
        row["mean_dice_b"] = float(np.mean(y)) if y else math.nan
        try:
            two = wilcoxon_test(x, y)
            one = wilcoxon_test(x, y, alternative="greater")
        except EvaluationError as exc:
            row["note"] = f"n/a: {exc}"
            results.append(row)
            continue
        row.update(n=two["n"], median_diff=two["median_diff"], statistic=two["statistic"],
                   p_two_sided=two["p_value"], p_a_greater=one["p_value"])
        notes = []
        if two["n_dropped"]:
            notes.append(f"{two['n_dropped']} pair(s) dropped (NaN)")
        if two["n"] < 6:
            notes.append(f"n={two['n']}: the smallest attainable two-sided p is {2 / 2 ** two['n']:.3g}")
        row["note"] = "; ".join(notes)
        results.append(row)
    columns = ["modality", "a", "b", "n", "mean_dice_a", "mean_dice_b", "median_diff", "statistic",
               "p_two_sided", "p_a_greater", "note"]
    note = (
        f"\nNote: Wilcoxon signed-rank test (scipy), paired by validation patient: each patient's mean "
        f"foreground Dice (mean over classes of the 3D Dice, averaged over runs) under {DISPLAY[a]} (a) vs "
        f"{DISPLAY[b]} (b). p_two_sided is the two-sided p-value; p_a_greater tests whether a > b. Paper 2 "
        "reports p = 0.010 (LGE) and 0.048 (bSSFP) for CSA vs UMMKD on MS-CMRSeg.\n"
    )
    atomic_write_text(out / "wilcoxon.md", markdown_table(results, columns, title="Paper 2: Wilcoxon test")
                      + note)
    write_table(results, columns, None, out / "wilcoxon.csv")
    return results


def _figure(records: dict[str, dict], out: Path, slices_per_modality: int) -> Path | None:
    """Fig. 6: per modality the chosen validation slice(s), columns GT and each setting in the paper's order."""
    from modalseg.evaluation.figures import plot_mask_grid

    settings = [s for s in SETTING_ORDER if s in records]
    if not settings:
        return None
    first = records[settings[0]]
    loaded = {s: np.load(Path(records[s]["_path"]).with_name(Path(records[s]["_path"]).stem + "_fig.npz"))
              for s in settings}
    images, gts, labels = [], [], []
    preds: dict[str, list[np.ndarray]] = {DISPLAY[s]: [] for s in settings}
    for item in first["figure"]:
        if item["rank"] >= slices_per_modality:
            continue
        ident = (item["modality"], item["case_id"], item["z"])
        keys = {}
        for s in settings:
            match = [f["key"] for f in records[s]["figure"] if (f["modality"], f["case_id"], f["z"]) == ident]
            if match:
                keys[s] = match[0]
        if len(keys) != len(settings):
            continue
        images.append(loaded[settings[0]][f"{item['key']}_image"])
        gts.append(loaded[settings[0]][f"{item['key']}_gt"])
        labels.append(f"{item['modality']} {item['patient_id']} z{item['z']}")
        for s in settings:
            preds[DISPLAY[s]].append(loaded[s][f"{keys[s]}_pred"])
    if not gts:
        return None
    return plot_mask_grid(images, gts, preds, out / "figures" / "fig6_masks.png", first["class_names"],
                          row_labels=labels)


# ---------------------------------------------------------------------------------------------- entry point
def run(args: argparse.Namespace) -> int:
    """Train/evaluate every requested setting, run and fold (reusing records), then write tables and figure."""
    from modalseg.data.layouts import load_dataset
    from modalseg.evaluation.tables import write_table

    out = Path(args.output)
    spec = load_dataset(args.data)
    if spec.paired:
        raise ConfigError("paper 2 compares unpaired settings; this dataset is paired (use `experiment paper1`)",
                          args.data)
    if getattr(args, "dims", 2) == 3 and args.backbone != "unet":
        raise ConfigError("--dims 3 needs --backbone unet: the dilated FCN's x8 pixel shuffle needs 512 channels per "
                          "class in 3D (docs/3d.md)")
    if args.dropout is not None and (args.backbone != "dilated_fcn" or not 0.0 <= args.dropout < 1.0):
        raise ConfigError(f"--dropout is a drop probability in [0, 1) of the dilated_fcn backbone (got "
                          f"{args.dropout} with --backbone {args.backbone})")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise ConfigError(f"--lr must be a positive number (got {args.lr})")
    folds = list(range(args.folds)) if args.only_folds is None else list(args.only_folds)
    bad = [f for f in folds if f >= args.folds]
    if bad:
        raise ConfigError(f"--only-folds {bad} out of range for --folds {args.folds} (0..{args.folds - 1})")
    out.mkdir(parents=True, exist_ok=True)
    experiment = Paper2(args, spec, _shared_splits(out, spec, args.folds, args.seed), folds)
    settings = list(args.settings)
    t_start = time.perf_counter()
    runner = Runner(experiment, out / "splits.json", experiment.splits, overwrite=args.overwrite)
    all_rows: list[dict] = []
    fig_records: dict[str, dict] = {}
    timings: list[dict] = []
    for outcome in runner.run(experiment.keys()):
        record, key = outcome.record, outcome.job.key
        all_rows += record["per_patient"]
        timings.append({"setting": DISPLAY[key["setting"]], "run": key["run"], "fold": key["fold"],
                        "train_seconds": record["train_seconds"], "steps": record["steps"],
                        "precision": record.get("precision")})
        if key["run"] == 0 and key["fold"] == folds[0]:
            fig_records[key["setting"]] = {**record, "_path": str(outcome.job.record)}
    if not all_rows:
        raise DataError("no validation patients were evaluated (empty folds?)", out / "splits.json")
    metric_cols = ["setting", "run", "fold", "modality", "patient_id", "class_name", "status", "dice", "hd",
                   "hd95", "hd_vox", "hd95_vox", "sensitivity", "rad", "n_gt", "n_pred"]
    write_table(all_rows, metric_cols, None, out / "records.csv")
    tables = _write_class_tables(all_rows, out, args, folds)
    modalities = list(dict.fromkeys(r["modality"] for r in all_rows))
    wil = _wilcoxon(all_rows, settings, modalities, args.compare, out)
    fig = _figure(fig_records, out, args.figure_slices)
    write_table(timings, ["setting", "run", "fold", "train_seconds", "steps", "precision"], None,
                out / "timings.csv")
    print()
    print(tables["dice"])
    for w in wil:
        p = "n/a" if math.isnan(w["p_two_sided"]) else f"{w['p_two_sided']:.4g}"
        print(f"Wilcoxon {w['a']} vs {w['b']} on {w['modality']}: n={w['n']}, p={p} {w['note']}".rstrip())
    print(f"tables -> {out}/table_dice.md, table_hd.md, table_hd95.md; wilcoxon -> {out}/wilcoxon.md")
    if fig is not None:
        print(f"figure -> {fig}")
    print(f"done in {time.perf_counter() - t_start:.0f} s")
    return 0


__all__ = ["DISPLAY", "HELP", "SETTING_ORDER", "add_arguments", "median_records", "run", "stratified_splits",
           "voxel_distances", "with_hd_units"]
