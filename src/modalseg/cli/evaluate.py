"""``modalseg evaluate``: compare a folder of predicted label volumes with a folder of reference labels.

The cases scored are those in ``--pred`` (the labels folder may hold more, e.g. all of labelsTr); see
:mod:`modalseg.training.evaluate_folder` for the nnU-Net conventions (summary.json, ``--empty-dice nan``,
region labels, the ignore label).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

HELP = "evaluate predicted label volumes against reference labels (Dice, sensitivity, RAD, HD, HD95 in mm)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, help="folder of predictions (CASE.nii.gz); these cases are scored")
    p.add_argument("--labels", required=True,
                   help="folder of reference labels (CASE.nii.gz), e.g. labelsTr; cases without a prediction are "
                        "listed and skipped")
    p.add_argument("--dataset", help="dataset folder whose dataset.json / modalseg.json declares the labels "
                                     "(nnU-Net region labels and the ignore label are honoured)")
    p.add_argument("--output", required=True, help="folder for metrics.csv/.md, summary.csv/.md and summary.json")
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
    from modalseg.training.evaluate_folder import evaluate_folders
    from modalseg.utils.atomic import check_output_folder

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
