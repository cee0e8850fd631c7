"""GPU figures: training img/s and model FLOP utilisation (MFU) per precision, and the AMP path checked against fp32.

Meant for a machine with a CUDA device (``--device cuda``, the default); ``--device cpu`` runs the same code
for smoke tests. Two parts, both through the project's own pieces (``PairedLoss`` = Dice + CE of paper 1
Eq. 1, fused Adam with AMSGrad, ``Precision``, a ``GradScaler`` for fp16 exactly as ``Trainer`` uses them):

1. Throughput and MFU. Per model and mode (``fp32``: no autocast, where PyTorch's default lets cuDNN use TF32
   for convolutions; ``bf16`` / ``fp16``: autocast + channels_last, fp16 with loss scaling): median step time
   over ``--steps`` after ``--warmup``, synchronised (each step reads the loss on the host, as the trainer
   does). MFU = training FLOPs per image (3 x the forward's ``torch.utils.flop_counter`` count) x img/s divided
   by the device's dense peak for that precision (``--peak-tflops``, or the datasheet values below).
2. AMP correctness. The same initial weights are trained ``--check-steps`` steps on the same batch in fp32
   and in each AMP mode; reported: the losses (finite? final AMP loss within ``--loss-tol`` of fp32's after
   as many applied steps, relative to the initial loss; fp16 steps the loss scaler skipped are counted and
   excluded), and the fraction of pixels whose predicted class under AMP equals fp32's
   for the fp32-trained weights (``--agree-tol``). ``ok`` = all three hold.

    .venv/bin/python benchmarks/gpu.py                       # on the GPU machine
    .venv/bin/python benchmarks/gpu.py --device cpu --quick  # smoke test
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from modalseg.training.precision import Precision  # noqa: E402

MODES = ("fp32", "bf16", "fp16")
#: Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets; "fp32" = TF32 tensor cores, which PyTorch lets
#: cuDNN use for fp32 convolutions by default (``torch.backends.cudnn.allow_tf32``). First match wins.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"fp32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    ("H100", {"fp32": 494.0, "bf16": 989.0, "fp16": 989.0}),
    ("H200", {"fp32": 494.0, "bf16": 989.0, "fp16": 989.0}),
    ("A100", {"fp32": 156.0, "bf16": 312.0, "fp16": 312.0}),
)


def device_peak(device: torch.device, mode: str, override: float | None) -> float | None:
    """Peak TFLOP/s for ``mode`` on ``device`` (``override`` wins); None when unknown (MFU left blank)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks[mode]
    return None


def precision_of(device: torch.device, mode: str) -> Precision:
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    return Precision(device, dtype, channels_last=dtype is not None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def predict_labels(case: common.TrainCase, precision: Precision) -> torch.Tensor:
    """Class per pixel of ``case``'s batch by its (trained) network under ``precision``."""
    network = case.module.network
    network.eval()
    x = case.data[0]
    with precision.autocast():
        out = network(precision.to_input(x)).argmax(1)
    network.train()
    return out


def throughput(name: str, mode: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    spec = common.build_model(name, width=args.width)
    if spec.kind != "paired":
        raise SystemExit(f"{name}: gpu.py times paired models (use train_throughput.py for dilated_fcn)")
    case = common.make_train_case(spec, mode, args.batch, args.size, precision=precision_of(device, mode))
    gflop_train = 3 * common.forward_flops(case) / args.batch / 1e9  # per image
    for _ in range(args.warmup):
        case.step()
    sync(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        case.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    img_s = args.batch / median
    peak = device_peak(device, mode, args.peak_tflops)
    achieved = gflop_train * img_s / 1e3  # TFLOP/s
    mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"model": name, "label": spec.label, "mode": mode, "params_m": spec.params_m, "median_s": median,
            "img_per_s": img_s, "gflop_per_img_train": gflop_train, "achieved_tflops": achieved,
            "peak_tflops": peak, "mfu": achieved / peak if peak else None, "peak_mem_mib": mem}


def amp_check(name: str, mode: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    spec = common.build_model(name, width=args.width)
    cases, losses = {}, {}
    for m in ("fp32", mode):  # both from the same initial weights (a copy each)
        case = common.make_train_case(copy.deepcopy(spec), m, args.batch, args.size, lr=args.check_lr,
                                      precision=precision_of(device, m), seed=args.seed)
        cases[m], losses[m] = case, [case.step() for _ in range(args.check_steps)]
    ref, amp = cases["fp32"], cases[mode]
    ref_losses, amp_losses = losses["fp32"], losses[mode]
    finite = all(map(lambda v: v == v and abs(v) != float("inf"), amp_losses))
    # a step the fp16 scaler skipped changed no weight: compare with fp32 after as many applied steps
    applied = max(1, args.check_steps - amp.skipped_steps)
    loss_gap = abs(amp_losses[-1] - ref_losses[applied - 1]) / max(abs(ref_losses[0]), 1e-12)
    agree = float((predict_labels(ref, precision_of(device, mode)) == predict_labels(ref, precision_of(device, "fp32")))
                  .float().mean())
    ok = finite and loss_gap <= args.loss_tol and agree >= args.agree_tol
    return {"model": name, "mode": mode, "loss_first": ref_losses[0], "loss_last_fp32": ref_losses[-1],
            "loss_last_amp": amp_losses[-1], "loss_gap": loss_gap, "skipped_steps": amp.skipped_steps,
            "finite": finite, "agreement": agree, "ok": ok}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke tests)")
    p.add_argument("--models", default="master_assistant,monai_basicunet", help="comma list of paired models")
    p.add_argument("--modes", default="fp32,bf16,fp16", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--steps", type=int, default=30, help="timed steps (median; default 30)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--width", type=int, default=None, help="first-level width override (smoke tests)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: datasheet)")
    p.add_argument("--check-steps", type=int, default=30, help="AMP check: training steps per precision")
    p.add_argument("--check-lr", type=float, default=1e-3)
    p.add_argument("--loss-tol", type=float, default=0.05, help="AMP check: |final loss gap| / initial loss")
    p.add_argument("--agree-tol", type=float, default=0.995, help="AMP check: min fraction of equal labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--quick", action="store_true", help="smoke test: 32 px, batch 2, 2 steps, width 4")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.steps, args.warmup, args.width, args.check_steps = 32, 2, 2, 1, 4, 3
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run on the GPU machine or pass --device cpu")
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    models = common.parse_models(args.models)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := [m for m in modes if m not in MODES]:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    info = common.machine_info()
    info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    common.print_machine(info)
    print(f"# device {info['device']}: batch {args.batch}, {args.size}x{args.size}, {args.steps} timed steps "
          f"after {args.warmup}")
    rows = [throughput(n, m, args, device) for n in models for m in modes]
    common.print_table(rows, [("label", "model", 0), ("mode", "mode", 0), ("params_m", "params (M)", 2),
                              ("median_s", "step (s)", 4), ("img_per_s", "img/s", 1),
                              ("gflop_per_img_train", "GFLOP/img train", 1), ("achieved_tflops", "TFLOP/s", 1),
                              ("peak_tflops", "peak TFLOP/s", 0), ("mfu", "MFU", 3),
                              ("peak_mem_mib", "peak mem (MiB)", 0)])
    checks = [amp_check(n, m, args, device) for n in models for m in modes if m != "fp32"]
    print()
    common.print_table(checks, [("model", "model", 0), ("mode", "AMP", 0), ("loss_first", "loss step 1", 4),
                                ("loss_last_fp32", "last fp32", 4), ("loss_last_amp", "last AMP", 4),
                                ("loss_gap", "gap / initial", 4), ("skipped_steps", "skipped (fp16)", 0),
                                ("agreement", "labels = fp32", 4),
                                ("ok", "ok", 0)])
    payload = {"benchmark": "gpu", "machine": info, "settings": vars(args), "results": rows, "amp_checks": checks}
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
