"""Paper 2 fidelity options (issue 18, items 1, 2, 5): Eq. 4 readings and 1/S_c, the gradient-ratio log,
consecutive feature-layer pairs, UMMKD's batch Dice and absent-class KD, HD in voxels and the median aggregate."""

from __future__ import annotations

import argparse
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modalseg.errors import ConfigError
from modalseg.experiments import paper2
from modalseg.losses.affinity import check_pairable, class_affinity, csa_loss, csa_loss_from_features
from modalseg.losses.dice_ce import DiceCELoss
from modalseg.losses.kd import ummkd_dice_loss, ummkd_kd_loss
from modalseg.models.unpaired import UnpairedSegmenter, feature_pairs
from modalseg.training.tasks import UnpairedLoss

R = 1 / math.sqrt(2)
TINY = {"width": 2, "dropout": 0.0}
WEIGHTS = {"ce_weight": 1.0, "affinity_weight": 0.5, "kd_weight": 0.5, "kd_temperature": 2.0, "conv_l2": 0.0}


def onehot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


def batches(seed: int = 0, size: int = 32) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, 1, size, size, generator=g), torch.randn(2, 1, size, size, generator=g) * 2 + 3]
    ys = [torch.randint(0, 3, (2, size, size), generator=g) for _ in range(2)]
    return xs, ys


def make_loss(setting: str = "csa", layers=None, seed: int = 0, dropout: float = 0.0, **options) -> UnpairedLoss:
    torch.manual_seed(seed)
    net = UnpairedSegmenter("dilated_fcn", ["A", "B"], setting, num_classes=3, feature_layers=layers,
                            width=2, dropout=dropout)
    return UnpairedLoss(net, setting, **WEIGHTS, **options)


def shared_kernels(loss: UnpairedLoss) -> list[torch.Tensor]:
    """The parameters both modalities share in the dilated FCN: every conv kernel (no conv has a bias)."""
    return [m.weight for m in loss.network.modules() if isinstance(m, nn.Conv2d)]


def grad_norm(term: torch.Tensor, params: list[torch.Tensor]) -> float:
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads if g is not None))


# ----------------------------------------------------------------------------------------------------
# Item 1: readings of Eq. 4, with and without Eq. 3's 1/S_c


def two_modalities_3x3() -> tuple[tuple, torch.Tensor, tuple, torch.Tensor]:
    """2 classes on 3x3 maps: class 1 = top row (S_1 = 3), class 0 = the other 6 pixels (S_0 = 6).

    Layer l has 2 channels, layer k one. Cosines (hand): modality 1, class 1: cos(l0, k0) = 1,
    cos(l1, k0) = 1/sqrt2; class 0: 1 and 0 (l1 = +1, +1, +1, -1, -1, -1 against ones). Modality 2, class 1:
    0 and 0; class 0: 1 and 1.
    """
    ones = torch.ones(3, 3)
    l0 = ones.clone()
    l0[0] = torch.tensor([1.0, 0.0, 0.0])
    l1 = ones.clone()
    l1[0] = torch.tensor([1.0, 1.0, 0.0])
    l1[2] = -1.0
    k0 = ones.clone()
    k0[0] = torch.tensor([1.0, 0.0, 0.0])
    m1 = (torch.stack([l0, l1])[None], k0[None, None])
    l0b = ones.clone()
    l0b[0] = torch.tensor([0.0, 1.0, 0.0])
    m2 = (torch.stack([l0b, l0b.clone()])[None], k0[None, None].clone())
    labels = torch.zeros(1, 3, 3, dtype=torch.long)
    labels[0, 0] = 1
    return m1, onehot(labels, 2), m2, onehot(labels.clone(), 2)


def test_affinity_entries_with_and_without_region_norm() -> None:
    m1, oh1, _, _ = two_modalities_3x3()
    with_norm = class_affinity(*m1, oh1)
    plain = class_affinity(*m1, oh1, region_norm=False)
    assert torch.allclose(plain[0, 1, :, 0], torch.tensor([1.0, R]), atol=1e-6)
    assert torch.allclose(plain[0, 0, :, 0], torch.tensor([1.0, 0.0]), atol=1e-6)
    assert torch.allclose(with_norm[0, 1, :, 0], torch.tensor([1.0, R]) / 3, atol=1e-6)
    assert torch.allclose(with_norm[0, 0, :, 0], torch.tensor([1.0, 0.0]) / 6, atol=1e-6)


@pytest.mark.parametrize(
    ("form", "region_norm", "expected"),
    [
        # differences d (mod 1 - mod 2): with 1/S_c, class 1 [1/3, R/3], class 0 [0, -1/6]; without, [1, R], [0, -1]
        ("literal", True, (((1 + R) / 6) ** 2 + (1 / 12) ** 2) / 2),
        ("mean_squared", True, ((1 / 9 + 1 / 18) / 2 + (1 / 36) / 2) / 2),  # = 7/144
        ("literal", False, (((1 + R) / 2) ** 2 + (1 / 2) ** 2) / 2),
        ("mean_squared", False, ((1 + 1 / 2) / 2 + (0 + 1) / 2) / 2),  # = 5/8
    ],
)
def test_csa_readings_hand_values(form: str, region_norm: bool, expected: float) -> None:
    m1, oh1, m2, oh2 = two_modalities_3x3()
    got = csa_loss_from_features(m1, oh1, m2, oh2, form=form, region_norm=region_norm)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    if form == "mean_squared" and region_norm:
        assert got.item() == pytest.approx(7 / 144, rel=1e-5)
    if form == "mean_squared" and not region_norm:
        assert got.item() == pytest.approx(5 / 8, rel=1e-5)


def test_literal_reading_blind_to_structure_mean_squared_not() -> None:
    # Same mean entry, different matrices: the printed Eq. 4 sees nothing, the element-wise reading does.
    a1 = torch.tensor([[1.0, -1.0]]).view(1, 1, 1, 2)
    a2 = torch.tensor([[-1.0, 1.0]]).view(1, 1, 1, 2)
    assert csa_loss(a1, a2, form="literal").item() == 0.0
    assert csa_loss(a1, a2, form="mean_squared").item() == pytest.approx(4.0)


@pytest.mark.parametrize("setting", ["csa", "affinity"])
@pytest.mark.parametrize(("reading", "norm"), [("literal", True), ("mean_squared", True), ("literal", False),
                                               ("mean_squared", False)])
def test_unpaired_loss_uses_the_configured_reading(setting: str, reading: str, norm: bool) -> None:
    loss = make_loss(setting, csa_reading=reading, csa_region_norm=norm)
    xs, ys = batches()
    _, parts = loss(xs, ys)
    feats = [loss.network(x, modality=k, return_features=True)[1] for k, x in enumerate(xs)]
    f = [{n: t.float() for n, t in d.items()} for d in feats]
    if setting == "csa":
        direct = csa_loss_from_features((f[0]["group5"], f[0]["group6"]), onehot(ys[0], 3),
                                        (f[1]["group5"], f[1]["group6"]), onehot(ys[1], 3),
                                        form=reading, region_norm=norm)
    else:
        ones = [torch.ones(2, 1, 4, 4), torch.ones(2, 1, 4, 4)]
        direct = csa_loss_from_features((f[0]["group5"], f[0]["group6"]), ones[0],
                                        (f[1]["group5"], f[1]["group6"]), ones[1],
                                        form=reading, region_norm=norm)
    assert parts[setting] == pytest.approx(direct.item(), rel=1e-5, abs=1e-12)
    assert f"csa_reading={reading!r}" in repr(loss) and f"csa_region_norm={norm}" in repr(loss)


def test_unknown_reading_refused() -> None:
    with pytest.raises(ConfigError, match="csa_reading"):
        make_loss(csa_reading="squared_mean")
    with pytest.raises(ValueError, match="form must be"):
        csa_loss(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), form="l2")


# ----------------------------------------------------------------------------------------------------
# Item 1: gradient ratio in the log


@pytest.mark.parametrize(("setting", "options"), [
    ("csa", {}),
    ("csa", {"csa_reading": "mean_squared", "csa_region_norm": False}),
    ("affinity", {"csa_reading": "mean_squared"}),
    ("ummkd", {}),
])
def test_gradient_ratio_equals_direct_computation(setting: str, options: dict) -> None:
    loss = make_loss(setting, grad_ratio_every=1, **options)
    loss.train()
    xs, ys = batches()
    _, parts = loss(xs, ys)
    # Direct: the same forward (dropout 0, batch statistics), both terms differentiated on the shared kernels.
    seg = torch.zeros(())
    logits_all, ohs, feats = [], [], []
    for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
        logits, f = loss.network(x, modality=k, return_features=True)
        seg = seg + DiceCELoss()(logits.float(), y)
        logits_all.append(logits.float())
        ohs.append(onehot(y, 3))
        feats.append({n: t.float() for n, t in f.items()})
    assert seg.item() == pytest.approx(parts["seg"], rel=1e-6)
    aux = loss.auxiliary(logits_all, ohs, feats)
    weight = 0.5
    params = shared_kernels(loss)
    expected = grad_norm(weight * aux, params) / grad_norm(seg, params)
    assert expected > 0
    assert parts["aux_grad_ratio"] == pytest.approx(expected, rel=1e-4)


def test_gradient_ratio_every_n_and_off_by_default() -> None:
    xs, ys = batches()
    default = make_loss().train()
    assert all("aux_grad_ratio" not in default(xs, ys)[1] for _ in range(2))
    every2 = make_loss(grad_ratio_every=2).train()
    seen = ["aux_grad_ratio" in every2(xs, ys)[1] for _ in range(4)]
    assert seen == [True, False, True, False]
    with torch.no_grad():  # evaluation passes neither measure nor count
        assert "aux_grad_ratio" not in every2(xs, ys)[1]
    assert "aux_grad_ratio" in every2(xs, ys)[1]
    assert "aux_grad_ratio" not in make_loss("msbn", grad_ratio_every=1).train()(xs, ys)[1]  # no L_aux
    with pytest.raises(ConfigError, match="grad_ratio_every"):
        make_loss(grad_ratio_every=-1)


@pytest.mark.parametrize("setting", ["csa", "ummkd"])
def test_measuring_leaves_training_unchanged(setting: str) -> None:
    """Same weights, same BN statistics and same random stream after two Adam steps, with dropout on."""
    measured = make_loss(setting, dropout=0.25, grad_ratio_every=1)
    plain = make_loss(setting, dropout=0.25)
    plain.network.load_state_dict(copy.deepcopy(measured.network.state_dict()))
    results = []
    for module in (measured, plain):
        module.train()
        opt = torch.optim.Adam(module.parameters(), lr=1e-3)
        torch.manual_seed(123)
        values = []
        for step in range(2):
            xs, ys = batches(step)
            opt.zero_grad()
            loss, parts = module(xs, ys)
            loss.backward()
            opt.step()
            values.append((parts["loss"], "aux_grad_ratio" in parts))
        results.append((values, torch.rand(3), copy.deepcopy(module.network.state_dict())))
    (v1, r1, s1), (v2, r2, s2) = results
    assert [v for v, _ in v1] == [v for v, _ in v2]
    assert [m for _, m in v1] == [True, True] and [m for _, m in v2] == [False, False]
    assert torch.equal(r1, r2)  # no extra random numbers drawn
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


# ----------------------------------------------------------------------------------------------------
# Item 2: every consecutive layer pair


def test_feature_pairs_are_consecutive_and_refusals() -> None:
    assert feature_pairs(["a", "b"]) == [("a", "b")]
    assert feature_pairs(["a", "b", "c", "d"]) == [("a", "b"), ("b", "c"), ("c", "d")]
    with pytest.raises(ConfigError, match="at least two"):
        feature_pairs(["a"])
    with pytest.raises(ConfigError, match="distinct"):
        feature_pairs(["a", "b", "a"])
    for setting in ("csa", "affinity"):
        with pytest.raises(ConfigError, match="at least two feature layers"):
            make_loss(setting, layers=("group5",))
        with pytest.raises(ConfigError, match="distinct"):
            make_loss(setting, layers=("group5", "group5"))
    with pytest.raises(ConfigError, match="has no layer"):
        make_loss(layers=("group5", "group66"))
    make_loss("ummkd", layers=("group5",))  # settings without affinity ignore the layers
    check_pairable("a", (4, 6), "b", (2, 3))
    check_pairable("a", (2, 3), "b", (4, 6))
    with pytest.raises(ConfigError, match="cannot be paired"):
        check_pairable("a", (3, 4), "b", (2, 2))
    with pytest.raises(ConfigError, match="cannot be paired"):
        check_pairable("a", (4, 2), "b", (2, 4))
    with pytest.raises(ConfigError, match=r"\(B, C, H, W\)"):
        check_pairable("a", (4,), "b", (4,))


def three_layer_setup(setting: str = "csa", **options):
    loss = make_loss(setting, layers=("group3", "group4", "group5"), **options)
    xs, ys = batches()
    logits_all, ohs, feats = [], [], []
    for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
        logits, f = loss.network(x, modality=k, return_features=True)
        logits_all.append(logits.float())
        ohs.append(onehot(y, 3))
        feats.append({n: t.float() for n, t in f.items()})
    return loss, xs, ys, logits_all, ohs, feats


def pair_loss(feats, ohs, a: str, b: str, **kw) -> torch.Tensor:
    return csa_loss_from_features((feats[0][a], feats[0][b]), ohs[0], (feats[1][a], feats[1][b]), ohs[1], **kw)


def test_three_layers_average_two_pairs() -> None:
    loss, xs, ys, _, ohs, feats = three_layer_setup()
    assert loss.layer_pairs == [("group3", "group4"), ("group4", "group5")]
    _, parts = loss(xs, ys)
    p1 = pair_loss(feats, ohs, "group3", "group4").item()
    p2 = pair_loss(feats, ohs, "group4", "group5").item()
    first_last = pair_loss(feats, ohs, "group3", "group5").item()
    assert parts["csa"] == pytest.approx((p1 + p2) / 2, rel=1e-5)
    assert parts["csa"] != pytest.approx(first_last, rel=1e-3)  # the old (first, last) reading


def test_three_layers_each_pair_contributes_gradient() -> None:
    kw = {"form": "mean_squared", "region_norm": False}
    loss, _, _, logits_all, ohs, feats = three_layer_setup(csa_reading="mean_squared", csa_region_norm=False)
    aux = loss.auxiliary(logits_all, ohs, feats)
    net = loss.network.networks[0]
    third = [p for n, p in net.group5.named_parameters() if "bns" not in n]  # the third layer's own kernels
    middle = [p for n, p in net.group4.named_parameters() if "bns" not in n]
    first = [p for n, p in net.group3.named_parameters() if "bns" not in n]
    p1 = pair_loss(feats, ohs, "group3", "group4", **kw)
    p2 = pair_loss(feats, ohs, "group4", "group5", **kw)

    def grads(term, params):
        return [g if g is not None else torch.zeros_like(p)
                for g, p in zip(torch.autograd.grad(term, params, retain_graph=True, allow_unused=True),
                                params, strict=True)]

    g_aux = grads(aux, first + middle + third)
    g1 = grads(p1, first + middle + third)
    g2 = grads(p2, first + middle + third)
    for ga, a, b in zip(g_aux, g1, g2, strict=True):
        assert torch.allclose(ga, (a + b) / 2, rtol=1e-4, atol=1e-6)
    n_first, n_mid = len(first), len(middle)
    # Pair 1 (group3-group4) reaches group4's kernels but not group5's; pair 2 reaches group5's.
    assert all(float(g.abs().sum()) > 0 for g in g1[n_first:n_first + n_mid])
    assert all(float(g.abs().sum()) == 0 for g in g1[n_first + n_mid:])
    assert all(float(g.abs().sum()) > 0 for g in g2[n_first + n_mid:])
    assert all(float(g.abs().sum()) > 0 for g in g_aux[n_first + n_mid:])


def test_pairs_at_several_scales() -> None:
    """group2 (1/4) with group3 (1/8): the class masks are resized to group2's size, group3 upsampled onto it."""
    xs, ys = batches()
    loss = make_loss(layers=("group2", "group3", "group4"))
    _, parts = loss(xs, ys)
    feats = [{n: t.float() for n, t in loss.network(x, modality=k, return_features=True)[1].items()}
             for k, x in enumerate(xs)]
    assert feats[0]["group2"].shape[-1] == 2 * feats[0]["group3"].shape[-1]
    ohs = [onehot(y, 3) for y in ys]
    p1 = pair_loss(feats, ohs, "group2", "group3")
    p2 = pair_loss(feats, ohs, "group3", "group4")
    assert parts["csa"] == pytest.approx((p1.item() + p2.item()) / 2, rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# Item 5: UMMKD's conventions


def test_ummkd_batch_dice_hand_value() -> None:
    # One image, two pixels: pixel a is class 0 with p = (3/4, 1/4), pixel b class 1 with p = (1/2, 1/2).
    logits = torch.tensor([[[[math.log(3.0), 0.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    oh = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    dice0 = 2 * 0.75 / ((0.75 ** 2 + 0.5 ** 2) + 1)  # I = 3/4, sum p^2 = 13/16, sum g = 1
    dice1 = 2 * 0.5 / ((0.25 ** 2 + 0.5 ** 2) + 1)  # I = 1/2, sum p^2 = 5/16, sum g = 1
    assert ummkd_dice_loss(logits, oh).item() == pytest.approx(1 - (dice0 + dice1) / 2, rel=1e-6)
    # Pooled over the batch, background included: two one-pixel images of uniform p, classes 0 and 1.
    # Per class: I = 1/2, sum p^2 = 1/2, sum g = 1 -> Dice 2/3; loss 1/3 (the per-image foreground Dice differs).
    uniform = torch.zeros(2, 2, 1, 1)
    oh2 = onehot(torch.tensor([[[0]], [[1]]]), 2)
    assert ummkd_dice_loss(uniform, oh2).item() == pytest.approx(1 / 3, rel=1e-6)
    per_image = DiceCELoss(alpha=0.0)(uniform, torch.tensor([[[0]], [[1]]])).item()
    assert per_image == pytest.approx(((1 - 1 / 1.5) + (1 - 2 / 2.5)) / 2, rel=1e-6)


def test_unpaired_loss_with_ummkd_batch_dice() -> None:
    xs, ys = batches()
    loss = make_loss("msbn", dice_form="ummkd_batch")
    _, parts = loss(xs, ys)
    expected = sum(
        ummkd_dice_loss(loss.network(x, modality=k).float(), onehot(y, 3)).item()
        + F.cross_entropy(loss.network(x, modality=k).float(), y).item()
        for k, (x, y) in enumerate(zip(xs, ys, strict=True))
    )
    assert parts["seg"] == pytest.approx(expected, rel=1e-5)
    assert parts["seg"] != pytest.approx(make_loss("msbn")(xs, ys)[1]["seg"], rel=1e-3)
    with pytest.raises(ConfigError, match="dice_form"):
        make_loss(dice_form="batch")


def test_kd_absent_classes_ummkd_hand_value() -> None:
    # Modality 1: a class-0 pixel with logits (2, 0) and a class-1 pixel with logits (0, 2).
    # Modality 2: one class-0 pixel with logits (2, 0); class 1 absent (mean logits 0 -> uniform).
    l1 = torch.tensor([[[[2.0, 0.0]], [[0.0, 2.0]]]])
    o1 = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    l2 = torch.tensor([[[[2.0]], [[0.0]]]])
    o2 = torch.tensor([[[[1.0]], [[0.0]]]])
    e = math.e
    p = [1 / (e + 1), e / (e + 1)]  # softmax((0, 2) / 2)
    sym_kl = (sum(pi * math.log(pi / 0.5) for pi in p) + sum(0.5 * math.log(0.5 / pi) for pi in p)) / 2
    assert ummkd_kd_loss(l1, o1, l2, o2).item() == pytest.approx(0.0, abs=1e-6)  # class 0 identical, 1 skipped
    assert ummkd_kd_loss(l1, o1, l2, o2, absent="ummkd").item() == pytest.approx(sym_kl / 2, rel=1e-5)
    # A third class absent from both batches (logit 0 everywhere) adds 0 but counts in UMMKD's mean over all
    # classes. Class 1 is now softmax((0, 2, 0) / 2) = (1, e, 1) / (e + 2) against uniform thirds.
    z = torch.zeros(1, 1, 1, 2)
    l1c, o1c = torch.cat([l1, z], 1), torch.cat([o1, z], 1)
    l2c, o2c = torch.cat([l2, z[..., :1]], 1), torch.cat([o2, z[..., :1]], 1)
    q = [1 / (e + 2), e / (e + 2), 1 / (e + 2)]
    sym3 = (sum(qi * math.log(3 * qi) for qi in q) + sum(math.log(1 / (3 * qi)) / 3 for qi in q)) / 2
    assert ummkd_kd_loss(l1c, o1c, l2c, o2c, absent="ummkd").item() == pytest.approx(sym3 / 3, rel=1e-5)
    assert ummkd_kd_loss(l1c, o1c, l2c, o2c).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="absent"):
        ummkd_kd_loss(l1, o1, l2, o2, absent="drop")


def test_unpaired_loss_kd_absent_option() -> None:
    xs, ys = batches()
    ys[1] = ys[1].clamp(max=1)  # class 2 absent from modality B
    skip = make_loss("ummkd")(xs, ys)[1]["kd"]
    exact = make_loss("ummkd", kd_absent_classes="ummkd")(xs, ys)[1]["kd"]
    loss = make_loss("ummkd")
    logits = [loss.network(x, modality=k).float() for k, x in enumerate(xs)]
    ohs = [onehot(y, 3) for y in ys]
    assert skip == pytest.approx(ummkd_kd_loss(logits[0], ohs[0], logits[1], ohs[1]).item(), rel=1e-5)
    assert exact == pytest.approx(
        ummkd_kd_loss(logits[0], ohs[0], logits[1], ohs[1], absent="ummkd").item(), rel=1e-5)
    assert exact != pytest.approx(skip, rel=1e-3)
    with pytest.raises(ConfigError, match="kd_absent_classes"):
        make_loss("ummkd", kd_absent_classes="none")


# ----------------------------------------------------------------------------------------------------
# Item 5: HD in voxels and the median aggregate


def test_voxel_distances_equal_mm_distances_at_spacing_one() -> None:
    from modalseg.evaluation.metrics import evaluate_case

    target = np.zeros((3, 4, 4), dtype=np.int64)
    pred = np.zeros((3, 4, 4), dtype=np.int64)
    target[0, 1, 1] = 1  # one voxel each: HD = the distance between the voxels
    pred[2, 1, 2] = 1
    target[1, 3, 3] = pred[1, 3, 3] = 2
    # Slices given out of z order and with a spacing in mm: the volume is stacked by (case_id, z).
    records = [{"patient_id": "p1", "case_id": "c1", "z": z, "spacing": (1.25, 1.25), "slice_thickness": 5.0}
               for z in (2, 0, 1)]
    order = [2, 0, 1]
    got = paper2.voxel_distances(pred[order], target[order], records, ["bg", "a", "b"])
    assert got[("p1", "a")]["hd_vox"] == pytest.approx(math.sqrt(2 ** 2 + 1 ** 2))  # sqrt 5, in voxels
    assert got[("p1", "b")]["hd_vox"] == 0.0
    mm = evaluate_case(pred, target, num_classes=3, class_names=["bg", "a", "b"], spacing=(5.0, 1.25, 1.25),
                       case_id="p1")
    assert mm[0].hd == pytest.approx(math.sqrt(10.0 ** 2 + 1.25 ** 2))  # the mm distance differs
    unit = evaluate_case(pred, target, num_classes=3, class_names=["bg", "a", "b"], spacing=1.0, case_id="p1")
    assert [got[("p1", m.class_name)]["hd_vox"] for m in unit] == [m.hd for m in unit]
    assert [got[("p1", m.class_name)]["hd95_vox"] for m in unit] == [m.hd95 for m in unit]
    rows = [{"setting": "CSA", "hd": 9.0, "hd95": 8.0, "hd_vox": 2.0, "hd95_vox": 1.0}]
    assert paper2.with_hd_units(rows, "voxels") == [{**rows[0], "hd": 2.0, "hd95": 1.0}]
    assert paper2.with_hd_units(rows, "mm") is rows


def test_median_records_hand_values_and_table() -> None:
    from modalseg.evaluation.tables import class_table

    base = {"setting": "CSA", "modality": "MR", "class_name": "LV", "run": 0}
    values = [1.0, 10.0, 2.0, math.inf]
    rows = [{**base, "patient_id": f"p{i}", "hd": v, "status": "ok" if math.isfinite(v) else "pred_empty"}
            for i, v in enumerate(values)]
    rows.append({**base, "run": 1, "patient_id": "p0", "hd": 4.0, "status": "ok"})
    rows.append({**base, "run": 1, "patient_id": "p1", "hd": 6.0, "status": "ok"})
    med = paper2.median_records(rows, "hd")
    finite = {r["run"]: r["hd"] for r in med if math.isfinite(r["hd"])}
    assert finite == {0: 2.0, 1: 5.0}  # median of (1, 10, 2) and of (4, 6)
    assert sum(not math.isfinite(r["hd"]) for r in med) == 1  # the inf is kept, to be counted as excluded
    table, _ = class_table(med, metrics=("hd",), row_key="setting", column_keys=("modality", "class_name"),
                           run_key="run")
    assert table[0]["MR LV"] == "3.50"  # mean over the two runs of the per-run medians
    assert "pred_empty: 1" in table[0]["Excluded"]


def parse(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    paper2.add_arguments(parser)
    return parser.parse_args(["--data", "d", "--output", "o", *extra])


def test_experiment_options_signature_and_notes() -> None:
    default = parse()
    assert (default.csa_reading, default.csa_region_norm, default.dice_form, default.kd_absent_classes,
            default.hd_units, default.aggregate) == ("literal", True, "per_image", "skip", "mm", "mean")
    args = parse("--csa-reading", "mean_squared", "--csa-region-norm", "false", "--dice-form", "ummkd_batch",
                 "--kd-absent-classes", "ummkd", "--hd-units", "voxels", "--aggregate", "median",
                 "--feature-layers", "group4,group5,group6")
    assert args.feature_layers == ["group4", "group5", "group6"]
    assert paper2._loss_options(default, "csa") == {}
    assert paper2._loss_options(args, "csa") == {"csa_reading": "mean_squared", "csa_region_norm": False,
                                                 "dice_form": "ummkd_batch"}
    assert paper2._loss_options(args, "ummkd") == {"dice_form": "ummkd_batch", "kd_absent_classes": "ummkd"}
    assert paper2._loss_options(args, "msbn") == {"dice_form": "ummkd_batch"}
    note = paper2._table_note("hd", {"MR": 3}, args, [0])
    assert "HD (voxels)" in note and "medians" in note and "mean_squared" in note
    assert "region normalisation off" in note and "group4-group5-group6 (consecutive pairs averaged)" in note
    assert "UMMKD's, over the whole batch" in note and "averages over all classes" in note
    plain = paper2._table_note("hd", {"MR": 3}, default, [0])
    assert "HD (mm)" in plain and "literal (as printed)" in plain and "on (Eq. 3 as printed)" in plain
    assert "group5-group6" in plain and "aggregate: mean" in plain
    for bad in (["--csa-region-norm", "maybe"], ["--feature-layers", "group5,group5"], ["--hd-units", "cm"],
                ["--aggregate", "mode"], ["--csa-reading", "l2"]):
        with pytest.raises(SystemExit):
            parse(*bad)


def test_experiment_train_config_passes_the_conventions(tmp_path) -> None:
    import dataclasses

    from modalseg.training.config import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    args = parse("--csa-reading", "mean_squared")
    if "csa_reading" in known:
        assert paper2._train_config(args, "csa", 0, 0, tmp_path, tmp_path).csa_reading == "mean_squared"
    else:
        with pytest.raises(ConfigError, match="csa_reading"):
            paper2._train_config(args, "csa", 0, 0, tmp_path, tmp_path)
    paper2._train_config(args, "msbn", 0, 0, tmp_path, tmp_path)  # msbn has no CSA: nothing to pass


def test_experiment_tables_in_voxels_and_medians(tmp_path, monkeypatch) -> None:
    from modalseg.data.synth import make_cardiac_dataset
    from modalseg.training.engine import Trainer

    data = make_cardiac_dataset(tmp_path / "data", num_patients_per_modality=5, slices=3, size=32, seed=2)
    out = tmp_path / "exp"
    base = ["--settings", "msbn", "--width", "2", "--iterations", "1", "--eval-every", "1", "--batch-size", "2",
            "--precision", "fp32", "--quiet", "--folds", "2"]
    parser = argparse.ArgumentParser()
    paper2.add_arguments(parser)
    assert paper2.run(parser.parse_args(["--data", str(data), "--output", str(out), *base])) == 0
    monkeypatch.setattr(Trainer, "fit", lambda self: (_ for _ in ()).throw(AssertionError("records reused")))
    extra = ["--hd-units", "voxels", "--aggregate", "median"]
    assert paper2.run(parser.parse_args(["--data", str(data), "--output", str(out), *base, *extra])) == 0
    import csv

    with open(out / "records.csv", newline="") as fh:
        records = list(csv.DictReader(fh))
    with open(out / "table_hd.csv", newline="") as fh:
        table = list(csv.DictReader(fh))[0]
    assert "(voxels)" in (out / "table_hd.md").read_text() and "medians" in (out / "table_hd.md").read_text()
    for modality in ("CT", "MR"):
        for cls in ("LV", "Myo", "RV"):
            vals = [float(r["hd_vox"]) for r in records if r["modality"] == modality and r["class_name"] == cls]
            finite = [v for v in vals if math.isfinite(v)]
            if finite:
                assert float(table[f"{modality} {cls}"]) == pytest.approx(np.median(finite), abs=0.006)
            else:
                assert table[f"{modality} {cls}"] == "n/a"
