"""Figures: non-empty PNGs of the expected pixel size, clear errors on inconsistent input."""

from __future__ import annotations

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from modalseg.errors import ModalsegError
from modalseg.evaluation.figures import (
    PANEL_INCHES,
    plot_attention_maps,
    plot_mask_grid,
    plot_overlays,
    plot_progress,
)

DPI = 40


def _disc(cy: int, cx: int, r: int, size: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.int64)


def _check_png(path, width_in: float, height_in: float) -> np.ndarray:
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert abs(w - width_in * DPI) <= 1 and abs(h - height_in * DPI) <= 1, (w, h)
    assert img[..., :3].std() > 0.01  # something was drawn
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # atomic write left no temporary file
    return img


def test_overlays_several_examples(tmp_path):
    rng = np.random.default_rng(0)
    gt = _disc(16, 16, 8)
    image = rng.normal(size=(32, 32)) + 2 * gt
    preds = {"U-Net": _disc(18, 16, 6), "FuseUNet": _disc(16, 14, 9), "Proposed": _disc(16, 16, 7)}
    out = plot_overlays(
        [image, image],
        [gt, gt],
        [preds, preds],
        [{"U-Net": 0.7}, {}],
        tmp_path / "f4.png",
        row_labels=["a", "b"],
        dpi=DPI,
    )
    _check_png(out, PANEL_INCHES * 4, PANEL_INCHES * 2 + 0.3)


def test_overlays_single_example_and_green_contour(tmp_path):
    gt = _disc(16, 16, 8)
    image = np.zeros((32, 32))
    out = plot_overlays(image, gt, {"model": _disc(16, 16, 4)}, {"model": 0.4}, tmp_path / "one.png", dpi=DPI)
    img = _check_png(out, PANEL_INCHES * 2, PANEL_INCHES + 0.3)
    right = img[:, img.shape[1] // 2 :, :3]
    green = (right[..., 1] > 0.6) & (right[..., 0] < 0.4) & (right[..., 2] < 0.4)
    assert green.sum() > 10  # the model's boundary is drawn in green


def test_overlays_examples_form(tmp_path):
    gt = _disc(16, 16, 8)
    examples = [
        {"image": gt * 1.0, "gt": gt, "preds": {"a": _disc(15, 16, 7), "b": gt}, "dices": {"b": 1.0}}
    ] * 3
    out = plot_overlays(examples, tmp_path / "ex.png", dpi=DPI)
    _check_png(out, PANEL_INCHES * 3, PANEL_INCHES * 3 + 0.3)
    with pytest.raises(ModalsegError, match="missing \\['preds'\\]"):
        plot_overlays([{"image": gt, "gt": gt}], tmp_path / "bad.png", dpi=DPI)


def test_overlays_mismatched_examples(tmp_path):
    gt = _disc(16, 16, 8)
    with pytest.raises(ModalsegError, match="one of each per example"):
        plot_overlays([gt, gt], [gt], [{"m": gt}, {"m": gt}], None, tmp_path / "x.png", dpi=DPI)
    with pytest.raises(ModalsegError, match="shape"):
        plot_overlays(gt, gt, {"m": np.zeros((8, 8))}, None, tmp_path / "x.png", dpi=DPI)


def test_attention_maps_five_blocks_two_streams(tmp_path):
    rng = np.random.default_rng(1)
    # Torch maps shaped like an SA block output (B=1, 1, H, W), halving per block.
    maps = {s: [torch.rand(1, 1, 32 // 2**k, 32 // 2**k) for k in range(5)] for s in ("T1C", "T2W")}
    maps["T2W"][0] = rng.random((32, 32))  # numpy accepted too
    out = plot_attention_maps(maps, tmp_path / "f5.png", "SA maps", dpi=DPI)
    _check_png(out, PANEL_INCHES * 5 + 0.9, PANEL_INCHES * 2 + 0.45)
    with pytest.raises(ModalsegError, match="2D"):
        plot_attention_maps({"T1C": [np.zeros((2, 4, 4))]}, tmp_path / "bad.png", dpi=DPI)


def test_attention_maps_straight_from_forward_features(tmp_path):
    """Fig. 5 from a model: forward_features' SA maps, grouped per stream, drawn without conversion."""
    from modalseg.models import attention_maps, create_model

    torch.manual_seed(0)
    net = create_model("fuse_unet_sa", num_modalities=2, in_channels=1, num_classes=2, base_width=4, sa_reduction=4)
    with torch.no_grad():
        _, feats = net.eval().forward_features(torch.randn(1, 2, 32, 32))
    maps = attention_maps(feats)
    named = dict(zip(["T1C", "T2W"], maps.values(), strict=True))
    out = plot_attention_maps(named, tmp_path / "f5_model.png", "SA maps", dpi=DPI)
    img = _check_png(out, PANEL_INCHES * 5 + 0.9, PANEL_INCHES * 2 + 0.45)
    assert img[..., :3].std() > 0.05  # the maps were drawn (a blank figure would be near uniform)


def test_mask_grid_paper2_layout(tmp_path):
    gt = _disc(16, 16, 10) + _disc(16, 16, 5)  # classes 0, 1, 2
    gt[_disc(26, 26, 4) > 0] = 3
    settings = {
        s: [np.roll(gt, k, 0), np.roll(gt, -k, 1)]
        for k, s in enumerate(["Single", "UMMKD", "Joint", "MSBN", "Affinity", "CSA"])
    }
    image = np.random.default_rng(2).normal(size=(32, 32))
    out = plot_mask_grid(
        [image, None],
        [gt, gt],
        settings,
        tmp_path / "f6.png",
        ["bg", "LV", "myo", "RV"],
        row_labels=["CT", "MRI"],
        dpi=DPI,
    )
    _check_png(out, PANEL_INCHES * 7, PANEL_INCHES * 2 + 0.75)
    with pytest.raises(ModalsegError, match="labels up to 3"):
        plot_mask_grid([None], [gt], {}, tmp_path / "bad.png", ["bg", "LV"], dpi=DPI)
    with pytest.raises(ModalsegError, match="has 1 masks for 2 rows"):
        plot_mask_grid([None, None], [gt, gt], {"CSA": [gt]}, tmp_path / "bad.png", ["bg", "a", "b", "c"])


def test_progress_with_sparse_validation(tmp_path):
    history = [
        {
            "epoch": e,
            "train_loss": 1.0 / (e + 1),
            "val_loss": None if e % 2 else 1.1 / (e + 1),
            "val_dice": None if e % 2 else 0.5 + 0.03 * e,
        }
        for e in range(10)
    ]
    out = plot_progress(history, tmp_path / "progress.png", dpi=DPI)
    _check_png(out, 7.0, 5.5)
    out2 = plot_progress([{"epoch": 0, "train_loss": 0.9}], tmp_path / "p2.png", dpi=DPI)
    _check_png(out2, 7.0, 5.5)
    with pytest.raises(ModalsegError, match="empty history"):
        plot_progress([], tmp_path / "p3.png")


def test_pyplot_backend_untouched(tmp_path):
    before = matplotlib.get_backend()
    plot_progress([{"epoch": 0, "train_loss": 0.9, "val_dice": 0.4}], tmp_path / "p.png", dpi=DPI)
    assert matplotlib.get_backend() == before
