"""Augmentation (data/augment.py) and its wiring into the tasks' batches: deterministic in (seed, step, sample),
label-consistent spatial transforms, intensity transforms that leave labels alone, options checked in one line."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from modalseg.data.augment import AugmentConfig, IntensityAugment, RandomPipeline, SpatialAugment
from modalseg.data.transforms import Sample
from modalseg.errors import ConfigError
from modalseg.training.config import TrainConfig, check_option

OFF = {f.name: 0.0 for f in dataclasses.fields(AugmentConfig) if f.name.endswith("_p")}


def only(**changes: object) -> AugmentConfig:
    """A config with every step off except ``changes``."""
    return dataclasses.replace(AugmentConfig(), **{**OFF, **changes})


def sample(rng: np.random.Generator, channels: int = 2, size: tuple[int, int] = (16, 16)) -> Sample:
    label = np.zeros(size, np.int64)
    label[2:7, 3:11] = 1
    label[9:14, 10:15] = 2
    image = rng.normal(size=(channels, *size)).astype(np.float32)
    return Sample(image, label)


def test_spatial_and_intensity_are_deterministic_in_seed_step_and_index():
    rng = np.random.default_rng(0)
    s = sample(rng)
    for cls in (SpatialAugment, IntensityAugment):
        cfg = dataclasses.replace(AugmentConfig.preset("strong"), **{k: 1.0 for k in ("flip_p", "gamma_p")})
        t = cls(cfg, seed=7)
        a, b = t(s, step=3, index=1), cls(cfg, seed=7)(s, step=3, index=1)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        others = [t(s, step=3, index=2), t(s, step=4, index=1), cls(cfg, seed=8)(s, step=3, index=1)]
        assert any(not np.array_equal(a.image, o.image) for o in others)
        # the draws are a pure function: calling again later (after other draws) gives the same
        np.testing.assert_array_equal(t(s, step=3, index=1).image, a.image)


@pytest.mark.parametrize("changes", [{"flip_p": 1.0}, {"rot90_p": 1.0}, {"flip_p": 1.0, "rot90_p": 1.0}])
def test_flips_and_turns_move_image_and_label_alike(changes):
    rng = np.random.default_rng(1)
    s = sample(rng)
    s.image[0] = s.label  # channel 0 carries the label: any mismatch of the two shows
    t = SpatialAugment(only(**changes), seed=0)
    moved = 0
    for index in range(20):
        out = t(s, step=0, index=index)
        np.testing.assert_array_equal(out.image[0], out.label.astype(np.float32))
        assert out.label.dtype == s.label.dtype and sorted(np.unique(out.label)) == [0, 1, 2]
        moved += not np.array_equal(out.label, s.label)
    # p = 1: every sample moved, except where both flips and a half turn cancel out
    assert moved == 20 if len(changes) == 1 else 10 < moved < 20


def test_flip_is_the_numpy_flip_of_both():
    s = sample(np.random.default_rng(2))
    t = SpatialAugment(only(flip_p=1.0), seed=0)
    out = t(s, step=0, index=0)  # both spatial axes flip when p = 1
    np.testing.assert_array_equal(out.image, s.image[:, ::-1, ::-1])
    np.testing.assert_array_equal(out.label, s.label[::-1, ::-1])


def test_rotation_and_scaling_keep_labels_nearest_and_aligned():
    s = sample(np.random.default_rng(3), size=(32, 32))
    big = np.zeros((32, 32), np.int64)
    big[8:24, 6:20] = 3
    s = Sample(np.stack([big.astype(np.float32), s.image[1]]), big)
    t = SpatialAugment(only(rotate_p=1.0, scale_p=1.0, rotate_degrees=30.0), seed=0)
    for index in range(8):
        out = t(s, step=0, index=index)
        assert set(np.unique(out.label)) <= {0, 3}  # nearest: no value that was not there
        assert not np.array_equal(out.label, s.label)
        # the bilinear image of the label map agrees with the nearest label away from the edges
        agree = ((out.image[0] > 1.5) == (out.label == 3)).mean()
        assert agree > 0.95, agree


def test_rot90_only_on_square_planes():
    rng = np.random.default_rng(4)
    s = sample(rng, size=(12, 16))
    out = SpatialAugment(only(rot90_p=1.0), seed=0)(s, step=0, index=0)
    np.testing.assert_array_equal(out.image, s.image)
    assert out.image.shape == (2, 12, 16)


def test_intensity_leaves_labels_alone_and_draws_per_modality():
    s = sample(np.random.default_rng(5))
    s.image[1] = s.image[0]  # two equal channels: per-modality draws make them differ
    t = IntensityAugment(dataclasses.replace(AugmentConfig.preset("strong"), gamma_p=1.0, noise_p=1.0), seed=1)
    for index in range(5):
        out = t(s, step=2, index=index)
        assert out.label is s.label  # not even copied
        assert not np.array_equal(out.image, s.image)
        assert not np.array_equal(out.image[0], out.image[1])
    assert np.array_equal(s.image[0], s.image[1])  # the input is not modified in place


@pytest.mark.parametrize("step", ["contrast", "gamma"])
def test_contrast_and_gamma_keep_the_range_and_constant_channels(step):
    s = sample(np.random.default_rng(6))
    s.image[1] = 0.0  # e.g. a dropped modality
    out = IntensityAugment(only(**{f"{step}_p": 1.0}), seed=0)(s, step=0, index=0)
    assert out.image[0].min() >= s.image[0].min() - 1e-6 and out.image[0].max() <= s.image[0].max() + 1e-6
    assert not np.allclose(out.image[0], s.image[0])
    np.testing.assert_array_equal(out.image[1], 0.0)


def test_pipeline_batch_is_per_sample_with_global_indices():
    rng = np.random.default_rng(7)
    xs = rng.normal(size=(4, 2, 16, 16)).astype(np.float32)
    ys = rng.integers(0, 3, size=(4, 16, 16))
    pipe = RandomPipeline([SpatialAugment(AugmentConfig.preset("strong"), 3),
                           IntensityAugment(AugmentConfig.preset("strong"), 3)])
    whole_x, whole_y = pipe.batch(torch.from_numpy(xs), torch.from_numpy(ys), step=5)
    assert isinstance(whole_x, torch.Tensor) and whole_y.dtype == torch.int64
    # two ranks, each its share with first_index = rank * 2: the same samples as one process
    parts = [pipe.batch(xs[r * 2:(r + 1) * 2], ys[r * 2:(r + 1) * 2], step=5, first_index=r * 2) for r in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole_x.numpy())
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), whole_y.numpy())
    one = pipe(Sample(xs[3], ys[3]), step=5, index=3)
    np.testing.assert_array_equal(one.image, whole_x.numpy()[3])


def test_every_sample_draws_its_own_augmentation():
    xs = np.zeros((1, 1, 8, 8), np.float32)
    xs[0, 0, 0, 1] = 1.0  # an asymmetric image: each flip/turn gives another one
    pipe = RandomPipeline([SpatialAugment(only(flip_p=0.5, rot90_p=0.5), 0)])
    seen = {pipe.batch(xs, None, step=0, first_index=i)[0].tobytes() for i in range(64)}
    assert len(seen) >= 6  # of the 8 symmetries of the square


def test_presets_and_overrides_are_checked():
    assert AugmentConfig.preset("medium") == AugmentConfig()
    assert AugmentConfig.preset("light").rot90_p == 0.0 and AugmentConfig.preset("strong").rotate_degrees == 30.0
    cfg = AugmentConfig.preset("light", {"rotate_p": 0, "gamma_range": [0.9, 1.1]})
    assert cfg.rotate_p == 0.0 and cfg.gamma_range == (0.9, 1.1)
    for bad, match in [({"rotat_p": 0.1}, "unknown option"), ({"flip_p": 1.5}, "probability"),
                       ({"gamma_range": [1.2, 0.8]}, "low"), ({"scale_range": [0, 1]}, "> 0"),
                       ({"noise_std": [0.1]}, "low"), ({"rotate_degrees": 200}, "180"),
                       ({"flip_p": True}, "probability")]:
        with pytest.raises(ConfigError, match=match):
            AugmentConfig.preset("medium", bad)
    with pytest.raises(ConfigError, match="augmentation must be one of"):
        AugmentConfig.preset("huge")


def test_augmentation_options_are_declared():
    assert check_option("augmentation", "light") == "light"
    # YAML 1.1 reads `augmentation: off` / `on` as booleans: the words are meant
    assert check_option("augmentation", False) == "off" and check_option("augmentation", True) == "on"
    with pytest.raises(ConfigError, match="augmentation: expected one of auto, off, on, light, medium, strong"):
        check_option("augmentation", "yes")
    with pytest.raises(ConfigError, match="device: expected one of auto, cpu, cuda, got False"):
        check_option("device", False)  # other choices never take a boolean
    with pytest.raises(ConfigError, match="augmentation_options: expected a mapping"):
        TrainConfig.from_dict({"data": "x", "augmentation_options": [1]})


# ------------------------------------------------------------------------------------------ in the tasks
def _paired(data, out, **kw) -> TrainConfig:
    values = dict(data=str(data), output=str(out), model="master_assistant",
                  model_options={"base_width": 4, "sa_reduction": 2}, preprocess_options={"target_size": [32, 32]},
                  epochs=1, seed=3, precision="fp32", progress=False, tensorboard=False)
    values.update(kw)
    return TrainConfig(**values)


def test_auto_is_medium_with_the_default_preset_and_off_with_paper_presets(breast_dataset, cardiac_dataset):
    from modalseg.data.layouts import load_dataset
    from modalseg.training.tasks import task_for

    spec = load_dataset(breast_dataset)
    assert task_for(spec).resolve(_paired(breast_dataset, "x")).augmentation == "medium"
    assert task_for(spec).resolve(_paired(breast_dataset, "x", preprocess="paper1")).augmentation == "off"
    assert task_for(spec).resolve(_paired(breast_dataset, "x", augmentation="light")).augmentation == "light"
    yaml_on = _paired(breast_dataset, "x", augmentation=True)  # `augmentation: on` in a YAML file
    yaml_on.validate()
    assert task_for(spec).resolve(yaml_on).augmentation == "medium"
    unpaired = load_dataset(cardiac_dataset)
    assert task_for(unpaired).resolve(TrainConfig(data=str(cardiac_dataset))).augmentation == "off"  # paper 2
    with pytest.raises(ConfigError, match="augmentation is off"):
        task_for(spec).resolve(_paired(breast_dataset, "x", preprocess="paper1", augmentation_options={"flip_p": 0}))
    with pytest.raises(ConfigError, match="augmentation_options: unknown"):
        task_for(spec).resolve(_paired(breast_dataset, "x", augmentation_options={"flips": 0}))


def test_paired_batches_with_augmentation_off_are_the_plain_patches(breast_dataset, tmp_path):
    from modalseg.data.patches import squeeze_depth
    from modalseg.training.engine import Trainer

    trainer = Trainer(_paired(breast_dataset, tmp_path / "run", augmentation="off"), callbacks=[])
    task = trainer.task
    assert not task.transforms
    got = list(task.batches(0, 0, trainer.precision))
    want = [squeeze_depth(*trainer.cache.get_patches(refs)) for refs in task.sampler.batches(0)]
    assert len(got) == len(want) > 0
    for batch, (x, y) in zip(got, want, strict=True):
        assert torch.equal(batch.args[0], x[:, task.channel_index]) and torch.equal(batch.args[1], y)


def test_paired_batches_with_augmentation_are_augmented_and_repeatable(breast_dataset, tmp_path):
    from modalseg.training.engine import Trainer

    trainer = Trainer(_paired(breast_dataset, tmp_path / "run", augmentation="strong"), callbacks=[])
    plain = Trainer(_paired(breast_dataset, tmp_path / "plain", augmentation="off"), callbacks=[])
    first = [b.args for b in trainer.task.batches(0, 0, trainer.precision)]
    again = [b.args for b in trainer.task.batches(0, 0, trainer.precision)]
    base = [b.args for b in plain.task.batches(0, 0, plain.precision)]
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, base, strict=True))
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # a mid-epoch start (resume) repeats the uninterrupted batches from there on
    later = [b.args for b in trainer.task.batches(0, 1, trainer.precision)]
    for (x1, y1), (x2, y2) in zip(first[1:], later, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_unpaired_training_with_augmentation_runs(cardiac_dataset, tmp_path):
    from modalseg.training.engine import Trainer

    cfg = TrainConfig(data=str(cardiac_dataset), output=str(tmp_path / "u"), setting="joint", model="dilated_fcn",
                      model_options={"width": 2}, epochs=1, steps_per_epoch=2, batch_size=2, precision="fp32",
                      progress=False, tensorboard=False, augmentation="medium")
    trainer = Trainer(cfg, callbacks=[])
    assert set(trainer.task.transforms_by_mod) == {"CT", "MR"}
    assert trainer.fit()["steps"] == 2
    assert np.isfinite(trainer.history[-1]["train_loss"])


def test_cost_benchmark_runs_and_its_percentages_follow(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import augment_cost

    rows = augment_cost.main(["--quick", "--strengths", "light", "--steps", "1", "--warmup", "0"])["results"]
    (row,) = rows
    assert row["strength"] == "light" and row["augment_ms"] > 0 and row["step_s"] > 0
    assert row["augment_pct"] == pytest.approx(100 * row["augment_ms"] / 1e3 / row["step_s"])
    assert "augment / step (%)" in capsys.readouterr().out


def test_a_run_from_before_augmentation_resumes_only_without_it(breast_dataset, tmp_path):
    """An older release did not augment: its checkpoint (no ``augmentation`` recorded) resumes with
    ``augmentation: off`` and is refused with the default (which would change the run), as ``foreground_fraction``."""
    from modalseg.training.checkpoint import load_checkpoint, save_checkpoint
    from modalseg.training.engine import Trainer

    run = tmp_path / "old"
    Trainer(_paired(breast_dataset, run, epochs=2, max_steps=1, augmentation="off"), callbacks=[]).save("latest.pt")
    latest = run / "fold_0" / "latest.pt"
    state = load_checkpoint(latest)
    for key in ("augmentation", "augmentation_options", "modality_dropout", "modality_dropout_master"):
        state["config"].pop(key)
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, latest)
    with pytest.raises(ConfigError, match=r"augmentation: \(not recorded: an older release\) -> 'medium'"):
        Trainer(_paired(breast_dataset, run, epochs=2), resume=True, callbacks=[])
    resumed = Trainer(_paired(breast_dataset, run, epochs=2, augmentation="off"), resume=True, callbacks=[])
    assert resumed.global_step == 0 and not resumed.task.transforms
