"""``modalseg evaluate``: compare a folder of predicted label volumes with a folder of reference labels, or
(``--checkpoint ... --robustness``) a trained paired model on its fold's validation cases with modalities removed.

The cases scored are those in ``--pred`` (the labels folder may hold more, e.g. all of labelsTr); see
:mod:`modalseg.training.evaluate_folder` for the nnU-Net conventions (summary.json, ``--empty-dice nan``,
region labels, the ignore label). The robustness table is :mod:`modalseg.training.robustness`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

HELP = ("evaluate predicted label volumes against reference labels (Dice, sensitivity, RAD, HD, HD95 in mm), or a "
        "paired model on its validation cases with each modality subset removed (--checkpoint ... --robustness)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", help="folder of predictions (CASE.nii.gz); these cases are scored")
    p.add_argument("--labels",
                   help="folder of reference labels (CASE.nii.gz), e.g. labelsTr; cases without a prediction are "
                        "listed and skipped")
    p.add_argument("--dataset", "--data", dest="dataset",
                   help="dataset folder whose dataset.json / modalseg.json declares the labels (nnU-Net region "
                        "labels and the ignore label are honoured); with --checkpoint: the dataset whose "
                        "validation cases are predicted (default: the one the checkpoint records)")
    p.add_argument("--output", required=True,
                   help="folder for metrics.csv/.md, summary.csv/.md and summary.json (with --robustness: "
                        "robustness.csv/.md and robustness_cases.csv)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="instead of --pred/--labels: a paired model (checkpoint file, fold folder, or run folder = "
                        "every fold) evaluated on its fold's validation cases (<run>/splits.json); needs "
                        "--robustness")
    p.add_argument("--robustness", action="store_true",
                   help="with --checkpoint: predict every validation case with each non-empty proper subset of "
                        "the model's modalities removed (and none removed), each removed one fed as zeros after "
                        "normalisation as predict --missing does; models trained without modality dropout are "
                        "evaluated too (column 'trained' = no), unlike predict --missing, which refuses them")
    p.add_argument("--remove", nargs="+", metavar="SUBSET",
                   help="with --robustness: only these rows, e.g. --remove none T2W (several modalities: T2W+DWI); "
                        "default: every subset")
    p.add_argument("--weights", default="best", choices=("best", "latest"),
                   help="with --checkpoint and a fold or run folder: best.pt (latest.pt where a fold has none) or "
                        "latest.pt, as predict --checkpoint")
    p.add_argument("--device", default="auto", help="with --checkpoint: auto | cpu | cuda")
    p.add_argument("--precision", default="auto", help="with --checkpoint: auto | bf16 | fp16 | fp32")
    p.add_argument("--batch-size", default=8, help="with --checkpoint: slices per forward pass (default 8)")
    p.add_argument("--hd95", default="monai", choices=["monai", "pooled"], help="HD95 convention")
    p.add_argument("--empty-dice", default="one", choices=["one", "nan"],
                   help="Dice of a class absent from both prediction and reference: 1 (ours, default) or NaN and "
                        "left out of the means (nnU-Net's)")


def _mean_sd(mean: float, sd: float | None, digits: int) -> str:
    """``"0.8123 ± 0.0100"``; no ± part when the s.d. is None or NaN (one case), ``"n/a"`` for a NaN mean."""
    if mean is None or math.isnan(mean):
        return "n/a"
    text = "inf" if math.isinf(mean) else f"{mean:.{digits}f}"
    if sd is not None and math.isfinite(sd):
        text += f" ± {sd:.{digits}f}"
    return text


def run(args: argparse.Namespace) -> int:
    from modalseg.errors import ConfigError
    from modalseg.training.evaluate_folder import evaluate_folders
    from modalseg.utils.atomic import check_output_folder

    if args.checkpoint is not None or args.robustness:
        if args.pred is not None or args.labels is not None:
            raise ConfigError("--checkpoint/--robustness predicts the validation cases itself: give either "
                              "--pred and --labels, or --checkpoint with --robustness")
        if args.checkpoint is None or not args.robustness:
            raise ConfigError("--checkpoint evaluates a model with modalities removed: give --checkpoint PATH "
                              "and --robustness together (or --pred and --labels to score prediction files)")
        return run_robustness(args)
    if args.remove is not None:
        raise ConfigError("--remove applies to --robustness")
    if args.pred is None or args.labels is None:
        raise ConfigError("give --pred and --labels (prediction and reference label folders), or --checkpoint "
                          "with --robustness")
    check_output_folder(args.output)  # before any volume is read

    summary = evaluate_folders(Path(args.pred), Path(args.labels), Path(args.output),
                               dataset=Path(args.dataset) if args.dataset else None, hd95_convention=args.hd95,
                               empty_dice=args.empty_dice)
    for row in summary:
        notes = [f"n={row['n_cases']}"]
        if row["dice_excluded"]:
            notes.append(f"Dice excluded: {row['dice_excluded']}")
        if row["hd_excluded"]:
            notes.append(f"HD excluded: {row['hd_excluded']}")
        print(f"{row['class_name']:>12s}: Dice {_mean_sd(row['dice_mean'], row['dice_sd'], 4)}, "
              f"HD {_mean_sd(row['hd_mean'], None, 2)} mm, HD95 {_mean_sd(row['hd95_mean'], None, 2)} mm "
              f"({', '.join(notes)})")
    out = Path(args.output)
    print(f"wrote {out / 'metrics.csv'}, {out / 'summary.md'} and {out / 'summary.json'}")
    return 0


def run_robustness(args: argparse.Namespace) -> int:
    """``--checkpoint PATH --robustness``: the table of :mod:`modalseg.training.robustness`."""
    from modalseg.training.config import check_option, cli_int
    from modalseg.training.precision import resolve_device, resolve_precision
    from modalseg.training.robustness import evaluate_robustness, write_robustness
    from modalseg.utils.atomic import check_output_folder

    check_option("device", args.device, label="--device")
    check_option("precision", args.precision, label="--precision")
    batch_size = cli_int("--batch-size", args.batch_size, minimum=1)
    check_output_folder(args.output)  # before any model is loaded
    device = resolve_device(args.device)
    precision = None if args.precision == "auto" else resolve_precision(device, args.precision)
    result = evaluate_robustness(args.checkpoint, args.dataset, which=args.weights, subsets=args.remove,
                                 precision=precision, device=device, batch_size=batch_size,
                                 hd95_convention=args.hd95, empty_dice=args.empty_dice)
    for row in result.rows:
        per_class = ", ".join(
            f"{c} Dice {100 * row[f'dice_{c}']:.2f} %, HD95 {_mean_sd(row[f'hd95_{c}'], None, 2)} mm"
            + (f" ({row[f'hd95_inf_{c}']} inf)" if row[f"hd95_inf_{c}"] else "") for c in result.class_names)
        trained = "" if row["trained"] == "yes" else ", not trained for it"
        print(f"removed {row['removed']:>12s}: mean Dice {100 * row['dice_mean']:.2f} %; {per_class} "
              f"(n={row['n_cases']}{trained})")
    written = write_robustness(result, args.output)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0
