"""Where does fp32 inference lose to the dense peak? One batch of ``modalseg predict``'s network forward, profiled.

Issue 17 asks for fp32 predict within 1.1x of FLOPs / measured fp32 peak. This script splits one forward of the
network predict runs (master_assistant at the paper's width, BN folded as ``load_models`` does, fp32 NCHW or
channels_last, batch 8 of 256x256 two-modality slices) by operator with ``torch.profiler``, and reports:

* the dense peak (the best of five 4096 x 4096 fp32 matrix products, the same threads): what 1.0x means;
* per operator type: self time and share of the forward;
* the convolutions alone: their FLOPs (``torch.utils.flop_counter``) over their own time, against the peak;
* the bound: the forward if every non-convolution operator took no time (fused away), as x FLOPs / peak. If even
  that is above 1.1x, no fusion of the memory-bound operators (ReLU, concatenation, upsampling, pooling, the SA
  blocks' products) can reach the target with these convolution kernels;
* alternatives to eager mode measured in the same run: TorchScript freezing (``torch.jit.freeze`` +
  ``optimize_for_inference``: oneDNN weight prepacking, conv + ReLU fusion) and, with ``--compile``, torch.compile
  with Inductor's freezing (its compile time is printed: a cost every predict process pays).

    .venv/bin/python benchmarks/fp32_gap.py --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from inference import master_assistant_meta  # noqa: E402


def build(size: int, width: int | None, channels_last: bool) -> torch.nn.Module:
    """The network ``benchmarks/deploy.py`` predicts with (inference.master_assistant_meta), BN folded."""
    from modalseg.models.fold import fold_batch_norm
    from modalseg.training.tasks import build_network

    torch.manual_seed(0)
    network = build_network(master_assistant_meta(size, width)).eval()
    fold_batch_norm(network)
    return network.to(memory_format=torch.channels_last) if channels_last else network


def best_time(fn: Any, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        fn(x)  # warm-up (oneDNN primitive creation)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return min(times)


def profile_ops(network: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Self CPU seconds per operator name over one forward."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        network(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            network(x)
    out: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.self_cpu_time_total > 0:
            out[event.key] += event.self_cpu_time_total / 1e6
    return dict(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="slices per forward (predict's default 8)")
    p.add_argument("--width", type=int, default=None, help="base width (default: the paper's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile with Inductor freezing")
    p.add_argument("--quick", action="store_true", help="smoke test: 32x32, width 4, batch 2")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.width, args.batch, args.repeats = 32, 4, 2, 1
    common.set_threads(args.threads)
    info = common.machine_info()
    common.print_machine(info)
    peak = common.dense_peak_gflops(torch.float32, 1024 if args.quick else 4096)
    print(f"# measured dense fp32 peak: {peak:.0f} GFLOP/s (torch {torch.get_num_threads()} threads)")
    rows: list[dict[str, Any]] = []
    payload: dict[str, Any] = {"benchmark": "fp32_gap", "machine": info, "settings": vars(args), "peak_gflops": peak}
    for channels_last in (False, True):
        layout = "channels_last" if channels_last else "NCHW"
        network = build(args.size, args.width, channels_last)
        x = torch.randn(args.batch, 2, args.size, args.size)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        flops = common.network_forward_flops(network, x)
        ideal = flops / (peak * 1e9)
        ops = profile_ops(network, x)
        total = sum(ops.values())
        conv = sum(v for k, v in ops.items() if "conv" in k)
        eager = best_time(network, x, args.repeats)
        print(f"\n## fp32 {layout}: {flops / 1e9:.0f} GFLOP per forward of {args.batch} slices; eager "
              f"{eager:.3f} s = {flops / eager / 1e9:.0f} GFLOP/s = {eager / ideal:.2f}x FLOPs / peak")
        print("| operator | self time (ms) | share |")
        print("|---|---|---|")
        for name, seconds in sorted(ops.items(), key=lambda kv: -kv[1])[:8]:
            print(f"| {name} | {1e3 * seconds:.1f} | {100 * seconds / total:.1f} % |")
        print(f"convolutions: {conv / total:.1%} of the profiled forward, {flops / conv / 1e9:.0f} GFLOP/s = "
              f"{flops / conv / 1e9 / peak:.1%} of the peak; bound with every other operator fused away: "
              f"{conv / ideal:.2f}x FLOPs / peak")
        row = {"layout": layout, "gflop": flops / 1e9, "eager_s": eager, "eager_x_ideal": eager / ideal,
               "conv_share": conv / total, "conv_pct_peak": flops / conv / 1e9 / peak, "bound_x_ideal": conv / ideal,
               "ops_s": ops}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with torch.no_grad():
                    t0 = time.perf_counter()
                    frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(network, x[:1])))
                    prep = time.perf_counter() - t0
                jit = best_time(frozen, x, args.repeats)
                print(f"TorchScript freeze + optimize_for_inference: {jit:.3f} s = {jit / ideal:.2f}x FLOPs / peak "
                      f"({eager / jit:.2f}x eager; preparation {prep:.1f} s)")
                row.update(jit_s=jit, jit_x_ideal=jit / ideal, jit_prep_s=prep)
            except Exception as exc:  # noqa: BLE001 - a measurement, not a feature
                print(f"TorchScript freeze: failed ({type(exc).__name__}: {str(exc)[:120]})")
            if args.compile:
                import torch._inductor.config as inductor_config

                inductor_config.freezing = True
                torch._dynamo.reset()
                compiled = torch.compile(network)
                with torch.no_grad():
                    t0 = time.perf_counter()
                    compiled(x)
                    prep = time.perf_counter() - t0
                fast = best_time(compiled, x, args.repeats)
                print(f"torch.compile (Inductor, freezing): {fast:.3f} s = {fast / ideal:.2f}x FLOPs / peak "
                      f"({eager / fast:.2f}x eager; first call with compilation {prep:.1f} s)")
                row.update(compile_s=fast, compile_x_ideal=fast / ideal, compile_prep_s=prep)
        rows.append(row)
    payload["results"] = rows
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
