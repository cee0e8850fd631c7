"""``forward_features`` on every model (side outputs of one pass, no hooks) and the ``spatial_dims=3`` seam.

The "old paths" the features are compared with: the ``attention_maps`` attribute and forward hooks on the
modules whose outputs the features are (what ``UnpairedSegmenter`` registered before ``forward_features``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modalseg.errors import ConfigError
from modalseg.models import attention_maps, create_model, list_models, model_card
from modalseg.models.msbn import msbn_modules, set_modality
from modalseg.models.unpaired import UnpairedSegmenter

SA_MODELS = ("unet_sa", "fuse_unet_sa", "master_assistant")


def tiny(name: str, num_modalities: int | None = None, **kw: object) -> nn.Module:
    card = model_card(name)
    if num_modalities is None:
        num_modalities = 1 if card.inputs == "single" else 2
    if card.family == "dilated_fcn":
        opts: dict[str, object] = {"width": 2, "dropout": 0.0, "num_classes": 3}
    elif card.family == "fusenet":
        opts = {"base_width": 2, "num_modalities": num_modalities}
    else:
        opts = {"base_width": 4, "sa_reduction": 4, "num_modalities": num_modalities}
    opts.update(kw)
    torch.manual_seed(0)
    return create_model(name, **opts)


def hooked(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Record the outputs of the named modules (the old, hook-based way of getting features)."""
    got: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for n in names:
        modules[n].register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o.detach().clone()))
    return got


def n_inputs(name: str) -> int:
    return 1 if model_card(name).inputs in ("single", "unpaired") else 2


# ------------------------------------------------------------------------------------------ 2D contract
@pytest.mark.parametrize("name", list_models())
def test_forward_features_logits_equal_forward(name: str) -> None:
    model = tiny(name).eval()
    x = torch.randn(2, n_inputs(name), 32, 32)
    with torch.no_grad():
        plain = model(x)
        logits, feats = model.forward_features(x)
    assert torch.equal(plain, logits)
    assert isinstance(feats, dict) and set(feats) == set(model.default_features)
    assert set(model.default_features) <= set(model.feature_names)
    with pytest.raises(ConfigError, match="unknown feature layer"):
        model.forward_features(x, layers=["no.such.layer"])


@pytest.mark.parametrize("name", SA_MODELS)
def test_sa_maps_equal_the_attention_maps_attribute_and_the_gates_outputs(name: str) -> None:
    model = tiny(name).eval()
    gates = list(model.gate_names)
    seen = hooked(model, gates)
    x = torch.randn(2, n_inputs(name), 32, 32)
    with torch.no_grad():
        model(x)
        old = {k: [t.clone() for t in v] for k, v in model.attention_maps.items()}
        logits, feats = model.forward_features(x)
    assert list(feats) == gates and len(gates) == (10 if name == "fuse_unet_sa" else 5)
    for g in gates:
        assert torch.equal(feats[g], seen[g])
        assert feats[g].shape[:2] == (2, 1)
    grouped = attention_maps(feats)
    assert list(grouped) == list(old) == (["master", "assistant1"] if name == "fuse_unet_sa" else ["master"])
    for stream, maps in grouped.items():
        assert [tuple(t.shape) for t in maps] == [(2, 1, 32 >> k, 32 >> k) for k in range(5)]
        assert all(torch.equal(a, b) for a, b in zip(maps, old[stream], strict=True))


def test_features_carry_gradients_and_old_attribute_stays_detached() -> None:
    model = tiny("master_assistant")
    logits, feats = model.forward_features(torch.randn(2, 2, 32, 32))
    assert feats["master.gates.0"].requires_grad
    assert all(not t.requires_grad for t in model.attention_maps["master"])
    feats["master.gates.4"].sum().backward()
    assert model.master.gates[4].body[0].weight.grad is not None


def test_fusion_unet_intermediate_layers_equal_the_module_outputs() -> None:
    model = tiny("fuse_unet_sa").eval()
    names = ["master.blocks.3", "assistants.0.blocks.1", "assistants.0.gates.2", "decoder.ups.0", "decoder.ups.3"]
    seen = hooked(model, names)
    with torch.no_grad():
        logits, feats = model.forward_features(torch.randn(1, 2, 32, 32), layers=names)
    assert list(feats) == names
    assert all(torch.equal(feats[n], seen[n]) for n in names)
    assert feats["decoder.ups.3"].shape == (1, 8, 32, 32)  # the last decoder step: full resolution


def test_fusenet_stage_outputs() -> None:
    model = tiny("fusenet_concat").eval()
    names = ["master.0", "assistants.0.4", "decoder.0", "decoder.4"]
    seen = hooked(model, names)
    with torch.no_grad():
        _, feats = model.forward_features(torch.randn(1, 2, 32, 32), layers=names)
    assert all(torch.equal(feats[n], seen[n]) for n in names)


def test_dilated_fcn_groups_and_blocks() -> None:
    model = tiny("dilated_fcn").eval()
    names = ["group3", "group5.1", "group6", "group10"]
    seen = hooked(model, names)
    x = torch.randn(2, 1, 16, 24)
    with torch.no_grad():
        logits, feats = model.forward_features(x, layers=names)
        assert torch.equal(logits, model(x))
    assert list(feats) == names and all(torch.equal(feats[n], seen[n]) for n in names)
    assert feats["group5.1"].shape == (2, 32, 2, 3)


def test_forward_features_modality_selects_the_bn_set_for_that_call() -> None:
    model = tiny("dilated_fcn").eval()  # norm="msbn", two BN sets
    for layer in msbn_modules(model):
        layer.bns[1].running_mean.fill_(0.3)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        set_modality(model, 1)
        expected = model(x)
        set_modality(model, 0)
        got, _ = model.forward_features(x, modality=1)
        assert not torch.equal(got, model(x))
    assert torch.equal(got, expected)
    assert all(layer.active == 0 for layer in msbn_modules(model))  # restored after the call
    with pytest.raises(ConfigError, match="out of range"):
        model.forward_features(x, modality=2)


# -------------------------------------------------------------------------------------- unpaired features
@pytest.mark.parametrize("backbone", ["dilated_fcn", "unet"])
def test_unpaired_features_equal_the_old_hooked_and_return_features_paths(backbone: str) -> None:
    kw = {"width": 2, "dropout": 0.0} if backbone == "dilated_fcn" else {"base_width": 4}
    torch.manual_seed(0)
    model = UnpairedSegmenter(backbone, ["CT", "MR"], "csa", num_classes=3, **kw).eval()
    layers = list(model.feature_layers)
    assert layers == list(model_card(backbone).affinity_layers)
    seen = hooked(model.networks[0], layers)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        logits, feats = model.forward_features(x, "MR")
        hook_view = {n: seen[n] for n in layers}
        old_logits, old_feats = model(x, 1, return_features=True)
    assert list(feats) == layers
    assert all(torch.equal(feats[n], hook_view[n]) for n in layers)
    assert torch.equal(logits, old_logits) and all(torch.equal(feats[n], old_feats[n]) for n in layers)
    with pytest.raises(ConfigError, match="needs a modality"):
        model.forward_features(x)


def test_unpaired_feature_layers_must_be_the_backbones() -> None:
    with pytest.raises(ConfigError, match="has no layer.*its feature layers: master.blocks.0"):
        UnpairedSegmenter("unet", ["a", "b"], "csa", 3, feature_layers=("master.blocks.3.0", "decoder.ups.0"),
                          base_width=4)


# ------------------------------------------------------------------------------------------ norm vocabulary
def test_paired_models_take_every_norm_name() -> None:
    x = torch.randn(1, 2, 32, 32)
    base = tiny("master_assistant")
    bn_params = sum(p.numel() for m in base.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    for norm in ("instance", "group", "none", "msbn"):
        model = tiny("master_assistant", norm=norm, norm_sets=3)
        assert not any(type(m) is nn.BatchNorm2d and not _inside_msbn(model, m) for m in model.modules()), norm
        assert model(x).shape == (1, 2, 32, 32)
        extra = {"instance": 0, "group": 0, "none": -bn_params, "msbn": 2 * bn_params}[norm]
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters()) + extra
    msbn = tiny("master_assistant", norm="msbn", norm_sets=3)
    assert msbn_modules(msbn) and all(m.num_modalities == 3 for m in msbn_modules(msbn))
    with pytest.raises(ConfigError, match="norm must be one of"):
        tiny("fuse_unet", norm="layer")


def _inside_msbn(model: nn.Module, bn: nn.Module) -> bool:
    return any(bn is b for m in msbn_modules(model) for b in m.bns)


# ------------------------------------------------------------------------------------------------ 3D seam
TWO_D_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.MaxPool2d, nn.MaxUnpool2d,
                nn.PixelShuffle, nn.Dropout2d)


@pytest.mark.parametrize("name", [n for n in list_models() if model_card(n).family == "fusion_unet"])
def test_fusion_unets_in_3d(name: str) -> None:
    model = tiny(name, spatial_dims=3, depth=2)
    assert not any(isinstance(m, TWO_D_LAYERS) for m in model.modules())
    m = n_inputs(name)
    x = torch.randn(2, m, 4, 8, 12)
    logits, feats = model.forward_features(x, layers=[*model.gate_names, "master.blocks.2", "decoder.ups.1"])
    assert logits.shape == (2, 2, 4, 8, 12) and torch.isfinite(logits).all()
    for k in range(3):
        for g in (g for g in model.gate_names if g.endswith(f".{k}")):
            assert feats[g].shape == (2, 1, 4 >> k, 8 >> k, 12 >> k)
    assert feats["master.blocks.2"].shape == (2, 16, 1, 2, 3)
    logits.float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ConfigError, match=r"expects input \(B, \d+, D, H, W\)"):
        model(torch.randn(2, m, 8, 8))


@pytest.mark.parametrize("name", ["fusenet", "fusenet_concat"])
def test_fusenets_in_3d(name: str) -> None:
    model = tiny(name, spatial_dims=3, base_width=1).eval()
    assert not any(isinstance(m, TWO_D_LAYERS) for m in model.modules())
    with torch.no_grad():
        logits, feats = model.forward_features(torch.randn(1, 2, 32, 32, 32), layers=["decoder.4"])
    assert logits.shape == (1, 2, 32, 32, 32) and feats["decoder.4"].shape == (1, 1, 32, 32, 32)


def test_dilated_fcn_in_3d() -> None:
    model = tiny("dilated_fcn", spatial_dims=3, width=1, num_classes=2, shuffle_channels_per_class=1)
    assert not any(isinstance(m, TWO_D_LAYERS) for m in model.modules())
    assert model.group10[0].out_channels == 2 * 8**3
    logits, feats = model.forward_features(torch.randn(2, 1, 8, 8, 16), modality=1)
    assert logits.shape == (2, 2, 8, 8, 16)
    assert feats["group5"].shape == feats["group6"].shape == (2, 16, 1, 1, 2)
    with pytest.raises(ConfigError, match="4x8x8 is not a multiple"):
        model(torch.randn(1, 1, 4, 8, 8))


@pytest.mark.parametrize(("backbone", "kw"), [("dilated_fcn", {"width": 1, "shuffle_channels_per_class": 1}),
                                               ("unet", {"base_width": 2, "depth": 3})])
def test_unpaired_segmenter_in_3d(backbone: str, kw: dict) -> None:
    torch.manual_seed(0)
    model = UnpairedSegmenter(backbone, ["a", "b"], "csa", num_classes=2, spatial_dims=3, **kw)
    assert msbn_modules(model) and all(m.spatial_dims == 3 for m in msbn_modules(model))
    feature_layers = ("group5", "group6") if backbone == "dilated_fcn" else ("master.blocks.2", "decoder.ups.0")
    model = UnpairedSegmenter(backbone, ["a", "b"], "csa", num_classes=2, spatial_dims=3,
                              feature_layers=feature_layers, **kw)
    logits, feats = model.forward_features(torch.randn(2, 1, 8, 8, 8), "b")
    assert logits.shape == (2, 2, 8, 8, 8)
    a, b = (feats[n] for n in feature_layers)
    assert a.dim() == b.dim() == 5 and a.shape[2:] == b.shape[2:]  # one resolution: an affinity pair
