"""``modalseg export``: trained models -> ONNX graphs (softmax probabilities) and a JSON model card, for runtimes
without PyTorch (``python -m modalseg.deploy.runtime``, ONNX Runtime, OpenVINO); see docs/deployment.md."""

from __future__ import annotations

import argparse
import time

HELP = "export trained models (every fold of a run) to ONNX with a JSON model card (model.json)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a run folder (every fold_K), a fold folder or a checkpoint file")
    p.add_argument("--output", required=True, help="the export folder to write (new, or without another export)")
    p.add_argument("--format", default="onnx", help="onnx (the only format so far)")
    p.add_argument("--checkpoint", default="best",
                   help="best: best.pt by validation (latest.pt where a fold has none); latest: the final weights")
    p.add_argument("--int8", action="store_true",
                   help="also quantize every graph to int8 (ONNX Runtime static post-training quantization, "
                        "calibrated on --calibration-data); off by default")
    p.add_argument("--calibration-data",
                   help="with --int8: the training dataset whose slices calibrate the quantization")
    p.add_argument("--calibration-slices", default=64,
                   help="with --int8: slices used for calibration (default 64; as many other slices check it)")
    p.add_argument("--calibration-method", default=None,
                   help="with --int8: activation ranges from the 99.99th percentile of the calibration values "
                        "(percentile), their full range (minmax), or auto (the default): both, keeping the graph "
                        "that agrees best with fp32 on other training slices")


def run(args: argparse.Namespace) -> int:
    from modalseg.errors import ConfigError
    from modalseg.training.checkpoint import CHECKPOINT_CHOICES
    from modalseg.training.config import cli_int

    if args.checkpoint not in CHECKPOINT_CHOICES:
        raise ConfigError(f"--checkpoint must be best or latest, got {args.checkpoint!r}")
    slices = cli_int("--calibration-slices", args.calibration_slices, minimum=1)
    if args.int8 and not args.calibration_data:
        raise ConfigError("--int8 needs --calibration-data DATASET (the training data whose slices calibrate it)")
    if args.calibration_data and not args.int8:
        raise ConfigError("--calibration-data is for --int8; add --int8 or leave it out")
    if args.calibration_method is not None and not args.int8:
        raise ConfigError("--calibration-method is for --int8; add --int8 or leave it out")
    from modalseg.deploy.export import export_run
    from modalseg.deploy.quantize import CALIBRATION_METHODS

    method = args.calibration_method or CALIBRATION_METHODS[0]

    t0 = time.perf_counter()
    card = export_run(args.model, args.output, which=args.checkpoint, fmt=args.format,
                      int8_calibration=args.calibration_data if args.int8 else None, calibration_slices=slices,
                      calibration_method=method)
    print(f"done: export written to {card.parent} (model card {card.name}) in {time.perf_counter() - t0:.1f} s")
    return 0
