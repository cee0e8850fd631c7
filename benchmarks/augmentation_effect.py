"""Does augmentation help when training patients are few? master_assistant trained on 6 patients with
``augmentation: off`` and ``augmentation: medium``, scored on 14 held-out patients (issue 16, item 6).

The split is written as the run's ``splits.json`` before training (fold 0: 6 training patients, the other 14
validate; every run and seed uses the same patients), so the held-out figure averages more patients than were
trained on. Both arms get the same budget (epochs, batch, lr, widths); only ``augmentation`` differs. Each run is
scored with its final weights (``latest.pt``) by the robustness table's "none removed" row (training/robustness.py:
per-patient volume Dice on the validation patients, as ``modalseg predict`` + ``modalseg evaluate`` score it).
Dice is the mean over the held-out patients per seed, then mean ± s.d. over seeds; the paired difference
(medium - off, same seed) is reported too.

    .venv/bin/python benchmarks/augmentation_effect.py --threads 1      # about 15 min on one Xeon core
    .venv/bin/python benchmarks/augmentation_effect.py --quick          # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from missing_modality import add_budget_arguments, call, machine, mean_sd, score, train  # noqa: E402

ARMS = ("off", "medium")


def write_split(run: Path, patients: list[str], n_train: int) -> dict[str, list[str]]:
    """``<run>/splits.json`` with fold 0 = the first ``n_train`` patients for training, the rest validating (a
    second fold, the reverse, only completes the two-fold file that ``folds: 2`` asks for)."""
    train_p, val_p = sorted(patients[:n_train]), sorted(patients[n_train:])
    run.mkdir(parents=True, exist_ok=True)
    splits = [{"train": train_p, "val": val_p}, {"train": val_p, "val": train_p}]
    (run / "splits.json").write_text(json.dumps(splits, indent=2))
    return splits[0]


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-patients", type=int, default=6)
    p.add_argument("--val-patients", type=int, default=14)
    add_budget_arguments(p, epochs=60, epochs_help="epochs of the 6 patients' slices (9 steps each)")
    args = p.parse_args(argv)
    if args.quick:
        args.train_patients, args.val_patients, args.slices, args.size = 2, 2, 2, 32
        args.epochs, args.width, args.seeds = 1, 4, "0"
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    import torch

    torch.set_num_threads(args.threads)
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/augmentation_effect.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    patients = args.train_patients + args.val_patients
    steps = -(-args.train_patients * args.slices // 4)
    budget = (f"{patients} synthetic breast patients x {args.slices} slices at {args.size}x{args.size} (modalseg "
              f"synth breast, seed {args.data_seed}): {args.train_patients} train, {args.val_patients} held out; "
              f"master_assistant base_width {args.width}; {args.epochs} epochs x {steps} steps (batch 4, "
              f"{args.epochs * steps} steps), Adam lr {args.lr:g}, default preset, fp32, {args.threads} thread(s); "
              f"final weights (latest.pt); seeds {', '.join(map(str, seeds))}; augmentation off vs medium")
    print(f"budget: {budget}", flush=True)
    started = time.perf_counter()
    dice: dict[str, list[float]] = {a: [] for a in ARMS}
    with tempfile.TemporaryDirectory(prefix="augmentation-effect-") as tmp:
        root = Path(tmp)
        data = root / "breast"
        call("synth", "breast", "--output", str(data), "--patients", str(patients), "--slices", str(args.slices),
             "--size", str(args.size), "--seed", str(args.data_seed))
        from modalseg.data.layouts import load_dataset

        ids = sorted({c.patient_id for c in load_dataset(data).cases})
        n_val = 0
        for seed in seeds:
            for arm in ARMS:
                t0 = time.perf_counter()
                out = root / f"{arm}_s{seed}"
                split = write_split(out, ids, args.train_patients)
                fold = train(data, out, model="master_assistant", width=args.width, epochs=args.epochs, seed=seed,
                             threads=args.threads, lr=args.lr, size=args.size, folds=2,
                             extra=["--set", f"augmentation={arm}"])
                scores = score(fold, data, ["none"])["none"]
                n_val = scores["n"]
                assert n_val == len(split["val"]), (n_val, split)
                dice[arm].append(scores["dice"])
                print(f"seed {seed} augmentation {arm}: held-out Dice {scores['dice']:.1f} % over {n_val} patients "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    elapsed = time.perf_counter() - started
    diffs = [m - o for m, o in zip(dice["medium"], dice["off"], strict=True)]
    lines = ["| augmentation | held-out Dice (%) | per seed |", "|---|---|---|"]
    for arm in ARMS:
        lines.append(f"| {arm} | {mean_sd(dice[arm])} | {', '.join(f'{v:.1f}' for v in dice[arm])} |")
    lines.append(f"| medium - off (same seed) | {mean_sd(diffs)} | {', '.join(f'{v:+.1f}' for v in diffs)} |")
    table = "\n".join(lines)
    print()
    print(f"Volume Dice per held-out patient ({n_val} patients), mean over patients per seed, mean ± s.d. over "
          f"{len(seeds)} seed(s); {machine()}; {elapsed / 60:.1f} min")
    print()
    print(table)
    print()
    print(f"command: {command}")
    out = {"budget": budget, "command": command, "table": table, "dice": dice, "difference": diffs,
           "elapsed_s": elapsed, "machine": machine(), "val_patients": n_val}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    run()
