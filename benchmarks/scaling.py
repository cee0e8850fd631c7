"""How master_assistant's training step time and peak memory scale with image size and number of modalities.

Two sweeps by default (``--grid`` for the full cross product): image size 128, 256, 512 at two modalities,
and 2, 3, 4 modalities at 256x256 (one master + M-1 assistant streams, see ``models.fusion``). Each
configuration is built, warmed up and timed in this one process, smallest first; its peak memory is the
process's RSS high-water mark during the timed steps, reset before each configuration (``VmHWM``, see
common.py), beside the RSS before the steps (weights, Adam state and the allocator's cache).

    .venv/bin/python benchmarks/scaling.py --threads 2 --modes bf16
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

COLUMNS = [
    ("precision", "mode", 0),
    ("size", "size", 0),
    ("modalities", "modalities", 0),
    ("params_m", "params (M)", 2),
    ("median_s", "step (s)", 3),
    ("img_per_s", "img/s", 2),
    ("time_vs_first", "x time of first", 2),
    ("us_per_pixel", "us / pixel", 3),
    ("rss_before_mb", "RSS before (MiB)", 0),
    ("peak_rss_mb", "peak RSS (MiB)", 0),
    ("peak_delta_mb", "peak - before (MiB)", 0),
]


def configs(sizes: list[int], modalities: list[int], grid: bool) -> list[tuple[int, int]]:
    """(size, modalities) pairs: the two sweeps through (256 or the middle size, 2), or the full grid."""
    if grid:
        pairs = [(s, m) for s in sizes for m in modalities]
    else:
        mid = 256 if 256 in sizes else sizes[len(sizes) // 2]
        m0 = 2 if 2 in modalities else modalities[0]
        pairs = [(s, m0) for s in sizes] + [(mid, m) for m in modalities]
    return sorted(dict.fromkeys(pairs), key=lambda sm: (sm[0] ** 2 * sm[1], sm))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="master_assistant", help="a fusion model (default master_assistant)")
    p.add_argument("--sizes", default="128,256,512", help="image sides (default 128,256,512)")
    p.add_argument("--modalities", default="2,3,4", help="numbers of modalities (default 2,3,4)")
    p.add_argument("--grid", action="store_true", help="every size x every number of modalities")
    p.add_argument("--modes", default="fp32,bf16", help="comma list of fp32, bf16, auto (default fp32,bf16)")
    common.add_common_args(p, steps=5, warmup=2, size=256, batch=4)
    args = common.apply_quick(p.parse_args(argv), p)
    sizes = [int(s) for s in args.sizes.split(",")]
    mods = [int(m) for m in args.modalities.split(",")]
    if args.quick:
        sizes, mods = [16, 32], [2, 3]
    common.set_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    info = common.machine_info()
    common.print_machine(info)
    print(f"# {args.model}: batch {args.batch}, {args.steps} timed steps after {args.warmup} warm-up per config")
    rows = []
    for mode in modes:
        first = None
        for size, m in configs(sizes, mods, args.grid):
            spec = common.build_model(args.model, width=args.width, num_modalities=m)
            case = common.make_train_case(spec, mode, args.batch, size)
            res = common.measure_training(case, args.steps, args.warmup)
            row = {"mode": mode, "precision": common.mode_label(mode), "size": size, "modalities": m,
                   "params_m": spec.params_m, **res}
            row["us_per_pixel"] = 1e6 * res["median_s"] / (args.batch * size * size)
            row["peak_delta_mb"] = res["peak_rss_mb"] - res["rss_before_mb"]
            first = first or res["median_s"]
            row["time_vs_first"] = res["median_s"] / first
            rows.append(row)
            print(f"#   {row['precision']:8s} {size:4d}px M={m}: {res['median_s']:.3f} s/step, "
                  f"peak {res['peak_rss_mb']:.0f} MiB", flush=True)
            del case, spec
            gc.collect()
    print()
    common.print_table(rows, COLUMNS)
    payload = {"benchmark": "scaling", "machine": info, "settings": vars(args), "results": rows}
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
