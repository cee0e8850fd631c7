"""3D and 2.5D training and inference (issue 15): the planned 3D network, patch batches, sliding windows that keep
the input geometry, the 2.5D channel layout, unpaired 3D with the class-specific affinity, exact resume."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from modalseg.cli.main import main
from modalseg.errors import ConfigError
from modalseg.inference.inferers import ContextSliceInferer, SliceInferer, SlidingWindowInferer, with_context
from modalseg.training.checkpoint import load_checkpoint
from modalseg.training.config import TrainConfig
from modalseg.training.engine import Trainer

TINY = {"base_width": 4, "sa_reduction": 2}


@pytest.fixture(scope="module")
def breast3d(tmp_path_factory) -> Path:
    from modalseg.data.synth import make_breast_dataset_3d

    return make_breast_dataset_3d(tmp_path_factory.mktemp("b3") / "b3", num_patients=4, size=16, seed=3)


@pytest.fixture(scope="module")
def cardiac3d(tmp_path_factory) -> Path:
    from modalseg.data.synth import make_cardiac_dataset_3d

    return make_cardiac_dataset_3d(tmp_path_factory.mktemp("c3") / "c3", num_patients_per_modality=3, size=16,
                                   seed=4)


def cfg3d(data: Path, out: Path, **kw) -> TrainConfig:
    values = dict(data=str(data), output=str(out), model="master_assistant", model_options=dict(TINY),
                  preprocess_options={"target_size": [16, 16]}, epochs=2, folds=2, fold=0, seed=3, dims=3,
                  precision="fp32", progress=False, tensorboard=False, lr=1e-3, augmentation="off")
    values.update(kw)
    return TrainConfig(**values)


class Pointwise(nn.Module):
    """A network of 1x1x1 convolutions: its output at a voxel depends on that voxel only."""

    size_multiple, min_size = 1, 1

    def __init__(self, channels: int = 2, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(channels, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_sliding_windows_of_a_pointwise_network_equal_one_forward() -> None:
    """Gaussian-weighted overlapping windows average identical values: the result must be the network's output on
    the whole volume (any tiling error, off-by-one or axis swap shows); the volume is smaller than the window along
    one axis (padded) and not a multiple of it along the others."""
    from modalseg.inference.backends import TorchBackend
    from modalseg.training.precision import Precision

    net = Pointwise()
    backend = TorchBackend(net, Precision(torch.device("cpu"), None, False))
    slices = np.random.default_rng(0).normal(size=(11, 2, 19, 23)).astype(np.float32)  # (D, C, H, W)
    probs = SlidingWindowInferer((16, 8, 8), overlap=0.5)(backend, slices)
    with torch.no_grad():
        direct = torch.softmax(net(torch.from_numpy(np.moveaxis(slices, 0, 1))[None]), 1)[0].numpy()
    assert probs.shape == (11, 3, 19, 23)
    np.testing.assert_allclose(probs, np.moveaxis(direct, 1, 0), atol=1e-5)


def test_context_slices_layout_and_chunking() -> None:
    images = np.arange(5 * 2 * 1 * 1, dtype=np.float32).reshape(5, 2, 1, 1) + 1  # slice d, modality m
    ctx = with_context(images, 1)
    assert ctx.shape == (5, 6, 1, 1)
    # slice 0: modality 0 sees (pad, s0, s1), modality 1 the same of its own channel
    assert ctx[0, :, 0, 0].tolist() == [0, images[0, 0, 0, 0], images[1, 0, 0, 0], 0, images[0, 1, 0, 0],
                                        images[1, 1, 0, 0]]
    assert ctx[4, 2, 0, 0] == 0 and ctx[2, 0:3, 0, 0].tolist() == images[1:4, 0, 0, 0].tolist()

    class Echo:  # a backend returning its input channels as "probabilities"
        size_multiple = min_size = 1

        def session(self):  # noqa: ANN202
            import contextlib

            return contextlib.nullcontext()

        def __call__(self, x, modality, window):  # noqa: ANN001, ANN204
            return x.copy()

    vol = np.random.default_rng(1).normal(size=(9, 2, 4, 4)).astype(np.float32)
    whole = ContextSliceInferer(2, SliceInferer(3), chunk=64)(Echo(), vol)
    chunked = ContextSliceInferer(2, SliceInferer(3), chunk=2)(Echo(), vol)
    np.testing.assert_array_equal(whole, with_context(vol, 2))
    np.testing.assert_array_equal(chunked, whole)


def test_3d_training_plans_trains_validates_and_resumes_exactly(breast3d: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    full = Trainer(cfg3d(breast3d, tmp_path / "full", epochs=2, steps_per_epoch=2))
    assert "3D plan: patch" in capsys.readouterr().out
    full.fit()
    meta = full.meta
    assert meta.spatial_dims == 3 and meta.patch_size and len(meta.patch_size) == 3
    assert meta.model_options["kernel_sizes"] and meta.model_options["strides"]
    assert any(isinstance(m, nn.Conv3d) for m in full.network.modules())
    assert full.global_step == 4
    # a batch is (B, C, D, H, W) patches of the planned size
    batch = next(full.task.batches(0, 0, full.precision))
    assert tuple(batch.args[0].shape) == (2, 2, *meta.patch_size)
    # validation predicted whole volumes: one prediction per cached validation slice
    split = full.predict_split()["all"]
    assert split.pred.shape == split.target.shape and len(split.pred) == len(full.task.val_idx)

    part = Trainer(cfg3d(breast3d, tmp_path / "part", epochs=2, steps_per_epoch=2, max_steps=3,
                         checkpoint_every=1))
    part.fit()
    assert load_checkpoint(tmp_path / "part" / "fold_0" / "latest.pt")["global_step"] == 3
    resumed = Trainer(cfg3d(breast3d, tmp_path / "part", epochs=2, steps_per_epoch=2), resume=True)
    resumed.fit()
    a, b = full.network.state_dict(), resumed.network.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _write(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, affine), str(path))


def test_3d_predict_keeps_geometry_and_is_independent_of_voxel_order(breast3d: Path, tmp_path: Path) -> None:
    """The same physical image stored in two voxel orders (RAS and a flipped, axis-swapped order) gives the same
    labels at the same physical places, on the input's own grid and affine."""
    Trainer(cfg3d(breast3d, tmp_path / "run", epochs=1, steps_per_epoch=2)).fit()
    images = sorted((breast3d / "imagesTr").glob("*_000_*.nii.gz"))
    ras = [nib.load(str(p)) for p in images]
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = ras[0].shape[0] - 1
    swap = np.eye(4)[[1, 0, 2, 3]]
    reorder = flip @ swap  # new voxel (i, j, k) = old (X-1-j, i, k)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for k, img in enumerate(ras):
        data = np.asarray(img.dataobj, dtype=np.float32)
        _write(a / f"case_{k:04d}.nii.gz", data, img.affine)
        moved = np.transpose(data[::-1], (1, 0, 2))  # moved[i, j, k] = data[X-1-j, i, k]
        _write(b / f"case_{k:04d}.nii.gz", np.ascontiguousarray(moved), img.affine @ np.linalg.inv(reorder))
    for folder in (a, b):
        assert main(["predict", "--model", str(tmp_path / "run" / "fold_0" / "latest.pt"), "--input", str(folder),
                     "--output", str(folder / "pred"), "--precision", "fp32"]) == 0
    pa = nib.load(str(a / "pred" / "case.nii.gz"))
    pb = nib.load(str(b / "pred" / "case.nii.gz"))
    assert pa.shape == ras[0].shape and np.allclose(pa.affine, ras[0].affine, atol=1e-5)
    assert pb.shape == (ras[0].shape[1], ras[0].shape[0], ras[0].shape[2])
    np.testing.assert_allclose(pb.affine, ras[0].affine @ np.linalg.inv(reorder), atol=1e-5)
    la, lb = np.asarray(pa.dataobj), np.asarray(pb.dataobj)
    np.testing.assert_array_equal(np.transpose(la[::-1], (1, 0, 2)), lb)


def test_25d_batches_fold_neighbours_modality_major(breast3d: Path, tmp_path: Path) -> None:
    cfg = cfg3d(breast3d, tmp_path / "r", dims=2, context_slices=1, max_steps=1,
                model_options={"base_width": 4, "sa_reduction": 2, "depth": 2})
    tr = Trainer(cfg)
    assert tr.meta.in_channels == 3 and tr.meta.context_slices == 1 and tr.meta.patch_size is None
    task, cache = tr.task, tr.cache
    refs = next(task.sampler.batches(0))
    x, y = next(task.batches(0, 0, tr.precision)).args
    assert tuple(x.shape) == (len(refs), 2 * 3, 16, 16)
    for b, r in enumerate(refs):
        image, label = cache.volume(r.case)
        d = r.start[0]
        for m in range(2):
            for j, dd in enumerate((d - 1, d, d + 1)):
                want = image[m, dd] if 0 <= dd < image.shape[1] else np.zeros_like(image[m, 0])
                np.testing.assert_array_equal(x[b, m * 3 + j].numpy(), want)
        np.testing.assert_array_equal(y[b].numpy(), label[d])
    tr.fit()
    assert tr.predict_split()["all"].pred.shape[1:] == (16, 16)


def test_unpaired_3d_csa_trains_and_the_3d_affinity_reduces_to_2d(cardiac3d: Path, tmp_path: Path) -> None:
    from modalseg.losses.affinity import class_affinity

    tr = Trainer(cfg3d(cardiac3d, tmp_path / "u", model="auto", setting="csa", max_steps=2, batch_size=2,
                       model_options={"base_width": 4}))
    assert tr.meta.kind == "unpaired" and tr.meta.model == "unet" and tr.meta.spatial_dims == 3
    result = tr.fit()
    assert tr.global_step == 2 and result is not None
    fl, fk = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    onehot = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 8, 8)), 3).movedim(-1, 1).float()
    two = class_affinity(fl, fk, onehot)
    three = class_affinity(fl[:, :, None], fk[:, :, None], onehot[:, :, None])
    torch.testing.assert_close(three, two)


@pytest.mark.parametrize("options, message", [
    ({"preprocess": "paper1"}, "caches only the labelled slices"),
    ({"context_slices": 1}, "2.5D) is for 2D networks"),
    ({"patch_size": [8, 15, 16]}, "must be a multiple"),
    ({"model_options": {"base_width": 4, "strides": [[2, 2, 2]]}}, "the 3D planner decides"),
])
def test_3d_options_are_refused_in_one_line(breast3d: Path, tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Trainer(cfg3d(breast3d, tmp_path / "x", **options))


def test_a_3d_model_exports_and_the_torch_free_runtime_reproduces_its_sliding_windows(
        breast3d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """3D export: graphs of windows (N, C, D, H, W), dynamic in every axis; ONNX Runtime through ``modalseg
    predict`` (MONAI's windows) and the torch-free runtime (the NumPy windows) give torch's labels and geometry;
    int8 calibrates on the windows predict feeds the graph."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_export import LABEL_AGREEMENT, compare_outputs
    from test_runtime_torch_free import run_torch_free

    Trainer(cfg3d(breast3d, tmp_path / "run", epochs=2, steps_per_epoch=2, patch_size=[8, 16, 16],
                  model_options={**TINY, "base_width": 4})).fit()
    ckpt = str(tmp_path / "run" / "fold_0" / "latest.pt")
    export = tmp_path / "exp"
    assert main(["export", "--model", ckpt, "--output", str(export)]) == 0
    assert main(["export", "--model", ckpt, "--output", str(tmp_path / "int8"), "--int8", "--calibration-data",
                 str(breast3d), "--calibration-slices", "8"]) == 0
    card = json.loads((export / "model.json").read_text())
    assert card["input"]["layout"] == "NCDHW" and card["input"]["patch_size"] == [8, 16, 16]
    assert card["output"]["shape"] == ["batch", 2, "depth", "height", "width"]
    images = breast3d / "imagesTr"
    assert main(["predict", "--model", ckpt, "--input", str(images), "--output", str(tmp_path / "torch"),
                 "--precision", "fp32", "--probabilities"]) == 0
    assert main(["predict", "--model", str(export), "--input", str(images), "--output", str(tmp_path / "ort"),
                 "--probabilities"]) == 0
    proc = run_torch_free(tmp_path, "-m", "modalseg.deploy.runtime", "--model", export, "--input", images,
                          "--output", tmp_path / "runtime", "--probabilities")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.torch_modules == []
    capsys.readouterr()
    for out in ("ort", "runtime"):
        agree, prob = compare_outputs(tmp_path / "torch", tmp_path / out)
        assert agree >= LABEL_AGREEMENT and prob <= 1e-4, (out, agree, prob)
    assert main(["predict", "--model", str(tmp_path / "int8"), "--input", str(images), "--output",
                 str(tmp_path / "p8")]) == 0


def test_channels_last_precision_handles_3d_networks() -> None:
    """``channels_last`` on a 3D network means NDHWC (torch.channels_last refuses rank-5 weights and inputs)."""
    from modalseg.models import create_model
    from modalseg.training.precision import Precision

    net = create_model("master_assistant", num_modalities=2, in_channels=1, num_classes=2, spatial_dims=3,
                       base_width=4, sa_reduction=2, depth=2)
    precision = Precision(torch.device("cpu"), torch.bfloat16, True)
    net = precision.prepare_model(net)
    conv = next(m for m in net.modules() if isinstance(m, nn.Conv3d) and m.kernel_size == (3, 3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    x = precision.to_input(torch.randn(1, 2, 8, 8, 8))
    assert x.is_contiguous(memory_format=torch.channels_last_3d)
    with precision.autocast():
        assert net(x).shape == (1, 2, 8, 8, 8)


@pytest.mark.parametrize("layout", [{"dims": 3}, {"dims": 2, "context_slices": 1}], ids=["3d", "2.5d"])
def test_ddp_ranks_split_the_single_process_batches_exactly(breast3d: Path, tmp_path: Path, layout: dict) -> None:
    """DDP equivalence on the data side: with augmentation on, the two ranks' batches of every step concatenate
    to the batch one process draws with the global batch size (the same patches, the same random transforms)."""
    from modalseg.training.tasks import task_for

    opts = {"base_width": 4, "sa_reduction": 2, **({"depth": 2} if layout["dims"] == 2 else {})}
    single = Trainer(cfg3d(breast3d, tmp_path / "s", batch_size=4, augmentation="medium", steps_per_epoch=2,
                           model_options=opts, **{**layout}))
    cfg = single.cfg
    cases_of = single.cache.patients
    train = sorted(c for p in single.split["train"] for c in cases_of.get(p, ()))
    val = sorted(c for p in single.split["val"] for c in cases_of.get(p, ()))
    ranks = []
    for rank in range(2):
        task = task_for(single.spec)
        task.model_modalities(cfg)
        task.network_layout(cfg, single.cache)
        task.plan(single.cache, train, val, cfg, rank, 2)
        ranks.append(task)
    for epoch in range(2):
        full = list(single.task.batches(epoch, 0, single.precision))
        parts = [list(t.batches(epoch, 0, single.precision)) for t in ranks]
        assert len(full) == len(parts[0]) == len(parts[1]) > 0
        for whole, a, b in zip(full, *parts, strict=True):
            torch.testing.assert_close(torch.cat([a.args[0], b.args[0]]), whole.args[0], rtol=0, atol=0)
            assert torch.equal(torch.cat([a.args[1], b.args[1]]), whole.args[1])


def test_resample_slices_round_trip_keeps_labels_extent_and_probabilities() -> None:
    from modalseg.data.transforms import ResampleSlices, Sample, invert

    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 10, 4, 5)).astype(np.float32)
    label = rng.integers(0, 3, size=(10, 4, 5)).astype(np.uint8)
    out = ResampleSlices(1.5)(Sample(image, label, spacing=(3.0, 0.7, 0.7)))
    assert out.image.shape == (2, 20, 4, 5) and out.label.shape == (20, 4, 5)
    assert out.spacing == (1.5, 0.7, 0.7)  # 10 x 3 mm = 20 x 1.5 mm: the extent is kept
    np.testing.assert_array_equal(out.label[::2], label)  # nearest-exact, no invented class
    assert set(np.unique(out.label)) <= set(np.unique(label))
    np.testing.assert_array_equal(invert(out.label, out.trace, "label"), label)
    probs = rng.dirichlet(np.ones(3), size=(20, 4, 5)).transpose(3, 0, 1, 2).astype(np.float32)  # (K, D', H, W)
    back = invert(probs, out.trace, "probabilities")
    assert back.shape == (3, 10, 4, 5)
    np.testing.assert_allclose(back.sum(0), 1.0, atol=1e-5)
    # linear along depth: a ramp stays a ramp
    ramp = np.broadcast_to(np.arange(10, dtype=np.float32)[None, :, None, None], (1, 10, 2, 2)).copy()
    up = ResampleSlices(1.5)(Sample(ramp, None, spacing=(3.0, 1.0, 1.0))).image[0, :, 0, 0]
    np.testing.assert_allclose(up[1:-1], (np.arange(1, 19) + 0.5) / 2 - 0.5, atol=1e-6)


def test_slice_thickness_resampling_trains_3d_and_predicts_on_the_file_grid(tmp_path: Path) -> None:
    """Thick slices (1.4 mm) resampled to 0.7 mm for training: the cache holds twice the slices at the actual
    thickness; prediction resamples back and writes the file's grid exactly."""
    from modalseg.data.synth import make_breast_dataset_3d

    data = make_breast_dataset_3d(tmp_path / "thick", num_patients=4, size=16, slice_thickness_mm=1.4, seed=5)
    cfg = cfg3d(data, tmp_path / "run", epochs=1, steps_per_epoch=1,
                preprocess_options={"target_size": [16, 16], "slice_thickness_mm": 0.7})
    tr = Trainer(cfg)
    image = nib.load(str(sorted((data / "imagesTr").glob("*_0000.nii.gz"))[0]))
    case = tr.cache.cases[0]
    assert case.depth == 2 * image.shape[2]
    assert case.spacing[0] == pytest.approx(0.7) and tr.cache.records[0]["slice_thickness"] == pytest.approx(0.7)
    tr.fit()
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(tmp_path / "run" / "fold_0" / "latest.pt"), "--input",
                 str(data / "imagesTr"), "--output", str(out), "--precision", "fp32"]) == 0
    pred = nib.load(str(out / f"{sorted((data / 'labelsTr').glob('*.nii.gz'))[0].name}"))
    assert pred.shape == image.shape and np.allclose(pred.affine, image.affine, atol=1e-5)


def test_3d_fold_ensemble_averages_the_folds_sliding_window_probabilities(breast3d: Path, tmp_path: Path) -> None:
    from modalseg.inference.predictor import Predictor

    for fold in (0, 1):
        Trainer(cfg3d(breast3d, tmp_path / "run", fold=fold, epochs=1, steps_per_epoch=1, seed=fold)).fit()
    files = sorted((breast3d / "imagesTr").glob("*_001_*.nii.gz"))
    both = Predictor.from_checkpoints([tmp_path / "run"], which="latest")
    assert len(both.models) == 2
    single = [Predictor.from_checkpoints([tmp_path / "run" / f"fold_{k}"], which="latest") for k in (0, 1)]
    ensemble = both.predict_files(files)
    parts = [p.predict_files(files).probabilities for p in single]
    assert ensemble.probabilities.shape[1:] == nib.load(str(files[0])).shape
    np.testing.assert_allclose(ensemble.probabilities, (parts[0] + parts[1]) / 2, atol=1e-5)


def _paired_models() -> list[str]:
    from modalseg.models.paper1 import PAPER1_MODELS

    return list(PAPER1_MODELS)


@pytest.mark.parametrize("name", _paired_models())
def test_every_paper1_model_trains_a_3d_step(breast3d: Path, tmp_path: Path, name: str) -> None:
    """Every Table-1 model in 3D through the trainer: planned (U-Net family) or with a given patch (FuseNet's
    fixed topology), one optimisation step on (B, C, D, H, W) patches, finite weights that moved."""
    fixed = name.startswith("fusenet")
    opts = {"base_width": 2, **({} if fixed else {"sa_reduction": 2})}
    cfg = cfg3d(breast3d, tmp_path / name, model=name, model_options=opts, max_steps=1, steps_per_epoch=1,
                **({"patch_size": [32, 32, 32]} if fixed else {}))
    tr = Trainer(cfg)
    assert tr.meta.spatial_dims == 3 and any(isinstance(m, nn.Conv3d) for m in tr.network.modules())
    before = {k: v.clone() for k, v in tr.network.state_dict().items()}
    tr.fit()
    after = tr.network.state_dict()
    assert tr.global_step == 1
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def test_fixed_topology_models_need_a_patch_in_3d(breast3d: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give patch_size with every side at least 32"):
        Trainer(cfg3d(breast3d, tmp_path / "f", model="fusenet", model_options={"base_width": 2}))


def test_the_precision_probe_times_a_smaller_3d_patch(breast3d: Path, tmp_path: Path) -> None:
    """``precision: auto`` times the 3D network on a patch of twice its divisibility per axis (every layer runs)
    instead of the whole training patch, so that the 2-second budget can time more than one mode."""
    from modalseg.models.planning import divisibility

    tr = Trainer(cfg3d(breast3d, tmp_path / "p", max_steps=1, patch_size=[8, 16, 16]))
    div = divisibility(tr.meta.model_options["strides"])
    x, _ = tr.task.probe_example(2)
    assert tuple(x.shape[2:]) == tuple(min(p, 2 * d) for p, d in zip([8, 16, 16], div, strict=True))
    assert np.prod(x.shape[2:]) < np.prod(tr.meta.patch_size)  # smaller than the training patch
    with torch.no_grad():
        assert tr.network(x).shape[2:] == x.shape[2:]


def test_a_resumed_3d_run_keeps_its_plan_when_the_budget_would_plan_another(breast3d: Path, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The default memory budget follows the device: a resume on another machine must not re-plan the network
    under the saved weights. A budget too small for any patch refuses a fresh run but resumes the recorded plan."""
    first = Trainer(cfg3d(breast3d, tmp_path / "r", epochs=2, steps_per_epoch=1, max_steps=1))
    first.fit()
    with pytest.raises(ConfigError, match="memory budget"):
        Trainer(cfg3d(breast3d, tmp_path / "fresh", memory_budget_mb=0.001))
    capsys.readouterr()
    resumed = Trainer(cfg3d(breast3d, tmp_path / "r", epochs=2, steps_per_epoch=1, memory_budget_mb=0.001),
                      resume=True)
    assert "as recorded in the checkpoint (resume)" in capsys.readouterr().out
    assert resumed.meta.to_dict() == first.meta.to_dict()
    resumed.fit()
    assert resumed.global_step == 2


def test_the_plan_line_warns_when_the_batch_is_over_the_memory_budget(breast3d: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import re

    Trainer(cfg3d(breast3d, tmp_path / "a", batch_size=2, memory_budget_mb=1000))
    line = capsys.readouterr().out
    two = float(re.search(r"~(\d+) MB for batch 2 of a 1000 MB budget", line).group(1))
    assert "over budget" not in line
    budget = max(2 * two, 1.0)  # two patches fit, twenty do not
    Trainer(cfg3d(breast3d, tmp_path / "b", batch_size=20, memory_budget_mb=budget))
    assert "over budget: lower batch_size or raise memory_budget_mb" in capsys.readouterr().out


def test_native_square_side_reads_the_canonical_in_plane_size_of_every_format(tmp_path: Path) -> None:
    """The median case's longer in-plane side after reorientation to canonical order: a file stored slice-first is
    measured in the plane it is sliced in, and a non-NIfTI file (read, not only its header) counts too."""
    import SimpleITK as sitk

    from modalseg.data.preprocess import native_square_side

    files = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", tmp_path / "c.nii.gz", tmp_path / "d.mha"]
    _write(files[0], np.zeros((20, 30, 8), np.float32), np.eye(4))
    # stored (6, 10, 40): stored axis 0 runs along z and axis 2 along x, so canonically it is 40 x 10 x 6
    _write(files[1], np.zeros((6, 10, 40), np.float32), np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0],
                                                                   [0, 0, 0, 1]], float))
    _write(files[2], np.zeros((50, 50, 8), np.float32), np.eye(4))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 24, 24), np.float32)), str(files[3]))
    assert native_square_side(files[:3], 2) == 40  # sides 30, 40, 50 (not 30, 10, 50: the stored order)
    assert native_square_side(files, 2) == 35  # + 24 from the .mha
    assert native_square_side(files[1:2], 0) == 10  # sliced along x: the plane is 10 x 6


def test_the_default_preset_keeps_the_native_in_plane_size_in_3d(breast3d: Path, tmp_path: Path) -> None:
    """3D with the default preset and no target_size trains on the data's own in-plane grid (16x16 here), not the
    2D networks' 256x256; 2D keeps 256x256, and an explicit target_size wins."""
    from modalseg.data.layouts import load_dataset
    from modalseg.training.engine import make_preprocess, resolve_recipe

    spec = load_dataset(breast3d)

    def size(**kw) -> tuple[int, int] | None:
        return make_preprocess(resolve_recipe(cfg3d(breast3d, tmp_path / "x", **kw), spec), spec).target_size

    assert size(preprocess_options={}) == (16, 16)
    assert size(preprocess_options={}, dims=2) == (256, 256)
    assert size(preprocess_options={"target_size": [32, 32]}) == (32, 32)
    tr = Trainer(cfg3d(breast3d, tmp_path / "run", preprocess_options={}, epochs=1, steps_per_epoch=1))
    tr.fit()
    assert tr.cache.cases[0].shape[2:] == (16, 16)
    assert load_checkpoint(tmp_path / "run" / "fold_0" / "latest.pt")["meta"]["preprocess"]["target_size"] == [16, 16]


@pytest.mark.parametrize("shape", [(2, 19, 24, 37), (2, 8, 40, 16)])  # (C, D, H, W); 8 < the window's depth 12
def test_numpy_sliding_window_equals_monai(shape: tuple[int, ...]) -> None:
    """The torch-free runtime's windows (numpy_sliding_window) give MONAI's sliding_window_inference result: same
    Gaussian weights, same window positions (a backend whose output depends on the position inside the window would
    show any shift), same padding of a volume smaller than the window."""
    from monai.data.utils import compute_importance_map

    from modalseg.inference.inferers import gaussian_importance, numpy_sliding_window

    patch = (12, 16, 16)
    np.testing.assert_allclose(gaussian_importance(patch), compute_importance_map(patch, "gaussian").numpy(),
                               rtol=1e-6, atol=0)
    ramp = np.linspace(0, 1, int(np.prod(patch)), dtype=np.float32).reshape(patch)

    class PositionDependent:
        size_multiple, min_size = 1, 1

        def session(self):
            import contextlib

            return contextlib.nullcontext()

        def __call__(self, x, modality, window):
            logits = np.stack([x[:, 0] + ramp, x[:, 1] * ramp, -x[:, 0]], axis=1)
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    volume = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    monai = SlidingWindowInferer(patch, batch_size=2)(PositionDependent(), np.moveaxis(volume, 1, 0))
    ours = numpy_sliding_window(volume, patch, 0.5, 2, lambda x: PositionDependent()(x, None, None))
    np.testing.assert_allclose(np.moveaxis(ours, 1, 0), monai, rtol=0, atol=2e-6)
    flat = SlidingWindowInferer(patch, batch_size=3, mode="constant")(PositionDependent(), np.moveaxis(volume, 1, 0))
    ours = numpy_sliding_window(volume, patch, 0.5, 3, lambda x: PositionDependent()(x, None, None), mode="constant")
    np.testing.assert_allclose(np.moveaxis(ours, 1, 0), flat, rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", _paired_models())
def test_every_paper1_model_exports_a_3d_graph_checked_against_torch(name: str) -> None:
    """Every Table-1 model in 3D exports (batch, depth, height and width dynamic; export_graph checks ONNX Runtime
    against torch at two volume sizes, the second with odd sides where the network takes them)."""
    pytest.importorskip("onnxruntime")
    from modalseg.deploy.export import export_graph
    from modalseg.models import create_model
    from modalseg.models.fold import fold_batch_norm
    from modalseg.training.tasks import SINGLE_MODALITY_MODELS

    channels = 1 if name in SINGLE_MODALITY_MODELS else 2
    options: dict = {"base_width": 4, "spatial_dims": 3}
    if not name.startswith("fusenet"):  # FuseNet's five poolings are fixed (no plan)
        options.update(kernel_sizes=[[3, 3, 3]] * 4, strides=[[2, 2, 2], [2, 2, 2], [1, 2, 2]], depth=3)
    net = create_model(name, num_modalities=channels, in_channels=1, num_classes=2, **options).eval()
    fold_batch_norm(net)
    graph = export_graph(net, channels, size_multiple=getattr(net, "size_multiple", 1),
                         min_size=getattr(net, "min_size", 1), spatial_dims=3)
    assert graph.max_abs_diff <= 1e-4 and all(len(s) == 5 for s in graph.check_shapes)
    assert graph.check_shapes[0][2:] != graph.check_shapes[1][2:]
