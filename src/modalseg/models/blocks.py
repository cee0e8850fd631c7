"""Convolutional building blocks shared by every paper-1 network (Li et al., Sect. 2 and Fig. 1, 3).

All blocks take ``norm``, a name of :data:`modalseg.models.layers.NORMS` (default ``"batch"``) or a factory
``channels -> nn.Module``, so that another normalisation (e.g. paper 2's modality-specific BN) can be swapped in
without touching the blocks, and ``spatial_dims`` (2, the papers' networks, or 3): every layer comes from the
factories of :mod:`modalseg.models.layers`. ``"msbn"`` needs the number of BN sets, so models resolve it once
with :func:`~modalseg.models.layers.norm_factory` and pass the factory down.
Convolutions keep their bias although BN follows: the authors' networks have it, and paper 1's parameter
counts (Table 1) include it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from modalseg.models import layers
from modalseg.models.layers import NormFactory

Norm = str | NormFactory

__all__ = [
    "Norm",
    "NormFactory",
    "ConvBNReLU",
    "ConvBlock",
    "BilinearUp",
    "TransposeUp",
    "UpBlock",
    "SpatialAttention",
]


class ConvBNReLU(nn.Sequential):
    """Conv3x3 (padding keeps the size, bias) -> norm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: Norm = "batch", spatial_dims: int = 2) -> None:
        super().__init__(
            layers.conv(spatial_dims, in_channels, out_channels, 3, padding=1, bias=True),
            layers.norm_factory(norm, spatial_dims)(out_channels),
            nn.ReLU(inplace=True),
        )


class ConvBlock(nn.Sequential):
    """``num_convs`` x (Conv3x3 -> norm -> ReLU); the default (2) is the U-Net "double conv" of paper 1.

    The first conv maps ``in_channels -> mid_channels``, the last ``-> out_channels`` and the others keep
    ``mid_channels`` (default ``out_channels``). ``num_convs=3`` with ``mid_channels`` set gives the VGG16 /
    SegNet decoder stages used by FuseNet (e.g. 512 -> 512 -> 512 -> 256).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_convs: int = 2,
        mid_channels: int | None = None,
        norm: Norm = "batch",
        spatial_dims: int = 2,
    ) -> None:
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        mid = out_channels if mid_channels is None else mid_channels
        factory = layers.norm_factory(norm, spatial_dims)
        convs = []
        for i in range(num_convs):
            cin = in_channels if i == 0 else mid
            cout = out_channels if i == num_convs - 1 else mid
            convs.append(ConvBNReLU(cin, cout, factory, spatial_dims))
        super().__init__(*convs)
        self.in_channels = in_channels
        self.out_channels = out_channels


class BilinearUp(nn.Module):
    """Bilinear x2 upsampling (``align_corners=True``) -> Conv3x3 -> norm -> ReLU (paper 1's U-Net family).

    In 3D the interpolation is trilinear (:func:`~modalseg.models.layers.interpolation_mode`).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: Norm = "batch", spatial_dims: int = 2) -> None:
        super().__init__()
        self.mode = layers.interpolation_mode("linear", spatial_dims)
        self.conv = ConvBNReLU(in_channels, out_channels, norm, spatial_dims)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode=self.mode, align_corners=True))


class TransposeUp(nn.Module):
    """2x2 stride-2 transposed conv -> norm -> ReLU (FuseOriginUNet; the norm is in the 56.164M count)."""

    def __init__(self, in_channels: int, out_channels: int, norm: Norm = "batch", spatial_dims: int = 2) -> None:
        super().__init__()
        self.conv = layers.conv_transpose(spatial_dims, in_channels, out_channels, 2, stride=2)
        self.norm = layers.norm_factory(norm, spatial_dims)(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.act(self.norm(self.conv(x, output_size=tuple(size))))


class UpBlock(nn.Module):
    """U-Net decoder step: upsample x2 (``in -> out``), ``concat(upsampled, skip)``, double conv.

    ``mode="bilinear"`` (:class:`BilinearUp`, paper 1's U-Net, FuseUNet and variants) or ``"transpose"``
    (:class:`TransposeUp`, FuseOriginUNet). The double conv maps ``out + skip -> out``. The upsampled map
    is sized to the skip, so inputs whose sides are not multiples of ``2**depth`` also work.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        mode: str = "bilinear",
        norm: Norm = "batch",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        factory = layers.norm_factory(norm, spatial_dims)
        if mode == "bilinear":
            self.up: BilinearUp | TransposeUp = BilinearUp(in_channels, out_channels, factory, spatial_dims)
        elif mode == "transpose":
            self.up = TransposeUp(in_channels, out_channels, factory, spatial_dims)
        else:
            raise ValueError(f"unknown upsampling mode {mode!r} (bilinear | transpose)")
        self.conv = ConvBlock(out_channels + skip_channels, out_channels, norm=factory, spatial_dims=spatial_dims)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x, skip.shape[2:])
        return self.conv(torch.cat((x, skip), dim=1))


class SpatialAttention(nn.Module):
    """Paper 1's spatial-attention (SA) block (Fig. 3b): one weight map per pixel.

    Conv1x1 ``C -> C/r`` -> Conv3x3 dilated ``d`` (padding ``d``) -> the same again -> Conv1x1 ``C/r -> 1``
    -> norm(1) -> sigmoid; no ReLU between the convs. ``forward`` returns the map ``(B, 1, H, W)``; the
    caller multiplies it into the features (no residual), which lets one map gate several streams
    (the proposed master-assistant network). ``C/r`` is floored at 1 so tiny test widths work. In 3D the
    kernels are 1x1x1 and dilated 3x3x3 and the map is ``(B, 1, D, H, W)``.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        dilation: int = 4,
        norm: Norm = "batch",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if reduction < 1 or dilation < 1:
            raise ValueError(f"SA reduction and dilation must be >= 1, got r={reduction}, d={dilation}")
        hidden = max(1, channels // reduction)
        d = spatial_dims
        self.body = nn.Sequential(
            layers.conv(d, channels, hidden, 1),
            layers.conv(d, hidden, hidden, 3, padding=dilation, dilation=dilation),
            layers.conv(d, hidden, hidden, 3, padding=dilation, dilation=dilation),
            layers.conv(d, hidden, 1, 1),
            layers.norm_factory(norm, d)(1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(x))
