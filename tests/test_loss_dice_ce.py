"""Paper 1 Eq. (1): Dice (eps = 1, softmax foreground, per image, batch mean) + 1.0 x cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modalseg.losses.dice_ce import DiceCELoss, dice_ce_loss


def eq1_reference(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0, alpha: float = 1.0) -> float:
    """Direct, loop-based Eq. (1) in float64: per image and foreground class Dice, then pixel-mean CE."""
    logits = logits.double()
    prob = torch.softmax(logits, dim=1)
    b, c = logits.shape[:2]
    dice_terms = []
    for i in range(b):
        for k in range(1, c):
            p = prob[i, k].flatten()
            y = (target[i] == k).double().flatten()
            dice_terms.append(1.0 - (2.0 * float((p * y).sum()) + eps) / (float(p.sum()) + float(y.sum()) + eps))
    log_prob = torch.log_softmax(logits, dim=1)
    ce_terms = [
        -float(log_prob[i, int(target[i, h, w]), h, w])
        for i in range(b)
        for h in range(target.shape[1])
        for w in range(target.shape[2])
    ]
    return sum(dice_terms) / len(dice_terms) + alpha * sum(ce_terms) / len(ce_terms)


def test_hand_computed_two_pixels():
    # pixel 1: logits (0, ln 3) -> p_fg = 0.75, label 1; pixel 2: logits (0, 0) -> p_fg = 0.5, label 0
    logits = torch.tensor([[[[0.0, 0.0]], [[math.log(3.0), 0.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    dice = 1.0 - (2 * 0.75 + 1.0) / ((0.75 + 0.5) + 1.0 + 1.0)  # = 1 - 2.5 / 3.25
    ce = -(math.log(0.75) + math.log(0.5)) / 2
    assert DiceCELoss()(logits, target).item() == pytest.approx(dice + ce, abs=1e-6)
    assert dice_ce_loss(logits, target).item() == pytest.approx(dice + ce, abs=1e-6)
    assert dice + ce == pytest.approx(0.7211838, abs=1e-6)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_equals_direct_eq1(num_classes):
    g = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(3, num_classes, 5, 6, generator=g) * 2
    target = torch.randint(0, num_classes, (3, 5, 6), generator=g)
    expected = eq1_reference(logits, target)
    assert DiceCELoss()(logits, target).item() == pytest.approx(expected, rel=1e-5)
    # target with a channel axis gives the same value
    assert DiceCELoss()(logits, target[:, None]).item() == pytest.approx(expected, rel=1e-5)


def test_dice_is_per_image_then_batch_mean():
    """A batch-pooled Dice (MONAI ``batch=True``) differs when images have very different foregrounds."""
    logits = torch.zeros(2, 2, 4, 4)
    logits[0, 1] = 4.0  # image 0: confident foreground everywhere
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[0] = 1
    target[1, 0, 0] = 1
    prob = torch.softmax(logits.double(), 1)[:, 1]
    y = (target == 1).double()
    per_image = [1 - (2 * (prob[i] * y[i]).sum() + 1) / (prob[i].sum() + y[i].sum() + 1) for i in range(2)]
    pooled = 1 - (2 * (prob * y).sum() + 1) / (prob.sum() + y.sum() + 1)
    ce = F.cross_entropy(logits.double(), target)
    value = DiceCELoss()(logits, target).item()
    assert value == pytest.approx(float(sum(per_image) / 2 + ce), rel=1e-6)
    assert abs(value - float(pooled + ce)) > 1e-2


def test_alpha_and_eps():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 2, 8, 8, generator=g)
    target = torch.randint(0, 2, (2, 8, 8), generator=g)
    ce = F.cross_entropy(logits, target).item()
    assert DiceCELoss(alpha=0.0)(logits, target).item() == pytest.approx(eq1_reference(logits, target) - ce, rel=1e-5)
    assert dice_ce_loss(logits, target, eps=0.5, alpha=2.0).item() == pytest.approx(
        eq1_reference(logits, target, eps=0.5, alpha=2.0), rel=1e-5
    )


def test_empty_foreground_is_finite_and_eps_driven():
    logits = torch.full((1, 2, 4, 4), 0.0)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    # p_fg = 0.5 everywhere, y = 0: Dice = 1 - 1 / (8 + 1); CE = ln 2
    assert DiceCELoss()(logits, target).item() == pytest.approx(1 - 1 / 9 + math.log(2), abs=1e-6)


def test_bf16_logits_and_gradient():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 8, 8, generator=g)
    target = torch.randint(0, 3, (2, 8, 8), generator=g)
    x = logits.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = DiceCELoss()(x.to(torch.bfloat16), target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(eq1_reference(logits.to(torch.bfloat16).float(), target), rel=1e-5)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="does not match"):
        DiceCELoss()(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="C>=2"):
        DiceCELoss()(torch.randn(1, 1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
