"""End-to-end training engine: paired and unpaired runs, checkpoints, exact resume, predict, evaluate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from modalseg.cli.main import main
from modalseg.training.checkpoint import load_checkpoint
from modalseg.training.config import TrainConfig
from modalseg.training.engine import Trainer

TINY_PAIRED = {"base_width": 4, "sa_reduction": 2}


def paired_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    values = dict(
        data=str(data), output=str(out), model="master_assistant", model_options=dict(TINY_PAIRED),
        preprocess_options={"target_size": [32, 32]}, epochs=2, folds=5, fold=0, seed=3,
        precision="fp32", progress=False, tensorboard=False, lr=1e-3,
    )
    values.update(kw)
    return TrainConfig(**values)


def test_paired_training_writes_everything(breast_dataset, tmp_path):
    cfg = paired_cfg(breast_dataset, tmp_path / "run", tensorboard=True)
    trainer = Trainer(cfg)
    summary = trainer.fit()
    run = tmp_path / "run" / "fold_0"
    for name in ("latest.pt", "log.csv", "progress.png", "config.yaml"):
        assert (run / name).is_file(), name
    history = load_checkpoint(run / "latest.pt")["history"]
    # best.pt exists exactly when some validated epoch was not degenerate (empty/all-foreground everywhere)
    assert (run / "best.pt").is_file() == any(not h["degenerate"] for h in history)
    assert any((run / "tensorboard").iterdir())
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert len(splits) == 5
    for fold in splits:  # split by patient: never on both sides
        assert not set(fold["train"]) & set(fold["val"])
    state = load_checkpoint(run / "latest.pt")
    assert state["epoch"] == 2 and state["global_step"] == summary["steps"] > 0
    assert len(state["history"]) == 2 and np.isfinite(state["history"][-1]["train_loss"])
    from modalseg.training.evaluate import evaluate_trainer

    result = evaluate_trainer(trainer)
    assert result["validation"] and 0.0 <= result["validation"][0]["dice_mean"] <= 1.0
    assert (run / "validation.csv").read_text().count("\n") >= 2


def test_resume_continues_exactly(breast_dataset, tmp_path):
    full = Trainer(paired_cfg(breast_dataset, tmp_path / "full", epochs=4))
    full.fit()
    assert full.global_step > 3
    part = Trainer(paired_cfg(breast_dataset, tmp_path / "part", epochs=4, max_steps=3, checkpoint_every=1))
    part.fit()
    assert load_checkpoint(tmp_path / "part" / "fold_0" / "latest.pt")["global_step"] == 3
    resumed = Trainer(paired_cfg(breast_dataset, tmp_path / "part", epochs=4), resume=True)
    assert resumed.global_step == 3
    resumed.fit()
    a, b = full.network.state_dict(), resumed.network.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigkill_mid_epoch_then_resume_matches(breast_dataset, tmp_path):
    """A training process killed with SIGKILL and resumed ends with the uninterrupted run's weights."""
    common = ["train", "--data", str(breast_dataset), "--model", "unet", "--seed", "5", "--epochs", "3",
              "--set", "model_options={base_width: 4}", "--set", "preprocess_options={target_size: [32, 32]}",
              "--set", "precision=fp32", "--set", "progress=false", "--set", "tensorboard=false",
              "--set", "checkpoint_every=1", "--set", "num_threads=1"]
    assert main([*common, "--output", str(tmp_path / "ref")]) == 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "modalseg.cli.main", *common, "--output", str(tmp_path / "killed")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "fold_0" / "latest.pt"
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if latest.exists():
            try:
                step = load_checkpoint(latest)["global_step"]
            except Exception:  # noqa: BLE001 - being replaced right now
                step = 0
            if step >= 2:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_at is not None, "the run finished before it could be killed"
    assert main([*common, "--output", str(tmp_path / "killed"), "--resume"]) == 0
    ref = load_checkpoint(tmp_path / "ref" / "fold_0" / "latest.pt")
    got = load_checkpoint(latest)
    assert got["global_step"] == ref["global_step"]
    for k, v in ref["model_state"].items():
        assert torch.equal(v, got["model_state"][k]), k


@pytest.mark.parametrize("setting", ["single", "joint", "msbn", "ummkd", "affinity", "csa"])
def test_unpaired_settings_train(cardiac_dataset, tmp_path, setting):
    cfg = TrainConfig(
        data=str(cardiac_dataset), output=str(tmp_path / setting), setting=setting, model="dilated_fcn",
        model_options={"width": 2}, epochs=1, steps_per_epoch=2, batch_size=2, folds=5, precision="fp32",
        progress=False, tensorboard=False,
    )
    trainer = Trainer(cfg)
    summary = trainer.fit()
    assert summary["steps"] == 2
    hist = trainer.history[-1]
    assert np.isfinite(hist["train_loss"]) and 0.0 <= hist["val_dice"] <= 1.0
    state = load_checkpoint(trainer.run_dir / "latest.pt")
    assert state["meta"]["setting"] == setting and state["meta"]["kind"] == "unpaired"


def test_predict_writes_input_geometry_and_evaluate(breast_dataset, tmp_path):
    from modalseg.data.io import read_volume
    from modalseg.data.layouts import load_dataset

    Trainer(paired_cfg(breast_dataset, tmp_path / "run", epochs=1)).fit()
    spec = load_dataset(breast_dataset)
    case = spec.cases[0]
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(tmp_path / "run"), "--input", *map(str, case.images),
                 "--output", str(out), "--probabilities", "--precision", "fp32"]) == 0
    pred_file = next(out.glob("*.nii.gz"))
    src, pred = read_volume(case.images[0]), read_volume(out / f"{case.case_id}.nii.gz", kind="label")
    del pred_file
    assert pred.shape == src.shape
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
    assert set(np.unique(pred.array)) <= {0, 1}
    probs = read_volume(out / f"{case.case_id}_prob_mass.nii.gz")
    assert probs.shape == src.shape and 0.0 <= probs.array.min() and probs.array.max() <= 1.0
    # evaluate the prediction against its reference label
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / f"{case.case_id}.nii.gz").write_bytes(Path(case.label).read_bytes())
    for f in out.glob("*_prob_*"):
        f.unlink()
    assert main(["evaluate", "--pred", str(out), "--labels", str(labels), "--dataset", str(breast_dataset),
                 "--output", str(tmp_path / "eval")]) == 0
    assert "dice" in (tmp_path / "eval" / "metrics.csv").read_text()


def test_predict_missing_modality_is_one_line(breast_dataset, tmp_path, capsys):
    Trainer(paired_cfg(breast_dataset, tmp_path / "run", epochs=1, max_steps=1)).fit()
    from modalseg.data.layouts import load_dataset

    case = load_dataset(breast_dataset).cases[0]
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "x_0000.nii.gz").write_bytes(Path(case.images[0]).read_bytes())
    code = main(["predict", "--model", str(tmp_path / "run"), "--input", str(inp), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing modality T2W" in err[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_resume_with_other_model_is_refused(breast_dataset, tmp_path, capsys):
    Trainer(paired_cfg(breast_dataset, tmp_path / "run", epochs=1, max_steps=1)).fit()
    code = main(["train", "--data", str(breast_dataset), "--output", str(tmp_path / "run"), "--model", "fuse_unet",
                 "--set", "model_options={base_width: 4}", "--set", "progress=false", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "different model" in err and "master_assistant" in err


def test_unpaired_splits_are_stratified_by_modality():
    from modalseg.training.splits import make_splits

    patients = [f"ct_{i}" for i in range(6)] + [f"mr_{i}" for i in range(5)]
    strata = {p: p[:2] for p in patients}
    for seed in range(5):
        splits = make_splits(patients, 5, seed, strata)
        for fold in splits:
            assert {p[:2] for p in fold["val"]} == {"ct", "mr"}
            assert sorted(fold["train"] + fold["val"]) == sorted(patients)
        assert sorted(p for f in splits for p in f["val"]) == sorted(patients)


def test_fp16_autocast_trains_with_loss_scaling_and_resumes_the_scaler(breast_dataset, tmp_path, monkeypatch):
    # fp16 is the CUDA AMP path for GPUs without bf16; CPU autocast supports fp16 too, so the loss-scaling logic
    # (GradScaler around backward / step, its state in checkpoints) runs here exactly as it would on CUDA.
    import modalseg.training.engine as engine
    from modalseg.training.precision import Precision

    monkeypatch.setattr(engine, "resolve_precision",
                        lambda device, *a, **k: Precision(device, torch.float16, False))
    trainer = Trainer(paired_cfg(breast_dataset, tmp_path / "run", epochs=1, max_steps=2, checkpoint_every=1))
    assert trainer.scaler.is_enabled()
    trainer.fit()
    state = load_checkpoint(tmp_path / "run" / "fold_0" / "latest.pt")
    assert state["scaler_state"]["scale"] > 0  # the scale is saved with the optimiser ...
    assert np.isfinite(state["history"][-1]["train_loss"])
    resumed = Trainer(paired_cfg(breast_dataset, tmp_path / "run", epochs=1), resume=True)
    assert resumed.scaler.get_scale() == state["scaler_state"]["scale"]  # ... and restored on resume
    monkeypatch.undo()
    fp32 = Trainer(paired_cfg(breast_dataset, tmp_path / "fp32", epochs=1, max_steps=1))
    assert not fp32.scaler.is_enabled()  # bf16 / fp32 need no scaling
