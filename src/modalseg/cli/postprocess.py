"""``modalseg postprocess --determine RUN``: choose post-processing on RUN's cross-validation predictions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "choose post-processing (largest connected component per class) by cross-validation Dice"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--determine", required=True, metavar="RUN",
                   help="a run folder with fold_K/ checkpoints and splits.json (the training's --output)")
    p.add_argument("--checkpoint", default="latest", choices=["latest", "best"],
                   help="weights of each fold (default latest: the final weights, as nnU-Net)")
    p.add_argument("--operation", default="largest-component", help="largest-component (default) or min-size=N")
    p.epilog = "example: modalseg postprocess --determine runs/breast; predict --model runs/breast applies it"


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from modalseg.data.io import read_volume
    from modalseg.data.layouts import load_dataset
    from modalseg.errors import ConfigError
    from modalseg.inference.postprocess import POSTPROCESSING_FILE, determine, parse_operation
    from modalseg.inference.predictor import Predictor
    from modalseg.training.config import load_config
    from modalseg.utils.atomic import atomic_write_text

    parse_operation(args.operation)
    run_dir = Path(args.determine)
    splits_path = run_dir / "splits.json"
    if not splits_path.is_file():
        raise ConfigError("no splits.json: not a cross-validation run folder (train with --fold cv)", run_dir)
    splits = json.loads(splits_path.read_text())
    folds = sorted((p for p in run_dir.glob("fold_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    if not folds:
        raise ConfigError("no fold_K/ folders to take cross-validation predictions from", run_dir)
    pairs = []
    label_values: list[int] = []
    for fold_dir in folds:
        k = int(fold_dir.name[5:])
        config = fold_dir / "config.yaml"
        if not config.is_file():
            raise ConfigError("has no config.yaml (the training's options)", fold_dir)
        cfg = load_config(config)
        spec = load_dataset(cfg.data, cfg.layout)
        if k >= len(splits):
            raise ConfigError(f"fold {k} is not in splits.json ({len(splits)} folds)", splits_path)
        val_patients = set(splits[k]["val"])
        predictor = Predictor.from_checkpoints([fold_dir], which=args.checkpoint)
        if predictor.meta.regions is not None:
            raise ConfigError("post-processing by connected components is not decided for region-based models yet "
                              "(their labels are painted nested regions)", fold_dir)
        label_values = list(predictor.meta.labels.values())
        cases = [c for c in spec.cases if c.patient_id in val_patients and c.label is not None]
        for case in cases:
            files = list(case.images)
            if predictor.meta.kind == "paired":  # the model's channels, in its order (master first)
                files = [case.images[spec.modalities.index(m)] for m in predictor.meta.modalities]
            result = predictor.predict_files(files, modality=case.modality, case=case.case_id)
            reference = read_volume(case.label, kind="label").array
            labels = result.labels
            if spec.ignore_label is not None:  # nnU-Net's ignore voxels are scored nowhere
                unknown = reference == spec.ignore_label
                labels, reference = np.where(unknown, 0, labels), np.where(unknown, 0, reference)
            pairs.append((labels, reference))
        print(f"fold {k}: {len(cases)} validation case(s) predicted", flush=True)
    if not pairs:
        raise ConfigError("no validation case with a label file in any fold", run_dir)
    decision, rows = determine(pairs, label_values, args.operation)
    for row in rows:
        verdict = "kept" if row["kept"] else "not kept"
        print(f"label {row['label']}: {row['operation']} mean Dice {row['dice_before']:.4f} -> "
              f"{row['dice_after']:.4f} ({verdict})")
    out = run_dir / POSTPROCESSING_FILE
    atomic_write_text(out, json.dumps({**decision.to_dict(), "cases": len(pairs), "decisions": rows}, indent=2))
    print(f"{out}: {decision.describe()} (applied by modalseg predict --model {run_dir})")
    return 0
