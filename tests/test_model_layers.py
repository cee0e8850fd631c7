"""Layer factories by name and spatial_dims (models/layers.py) and the N-dimensional modality-specific BN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modalseg.errors import ConfigError
from modalseg.models import layers
from modalseg.models.msbn import (
    ModalitySpecificBatchNorm,
    ModalitySpecificBatchNorm2d,
    ModalitySpecificBatchNorm3d,
    convert_to_msbn,
    modality,
    msbn_modules,
    selected_modality,
)


def _x(dims: int, channels: int = 4, side: int = 6) -> torch.Tensor:
    return torch.randn(2, channels, *([side] * dims))


@pytest.mark.parametrize("dims", [2, 3])
def test_conv_and_transposed_conv_per_dims(dims: int) -> None:
    c = layers.conv(dims, 4, 5, 3, padding=2, dilation=2, bias=False)
    assert type(c) is {2: nn.Conv2d, 3: nn.Conv3d}[dims]
    assert c.kernel_size == (3,) * dims and c.dilation == (2,) * dims and c.bias is None
    assert c(_x(dims)).shape == (2, 5, *([6] * dims))
    t = layers.conv_transpose(dims, 4, 3)
    assert type(t) is {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    assert t(_x(dims)).shape == (2, 3, *([12] * dims))
    assert layers.layer_type("conv", dims) is type(c)


@pytest.mark.parametrize("dims", [2, 3])
def test_norm_vocabulary_per_dims(dims: int) -> None:
    x = _x(dims, channels=12)
    made = {name: layers.norm_factory(name, dims, num_modalities=3)(12) for name in layers.NORMS}
    assert type(made["batch"]) is {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    assert type(made["instance"]) is {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims] and made["instance"].affine
    assert isinstance(made["group"], nn.GroupNorm) and made["group"].num_groups == 4  # 8 does not divide 12
    assert isinstance(made["none"], nn.Identity)
    msbn = made["msbn"]
    assert isinstance(msbn, {2: ModalitySpecificBatchNorm2d, 3: ModalitySpecificBatchNorm3d}[dims])
    assert msbn.num_modalities == 3 and all(type(b) is type(made["batch"]) for b in msbn.bns)
    for layer in made.values():
        assert layer(x).shape == x.shape
    sixteen = layers.norm_layer("group", dims, 16)
    assert type(sixteen) is nn.GroupNorm and sixteen.num_groups == 8
    assert layers.norm_layer("group", dims, 1).num_groups == 1  # the SA block's one-channel norm
    own = layers.norm_factory(lambda c: nn.LayerNorm(c), dims)  # a callable is used as it is
    assert isinstance(own(5), nn.LayerNorm)


def test_norm_refusals() -> None:
    with pytest.raises(ConfigError, match="msbn.*number of modalities"):
        layers.norm_factory("msbn", 2)
    with pytest.raises(ConfigError, match="norm must be one of batch, instance, group, msbn, none"):
        layers.norm_factory("layer", 2)
    with pytest.raises(ConfigError, match="spatial_dims must be 2 or 3"):
        layers.norm_factory("batch", 1)


@pytest.mark.parametrize("bad", [1, 4, True, "2", None])
def test_spatial_dims_other_than_2_and_3_are_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match="spatial_dims must be 2 or 3"):
        layers.check_spatial_dims(bad, "test")
    with pytest.raises(ConfigError, match="spatial_dims must be 2 or 3"):
        layers.conv(bad, 1, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("dims", [2, 3])
def test_pooling_unpooling_and_dropout(dims: int) -> None:
    x = _x(dims, side=8)
    pool = layers.max_pool(dims, 2, 2, return_indices=True)
    assert type(pool) is {2: nn.MaxPool2d, 3: nn.MaxPool3d}[dims]
    pooled, idx = pool(x)
    assert pooled.shape == (2, 4, *([4] * dims))
    torch.testing.assert_close(pooled, layers.max_pool(dims, 2)(x))
    restored = layers.max_unpool(dims, 2, 2)(pooled, idx, output_size=x.shape[2:])
    assert restored.shape == x.shape
    assert torch.equal(restored[restored != 0], x[restored != 0])  # maxima at their places, zeros elsewhere
    assert (restored != 0).sum() == pooled.numel()
    assert type(layers.dropout(dims, 0.3)) is nn.Dropout and layers.dropout(dims, 0.3).p == 0.3
    assert type(layers.dropout(dims, 0.3, channelwise=True)) is {2: nn.Dropout2d, 3: nn.Dropout3d}[dims]


def test_interpolation_modes_and_the_3d_refusal() -> None:
    assert layers.interpolation_mode("linear", 2) == "bilinear"
    assert layers.interpolation_mode("bilinear", 3) == "trilinear"
    assert layers.interpolation_mode("nearest", 3) == "nearest"
    assert layers.interpolation_mode("bicubic", 2) == "bicubic"
    with pytest.raises(ConfigError, match="no 3D meaning"):
        layers.interpolation_mode("bicubic", 3)
    with pytest.raises(ConfigError, match="unknown interpolation"):
        layers.interpolation_mode("lanczos", 2)
    up = layers.upsample(3, 2)
    assert up.mode == "trilinear" and up(_x(3, side=3)).shape == (2, 4, 6, 6, 6)
    assert layers.upsample(2, 2, "nearest").align_corners is None


def test_pixel_shuffle_2d_is_torch_and_nd_generalises_it() -> None:
    x = torch.randn(2, 3 * 16, 5, 7)
    assert type(layers.pixel_shuffle(2, 4)) is nn.PixelShuffle
    assert torch.equal(layers.pixel_shuffle_nd(x, 4), F.pixel_shuffle(x, 4))
    shuffle = layers.pixel_shuffle(3, 2)
    assert isinstance(shuffle, layers.PixelShuffleNd)
    v = torch.arange(2 * 3 * 8 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 3 * 8, 2, 3, 4)
    out = shuffle(v)
    assert out.shape == (2, 3, 4, 6, 8)
    # output voxel (c, d*2+i, h*2+j, w*2+k) comes from input channel c*8 + i*4 + j*2 + k at (d, h, w)
    for c, d, h, w, i, j, k in [(0, 0, 0, 0, 0, 0, 0), (1, 1, 2, 3, 1, 0, 1), (2, 0, 1, 2, 1, 1, 1)]:
        assert out[1, c, d * 2 + i, h * 2 + j, w * 2 + k] == v[1, c * 8 + i * 4 + j * 2 + k, d, h, w]
    assert torch.equal(torch.sort(out.flatten()).values, torch.sort(v.flatten()).values)  # a permutation
    with pytest.raises(ConfigError, match="divisible by 8"):
        shuffle(torch.randn(1, 12, 2, 2, 2))
    with pytest.raises(ConfigError, match="3D"):
        shuffle(torch.randn(1, 8, 2, 2))


@pytest.mark.parametrize("dims", [2, 3])
def test_pad_channels_appends_zero_channels(dims: int) -> None:
    x = _x(dims, channels=3)
    y = layers.pad_channels(x, 2)
    assert y.shape == (2, 5, *x.shape[2:])
    assert torch.equal(y[:, :3], x) and not y[:, 3:].any()


# ----------------------------------------------------------------------------------------------------- MSBN


def test_msbn_3d_keeps_separate_statistics_and_is_one_family() -> None:
    layer = ModalitySpecificBatchNorm3d(3, num_modalities=2)
    assert isinstance(layer, ModalitySpecificBatchNorm) and not isinstance(layer, ModalitySpecificBatchNorm2d)
    assert all(type(b) is nn.BatchNorm3d for b in layer.bns)
    assert list(layer.state_dict())[:2] == ["bns.0.weight", "bns.0.bias"]  # the 2D layout of keys
    with modality(layer, 1):
        layer(torch.randn(4, 3, 3, 3, 3) * 2 + 5)
    assert not torch.allclose(layer.bns[1].running_mean, torch.zeros(3))
    assert torch.equal(layer.bns[0].running_mean, torch.zeros(3)) and layer.active == 0
    with pytest.raises(ConfigError, match="is 2D"):
        ModalitySpecificBatchNorm2d(3, 2, spatial_dims=3)
    base = ModalitySpecificBatchNorm(3, 2, spatial_dims=3)
    assert type(base.bns[0]) is nn.BatchNorm3d


def test_convert_to_msbn_converts_3d_batch_norm() -> None:
    model = nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.Sequential(nn.BatchNorm2d(2)))
    model[1].running_mean.fill_(0.5)
    convert_to_msbn(model, 3)
    assert isinstance(model[1], ModalitySpecificBatchNorm3d) and isinstance(model[2][0], ModalitySpecificBatchNorm2d)
    assert all(torch.equal(b.running_mean, torch.full((4,), 0.5)) for b in model[1].bns)
    assert len(msbn_modules(model)) == 2


def test_selected_modality_restores_and_checks_the_index() -> None:
    model = nn.Sequential(ModalitySpecificBatchNorm2d(2, 3))
    with selected_modality(model, 2):
        assert model[0].active == 2
    assert model[0].active == 0
    with selected_modality(model, None):
        assert model[0].active == 0
    with pytest.raises(ConfigError, match="out of range for 3"):
        with selected_modality(model, 3):
            pass
    with pytest.raises(ConfigError, match="integer index"):
        with selected_modality(model, "T1"):  # type: ignore[arg-type]
            pass
    with selected_modality(nn.Sequential(nn.BatchNorm2d(2)), 5):  # shared BN serves every modality
        pass
