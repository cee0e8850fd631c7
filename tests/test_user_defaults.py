"""Honest defaults (issue 13): user data gets the default preset, validation scores whole volumes, best.pt is never
a degenerate epoch, predict says what it loads, nnU-Net's --fold meanings, a console a person reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from modalseg.data.preprocess import PreprocessConfig, preprocess_volume, restore_volume
from modalseg.data.sampling import EpochBatchSampler
from modalseg.training.checkpoint import load_checkpoint
from modalseg.training.config import TrainConfig
from modalseg.training.engine import Trainer, make_preprocess, resolve_recipe
from modalseg.training.tasks import SplitPrediction
from test_reliability import _img, make_dataset, run_cli, train_args


def _lesion_dataset(root: Path, n: int = 4, depth: int = 8) -> Path:
    """Paired T1C + T2W volumes 32x32xdepth whose lesion spans only slices 3-4 (the rest: background)."""
    rng = np.random.default_rng(0)
    aff = np.diag([0.8, 0.8, 3.0, 1.0])
    for k in range(n):
        lab = np.zeros((32, 32, depth), np.uint8)
        lab[10:18, 12:20, 3:5] = 1
        for c in range(2):
            img = rng.normal(100, 10, size=lab.shape).astype(np.float32) + 80 * lab
            _img(root / "imagesTr" / f"c{k}_000{c}.nii.gz", array=img, affine=aff)
        _img(root / "labelsTr" / f"c{k}.nii.gz", array=lab, affine=aff)
    meta = {"channel_names": {"0": "T1C", "1": "T2W"}, "labels": {"background": 0, "lesion": 1},
            "numTraining": n, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    values = dict(data=str(data), output=str(out), model="unet", model_options={"base_width": 4},
                  preprocess_options={"target_size": [32, 32]}, epochs=1, folds=2, batch_size=2, precision="fp32",
                  progress=False, tensorboard=False, num_threads=1)
    values.update(kw)
    return TrainConfig(**values)


# ------------------------------------------------------------------------------------------------ presets
def test_paired_auto_is_the_default_preset_and_paper_presets_are_unchanged(tmp_path):
    from modalseg.data.layouts import load_dataset

    spec = load_dataset(make_dataset(tmp_path / "ds"))
    cfg = resolve_recipe(TrainConfig(data="x"), spec)
    assert cfg.preprocess == "default" and cfg.foreground_fraction == pytest.approx(1 / 3)
    pp = make_preprocess(cfg)
    assert (pp.only_labelled_slices, pp.normalization, pp.crop) == (False, "zscore_volume_robust", "square")
    # the paper presets, as they were (experiment paper1 and the paper configs name them)
    assert PreprocessConfig.paper1().to_dict() == {
        "slice_axis": 2, "normalization": "max_slice", "target_size": [256, 256], "crop": "none", "crop_size": None,
        "only_labelled_slices": True}
    paper = resolve_recipe(TrainConfig(data="x", preprocess="paper1"), spec)
    assert paper.preprocess == "paper1" and paper.foreground_fraction == 0.0


def test_square_crop_keeps_the_aspect_ratio_and_is_inverted_exactly():
    """A 45x120 slice is padded to 120x120 and resized isotropically (the old default stretched it 5.7x by 2.1x)."""
    rng = np.random.default_rng(1)
    images = rng.normal(size=(1, 45, 120, 3)).astype(np.float32)
    label = np.zeros((45, 120, 3), np.int64)
    label[10:30, 40:90, :] = 1
    cfg = PreprocessConfig(normalization="zscore_volume_robust", crop="square", target_size=(240, 240))
    slices = preprocess_volume(images, label, cfg, spacing=(0.5, 0.5, 2.0))
    row, col = slices[0].spacing
    assert row == pytest.approx(col)  # square pixels stay square: nothing is stretched
    assert slices[0].image.shape == (1, 240, 240)
    restored = restore_volume([s.label for s in slices], [s.geometry for s in slices], 2, is_label=True)
    np.testing.assert_array_equal(restored, label)  # x2 up-sampling of the square: exact inverse


def test_robust_zscore_is_not_thrown_by_one_bright_voxel():
    rng = np.random.default_rng(2)
    vol = rng.normal(100, 10, size=(1, 32, 32, 4)).astype(np.float32)
    spiked = vol.copy()
    spiked[0, 0, 0, 0] = 1e6  # a bright artefact
    robust = PreprocessConfig(normalization="zscore_volume_robust")
    plain = PreprocessConfig(normalization="zscore_volume")

    def centre(cfg, v):
        return np.stack([s.image for s in preprocess_volume(v, None, cfg)])[..., 8:24, 8:24]

    assert np.abs(centre(robust, spiked) - centre(robust, vol)).max() < 0.05
    assert np.abs(centre(plain, spiked) - centre(plain, vol)).max() > 0.5  # why the default is robust


# ------------------------------------------------------------------------------------------------ oversampling
def test_foreground_oversampling_is_deterministic_and_equal_under_ddp_sharding():
    idx = np.arange(30)
    fg = idx % 10 == 0  # 3 foreground slices in 30
    single = EpochBatchSampler(idx, 6, seed=4, drop_last=True, foreground=fg, foreground_fraction=1 / 3)
    batches = [b.tolist() for b in single.batches(2)]
    assert batches == [b.tolist() for b in single.batches(2)]
    for b in batches:  # the last third of every batch holds foreground slices
        assert all(fg[i] for i in b[-2:])
    shards = [EpochBatchSampler(idx, 3, seed=4, drop_last=True, rank=r, world_size=2, foreground=fg,
                                foreground_fraction=1 / 3) for r in range(2)]
    merged = [a.tolist() + b.tolist() for a, b in zip(shards[0].batches(2), shards[1].batches(2), strict=True)]
    assert merged == batches
    plain = EpochBatchSampler(idx, 6, seed=4, drop_last=True)
    assert sum(fg[i] for b in plain.batches(2) for i in b) < sum(fg[i] for b in batches for i in b)


# ------------------------------------------------------------------------------------------------ validation
def _split(trainer, pred, val) -> SplitPrediction:
    """What ``Trainer.predict_split`` returns for the paired group ``all``, with ``pred`` as the prediction."""
    return SplitPrediction(pred, np.asarray(trainer.cache.labels[val]), [trainer.cache.records[i] for i in val], val)


def test_validation_scores_whole_volumes_so_false_positives_off_the_lesion_count(tmp_path, monkeypatch):
    """A model that floods the unlabelled slices with foreground: the default preset validates every slice, so
    its volume Dice is low; the paper preset's labelled-slice score (shown as such) would call it perfect."""
    data = _lesion_dataset(tmp_path / "ds")
    scores = {}
    for preset in ("default", "paper1"):
        trainer = Trainer(_cfg(data, tmp_path / preset, preprocess=preset), console=False)
        val = trainer.task.groups("val")["all"]
        slices_per_case = {trainer.cache.records[i]["case_id"] for i in val}
        assert len(val) == len(slices_per_case) * (8 if preset == "default" else 2)

        def flood(which="val", trainer=trainer, val=val):
            target = np.asarray(trainer.cache.labels[val])
            pred = target.copy()
            empty = ~target.reshape(len(val), -1).any(1)
            pred[empty] = 1  # false positives on every slice without lesion
            return {"all": _split(trainer, pred, val)}

        monkeypatch.setattr(trainer, "predict_split", flood)
        scores[preset] = (trainer.validate(), trainer.val_scope)
    assert scores["paper1"] == (1.0, "labelled-slice")
    assert scores["default"][1] == "volume" and scores["default"][0] < 0.2


def test_best_checkpoint_is_never_a_degenerate_epoch(tmp_path, monkeypatch):
    data = _lesion_dataset(tmp_path / "ds")
    trainer = Trainer(_cfg(data, tmp_path / "run", epochs=3), console=False)
    calls = {"n": 0}

    def predictions(which="val"):
        val = trainer.task.groups("val")["all"]
        target = np.asarray(trainer.cache.labels[val])
        calls["n"] += 1
        # epoch 1: everything foreground (Dice 0.4 > -inf would have become best), 2: right, 3: empty
        pred = {1: np.ones_like(target), 2: target.copy(), 3: np.zeros_like(target)}[calls["n"]]
        return {"all": _split(trainer, pred, val)}

    monkeypatch.setattr(trainer, "predict_split", predictions)
    trainer.fit()
    history = load_checkpoint(tmp_path / "run" / "fold_0" / "latest.pt")["history"]
    assert [h["degenerate"] for h in history] == [1, 0, 1]
    best = load_checkpoint(tmp_path / "run" / "fold_0" / "best.pt")
    assert best["epoch"] == 2 and best["best_epoch"] == 2 and best["best"] == 1.0


def test_a_run_with_only_degenerate_epochs_writes_no_best_and_predict_says_it_uses_latest(tmp_path, capsys,
                                                                                        monkeypatch):
    data = _lesion_dataset(tmp_path / "ds")
    trainer = Trainer(_cfg(data, tmp_path / "run"), console=False)

    def empty(which="val"):
        val = trainer.task.groups("val")["all"]
        target = np.asarray(trainer.cache.labels[val])
        return {"all": _split(trainer, np.zeros_like(target), val)}

    monkeypatch.setattr(trainer, "predict_split", empty)
    trainer.fit()
    fold = tmp_path / "run" / "fold_0"
    assert not (fold / "best.pt").exists() and (fold / "latest.pt").exists()
    files = [data / "imagesTr" / "c0_0000.nii.gz"]  # the U-Net reads the master (T1C) only
    code, out, err = run_cli(capsys, ["predict", "--model", str(tmp_path / "run"), "--input", *map(str, files),
                                      "--output", str(tmp_path / "pred"), "--precision", "fp32"])
    assert code == 0, err
    assert f"checkpoint {fold / 'latest.pt'} (epoch 1" in out
    assert "done: 1 case(s) written" in out and "latest.pt" in out.splitlines()[-1]


def test_predict_checkpoint_latest_or_best(tmp_path, capsys):
    data = _lesion_dataset(tmp_path / "ds")
    code, _, err = run_cli(capsys, train_args(data, tmp_path / "run", "--epochs", "2"))
    assert code == 0, err
    files = [data / "imagesTr" / "c1_0000.nii.gz"]  # the U-Net reads the master (T1C) only
    base = ["predict", "--model", str(tmp_path / "run" / "fold_0"), "--input", *map(str, files), "--precision",
            "fp32"]
    code, out, err = run_cli(capsys, [*base, "--output", str(tmp_path / "p1"), "--checkpoint", "latest"])
    assert code == 0, err
    assert "latest.pt (epoch 2" in out
    with pytest.raises(SystemExit) as exc:
        run_cli(capsys, [*base, "--output", str(tmp_path / "p2"), "--checkpoint", "newest"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "--checkpoint" in err[0]


# ------------------------------------------------------------------------------------------------ model auto, folds
def test_model_auto_says_what_it_picked_before_the_cache_is_built(tmp_path, capsys):
    data = make_dataset(tmp_path / "ds")
    args = [a for a in train_args(data, tmp_path / "run", "--set", "max_steps=1") if a not in ("--model", "unet")]
    args += ["--set", "model_options={base_width: 4, sa_reduction: 2}"]
    code, out, err = run_cli(capsys, args)
    assert code == 0, err
    first = out.splitlines()[0]
    assert first == "model auto: master_assistant (2 channels: T1C master, T2W assistant)"
    one = TrainConfig(data="x", modalities=["T2W"])
    from modalseg.data.layouts import load_dataset

    assert resolve_recipe(one, load_dataset(data)).model == "unet"


def test_fold_all_trains_one_model_on_every_case_and_fold_cv_every_fold(tmp_path, capsys):
    data = make_dataset(tmp_path / "ds")
    code, out, err = run_cli(capsys, train_args(data, tmp_path / "all", "--fold", "all", "--json"))
    assert code == 0, err
    [result] = json.loads(out)
    assert result["fold"] == "all" and Path(result["run_dir"]).name == "fold_all"
    state = load_checkpoint(tmp_path / "all" / "fold_all" / "latest.pt")
    assert state["config"]["train_all"] is True
    assert not (tmp_path / "all" / "fold_all" / "best.pt").exists()  # nothing held out, nothing to select on
    code, out, err = run_cli(capsys, train_args(data, tmp_path / "cv", "--fold", "cv", "--json"))
    assert code == 0, err
    assert [r["fold"] for r in json.loads(out)] == [0, 1]


# ------------------------------------------------------------------------------------------------ console
def test_train_prints_one_line_per_epoch_and_a_summary_not_json(tmp_path, capsys):
    data = make_dataset(tmp_path / "ds")
    code, out, err = run_cli(capsys, train_args(data, tmp_path / "run", "--epochs", "2"))
    assert code == 0, err
    lines = out.splitlines()
    epochs = [ln for ln in lines if ln.startswith("epoch ")]
    assert len(epochs) == 2 and all("train loss" in ln and "val volume Dice" in ln for ln in epochs)
    assert "training finished:" in lines and not out.lstrip().startswith("[")
    assert any("run 0 fold 0:" in ln and "epochs" in ln for ln in lines)


def test_output_piped_into_head_gives_no_traceback(tmp_path):
    data = make_dataset(tmp_path / "ds")
    cmd = f"{sys.executable} -m modalseg.cli.main verify {data} | head -c 10"
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_help_example_of_set_runs_as_written(tmp_path, capsys):
    from modalseg.cli.main import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    example = text[text.index("e.g. --set") + len("e.g. --set "):].split()[0].strip("'")
    assert example == "model_options={base_width:"  # quoted in the help: "--set 'model_options={base_width: 8}'"
    data = make_dataset(tmp_path / "ds")
    code, _, err = run_cli(capsys, train_args(data, tmp_path / "run", "--set", "model_options={base_width: 8}",
                                              "--set", "max_steps=1"))
    assert code == 0, err
    assert load_checkpoint(tmp_path / "run" / "fold_0" / "latest.pt")["meta"]["model_options"] == {"base_width": 8}


def test_default_preset_predictions_keep_the_input_geometry(tmp_path, capsys):
    data = _lesion_dataset(tmp_path / "ds")
    code, _, err = run_cli(capsys, train_args(data, tmp_path / "run"))
    assert code == 0, err
    files = [data / "imagesTr" / "c2_0000.nii.gz"]  # the U-Net reads the master (T1C) only
    code, _, err = run_cli(capsys, ["predict", "--model", str(tmp_path / "run"), "--input", *map(str, files),
                                    "--output", str(tmp_path / "pred"), "--precision", "fp32"])
    assert code == 0, err
    out, ref = nib.load(str(tmp_path / "pred" / "c2.nii.gz")), nib.load(str(files[0]))
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out.affine, ref.affine)


# ------------------------------------------------------------------------------------------------ CT
def test_ct_channels_use_the_training_cases_foreground_statistics(tmp_path, capsys):
    """nnU-Net's CT normalisation: one mapping for every CT volume (clip to the foreground's 0.5/99.5 percentiles,
    z-score with its mean/std), so the same tissue maps to the same value however much air a scan holds."""
    from modalseg.data.layouts import load_dataset

    rng = np.random.default_rng(3)
    root = tmp_path / "ct"
    aff = np.diag([0.8, 0.8, 3.0, 1.0])
    for k in range(4):
        lab = np.zeros((16, 16, 2), np.uint8)
        lab[4:10, 5:11, :] = 1
        ct = np.where(lab > 0, 40.0, 0.0).astype(np.float32)
        if k % 2:
            ct[:, 12:, :] = -1000.0  # air beside the body in odd cases only
        ct = ct.astype(np.float32)
        ct += rng.normal(0, 5, size=ct.shape).astype(np.float32)
        _img(root / "imagesTr" / f"c{k}_0000.nii.gz", array=ct, affine=aff)
        _img(root / "imagesTr" / f"c{k}_0001.nii.gz", array=rng.normal(100, 10, size=lab.shape).astype(np.float32),
             affine=aff)
        _img(root / "labelsTr" / f"c{k}.nii.gz", array=lab, affine=aff)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "MR"}, "labels": {"background": 0, "organ": 1}, "numTraining": 4,
        "file_ending": ".nii.gz"}))
    spec = load_dataset(root)
    pp = make_preprocess(resolve_recipe(TrainConfig(data=str(root)), spec), spec)
    assert pp.normalization == ["ct_dataset", "zscore_volume_robust"]
    fg = np.concatenate([nib.load(str(root / "imagesTr" / f"c{k}_0000.nii.gz")).get_fdata()[4:10, 5:11, :].ravel()
                         for k in range(4)])
    stats = pp.intensity_stats[0]
    assert stats["mean"] == pytest.approx(fg.mean(), rel=1e-5) and stats["std"] == pytest.approx(fg.std(), rel=1e-4)
    assert (stats["lo"], stats["hi"]) == pytest.approx(tuple(np.percentile(fg, (0.5, 99.5))), rel=1e-5)
    assert pp.intensity_stats[1] is None

    def organ(case: int, cfg: PreprocessConfig) -> float:
        images = np.stack([nib.load(str(root / "imagesTr" / f"c{case}_000{c}.nii.gz")).get_fdata() for c in (0, 1)])
        return float(np.mean([s.image[0][4:10, 5:11].mean() for s in preprocess_volume(
            images.astype(np.float32), None, PreprocessConfig.from_dict({**cfg.to_dict(), "target_size": None,
                                                                          "crop": "none"}))]))

    # with and without air: the same organ value (within the noise: std 1 per voxel after normalisation)
    assert organ(0, pp) == pytest.approx(organ(1, pp), abs=0.3)
    per_volume = PreprocessConfig(normalization="zscore_volume_robust")
    assert abs(organ(0, per_volume) - organ(1, per_volume)) > 1.0  # why CT is not z-scored per volume
    code, _, err = run_cli(capsys, train_args(root, tmp_path / "run", "--set", "max_steps=1"))
    assert code == 0, err
    meta = load_checkpoint(tmp_path / "run" / "fold_0" / "latest.pt")["meta"]
    assert meta["preprocess"]["intensity_stats"][0] == pytest.approx(stats)  # predict applies the same mapping


def test_nnunet_ignore_label_is_not_trained_as_a_class(tmp_path, capsys):
    """The ignore label is read (no longer refused) and is never a class: training leaves its voxels out
    (tests/test_ignore_regions.py)."""
    from modalseg.data.layouts import load_dataset
    from modalseg.data.types import IGNORE_INDEX

    data = make_dataset(tmp_path / "ds", labels={"background": 0, "mass": 1, "ignore": 2})
    code, _, err = run_cli(capsys, ["verify", str(data)])
    assert code == 0 and err == [], err
    spec = load_dataset(data)
    assert spec.labels == {"background": 0, "mass": 1} and spec.num_classes == 2 and spec.ignore_label == 2
    assert spec.label_lut() == {0: 0, 1: 1, 2: IGNORE_INDEX}


def test_ct_statistics_are_computed_once_per_set_of_files(tmp_path, monkeypatch):
    import modalseg.data.intensity as intensity

    root = make_dataset(tmp_path / "ds")
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "MR"}
    (root / "dataset.json").write_text(json.dumps(meta))
    from modalseg.data.layouts import load_dataset

    spec = load_dataset(root)
    calls = []
    real = intensity._compute
    monkeypatch.setattr(intensity, "_compute", lambda *a: calls.append(1) or real(*a))
    first = intensity.dataset_intensity_stats(spec, [0], memo_dir=tmp_path / "memo")
    again = intensity.dataset_intensity_stats(spec, [0], memo_dir=tmp_path / "memo")
    assert again == first and len(calls) == 1
    image = root / "imagesTr" / "c0_0000.nii.gz"
    _img(image, seed=99)  # an edited file: its statistics are computed anew
    intensity.dataset_intensity_stats(spec, [0], memo_dir=tmp_path / "memo")
    assert len(calls) == 2
