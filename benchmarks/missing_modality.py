"""What does modality dropout buy when T2W is missing? master_assistant trained with and without modality dropout
and a T1C-only U-Net, on the built-in paired breast data, scored on held-out patients with T2W present and
removed (issue 16, item 6).

Three models per seed, each trained by ``modalseg train`` on fold 0 (the same patients for every model and
seed, ``split_seed`` 0) and scored with its final weights (``latest.pt``) by the robustness table of ``modalseg
evaluate --checkpoint ... --robustness`` (training/robustness.py; per-patient volume Dice and HD95 in mm on the
validation patients, a removed modality fed as zeros after normalisation, as ``predict --missing`` does):

1. ``master_assistant`` with ``modality_dropout`` (T2W dropped with probability ``--dropout``; the master T1C is
   always kept);
2. plain ``master_assistant`` (no dropout): "without T2W" means fed zeros for T2W, a modality it always had;
3. ``unet`` on T1C only (``modalities: [T1C]``): what a model that never used T2W does.

Dice and HD95 are means over the validation patients for each seed, then mean ± s.d. over seeds. An empty
prediction has an infinite HD95: it is left out of the HD95 mean and counted (``inf`` column).

    .venv/bin/python benchmarks/missing_modality.py --threads 1        # about 20 min on one Xeon core
    .venv/bin/python benchmarks/missing_modality.py --quick            # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modalseg.cli.main import main as modalseg

#: model key -> its row label
MODELS: dict[str, str] = {
    "dropout": "(1) master_assistant + modality dropout",
    "plain": "(2) master_assistant, no dropout",
    "unet": "(3) U-Net, T1C only",
}


def call(*cmd: str) -> None:
    if modalseg(list(cmd)) != 0:
        raise SystemExit(f"failed: modalseg {' '.join(cmd)}")


def mean_sd(values: Sequence[float], digits: int = 1) -> str:
    """``"61.2 ± 3.4"`` over the finite values (``n/a`` for none; no ± part for one)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "n/a"
    if len(finite) == 1:
        return f"{finite[0]:.{digits}f}"
    return f"{statistics.mean(finite):.{digits}f} ± {statistics.stdev(finite):.{digits}f}"


def train(data: Path, out: Path, *, model: str, width: int, epochs: int, seed: int, threads: int, lr: float,
          size: int, folds: int, extra: Sequence[str] = (), quiet: bool = True) -> Path:
    """``modalseg train`` of fold 0 with the stated budget; returns the fold folder."""
    args = ["train", "--data", str(data), "--output", str(out), "--model", model, "--fold", "0",
            "--epochs", str(epochs),
            "--set", f"model_options={{base_width: {width}}}", "--set", f"folds={folds}",
            "--set", f"preprocess_options={{target_size: [{size}, {size}]}}", "--set", f"lr={lr}",
            "--set", "precision=fp32", "--set", "progress=false", "--set", "tensorboard=false",
            "--set", f"num_threads={threads}", "--set", f"seed={seed}", "--set", f"val_every={epochs}", *extra]
    if quiet:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            call(*args)
    else:
        call(*args)
    return out / "fold_0"


def score(fold_dir: Path, data: Path, remove: Sequence[str]) -> dict[str, dict[str, Any]]:
    """removed subset -> {dice, hd95, inf, n} of the fold's final weights (robustness table, fp32)."""
    import contextlib
    import io

    import torch

    from modalseg.training.precision import resolve_precision
    from modalseg.training.robustness import evaluate_robustness

    with contextlib.redirect_stdout(io.StringIO()):
        result = evaluate_robustness(fold_dir, data, which="latest", subsets=list(remove),
                                     precision=resolve_precision(torch.device("cpu"), "fp32"), log=None)
    cls = result.class_names[0]
    return {r["removed"]: {"dice": 100 * r["dice_mean"], "hd95": r[f"hd95_{cls}"], "inf": r[f"hd95_inf_{cls}"],
                           "n": r["n_cases"], "trained": r["trained"]} for r in result.rows}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def add_budget_arguments(p: argparse.ArgumentParser, *, epochs: int, epochs_help: str | None = None) -> None:
    """The training budget options this script and augmentation_effect.py share (same meanings, same defaults)."""
    p.add_argument("--slices", type=int, default=6)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=epochs, help=epochs_help)
    p.add_argument("--width", type=int, default=16, help="master_assistant base_width (published: 32)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny data, widths and budget")
    p.add_argument("--json")


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=24)
    p.add_argument("--folds", type=int, default=3, help="fold 0 of this many is trained (default 3: 8 of 24 "
                                                          "patients held out)")
    p.add_argument("--unet-width", type=int, default=32,
                   help="U-Net base_width (published: 64; the paper's 2:1 ratio to master_assistant)")
    p.add_argument("--dropout", type=float, default=0.5, help="modality dropout of T2W for model (1)")
    add_budget_arguments(p, epochs=15)
    args = p.parse_args(argv)
    if args.quick:
        args.patients, args.slices, args.size, args.folds, args.epochs = 6, 2, 32, 2, 1
        args.width, args.unet_width, args.seeds = 4, 4, "0"
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    import torch

    torch.set_num_threads(args.threads)
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/missing_modality.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    budget = (f"{args.patients} synthetic breast patients x {args.slices} slices at {args.size}x{args.size} "
              f"(modalseg synth breast, seed {args.data_seed}); fold 0 of {args.folds} "
              f"(validation = {args.patients // args.folds}-{-(-args.patients // args.folds)} held-out patients); "
              f"{args.epochs} epochs, batch 4, Adam lr {args.lr:g}, default preset (medium augmentation), fp32, "
              f"{args.threads} thread(s); master_assistant base_width {args.width}, U-Net base_width "
              f"{args.unet_width}; modality dropout of T2W p = {args.dropout:g} (master kept); final weights "
              f"(latest.pt); seeds {', '.join(map(str, seeds))}")
    print(f"budget: {budget}", flush=True)
    started = time.perf_counter()
    results: dict[str, list[dict[str, dict[str, Any]]]] = {k: [] for k in MODELS}
    with tempfile.TemporaryDirectory(prefix="missing-modality-") as tmp:
        root = Path(tmp)
        data = root / "breast"
        call("synth", "breast", "--output", str(data), "--patients", str(args.patients), "--slices",
             str(args.slices), "--size", str(args.size), "--seed", str(args.data_seed))
        common = dict(epochs=args.epochs, threads=args.threads, lr=args.lr, size=args.size, folds=args.folds)
        for seed in seeds:
            plans = {
                "dropout": ("master_assistant", args.width, ["--set", f"modality_dropout={{T2W: {args.dropout}}}"],
                            ["none", "T1C", "T2W"]),
                "plain": ("master_assistant", args.width, [], ["none", "T1C", "T2W"]),
                "unet": ("unet", args.unet_width, ["--set", "modalities=[T1C]"], ["none"]),
            }
            for key, (model, width, extra, remove) in plans.items():
                t0 = time.perf_counter()
                fold = train(data, root / f"{key}_s{seed}", model=model, width=width, seed=seed, extra=extra,
                             **common)
                scores = score(fold, data, remove)
                results[key].append(scores)
                shown = "; ".join(f"{k} removed: Dice {v['dice']:.1f}, HD95 {v['hd95']:.2f} mm ({v['inf']} inf)"
                                  for k, v in scores.items())
                print(f"seed {seed} {key}: {shown} ({time.perf_counter() - t0:.0f} s)", flush=True)
    elapsed = time.perf_counter() - started

    def column(key: str, removed: str, metric: str) -> list[float]:
        return [s[removed][metric] for s in results[key]]

    def cell(key: str, removed: str) -> tuple[str, str]:
        dice = mean_sd(column(key, removed, "dice"))
        hd = mean_sd(column(key, removed, "hd95"), 2)
        inf = sum(column(key, removed, "inf"))
        n = sum(column(key, removed, "n"))
        return dice, hd + (f" ({inf}/{n} inf)" if inf else "")

    header = ("| model | Dice, all modalities (%) | HD95, all modalities (mm) | Dice, T2W missing (%) | "
              "HD95, T2W missing (mm) |")
    lines = [header, "|---|---|---|---|---|"]
    for key, label in MODELS.items():
        if key == "unet":  # it reads T1C only: its figure is the T2W-missing one
            lines.append(f"| {label} | – | – | {' | '.join(cell(key, 'none'))} |")
        else:
            lines.append(f"| {label} | {' | '.join(cell(key, 'none'))} | {' | '.join(cell(key, 'T2W'))} |")
    extra_lines = ["", "Master removed (T2W only; neither model was trained without T1C):", "",
                   "| model | Dice, T1C missing (%) | HD95, T1C missing (mm) |", "|---|---|---|"]
    for key in ("dropout", "plain"):
        extra_lines.append(f"| {MODELS[key]} | {' | '.join(cell(key, 'T1C'))} |")
    n_val = results["plain"][0]["none"]["n"] if results["plain"] else 0
    table = "\n".join(lines + extra_lines)
    print()
    print(f"Dice / HD95 per validation patient ({n_val} patients), mean over patients per seed, mean ± s.d. over "
          f"{len(seeds)} seed(s); {machine()}; {elapsed / 60:.1f} min")
    print()
    print(table)
    print()
    print(f"command: {command}")
    out = {"budget": budget, "command": command, "table": table, "results": results, "elapsed_s": elapsed,
           "machine": machine(), "val_patients": n_val}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    run()
