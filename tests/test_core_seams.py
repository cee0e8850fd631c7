"""Issue 14's seams: the Task owns paired/unpaired, Trainer.train_step + callbacks, one checkpoint reader, and the
Predictor (backends x inferers) with its in-memory API."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from modalseg.data.io import read_volume
from modalseg.errors import CheckpointError
from modalseg.inference import SliceInferer, TorchBackend
from modalseg.inference.predictor import Predictor
from modalseg.training.callbacks import Callback, default_callbacks
from modalseg.training.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from modalseg.training.engine import Trainer
from modalseg.training.precision import resolve_precision
from modalseg.training.step import NonFiniteStep, TrainStep
from modalseg.training.tasks import PairedLoss, PairedTask, UnpairedTask
from test_training import paired_cfg

ENGINE = Path(__file__).resolve().parents[1] / "src" / "modalseg" / "training" / "engine.py"


def test_the_trainer_has_no_paired_branch():
    """Every paired/unpaired difference is the Task's: the Trainer class names neither kind nor ``paired``."""
    tree = ast.parse(ENGINE.read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    found = []
    for node in ast.walk(trainer):
        if isinstance(node, ast.Attribute) and "paired" in node.attr:
            found.append(f"line {node.lineno}: .{node.attr}")
        if isinstance(node, ast.Name) and "paired" in node.id.lower():
            found.append(f"line {node.lineno}: {node.id}")
        if isinstance(node, ast.Constant) and node.value in ("paired", "unpaired"):
            found.append(f"line {node.lineno}: {node.value!r}")
    assert not found, found


class Recorder(Callback):
    """Records the hooks it sees and keeps a counter that must survive a resume."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.steps_seen = 0

    def on_fit_start(self, trainer):
        self.events.append("fit_start")

    def on_epoch_start(self, trainer):
        self.events.append(f"epoch_start {trainer.epoch}")

    def on_step_end(self, trainer, result):
        self.steps_seen += 1
        self.events.append(f"step {trainer.global_step} {result.loss:.6f}")

    def on_validation(self, trainer, end):
        self.events.append(f"validation {'val_dice' in end.record}")

    def on_epoch_end(self, trainer, end):
        self.events.append(f"epoch_end {end.record['epoch']} in_history={end.record is trainer.history[-1]}")

    def on_fit_end(self, trainer):
        self.events.append("fit_end")

    def state_dict(self):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state):
        self.steps_seen = state["steps_seen"]


def test_callbacks_see_every_hook_in_order_and_their_state_resumes(breast_dataset, tmp_path):
    recorder = Recorder()
    trainer = Trainer(paired_cfg(breast_dataset, tmp_path / "run", epochs=1), console=False,
                      callbacks=[*default_callbacks(), recorder])
    trainer.fit()
    steps = trainer.steps_per_epoch
    kinds = [e.split()[0] for e in recorder.events]
    assert kinds == ["fit_start", "epoch_start", *["step"] * steps, "validation", "epoch_end", "fit_end"]
    assert recorder.events[-2] == "epoch_end 1 in_history=True"
    assert recorder.events[-3] == "validation True"  # the Validation callback ran before it
    state = load_checkpoint(tmp_path / "run" / "fold_0" / "latest.pt")
    assert state["callbacks"]["Recorder"] == {"steps_seen": steps}
    resumed_recorder = Recorder()
    resumed = Trainer(paired_cfg(breast_dataset, tmp_path / "run", epochs=2), resume=True, console=False,
                      callbacks=[*default_callbacks(), resumed_recorder])
    assert resumed_recorder.steps_seen == steps
    resumed.fit()
    assert resumed_recorder.steps_seen == 2 * steps


def test_train_step_outside_fit_reproduces_fit(breast_dataset, tmp_path):
    """A loop of ``train_step`` over ``task.batches`` (what a benchmark or an integrator writes) is ``fit``'s
    step: the same losses, bit for bit, and the same weights."""
    cfg = paired_cfg(breast_dataset, tmp_path / "a", epochs=1, max_steps=3)
    recorder = Recorder()
    fitted = Trainer(cfg, console=False, callbacks=[recorder])
    fitted.fit()
    by_fit = [float(e.split()[2]) for e in recorder.events if e.startswith("step")]
    manual = Trainer(paired_cfg(breast_dataset, tmp_path / "b", epochs=1, max_steps=3), console=False,
                     callbacks=[])
    losses = []
    for batch in manual.task.batches(0, 0, manual.precision):
        losses.append(round(manual.train_step(batch).loss, 6))
        if manual.global_step == 3:
            break
    assert losses == by_fit and len(losses) == 3
    for (name, a), b in zip(fitted.network.state_dict().items(), manual.network.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_nan_batch_stops_before_the_weights_change(breast_dataset, tmp_path):
    trainer = Trainer(paired_cfg(breast_dataset, tmp_path / "run", epochs=1), console=False, callbacks=[])
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    batch = next(trainer.task.batches(0, 0, trainer.precision))
    x, y = batch.args
    x = x.clone()
    x[0, 0, 0, 0] = math.nan
    from modalseg.errors import TrainingError
    from modalseg.training.tasks import TrainBatch

    with pytest.raises(TrainingError, match="loss became nan at epoch 1, step 1"):
        trainer.train_step(TrainBatch((x, y), batch.num_images))
    assert trainer.global_step == 0
    for k, v in trainer.network.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_train_step_is_usable_without_a_trainer():
    """The one step, on a bare loss module (as benchmarks/common.py uses it): it learns, and refuses NaN."""
    from modalseg.models import create_model

    torch.manual_seed(0)
    net = create_model("unet", num_modalities=1, in_channels=1, num_classes=2, base_width=4)
    module = PairedLoss(net, ce_weight=1.0)
    precision = resolve_precision(torch.device("cpu"), "fp32")
    step = TrainStep(module, torch.optim.Adam(module.parameters(), lr=1e-2), precision)
    x = torch.randn(2, 1, 32, 32)
    y = (x[:, 0] > 0).long()
    first = step(x, y).loss
    for _ in range(15):
        last = step(x, y).loss
    assert last < first
    with pytest.raises(NonFiniteStep, match="loss"):
        step(torch.full_like(x, math.nan), y)


def test_tasks_choose_by_dataset_kind(breast_dataset, cardiac_dataset):
    from modalseg.data.layouts import load_dataset
    from modalseg.training.tasks import task_for

    assert isinstance(task_for(load_dataset(breast_dataset)), PairedTask)
    unpaired = task_for(load_dataset(cardiac_dataset))
    assert isinstance(unpaired, UnpairedTask) and unpaired.group_column == "modality"


# ------------------------------------------------------------------------------------------------ checkpoints
def test_read_checkpoint_is_the_one_reader_and_refuses_nan_weights(trained_run, tmp_path):
    _, run = trained_run
    ckpt = read_checkpoint(run / "fold_0" / "latest.pt")
    assert ckpt.epoch is not None and ckpt.meta.kind == "paired"
    network = ckpt.build_network()
    assert torch.equal(next(iter(network.state_dict().values())), next(iter(ckpt.state["model_state"].values())))
    state = dict(ckpt.state)
    weights = {k: v.clone() for k, v in state["model_state"].items()}
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name].view(-1)[0] = math.nan
    state["model_state"] = weights
    save_checkpoint(state, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=f"non-finite .* in weight {name}"):
        read_checkpoint(tmp_path / "nan.pt").build_network()


# ------------------------------------------------------------------------------------------------ predictor
class NumpyBackend:
    """A backend that is not a torch module for the inferer: softmax computed in numpy from the torch logits (what
    an ONNX Runtime backend does), and a log of the batches it was given."""

    def __init__(self, torch_backend: TorchBackend) -> None:
        self.inner = torch_backend
        self.size_multiple, self.min_size = torch_backend.size_multiple, torch_backend.min_size
        self.calls: list[tuple[int, ...]] = []

    def session(self):
        return self.inner.session()

    def __call__(self, x, modality, window):
        self.calls.append(x.shape)
        assert isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous
        top, height, left, width = window
        logits = self.inner.network(torch.from_numpy(x)).float().numpy()[..., top:top + height, left:left + width]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def test_predictor_in_memory_api_matches_files_and_takes_any_backend(trained_run):
    data, run = trained_run
    predictor = Predictor.from_checkpoints([run], precision=resolve_precision(torch.device("cpu"), "fp32"),
                                           which="latest")
    files = sorted((data / "imagesTr").glob("*"))
    case = sorted({f.name.split("_000")[0] for f in files})[0]
    inputs = [f for f in files if f.name.startswith(case + "_")]
    inputs = sorted(inputs)[: len(predictor.input_names())]
    from_files = predictor.predict_files(inputs)
    volumes = [read_volume(f) for f in inputs]
    in_memory = predictor.predict_arrays([v.array for v in volumes], affine=volumes[0].affine)
    np.testing.assert_array_equal(in_memory.labels, from_files.labels)
    np.testing.assert_allclose(in_memory.probabilities, from_files.probabilities, rtol=0, atol=0)
    assert in_memory.labels.shape == volumes[0].array.shape
    # the same model behind another backend: the inferer batches for it (pixel-bounded, 2 slices per call)
    backend = NumpyBackend(predictor.models[0].backend)
    model = predictor.models[0]
    other = Predictor([type(model)(backend, model.meta, model.path, model.precision)],
                      inferer=SliceInferer(batch_size=2))
    result = other.predict(volumes)
    assert backend.calls and all(shape[0] <= 2 for shape in backend.calls)
    np.testing.assert_allclose(result.probabilities, from_files.probabilities, atol=1e-5)
    assert (result.labels == from_files.labels).mean() > 0.999


class RecordingBackend:
    """Records the network inputs it is given; predicts background everywhere."""

    size_multiple, min_size = 1, 1

    def __init__(self) -> None:
        self.inputs: list[np.ndarray] = []

    def session(self):
        import contextlib

        return contextlib.nullcontext()

    def __call__(self, x, modality, window):
        self.inputs.append(x.copy())
        top, height, left, width = window
        probs = np.zeros((x.shape[0], 2, height, width), np.float32)
        probs[:, 0] = 1.0
        return probs


def test_unpaired_predict_normalises_each_modality_as_its_training_cache_did():
    """A per-modality normalisation list (here: none for CT, max_slice for MR): predicting MR must use MR's entry,
    as the cache did for MR cases (before the fix every modality got the list's first entry)."""
    from modalseg.data.preprocess import PreprocessConfig
    from modalseg.data.types import Volume
    from modalseg.inference.predictor import LoadedModel
    from modalseg.training.model_meta import ModelMeta

    pp = PreprocessConfig(normalization=["none", "max_slice"], target_size=None, crop="none").to_dict()
    meta = ModelMeta(kind="unpaired", model="dilated_fcn", model_options={}, modalities=["CT", "MR"], num_classes=2,
                     labels={"background": 0, "heart": 1}, preprocess=pp, setting="msbn", channel_names=["CT", "MR"])
    backend = RecordingBackend()
    predictor = Predictor([LoadedModel(backend, meta, Path("model.pt"))])
    image = np.random.default_rng(0).uniform(10, 50, size=(8, 8, 3)).astype(np.float32)
    predictor.predict([Volume(image, np.eye(4))], modality="MR")
    slices = np.concatenate(backend.inputs)
    assert np.allclose(slices.max(axis=(1, 2, 3)), 1.0)  # max_slice: every slice scaled to max 1
    backend.inputs.clear()
    predictor.predict([Volume(image, np.eye(4))], modality="CT")
    assert np.concatenate(backend.inputs).max() > 10  # "none": raw values


def test_batch_norm_recalibration_callback_runs_once_after_a_completed_fit(cardiac_dataset, tmp_path):
    """The callback form of paper 2's optional BN re-estimation: statistics change, dropout is off during it,
    the final latest.pt holds them; a failed fit does not recalibrate."""
    from modalseg.training.callbacks import BatchNormRecalibration
    from modalseg.training.config import TrainConfig

    cfg = TrainConfig(data=str(cardiac_dataset), output=str(tmp_path / "run"), model="dilated_fcn",
                      model_options={"width": 2}, setting="msbn", epochs=1, max_steps=2, batch_size=2, folds=5,
                      fold=0, seed=0, precision="fp32", progress=False, tensorboard=False)
    trainer = Trainer(cfg, console=False, callbacks=[*default_callbacks(), BatchNormRecalibration()])
    trainer.fit()
    bn = next(m for m in trainer.network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    saved = load_checkpoint(tmp_path / "run" / "fold_0" / "latest.pt")["model_state"]
    key = next(k for k in saved if k.endswith("running_var"))
    assert torch.equal(saved[key], dict(trainer.network.state_dict())[key])
    assert bn.momentum == 0.1 and trainer.fit_completed
    plain = Trainer(TrainConfig(**{**cfg.to_dict(), "output": str(tmp_path / "plain")}), console=False)
    plain.fit()  # the same training without the callback: the same weights, other BN statistics
    other = dict(plain.network.state_dict())
    assert not torch.equal(other[key], saved[key])
    conv = next(k for k in saved if k.endswith("weight") and saved[k].dim() == 4)
    assert torch.equal(other[conv], saved[conv])
    failing = Trainer(TrainConfig(**{**cfg.to_dict(), "output": str(tmp_path / "bad"), "lr": 1e39}),
                      console=False, callbacks=[*default_callbacks(), BatchNormRecalibration()])
    from modalseg.errors import TrainingError

    with pytest.raises(TrainingError):
        failing.fit()
    assert not failing.fit_completed
