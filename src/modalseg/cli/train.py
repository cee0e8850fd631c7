"""``modalseg train``: train one fold, all folds, or repeated runs, from a YAML/TOML config."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

HELP = "train a model (paired fusion or unpaired) from a config file; resumable"


def add_arguments(p: argparse.ArgumentParser) -> None:
    # No argparse `type=`: its errors print usage on a second line; values are checked in `run` (one line).
    p.add_argument("--config", help="YAML, TOML or JSON file of training options (see --help-config)")
    p.add_argument("--data", help="dataset folder (overrides the config)")
    p.add_argument("--output", help="output folder (overrides the config)")
    p.add_argument("--model", help="model name (paired) or backbone (unpaired)")
    p.add_argument("--setting", help="unpaired: single | joint | msbn | ummkd | affinity | csa")
    p.add_argument("--fold", default=None,
                   help="fold to train: 0-based integer, 'cv' (every fold) or 'all' (one model on every case, "
                        "no validation, as nnU-Net's -f all)")
    p.add_argument("--json", action="store_true", help="print the results as JSON (for scripts) instead of a summary")
    p.add_argument("--seed", default=None, help="seed (weights, dropout, batch order)")
    p.add_argument("--runs", default="1", help="repeated runs (>= 1) with seeds seed, seed+1, ... (output/run_R)")
    p.add_argument("--epochs", default=None, help="number of epochs (>= 1)")
    p.add_argument("--resume", action="store_true", help="continue from <output>/fold_K/latest.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous training in the output folder (default: refuse)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any option, VALUE parsed as YAML, e.g. --set 'model_options={base_width: 8}' "
                        "(YAML needs the space after the colon)")
    p.add_argument("--help-config", action="store_true", help="list every option with its type, default and meaning")


def _cli_value(name: str, text: object, label: str, parse: bool = True) -> object:
    """A command-line value of option ``name``, YAML-parsed if ``parse`` and a string, then checked."""
    from modalseg.errors import ConfigError
    from modalseg.training.config import check_option, parse_yaml

    value = text
    if parse and isinstance(text, str):
        try:
            value = parse_yaml(text)
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"{label}: cannot parse value {text!r} ({first})") from None
    return check_option(name, value, label=label)


def collect_overrides(args: argparse.Namespace) -> dict:
    """Options given on the command line, each checked by its declared type/range (errors name the flag)."""
    from modalseg.errors import ConfigError
    from modalseg.training.config import TrainConfig, option_kind

    known = TrainConfig.__dataclass_fields__
    overrides: dict = {}
    for key in ("data", "output", "model", "setting", "seed", "epochs"):
        value = getattr(args, key, None)
        if value is not None:
            # --data/--output/--model/--setting are taken verbatim; --seed/--epochs read like --set values
            overrides[key] = _cli_value(key, value, f"--{key}", parse=option_kind(key) not in ("str", "path"))
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in known:
            raise ConfigError(f"--set: unknown option {key!r}; see `modalseg train --help-config`")
        overrides[key] = _cli_value(key, value, f"--set {key}")
    return overrides


def _parse_fold(text: object, folds: int) -> list[int | str]:
    """``--fold K`` (0 <= K < folds), ``--fold cv`` (every fold) or ``--fold all`` (nnU-Net's meaning: one model
    trained on every case, no validation). Until this release ``all`` meant ``cv``; the rename follows nnU-Net."""
    from modalseg.errors import ConfigError

    if isinstance(text, str) and text.strip() == "cv":
        return list(range(folds))
    if isinstance(text, str) and text.strip() == "all":
        return ["all"]
    problem = ConfigError(f"--fold: expected an integer in 0..{folds - 1}, 'cv' (every fold) or 'all' (one model "
                          f"on all cases), got {text!r}")
    try:
        fold = _cli_value("fold", text, "--fold")
    except ConfigError:
        raise problem from None
    if fold >= folds:
        raise problem
    return [fold]


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from modalseg.errors import ConfigError
    from modalseg.training.config import TrainConfig, cli_int, describe_options, load_config

    if args.help_config:
        print(describe_options())
        return 0
    runs = cli_int("--runs", args.runs, minimum=1)
    overrides = collect_overrides(args)
    cfg = load_config(args.config, overrides) if args.config else TrainConfig.from_dict(overrides, "command line")
    if not cfg.data:
        raise ConfigError("no dataset given: set `data` in the config or pass --data")
    folds = [cfg.fold] if args.fold in (None, "") else _parse_fold(args.fold, cfg.folds)
    dataclasses.replace(cfg, seed=cfg.seed + runs - 1).validate("--runs")  # the last seed train_many will use
    from modalseg.utils.atomic import check_output_folder

    check_output_folder(cfg.output)  # before any cache is built or any checkpoint is due
    if cfg.cache_dir:
        check_output_folder(cfg.cache_dir)
    results = train_many(cfg, folds=folds, runs=runs, resume=args.resume, overwrite=args.overwrite,
                         console=not args.json)
    if os.environ.get("RANK", "0") == "0":  # torchrun: only the main process reports
        print(json.dumps(results, indent=2) if args.json else summary_text(results))
    return 0


def summary_text(results: list[dict]) -> str:
    """What a person reads at the end: per fold, where the best checkpoint is, its epoch and score, wall time."""
    lines = ["", "training finished:"]
    for r in results:
        where = Path(r["run_dir"])
        best = r.get("best_epoch")
        score = r.get("best_val_dice")
        scope = r.get("val_scope", "validation")
        if best is not None and score is not None and score == score:
            chosen = f"best.pt = epoch {best}, {scope} Dice {score:.4f}"
        else:
            chosen = "no best.pt (no usable validation): use latest.pt"
        lines.append(f"  run {r['run']} fold {r['fold']}: {where} - {chosen}; {r['epochs']} epochs, "
                     f"{r['steps']} steps in {r.get('wall_s', float('nan')):.0f} s")
        for row in r.get("validation") or []:
            lines.append(f"      {row['class_name']}: per-patient Dice {row['dice_mean']:.4f}, "
                         f"HD95 {row['hd95_mean']:.2f} mm")
    return "\n".join(lines)


def train_many(
    cfg, *, folds: list[int | str], runs: int = 1, resume: bool = False, overwrite: bool = False,
    console: bool = True,
) -> list[dict]:
    """Train ``runs`` x ``folds`` (seed + r for run r) and evaluate each on its validation patients.

    ``resume``: folds with a ``latest.pt`` continue from it; folds that never started (no files at all) start
    and say so; with no checkpoint in any fold it is an error (a typo in ``--output`` must not retrain from
    scratch). Without ``resume`` a fold holding a previous training is refused unless ``overwrite``.
    """
    import dataclasses

    from modalseg.errors import ConfigError
    from modalseg.training.engine import Trainer, previous_outputs
    from modalseg.training.evaluate import evaluate_trainer
    from modalseg.utils.atomic import check_output_folder

    plan = []
    for r in range(runs):
        out = Path(cfg.output) / f"run_{r}" if runs > 1 else Path(cfg.output)
        for k in folds:
            check_output_folder(out / f"fold_{k}")  # e.g. a stray file named fold_K
            plan.append((r, k, out, previous_outputs(out / f"fold_{k}")))
    if resume and not any("latest.pt" in found for *_, found in plan):
        where = plan[0][2] / f"fold_{plan[0][1]}" if len(plan) == 1 else Path(cfg.output)
        raise ConfigError("nothing to resume: no latest.pt found (start without --resume)", where)
    results = []
    for r, k, out, found in plan:
        run_cfg = dataclasses.replace(cfg, fold=0 if k == "all" else k, train_all=k == "all", seed=cfg.seed + r,
                                      output=str(out))
        run_cfg.validate()
        fold_resume = resume and "latest.pt" in found
        if resume and not found and console and os.environ.get("RANK", "0") == "0":
            print(f"{out / f'fold_{k}'}: no checkpoint to resume, starting this fold", flush=True)
        trainer = Trainer(run_cfg, resume=fold_resume, overwrite=overwrite and not fold_resume, console=console)
        summary = trainer.fit()
        if trainer.dist.is_main:
            summary.update(evaluate_trainer(trainer))
        results.append({"run": r, "fold": k, **summary})
    return results
