"""Model FLOPs per image and the FLOP/s a training step achieves, for every model.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass of a batch, divided by the images
in it (convolutions, transposed convolutions and matrix products; a multiply-add counts 2; BN, activations,
pooling and interpolation are not counted). Training is taken as ~3x the forward (forward + backward w.r.t.
activations and weights). Achieved FLOP/s = 3 x forward FLOPs per image x measured training img/s, with the
step timed by the same functions as train_throughput.py (common.py). Paper 2's ``dilated_fcn`` runs one
forward per modality; its per-image figure is per single-modality image.

    .venv/bin/python benchmarks/flops.py --models all --modes bf16 --threads 2
    .venv/bin/python benchmarks/flops.py --models all --no-timing          # FLOPs only, seconds
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
    ("label", "model", 0),
    ("params_m", "params (M)", 2),
    ("gflops_fwd", "GFLOP/img fwd", 2),
    ("gflops_train", "GFLOP/img train (3x)", 2),
    ("flops_vs_basicunet", "x BasicUNet FLOPs", 2),
    ("precision", "mode", 0),
    ("img_per_s", "img/s", 2),
    ("achieved_gflops", "achieved GFLOP/s", 1),
]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="all", help="comma list; 'all', 'paper1', 'monai' or names (default all)")
    p.add_argument("--modes", default="bf16", help="modes to time (default bf16)")
    p.add_argument("--no-timing", action="store_true", help="count FLOPs only (no training steps)")
    common.add_common_args(p, steps=5, warmup=2, size=256, batch=4)
    args = common.apply_quick(p.parse_args(argv), p)
    common.set_threads(args.threads)
    models = common.parse_models(args.models)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    info = common.machine_info()
    common.print_machine(info)
    print(f"# {args.size}x{args.size}, batch {args.batch}" + ("" if args.no_timing else
          f"; training timed over {args.steps} steps after {args.warmup} warm-up"))
    rows = []
    for name in models:
        spec = common.build_model(name, width=args.width)
        counted = common.make_train_case(spec, "fp32", args.batch, args.size)
        fwd = common.forward_flops(counted) / counted.images_per_step
        del counted
        for mode in ([None] if args.no_timing else modes):
            row: dict[str, Any] = {"model": name, "label": spec.label, "params_m": spec.params_m,
                                   "gflops_fwd": fwd / 1e9, "gflops_train": 3 * fwd / 1e9}
            if mode is not None:
                case = common.make_train_case(common.build_model(name, width=args.width), mode, args.batch,
                                              args.size)
                res = common.measure_training(case, args.steps, args.warmup)
                row.update(mode=mode, precision=common.mode_label(mode), img_per_s=res["img_per_s"],
                           median_s=res["median_s"], achieved_gflops=3 * fwd * res["img_per_s"] / 1e9)
                del case
            rows.append(row)
            print(f"#   {name:18s} {fwd / 1e9:8.2f} GFLOP/img fwd"
                  + (f", {row['achieved_gflops']:.1f} GFLOP/s {row['precision']}" if mode else ""), flush=True)
        del spec
        gc.collect()
    base = next((r["gflops_fwd"] for r in rows if r["model"] == "monai_basicunet"), None)
    for r in rows:
        r["flops_vs_basicunet"] = r["gflops_fwd"] / base if base else None
    print()
    common.print_table(rows, COLUMNS)
    payload = {"benchmark": "flops", "machine": info, "settings": vars(args), "results": rows}
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
