"""Layer factories by name and ``spatial_dims`` (2 or 3): the one place where a model picks its layer classes.

Every model of both papers builds its convolutions, normalisations, poolings, upsamplings and dropouts through
these functions, so the same architecture code gives a 2D network (``spatial_dims=2``, the papers' networks,
bit-identical to building ``nn.Conv2d`` & co. directly) or its 3D counterpart (``spatial_dims=3``).

Normalisation vocabulary (:data:`NORMS`), the same for every model's ``norm`` option:

=============  =====================================================================================
``batch``      ``BatchNorm{2,3}d`` (paper 1; paper 2's "Joint" setting)
``instance``   ``InstanceNorm{2,3}d(affine=True)``: per image, so DDP on CPU equals one process
``group``      ``GroupNorm(min(8, C), C)`` (the largest divisor of C up to 8 when 8 does not divide C)
``msbn``       modality-specific batch norm (paper 2, Sec. 2.2, Eq. 1): one BN set per modality
``none``       ``nn.Identity``
=============  =====================================================================================

A model may also be given a callable ``channels -> nn.Module`` instead of a name (its dimension is then the
caller's business). Layers that have no meaning in some dimension are refused with :class:`ConfigError`
(e.g. ``bicubic`` interpolation in 3D); spatial_dims other than 2 and 3 are refused everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from modalseg.errors import ConfigError
from modalseg.models.msbn import modality_specific_batch_norm

__all__ = [
    "NORMS",
    "SPATIAL_DIMS",
    "NormFactory",
    "PixelShuffleNd",
    "check_spatial_dims",
    "conv",
    "conv_transpose",
    "dropout",
    "Size",
    "interpolation_mode",
    "layer_type",
    "max_pool",
    "max_unpool",
    "norm_factory",
    "norm_layer",
    "pad_channels",
    "pixel_shuffle",
    "pixel_shuffle_nd",
    "same_padding",
    "size_tuple",
    "upsample",
]

#: Spatial dimensions every factory accepts (images: 2D slices; volumes: 3D).
SPATIAL_DIMS: tuple[int, ...] = (2, 3)
#: The one normalisation vocabulary of every model's ``norm`` option (see the module docstring).
NORMS: tuple[str, ...] = ("batch", "instance", "group", "msbn", "none")

NormFactory = Callable[[int], nn.Module]
#: A kernel size, stride, padding or dilation: one int for every axis (the papers' square kernels) or one per axis
#: (anisotropic 3D kernels such as ``(1, 3, 3)``: no mixing across thick slices).
Size = int | Sequence[int]

_TYPES: dict[str, dict[int, type[nn.Module]]] = {
    "conv": {2: nn.Conv2d, 3: nn.Conv3d},
    "conv_transpose": {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d},
    "batch": {2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
    "instance": {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d},
    "max_pool": {2: nn.MaxPool2d, 3: nn.MaxPool3d},
    "max_unpool": {2: nn.MaxUnpool2d, 3: nn.MaxUnpool3d},
    "channel_dropout": {2: nn.Dropout2d, 3: nn.Dropout3d},
}


def check_spatial_dims(spatial_dims: object, what: str = "layer") -> int:
    """``spatial_dims`` as an int if it is 2 or 3, else :class:`ConfigError` naming ``what`` (e.g. the model)."""
    if isinstance(spatial_dims, bool) or spatial_dims not in SPATIAL_DIMS:
        raise ConfigError(f"{what}: spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return int(spatial_dims)  # type: ignore[call-overload]


def layer_type(kind: str, spatial_dims: int) -> type[nn.Module]:
    """The class a factory builds, for ``isinstance`` checks: ``layer_type("conv", 3) is nn.Conv3d``.

    Kinds: ``conv``, ``conv_transpose``, ``batch``, ``instance``, ``max_pool``, ``max_unpool``,
    ``channel_dropout``.
    """
    if kind not in _TYPES:
        raise ConfigError(f"unknown layer kind {kind!r}; known: {', '.join(_TYPES)}")
    return _TYPES[kind][check_spatial_dims(spatial_dims, f"layer {kind}")]


def size_tuple(value: Size, spatial_dims: int, what: str = "size") -> tuple[int, ...]:
    """``value`` as one int per axis (an int is repeated); :class:`ConfigError` for a wrong length or a non-int."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be an integer or one integer per axis, got {value!r}")
    if isinstance(value, int):
        return (value,) * spatial_dims
    items = tuple(value)
    if len(items) != spatial_dims or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
        raise ConfigError(f"{what} must be an integer or {spatial_dims} integers (one per axis), got {value!r}")
    return items


def _plain(value: Size) -> int | tuple[int, ...]:
    """An int stays an int (2D layers keep their exact constructor arguments), a sequence becomes a tuple."""
    return value if isinstance(value, int) else tuple(value)


def same_padding(kernel_size: Size, dilation: Size = 1) -> int | tuple[int, ...]:
    """The padding that keeps the size for odd kernels: ``dilation * (k - 1) / 2`` per axis (an int for int inputs)."""
    if isinstance(kernel_size, int) and isinstance(dilation, int):
        return dilation * (kernel_size - 1) // 2
    n = len(kernel_size) if not isinstance(kernel_size, int) else len(dilation)  # type: ignore[arg-type]
    ks, ds = size_tuple(kernel_size, n, "kernel_size"), size_tuple(dilation, n, "dilation")
    return tuple(d * (k - 1) // 2 for k, d in zip(ks, ds, strict=True))


def conv(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: Size = 3,
    *,
    stride: Size = 1,
    padding: Size = 0,
    dilation: Size = 1,
    bias: bool = True,
) -> nn.Module:
    """``nn.Conv{2,3}d``: a cubic kernel for an int (the papers' kernels), or one size per axis (``(1, 3, 3)``)."""
    cls = layer_type("conv", spatial_dims)
    return cls(
        in_channels,
        out_channels,
        _plain(kernel_size),
        stride=_plain(stride),
        padding=_plain(padding),
        dilation=_plain(dilation),
        bias=bias,
    )


def conv_transpose(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: Size = 2,
    *,
    stride: Size = 2,
    bias: bool = True,
) -> nn.Module:
    """``nn.ConvTranspose{2,3}d`` (FuseOriginUNet's 2x2 stride-2 upsampling by default; per-axis sizes allowed)."""
    cls = layer_type("conv_transpose", spatial_dims)
    return cls(in_channels, out_channels, _plain(kernel_size), stride=_plain(stride), bias=bias)


def _group_count(channels: int) -> int:
    groups = min(8, channels)
    return groups if channels % groups == 0 else math.gcd(8, channels)


def norm_factory(
    norm: str | NormFactory, spatial_dims: int, *, num_modalities: int | None = None, what: str = "model"
) -> NormFactory:
    """A ``channels -> nn.Module`` factory for a name of :data:`NORMS` (or a callable, returned as it is).

    ``num_modalities`` is the number of BN sets of ``"msbn"`` (required there, ignored otherwise). ``what``
    names the model in error messages.
    """
    if callable(norm) and not isinstance(norm, str):
        return norm
    dims = check_spatial_dims(spatial_dims, what)
    if norm == "batch":
        cls = layer_type("batch", dims)
        return lambda c: cls(c)
    if norm == "instance":
        inorm = layer_type("instance", dims)
        return lambda c: inorm(c, affine=True)
    if norm == "group":
        return lambda c: nn.GroupNorm(_group_count(c), c)
    if norm == "none":
        return lambda c: nn.Identity()
    if norm == "msbn":
        if isinstance(num_modalities, bool) or not isinstance(num_modalities, int) or num_modalities < 1:
            raise ConfigError(f"{what}: norm 'msbn' needs the number of modalities (BN sets), got {num_modalities!r}")
        sets = num_modalities
        return lambda c: modality_specific_batch_norm(c, sets, spatial_dims=dims)
    raise ConfigError(f"{what}: norm must be one of {', '.join(NORMS)} or a callable channels -> module, got {norm!r}")


def norm_layer(
    norm: str | NormFactory, spatial_dims: int, channels: int, *, num_modalities: int | None = None
) -> nn.Module:
    """One normalisation layer over ``channels`` (see :func:`norm_factory`)."""
    return norm_factory(norm, spatial_dims, num_modalities=num_modalities, what="norm_layer")(channels)


def max_pool(
    spatial_dims: int, kernel_size: Size = 2, stride: Size | None = None, *, return_indices: bool = False
) -> nn.Module:
    """``nn.MaxPool{2,3}d`` (``return_indices=True`` for SegNet/FuseNet unpooling); ``(1, 2, 2)``: in-plane only."""
    step = None if stride is None else _plain(stride)
    return layer_type("max_pool", spatial_dims)(_plain(kernel_size), step, return_indices=return_indices)


def max_unpool(spatial_dims: int, kernel_size: int = 2, stride: int | None = None) -> nn.Module:
    """``nn.MaxUnpool{2,3}d``: the SegNet decoder's unpooling with the encoder's indices."""
    return layer_type("max_unpool", spatial_dims)(kernel_size, stride)


_INTERPOLATION = {
    "nearest": {2: "nearest", 3: "nearest"},
    "linear": {2: "bilinear", 3: "trilinear"},
    "bilinear": {2: "bilinear", 3: "trilinear"},  # paper 1's word for "linear"; trilinear in 3D
    "bicubic": {2: "bicubic"},
}


def interpolation_mode(mode: str, spatial_dims: int) -> str:
    """The ``F.interpolate`` mode for ``mode`` in ``spatial_dims``: ``linear`` is bilinear in 2D, trilinear in 3D.

    ``bicubic`` has no 3D counterpart in PyTorch and is refused there with :class:`ConfigError`.
    """
    dims = check_spatial_dims(spatial_dims, f"interpolation {mode!r}")
    if mode not in _INTERPOLATION:
        raise ConfigError(f"unknown interpolation {mode!r}; known: {', '.join(_INTERPOLATION)}")
    if dims not in _INTERPOLATION[mode]:
        raise ConfigError(f"interpolation {mode!r} has no {dims}D meaning (PyTorch has no tricubic); use 'linear'")
    return _INTERPOLATION[mode][dims]


def upsample(
    spatial_dims: int, scale_factor: int = 2, mode: str = "linear", align_corners: bool | None = True
) -> nn.Module:
    """``nn.Upsample`` with the N-d mode of :func:`interpolation_mode` (``align_corners`` only for linear modes)."""
    resolved = interpolation_mode(mode, spatial_dims)
    corners = align_corners if resolved in ("bilinear", "trilinear", "bicubic") else None
    return nn.Upsample(scale_factor=scale_factor, mode=resolved, align_corners=corners)


def pixel_shuffle_nd(x: torch.Tensor, upscale_factor: int) -> torch.Tensor:
    """Sub-pixel rearrangement in any dimension: ``(B, C * r**n, *S) -> (B, C, *(s * r for s in S))``.

    The channel order is PyTorch's 2D convention extended to n axes (the r-offsets of the first spatial axis
    vary slowest), so in 2D it equals ``F.pixel_shuffle``.
    """
    r = int(upscale_factor)
    n = x.dim() - 2
    b, c, *size = x.shape
    if c % r**n:
        raise ConfigError(f"pixel shuffle x{r} in {n}D needs channels divisible by {r ** n}, got {c}")
    out_c = c // r**n
    x = x.reshape(b, out_c, *([r] * n), *size)
    # (B, C, r_1..r_n, s_1..s_n) -> (B, C, s_1, r_1, ..., s_n, r_n)
    order = [0, 1] + [axis for i in range(n) for axis in (2 + n + i, 2 + i)]
    return x.permute(*order).reshape(b, out_c, *(s * r for s in size))


class PixelShuffleNd(nn.Module):
    """N-d pixel shuffle (paper 2's x8 decoder in 3D); parameter-free, see :func:`pixel_shuffle_nd`."""

    def __init__(self, upscale_factor: int, spatial_dims: int) -> None:
        super().__init__()
        self.upscale_factor = int(upscale_factor)
        self.spatial_dims = check_spatial_dims(spatial_dims, "pixel shuffle")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 + self.spatial_dims:
            raise ConfigError(f"pixel shuffle ({self.spatial_dims}D) got a {x.dim()}-d input {tuple(x.shape)}")
        return pixel_shuffle_nd(x, self.upscale_factor)

    def extra_repr(self) -> str:
        return f"upscale_factor={self.upscale_factor}, spatial_dims={self.spatial_dims}"


def pixel_shuffle(spatial_dims: int, upscale_factor: int) -> nn.Module:
    """``nn.PixelShuffle`` in 2D (bit-identical to the original networks), :class:`PixelShuffleNd` in 3D.

    In 3D an x``r`` shuffle needs ``r**3`` input channels per output channel (x8: 512, against 64 in 2D).
    """
    dims = check_spatial_dims(spatial_dims, "pixel shuffle")
    return nn.PixelShuffle(upscale_factor) if dims == 2 else PixelShuffleNd(upscale_factor, dims)


def dropout(spatial_dims: int, p: float, *, channelwise: bool = False) -> nn.Module:
    """Element-wise ``nn.Dropout`` (paper 2's P layers) or, with ``channelwise``, ``nn.Dropout{2,3}d``."""
    dims = check_spatial_dims(spatial_dims, "dropout")
    return layer_type("channel_dropout", dims)(p) if channelwise else nn.Dropout(p)


def pad_channels(x: torch.Tensor, extra: int) -> torch.Tensor:
    """Append ``extra`` zero channels to ``(B, C, *spatial)`` (paper 2's parameter-free widening shortcut)."""
    spatial = x.dim() - 2
    return F.pad(x, (0, 0) * spatial + (0, extra))
