"""``modalseg predict`` on one two-modality volume (default 256x256x100): wall time and peak memory, fp32 vs bf16.

Setup (not timed): a synthetic breast case (T1C + T2W, nnU-Net names ``case_0000/0001.nii.gz``) and a
master_assistant checkpoint written with ``training.checkpoint.save_checkpoint`` and the ``meta`` that
``Trainer`` stores (``ModelMeta``: paper-1 preprocessing, labels, channel names). Without ``--checkpoint`` the
network is freshly initialised: prediction time does not depend on the weights.

Timed, per precision mode, in this one process (``--repeats`` runs, median):

* ``load``: ``training.predict.load_models`` (read checkpoint, build, ``Precision.prepare_model``);
* ``predict``: ``find_cases`` + ``predict_case`` (read NIfTI, preprocess, batched forward, restore geometry);
* ``write``: ``write_prediction`` (label NIfTI, atomic);
* peak RSS of the process during the three (``VmHWM`` after a reset; see common.py).

``--cli`` also runs the real command ``modalseg predict`` in a subprocess per mode: wall time including Python
and torch start-up, and the child's own peak RSS (``ru_maxrss`` via a small launcher process, see ``run_cli``).

    .venv/bin/python benchmarks/inference.py --threads 2 --cli
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import common  # noqa: E402

TARGET_S = 15.0  # the target on 2 cores


def master_assistant_meta(size: int, width: int | None):
    """The ``ModelMeta`` ``Trainer`` would store for master_assistant on T1C + T2W breast data with paper-1
    preprocessing at ``size`` (``width``: base width, ``None`` the paper's)."""
    from modalseg.data.preprocess import PreprocessConfig
    from modalseg.training.tasks import ModelMeta

    pp = PreprocessConfig.paper1()
    pp.target_size = (size, size)  # paper 1 resizes to 256x256; keep smoke tests tiny
    return ModelMeta(
        kind="paired",
        model="master_assistant",
        model_options={} if width is None else {"base_width": width},
        modalities=["T1C", "T2W"],
        num_classes=2,
        labels={"background": 0, "mass": 1},
        preprocess=pp.to_dict(),
        channel_names=["T1C", "T2W"],
    )


def write_inputs(root: Path, size: int, slices: int, width: int | None, seed: int = 0) -> tuple[Path, Path]:
    """Write ``root/input/case_000{0,1}.nii.gz`` and ``root/model.pt``; return (input folder, checkpoint)."""
    from modalseg.data.synth import save_nifti, synth_breast_case
    from modalseg.training.checkpoint import save_checkpoint
    from modalseg.training.tasks import build_network

    case = synth_breast_case(seed, 0, slices=slices, size=size)
    inp = root / "input"
    for k, name in enumerate(("T1C", "T2W")):
        save_nifti(inp / f"case_{k:04d}.nii.gz", case.images[name].astype(np.float32), case.affine)
    meta = master_assistant_meta(size, width)
    net = build_network(meta)
    ckpt = root / "model.pt"
    save_checkpoint({"model_state": net.state_dict(), "meta": meta.to_dict(), "epoch": 0}, ckpt)
    return inp, ckpt


def run_inprocess(mode: str, inp: Path, ckpt: Path, out: Path, batch_size: int) -> dict[str, Any]:
    """One full predict of the case under ``mode``; stage times, peak RSS and the label volume."""
    from modalseg.training.predict import find_cases, load_models, predict_case, write_prediction

    precision = common.precision_for(mode)
    common.peak_rss_reset()
    before = common.current_rss_mb()
    t0 = time.perf_counter()
    models = load_models([ckpt], precision)
    t1 = time.perf_counter()
    meta = models[0].meta
    cases = find_cases([inp], meta)
    (case, files), = cases.items()
    labels, probs, ref = predict_case(models, files, batch_size=batch_size)
    t2 = time.perf_counter()
    write_prediction(out / mode, case, labels, None, ref, list(meta.labels))
    t3 = time.perf_counter()
    peak, how = common.peak_rss_mb()
    n_slices = labels.shape[meta.preprocess["slice_axis"]]
    return {"load_s": t1 - t0, "predict_s": t2 - t1, "write_s": t3 - t2, "total_s": t3 - t0,
            "slices_per_s": n_slices / (t2 - t1), "peak_rss_mb": peak, "rss_before_mb": before,
            "peak_rss_method": how, "labels": labels, "probs": probs[1]}


# Linux carries a forked process's RSS high-water mark across exec into its ru_maxrss, so a child forked
# from this (large) benchmark process would report at least our own peak. A small launcher process forks the
# CLI instead and reports the CLI's own ru_maxrss (floor: the launcher's ~10 MiB).
_LAUNCHER = """
import os, sys, json
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}))
"""


def run_cli(mode: str, inp: Path, ckpt: Path, out: Path, batch_size: int, threads: int | None) -> dict[str, Any]:
    """``modalseg predict`` in a fresh process: wall time and that process's own peak RSS (ru_maxrss)."""
    exe = Path(sys.executable).parent / "modalseg"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "modalseg.cli.main"]
    cmd += ["predict", "--model", str(ckpt), "--input", str(inp), "--output", str(out / f"cli_{mode}"),
            "--precision", mode, "--device", "cpu", "--batch-size", str(batch_size)]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, ValueError):
        report = {"rc": proc.returncode, "maxrss_kb": 0}
    if proc.returncode != 0 or report["rc"] != 0:
        raise SystemExit(f"modalseg predict failed ({report['rc']}):\n{proc.stdout}{proc.stderr}")
    return {"cli_wall_s": wall, "cli_peak_rss_mb": report["maxrss_kb"] / 1024,
            "cli_output": "\n".join(lines[:-1])}


COLUMNS = [
    ("precision", "mode", 0),
    ("load_s", "load (s)", 2),
    ("predict_s", "predict (s)", 2),
    ("write_s", "write (s)", 2),
    ("total_s", "total (s)", 2),
    ("slices_per_s", "slices/s", 2),
    ("speedup_vs_fp32", "x fp32", 2),
    ("peak_rss_mb", "peak RSS (MiB)", 0),
    ("cli_wall_s", "CLI wall (s)", 2),
    ("cli_peak_rss_mb", "CLI peak RSS (MiB)", 0),
]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="in-plane size (default 256)")
    p.add_argument("--slices", type=int, default=100, help="slices of the volume (default 100)")
    p.add_argument("--modes", default="fp32,bf16", help="comma list of fp32, bf16, auto (default fp32,bf16)")
    p.add_argument("--repeats", type=int, default=1, help="in-process runs per mode (median; default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="slices per forward pass (predict's default 8)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (and OMP_NUM_THREADS for --cli)")
    p.add_argument("--width", type=int, default=None, help="master_assistant base width (smoke tests)")
    p.add_argument("--checkpoint", default=None, help="use this trained master_assistant checkpoint instead")
    p.add_argument("--cli", action="store_true", help="also time `modalseg predict` in a subprocess per mode")
    p.add_argument("--workdir", default=None, help="where inputs/outputs go (default: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="smoke test: 32x32x4 volume, width 4")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.slices, args.width = 32, 4, 4
        args.threads = args.threads or 1
    common.set_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    info = common.machine_info()
    common.print_machine(info)
    with tempfile.TemporaryDirectory(prefix="modalseg_bench_inf_") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        t0 = time.perf_counter()
        inp, ckpt = write_inputs(root, args.size, args.slices, args.width)
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
        print(f"# volume {args.size}x{args.size}x{args.slices}, 2 modalities, master_assistant "
              f"({'trained: ' + str(ckpt) if args.checkpoint else 'fresh weights'}), predict batch "
              f"{args.batch_size}; setup {time.perf_counter() - t0:.1f} s (not timed)")
        out = root / "output"
        rows, labels, probs = [], {}, {}
        for mode in modes:
            runs = [run_inprocess(mode, inp, ckpt, out, args.batch_size) for _ in range(max(1, args.repeats))]
            labels[mode], probs[mode] = runs[-1].pop("labels"), runs[-1].pop("probs")
            for r in runs[:-1]:
                r.pop("labels"), r.pop("probs")
            row: dict[str, Any] = {"mode": mode, "precision": common.mode_label(mode)}
            for key in ("load_s", "predict_s", "write_s", "total_s", "slices_per_s", "peak_rss_mb"):
                row[key] = statistics.median(r[key] for r in runs)
            row["rss_before_mb"] = runs[0]["rss_before_mb"]
            row["peak_rss_method"] = runs[0]["peak_rss_method"]
            if args.cli:
                row.update(run_cli(mode, inp, ckpt, out, args.batch_size, args.threads))
            rows.append(row)
            print(f"#   {row['precision']}: {row['total_s']:.2f} s in-process"
                  + (f", {row['cli_wall_s']:.2f} s CLI" if args.cli else ""), flush=True)
    base = next((r for r in rows if r["mode"] == "fp32"), None)
    for r in rows:
        r["speedup_vs_fp32"] = base["total_s"] / r["total_s"] if base else None
        r["target_met"] = r["total_s"] <= TARGET_S
    print()
    common.print_table(rows, COLUMNS)
    agreement = {}
    if "fp32" in labels:
        ref_l = labels["fp32"]
        for mode, lab in labels.items():
            if mode == "fp32":
                continue
            agreement[mode] = {
                "voxels_equal": float(np.mean(lab == ref_l)),
                "max_abs_prob_diff": float(np.max(np.abs(probs[mode] - probs["fp32"]))),
            }
            print(f"# {mode} vs fp32: {100 * agreement[mode]['voxels_equal']:.3f} % of label voxels equal, "
                  f"max |p_fg difference| {agreement[mode]['max_abs_prob_diff']:.4f}")
    for r in rows:
        print(f"# target <= {TARGET_S:.0f} s ({r['precision']}, in-process total): {r['total_s']:.1f} s -> "
              f"{'met' if r['target_met'] else 'NOT met'}")
    print(f"# peak RSS: {rows[0]['peak_rss_method'] if rows else '-'} of this process (all memory, not only "
          "Python objects); CLI: the child's ru_maxrss")
    payload = {"benchmark": "inference", "machine": info, "settings": vars(args), "results": rows,
               "agreement_vs_fp32": agreement}
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
