"""Does int8 keep the validation Dice? A trained master_assistant exported fp32 and int8, both predicting the
fold's validation cases, scored against their labels (issue 17 item 4: labels >= 99 % equal, Dice within 0.5 points).

Everything goes through the commands a user runs (synth, train, export, predict, evaluate) in a temporary folder:

    .venv/bin/python benchmarks/int8_accuracy.py --patients 12 --size 64 --width 8 --epochs 15
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from modalseg.cli.main import main as modalseg
from modalseg.data.io import read_volume


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=12)
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args(argv)

    def call(*cmd: str) -> None:
        if modalseg(list(cmd)) != 0:
            raise SystemExit(f"failed: modalseg {' '.join(cmd)}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, run_dir = root / "breast", root / "run"
        call("synth", "breast", "--output", str(data), "--patients", str(args.patients), "--slices",
             str(args.slices), "--size", str(args.size), "--seed", str(args.seed))
        call("train", "--data", str(data), "--output", str(run_dir), "--model", "master_assistant", "--epochs",
             str(args.epochs), "--set", f"model_options={{base_width: {args.width}}}", "--set", "precision=fp32",
             "--set", "progress=false", "--set", "tensorboard=false", "--set", f"seed={args.seed}")
        val = json.loads((run_dir / "splits.json").read_text())[0]["val"]
        cases = root / "val_images"
        cases.mkdir()
        for image in sorted((data / "imagesTr").glob("*.nii.gz")):
            if image.name.rsplit("_", 1)[0] in val:
                shutil.copy(image, cases / image.name)
        results = {}
        for name, extra in (("fp32", []), ("int8", ["--int8", "--calibration-data", str(data)])):
            export = root / f"export_{name}"
            call("export", "--model", str(run_dir / "fold_0"), "--output", str(export), "--checkpoint", "latest",
                 *extra)
            pred = root / f"pred_{name}"
            call("predict", "--model", str(export), "--input", str(cases), "--output", str(pred), "--postprocess",
                 "none")
            call("evaluate", "--pred", str(pred), "--labels", str(data / "labelsTr"), "--output",
                 str(root / f"eval_{name}"), "--dataset", str(data))
            summary = json.loads((root / f"eval_{name}" / "summary.json").read_text())
            results[name] = {"dice": float(summary["foreground_mean"]["Dice"]), "pred": pred}
        agree, total = 0, 0
        for f in sorted(results["fp32"]["pred"].glob("*.nii.gz")):
            a = read_volume(f, kind="label").array
            b = read_volume(results["int8"]["pred"] / f.name, kind="label").array
            agree += int((a == b).sum())
            total += a.size
    out = {"val_cases": len(val), "dice_fp32": results["fp32"]["dice"], "dice_int8": results["int8"]["dice"],
           "dice_points": 100 * (results["int8"]["dice"] - results["fp32"]["dice"]),
           "labels_equal_pct": 100.0 * agree / max(total, 1)}
    print(f"validation cases {out['val_cases']}: Dice fp32 {out['dice_fp32']:.4f}, int8 {out['dice_int8']:.4f} "
          f"({out['dice_points']:+.2f} points); labels equal {out['labels_equal_pct']:.4f} %")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    run()
