"""``modalseg train``: train one fold, all folds, or repeated runs, from a YAML/TOML config."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

HELP = "train a model (paired fusion or unpaired) from a config file; resumable"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or TOML file of training options (see --help-config)")
    p.add_argument("--data", help="dataset folder (overrides the config)")
    p.add_argument("--output", help="output folder (overrides the config)")
    p.add_argument("--model", help="model name (paired) or backbone (unpaired)")
    p.add_argument("--setting", help="unpaired: single | joint | msbn | ummkd | affinity | csa")
    p.add_argument("--fold", default=None, help="fold to train (0-based) or 'all'")
    p.add_argument("--seed", type=int, default=None, help="seed (weights, dropout, batch order)")
    p.add_argument("--runs", type=int, default=1, help="repeated runs with seeds seed, seed+1, ... (output/run_R)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from <output>/fold_K/latest.pt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any option, VALUE parsed as YAML (e.g. --set model_options={base_width:8})")
    p.add_argument("--help-config", action="store_true", help="list every option with its default and meaning")


def collect_overrides(args: argparse.Namespace) -> dict:
    from modalseg.errors import ConfigError

    overrides: dict = {}
    for key in ("data", "output", "model", "setting", "seed", "epochs"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse value {value!r}") from None
    return overrides


def run(args: argparse.Namespace) -> int:
    from modalseg.errors import ConfigError
    from modalseg.training.config import TrainConfig, describe_options, load_config

    if args.help_config:
        print(describe_options())
        return 0
    overrides = collect_overrides(args)
    cfg = load_config(args.config, overrides) if args.config else TrainConfig.from_dict(overrides, "command line")
    if not cfg.data:
        raise ConfigError("no dataset given: set `data` in the config or pass --data")
    if args.fold in (None, ""):
        folds = [cfg.fold]
    elif args.fold == "all":
        folds = list(range(cfg.folds))
    else:
        try:
            folds = [int(args.fold)]
        except ValueError:
            raise ConfigError(f"--fold must be an integer or 'all' (got {args.fold!r})") from None
    from modalseg.utils.atomic import check_output_folder

    check_output_folder(cfg.output)  # before any cache is built or any checkpoint is due
    if cfg.cache_dir:
        check_output_folder(cfg.cache_dir)
    results = train_many(cfg, folds=folds, runs=args.runs, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # torchrun: only the main process reports
        print(json.dumps(results, indent=2))
    return 0


def train_many(cfg, *, folds: list[int], runs: int = 1, resume: bool = False) -> list[dict]:
    """Train ``runs`` x ``folds`` (seed + r for run r) and evaluate each on its validation patients."""
    import dataclasses

    from modalseg.training.engine import Trainer
    from modalseg.training.evaluate import evaluate_trainer
    from modalseg.utils.atomic import check_output_folder

    results = []
    for r in range(runs):
        out = Path(cfg.output) / f"run_{r}" if runs > 1 else Path(cfg.output)
        for k in folds:
            run_cfg = dataclasses.replace(cfg, fold=k, seed=cfg.seed + r, output=str(out))
            run_cfg.validate()
            check_output_folder(out / f"fold_{k}")  # e.g. a stray file named fold_K
            trainer = Trainer(run_cfg, resume=resume and (out / f"fold_{k}" / "latest.pt").exists())
            summary = trainer.fit()
            if trainer.dist.is_main:
                summary.update(evaluate_trainer(trainer))
            results.append({"run": r, "fold": k, **summary})
    return results
