"""Training throughput (img/s) of every model, beside MONAI's BasicUNet and UNet, in fp32 and bf16.

One step = ``precision.to_input`` + forward under autocast + Dice-CE loss (paper 1 Eq. 1) + backward + Adam
(amsgrad) step, exactly as ``Trainer.fit``. The figure is the median of ``--steps`` timed steps after
``--warmup`` untimed ones; every model and mode runs in this one process, one after another, and the ratio
column divides by MONAI BasicUNet fp32 measured in the same run. Paper 2's ``dilated_fcn`` runs one forward per
modality (MSBN), so one of its steps processes ``batch x modalities`` images.

    .venv/bin/python benchmarks/train_throughput.py --models master_assistant,monai_basicunet --threads 2
    .venv/bin/python benchmarks/train_throughput.py --models all --modes fp32,bf16      # full suite
    .venv/bin/python benchmarks/train_throughput.py --models master_assistant --modes bf16 --profile 3
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

ISSUE_TARGET = 2.5  # master_assistant in the default mode >= 2.5 x MONAI BasicUNet fp32 img/s


def run_one(name: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build, warm up and time one (model, mode); returns one result row."""
    spec = common.build_model(name, width=args.width)
    case = common.make_train_case(spec, mode, args.batch, args.size)
    res = common.measure_training(case, args.steps, args.warmup)
    row = {"model": name, "label": spec.label, "mode": mode, "precision": common.mode_label(mode),
           "params_m": spec.params_m, **res}
    del case, spec
    gc.collect()
    return row


def run_interleaved(pairs: list[tuple[str, str]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """All (model, mode) cases built at once, then timed round-robin: step i of every case before step i+1.

    On a shared machine the load drifts over minutes; interleaving exposes every case to the same drift, so
    the ratios stay meaningful. Peak memory: per step, the RSS high-water mark above the RSS before the step
    (all cases stay resident, so absolute peaks are not per model).
    """
    cases = []
    for name, mode in pairs:
        spec = common.build_model(name, width=args.width)
        cases.append((name, mode, spec, common.make_train_case(spec, mode, args.batch, args.size)))
    for *_, case in cases:
        for _ in range(args.warmup):
            case.step()
    times: list[list[float]] = [[] for _ in cases]
    deltas: list[float] = [0.0 for _ in cases]
    for _ in range(max(1, args.steps)):
        for i, (*_, case) in enumerate(cases):
            common.peak_rss_reset()
            before = common.current_rss_mb()
            t = common.time_calls(case.step, 1, 0).times[0]
            times[i].append(t)
            deltas[i] = max(deltas[i], common.peak_rss_mb()[0] - before)
    rows = []
    for (name, mode, spec, case), ts, delta in zip(cases, times, deltas, strict=True):
        timing = common.Timing(ts)
        rows.append({"model": name, "label": spec.label, "mode": mode, "precision": common.mode_label(mode),
                     "params_m": spec.params_m, **timing.summary(),
                     "img_per_s": case.images_per_step / timing.median, "images_per_step": case.images_per_step,
                     "peak_step_delta_mb": delta})
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> float | None:
    """Ratio of every row's img/s to MONAI BasicUNet fp32 of the same run (None when it was not run)."""
    base = next((r for r in rows if (r["model"], r["mode"]) == common.BASELINE), None)
    ref = base["img_per_s"] if base else None
    for r in rows:
        r["ratio_vs_basicunet_fp32"] = r["img_per_s"] / ref if ref else None
    return ref


def profile_step(name: str, mode: str, args: argparse.Namespace, steps: int, top: int = 25) -> str:
    """torch.profiler over ``steps`` training steps (after warm-up): top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    spec = common.build_model(name, width=args.width)
    case = common.make_train_case(spec, mode, args.batch, args.size)
    for _ in range(max(1, args.warmup)):
        case.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(steps):
            case.step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    print(f"\n## profile: {name} {common.mode_label(mode)}, {steps} step(s), batch {args.batch}, {args.size}px")
    print(table)
    return table


COLUMNS = [
    ("label", "model", 0),
    ("precision", "mode", 0),
    ("params_m", "params (M)", 2),
    ("median_s", "step (s)", 3),
    ("q1_s", "q1 (s)", 3),
    ("q3_s", "q3 (s)", 3),
    ("img_per_s", "img/s", 2),
    ("ratio_vs_basicunet_fp32", "x BasicUNet fp32", 2),
    ("rss_before_mb", "RSS before (MiB)", 0),
    ("peak_rss_mb", "peak RSS (MiB)", 0),
]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="master_assistant,monai_basicunet",
                   help="comma list; 'all', 'paper1', 'monai' or names (default master_assistant,monai_basicunet)")
    p.add_argument("--modes", default="fp32,bf16", help="comma list of fp32, bf16, auto (default fp32,bf16)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="instead of timing, profile STEPS training steps of each model/mode (top ops)")
    p.add_argument("--interleave", action="store_true",
                   help="build all cases, then time them round-robin (fairer ratios under drifting load)")
    common.add_common_args(p, steps=20, warmup=3, size=256, batch=4)
    args = common.apply_quick(p.parse_args(argv), p)
    common.set_threads(args.threads)
    models = common.parse_models(args.models)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        common.precision_for(m)
    info = common.machine_info()
    common.print_machine(info)
    if args.profile:
        tables = {f"{n}/{m}": profile_step(n, m, args, args.profile) for n in models for m in modes}
        return {"machine": info, "profiles": tables}
    # The baseline first, so that a run cut short still has its reference.
    order = sorted(((n, m) for n in models for m in modes), key=lambda nm: (nm != common.BASELINE,))
    print(f"# training: batch {args.batch}, {args.size}x{args.size}, {args.steps} timed steps after "
          f"{args.warmup} warm-up, loss Dice+CE, Adam(amsgrad)")
    if args.interleave:
        print("# interleaved: every case built first, then timed round-robin (one step of each in turn)")
        rows = run_interleaved(order, args)
    else:
        rows = []
        for name, mode in order:
            row = run_one(name, mode, args)
            rows.append(row)
            print(f"#   {name:18s} {row['precision']:12s} {row['median_s']:.3f} s/step  "
                  f"{row['img_per_s']:.2f} img/s", flush=True)
    rows.sort(key=lambda r: (models.index(r["model"]), modes.index(r["mode"])))
    add_ratios(rows)
    print()
    columns = COLUMNS if not args.interleave else [c for c in COLUMNS if "rss" not in c[0]] + [
        ("peak_step_delta_mb", "peak - before step (MiB)", 0)]
    common.print_table(rows, columns)
    auto = common.precision_for("auto").name
    for r in rows:
        if r["model"] == "master_assistant" and r["ratio_vs_basicunet_fp32"] is not None:
            ok = r["ratio_vs_basicunet_fp32"] >= ISSUE_TARGET
            default = " (this machine's auto precision)" if common.precision_for(r["mode"]).name == auto else ""
            print(f"# target master_assistant >= {ISSUE_TARGET}x BasicUNet fp32: {r['precision']}{default}: "
                  f"{r['ratio_vs_basicunet_fp32']:.2f}x -> {'met' if ok else 'NOT met'}")
    payload = {"benchmark": "train_throughput", "machine": info, "settings": vars(args), "results": rows}
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
