"""Does ``precision: auto`` pick the fastest mode? Every candidate mode measured side by side, then the probe.

Per purpose (``--purposes train,infer``):

* ``train``: the trainer's full step (``common.make_train_case``: to_input, forward under autocast, Dice + CE,
  backward, fused Adam) at ``--batch`` x ``--size``; one freshly built model per mode (same seed).
* ``infer``: ``predict_probabilities`` (predict's batched forward) of ``--slices`` slices, ``--predict-batch``
  per forward, of the BN-folded network, as ``modalseg predict`` after ``load_models``.

The modes are ``precision_probe.candidate_precisions`` (CPU: fp32, fp32 + channels_last, bf16 + channels_last),
warmed up, then timed in ``--repeats`` interleaved rounds (the order rotates each round), median per mode. Before
that, ``choose_precision`` runs fresh (empty cache in a temporary folder) on a new model at the same input, as
``Trainer`` / ``predict`` would: the table reports its choice, the chosen mode's median relative to the fastest
(target: within 5 %) and the probe's own wall time.

    .venv/bin/python benchmarks/precision_auto.py --threads 2 --json precision_auto.json
    .venv/bin/python benchmarks/precision_auto.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
from modalseg.models.fold import fold_batch_norm  # noqa: E402
from modalseg.training.inference import predict_probabilities  # noqa: E402
from modalseg.training.precision import Precision  # noqa: E402
from modalseg.training.precision_probe import candidate_precisions, choose_precision, cpu_model_name  # noqa: E402
from modalseg.training.tasks import PairedLoss, UnpairedLoss  # noqa: E402

TARGET = 1.05  # the auto choice's time / the fastest mode's time


def _spec(args: argparse.Namespace) -> common.ModelSpec:
    torch.manual_seed(0)
    return common.build_model(args.model, width=args.width)


def _loss_module(spec: common.ModelSpec) -> torch.nn.Module:
    if spec.kind == "paired":
        return PairedLoss(spec.network, ce_weight=1.0)
    return UnpairedLoss(spec.network, "msbn", ce_weight=1.0, affinity_weight=0.0, kd_weight=0.0,
                        kd_temperature=2.0, conv_l2=0.0)


def _infer_setup(spec: common.ModelSpec, args: argparse.Namespace, p: Precision | None):
    """The folded eval network (prepared for ``p``), the slices and predict's ``modality`` argument."""
    net = spec.network.eval()
    fold_batch_norm(net)
    if p is not None:
        net = p.prepare_model(net).eval()
    m = spec.num_modalities if spec.kind == "paired" else 1
    images = np.random.default_rng(0).normal(size=(args.slices, m, args.size, args.size)).astype(np.float32)
    return net, images, None if spec.kind == "paired" else 0


def _callers(purpose: str, args: argparse.Namespace, modes: list[Precision]) -> dict[str, Any]:
    """One timed call per mode: a training step, or the prediction of all slices."""
    calls: dict[str, Any] = {}
    for p in modes:
        spec = _spec(args)
        if purpose == "train":
            calls[p.label] = common.make_train_case(spec, "fp32", args.batch, args.size, precision=p).step
        else:
            net, images, modality = _infer_setup(spec, args, p)
            calls[p.label] = (lambda net=net, images=images, modality=modality, p=p:
                              predict_probabilities(net, images, p, batch_size=args.predict_batch, modality=modality))
    return calls


def _auto(purpose: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """``choose_precision`` on a fresh model with an empty cache, timed."""
    spec = _spec(args)
    if purpose == "train":
        model: torch.nn.Module = _loss_module(spec)
        data = common.synthetic_batch(spec, args.batch, args.size)
        example: Any = data
        kwargs = None
    else:
        model, images, modality = _infer_setup(spec, args, None)
        example = (torch.from_numpy(images[: args.predict_batch]),)
        kwargs = None if modality is None else {"modality": modality}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        p, line = choose_precision(model, example, device, purpose, cache_path=Path(tmp) / "precision.json",
                                   budget_s=args.budget, model_name=args.model, forward_kwargs=kwargs)
        seconds = time.perf_counter() - t0
    return {"choice": p.label, "probe_s": seconds, "message": line}


def measure(purpose: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    auto = _auto(purpose, args, device)
    print(f"# {purpose}: {auto['message']}", flush=True)
    modes = candidate_precisions(device)
    calls = _callers(purpose, args, modes)
    for fn in calls.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {label: [] for label in calls}
    labels = list(calls)
    for r in range(args.repeats):
        k = r % len(labels)
        for label in labels[k:] + labels[:k]:
            for _ in range(max(1, args.steps)):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                calls[label]()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[label].append(time.perf_counter() - t0)
    medians = {label: statistics.median(t) for label, t in times.items()}
    fastest = min(medians, key=medians.get)
    per = args.batch if purpose == "train" else args.slices
    rows = [{
        "purpose": purpose, "mode": label, "median_s": medians[label], "min_s": min(times[label]),
        "img_per_s": per / medians[label], "vs_fastest": medians[label] / medians[fastest], "n": len(times[label]),
        "auto": "<- auto" if label == auto["choice"] else "",
    } for label in labels]
    auto["vs_fastest"] = medians[auto["choice"]] / medians[fastest]
    auto["fastest"] = fastest
    auto["within_target"] = auto["vs_fastest"] <= TARGET
    return {"rows": rows, "auto": auto, "times": times}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p, steps=1, warmup=1, size=256, batch=4)
    p.add_argument("--model", default="master_assistant", help="a model of common.ALL_MODELS")
    p.add_argument("--purposes", default="train,infer", help="train, infer or both (comma list)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds, every mode once per round")
    p.add_argument("--slices", type=int, default=16, help="infer: slices predicted per timed call")
    p.add_argument("--predict-batch", type=int, default=8, help="infer: slices per forward (predict's default)")
    p.add_argument("--budget", type=float, default=2.0, help="the probe's budget in seconds (default 2)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    args = common.apply_quick(p.parse_args(argv), p)
    if args.quick:
        args.repeats = min(args.repeats, 2)
        args.slices = min(args.slices, 4)
    common.set_threads(args.threads)
    device = torch.device(args.device)
    info = common.machine_info()
    common.print_machine(info)
    print(f"# CPU model name: {cpu_model_name()}; {args.model}, {args.size}x{args.size}, batch {args.batch}, "
          f"{args.repeats} interleaved rounds x {args.steps} call(s), budget {args.budget} s", flush=True)
    results = {}
    for purpose in [s.strip() for s in args.purposes.split(",") if s.strip()]:
        if purpose not in ("train", "infer"):
            raise SystemExit(f"unknown purpose {purpose!r}; choose train, infer")
        results[purpose] = measure(purpose, args, device)
    rows = [r for res in results.values() for r in res["rows"]]
    common.print_table(rows, [("purpose", "purpose", 0), ("mode", "mode", 0), ("median_s", "median s", 3),
                              ("min_s", "min s", 3), ("img_per_s", "img/s", 2), ("vs_fastest", "x fastest", 3),
                              ("n", "n", 0), ("auto", "auto", 0)])
    for purpose, res in results.items():
        a = res["auto"]
        verdict = "met" if a["within_target"] else "NOT met"
        print(f"# {purpose}: auto chose {a['choice']} = {a['vs_fastest']:.3f}x the fastest ({a['fastest']}); "
              f"target <= {TARGET:.2f}x {verdict}; probe took {a['probe_s']:.2f} s", flush=True)
    per_purpose = {k: {"rows": v["rows"], "auto": v["auto"], "times_s": v["times"]} for k, v in results.items()}
    payload = {"machine": info, "cpu_model_name": cpu_model_name(), "config": vars(args), "results": per_purpose}
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
