"""nnU-Net's ``ignore`` label and region-based labels (BraTS) in training, validation and predict (issue 13, item 4).

* ignore: parsed (never a class), cached as IGNORE_INDEX, not foreground, left out of every loss term (paired,
  region, unpaired incl. the paper-2 auxiliary terms), of validation Dice and of the tables; never predicted.
* regions: one sigmoid channel per region, BCE + batch Dice, validation per region, predict paints
  ``regions_class_order`` in order; ``modalseg evaluate --dataset`` scores the predictions; refusals are one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from modalseg.data.layouts import load_dataset
from modalseg.data.types import IGNORE_INDEX, foreground_mask
from modalseg.errors import ConfigError, DataError
from modalseg.training.config import TrainConfig
from modalseg.training.engine import Trainer
from test_reliability import _img, assert_refused, run_cli

AFF = np.diag([0.8, 0.8, 3.0, 1.0])
SIZE, DEPTH = 32, 4
BRATS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}


def _write_case(root: Path, k: int, lab: np.ndarray, channels: int, rng: np.random.Generator) -> None:
    for c in range(channels):
        img = rng.normal(100, 10, size=lab.shape).astype(np.float32) + 30 * (lab % 10) * (c + 1)
        _img(root / "imagesTr" / f"c{k}_{c:04d}.nii.gz", array=img, affine=AFF)
    _img(root / "labelsTr" / f"c{k}.nii.gz", array=lab.astype(np.uint8), affine=AFF)


def _ignore_dataset(root: Path, n: int = 4) -> Path:
    """Paired T1C + T2W, a lesion (1) and a band of unannotated voxels (ignore = 2) on every slice."""
    rng = np.random.default_rng(0)
    for k in range(n):
        lab = np.zeros((SIZE, SIZE, DEPTH), np.uint8)
        lab[10:18, 12:20, 1:3] = 1
        lab[:, 26:30, :] = 2  # ignored: slices 0 and 3 hold nothing but background and ignore
        _write_case(root, k, lab, 2, rng)
    meta = {"channel_names": {"0": "T1C", "1": "T2W"}, "labels": {"background": 0, "lesion": 1, "ignore": 2},
            "numTraining": n, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _brats_dataset(root: Path, n: int = 4, ignore: bool = False, **extra) -> Path:
    """Paired FLAIR + T1gd with nested BraTS-style labels: oedema 1 around a core 2 around an enhancing 3
    (``ignore``: plus a band of unannotated voxels, ignore = 4)."""
    rng = np.random.default_rng(1)
    for k in range(n):
        lab = np.zeros((SIZE, SIZE, DEPTH), np.uint8)
        lab[6:22, 6:22, 1:3] = 1
        lab[9:19, 9:19, 1:3] = 2
        lab[12:16, 12:16, 1:3] = 3
        if ignore:
            lab[:, 26:30, :] = 4
        _write_case(root, k, lab, 2, rng)
    labels = {**BRATS, "ignore": 4} if ignore else BRATS
    meta = {"channel_names": {"0": "FLAIR", "1": "T1gd"}, "labels": labels, "regions_class_order": [1, 2, 3],
            "numTraining": n, "file_ending": ".nii.gz", **extra}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    values = dict(data=str(data), output=str(out), model="unet", model_options={"base_width": 4},
                  preprocess_options={"target_size": [SIZE, SIZE]}, epochs=1, max_steps=3, folds=2, batch_size=2,
                  precision="fp32", progress=False, tensorboard=False, num_threads=1)
    values.update(kw)
    return TrainConfig(**values)


# ------------------------------------------------------------------------------------------------ dataset, cache
def test_ignore_label_is_parsed_cached_as_reserved_index_and_not_foreground(tmp_path):
    from modalseg.data.cache import build_slice_cache, cache_fingerprint
    from modalseg.data.preprocess import PreprocessConfig

    data = _ignore_dataset(tmp_path / "ds")
    spec = load_dataset(data)
    assert spec.labels == {"background": 0, "lesion": 1} and spec.ignore_label == 2 and spec.regions is None
    assert spec.label_lut() == {0: 0, 1: 1, 2: IGNORE_INDEX}
    pp = PreprocessConfig(target_size=None, crop="none")
    cache = build_slice_cache(spec, pp, tmp_path / "cache")
    labels = np.asarray(cache.labels)
    assert set(np.unique(labels)) == {0, 1, IGNORE_INDEX}
    # slices 0 and 3 hold only ignored voxels: not foreground (oversampling, only_labelled_slices)
    assert [r["foreground"] for r in cache.records[:DEPTH]] == [False, True, True, False]
    assert set(cache.foreground_locations(0)[:, 0]) == {1}  # no patch is centred on an ignored voxel
    # the same files with value 2 as a class: another lut, another cache
    as_class = load_dataset(data)
    as_class.labels, as_class.ignore_label = {"background": 0, "lesion": 1, "other": 2}, None
    assert cache_fingerprint(spec, pp, spec.cases) != cache_fingerprint(as_class, pp, as_class.cases)
    only = build_slice_cache(spec, PreprocessConfig(target_size=None, crop="none", only_labelled_slices=True),
                             tmp_path / "cache")
    assert sorted({r["z"] for r in only.records}) == [1, 2]


def test_foreground_mask_bbox_and_selection_ignore_the_ignore_index():
    from modalseg.data.transforms import Sample, SelectSlices, bbox_for_volume

    label = np.zeros((3, 20, 20), np.int64)
    label[1, 2:6, 2:6] = 1
    label[:, 14:20, 14:20] = IGNORE_INDEX
    assert not foreground_mask(label)[:, 14:, 14:].any() and foreground_mask(label).sum() == 16
    # the box centres on the lesion only (the ignored corner would pull it towards (17, 17))
    assert bbox_for_volume(label, 0, 8) == (0, 0, 8, 8)
    out, record = SelectSlices(True).forward(Sample(np.zeros((1, 3, 20, 20), np.float32), label))
    assert record["foreground"] == [False, True, False] and out.label.shape[0] == 1


def test_region_dataset_spec_keeps_label_values():
    import tempfile

    data = _brats_dataset(Path(tempfile.mkdtemp()) / "ds", n=1)
    spec = load_dataset(data)
    assert spec.regions == {"whole tumor": (1, 2, 3), "tumor core": (2, 3), "enhancing tumor": (3,)}
    assert spec.labels == {"background": 0, "whole tumor": 1, "tumor core": 2, "enhancing tumor": 3}
    assert spec.output_labels == {"whole tumor": 1, "tumor core": 2, "enhancing tumor": 3}
    assert spec.label_lut() == {0: 0, 1: 1, 2: 2, 3: 3}  # the cache keeps label values; regions built on the fly
    meta = json.loads((data / "dataset.json").read_text())
    meta["labels"] = {**BRATS, "ignore": 4}
    (data / "dataset.json").write_text(json.dumps(meta))
    both = load_dataset(data)
    assert both.label_lut() == {0: 0, 1: 1, 2: 2, 3: 3, 4: IGNORE_INDEX} and both.labels == spec.labels


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"regions_class_order": [1, 2]}, "'regions_class_order' must list one integer per region (3), found [1, 2]"),
        ({"regions_class_order": None}, "key 'regions_class_order' is required with region-based labels"),
        ({"regions_class_order": [1, 3, 2]}, "the value 2 painted for region 'enhancing tumor' is not one of"),
        ({"regions_class_order": [3, 3, 3]}, "must paint each region with its own value, found [3, 3, 3]"),
        ({"labels": {**BRATS, "tumor core": [3]}}, "regions 'tumor core' and 'enhancing tumor' have the same values"),
        ({"labels": {**BRATS, "tumor core": [0, 2]}}, "'tumor core' includes the background value 0"),
        ({"labels": {**BRATS, "ignore": 2}}, "the ignore label 2 is also the value of 'whole tumor'"),
        ({"labels": {"background": 0, "ignore": 1, "mass": 2}}, "the ignore label 1 must be the highest label value"),
        ({"labels": {**BRATS, "enhancing tumor": [3, 300]}, "regions_class_order": [1, 2, 3]},
         "region label values must be at most 254"),
    ],
)
def test_malformed_regions_and_ignore_are_one_line(tmp_path, capsys, change, fragment):
    data = _brats_dataset(tmp_path / "ds", n=1)
    meta = json.loads((data / "dataset.json").read_text())
    meta.update(change)
    meta = {k: v for k, v in meta.items() if v is not None}
    (data / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError) as info:
        load_dataset(data)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    code, _, err = run_cli(capsys, ["verify", str(data)])
    assert_refused(code, err, data / "dataset.json", fragment)


def test_unpaired_region_training_is_refused_in_one_line(tmp_path, capsys):
    from test_reliability import train_args

    data = _brats_dataset(tmp_path / "ds", n=2)
    meta = json.loads((data / "dataset.json").read_text())
    meta.update({"paired": False, "modalities": ["FLAIR", "T1gd"], "channel_names": {"0": "image"},
                 "case_modality": {"c0": "FLAIR", "c1": "T1gd"}})
    (data / "dataset.json").write_text(json.dumps(meta))
    for k in range(2):
        (data / "imagesTr" / f"c{k}_0001.nii.gz").unlink()
    code, _, err = run_cli(capsys, train_args(data, tmp_path / "run"))
    assert code == 2 and len(err) == 1 and "region training is paired only" in err[0], err


# ------------------------------------------------------------------------------------------------ losses
def _ignored_batch(classes: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, classes, 8, 8, generator=g)
    target = torch.randint(0, classes, (2, 8, 8), generator=g)
    ignored = torch.zeros(2, 8, 8, dtype=torch.bool)
    ignored[:, :, 5:] = True
    return logits, torch.where(ignored, IGNORE_INDEX, target), ignored


def test_dice_ce_with_ignore_matches_monai_without_ignored_voxels_and_excludes_them():
    from modalseg.losses.dice_ce import DiceCELoss

    logits, target, ignored = _ignored_batch()
    clean = torch.where(ignored, 0, target)
    masked, plain = DiceCELoss(ignore_index=IGNORE_INDEX), DiceCELoss()
    assert masked(logits, clean).item() == pytest.approx(plain(logits, clean).item(), rel=1e-6)
    loss = masked(logits, target)
    # logits at ignored voxels are anything: the loss does not change, and their gradient is zero
    other = logits.clone()
    other[ignored.unsqueeze(1).expand_as(other)] = 50.0
    assert masked(other, target).item() == loss.item()
    x = logits.clone().requires_grad_(True)
    masked(x, target).backward()
    assert torch.all(x.grad[ignored.unsqueeze(1).expand_as(x)] == 0)
    # the CE term is the mean over the annotated voxels only
    ce_only = DiceCELoss(ignore_index=IGNORE_INDEX, alpha=1.0)._masked(logits, target, IGNORE_INDEX) - \
        DiceCELoss(ignore_index=IGNORE_INDEX, alpha=0.0)._masked(logits, target, IGNORE_INDEX)
    valid = ~ignored
    expected = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[valid], target[valid])
    assert ce_only.item() == pytest.approx(expected.item(), rel=1e-5)
    # a batch with nothing annotated: finite (nnU-Net's CE 0), not NaN
    assert torch.isfinite(masked(logits, torch.full_like(target, IGNORE_INDEX)))


def test_paired_and_region_losses_ignore_image_values_under_ignore():
    """With a per-pixel network (1x1 conv), changing the image under the ignored voxels leaves the training loss
    unchanged: those voxels reach no loss term."""
    from modalseg.training.tasks import PairedLoss, RegionLoss

    torch.manual_seed(0)
    regions = [(1, 2), (2,), (1,)]
    net = nn.Conv2d(2, 3, 1)
    _, target, ignored = _ignored_batch()
    clean = torch.where(ignored, 0, target)  # the same voxels annotated as background instead
    x = torch.randn(2, 2, 8, 8)
    changed = x.clone()
    changed[ignored.unsqueeze(1).expand_as(x)] = -1000.0
    pairs = [(PairedLoss(net, 1.0, ignore_index=IGNORE_INDEX), PairedLoss(net, 1.0)),
             (RegionLoss(net, regions, 1.0, ignore_index=IGNORE_INDEX), RegionLoss(net, regions, 1.0))]
    for masked, plain in pairs:
        a, _ = masked(x, target)
        b, _ = masked(changed, target)
        assert torch.isfinite(a) and a.item() == pytest.approx(b.item(), rel=1e-6, abs=1e-7), type(masked)
        # the check can fail: where those voxels count (as background), the changed image changes the loss
        assert plain(x, clean)[0].item() != pytest.approx(plain(changed, clean)[0].item(), rel=1e-3)


def test_region_loss_is_bce_plus_batch_dice():
    from modalseg.losses.regions import RegionDiceBCELoss, region_targets

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 6, 6, generator=g)
    target = torch.randint(0, 4, (2, 6, 6), generator=g)
    y = region_targets(target, [(1, 2, 3), (2, 3), (3,)])
    assert torch.equal(y[:, 0].bool(), target > 0) and torch.equal(y[:, 2].bool(), target == 3)
    assert torch.all(y[:, 2] <= y[:, 1]) and torch.all(y[:, 1] <= y[:, 0])  # nested targets
    p = torch.sigmoid(logits)
    inter = (p * y).sum(dim=(0, 2, 3))
    dice = (2 * inter + 1e-5) / (p.sum(dim=(0, 2, 3)) + y.sum(dim=(0, 2, 3)) + 1e-5)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + 1 - dice.mean()
    got = RegionDiceBCELoss([(1, 2, 3), (2, 3), (3,)])(logits, target)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_unpaired_losses_and_auxiliary_terms_leave_ignored_voxels_out():
    from modalseg.models.unpaired import UnpairedSegmenter
    from modalseg.training.tasks import UnpairedLoss

    net = UnpairedSegmenter("dilated_fcn", ["CT", "MR"], "csa", num_classes=3, width=2)
    logits, target, ignored = _ignored_batch()
    spread = ignored.unsqueeze(1).expand_as(logits)
    for setting, form in (("csa", "per_image"), ("ummkd", "ummkd_batch")):
        loss = UnpairedLoss(net, setting, ce_weight=1.0, affinity_weight=1.0, kd_weight=0.5, kd_temperature=2.0,
                            conv_l2=0.0, dice_form=form, ignore_index=IGNORE_INDEX)
        onehot = loss._one_hot(target, 3)
        assert onehot.shape == (2, 3, 8, 8) and torch.all(onehot[spread] == 0)
        assert torch.all(onehot.sum(1)[~ignored] == 1)
        other = logits.clone()
        other[spread] = 25.0
        seg = loss._segmentation(logits, target, onehot)
        assert torch.isfinite(seg) and seg.item() == pytest.approx(loss._segmentation(other, target, onehot).item())
        if setting == "ummkd":
            aux = loss.auxiliary([logits, logits.flip(0)], [onehot, onehot.flip(0)], [{}, {}])
            moved = loss.auxiliary([other, other.flip(0)], [onehot, onehot.flip(0)], [{}, {}])
            assert aux.item() == pytest.approx(moved.item(), rel=1e-6)
    from modalseg.losses.affinity import class_affinity

    feats = torch.randn(2, 4, 8, 8)
    moved = feats.clone()
    moved[ignored.unsqueeze(1).expand_as(moved)] = 9.0
    onehot = UnpairedLoss(net, "csa", ce_weight=1.0, affinity_weight=1.0, kd_weight=0.5, kd_temperature=2.0,
                          conv_l2=0.0, ignore_index=IGNORE_INDEX)._one_hot(target, 3)
    assert torch.allclose(class_affinity(feats, feats, onehot), class_affinity(moved, moved, onehot))


# ------------------------------------------------------------------------------------------------ validation
def test_validation_dice_and_degenerate_check_ignore_the_ignored_voxels():
    from modalseg.training.inference import foreground_dice_per_group, score_groups

    target = np.zeros((2, 8, 8), np.uint8)
    target[:, 2:5, 2:5] = 1
    target[:, :, 6:] = IGNORE_INDEX
    pred = np.where(target == IGNORE_INDEX, 1, target).astype(np.uint8)  # wrong only under ignore
    groups = ["p", "p"]
    assert foreground_dice_per_group(pred, target, groups, 2, ignore_index=IGNORE_INDEX) == {"p": 1.0}
    assert foreground_dice_per_group(pred, np.where(target == IGNORE_INDEX, 0, target), groups, 2)["p"] < 0.6
    only_ignore = np.where(target == IGNORE_INDEX, 1, 0).astype(np.uint8)  # foreground only where unannotated
    scores = score_groups(only_ignore, target, groups, 2, ignore_index=IGNORE_INDEX)
    assert scores.empty == [True] and scores.full == [False] and scores.any_foreground
    # regions: a region is the union of its values in both maps
    painted, ref = np.array([[[1, 2, 3, 0]]], np.uint8), np.array([[[1, 3, 3, 0]]], np.uint8)
    dice = foreground_dice_per_group(painted, ref, ["p"], 3, classes=[(1, 2, 3), (2, 3), (3,)])
    assert dice["p"] == pytest.approx(np.mean([1.0, 1.0, 2 / 3]))


def test_ignore_dataset_trains_validates_and_never_predicts_the_ignore_value(tmp_path, capsys):
    from modalseg.data.io import read_volume
    from modalseg.training.checkpoint import read_checkpoint
    from modalseg.training.evaluate import evaluate_trainer

    data = _ignore_dataset(tmp_path / "ds")
    trainer = Trainer(_cfg(data, tmp_path / "run"), console=False)
    summary = trainer.fit()
    assert summary["steps"] == 3 and all(np.isfinite(h["train_loss"]) for h in trainer.history)
    assert np.isfinite(trainer.validate())
    meta = read_checkpoint(trainer.run_dir / "latest.pt").meta
    assert meta.labels == {"background": 0, "lesion": 1} and meta.num_classes == 2 and meta.ignore_label == 2
    split = trainer.predict_split("val")["all"]
    assert IGNORE_INDEX in split.target and IGNORE_INDEX not in split.pred
    evaluate_trainer(trainer, checkpoint="latest.pt")  # tables: the ignored voxels are background in both maps
    rows = (trainer.run_dir / "validation.csv").read_text()
    assert "lesion" in rows and "ignore" not in rows
    out = tmp_path / "pred"
    code, _, err = run_cli(capsys, ["predict", "--model", str(tmp_path / "run"), "--input", str(data / "imagesTr"),
                                    "--output", str(out), "--probabilities", "--precision", "fp32",
                                    "--checkpoint", "latest"])
    assert code == 0, err
    for k in range(4):
        assert set(np.unique(read_volume(out / f"c{k}.nii.gz", kind="label").array)) <= {0, 1}
    assert sorted(p.name for p in out.glob("c0_prob_*")) == ["c0_prob_background.nii.gz", "c0_prob_lesion.nii.gz"]


def test_unpaired_ignore_dataset_trains(tmp_path):
    from modalseg.data.synth import make_cardiac_dataset

    root = tmp_path / "cardiac"
    make_cardiac_dataset(root, num_patients_per_modality=3, slices=2, size=32, seed=2)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {**meta["labels"], "ignore": 700}
    (root / "dataset.json").write_text(json.dumps(meta))
    for f in (root / "labelsTr").glob("*.nii.gz"):
        img = nib.load(str(f))
        lab = np.asarray(img.dataobj).astype(np.int16)
        lab[:, :4] = 700
        nib.save(nib.Nifti1Image(lab, img.affine), str(f))
    for setting, form in (("csa", "per_image"), ("ummkd", "ummkd_batch")):
        cfg = TrainConfig(data=str(root), output=str(tmp_path / setting), setting=setting, model="dilated_fcn",
                          model_options={"width": 2}, epochs=1, steps_per_epoch=2, batch_size=2, folds=3,
                          precision="fp32", progress=False, tensorboard=False, dice_form=form, num_threads=1)
        trainer = Trainer(cfg, console=False)
        trainer.fit()
        assert np.isfinite(trainer.history[-1]["train_loss"]) and np.isfinite(trainer.history[-1]["val_dice"])


# ------------------------------------------------------------------------------------------------ regions
@pytest.mark.parametrize("ignore", [False, True])
def test_region_dataset_trains_validates_predicts_and_evaluates(tmp_path, capsys, ignore):
    from modalseg.data.io import read_volume
    from modalseg.training.checkpoint import read_checkpoint
    from modalseg.training.evaluate import evaluate_trainer

    data = _brats_dataset(tmp_path / "ds", ignore=ignore)
    trainer = Trainer(_cfg(data, tmp_path / "run"), console=False)
    trainer.fit()
    assert np.isfinite(trainer.history[-1]["train_loss"]) and 0.0 <= trainer.validate() <= 1.0
    meta = read_checkpoint(trainer.run_dir / "latest.pt").meta
    assert (meta.activation, meta.num_classes) == ("sigmoid", 3)
    assert meta.labels == {"whole tumor": 1, "tumor core": 2, "enhancing tumor": 3}
    assert meta.regions == {"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
    assert meta.ignore_label == (4 if ignore else None)
    assert trainer.network(torch.zeros(1, 1, SIZE, SIZE)).shape[1] == 3  # no background channel
    split = trainer.predict_split("val")["all"]
    assert set(np.unique(split.pred)) <= {0, 1, 2, 3}
    evaluate_trainer(trainer, checkpoint="latest.pt")
    text = (trainer.run_dir / "validation.csv").read_text()
    assert all(name in text for name in ("whole tumor", "tumor core", "enhancing tumor"))

    out = tmp_path / "pred"
    code, _, err = run_cli(capsys, ["predict", "--model", str(tmp_path / "run"), "--input", str(data / "imagesTr"),
                                    "--output", str(out), "--probabilities", "--precision", "fp32",
                                    "--checkpoint", "latest"])
    assert code == 0, err
    assert sorted(p.name for p in out.glob("c0_prob_*")) == [
        "c0_prob_enhancing tumor.nii.gz", "c0_prob_tumor core.nii.gz", "c0_prob_whole tumor.nii.gz"]
    for k in range(4):
        labels = read_volume(out / f"c{k}.nii.gz", kind="label").array
        assert set(np.unique(labels)) <= {0, 1, 2, 3}
        whole, core, enhancing = np.isin(labels, [1, 2, 3]), np.isin(labels, [2, 3]), labels == 3
        assert not (enhancing & ~core).any() and not (core & ~whole).any()
        probs = [read_volume(out / f"c{k}_prob_{n}.nii.gz").array for n in ("whole tumor", "tumor core",
                                                                             "enhancing tumor")]
        painted = np.zeros(labels.shape, np.uint8)
        for value, p in zip((1, 2, 3), probs, strict=True):
            painted[p > 0.5] = value
        np.testing.assert_array_equal(painted, labels)  # later regions overwrite earlier ones
    code, stdout, err = run_cli(capsys, ["evaluate", "--pred", str(out), "--labels", str(data / "labelsTr"),
                                         "--dataset", str(data), "--output", str(tmp_path / "eval")])
    assert code == 0, err
    assert "whole tumor" in (tmp_path / "eval" / "metrics.csv").read_text()


def test_paint_regions_and_sigmoid_backend():
    from modalseg.inference.backends import TorchBackend
    from modalseg.training.model_meta import paint_regions
    from modalseg.training.precision import resolve_precision

    probs = np.array([[0.9, 0.9, 0.9, 0.2, 0.5], [0.1, 0.8, 0.8, 0.9, 0.9], [0.0, 0.0, 0.7, 0.9, 0.9]])[None]
    assert paint_regions(probs, [1, 2, 3]).tolist() == [[1, 2, 3, 3, 3]]  # > 0.5, later over earlier
    net = nn.Conv2d(1, 2, 1)
    precision = resolve_precision(torch.device("cpu"), "fp32")
    x = np.random.default_rng(0).normal(size=(1, 1, 4, 4)).astype(np.float32)
    with torch.no_grad():
        logits = net(torch.from_numpy(x))
    soft = TorchBackend(net, precision)
    with soft.session():
        np.testing.assert_array_equal(soft(x, None, (0, 4, 0, 4)), torch.softmax(logits, 1).numpy())
    sig = TorchBackend(net, precision, activation="sigmoid")
    with sig.session():
        np.testing.assert_allclose(sig(x, None, (0, 4, 0, 4)), torch.sigmoid(logits).numpy(), rtol=1e-6)
    with pytest.raises(ValueError):
        TorchBackend(net, precision, activation="relu")


def test_region_probabilities_are_zero_outside_the_crop():
    from modalseg.data.transforms import Applied, CropPad, invert

    probs = np.full((3, 1, 4, 4), 0.8, np.float32)
    trace = [Applied(CropPad(box=(2, 2, 6, 6)), {"box": [2, 2, 6, 6], "shape": [8, 8]})]
    regions = invert(probs, trace, "region_probabilities")
    assert regions[:, 0, 0, 0].tolist() == [0.0, 0.0, 0.0] and regions[:, 0, 3, 3].tolist() == pytest.approx([0.8] * 3)
    assert invert(probs, trace, "probabilities")[:, 0, 0, 0].tolist() == [1.0, 0.0, 0.0]  # softmax: background


# ------------------------------------------------------------------------------------------------ model meta
def test_plain_model_meta_is_unchanged_and_old_descriptions_load(tmp_path):
    from modalseg.errors import CheckpointError
    from modalseg.training.checkpoint import _check_meta_types
    from modalseg.training.model_meta import ModelMeta

    old = {"kind": "paired", "model": "unet", "model_options": {}, "modalities": ["T1C"], "num_classes": 2,
           "labels": {"background": 0, "mass": 1}, "preprocess": {}, "setting": None, "feature_layers": None,
           "in_channels": 1, "channel_names": ["T1C"]}
    meta = ModelMeta.from_dict(old)
    assert meta.regions is None and meta.ignore_label is None and meta.to_dict() == old  # resume compares equal
    assert meta.activation == "softmax" and meta.scoring() == {}
    region = ModelMeta.from_dict({**old, "num_classes": 2, "labels": {"whole": 1, "core": 2},
                                  "regions": {"whole": [1, 2], "core": [2]}, "ignore_label": 3})
    _check_meta_types(region, tmp_path)
    assert region.scoring() == {"classes": [(1, 2), (2,)], "ignore_index": IGNORE_INDEX}
    for bad in ({"regions": {"whole": [1, 2]}}, {"regions": {"whole": [2], "core": [2]}}, {"ignore_label": -1}):
        with pytest.raises(CheckpointError):
            _check_meta_types(ModelMeta.from_dict({**region.to_dict(), **bad}), tmp_path)


def test_unpaired_task_refuses_regions_directly(tmp_path):
    from modalseg.training.tasks import UnpairedTask

    spec = load_dataset(_brats_dataset(tmp_path / "ds", n=1))
    spec.paired = False
    with pytest.raises(ConfigError, match="region training is paired only"):
        UnpairedTask(spec)
