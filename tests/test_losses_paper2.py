"""Paper 2 losses: class-specific affinity (Eq. 2-4), plain affinity, UMMKD distillation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modalseg.losses.affinity import (
    affinity_loss,
    class_affinity,
    csa_loss,
    csa_loss_from_features,
    resize_mask,
)
from modalseg.losses.kd import class_mean_logits, ummkd_kd_loss

R = 1 / math.sqrt(2)


def onehot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


# ----------------------------------------------------------------------------------------------------
# class_affinity (Eq. 2-3)


def tiny_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # 2 channels, 2x2 maps; class 1 = top row, class 0 = bottom row.
    fl = torch.tensor([[[[1.0, 0.0], [5.0, 5.0]], [[1.0, 1.0], [2.0, 0.0]]]])
    fk = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]], [[2.0, 2.0], [0.0, 3.0]]]])
    labels = torch.tensor([[[1, 1], [0, 0]]])
    return fl, fk, onehot(labels, 2)


def test_class_affinity_hand_values() -> None:
    fl, fk, oh = tiny_case()
    a, valid = class_affinity(fl, fk, oh, return_valid=True)
    assert a.shape == (1, 2, 2, 2) and a.dtype == torch.float32
    # Class 1 (top row): l0=(1,0), l1=(1,1), k0=(0,1), k1=(2,2); cosines [[0, 1/sqrt2], [1/sqrt2, 1]]; S=2.
    expected1 = torch.tensor([[0.0, R], [R, 1.0]]) / 2
    # Class 0 (bottom row): l0=(5,5), l1=(2,0), k0=(1,1), k1=(0,3); cosines [[1, 1/sqrt2], [1/sqrt2, 0]]; S=2.
    expected0 = torch.tensor([[1.0, R], [R, 0.0]]) / 2
    assert torch.allclose(a[0, 1], expected1, atol=1e-6)
    assert torch.allclose(a[0, 0], expected0, atol=1e-6)
    assert valid.tolist() == [[True, True]]


def test_class_affinity_normalised_by_region_size_after_nearest_resize() -> None:
    # Spatially constant features: every cosine over a region is 1, so A^c = 1 / S_c exactly.
    fl = torch.ones(2, 3, 2, 2)
    fk = torch.full((2, 2, 2, 2), 4.0)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[0, :2, :] = 1  # top half -> after nearest 4->2 (rows/cols 0 and 2): row 0 -> S_1 = 2
    labels[1, :2, :2] = 1  # top-left block -> pixel (0, 0) only -> S_1 = 1
    oh = onehot(labels, 3)  # class 2 absent everywhere
    mask = resize_mask(oh, (2, 2))
    assert mask[:, 1].sum(dim=(-2, -1)).tolist() == [2.0, 1.0]
    a, valid = class_affinity(fl, fk, oh, return_valid=True)
    assert a.shape == (2, 3, 3, 2)
    assert torch.allclose(a[0, 1], torch.full((3, 2), 1 / 2))
    assert torch.allclose(a[1, 1], torch.full((3, 2), 1 / 1))
    assert torch.allclose(a[0, 0], torch.full((3, 2), 1 / 2))
    assert torch.allclose(a[1, 0], torch.full((3, 2), 1 / 3))
    assert torch.count_nonzero(a[:, 2]) == 0 and not valid[:, 2].any()


def test_class_affinity_resizes_layer_k_to_layer_l() -> None:
    torch.manual_seed(0)
    fl, fk = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 8, 8)
    oh = onehot(torch.randint(0, 3, (2, 16, 16)), 3)
    a = class_affinity(fl, fk, oh)
    resized = F.interpolate(fk, size=(4, 4), mode="bilinear", align_corners=False)
    assert a.shape == (2, 3, 3, 5)
    assert torch.allclose(a, class_affinity(fl, resized, oh))


def test_absent_class_gives_zeros_and_finite_gradient() -> None:
    fl = torch.randn(1, 3, 4, 4, requires_grad=True)
    fk = torch.randn(1, 3, 4, 4, requires_grad=True)
    oh = onehot(torch.zeros(1, 4, 4, dtype=torch.long), 2)  # class 1 absent
    a, valid = class_affinity(fl, fk, oh, return_valid=True)
    assert torch.isfinite(a).all() and torch.count_nonzero(a[0, 1]) == 0
    assert valid.tolist() == [[True, False]]
    a.sum().backward()
    assert torch.isfinite(fl.grad).all() and torch.isfinite(fk.grad).all()
    # All-zero features inside a present region: cosine 0 (eps), still no NaN.
    z = torch.zeros(1, 2, 4, 4, requires_grad=True)
    a0 = class_affinity(z, z, oh)
    a0.sum().backward()
    assert torch.count_nonzero(a0) == 0 and torch.isfinite(z.grad).all()


# ----------------------------------------------------------------------------------------------------
# csa_loss (Eq. 4)


def test_csa_loss_hand_value_literal_and_mse() -> None:
    a1 = torch.stack([torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.ones(2, 2)])[None]  # (1, 2, 2, 2)
    a2 = torch.stack([torch.zeros(2, 2), torch.tensor([[1.0, 1.0], [1.0, -3.0]])])[None]
    valid = torch.ones(1, 2, dtype=torch.bool)
    # Literal Eq. 4: class 0: (mean(1,2,3,4))^2 = 6.25; class 1: (mean(0,0,0,4))^2 = 1; (6.25 + 1) / 2.
    assert csa_loss(a1, a2, valid, valid).item() == pytest.approx(3.625)
    # Element-wise reading: class 0: (1+4+9+16)/4 = 7.5; class 1: 16/4 = 4; mean 5.75.
    assert csa_loss(a1, a2, valid, valid, form="mse").item() == pytest.approx(5.75)


def test_csa_loss_zero_when_identical_and_batch_order_free() -> None:
    torch.manual_seed(0)
    fl, fk = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    oh = onehot(torch.randint(0, 3, (3, 8, 8)), 3)
    a, v = class_affinity(fl, fk, oh, return_valid=True)
    perm = torch.tensor([2, 0, 1])
    assert csa_loss(a, a, v, v).item() == 0.0
    assert csa_loss(a, a[perm], v, v[perm]).item() == pytest.approx(0.0, abs=1e-12)
    assert csa_loss(a, a[:2] * 1.5, v, v[:2]).item() > 0


def test_csa_loss_averages_over_images_where_class_present() -> None:
    a1 = torch.zeros(2, 1, 1, 1)
    a1[0, 0] = 2.0
    a1[1, 0] = 100.0  # image 1 does not contain the class: must be ignored
    v1 = torch.tensor([[True], [False]])
    a2 = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)  # present in both images: mean 2
    v2 = torch.ones(2, 1, dtype=torch.bool)
    assert csa_loss(a1, a2, v1, v2).item() == pytest.approx(0.0)
    a2b = torch.tensor([0.0, 0.0, 3.0]).view(3, 1, 1, 1)  # other batch size; mean over present = 1
    assert csa_loss(a1, a2b, v1, torch.ones(3, 1, dtype=torch.bool)).item() == pytest.approx(1.0)


def test_csa_loss_absent_classes_contribute_nothing() -> None:
    torch.manual_seed(0)
    a1, a2 = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    v1 = torch.ones(2, 3, dtype=torch.bool)
    v2 = v1.clone()
    v2[:, 2] = False  # class 2 absent from modality 2's batch
    a2[:, 2] = 0
    full = csa_loss(a1, a2, v1, v2)
    only01 = csa_loss(a1[:, :2], a2[:, :2], v1[:, :2], v2[:, :2])
    assert full.item() == pytest.approx(only01.item())  # C counts only the classes present on both sides
    # None present on both sides: zero, connected to the graph, finite gradient.
    b1 = torch.randn(2, 2, 2, 2, requires_grad=True)
    b2 = torch.randn(2, 2, 2, 2, requires_grad=True)
    none = torch.zeros(2, 2, dtype=torch.bool)
    loss = csa_loss(b1, b2, none, torch.ones(2, 2, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(b1.grad).all() and torch.count_nonzero(b1.grad) == 0


def test_csa_loss_infers_validity_from_zero_matrices() -> None:
    torch.manual_seed(0)
    fl, fk = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 2, (2, 8, 8))
    labels[1] = 0  # class 1 only in image 0
    oh = onehot(labels, 3)  # class 2 absent
    a, v = class_affinity(fl, fk, oh, return_valid=True)
    b, w = class_affinity(fk, fl, oh, return_valid=True)
    assert csa_loss(a, b).item() == pytest.approx(csa_loss(a, b, v, w).item())


def test_csa_end_to_end_gradient_and_bf16_autocast() -> None:
    torch.manual_seed(0)
    conv_l = torch.nn.Conv2d(1, 4, 3, padding=1)
    conv_k = torch.nn.Conv2d(4, 4, 3, padding=1)
    x1, x2 = torch.randn(2, 1, 8, 8), torch.randn(3, 1, 8, 8) + 2
    oh1 = onehot(torch.randint(0, 3, (2, 8, 8)), 3)
    oh2 = onehot(torch.randint(0, 2, (3, 8, 8)), 3)  # class 2 absent from modality 2

    def run() -> torch.Tensor:
        f1l = conv_l(x1)
        f2l = conv_l(x2)
        return csa_loss_from_features((f1l, conv_k(f1l)), oh1, (f2l, conv_k(f2l)), oh2)

    ref = run()
    ref.backward()
    assert ref.item() > 0 and torch.isfinite(conv_l.weight.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = run()
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert low.item() == pytest.approx(ref.item(), rel=0.2)


def test_affinity_loss_is_csa_with_one_whole_image_class() -> None:
    torch.manual_seed(0)
    f1l, f1k = torch.randn(2, 3, 4, 4), torch.randn(2, 2, 4, 4)
    f2l, f2k = torch.randn(3, 3, 4, 4), torch.randn(3, 2, 4, 4)
    ones1, ones2 = torch.ones(2, 1, 4, 4), torch.ones(3, 1, 4, 4)
    expected = csa_loss(class_affinity(f1l, f1k, ones1), class_affinity(f2l, f2k, ones2))
    assert affinity_loss(f1l, f1k, f2l, f2k).item() == pytest.approx(expected.item())
    # Hand value: constant maps give A = 1 / (H*W) = 1/16; against negated maps (cos = -1): (2/16)^2.
    c = torch.ones(1, 2, 4, 4)
    assert affinity_loss(c, c, c, -c).item() == pytest.approx((2 / 16) ** 2)
    assert affinity_loss(f1l, f1k, f1l, f1k).item() == 0.0


# ----------------------------------------------------------------------------------------------------
# UMMKD distillation


def test_kd_hand_value() -> None:
    # One image of two pixels: pixel 0 is class 0 with logits (2, 0); pixel 1 is class 1 with logits (0, 2).
    logits1 = torch.tensor([[[[2.0, 0.0]], [[0.0, 2.0]]]])  # (1, 2, 1, 2)
    oh = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    logits2 = torch.zeros(1, 2, 1, 2)  # uniform soft predictions
    z, counts = class_mean_logits(logits1, oh)
    assert torch.allclose(z, torch.tensor([[2.0, 0.0], [0.0, 2.0]]), atol=1e-5) and counts.tolist() == [1, 1]
    # T = 2: p1 = softmax((1, 0)) for class 0 (mirrored for class 1), p2 = (1/2, 1/2).
    e = math.e
    p = [e / (e + 1), 1 / (e + 1)]
    kl12 = sum(pi * math.log(pi / 0.5) for pi in p)
    kl21 = sum(0.5 * math.log(0.5 / pi) for pi in p)
    expected = (kl12 + kl21) / 2  # same for both classes
    assert ummkd_kd_loss(logits1, oh, logits2, oh).item() == pytest.approx(expected, rel=1e-5)
    # T = 1: sharper distributions, larger divergence.
    assert ummkd_kd_loss(logits1, oh, logits2, oh, T=1.0).item() > expected


def test_kd_symmetric_zero_when_equal_and_batch_pooled() -> None:
    torch.manual_seed(0)
    l1, l2 = torch.randn(2, 4, 6, 6), torch.randn(3, 4, 5, 5)
    o1 = onehot(torch.randint(0, 4, (2, 6, 6)), 4)
    o2 = onehot(torch.randint(0, 4, (3, 5, 5)), 4)
    forward = ummkd_kd_loss(l1, o1, l2, o2)
    assert forward.item() > 0
    assert forward.item() == pytest.approx(ummkd_kd_loss(l2, o2, l1, o1).item(), rel=1e-6)
    assert ummkd_kd_loss(l1, o1, l1 * 1.0, o1).item() == pytest.approx(0.0, abs=1e-7)
    # The means are pooled over the batch (not per image): splitting a batch differently changes nothing.
    both = ummkd_kd_loss(l1, o1, l2, o2)
    swapped = ummkd_kd_loss(l1.flip(0), o1.flip(0), l2, o2)
    assert both.item() == pytest.approx(swapped.item(), rel=1e-6)


def test_kd_absent_class_skipped_no_nan_and_autocast() -> None:
    torch.manual_seed(0)
    l1 = torch.randn(2, 3, 4, 4, requires_grad=True)
    l2 = torch.randn(2, 3, 4, 4, requires_grad=True)
    y1 = torch.randint(0, 3, (2, 4, 4))
    y2 = torch.randint(0, 2, (2, 4, 4))  # class 2 absent from modality 2
    o1, o2 = onehot(y1, 3), onehot(y2, 3)
    loss = ummkd_kd_loss(l1, o1, l2, o2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(l1.grad).all() and torch.isfinite(l2.grad).all()
    assert torch.count_nonzero(l1.grad * o1[:, 2:3]) == 0  # class-2 pixels of modality 1 get no gradient
    only01 = ummkd_kd_loss(l1[:, :, :, :], o1 * torch.tensor([1.0, 1.0, 0.0]).view(1, 3, 1, 1), l2, o2)
    assert loss.item() == pytest.approx(only01.item(), rel=1e-6)
    # No class in common: zero with a graph.
    none = ummkd_kd_loss(l1, onehot(torch.zeros(2, 4, 4, dtype=torch.long), 3), l2, onehot(y2.clamp(1, 1), 3))
    assert none.item() == 0.0 and none.requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = ummkd_kd_loss(l1.bfloat16(), o1, l2.bfloat16(), o2)
    assert low.dtype == torch.float32 and low.item() == pytest.approx(loss.item(), rel=0.1)
