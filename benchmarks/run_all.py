"""Run every benchmark in turn (one process); ``--quick`` for a smoke test at tiny sizes (about a minute).

    .venv/bin/python benchmarks/run_all.py --quick
    .venv/bin/python benchmarks/run_all.py --threads 2 --json-dir bench_results      # full suite (hours)

Each script's results go to ``--json-dir/<name>.json`` when given; a failure in one script is reported and
the others still run (the exit status is non-zero if any failed).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import allocator  # noqa: E402
import data_pipeline  # noqa: E402
import flops  # noqa: E402
import inference  # noqa: E402
import scaling  # noqa: E402
import train_throughput  # noqa: E402

#: name -> (module, extra arguments of the full suite)
SUITE: dict[str, tuple[Any, list[str]]] = {
    "train_throughput": (train_throughput, ["--models", "all", "--modes", "fp32,bf16"]),
    "inference": (inference, ["--cli"]),
    "data_pipeline": (data_pipeline, []),
    "scaling": (scaling, []),
    "flops": (flops, ["--models", "all", "--no-timing"]),
    "allocator": (allocator, []),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 steps: a smoke test")
    p.add_argument("--threads", type=int, default=None, help="torch threads for every script")
    p.add_argument("--only", default=None, help=f"comma list of scripts (default all: {', '.join(SUITE)})")
    p.add_argument("--json-dir", default=None, help="write <script>.json here")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(SUITE)
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        raise SystemExit(f"unknown script(s) {unknown}; choose from {', '.join(SUITE)}")
    failed = []
    for name in names:
        module, extra = SUITE[name]
        argv_i = list(extra)
        if args.quick:
            argv_i.append("--quick")
        if args.threads:
            argv_i += ["--threads", str(args.threads)]
        if args.json_dir:
            Path(args.json_dir).mkdir(parents=True, exist_ok=True)
            argv_i += ["--json", str(Path(args.json_dir) / f"{name}.json")]
        print(f"\n======== {name} {' '.join(argv_i)}", flush=True)
        t0 = time.perf_counter()
        try:
            module.main(argv_i)
        except (Exception, SystemExit):  # noqa: BLE001 - report and go on with the other scripts
            traceback.print_exc()
            failed.append(name)
        print(f"======== {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
