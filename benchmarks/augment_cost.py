"""Cost of per-sample augmentation + modality dropout per training batch, against the training step.

The paired task (training/tasks.py) augments every batch in the training loop, synchronously (no DataLoader
workers), so the time it adds is added to every step. Measured here through the task itself:

* ``load``: ``PairedTask.batches`` with the transforms off (patches from the memory-mapped cache, channels,
  ``Precision.to_input``), median ms per batch;
* ``load + augment``: the same with the transforms on (``augmentation`` strength, ``modality_dropout`` of the
  assistant), mean ms per batch (the draws differ per step, so the mean is the cost per step on average);
* ``augment``: the transforms alone (``RandomPipeline.batch``) on the loaded batches, mean / 95th percentile;
* ``step``: one training step of master_assistant (published width; ``common.make_train_case``: the trainer's
  ``TrainStep``), median s.

Setup (not timed): a synthetic breast dataset cached with the ``default`` preset at ``--size``. The issue's target
is augmentation <= 1 % of a step on 2 cores::

    .venv/bin/python benchmarks/augment_cost.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import common  # noqa: E402

TARGET = 0.01

COLUMNS = [
    ("strength", "augmentation", 0),
    ("load_ms", "load (ms/batch)", 2),
    ("load_aug_ms", "load+augment (ms/batch)", 2),
    ("augment_ms", "augment mean (ms/batch)", 2),
    ("augment_p95_ms", "augment p95 (ms)", 2),
    ("step_s", "train step (s)", 3),
    ("augment_pct", "augment / step (%)", 2),
]


def build_task(root: Path, size: int, batch: int, strength: str, dropout: float, patients: int, slices: int):
    """The paired task of a synthetic dataset (default preset at ``size``), planned on every case."""
    from modalseg.data.cache import build_slice_cache
    from modalseg.data.layouts import load_dataset
    from modalseg.data.synth import make_breast_dataset
    from modalseg.training.config import TrainConfig
    from modalseg.training.engine import make_preprocess
    from modalseg.training.tasks import task_for

    data = make_breast_dataset(root / "breast", num_patients=patients, slices=slices, size=size, seed=0)
    spec = load_dataset(data)
    task = task_for(spec)
    cfg = task.resolve(TrainConfig(data=str(data), model="master_assistant", batch_size=batch, augmentation=strength,
                                   modality_dropout=dropout, preprocess_options={"target_size": [size, size]}))
    cache = build_slice_cache(spec, make_preprocess(cfg, spec), root / "cache")
    task.model_modalities(cfg)
    task.plan(cache, sorted(cache.case_ids), [], cfg, 0, 1)
    return task


def time_batches(task: Any, precision: Any, count: int) -> tuple[list[float], list[Any]]:
    """Seconds per batch of ``task.batches`` over ``count`` batches (as many epochs as needed), and the batches."""
    times, batches, epoch = [], [], 0
    while len(times) < count:
        it = task.batches(epoch, 0, precision)
        while len(times) < count:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            times.append(time.perf_counter() - t0)
            batches.append(batch)
        epoch += 1
    return times, batches


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strengths", default="medium,strong", help="comma list of light, medium, strong")
    p.add_argument("--dropout", type=float, default=0.5, help="modality_dropout of the assistant (default 0.5)")
    p.add_argument("--batches", type=int, default=200, help="batches timed per configuration (default 200)")
    p.add_argument("--patients", type=int, default=3, help="synthetic patients (default 3)")
    p.add_argument("--slices", type=int, default=8, help="slices per volume (default 8)")
    common.add_common_args(p, steps=10, warmup=2, size=128, batch=4)
    args = common.apply_quick(p.parse_args(argv), p)
    if args.quick:
        args.batches, args.patients, args.slices = 6, 2, 4
    common.set_threads(args.threads)
    info = common.machine_info()
    common.print_machine(info)
    from modalseg.data.augment import RandomPipeline

    strengths = [s.strip() for s in args.strengths.split(",") if s.strip()]
    precision = common.precision_for("fp32")
    spec = common.build_model("master_assistant", width=args.width)
    case = common.make_train_case(spec, "fp32", args.batch, args.size)
    step_s = common.measure_training(case, args.steps, args.warmup)["median_s"]
    del case, spec
    print(f"# batch {args.batch}, {args.size}x{args.size}, fp32; {args.batches} batches per configuration; train "
          f"step = median of {args.steps} after {args.warmup} warm-up; modality_dropout {args.dropout:g}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="modalseg_bench_aug_") as tmp:
        for k, strength in enumerate(strengths):
            task = build_task(Path(tmp) / str(k), args.size, args.batch, strength, args.dropout, args.patients,
                              args.slices)
            transforms = task.transforms
            on, _ = time_batches(task, precision, args.batches)
            task.transforms = RandomPipeline([])
            off, loaded = time_batches(task, precision, args.batches)
            aug = []
            for step, batch in enumerate(loaded):
                x, y = batch.args
                t0 = time.perf_counter()
                transforms.batch(x, y, step=step)
                aug.append(time.perf_counter() - t0)
            row = {
                "strength": strength,
                "load_ms": 1e3 * statistics.median(off),
                "load_aug_ms": 1e3 * statistics.mean(on),
                "augment_ms": 1e3 * statistics.mean(aug),
                "augment_p95_ms": 1e3 * float(np.percentile(aug, 95)),
                "step_s": step_s,
            }
            row["augment_pct"] = 100 * row["augment_ms"] / 1e3 / step_s
            rows.append(row)
    print()
    common.print_table(rows, COLUMNS)
    for r in rows:
        ok = r["augment_pct"] <= 100 * TARGET
        print(f"# target augmentation <= {100 * TARGET:.0f} % of the step ({r['strength']}): "
              f"{r['augment_pct']:.2f} % -> {'met' if ok else 'NOT met'}")
    payload = {"benchmark": "augment_cost", "machine": info, "settings": vars(args), "results": rows}
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
