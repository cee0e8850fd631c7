"""DDP under torchrun on CPU (gloo): two processes with the same global batch reach the single-process weights."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from modalseg.cli.main import main
from modalseg.training.checkpoint import load_checkpoint
from modalseg.training.tasks import ModelMeta, build_network


def single_and_torchrun(common: list[str], tmp_path) -> tuple[dict, dict]:
    """Train ``common`` in this process (``tmp_path/single``) and under torchrun with two gloo processes
    (``tmp_path/ddp``); the two ``latest.pt`` states."""
    assert main([*common, "--output", str(tmp_path / "single")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "modalseg.cli.main", *common, "--output", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (load_checkpoint(tmp_path / "single" / "fold_0" / "latest.pt"),
            load_checkpoint(tmp_path / "ddp" / "fold_0" / "latest.pt"))


def test_torchrun_two_processes_equal_single_process(breast_dataset, tmp_path):
    # Per-image normalisation (GroupNorm): plain BatchNorm would use per-rank batch statistics under DDP on CPU.
    common = ["train", "--data", str(breast_dataset), "--model", "unet", "--seed", "7", "--epochs", "2",
              "--set", "model_options={base_width: 4, norm: group}", "--set", "batch_size=4",
              "--set", "preprocess_options={target_size: [32, 32]}", "--set", "precision=fp32",
              "--set", "progress=false", "--set", "tensorboard=false", "--set", "num_threads=1",
              "--set", "foreground_fraction=0",
              # DDP arithmetic, not augmentation: with it both ranks see the same data bit for bit
              # (tests/test_augment.py), but Adam turns float-summation noise into 1e-4 differences
              "--set", "augmentation=off"]
    single, ddp = single_and_torchrun(common, tmp_path)
    assert single["global_step"] == ddp["global_step"] > 0
    nets = []
    for state in (single, ddp):
        net = build_network(ModelMeta.from_dict(state["meta"]))
        net.load_state_dict(state["model_state"])
        nets.append(net.eval())
    # A conv bias directly followed by a per-channel normalisation has an exactly-zero gradient in exact
    # arithmetic; Adam turns float noise there into full-size steps, so those biases are compared through the
    # network's output (to which they do not contribute) instead of one by one.
    modules = dict(nets[0].named_modules())
    norm_fed = {
        f"{name}.bias" for name, m in modules.items()
        if isinstance(m, torch.nn.Conv2d) and name.endswith(".0")
        and isinstance(modules.get(name[:-2] + ".1"), torch.nn.GroupNorm)
    }
    compared = 0
    for k, v in single["model_state"].items():
        if k not in norm_fed:
            torch.testing.assert_close(ddp["model_state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
            compared += 1
    assert compared > len(norm_fed)
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(nets[1](x), nets[0](x), rtol=1e-4, atol=1e-4)
    # training really moved the weights: the first-epoch and last-epoch losses differ
    hist = single["history"]
    assert len(hist) == 2 and hist[0]["train_loss"] != hist[1]["train_loss"]


def test_torchrun_3d_patches_two_processes_equal_single_process(tmp_path):
    """3D (dims 3, planned patches): two gloo processes with the same global batch of patches take the step one
    process takes. Compared after one step, before Adam amplifies float-summation noise (its first step moves every
    weight by about lr whatever the gradient's size): measured, 46 of 100,954 weights differ, by at most 1.8e-6;
    a different batch would move nearly every weight differently, by ~1e-4."""
    from modalseg.data.synth import make_breast_dataset_3d

    data = make_breast_dataset_3d(tmp_path / "b3", num_patients=6, size=16, seed=7)
    common = ["train", "--data", str(data), "--model", "unet", "--seed", "7", "--epochs", "1",
              "--set", "dims=3", "--set", "max_steps=1", "--set", "batch_size=4", "--set", "folds=3",
              "--set", "model_options={base_width: 4, norm: group}",
              "--set", "preprocess_options={target_size: [16, 16]}",
              "--set", "precision=fp32", "--set", "progress=false", "--set", "tensorboard=false",
              "--set", "num_threads=1", "--set", "foreground_fraction=0.5", "--set", "augmentation=medium"]
    single, ddp = single_and_torchrun(common, tmp_path)
    assert single["global_step"] == ddp["global_step"] == 1
    assert single["meta"] == ddp["meta"] and single["meta"]["patch_size"]
    total = differing = 0
    for key, a in single["model_state"].items():
        if a.is_floating_point():
            diff = (a - ddp["model_state"][key]).abs()
            total += a.numel()
            differing += int((diff > 1e-7).sum())
            assert float(diff.max()) < 1e-5, key
    assert differing < 0.01 * total
