"""Issue 16 item 5: test-time flips (an inferer over any inferer) and post-processing chosen by cross-validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modalseg.errors import ConfigError
from modalseg.inference import SliceInferer, TorchBackend
from modalseg.inference.postprocess import PostProcessing, determine, load_postprocessing, mean_dice
from modalseg.inference.tta import FlipTTA, flip_combinations, with_tta
from modalseg.training.precision import resolve_precision


def _backend() -> TorchBackend:
    from modalseg.models import create_model

    torch.manual_seed(0)
    net = create_model("unet", num_modalities=1, in_channels=1, num_classes=3, base_width=4)
    return TorchBackend(net, resolve_precision(torch.device("cpu"), "fp32"))


def test_flip_tta_is_the_mean_of_the_mirrored_predictions_mirrored_back():
    backend = _backend()
    images = np.random.default_rng(0).normal(size=(3, 1, 32, 32)).astype(np.float32)
    plain = SliceInferer(batch_size=2)
    expected = np.mean([
        plain(backend, images),
        plain(backend, images[:, :, ::-1].copy())[:, :, ::-1],
        plain(backend, images[:, :, :, ::-1].copy())[:, :, :, ::-1],
        plain(backend, images[:, :, ::-1, ::-1].copy())[:, :, ::-1, ::-1],
    ], axis=0)
    got = FlipTTA(plain)(backend, images)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert not np.allclose(got, plain(backend, images))  # an untrained net is not mirror-symmetric
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    assert flip_combinations((-2, -1)) == [(), (-2,), (-1,), (-2, -1)]
    assert with_tta(plain, "none") is plain
    with pytest.raises(ConfigError, match="--tta must be one of none, flip"):
        with_tta(plain, "rotate")


def test_largest_component_and_min_size_per_label():
    labels = np.zeros((12, 12, 3), np.int16)
    labels[1:5, 1:5, :] = 2  # 48 voxels
    labels[8:10, 8:10, 0] = 2  # 4 voxels, separate
    labels[8:9, 1:2, 1] = 1  # 1 voxel of another label
    largest = PostProcessing({2: "largest-component"}).apply(labels)
    assert (largest == 2).sum() == 48 and (largest == 1).sum() == 1 and largest[8, 8, 0] == 0
    pruned = PostProcessing.for_all("min-size=2", [0, 1, 2]).apply(labels)
    assert (pruned == 1).sum() == 0 and (pruned == 2).sum() == 52
    assert labels[8, 8, 0] == 2  # the input is not modified
    for bad in ("biggest", "min-size=0", "min-size=x"):
        with pytest.raises(ConfigError, match="unknown post-processing"):
            PostProcessing.for_all(bad, [0, 1])
    with pytest.raises(ConfigError, match="background"):
        PostProcessing({0: "largest-component"})


def test_determine_keeps_an_operation_only_where_cross_validation_dice_improves():
    ref = np.zeros((10, 10, 2), np.uint8)
    ref[2:6, 2:6] = 1
    ref[7:9, 7:9] = 2
    pred = ref.copy()
    pred[0, 9, 0] = 1  # a stray false positive of label 1: removing it helps
    pred2 = ref.copy()  # label 2 correct and in two pieces in the reference: largest-component would hurt
    ref2 = ref.copy()
    ref2[0:2, 7:9] = 2
    pred2[0:2, 7:9] = 2
    decision, rows = determine([(pred, ref), (pred2, ref2)], [0, 1, 2])
    assert decision.rules == {1: "largest-component"}
    by_label = {r["label"]: r for r in rows}
    assert by_label[1]["dice_after"] > by_label[1]["dice_before"]
    assert by_label[2]["dice_after"] < by_label[2]["dice_before"] and not by_label[2]["kept"]
    assert mean_dice([(ref, ref)], 1) == 1.0


def test_postprocess_determine_on_a_cross_validation_run(tmp_path, capsys):
    from modalseg.cli.main import main
    from test_reliability import make_dataset, train_args

    data = make_dataset(tmp_path / "ds", n=4)
    run = tmp_path / "run"
    assert main(train_args(data, run, "--fold", "cv", "--set", "max_steps=1")) == 0
    capsys.readouterr()
    assert main(["postprocess", "--determine", str(run)]) == 0
    out = capsys.readouterr().out
    assert "fold 0: 2 validation case(s) predicted" in out and "fold 1: 2 validation case(s) predicted" in out
    assert "label 1: largest-component mean Dice" in out
    saved = json.loads((run / "postprocessing.json").read_text())
    assert saved["cases"] == 4 and [d["label"] for d in saved["decisions"]] == [1]
    decision = load_postprocessing(run)
    assert decision is not None and set(decision.rules) <= {1}
    assert main(["postprocess", "--determine", str(tmp_path / "ds")]) == 2  # not a run folder: one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no splits.json" in err[0]


def test_predict_cli_tta_and_postprocessing(trained_run, tmp_path, capsys):
    from scipy import ndimage

    from modalseg.cli.main import main
    from modalseg.data.io import read_volume

    data, run = trained_run
    images = data / "imagesTr"
    base = ["predict", "--model", str(run), "--checkpoint", "latest", "--input", str(images), "--precision", "fp32"]
    assert main([*base, "--output", str(tmp_path / "plain"), "--postprocess", "none"]) == 0
    assert main([*base, "--output", str(tmp_path / "tta"), "--tta", "flip", "--postprocess", "none"]) == 0
    out = capsys.readouterr().out
    assert "test-time flips" in out
    plain = sorted((tmp_path / "plain").glob("*.nii.gz"))
    assert plain and [p.name for p in plain] == sorted(p.name for p in (tmp_path / "tta").glob("*.nii.gz"))
    assert main([*base, "--output", str(tmp_path / "largest"), "--postprocess", "largest-component"]) == 0
    assert "post-processing: label 1: largest-component" in capsys.readouterr().out
    for path in sorted((tmp_path / "largest").glob("*.nii.gz")):
        labels = read_volume(path, kind="label").array
        assert ndimage.label(labels == 1)[1] <= 1
        before = read_volume(tmp_path / "plain" / path.name, kind="label").array
        assert ((labels == 1) <= (before == 1)).all()  # only removes
    # auto: the run's decision file is applied (here one that removes every component)
    (run / "postprocessing.json").write_text(json.dumps(PostProcessing({1: "min-size=1000000"}).to_dict()))
    try:
        assert main([*base, "--output", str(tmp_path / "auto")]) == 0
        assert "post-processing: label 1: min-size=1000000" in capsys.readouterr().out
        assert all(not read_volume(p, kind="label").array.any() for p in (tmp_path / "auto").glob("*.nii.gz"))
    finally:
        (run / "postprocessing.json").unlink()
    for option, value in (("--tta", "rotate"), ("--postprocess", "biggest")):
        assert main([*base, "--output", str(tmp_path / "bad"), option, value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and value in err[0]
    assert not (tmp_path / "bad").exists()


def test_3d_flip_tta_mirrors_the_slice_axis_too():
    """A 3D network's ``--tta flip``: 8 mirrored sliding-window predictions (slices, rows, columns), each mirrored
    back, averaged; 2D keeps its 4 in-plane mirrors."""
    from modalseg.inference.inferers import SlidingWindowInferer
    from modalseg.inference.tta import tta_axes
    from modalseg.models import create_model

    assert tta_axes(2) == (-2, -1) and tta_axes(3) == (0, -2, -1)
    torch.manual_seed(0)
    net = create_model("unet", num_modalities=1, in_channels=1, num_classes=2, base_width=2, depth=2,
                       spatial_dims=3)
    backend = TorchBackend(net, resolve_precision(torch.device("cpu"), "fp32"))
    images = np.random.default_rng(1).normal(size=(8, 1, 8, 8)).astype(np.float32)
    plain = SlidingWindowInferer((8, 8, 8))
    combos = flip_combinations((0, -2, -1))
    assert len(combos) == 8
    expected = np.mean([np.flip(plain(backend, np.ascontiguousarray(np.flip(images, a) if a else images)), a)
                        if a else plain(backend, images) for a in combos], axis=0)
    got = with_tta(plain, "flip", tta_axes(3))(backend, images)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="axes 0"):
        FlipTTA(plain, (1,))
