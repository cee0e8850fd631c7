"""Accuracy and speed of the default precision: the same training runs in fp32 and in bf16 + channels_last.

Trains one model per seed twice on the built-in paired dataset (same seed, same batches, fold 0) and prints, per
precision, the validation Dice (per patient, foreground) averaged over the last 5 epochs (single epochs are noisy
with few validation patients) and over seeds, and the training throughput, side by side, with the ratios.

    .venv/bin/python benchmarks/bf16_vs_fp32.py --model master_assistant --size 128 --width 16 --epochs 20 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from modalseg.data.synth import make_breast_dataset
from modalseg.training.config import TrainConfig
from modalseg.training.engine import Trainer


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="master_assistant")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--patients", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seeds", default="0", help="comma-separated seeds (one training per seed and precision)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(x) for x in args.seeds.split(",")]
    runs: dict[str, list[dict]] = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_breast_dataset(Path(tmp) / "data", num_patients=args.patients, slices=4, size=args.size, seed=0)
        for seed in seeds:
            for precision in ("fp32", "bf16"):
                cfg = TrainConfig(
                    data=str(data), output=str(Path(tmp) / f"{precision}_{seed}"), model=args.model,
                    epochs=args.epochs, lr=args.lr, preprocess="paper1",
                    preprocess_options={"target_size": [args.size, args.size]},
                    model_options={"base_width": args.width, "sa_reduction": 4}, precision=precision,
                    progress=False, tensorboard=False, seed=seed,
                )
                trainer = Trainer(cfg)
                t0 = time.perf_counter()
                trainer.fit()
                seconds = time.perf_counter() - t0
                dices = [h["val_dice"] for h in trainer.history if "val_dice" in h]
                runs[precision].append({
                    "seed": seed, "last5_val_dice": float(np.mean(dices[-5:])), "best_val_dice": max(dices),
                    "train_s": seconds, "img_per_s": float(np.median([h["img_per_s"] for h in trainer.history])),
                })
    results = {
        name: {
            "last5_val_dice_mean": float(np.mean([r["last5_val_dice"] for r in rs])),
            "last5_val_dice_sd": float(np.std([r["last5_val_dice"] for r in rs], ddof=1)) if len(rs) > 1 else 0.0,
            "img_per_s": float(np.mean([r["img_per_s"] for r in rs])),
            "train_s": float(np.sum([r["train_s"] for r in rs])),
            "runs": rs,
        }
        for name, rs in runs.items()
    }
    fp32, bf16 = results["fp32"], results["bf16"]
    print(f"{args.model}, {args.size}x{args.size}, width {args.width}, {args.epochs} epochs, seeds {seeds}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'precision':>10s} {'val Dice (last 5 epochs)':>26s} {'img/s':>8s} {'time s':>8s}   per seed")
    for name, r in results.items():
        per_seed = ", ".join(f"{x['last5_val_dice']:.3f}" for x in r["runs"])
        print(f"{name:>10s} {r['last5_val_dice_mean']:16.4f} ± {r['last5_val_dice_sd']:.4f} {r['img_per_s']:8.2f} "
              f"{r['train_s']:8.1f}   {per_seed}")
    print(f"bf16/fp32: speed x{bf16['img_per_s'] / fp32['img_per_s']:.2f}, "
          f"Dice difference {bf16['last5_val_dice_mean'] - fp32['last5_val_dice_mean']:+.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    run()
