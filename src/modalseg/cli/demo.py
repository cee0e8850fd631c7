"""``modalseg demo``: the full tour on built-in synthetic data, on a CPU in a few minutes.

synth -> verify -> train the master-assistant network and a single-modality U-Net (short budget, fold 0)
-> evaluate on the held-out patients -> predict one held-out case from its NIfTI files -> tables + figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

HELP = "run the full tour on built-in synthetic data (synth, verify, train, evaluate, predict, figures)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="demo_output", help="output folder (default: demo_output)")
    p.add_argument("--epochs", type=int, default=12, help="training epochs per model (default 12)")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="learning rate (default 3e-3: the paper's 1e-4 needs far more epochs than a demo has)")
    p.add_argument("--size", type=int, default=96, help="image size of the synthetic data and the network input")
    p.add_argument("--width", type=int, default=8,
                   help="base width of the master-assistant streams; the U-Net gets twice (paper: 32 / 64)")
    p.add_argument("--patients", type=int, default=10, help="synthetic patients")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo output folder")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from modalseg.data.io import read_volume
    from modalseg.data.layouts import load_dataset
    from modalseg.data.synth import make_breast_dataset
    from modalseg.data.verify import check_dataset
    from modalseg.evaluation.figures import plot_attention_maps, plot_overlays
    from modalseg.evaluation.tables import write_table
    from modalseg.training.config import TrainConfig
    from modalseg.training.engine import Trainer
    from modalseg.training.evaluate import evaluate_trainer
    from modalseg.training.evaluate_folder import evaluate_folders
    from modalseg.training.predict import find_cases, load_models, predict_case, write_prediction
    from modalseg.utils.atomic import atomic_write_text

    out = Path(args.output)
    t_start = time.perf_counter()
    data = out / "data" / "SynthBreast"
    print(f"[1/6] synthesising a paired T1C + T2W breast-like dataset -> {data}")
    if not (data / "dataset.json").exists():
        make_breast_dataset(data, num_patients=args.patients, slices=6, size=args.size, seed=args.seed,
                            overwrite=args.overwrite)
    spec = load_dataset(data)
    report = check_dataset(spec)
    print(f"[2/6] verify: {report.num_cases} cases, modalities {spec.modalities}, labels {spec.labels}: OK")

    base = TrainConfig(
        data=str(data), output=str(out / "runs"), epochs=args.epochs, folds=5, fold=0, seed=args.seed,
        preprocess="paper1", preprocess_options={"target_size": [args.size, args.size]},
        model_options={"base_width": args.width, "sa_reduction": 4}, progress=True, lr=args.lr,
    )
    rows, trainers = [], {}
    for model in ["master_assistant", "unet"]:
        # the paper's width ratio: the U-Net is twice as wide as the half-width fusion streams
        width = args.width if model == "master_assistant" else 2 * args.width
        cfg = dataclasses.replace(base, model=model, output=str(out / "runs" / model),
                                  model_options={**base.model_options, "base_width": width})
        print(f"[3/6] training {model} (fold 0 of 5, {args.epochs} epochs, base width {width}) ...")
        t0 = time.perf_counter()
        trainer = Trainer(cfg, overwrite=True)  # the demo's own runs: a re-run of the demo replaces them
        trainer.fit()
        result = evaluate_trainer(trainer)
        trainers[model] = trainer
        for row in result["validation"]:
            rows.append({"model": model, "modalities": "+".join(trainer.meta.modalities), **row,
                         "train_s": round(time.perf_counter() - t0, 1)})
    write_table(rows, ["model", "modalities", "class_name", "dice_mean", "hd_mean", "hd95_mean", "train_s"],
                out / "results.md", out / "results.csv", title="Demo: validation patients of fold 0 (per patient, 3D)")
    print(f"[4/6] results table -> {out / 'results.md'}")
    for r in rows:
        print(f"      {r['model']:>16s} ({r['modalities']}): Dice {r['dice_mean']:.3f}  HD {r['hd_mean']:.1f} mm")

    ma = trainers["master_assistant"]
    case = ma.split["val"][0]
    case_files = next(c for c in spec.cases if c.patient_id == case)
    pred_dir = out / "predictions"
    models = load_models([ma.run_dir], ma.precision)
    cases = find_cases(list(case_files.images), models[0].meta)
    for name, files in cases.items():
        labels, _, ref = predict_case(models, files)
        written = write_prediction(pred_dir, name, labels, None, ref, list(models[0].meta.labels))
        print(f"[5/6] predicted {name} from its NIfTI files -> {written[0]}")
    label_dir = out / "predictions_reference"
    label_dir.mkdir(parents=True, exist_ok=True)
    ref_label = read_volume(case_files.label, kind="label")
    from modalseg.data.io import write_volume

    write_volume(label_dir / f"{next(iter(cases))}.nii.gz", ref_label.array.astype(np.uint8), ref_label)
    summary = evaluate_folders(pred_dir, label_dir, out / "predictions_eval", dataset=data)
    print(f"      evaluate: Dice {summary[0]['dice_mean']:.3f} on the predicted volume -> {out / 'predictions_eval'}")

    figures = _figures(trainers, out, plot_overlays, plot_attention_maps)
    for f in figures:
        print(f"[6/6] figure -> {f}")
    print(f"done in {time.perf_counter() - t_start:.0f} s; everything is under {out}/")
    atomic_write_text(out / "demo_summary.json", json.dumps({"results": rows}, indent=2, default=str))
    return 0


def _figures(trainers, out: Path, plot_overlays, plot_attention_maps) -> list[Path]:
    """Fig. 4-style overlays (both models on validation slices) and Fig. 5-style SA maps."""
    import numpy as np
    import torch

    from modalseg.models import attention_maps
    from modalseg.training.inference import predict_probabilities

    ma = trainers["master_assistant"]
    cache = ma.cache
    idx = ma.task.groups("val")["all"]
    fg = [i for i in idx if cache.labels[i].any()]
    chosen = (fg or list(idx))[:3]
    examples = []
    for i in chosen:
        preds = {}
        for name, tr in trainers.items():
            images, modality = tr.task.inputs("all", np.array([i]))
            preds[name] = predict_probabilities(tr.network, images, tr.precision, modality=modality).argmax(1)[0]
        # Dice (%) in the corner is computed by plot_overlays from the masks
        examples.append({"image": np.asarray(cache.images[i, 0]), "gt": np.asarray(cache.labels[i]),
                         "preds": preds})
    paths = [plot_overlays(examples, out / "figures" / "overlays.png")]
    net = ma.network
    net.eval()
    with torch.no_grad():
        images, _ = ma.task.inputs("all", np.array([chosen[0]]))
        _, features = net.forward_features(ma.precision.to_input(torch.as_tensor(np.asarray(images))))
    maps = {k: [m[0, 0].float().cpu().numpy() for m in v] for k, v in attention_maps(features).items()}
    names = dict(zip(["master", "assistant1"], ma.meta.modalities, strict=False))
    maps = {names.get(k, k): v for k, v in maps.items()}
    paths.append(plot_attention_maps(maps, out / "figures" / "attention_maps.png", title="master_assistant SA maps"))
    return paths
