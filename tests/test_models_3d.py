"""3D networks: the SA block in 3D, per-level kernels and strides (anisotropic layouts), MSBN with any number of
modalities, the N-d pixel shuffle of paper 2's head, the refusals, 2D unchanged, and docs/3d.md's count table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modalseg.errors import ConfigError
from modalseg.models import create_model, model_card
from modalseg.models.blocks import SpatialAttention
from modalseg.models.counts3d import parameter_counts_3d_markdown
from modalseg.models.layers import pixel_shuffle_nd
from modalseg.models.msbn import ModalitySpecificBatchNorm, msbn_modules
from modalseg.models.unpaired import UnpairedSegmenter

ROOT = Path(__file__).resolve().parents[1]
ANISO = dict(kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3]], strides=[[1, 2, 2], [2, 2, 2]])


def _convs(module: nn.Module, cls: type = nn.Conv3d) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, cls)]


# ------------------------------------------------------------------------------------------------ SA block


def test_sa_block_3d_is_paper_1s_block_with_3d_dilated_kernels() -> None:
    torch.manual_seed(0)
    sa = SpatialAttention(32, reduction=16, dilation=4, spatial_dims=3)
    convs = _convs(sa)
    # Conv1x1 C -> C/r, two dilated 3x3 (pad d), Conv1x1 C/r -> 1, BN(1), sigmoid (paper 1, Fig. 3b)
    assert [c.kernel_size for c in convs] == [(1, 1, 1), (3, 3, 3), (3, 3, 3), (1, 1, 1)]
    assert [c.dilation for c in convs[1:3]] == [(4, 4, 4)] * 2 and [c.padding for c in convs[1:3]] == [(4, 4, 4)] * 2
    assert [(c.in_channels, c.out_channels) for c in convs] == [(32, 2), (2, 2), (2, 2), (2, 1)]
    assert isinstance(sa.body[4], nn.BatchNorm3d) and sa.body[4].num_features == 1
    assert not any(isinstance(m, nn.ReLU) for m in sa.modules())  # no ReLU between the convs
    hidden = 2
    expected = 32 * hidden + hidden + 2 * (hidden * hidden * 27 + hidden) + hidden + 1 + 2
    assert sum(p.numel() for p in sa.parameters()) == expected
    x = torch.randn(2, 32, 9, 10, 11)
    with torch.no_grad():
        m = sa(x)
    assert m.shape == (2, 1, 9, 10, 11) and float(m.min()) >= 0.0 and float(m.max()) <= 1.0


def test_sa_block_follows_the_levels_kernel_in_plane_levels_do_not_mix_slices() -> None:
    torch.manual_seed(0)
    flat = SpatialAttention(8, reduction=4, dilation=4, spatial_dims=3, kernel_size=(1, 3, 3)).eval()
    convs = _convs(flat)
    assert convs[1].kernel_size == (1, 3, 3) and convs[1].dilation == (1, 4, 4) and convs[1].padding == (0, 4, 4)
    cube = SpatialAttention(8, reduction=4, dilation=4, spatial_dims=3).eval()
    x = torch.randn(1, 8, 12, 12, 12)
    y = x.clone()
    y[:, :, 6] += 5.0  # change one slice
    with torch.no_grad():
        changed_flat = (flat(x) - flat(y)).abs().amax(dim=(0, 1, 3, 4)) > 0
        changed_cube = (cube(x) - cube(y)).abs().amax(dim=(0, 1, 3, 4)) > 0
    assert changed_flat.nonzero().flatten().tolist() == [6]  # a per-slice map, as in the 2D network
    assert changed_cube[2].item() and changed_cube[10].item()  # two dilated convs: reach 2 x 4 slices


def test_sa_block_2d_is_unchanged() -> None:
    convs = _convs(SpatialAttention(64, spatial_dims=2), nn.Conv2d)
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (3, 3), (1, 1)]
    assert convs[1].dilation == (4, 4) and convs[1].padding == (4, 4)


# ------------------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("name", ["unet_sa", "master_assistant", "fuse_unet_sa", "fuse_origin_unet", "late_fuse_unet"])
def test_per_level_kernels_and_strides_build_an_anisotropic_network(name: str) -> None:
    torch.manual_seed(0)
    single = model_card(name).inputs == "single"
    m = 1 if single else 3  # any number of modalities
    net = create_model(name, num_modalities=m, in_channels=1, num_classes=2, spatial_dims=3, base_width=2, **ANISO)
    assert net.config.depth == 2 and net.min_shape == (2, 4, 4) and net.min_size == 4
    pools = [p for p in net.modules() if isinstance(p, nn.MaxPool3d)]
    assert [p.kernel_size for p in pools[1:]] == [(1, 2, 2), (2, 2, 2)]  # pools[0]: the unused default
    first = net.master.blocks[0][0][0]
    assert first.kernel_size == (1, 3, 3) and first.padding == (0, 1, 1)
    assert net.master.blocks[2][0][0].kernel_size == (3, 3, 3)
    # the decoder mirrors the encoder: its deepest step is level 1's kernel, its last is level 0's
    assert [u.conv[0][0].kernel_size for u in net.decoder.ups] == [(1, 3, 3), (1, 3, 3)]
    if name == "fuse_origin_unet":
        ups = [u.up.conv for u in net.decoder.ups]
        assert [u.kernel_size for u in ups] == [(2, 2, 2), (1, 2, 2)]
        assert [u.stride for u in ups] == [(2, 2, 2), (1, 2, 2)]
    x = torch.randn(2, m, 5, 16, 12)  # odd depth: the decoder sizes each step to its skip
    logits, feats = net.forward_features(x, layers=["master.blocks.0", "master.blocks.1", "master.blocks.2"])
    assert logits.shape == (2, 2, 5, 16, 12)
    assert [tuple(f.shape[2:]) for f in feats.values()] == [(5, 16, 12), (5, 8, 6), (2, 4, 3)]
    logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_gates_give_3d_maps_per_level() -> None:
    net = create_model("master_assistant", num_modalities=2, in_channels=1, num_classes=2, spatial_dims=3,
                       base_width=2, **ANISO)
    _, maps = net.forward_features(torch.randn(1, 2, 4, 16, 16))
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "master.gates.0": (1, 1, 4, 16, 16), "master.gates.1": (1, 1, 4, 8, 8), "master.gates.2": (1, 1, 2, 4, 4),
    }
    gate0 = _convs(net.master.gates[0])[1]
    assert gate0.kernel_size == (1, 3, 3) and gate0.dilation == (1, 4, 4)


def test_options_from_yaml_lists_and_depth_from_strides() -> None:
    net = create_model("unet", in_channels=1, spatial_dims=3, base_width=2, strides=[[1, 2, 2]] * 3)
    assert net.config.depth == 3 and net.config.strides == ((1, 2, 2),) * 3 and net.config.kernel_sizes is None
    assert net.min_shape == (1, 8, 8)
    net = create_model("unet", in_channels=1, spatial_dims=3, base_width=2, kernel_sizes=[3, 3, (1, 3, 3)])
    assert net.config.depth == 2 and net.config.kernel_sizes == ((3, 3, 3), (3, 3, 3), (1, 3, 3))


def test_explicit_default_layout_equals_the_papers_2d_network_bit_for_bit() -> None:
    torch.manual_seed(0)
    plain = create_model("master_assistant", num_modalities=2, in_channels=1, num_classes=2, base_width=4)
    torch.manual_seed(0)
    explicit = create_model("master_assistant", num_modalities=2, in_channels=1, num_classes=2, base_width=4,
                            kernel_sizes=[3] * 5, strides=[[2, 2]] * 4)
    assert list(plain.state_dict()) == list(explicit.state_dict())
    for a, b in zip(plain.state_dict().values(), explicit.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(1, 2, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), explicit.eval()(x))
    # and without the options nothing of the paper's model moved
    assert sum(p.numel() for p in create_model("master_assistant", in_channels=3).parameters()) == 26_721_713


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(kernel_sizes=[3, 3], strides=[2, 2]), "kernel_sizes needs 3 entries"),
        (dict(strides=[[1, 2, 2]], depth=2), "strides needs 2 entries"),
        (dict(strides=[[1, 2], [2, 2, 2]]), "one per axis"),
        (dict(kernel_sizes=[2, 3, 3], strides=[2, 2]), "odd"),
        (dict(strides=[0, 2]), ">= 1"),
    ],
)
def test_bad_layouts_are_one_line_config_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        create_model("unet", in_channels=1, spatial_dims=3, base_width=2, **options)
    assert "\n" not in str(err.value)


def test_fixed_topologies_refuse_the_options_in_one_line() -> None:
    for build in (
        lambda: create_model("fusenet", spatial_dims=3, base_width=2, strides=[[1, 2, 2]] * 5),
        lambda: create_model("dilated_fcn", spatial_dims=3, width=1, kernel_sizes=[[1, 3, 3]]),
        lambda: UnpairedSegmenter("dilated_fcn", ["a", "b"], "msbn", 2, spatial_dims=3, strides=[[1, 2, 2]]),
    ):
        with pytest.raises(ConfigError, match="not supported") as err:
            build()
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ unpaired 3D


def test_unpaired_unet_backbone_3d_msbn_any_number_of_modalities() -> None:
    torch.manual_seed(0)
    model = UnpairedSegmenter("unet", ["CT", "MR", "PET"], "csa", num_classes=3, spatial_dims=3, base_width=2, **ANISO)
    layers = msbn_modules(model)
    assert layers and all(m.spatial_dims == 3 and m.num_modalities == 3 for m in layers)
    assert all(isinstance(b, nn.BatchNorm3d) for m in layers for b in m.bns)
    # the affinity pair follows the depth (the card's master.blocks.3 is for depth 4)
    assert model.feature_layers == ("master.blocks.1", "decoder.ups.0") and model.min_shape == (2, 4, 4)
    model.train()
    logits, feats = model.forward_features(torch.randn(2, 1, 4, 8, 8), "PET")
    assert logits.shape == (2, 3, 4, 8, 8) and set(feats) == {"master.blocks.1", "decoder.ups.0"}
    assert feats["master.blocks.1"].shape == feats["decoder.ups.0"].shape
    bn: ModalitySpecificBatchNorm = layers[0]
    assert int(bn.bns[2].num_batches_tracked) == 1 and int(bn.bns[0].num_batches_tracked) == 0
    assert UnpairedSegmenter("unet", ["a", "b"], "csa", 2).feature_layers == ("master.blocks.3", "decoder.ups.0")


def test_unpaired_dilated_fcn_3d_msbn_runs_full_resolution() -> None:
    torch.manual_seed(0)
    model = UnpairedSegmenter("dilated_fcn", ["a", "b", "c"], "msbn", num_classes=2, spatial_dims=3, width=1,
                              shuffle_channels_per_class=1, dropout=0.0)
    assert all(m.spatial_dims == 3 and m.num_modalities == 3 for m in msbn_modules(model))
    out, feats = model.forward_features(torch.randn(2, 1, 8, 16, 8), 1)
    assert out.shape == (2, 2, 8, 16, 8) and feats["group5"].shape[2:] == (1, 2, 1)


# ------------------------------------------------------------------------------------------------ pixel shuffle


def test_pixel_shuffle_nd_is_the_2d_convention_extended_to_three_axes() -> None:
    x = torch.arange(2 * 2 * 4 * 2 * 3, dtype=torch.float32).reshape(2, 2 * 4, 2, 3)
    assert torch.equal(pixel_shuffle_nd(x, 2), F.pixel_shuffle(x, 2))
    r, c = 2, 3
    v = torch.randn(2, c * r**3, 2, 3, 4)
    out = pixel_shuffle_nd(v, r)
    assert out.shape == (2, c, 4, 6, 8)
    for ch in range(c):
        for i in range(r):
            for j in range(r):
                for k in range(r):
                    # output voxel (d*r+i, h*r+j, w*r+k) of class ch is input channel ch*r^3 + i*r^2 + j*r + k
                    assert torch.equal(out[:, ch, i::r, j::r, k::r], v[:, ch * r**3 + i * r * r + j * r + k])
    with pytest.raises(ConfigError, match="divisible"):
        pixel_shuffle_nd(torch.randn(1, 9, 2, 2, 2), 2)


# ------------------------------------------------------------------------------------------------ docs


def test_docs_3d_md_holds_the_current_parameter_table() -> None:
    text = (ROOT / "docs" / "3d.md").read_text()
    found = re.search(r"<!-- params-3d:start -->\n(.*?)<!-- params-3d:end -->", text, re.S)
    assert found, "docs/3d.md needs the params-3d markers"
    assert found.group(1) == parameter_counts_3d_markdown(), (
        "regenerate with modalseg.models.counts3d.parameter_counts_3d_markdown()"
    )
