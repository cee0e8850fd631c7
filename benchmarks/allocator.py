"""Before/after of keeping freed memory in the heap (``utils/host_memory.py``): training and prediction.

The setting is process-wide and is applied when a process starts, so each measurement is a child process
(``train_throughput.py`` / ``inference.py`` of this folder) run with ``MODALSEG_MALLOC=default`` (glibc's
defaults: blocks above the dynamic mmap threshold, at most 32 MiB, are mmap'ed and unmapped on every free)
or without it (the project's default: mmap/trim thresholds 1 GiB). Settings alternate within each round
(default, kept, default, kept, ...) so both see the same machine load. Reported per workload: the child's
figure (img/s or predict seconds), its user and system CPU seconds (``RUSAGE_CHILDREN``), and the ratio.

    .venv/bin/python benchmarks/allocator.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SETTINGS = ("default", "keep-freed")


def run_child(script: str, args: list[str], setting: str) -> dict[str, Any]:
    """Run ``script`` with ``args`` (+ ``--json``) under ``setting``; its JSON payload and CPU times."""
    env = dict(os.environ)
    env.pop("MODALSEG_MALLOC", None)
    if setting == "default":
        env["MODALSEG_MALLOC"] = "default"
    with tempfile.TemporaryDirectory(prefix="modalseg_bench_alloc_") as tmp:
        out = Path(tmp) / "result.json"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run([sys.executable, str(common.BENCH_DIR / script), *args, "--json", str(out)],
                              env=env, capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0 or not out.is_file():
            raise SystemExit(f"{script} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        payload = json.loads(out.read_text())
    payload["cpu_user_s"] = after.ru_utime - before.ru_utime
    payload["cpu_sys_s"] = after.ru_stime - before.ru_stime
    expected = "glibc default" if setting == "default" else "keep-freed"
    if not payload["machine"]["malloc"].startswith(expected):
        raise SystemExit(f"child ran with malloc {payload['machine']['malloc']!r}, expected {expected!r}")
    return payload


def workloads(args: argparse.Namespace) -> list[tuple[str, str, list[str], str]]:
    """(name, script, arguments, metric): the issue's training comparison and the predict target."""
    common_train = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--size", str(args.size),
                    "--batch", str(args.batch)]
    if args.threads:
        common_train += ["--threads", str(args.threads)]
    if args.width:
        common_train += ["--width", str(args.width)]
    inference = ["--modes", "bf16", "--size", str(args.size), "--slices", str(args.slices)]
    if args.threads:
        inference += ["--threads", str(args.threads)]
    if args.width:
        inference += ["--width", str(args.width)]
    return [
        ("train master_assistant bf16+CL", "train_throughput.py",
         ["--models", "master_assistant", "--modes", "bf16", *common_train], "img_per_s"),
        ("train MONAI BasicUNet fp32", "train_throughput.py",
         ["--models", "monai_basicunet", "--modes", "fp32", *common_train], "img_per_s"),
        (f"predict {args.size}x{args.size}x{args.slices} bf16+CL", "inference.py", inference, "total_s"),
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="measurements per setting, alternating (median)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per child (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up training steps per child (default 2)")
    p.add_argument("--size", type=int, default=256, help="image side (default 256)")
    p.add_argument("--batch", type=int, default=4, help="training batch (default 4)")
    p.add_argument("--slices", type=int, default=100, help="slices of the predicted volume (default 100)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the children")
    p.add_argument("--width", type=int, default=None, help="first-level width override (smoke tests)")
    p.add_argument("--only", default=None, help="comma list of workload numbers to run (1 train MA, 2 train "
                                                "BasicUNet, 3 predict; default all)")
    p.add_argument("--quick", action="store_true", help="smoke test: 32 px, 4 slices, width 4, 1 round")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.slices, args.width, args.steps, args.warmup, args.batch = 32, 4, 4, 2, 1, 2
        args.rounds, args.threads = 1, args.threads or 1
    info = common.machine_info()
    common.print_machine(info)
    chosen = workloads(args)
    if args.only:
        keep = {int(k) for k in args.only.split(",")}
        chosen = [w for i, w in enumerate(chosen, 1) if i in keep]
    rows = []
    for name, script, wargs, metric in chosen:
        results: dict[str, list[dict[str, Any]]] = {s: [] for s in SETTINGS}
        for _ in range(max(1, args.rounds)):
            for setting in SETTINGS:
                payload = run_child(script, wargs, setting)
                r = payload["results"][0]
                results[setting].append({"value": r[metric], "user": payload["cpu_user_s"],
                                         "sys": payload["cpu_sys_s"]})
                print(f"#   {name:34s} {setting:10s} {metric} {r[metric]:.3f}  (child user "
                      f"{payload['cpu_user_s']:.1f} s, sys {payload['cpu_sys_s']:.1f} s)", flush=True)
        for setting in SETTINGS:
            rs = results[setting]
            rows.append({"workload": name, "malloc": setting, "metric": metric,
                         "value": statistics.median(x["value"] for x in rs),
                         "cpu_user_s": statistics.median(x["user"] for x in rs),
                         "cpu_sys_s": statistics.median(x["sys"] for x in rs)})
        base, kept = rows[-2], rows[-1]
        # speed-up: img/s grows, seconds shrink
        speedup = kept["value"] / base["value"] if metric == "img_per_s" else base["value"] / kept["value"]
        base["speedup"], kept["speedup"] = 1.0, speedup
    print()
    common.print_table(rows, [("workload", "workload", 0), ("malloc", "malloc", 0), ("metric", "metric", 0),
                              ("value", "value", 3), ("speedup", "speed-up", 2),
                              ("cpu_user_s", "child user CPU (s)", 1), ("cpu_sys_s", "child sys CPU (s)", 1)])
    payload = {"benchmark": "allocator", "machine": info, "settings": vars(args), "results": rows}
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
