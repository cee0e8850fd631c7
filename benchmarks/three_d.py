"""3D networks side by side (issue 15): the 3D master-assistant network vs MONAI's 3D BasicUNet of similar size.

Two figures per (model, precision mode), measured in this one process, cases interleaved step by step (so load drift
hits every case alike; the ratio column divides by MONAI BasicUNet fp32 of the same run):

* **training patches/s**: the trainer's step (``TrainStep``: forward under autocast, Dice + CE, backward, Adam with
  AMSGrad) on batches of two-modality patches ``--patch`` (d, h, w);
* **sliding-window predict**: seconds for one two-modality volume ``--volume`` (d, h, w; default 64 x 128 x 128 =
  128 x 128 x 64 voxels in x, y, z) through ``SlidingWindowInferer`` (windows of ``--patch``, overlap 0.5,
  Gaussian blending: what ``modalseg predict`` runs for a 3D checkpoint).

The master-assistant network takes the two modalities as two streams (its SA block gates the assistant by the
master); MONAI's BasicUNet takes them as two input channels (early fusion, how MONAI users feed BraTS). The BasicUNet
width is chosen so that its parameter count is closest to the master-assistant network's.

    .venv/bin/python benchmarks/three_d.py --threads 2
    .venv/bin/python benchmarks/three_d.py --quick          # smoke test: seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from modalseg.inference.backends import TorchBackend  # noqa: E402
from modalseg.inference.inferers import SlidingWindowInferer  # noqa: E402
from modalseg.models import create_model  # noqa: E402
from modalseg.training.step import TrainStep  # noqa: E402
from modalseg.training.tasks import PairedLoss  # noqa: E402


def params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def master_assistant(width: int) -> nn.Module:
    return create_model("master_assistant", num_modalities=2, in_channels=1, num_classes=2, spatial_dims=3,
                        base_width=width)


def basic_unet(width: int) -> nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=3, in_channels=2, out_channels=2,
                     features=(width, 2 * width, 4 * width, 8 * width, 16 * width, width))


def matched_basic_unet(target: int) -> tuple[nn.Module, int]:
    """The BasicUNet whose parameter count is closest to ``target`` (first width 4..64)."""
    best = min(range(4, 65), key=lambda w: abs(params(basic_unet(w)) - target))
    return basic_unet(best), best


def make_case(name: str, net: nn.Module, mode: str, batch: int, patch: tuple[int, int, int]) -> dict[str, Any]:
    precision = common.precision_for(mode)
    module = precision.prepare_model(PairedLoss(net, ce_weight=1.0)).train()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4, amsgrad=True, fused=True)
    step = TrainStep(module, optimizer, precision)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 2, *patch, generator=g)
    zz, yy, xx = torch.meshgrid(*(torch.arange(n) for n in patch), indexing="ij")
    sphere = ((zz - patch[0] / 2) ** 2 + (yy - patch[1] / 2) ** 2 + (xx - patch[2] / 2) ** 2
              < (min(patch) / 4) ** 2).long()
    y = sphere.expand(batch, *patch).clone()
    return {"name": name, "mode": mode, "precision": precision, "module": module,
            "step": lambda: step(precision.to_input(x), y.to(precision.device)), "times": []}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=16, help="master_assistant base width (paper: 64)")
    p.add_argument("--patch", default="32,64,64", help="training patch and inference window d,h,w")
    p.add_argument("--volume", default="64,128,128", help="predicted volume d,h,w")
    p.add_argument("--batch", type=int, default=2, help="patches per training step (nnU-Net 3D: 2)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--predict-repeats", type=int, default=1)
    p.add_argument("--modes", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.patch, args.volume, args.steps, args.warmup = 4, "32,32,32", "36,40,40", 1, 0
    common.set_threads(args.threads)
    patch = tuple(int(v) for v in args.patch.split(","))
    volume = tuple(int(v) for v in args.volume.split(","))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    info = common.machine_info()
    common.print_machine(info)

    ma = master_assistant(args.width)
    bu, bu_width = matched_basic_unet(params(ma))
    nets = {"master_assistant": (ma, f"master_assistant 3D (width {args.width})"),
            "monai_basicunet": (bu, f"MONAI BasicUNet 3D (width {bu_width}, 2 input channels)")}
    print(f"parameters: master_assistant {params(ma):,}, BasicUNet {params(bu):,}; patch {'x'.join(map(str, patch))}"
          f", batch {args.batch}; predict volume {'x'.join(map(str, volume))} (d x h x w), windows of the patch, "
          "overlap 0.5, Gaussian")
    import copy

    cases = [make_case(name, copy.deepcopy(net), mode, args.batch, patch)
             for mode in modes for name, (net, _) in nets.items()]
    for c in cases:
        for _ in range(args.warmup):
            c["step"]()
    for _ in range(max(1, args.steps)):  # interleaved: step i of every case before step i + 1
        for c in cases:
            t0 = time.perf_counter()
            c["step"]()
            c["times"].append(time.perf_counter() - t0)
    rng = np.random.default_rng(0)
    slices = rng.normal(size=(volume[0], 2, volume[1], volume[2])).astype(np.float32)
    inferer = SlidingWindowInferer(patch, overlap=0.5, batch_size=2)
    for c in cases:
        c["predict"] = []
    for _ in range(max(1, args.predict_repeats)):
        for c in cases:
            backend = TorchBackend(c["module"].network, c["precision"])
            t0 = time.perf_counter()
            probs = inferer(backend, slices)
            c["predict"].append(time.perf_counter() - t0)
            assert probs.shape == (volume[0], 2, volume[1], volume[2])
            c["module"].train()
    base = next(c for c in cases if c["name"] == "monai_basicunet" and c["mode"] == "fp32")
    base_rate = args.batch / float(np.median(base["times"]))
    base_predict = float(np.median(base["predict"]))
    rows = []
    for c in cases:
        rate = args.batch / float(np.median(c["times"]))
        pred = float(np.median(c["predict"]))
        rows.append({"model": nets[c["name"]][1], "mode": c["precision"].short if hasattr(c["precision"], "short")
                     else c["precision"].label, "params": params(nets[c["name"]][0]), "step_s": float(
                         np.median(c["times"])), "patches_per_s": rate, "train_ratio": rate / base_rate,
                     "predict_s": pred, "predict_speedup": base_predict / pred})
    table = common.print_table(rows, [("model", "model", 0), ("mode", "mode", 0), ("params", "parameters", 0),
                                      ("step_s", "step s (median)", 2), ("patches_per_s", "patches/s", 3),
                                      ("train_ratio", "x BasicUNet fp32", 2), ("predict_s", "predict s", 1),
                                      ("predict_speedup", "predict x BasicUNet fp32", 2)])
    del table
    payload = {"machine": info, "args": vars(args), "rows": rows}
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
