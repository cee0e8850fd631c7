"""Data time per training batch (slice cache) against the training step time of master_assistant.

``Trainer`` loads its batches synchronously in the training loop (no DataLoader workers): for each batch of
``EpochBatchSampler`` it calls ``SliceCache.get_batch`` (memory-mapped ``images.npy``), selects the model's
channels and converts with ``Precision.to_input``. All of that adds to every step, so the ratio
``data time / step time`` is the share of training time spent on data (the issue's target: <= 5 %).

Setup (not timed): a synthetic breast dataset (``--patients`` x ``--slices`` at ``--size``) cached with paper
1's preprocessing (``PreprocessConfig.paper1``; all slices kept so the cache has enough batches).
Two data timings: ``cold`` = the first pass after evicting ``images.npy`` / ``labels.npy`` from the page cache
(``posix_fadvise(DONTNEED)``, as on a first epoch after a reboot), ``warm`` = later passes (page cache hot,
the usual case: the cache of a 2D dataset fits in RAM). Both sides are measured in this one process.

    .venv/bin/python benchmarks/data_pipeline.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import common  # noqa: E402

TARGET = 0.05


def build_cache(root: Path, patients: int, slices: int, size: int):
    """Write the synthetic dataset and its slice cache under ``root``; return the open cache."""
    from modalseg.data.cache import build_slice_cache
    from modalseg.data.layouts import load_dataset
    from modalseg.data.preprocess import PreprocessConfig
    from modalseg.data.synth import make_breast_dataset

    data = make_breast_dataset(root / "breast", num_patients=patients, slices=slices, size=size, seed=0)
    spec = load_dataset(data)
    pp = PreprocessConfig.paper1()
    pp.target_size = (size, size)
    pp.only_labelled_slices = False
    return build_slice_cache(spec, pp, root / "cache")


def evict(path: Path) -> bool:
    """Drop ``path``'s clean pages from the page cache (no root needed; False where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except (OSError, AttributeError):
        return False
    finally:
        os.close(fd)


def time_batches(cache, batches: list[np.ndarray], channel_index: list[int], mode: str) -> list[float]:
    """Time the trainer's data path (``Trainer._step_batches``, paired) for each batch of indices."""
    precision = common.precision_for(mode)
    times = []
    for idx in batches:
        t0 = time.perf_counter()
        x, y = cache.get_batch(idx)
        x = x[:, channel_index]
        x = precision.to_input(x)
        y = y.to(precision.device)
        times.append(time.perf_counter() - t0)
    return times


COLUMNS = [
    ("precision", "mode", 0),
    ("data_cold_ms", "data cold (ms/batch)", 2),
    ("data_warm_ms", "data warm (ms/batch)", 2),
    ("step_s", "train step (s)", 3),
    ("ratio_cold_pct", "cold / step (%)", 2),
    ("ratio_warm_pct", "warm / step (%)", 2),
]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="fp32,bf16", help="comma list of fp32, bf16, auto (default fp32,bf16)")
    p.add_argument("--patients", type=int, default=4, help="synthetic patients (default 4)")
    p.add_argument("--slices", type=int, default=16, help="slices per volume (default 16)")
    p.add_argument("--batches", type=int, default=50, help="data batches timed per pass (default 50)")
    common.add_common_args(p, steps=10, warmup=2, size=256, batch=4)
    args = common.apply_quick(p.parse_args(argv), p)
    if args.quick:
        args.patients, args.slices, args.batches = 2, 4, 8
    common.set_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    info = common.machine_info()
    common.print_machine(info)
    from modalseg.data.sampling import EpochBatchSampler

    with tempfile.TemporaryDirectory(prefix="modalseg_bench_data_") as tmp:
        t0 = time.perf_counter()
        cache = build_cache(Path(tmp), args.patients, args.slices, args.size)
        channel_index = [0, 1]  # master_assistant: T1C (master), T2W
        sampler = EpochBatchSampler(cache.indices_for(), args.batch, shuffle=True, seed=0, drop_last=True)
        if sampler.num_batches() < 1:
            raise SystemExit(f"the cache has {len(cache)} slices, fewer than one batch of {args.batch}")
        batches: list[np.ndarray] = []
        epoch = 0
        while len(batches) < args.batches:
            batches.extend(sampler.batches(epoch))
            epoch += 1
        batches = batches[: args.batches]
        print(f"# cache: {len(cache)} slices of {tuple(cache.images.shape[1:])} float32 "
              f"({cache.images.nbytes / 2**20:.0f} MiB); setup {time.perf_counter() - t0:.1f} s (not timed)")
        print(f"# batch {args.batch}, {args.size}x{args.size}; {args.batches} data batches per pass; train step = "
              f"median of {args.steps} after {args.warmup} warm-up")
        rows = []
        for mode in modes:
            evicted = all([evict(path) for path in cache.array_files()])
            cold = time_batches(cache, batches, channel_index, mode)
            warm = time_batches(cache, batches, channel_index, mode)
            spec = common.build_model("master_assistant", width=args.width)
            case = common.make_train_case(spec, mode, args.batch, args.size)
            train = common.measure_training(case, args.steps, args.warmup)
            row = {
                "mode": mode,
                "precision": common.mode_label(mode),
                "data_cold_ms": 1e3 * statistics.median(cold),
                "data_cold_max_ms": 1e3 * max(cold),
                "data_warm_ms": 1e3 * statistics.median(warm),
                "step_s": train["median_s"],
                "evicted": evicted,
            }
            row["ratio_cold_pct"] = 100 * row["data_cold_ms"] / 1e3 / row["step_s"]
            row["ratio_warm_pct"] = 100 * row["data_warm_ms"] / 1e3 / row["step_s"]
            rows.append(row)
            del case, spec
    print()
    common.print_table(rows, COLUMNS)
    for r in rows:
        ok = r["ratio_cold_pct"] <= 100 * TARGET
        print(f"# target data <= {100 * TARGET:.0f} % of the step ({r['precision']}): cold {r['ratio_cold_pct']:.2f} %,"
              f" warm {r['ratio_warm_pct']:.2f} % -> {'met' if ok else 'NOT met'}"
              + ("" if r["evicted"] else " (page cache could not be evicted: 'cold' is warm)"))
    payload = {"benchmark": "data_pipeline", "machine": info, "settings": vars(args), "results": rows}
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
