"""Convolutional building blocks shared by every paper-1 network (Li et al., Sect. 2 and Fig. 1, 3).

All blocks take ``norm``, a name of :data:`modalseg.models.layers.NORMS` (default ``"batch"``) or a factory
``channels -> nn.Module``, so that another normalisation (e.g. paper 2's modality-specific BN) can be swapped in
without touching the blocks, and ``spatial_dims`` (2, the papers' networks, or 3): every layer comes from the
factories of :mod:`modalseg.models.layers`. ``"msbn"`` needs the number of BN sets, so models resolve it once
with :func:`~modalseg.models.layers.norm_factory` and pass the factory down.
Convolutions keep their bias although BN follows: the authors' networks have it, and paper 1's parameter
counts (Table 1) include it.

``kernel_size`` (blocks) and ``scale`` (upsampling) take one int (the papers' 3x3 kernels and x2 steps) or one
value per axis, so that a 3D network for thick-slice data can use ``(1, 3, 3)`` kernels and ``(1, 2, 2)``
steps at its first levels (nnU-Net's anisotropic layouts). The defaults build exactly the 2D layers of before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import modalseg.models.layers as layers
from modalseg.models.layers import NormFactory, Size

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
    """Conv3x3 (padding keeps the size, bias) -> norm -> ReLU; ``kernel_size`` may be per axis (``(1, 3, 3)``)."""

    def __init__(
        self, in_channels: int, out_channels: int, norm: Norm = "batch", spatial_dims: int = 2, kernel_size: Size = 3
    ) -> None:
        pad = layers.same_padding(kernel_size)
        super().__init__(
            layers.conv(spatial_dims, in_channels, out_channels, kernel_size, padding=pad, bias=True),
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
        kernel_size: Size = 3,
    ) -> None:
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        mid = out_channels if mid_channels is None else mid_channels
        factory = layers.norm_factory(norm, spatial_dims)
        convs = []
        for i in range(num_convs):
            cin = in_channels if i == 0 else mid
            cout = out_channels if i == num_convs - 1 else mid
            convs.append(ConvBNReLU(cin, cout, factory, spatial_dims, kernel_size))
        super().__init__(*convs)
        self.in_channels = in_channels
        self.out_channels = out_channels


class BilinearUp(nn.Module):
    """Bilinear x2 upsampling (``align_corners=True``) -> Conv3x3 -> norm -> ReLU (paper 1's U-Net family).

    In 3D the interpolation is trilinear (:func:`~modalseg.models.layers.interpolation_mode`). The output is
    sized to the skip, so any per-axis step (``(1, 2, 2)``) works; ``kernel_size`` is the conv's.
    """

    def __init__(
        self, in_channels: int, out_channels: int, norm: Norm = "batch", spatial_dims: int = 2, kernel_size: Size = 3
    ) -> None:
        super().__init__()
        self.mode = layers.interpolation_mode("linear", spatial_dims)
        self.conv = ConvBNReLU(in_channels, out_channels, norm, spatial_dims, kernel_size)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode=self.mode, align_corners=True))


class TransposeUp(nn.Module):
    """2x2 stride-2 transposed conv -> norm -> ReLU (FuseOriginUNet; the norm is in the 56.164M count).

    ``scale`` is the kernel and the stride (the pooling it undoes), per axis if needed (``(1, 2, 2)``).
    """

    def __init__(
        self, in_channels: int, out_channels: int, norm: Norm = "batch", spatial_dims: int = 2, scale: Size = 2
    ) -> None:
        super().__init__()
        self.conv = layers.conv_transpose(spatial_dims, in_channels, out_channels, scale, stride=scale)
        self.norm = layers.norm_factory(norm, spatial_dims)(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.act(self.norm(self.conv(x, output_size=tuple(size))))


class UpBlock(nn.Module):
    """U-Net decoder step: upsample x2 (``in -> out``), ``concat(upsampled, skip)``, double conv.

    ``mode="bilinear"`` (:class:`BilinearUp`, paper 1's U-Net, FuseUNet and variants) or ``"transpose"``
    (:class:`TransposeUp`, FuseOriginUNet). The double conv maps ``out + skip -> out``. The upsampled map
    is sized to the skip, so inputs whose sides are not multiples of ``2**depth`` also work. ``kernel_size``
    is the level's conv kernel, ``scale`` the pooling step this block undoes (both per axis if needed).
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        mode: str = "bilinear",
        norm: Norm = "batch",
        spatial_dims: int = 2,
        kernel_size: Size = 3,
        scale: Size = 2,
    ) -> None:
        super().__init__()
        factory = layers.norm_factory(norm, spatial_dims)
        if mode == "bilinear":
            self.up: BilinearUp | TransposeUp = BilinearUp(
                in_channels, out_channels, factory, spatial_dims, kernel_size
            )
        elif mode == "transpose":
            self.up = TransposeUp(in_channels, out_channels, factory, spatial_dims, scale)
        else:
            raise ValueError(f"unknown upsampling mode {mode!r} (bilinear | transpose)")
        self.conv = ConvBlock(
            out_channels + skip_channels, out_channels, norm=factory, spatial_dims=spatial_dims, kernel_size=kernel_size
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x, skip.shape[2:])
        return self.conv(torch.cat((x, skip), dim=1))


class SpatialAttention(nn.Module):
    """Paper 1's spatial-attention (SA) block (Fig. 3b): one weight map per pixel (voxel in 3D).

    Conv1x1 ``C -> C/r`` -> Conv3x3 dilated ``d`` (padding ``d``) -> the same again -> Conv1x1 ``C/r -> 1``
    -> norm(1) -> sigmoid; no ReLU between the convs. ``forward`` returns the map ``(B, 1, H, W)``; the
    caller multiplies it into the features (no residual), which lets one map gate several streams
    (the proposed master-assistant network). ``C/r`` is floored at 1 so tiny test widths work.

    3D (our generalisation; paper 1 is 2D): the kernels are 1x1x1 and dilated 3x3x3 (dilation ``d`` on every
    axis) and the map is ``(B, 1, D, H, W)``. ``kernel_size`` is the level's conv kernel: along an axis where it
    is 1 (thick slices, ``(1, 3, 3)``), the SA block does not look across slices either (kernel 1, no dilation),
    so the map of an in-plane level is a per-slice map, as in the 2D network.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        dilation: int = 4,
        norm: Norm = "batch",
        spatial_dims: int = 2,
        kernel_size: Size = 3,
    ) -> None:
        super().__init__()
        if reduction < 1 or dilation < 1:
            raise ValueError(f"SA reduction and dilation must be >= 1, got r={reduction}, d={dilation}")
        hidden = max(1, channels // reduction)
        d = spatial_dims
        if isinstance(kernel_size, int):
            k: Size = 3 if kernel_size > 1 else 1
            rate: Size = dilation if kernel_size > 1 else 1
        else:
            sizes = layers.size_tuple(kernel_size, d, "SA kernel_size")
            k = tuple(3 if s > 1 else 1 for s in sizes)
            rate = tuple(dilation if s > 1 else 1 for s in sizes)
        pad = layers.same_padding(k, rate)
        self.body = nn.Sequential(
            layers.conv(d, channels, hidden, 1),
            layers.conv(d, hidden, hidden, k, padding=pad, dilation=rate),
            layers.conv(d, hidden, hidden, k, padding=pad, dilation=rate),
            layers.conv(d, hidden, 1, 1),
            layers.norm_factory(norm, d)(1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(x))
