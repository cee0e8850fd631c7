"""Does int8 keep the validation Dice? A trained master_assistant exported fp32 and int8 (one export per calibration
method, side by side), all predicting the fold's validation cases, scored against their labels (issue 17 item 4:
labels >= 99 % equal, Dice within 0.5 points).

Everything goes through the commands a user runs (synth, train, export, predict, evaluate) in a temporary folder.
Beside the fold's validation cases, ``--test-patients`` fresh synthetic patients (another seed: never trained on,
never calibrated on) are predicted by both exports, so that the Dice difference is measured on enough cases to mean
something; per-case Dice differences are reported too (int8 - fp32, mean and largest).

    .venv/bin/python benchmarks/int8_accuracy.py --patients 40 --size 64 --width 8 --epochs 15 --test-patients 48
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
    p.add_argument("--test-patients", type=int, default=24, help="fresh held-out patients (seed + 1000)")
    p.add_argument("--methods", default="auto,percentile,minmax", help="int8 calibration methods to compare")
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
        test = root / "test"
        call("synth", "breast", "--output", str(test), "--patients", str(args.test_patients), "--slices",
             str(args.slices), "--size", str(args.size), "--seed", str(args.seed + 1000))
        sets = {"validation": (cases, data), "held-out": (test / "imagesTr", test)}
        results: dict[str, dict] = {}
        chosen: dict[str, str] = {}
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        exports = [("fp32", [])] + [(f"int8 {m}", ["--int8", "--calibration-data", str(data), "--calibration-method",
                                                   m]) for m in methods]
        for name, extra in exports:
            export = root / f"export_{name.replace(' ', '_')}"
            call("export", "--model", str(run_dir / "fold_0"), "--output", str(export), "--checkpoint", "latest",
                 *extra)
            if extra:  # what the export's own check (slices it did not calibrate on) measured, per method tried
                report = json.loads((export / "model.json").read_text())["folds"][0]["graphs"][0]["int8"]
                tried = ", ".join(f"{m} {r['label_agreement']:.4%}" for m, r in report["methods"].items())
                print(f"{name}: calibrated with {report['calibration_method']} (check-slice label agreement: "
                      f"{tried})")
                chosen[name] = report["calibration_method"]
            for which, (images, dataset) in sets.items():
                pred = root / f"pred_{name.replace(' ', '_')}_{which}"
                call("predict", "--model", str(export), "--input", str(images), "--output", str(pred),
                     "--postprocess", "none")
                ev = root / f"eval_{name.replace(' ', '_')}_{which}"
                call("evaluate", "--pred", str(pred), "--labels", str(dataset / "labelsTr"), "--output", str(ev),
                     "--dataset", str(dataset))
                summary = json.loads((ev / "summary.json").read_text())
                per_case = {Path(c["prediction_file"]).name: float(np.nanmean([m["Dice"] for m in
                                                                                c["metrics"].values()]))
                            for c in summary["metric_per_case"]}
                results[f"{name}/{which}"] = {"dice": float(summary["foreground_mean"]["Dice"]), "pred": pred,
                                              "per_case": per_case}
        out: dict = {"val_cases": len(val), "test_cases": args.test_patients}
        for which, method in ((w, m) for w in sets for m in methods):
            fp32, int8 = results[f"fp32/{which}"], results[f"int8 {method}/{which}"]
            agree, total = 0, 0
            for f in sorted(fp32["pred"].glob("*.nii.gz")):
                a = read_volume(f, kind="label").array
                b = read_volume(int8["pred"] / f.name, kind="label").array
                agree += int((a == b).sum())
                total += a.size
            diffs = [100 * (int8["per_case"][k] - v) for k, v in fp32["per_case"].items()]
            out[f"{which}/{method}"] = {
                "method": method, "chosen": chosen.get(f"int8 {method}"), "cases": len(diffs),
                "dice_fp32": fp32["dice"], "dice_int8": int8["dice"],
                "dice_points": 100 * (int8["dice"] - fp32["dice"]),
                "case_points_mean_abs": float(np.mean(np.abs(diffs))) if diffs else float("nan"),
                "case_points_max_abs": float(np.max(np.abs(diffs))) if diffs else float("nan"),
                "labels_equal_pct": 100.0 * agree / max(total, 1)}
            r = out[f"{which}/{method}"]
            print(f"{which} cases {r['cases']}: Dice fp32 {r['dice_fp32']:.4f}, int8 {method} {r['dice_int8']:.4f} "
                  f"({r['dice_points']:+.2f} points; per case |int8 - fp32| mean {r['case_points_mean_abs']:.2f}, "
                  f"max {r['case_points_max_abs']:.2f} points); labels equal {r['labels_equal_pct']:.4f} %")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    run()
