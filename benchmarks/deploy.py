"""``modalseg predict`` of one two-modality volume (default 256x256x100) per backend: torch fp32, fp32+channels_last,
bf16+channels_last; ONNX Runtime fp32 (and int8 with ``--int8``); OpenVINO fp32 and bf16. Seconds, ratios to
torch fp32, and label agreement with it.

Setup (not timed): the synthetic case and master_assistant checkpoint of benchmarks/inference.py (``write_inputs``:
paper-1 preprocessing, fresh weights unless ``--checkpoint``), exported once with ``modalseg.deploy.export``
(``--int8`` also writes a small synthetic breast dataset of the same size to calibrate on).

Timed per configuration, the configurations interleaved (round 1 runs each once, then round 2, ...; medians over
``--repeats`` rounds, so a change of machine load hits every configuration alike):

* ``load``: torch: ``load_models`` (checkpoint, BN folding, ``Precision``); exports: ``load_export`` (SHA-256 check,
  ONNX Runtime session / OpenVINO compilation);
* ``predict``: ``find_cases`` + ``predict_case`` (read, preprocess, batched network, restore geometry) -- the code
  ``modalseg predict`` runs for every backend;
* ``write``: ``write_prediction`` (label NIfTI).

``pipeline only`` predicts with a backend that answers at once (``modalseg.deploy.quantize.UniformBackend``): its
predict time is everything but the network, and each configuration's ``(predict - pipeline) / (FLOPs / peak)`` is
then the network's own ratio.

The dense peak is measured at the start and again after every round; the highest value seen is the yardstick (the
machine's speed drifts by several per cent over minutes, and a peak measured once at a slow moment would flatter
every ratio).

Threads: ``--threads`` sets torch's, ONNX Runtime's intra-op and OpenVINO's inference threads alike (default: each
library's own default).

    .venv/bin/python benchmarks/deploy.py --threads 2 --repeats 3 --int8
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
import inference  # noqa: E402

#: (name, backend, precision): torch precisions as ``resolve_precision`` labels; exports as the runtime's words
CONFIGS = [
    ("pipeline only", "none", "-"),
    ("torch fp32", "torch", "fp32"),
    ("torch fp32+CL", "torch", "fp32+channels_last"),
    ("torch bf16+CL", "torch", "bf16+channels_last"),
    ("onnxruntime fp32", "onnxruntime", "fp32"),
    ("onnxruntime int8", "onnxruntime", "int8"),
    ("openvino fp32", "openvino", "fp32"),
    ("openvino bf16", "openvino", "bf16"),
]

COLUMNS = [
    ("config", "configuration", 0),
    ("load_s", "load (s)", 2),
    ("predict_s", "predict (s)", 2),
    ("write_s", "write (s)", 2),
    ("total_s", "total (s)", 2),
    ("slices_per_s", "slices/s", 1),
    ("speedup_vs_torch_fp32", "x torch fp32", 2),
    ("labels_equal_pct", "labels = torch fp32 (%)", 3),
    ("max_abs_prob_diff", "max |dp|", 4),
    ("achieved_gflops", "network GFLOP/s", 0),
    ("x_ideal", "predict / (FLOPs / peak)", 2),
    ("network_x_ideal", "(predict - pipeline) / (FLOPs / peak)", 2),
]


def peak_dtype(precision: str) -> torch.dtype | None:
    """The dense peak a configuration is held against: fp32 or bf16 (int8 has no torch peak: none)."""
    if precision.startswith("fp32"):
        return torch.float32
    if precision.startswith("bf16"):
        return torch.bfloat16
    return None


def available(backend: str) -> bool:
    name = {"onnxruntime": "onnxruntime", "openvino": "openvino"}.get(backend)
    if name is None:
        return True
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def load(config: tuple[str, str, str], ckpt: Path, exports: dict[str, Path], threads: int | None) -> list:
    from modalseg.deploy.loader import load_export
    from modalseg.training.precision import Precision
    from modalseg.training.predict import load_models

    _, backend, precision = config
    if backend == "none":
        from modalseg.deploy.quantize import UniformBackend
        from modalseg.inference.backends import input_size_rule
        from modalseg.inference.predictor import LoadedModel
        from modalseg.training.checkpoint import read_checkpoint

        trained = read_checkpoint(ckpt)  # the network's size rule, so the pipeline pads as for the real network
        backend = UniformBackend(trained.meta.num_classes, *input_size_rule(trained.build_network()))
        return [LoadedModel(backend, trained.meta, ckpt)]
    if backend == "torch":
        return load_models([ckpt], Precision.from_label(torch.device("cpu"), precision))
    folder = exports["int8" if precision == "int8" else "fp32"]
    return load_export(folder, backend, threads=threads, precision="fp32" if precision == "int8" else precision)


def run_once(config: tuple[str, str, str], inp: Path, ckpt: Path, exports: dict[str, Path], out: Path,
             batch_size: int, threads: int | None) -> dict[str, Any]:
    """One full predict of the case with ``config``: stage times, the labels and the foreground probabilities."""
    from modalseg.training.predict import find_cases, predict_case, write_prediction

    t0 = time.perf_counter()
    models = load(config, ckpt, exports, threads)
    t1 = time.perf_counter()
    meta = models[0].meta
    (case, files), = find_cases([inp], meta).items()
    labels, probs, ref = predict_case(models, files, batch_size=batch_size)
    t2 = time.perf_counter()
    write_prediction(out / config[0].replace(" ", "_").replace("+", "_"), case, labels, None, ref, list(meta.labels))
    t3 = time.perf_counter()
    n_slices = labels.shape[meta.preprocess["slice_axis"]]
    return {"load_s": t1 - t0, "predict_s": t2 - t1, "write_s": t3 - t2, "total_s": t3 - t0,
            "slices_per_s": n_slices / (t2 - t1), "labels": labels, "probs": probs[1]}


def calibration_dataset(root: Path, size: int, slices: int) -> Path:
    from modalseg.data.synth import make_breast_dataset

    folder = root / "calibration"
    make_breast_dataset(folder, num_patients=3, slices=max(2, min(slices, 8)), size=size, seed=7)
    return folder


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="in-plane size (default 256)")
    p.add_argument("--slices", type=int, default=100, help="slices of the volume (default 100)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median; default 3)")
    p.add_argument("--batch-size", type=int, default=8, help="slices per forward pass (predict's default 8)")
    p.add_argument("--threads", type=int, default=None, help="threads of torch, ONNX Runtime and OpenVINO")
    p.add_argument("--width", type=int, default=None, help="master_assistant base width (smoke tests)")
    p.add_argument("--checkpoint", default=None, help="use this trained master_assistant checkpoint instead")
    p.add_argument("--configs", default=None,
                   help=f"comma list of configurations (default: all available): {', '.join(c[0] for c in CONFIGS)}")
    p.add_argument("--int8", action="store_true", help="also export int8 (calibrated) and time onnxruntime int8")
    p.add_argument("--workdir", default=None, help="where inputs/outputs go (default: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="smoke test: 32x32x4 volume, width 4, one round")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.slices, args.width, args.repeats = 32, 4, 4, 1
        args.threads = args.threads or 1
    common.set_threads(args.threads)
    wanted = [c.strip() for c in args.configs.split(",")] if args.configs else [c[0] for c in CONFIGS]
    unknown = sorted(set(wanted) - {c[0] for c in CONFIGS})
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; known: {', '.join(c[0] for c in CONFIGS)}")
    configs = [c for c in CONFIGS if c[0] in wanted and available(c[1]) and (c[2] != "int8" or args.int8)]
    info = common.machine_info()
    for dist in ("onnxruntime", "openvino", "onnx"):
        with contextlib.suppress(md.PackageNotFoundError):
            info[dist] = md.version(dist)
    common.print_machine(info)
    print(f"# onnxruntime {info.get('onnxruntime', '-')}, openvino {info.get('openvino', '-')}, threads "
          f"{args.threads or 'library defaults'}")
    n = 1024 if args.quick else 4096
    peaks = {torch.float32: common.dense_peak_gflops(torch.float32, n), torch.bfloat16: common.dense_peak_gflops(
        torch.bfloat16, n)}
    info["peak_gflops"] = {"fp32": peaks[torch.float32], "bf16": peaks[torch.bfloat16]}
    print(f"# measured dense peak ({n}x{n} matmul, best of 5, torch {torch.get_num_threads()} threads): fp32 "
          f"{peaks[torch.float32]:.0f} GFLOP/s, bf16 {peaks[torch.bfloat16]:.0f} GFLOP/s")
    from modalseg.deploy.export import export_run

    with tempfile.TemporaryDirectory(prefix="modalseg_bench_deploy_") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        t0 = time.perf_counter()
        inp, ckpt = inference.write_inputs(root, args.size, args.slices, args.width)
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
        exports = {"fp32": root / "export_fp32"}
        with contextlib.redirect_stdout(io.StringIO()):
            export_run(ckpt, exports["fp32"], echo=False)
            if any(c[2] == "int8" for c in configs):
                exports["int8"] = root / "export_int8"
                export_run(ckpt, exports["int8"], int8_calibration=calibration_dataset(root, args.size, args.slices),
                           echo=False)
        from modalseg.training.checkpoint import read_checkpoint

        network = read_checkpoint(ckpt).build_network()
        flops_per_slice = common.network_forward_flops(network, torch.zeros(1, 2, args.size, args.size))
        volume_flops = flops_per_slice * args.slices
        print(f"# network forward {flops_per_slice / 1e9:.1f} GFLOP per slice, {volume_flops / 1e9:.0f} GFLOP per "
              f"volume (torch.utils.flop_counter: convolutions and matrix products)")
        print(f"# volume {args.size}x{args.size}x{args.slices}, 2 modalities, master_assistant "
              f"({'trained: ' + str(ckpt) if args.checkpoint else 'fresh weights'}), predict batch "
              f"{args.batch_size}; setup and export {time.perf_counter() - t0:.1f} s (not timed)")
        out = root / "output"
        runs: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in configs}
        for _ in range(max(1, args.repeats)):
            for c in configs:  # interleaved: every configuration once per round
                runs[c[0]].append(run_once(c, inp, ckpt, exports, out, args.batch_size, args.threads))
            for dtype in peaks:  # the peak again after every round: the highest seen is the yardstick
                peaks[dtype] = max(peaks[dtype], common.dense_peak_gflops(dtype, n))
        info["peak_gflops"] = {"fp32": peaks[torch.float32], "bf16": peaks[torch.bfloat16]}
        print(f"# highest dense peak measured (at the start and after each round): fp32 {peaks[torch.float32]:.0f} "
              f"GFLOP/s, bf16 {peaks[torch.bfloat16]:.0f} GFLOP/s: the ratios below are against these")
    rows = []
    for c in configs:
        rs = runs[c[0]]
        row: dict[str, Any] = {"config": c[0], "backend": c[1], "precision": c[2], "n": len(rs)}
        for key in ("load_s", "predict_s", "write_s", "total_s", "slices_per_s"):
            row[key] = statistics.median(r[key] for r in rs)
        rows.append(row)
    ref = runs.get("torch fp32")
    base = next((r for r in rows if r["config"] == "torch fp32"), None)
    pipeline = next((r["predict_s"] for r in rows if r["backend"] == "none"), None)
    for row in rows:
        if row["backend"] == "none":
            continue
        row["speedup_vs_torch_fp32"] = base["total_s"] / row["total_s"] if base else None
        row["achieved_gflops"] = volume_flops / row["predict_s"] / 1e9
        dtype = peak_dtype(row["precision"])
        # 1.0 = predict (read, preprocess, network, restore) as fast as the network's FLOPs at the dense peak
        ideal = volume_flops / (peaks[dtype] * 1e9) if dtype is not None else None
        row["x_ideal"] = row["predict_s"] / ideal if ideal else None
        # the network's own share: predict less the pipeline-only predict of the same round structure
        row["network_x_ideal"] = (row["predict_s"] - pipeline) / ideal if ideal and pipeline is not None else None
        if ref:
            last = runs[row["config"]][-1]
            row["labels_equal_pct"] = 100.0 * float(np.mean(last["labels"] == ref[-1]["labels"]))
            row["max_abs_prob_diff"] = float(np.max(np.abs(last["probs"] - ref[-1]["probs"])))
    print()
    common.print_table(rows, COLUMNS)
    print("# medians over interleaved rounds; labels and |dp| (foreground probability) against torch fp32's last run")
    payload = {"benchmark": "deploy", "machine": info, "settings": vars(args), "results": rows,
               "network_flops_per_volume": volume_flops}
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
