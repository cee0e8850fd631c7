"""Paper 2 models: dilated FCN (parameter counts, shapes, taps), MSBN, and the six unpaired settings."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from modalseg.errors import ConfigError
from modalseg.models import create_model, list_models
from modalseg.models.dilated_fcn import DilatedFCN
from modalseg.models.msbn import (
    ModalitySpecificBatchNorm2d,
    convert_to_msbn,
    get_modality,
    modality,
    msbn_modules,
    set_modality,
)
from modalseg.models.unpaired import SETTINGS, UnpairedSegmenter, build_unpaired_model

TINY = {"width": 4, "dropout": 0.0}


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def bn_param_count(model: nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())


# ----------------------------------------------------------------------------------------------------
# Parameter counts (built on the meta device: no memory, no init cost)


@pytest.mark.parametrize(("num_classes", "expected"), [(4, 36_979_408), (5, 39_342_552)])
def test_dilated_fcn_parameter_counts_match_facts(num_classes: int, expected: int) -> None:
    with torch.device("meta"):
        model = create_model(
            "dilated_fcn", in_channels=1, num_classes=num_classes, num_modalities=2, norm="msbn"
        )
    assert n_trainable(model) == expected


def test_parameter_counts_of_the_settings_are_consistent() -> None:
    with torch.device("meta"):
        shared = create_model("dilated_fcn", in_channels=1, num_classes=4, norm="bn")
        segs = {s: UnpairedSegmenter("dilated_fcn", ["LGE", "bSSFP"], s, 4) for s in SETTINGS}
    bn = bn_param_count(shared)
    assert n_trainable(shared) == 36_979_408 - bn  # one BN set less than MSBN with two modalities
    assert n_trainable(segs["joint"]) == n_trainable(shared)
    assert n_trainable(segs["single"]) == 2 * n_trainable(shared)
    for s in ("msbn", "ummkd", "affinity", "csa"):
        assert n_trainable(segs[s]) == 36_979_408


# ----------------------------------------------------------------------------------------------------
# Dilated FCN


def test_registered_and_shapes_and_taps() -> None:
    assert "dilated_fcn" in list_models()
    model = create_model("dilated_fcn", in_channels=1, num_classes=4, num_modalities=2, **TINY)
    x = torch.randn(2, 1, 32, 48)
    names = [f"group{i}" for i in range(1, 11)]
    logits, feats = model.forward_features(x, layers=names)
    assert logits.shape == (2, 4, 32, 48)
    strides = {"group1": 2, "group2": 4, "group10": 1} | {f"group{i}": 8 for i in range(3, 10)}
    widths = {1: 4, 2: 8, 3: 16, 4: 32, 5: 64, 6: 64, 7: 128, 8: 128, 9: 128, 10: 8 * 4}
    for i in range(1, 11):
        f = feats[f"group{i}"]
        s = strides[f"group{i}"]
        assert f.shape == (2, widths[i], 32 // s, 48 // s), f"group{i}"
    assert torch.equal(model(x), logits) or model.training  # dropout 0: deterministic
    with pytest.raises(ConfigError, match="multiple of the output stride 8"):
        model(torch.randn(1, 1, 30, 32))
    with pytest.raises(ConfigError, match="unknown feature layer"):
        model.forward_features(x, layers=["nope"])


def test_architecture_details() -> None:
    model = DilatedFCN(in_channels=1, num_classes=4, num_modalities=2, norm="bn", width=4)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    assert not any(c.kernel_size == (1, 1) for c in convs)  # zero-padded shortcuts, no projection
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    assert [c.dilation for c in convs if c.dilation != (1, 1)] == [(2, 2)] * 4  # group8: two blocks x two P
    assert model.classifier.kernel_size == (5, 5)
    drops = [m for m in DilatedFCN(width=4).modules() if isinstance(m, nn.Dropout)]
    assert drops and all(d.p == 0.25 for d in drops)
    # The shortcut of a widening block is the input padded with zero channels.
    block = model.group2[0]
    for p in block.parameters():
        nn.init.zeros_(p)
    x = torch.randn(1, 4, 8, 8)
    y = block.eval()(x)
    assert torch.allclose(y[:, :4], x) and torch.count_nonzero(y[:, 4:]) == 0


# ----------------------------------------------------------------------------------------------------
# Modality-specific BN


def test_msbn_layer_keeps_separate_statistics_per_modality() -> None:
    layer = ModalitySpecificBatchNorm2d(3, num_modalities=3)
    x = torch.randn(4, 3, 5, 5) * 2 + 7
    layer.set_modality(1)
    layer(x)
    assert not torch.allclose(layer.bns[1].running_mean, torch.zeros(3))
    for i in (0, 2):
        assert torch.equal(layer.bns[i].running_mean, torch.zeros(3))
        assert int(layer.bns[i].num_batches_tracked) == 0
    with pytest.raises(IndexError):
        layer.set_modality(3)
    with modality(layer, 2):
        assert layer.active == 2
    assert layer.active == 1


def test_convert_to_msbn_any_architecture() -> None:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
    model = nn.Sequential(inner, nn.Sequential(nn.BatchNorm2d(3)), nn.Conv2d(3, 1, 1))
    for bn in (inner[1], model[1][0]):  # make parameters and statistics non-trivial
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 2, 8, 8)
    reference = model(x)
    converted = convert_to_msbn(model, 3)
    assert converted is model
    layers = msbn_modules(model)
    assert len(layers) == 2 and all(m.num_modalities == 3 for m in layers)
    inside = {id(b) for layer in layers for b in layer.bns}
    assert all(id(m) in inside for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    for i in range(3):  # every copy starts as the original
        set_modality(model, i)
        assert get_modality(model) == i
        assert torch.allclose(model(x), reference)
    assert not model.training and not any(b.training for layer in layers for b in layer.bns)
    # Copies are independent tensors.
    layers[0].bns[0].weight.data.add_(1)
    assert not torch.equal(layers[0].bns[0].weight, layers[0].bns[1].weight)
    # A bare BN is returned converted; converting twice is a no-op.
    bare = convert_to_msbn(nn.BatchNorm2d(5), 2)
    assert isinstance(bare, ModalitySpecificBatchNorm2d)
    assert convert_to_msbn(bare, 4) is bare


# ----------------------------------------------------------------------------------------------------
# Unpaired settings


def two_modality_batches(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(4, 1, 16, 16, generator=g)  # modality 0: N(0, 1)
    x2 = torch.randn(4, 1, 16, 16, generator=g) * 3 + 5  # modality 1: N(5, 9)
    y1 = torch.randint(0, 3, (4, 16, 16), generator=g)
    y2 = torch.randint(0, 3, (4, 16, 16), generator=g)
    return x1, y1, x2, y2


def train_steps(model: UnpairedSegmenter, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for step in range(steps):
        x1, y1, x2, y2 = two_modality_batches(step)
        loss = nn.functional.cross_entropy(model(x1, 0), y1) + nn.functional.cross_entropy(model(x2, "b"), y2)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_msbn_setting_shares_kernels_and_separates_bn() -> None:
    torch.manual_seed(0)
    model = UnpairedSegmenter("dilated_fcn", ["a", "b"], "msbn", num_classes=3, **TINY)
    assert len(model.networks) == 1 and model.uses_msbn
    net = model.networks[0]
    layers = msbn_modules(net)
    assert layers and len(layers) == sum(
        1 for m in DilatedFCN(norm="bn", width=4).modules() if isinstance(m, nn.BatchNorm2d)
    )
    assert all(layer.num_modalities == 2 for layer in layers)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]

    # Gradient routing: modality 1's loss reaches the shared kernels and only BN set 1.
    x1, y1, x2, y2 = two_modality_batches(0)
    model.train()
    nn.functional.cross_entropy(model(x2, 1), y2).backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in convs)
    assert all(layer.bns[0].weight.grad is None for layer in layers)
    assert all(layer.bns[1].weight.grad is not None for layer in layers)
    kernel_ids = [id(c.weight) for c in convs]
    model.zero_grad()
    model(x1, 0)
    assert [id(c.weight) for c in net.modules() if isinstance(c, nn.Conv2d)] == kernel_ids  # same objects

    train_steps(model)
    for layer in layers:
        b0, b1 = layer.bns
        assert not torch.allclose(b0.running_mean, b1.running_mean)
        assert not torch.allclose(b0.running_var, b1.running_var)
        assert not torch.allclose(b0.weight, b1.weight) or not torch.allclose(b0.bias, b1.bias)
    model.eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(model(x, 0), model(x, 1))  # same input, different BN sets


def test_joint_setting_shares_bn() -> None:
    torch.manual_seed(0)
    model = UnpairedSegmenter("dilated_fcn", ["a", "b"], "joint", num_classes=3, **TINY)
    assert not model.uses_msbn and not msbn_modules(model)
    train_steps(model)
    model.eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x, 0), model(x, "b"))


def test_single_setting_has_separate_networks() -> None:
    torch.manual_seed(0)
    model = UnpairedSegmenter("dilated_fcn", ["a", "b"], "single", num_classes=3, **TINY)
    assert len(model.networks) == 2 and not msbn_modules(model)
    ptrs = [{p.data_ptr() for p in net.parameters()} for net in model.networks]
    assert not ptrs[0] & ptrs[1]
    before = copy.deepcopy(model.networks[1].state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x1, y1, _, _ = two_modality_batches(0)
    model.train()
    nn.functional.cross_entropy(model(x1, "a"), y1).backward()
    opt.step()
    after = model.networks[1].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # network of modality b untouched
    assert all(p.grad is None for p in model.networks[1].parameters())


@pytest.mark.parametrize("setting", SETTINGS)
def test_forward_by_index_and_name_and_feature_taps(setting: str) -> None:
    torch.manual_seed(0)
    model = UnpairedSegmenter("dilated_fcn", ["CT", "MR"], setting, num_classes=5, **TINY).eval()
    assert model.auxiliary_loss == {"ummkd": "kd", "affinity": "affinity", "csa": "csa"}.get(setting)
    x = torch.randn(2, 1, 24, 32)
    with torch.no_grad():
        by_index = model(x, 1)
        by_name = model(x, "MR")
        logits, feats = model(x, "MR", return_features=True)
    assert by_index.shape == (2, 5, 24, 32)
    assert torch.equal(by_index, by_name) and torch.equal(by_index, logits)
    assert list(feats) == ["group5", "group6"]
    assert all(f.shape == (2, 64, 3, 4) for f in feats.values())
    with torch.no_grad():
        again, feats2 = model.forward_features(x, "MR")  # the documented spelling: the same pass
    assert torch.equal(again, logits) and all(torch.equal(feats[k], feats2[k]) for k in feats)
    assert not any(m._forward_hooks for m in model.modules())  # features come from forward_features, no hooks
    with pytest.raises(ConfigError, match="unknown modality"):
        model(x, "PET")
    with pytest.raises(ConfigError, match="out of range"):
        model(x, 2)


def test_feature_taps_carry_gradients_and_survive_deepcopy() -> None:
    torch.manual_seed(0)
    model = UnpairedSegmenter(
        "dilated_fcn", ["a", "b"], "csa", num_classes=3, feature_layers=("group4", "group7"), **TINY
    )
    x = torch.randn(2, 1, 16, 16)
    _, feats = model(x, 0, return_features=True)
    assert feats["group4"].shape == (2, 32, 2, 2) and feats["group7"].shape == (2, 128, 2, 2)
    feats["group4"].sum().backward()
    assert model.networks[0].group1[0].weight.grad is not None
    clone = copy.deepcopy(model)
    _, feats2 = clone(x, 1, return_features=True)
    assert set(feats2) == {"group4", "group7"}
    assert feats2["group4"].grad_fn is not None


def test_state_dict_round_trip_keeps_every_modality() -> None:
    torch.manual_seed(0)
    model = UnpairedSegmenter("dilated_fcn", ["a", "b"], "csa", num_classes=3, **TINY)
    train_steps(model, steps=2)
    state = model.state_dict()
    assert any(k.endswith("bns.1.running_mean") for k in state)
    fresh = UnpairedSegmenter("dilated_fcn", ["a", "b"], "csa", num_classes=3, **TINY)
    fresh.load_state_dict(state)
    model.eval(), fresh.eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        for m in (0, 1):
            assert torch.equal(model(x, m), fresh(x, m))


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown unpaired setting"):
        UnpairedSegmenter("dilated_fcn", ["a", "b"], "fancy", 3, **TINY)
    with pytest.raises(ConfigError, match="has no layer"):
        UnpairedSegmenter("dilated_fcn", ["a", "b"], "csa", 3, feature_layers=("group5", "nope"), **TINY)
    with pytest.raises(ConfigError, match="set by the unpaired wrapper"):
        UnpairedSegmenter("dilated_fcn", ["a", "b"], "msbn", 3, norm="bn", **TINY)
    with pytest.raises(ConfigError, match="distinct"):
        UnpairedSegmenter("dilated_fcn", ["a", "a"], "msbn", 3, **TINY)
    with pytest.raises(ConfigError, match="unknown option.*widht"):
        UnpairedSegmenter("dilated_fcn", ["a", "b"], "msbn", 3, widht=4)
    with pytest.raises(ConfigError, match="unknown model"):
        UnpairedSegmenter("nonexistent_net", ["a", "b"], "msbn", 3, feature_layers=())
    with pytest.raises(ConfigError, match="unknown unpaired model key"):
        build_unpaired_model({"modalities": ["a"], "setting": "msbn", "num_classes": 2, "colour": 1})
    with pytest.raises(ConfigError, match="missing"):
        build_unpaired_model({"modalities": ["a"]})


def test_build_unpaired_model_from_config() -> None:
    model = build_unpaired_model(
        {
            "backbone": "dilated_fcn",
            "modalities": ["LGE", "bSSFP"],
            "setting": "ummkd",
            "num_classes": 4,
            "options": {"width": 4, "dropout": 0.1},
        }
    )
    assert isinstance(model, UnpairedSegmenter) and model.uses_msbn and model.auxiliary_loss == "kd"
    assert model.feature_layers == ("group5", "group6")
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, nn.Dropout))
    assert model.networks[0].width == 4


def test_unet_backbone() -> None:
    if "unet" not in list_models():
        pytest.skip("paper-1 'unet' is not registered yet (written by another contributor)")
    torch.manual_seed(0)
    plain = create_model("unet", num_modalities=1, in_channels=1, num_classes=3, base_width=4)
    for setting in ("single", "joint", "csa"):
        model = UnpairedSegmenter("unet", ["a", "b"], setting, num_classes=3, base_width=4)
        assert model.feature_layers == ("master.blocks.3", "decoder.ups.0")
        assert bool(msbn_modules(model)) == (setting == "csa")
        extra = {"single": n_trainable(plain), "joint": 0, "csa": bn_param_count(plain)}[setting]
        assert n_trainable(model) == n_trainable(plain) + extra
        logits, feats = model(torch.randn(2, 1, 32, 32), "b", return_features=True)
        assert logits.shape == (2, 3, 32, 32)
        assert {k: tuple(v.shape) for k, v in feats.items()} == {
            "master.blocks.3": (2, 32, 4, 4),
            "decoder.ups.0": (2, 32, 4, 4),
        }
