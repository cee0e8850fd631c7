"""``modalseg experiment {paper1,paper2}``: reproduce a paper's table on a dataset (CV, repeated runs, figures)."""

from __future__ import annotations

import argparse
import importlib

HELP = "reproduce paper 1's Table 1 (paired fusion) or paper 2's tables (unpaired) on a dataset"

EXPERIMENTS = {
    "paper1": "modalseg.experiments.paper1",
    "paper2": "modalseg.experiments.paper2",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One subcommand per paper module; a build without one of them simply lacks that subcommand."""
    sub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    for name, module_name in EXPERIMENTS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # not installed in this build
                continue
            raise
        sp = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sp)
        sp.set_defaults(_experiment=module.run)


def run(args: argparse.Namespace) -> int:
    """Run the chosen paper's experiment (both go through :mod:`modalseg.experiments.runner`)."""
    return int(args._experiment(args) or 0)
