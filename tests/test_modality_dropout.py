"""Modality dropout in paired training and prediction with modalities missing (issue 16, items 1, 2 and 4).

Dropout never drops every channel, follows its probabilities, draws from (seed, step, sample) only (resume and
DDP exact), is recorded in the model's description; ``predict --missing`` runs such a model on the modalities
present (missing ones zero after normalisation, as in training) and a model trained without dropout refuses.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from modalseg.cli.main import main
from modalseg.data.augment import ModalityDropout, dropout_probabilities
from modalseg.data.transforms import Sample
from modalseg.errors import CheckpointError, ConfigError
from modalseg.training.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from modalseg.training.config import TrainConfig, check_option
from modalseg.training.engine import Trainer

TINY = {"base_width": 4, "sa_reduction": 2}


def cfg_for(data: Path, out: Path, **kw) -> TrainConfig:
    values = dict(data=str(data), output=str(out), model="master_assistant", model_options=dict(TINY),
                  preprocess_options={"target_size": [32, 32]}, epochs=1, folds=5, fold=0, seed=3, lr=1e-3,
                  precision="fp32", progress=False, tensorboard=False)
    values.update(kw)
    return TrainConfig(**values)


# ------------------------------------------------------------------------------------------ the transform
def test_never_drops_every_channel_and_follows_the_probabilities():
    keep_master = ModalityDropout([0.0, 0.3, 0.6], seed=1)
    every = ModalityDropout([0.5, 0.5], seed=1)
    n = 4000
    masks = np.array([[c in keep_master.dropped_at(s, i) for c in range(3)] for s in range(4) for i in range(n // 4)])
    assert not masks[:, 0].any()
    assert masks[:, 1].mean() == pytest.approx(0.3, abs=0.03) and masks[:, 2].mean() == pytest.approx(0.6, abs=0.03)
    assert abs(np.corrcoef(masks[:, 1], masks[:, 2])[0, 1]) < 0.06  # independent channels
    both = np.array([[c in every.dropped_at(0, i) for c in range(2)] for i in range(n)])
    assert not both.all(axis=1).any()  # never all
    # the independent draw conditioned on "not all": (p - p^2) / (1 - p^2) = 1/3 each, none dropped 1/3
    assert both.mean(axis=0) == pytest.approx([1 / 3, 1 / 3], abs=0.03)
    assert (~both.any(axis=1)).mean() == pytest.approx(1 / 3, abs=0.03)


def test_dropout_is_deterministic_in_seed_step_and_sample():
    t = ModalityDropout([0.0, 0.5, 0.5, 0.5], seed=4)
    draws = [t.dropped_at(s, i) for s in range(5) for i in range(8)]
    assert draws == [ModalityDropout([0.0, 0.5, 0.5, 0.5], seed=4).dropped_at(s, i) for s in range(5) for i in range(8)]
    assert draws != [ModalityDropout([0.0, 0.5, 0.5, 0.5], seed=5).dropped_at(s, i) for s in range(5) for i in range(8)]
    assert len({tuple(d) for d in draws}) > 4
    image = np.random.default_rng(0).normal(size=(4, 8, 8)).astype(np.float32)
    for s, i in [(0, 0), (3, 7), (4, 2)]:
        out = t(Sample(image, None), step=s, index=i)
        dropped = t.dropped_at(s, i)
        for c in range(4):  # exactly zero where dropped, untouched elsewhere
            np.testing.assert_array_equal(out.image[c], 0.0 if c in dropped else image[c])


def test_the_option_means_assistants_unless_the_master_is_allowed():
    mods = ["T1C", "T2W", "DWI"]
    assert dropout_probabilities(0.3, mods) == {"T2W": 0.3, "DWI": 0.3}
    assert dropout_probabilities(0.3, mods, drop_master=True) == {"T1C": 0.3, "T2W": 0.3, "DWI": 0.3}
    assert dropout_probabilities({"DWI": 0.2}, mods) == {"DWI": 0.2}
    assert dropout_probabilities(0.0, mods) == {}
    refusals = [
        (({"T1C": 0.2}, mods), "names the master T1C; set modality_dropout_master"),
        (({"ADC": 0.2}, mods), "names ADC, which the model does not read"),
        ((0.5, ["T1C"]), "two or more channels"),
        ((1.0, ["T1C", "T2W"], True), "every channel would drop them all"),
        (({"T2W": 0.4}, mods, True), "gives the master T1C no probability"),
    ]
    for args, match in refusals:
        option, names, *master = args
        with pytest.raises(ConfigError, match=match):
            dropout_probabilities(option, names, drop_master=bool(master and master[0]))


def test_the_config_option_is_declared_with_its_range():
    assert check_option("modality_dropout", 0.25) == 0.25
    assert check_option("modality_dropout", "0.5") == 0.5
    assert check_option("modality_dropout", {"T2W": "1e-1"}) == {"T2W": 0.1}
    for bad in (1.5, -0.1, {"T2W": 2}, {"T2W": "x"}, True, "often", [0.1]):
        with pytest.raises(ConfigError, match=r"modality_dropout: expected a number in \[0, 1\] or a mapping"):
            check_option("modality_dropout", bad)
    assert "mapping {name: number in [0, 1]}" in main_help_config()


def main_help_config() -> str:
    from modalseg.training.config import describe_options

    return next(line for line in describe_options().splitlines() if line.startswith("modality_dropout "))


def test_dropout_options_are_refused_before_any_work(breast_dataset, cardiac_dataset, tmp_path):
    from modalseg.data.layouts import load_dataset
    from modalseg.training.tasks import task_for

    paired = task_for(load_dataset(breast_dataset))
    with pytest.raises(ConfigError, match="names the master T1C"):
        paired.resolve(cfg_for(breast_dataset, tmp_path, modality_dropout={"T1C": 0.5}))
    with pytest.raises(ConfigError, match="reads T1C only"):
        paired.resolve(cfg_for(breast_dataset, tmp_path, model="unet", modality_dropout=0.5))
    with pytest.raises(ConfigError, match="modality_dropout is 0"):
        paired.resolve(cfg_for(breast_dataset, tmp_path, modality_dropout_master=True))
    unpaired = task_for(load_dataset(cardiac_dataset))
    with pytest.raises(ConfigError, match="for paired data"):
        unpaired.resolve(TrainConfig(data=str(cardiac_dataset), modality_dropout=0.3))


# ------------------------------------------------------------------------------------------ in training
def _task(trainer: Trainer, rank: int, world_size: int):
    """A paired task of ``trainer``'s fold planned as DDP rank ``rank`` of ``world_size``."""
    from modalseg.training.tasks import task_for

    task = task_for(trainer.spec)
    cfg = task.resolve(trainer.cfg)
    task.model_modalities(cfg)
    cases = trainer.cache.patients
    train = sorted(c for p in trainer.split["train"] for c in cases[p])
    val = sorted(c for p in trainer.split["val"] for c in cases[p])
    task.plan(trainer.cache, train, val, cfg, rank, world_size)
    return task


def test_two_ranks_share_one_processs_batches_with_dropout_and_augmentation(breast_dataset, tmp_path):
    trainer = Trainer(cfg_for(breast_dataset, tmp_path / "run", batch_size=4, modality_dropout=0.5), callbacks=[])
    assert trainer.cfg.augmentation == "medium"
    one = _task(trainer, 0, 1)
    ranks = [_task(trainer, r, 2) for r in (0, 1)]
    whole = [b.args for b in one.batches(0, 0, trainer.precision)]
    shares = [[b.args for b in t.batches(0, 0, trainer.precision)] for t in ranks]
    assert len(whole) == len(shares[0]) == len(shares[1]) > 0
    zeroed = 0
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *shares, strict=True):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        zeroed += int((x[:, 1].flatten(1).abs().sum(1) == 0).sum())
        assert not (x[:, 0].flatten(1).abs().sum(1) == 0).any()  # the master is never dropped
    assert zeroed > 0  # T2W was dropped somewhere


def test_resume_with_dropout_and_augmentation_is_exact(breast_dataset, tmp_path):
    kw = dict(epochs=3, modality_dropout=0.5, augmentation="strong")
    full = Trainer(cfg_for(breast_dataset, tmp_path / "full", **kw), callbacks=[])
    full.fit()
    assert full.global_step > 3
    part = Trainer(cfg_for(breast_dataset, tmp_path / "part", max_steps=3, checkpoint_every=1, **kw))
    part.fit()
    resumed = Trainer(cfg_for(breast_dataset, tmp_path / "part", **kw), resume=True)
    assert resumed.global_step == 3
    # the step after the kill draws the same augmentation and the same dropped set as the uninterrupted run
    epoch, start = divmod(3, resumed.steps_per_epoch)
    after = next(iter(resumed.task.batches(epoch, start, resumed.precision))).args
    same = next(iter(full.task.batches(epoch, start, full.precision))).args
    assert torch.equal(after[0], same[0]) and torch.equal(after[1], same[1])
    resumed.fit()
    a, b = full.network.state_dict(), resumed.network.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------ the model's meta
@pytest.fixture(scope="module")
def runs(breast_dataset, tmp_path_factory):
    """A tiny model trained with modality dropout of T2W and one trained without (2 steps each)."""
    root = tmp_path_factory.mktemp("dropout_runs")
    Trainer(cfg_for(breast_dataset, root / "dropout", max_steps=2, modality_dropout={"T2W": 0.5}),
            callbacks=[]).save("latest.pt")
    Trainer(cfg_for(breast_dataset, root / "plain", max_steps=2), callbacks=[]).save("latest.pt")
    return root / "dropout", root / "plain"


def test_the_description_records_dropout_and_older_ones_load(runs, tmp_path):
    dropout, plain = runs
    assert read_checkpoint(dropout / "fold_0" / "latest.pt").meta.modality_dropout == {"T2W": 0.5}
    state = load_checkpoint(plain / "fold_0" / "latest.pt")
    assert "modality_dropout" not in state["meta"]  # what older releases wrote, byte for byte
    assert read_checkpoint(plain / "fold_0" / "latest.pt").meta.modality_dropout is None
    for bad in ({"T2W": 1.5}, {"DWI": 0.5}, {"T2W": "0.5"}, [0.5], {"T1C": 1.0, "T2W": 1.0}):
        state = load_checkpoint(dropout / "fold_0" / "latest.pt")
        state["meta"]["modality_dropout"] = bad
        path = tmp_path / "bad.pt"
        save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, path)
        with pytest.raises(CheckpointError, match="invalid model description .*modality_dropout"):
            read_checkpoint(path)


# ------------------------------------------------------------------------------------------ prediction
def _case(data: Path):
    from modalseg.data.layouts import load_dataset

    return load_dataset(data).cases[0]


def test_predict_missing_feeds_zeros_after_normalisation(runs, breast_dataset):
    from modalseg.data.io import read_volume
    from modalseg.inference.predictor import Predictor
    from modalseg.training.precision import resolve_precision

    dropout, _ = runs
    predictor = Predictor.from_checkpoints([dropout], which="latest",
                                           precision=resolve_precision(torch.device("cpu"), "fp32"))
    case = _case(breast_dataset)
    t1c, t2w = (read_volume(p) for p in case.images)
    batches = []
    inner = predictor.inferer

    class Spy:  # the network's input batches, as the inferer receives them
        def __call__(self, backend, batch, branch):
            batches.append(batch.copy())
            return inner(backend, batch, branch)

    predictor.inferer = Spy()
    full = predictor.predict([t1c, t2w])
    without = predictor.predict([t1c], missing=["t2w"])  # names case-insensitive
    assert predictor.input_names(missing=["T2W"]) == ["T1C"]
    np.testing.assert_array_equal(batches[1][:, 0], batches[0][:, 0])  # T1C preprocessed as with both
    np.testing.assert_array_equal(batches[1][:, 1], 0.0)  # T2W: zeros, the training fill
    assert without.labels.shape == full.labels.shape == t1c.shape
    assert without.probabilities.shape == full.probabilities.shape
    with pytest.raises(ConfigError, match="always present"):
        predictor.predict([t2w], missing=["T1C"])
    with pytest.raises(ConfigError, match="is not one of the model's"):
        predictor.predict([t1c], missing=["DWI"])


def test_predict_missing_writes_outputs_and_a_plain_model_refuses(runs, breast_dataset, tmp_path, capsys):
    dropout, plain = runs
    case = _case(breast_dataset)
    out = tmp_path / "out"
    args = ["predict", "--model", str(dropout), "--checkpoint", "latest", "--input", str(case.images[0]),
            "--output", str(out), "--missing", "T2W", "--precision", "fp32", "--probabilities"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "without T2W" in text
    assert (out / f"{case.case_id}.nii.gz").is_file() and (out / f"{case.case_id}_prob_mass.nii.gz").is_file()
    refused = tmp_path / "refused"
    code = main(["predict", "--model", str(plain), "--checkpoint", "latest", "--input", str(case.images[0]),
                 "--output", str(refused), "--missing", "T2W", "--precision", "fp32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "not trained with modality dropout" in err[0] and "T2W" in err[0]
    assert not refused.exists() or not any(refused.iterdir())


def test_a_case_without_a_modality_names_it_and_suggests_missing(runs, breast_dataset, tmp_path, capsys):
    dropout, plain = runs
    case = _case(breast_dataset)
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(case.images[0], folder / "x_0000.nii.gz")
    for run, hint in ((dropout, True), (plain, False)):
        code = main(["predict", "--model", str(run), "--checkpoint", "latest", "--input", str(folder),
                     "--output", str(tmp_path / "o"), "--precision", "fp32"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "missing modality T2W" in err[0], err
        assert ("--missing T2W" in err[0]) == hint
    # explicit files: the one given is T1C by its _0000 index, so T2W is named
    code = main(["predict", "--model", str(dropout), "--checkpoint", "latest", "--input",
                 str(folder / "x_0000.nii.gz"), "--output", str(tmp_path / "o"), "--precision", "fp32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "(missing modality T2W)" in err[0] and "--missing T2W" in err[0], err
    # with --missing the folder is one case of the modalities present
    assert main(["predict", "--model", str(dropout), "--checkpoint", "latest", "--input", str(folder),
                 "--output", str(tmp_path / "o2"), "--precision", "fp32", "--missing", "T2W"]) == 0
    assert (tmp_path / "o2" / "x.nii.gz").is_file()
