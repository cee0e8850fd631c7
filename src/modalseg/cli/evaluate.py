"""``modalseg evaluate``: compare a folder of predicted label volumes with a folder of reference labels."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "evaluate predicted label volumes against reference labels (Dice, sensitivity, RAD, HD, HD95 in mm)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, help="folder of predictions (CASE.nii.gz)")
    p.add_argument("--labels", required=True, help="folder of reference labels (CASE.nii.gz), e.g. labelsTr")
    p.add_argument("--dataset", help="dataset folder whose dataset.json / modalseg.json declares the labels")
    p.add_argument("--output", required=True, help="folder for metrics.csv/.md and summary.csv/.md")
    p.add_argument("--hd95", default="monai", choices=["monai", "pooled"], help="HD95 convention")


def run(args: argparse.Namespace) -> int:
    from modalseg.training.evaluate_folder import evaluate_folders
    from modalseg.utils.atomic import check_output_folder

    check_output_folder(args.output)  # before any volume is read

    summary = evaluate_folders(Path(args.pred), Path(args.labels), Path(args.output),
                               dataset=Path(args.dataset) if args.dataset else None, hd95_convention=args.hd95)
    for row in summary:
        print(f"{row['class_name']:>12s}: Dice {row['dice_mean']:.4f} ± {row['dice_sd']:.4f}, "
              f"HD {row['hd_mean']:.2f} mm, HD95 {row['hd95_mean']:.2f} mm (n={row['n_cases']}"
              + (f", excluded: {row['hd_excluded']}" if row['hd_excluded'] else "") + ")")
    print(f"wrote {Path(args.output) / 'metrics.csv'} and {Path(args.output) / 'summary.md'}")
    return 0
