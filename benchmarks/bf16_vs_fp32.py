"""Accuracy and speed of the default precision: the same training run in fp32 and in bf16 + channels_last.

Trains one model twice on the built-in paired dataset (same seed, same batches) and prints validation Dice
(per patient, foreground) and training throughput for both, side by side, with the ratio.

    .venv/bin/python benchmarks/bf16_vs_fp32.py --model master_assistant --size 128 --epochs 15
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

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
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_breast_dataset(Path(tmp) / "data", num_patients=args.patients, slices=4, size=args.size, seed=0)
        for precision in ("fp32", "bf16"):
            cfg = TrainConfig(
                data=str(data), output=str(Path(tmp) / precision), model=args.model, epochs=args.epochs, lr=args.lr,
                preprocess="paper1", preprocess_options={"target_size": [args.size, args.size]},
                model_options={"base_width": args.width, "sa_reduction": 4}, precision=precision,
                progress=False, tensorboard=False, seed=0,
            )
            trainer = Trainer(cfg)
            t0 = time.perf_counter()
            trainer.fit()
            seconds = time.perf_counter() - t0
            dices = [h["val_dice"] for h in trainer.history if "val_dice" in h]
            results[precision] = {
                "final_val_dice": dices[-1], "best_val_dice": max(dices), "train_s": seconds,
                "img_per_s": sum(h["img_per_s"] for h in trainer.history) / len(trainer.history),
            }
    fp32, bf16 = results["fp32"], results["bf16"]
    print(f"{args.model}, {args.size}x{args.size}, width {args.width}, {args.epochs} epochs, "
          f"{torch.get_num_threads()} threads")
    print(f"{'precision':>10s} {'final Dice':>11s} {'best Dice':>10s} {'img/s':>8s} {'time s':>8s}")
    for name, r in results.items():
        print(f"{name:>10s} {r['final_val_dice']:11.4f} {r['best_val_dice']:10.4f} {r['img_per_s']:8.2f} "
              f"{r['train_s']:8.1f}")
    print(f"bf16/fp32: speed x{bf16['img_per_s'] / fp32['img_per_s']:.2f}, "
          f"final Dice difference {bf16['final_val_dice'] - fp32['final_val_dice']:+.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    run()
