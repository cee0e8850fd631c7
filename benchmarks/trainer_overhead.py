"""Training throughput of ``Trainer.fit`` in two source trees, interleaved in one run: did a refactoring cost speed?

Each trial trains the same fold of the same built-in paired dataset for ``--steps`` steps in a fresh process
whose ``PYTHONPATH`` is one tree's ``src`` (e.g. a ``git worktree`` of the commit before a redesign and the
current checkout), and reads the steps-only throughput (``img_per_s`` of log.csv: validation excluded). Trials
alternate between the trees (A B A B ...) so that drifting machine load hits both alike; medians and the ratio
are printed with the machine header.

    git worktree add /tmp/before 557b8f0
    .venv/bin/python benchmarks/trainer_overhead.py --trees before=/tmp/before,after=. --trials 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine_info, print_machine

TRIAL = r"""
import sys, json, csv
from pathlib import Path
from modalseg.training.config import TrainConfig
from modalseg.training.engine import Trainer
data, out, model, size, width, steps, batch = sys.argv[1:8]
cfg = TrainConfig(data=data, output=out, model=model, model_options={"base_width": int(width)},
                  preprocess_options={"target_size": [int(size), int(size)]}, epochs=1, max_steps=int(steps),
                  batch_size=int(batch), folds=5, fold=0, seed=0, precision="fp32", progress=False,
                  tensorboard=False, num_threads=int(sys.argv[8]))
Trainer(cfg, console=False).fit()
rows = list(csv.DictReader(open(Path(out) / "fold_0" / "log.csv")))
print(json.dumps({"img_per_s": float(rows[-1]["img_per_s"])}))
"""


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trees", required=True, help="name=path,name=path: source trees (each has src/modalseg)")
    p.add_argument("--model", default="master_assistant")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    trees = dict(item.split("=", 1) for item in args.trees.split(","))
    info = machine_info()
    print_machine(info)
    from modalseg.data.synth import make_breast_dataset

    results: dict[str, list[float]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "breast"
        make_breast_dataset(data, num_patients=10, slices=8, size=args.size, seed=0)
        for trial in range(args.trials):
            for name, tree in trees.items():
                out = Path(tmp) / f"{name}_{trial}"
                env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve() / "src"),
                       "MODALSEG_CACHE_DIR": str(Path(tmp) / "cache")}
                cmd = [sys.executable, "-c", TRIAL, str(data), str(out), args.model, str(args.size),
                       str(args.width), str(args.steps), str(args.batch), str(args.threads)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if done.returncode:
                    raise SystemExit(f"{name} trial {trial} failed:\n{done.stderr[-2000:]}")
                value = json.loads(done.stdout.strip().splitlines()[-1])["img_per_s"]
                results[name].append(value)
                print(f"trial {trial} {name}: {value:.2f} img/s", flush=True)
    medians = {name: statistics.median(v) for name, v in results.items()}
    first = next(iter(medians))
    print(f"\n{args.model} width {args.width}, {args.size}x{args.size}, batch {args.batch}, {args.steps} steps, "
          f"{args.threads} threads, median of {args.trials} interleaved trials:")
    for name, value in medians.items():
        print(f"  {name:>10}: {value:7.2f} img/s  ({value / medians[first]:.3f}x {first})")
    payload = {"machine": info, "args": vars(args), "img_per_s": results, "median": medians}
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return payload


if __name__ == "__main__":
    main()
