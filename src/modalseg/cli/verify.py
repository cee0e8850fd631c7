"""``modalseg verify DATASET``: list a dataset and check every file before training on it."""

from __future__ import annotations

import argparse
import sys

from modalseg.data.layouts import LAYOUTS, load_dataset
from modalseg.data.verify import verify_dataset

HELP = "Check a dataset: files present and readable, geometry consistent, label values declared."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="DATASET", help="dataset folder")
    parser.add_argument("--strict-geometry", action="store_true",
                        help="report modalities or labels on another grid as problems (default: warnings, since "
                             "train and predict resample them onto the master image's grid)")
    parser.add_argument(
        "--layout",
        default="auto",
        choices=("auto", *LAYOUTS),
        help="dataset layout (default: auto-detect)",
    )
    parser.add_argument(
        "--split", default="train", choices=("train", "test"), help="which cases to check (default: train)"
    )
    parser.add_argument(
        "--max-anisotropy",
        type=float,
        default=20.0,
        metavar="RATIO",
        help="warn when the largest/smallest voxel spacing exceeds RATIO (default: 20)",
    )


def run(args: argparse.Namespace) -> int:
    spec = load_dataset(args.dataset, args.layout, split=args.split)
    report = verify_dataset(spec, max_anisotropy=args.max_anisotropy, strict=args.strict_geometry)
    print(f"dataset: {spec.name} ({spec.layout} layout, {args.split} split) at {spec.root}")
    for line in report.summary_lines():
        print(line)
    for warning in [*spec.warnings, *report.warnings]:
        print(f"warning: {warning}")
    if report.problems:
        for problem in report.problems:
            print(problem, file=sys.stderr)
        n = len(report.problems)
        if n > 1:  # a single problem is its own summary: stderr stays one line naming the file
            print(f"modalseg verify: {n} problems found", file=sys.stderr)
        return 2
    print("OK")
    return 0
