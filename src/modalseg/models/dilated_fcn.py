"""Paper 2's backbone: the 2D dilated residual FCN of UMMKD (Dou et al. 2020), which paper 2 builds on.

Paper 2 says only "nine convolutional operation groups, one deconvolutional group and one softmax layer; each
group contains two to four shared convolutional layers and domain-specific batch normalization layers". The
layout below is the UMMKD 2D network (reference facts, Paper 2), which reproduces the trainable-parameter
counts exactly: 36,979,408 for one input channel, two BN sets (MSBN) and C=4 classes; 39,342,552 for C=5.

Building blocks (base width f=16, no convolution bias anywhere):

* pre-activation layer P = BN -> LeakyReLU(0.2) -> Conv3x3 -> Dropout(p);
* residual block = two P plus an identity shortcut; when the width grows, the shortcut is the input
  zero-padded on channels (new channels appended after the existing ones; no 1x1 projection).

Groups (``group1`` ... ``group10``, then ``classifier``), resolution relative to the input:

==========  ==========================================================  ======
group1      Conv3x3 in->f, residual f, max-pool                          1/2
group2      residual f->2f, max-pool                                     1/4
group3      residual 2f->4f, residual 4f, max-pool                       1/8
group4      residual 4f->8f, residual 8f                                 1/8
group5      residual 8f->16f, residual 16f                               1/8
group6      residual 16f, residual 16f                                   1/8
group7      residual 16f->32f, residual 32f                              1/8
group8      two dilated (rate 2) residual 32f                            1/8
group9      two P 32f (no shortcut)                                      1/8
group10     Conv3x3 32f -> 64*8*C, BN, LeakyReLU, pixel shuffle x8       1
classifier  Conv5x5 8*C -> C logits (no BN)                              1
==========  ==========================================================  ======

The output stride 8 comes from the three max-pools of groups 1-3; the pixel shuffle restores full resolution,
so inputs must have sides divisible by 8. ``group4`` ... ``group9`` all have stride 8; paper 2 takes its
affinity features from "intermediate" layers "relatively close to each other", hence the default taps
``group5`` and ``group6`` (both 16f = 256 channels at 1/8 resolution).

Dropout: the paper's text says "drop rate of 0.75", but the UMMKD code passes 0.75 as the *keep* probability
(TensorFlow 1 ``keep_prob``), i.e. p = 0.25, which is the default here.

``forward_features(x, modality, layers=...)`` returns the logits and the outputs of the named groups (default
``group5`` and ``group6``, the affinity features) or of single blocks in them (``group5.1``) in one pass.

``spatial_dims=3`` builds the same network from 3D layers (3x3x3 kernels, 2x2x2 pools, an N-d x8 pixel shuffle,
:class:`~modalseg.models.layers.PixelShuffleNd`). Beware its size: the shuffle needs ``8**3`` channels per
output channel, so group10's conv is 8 times wider than in 2D and 3x3x3: 226M parameters on its own at f=16, C=4,
309,106,160 for the whole 3D network (docs/3d.md). Per-level kernel sizes and strides (anisotropic layouts) are
refused: the three 2x pools and the x8 shuffle are the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import modalseg.models.layers as layers
from modalseg.errors import ConfigError
from modalseg.models.layers import NormFactory
from modalseg.models.msbn import selected_modality

__all__ = ["DEFAULT_FEATURES", "DilatedFCN", "FEATURE_NAMES", "OUTPUT_STRIDE", "PreActivation", "ResidualBlock"]

OUTPUT_STRIDE = 8
FEATURE_NAMES = tuple(f"group{i}" for i in range(1, 11)) + ("classifier",)
#: Paper 2's affinity taps: two intermediate, neighbouring groups at the same 1/8 resolution.
DEFAULT_FEATURES = ("group5", "group6")
#: The shared normalisation vocabulary plus "bn", the old name of "batch" (still accepted).
_NORM_ALIASES = {"bn": "batch"}


class PreActivation(nn.Sequential):
    """P = BN -> LeakyReLU -> Conv3x3 (no bias, optional dilation) -> Dropout."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        dilation: int = 1,
        dropout: float = 0.25,
        negative_slope: float = 0.2,
        norm: str | NormFactory = "batch",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.bn = layers.norm_factory(norm, spatial_dims)(in_ch)
        self.act = nn.LeakyReLU(negative_slope, inplace=True)
        self.conv = layers.conv(spatial_dims, in_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False)
        self.drop = layers.dropout(spatial_dims, dropout)


class ResidualBlock(nn.Module):
    """Two pre-activation layers plus an identity shortcut, zero-padded on channels when widening.

    ``layer_options`` are :class:`PreActivation`'s (``dilation``, ``dropout``, ``negative_slope``, ``norm``,
    ``spatial_dims``), given to both layers; an unknown one is a ``TypeError`` there."""

    def __init__(self, in_ch: int, out_ch: int, **layer_options: Any) -> None:
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(f"residual block cannot narrow {in_ch} -> {out_ch} channels (padded shortcut)")
        self.in_ch, self.out_ch = in_ch, out_ch
        self.p1 = PreActivation(in_ch, out_ch, **layer_options)
        self.p2 = PreActivation(out_ch, out_ch, **layer_options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.out_ch == self.in_ch else layers.pad_channels(x, self.out_ch - self.in_ch)
        return self.p2(self.p1(x)) + shortcut


class DilatedFCN(nn.Module):
    """The dilated residual FCN above; ``norm="msbn"`` gives one BN set per modality (paper 2's MSBN).

    Args:
        in_channels: image channels per modality (1 in paper 2).
        num_classes: C, background included.
        num_modalities: BN sets when ``norm="msbn"`` (ignored otherwise: one shared set).
        norm: a name of :data:`~modalseg.models.layers.NORMS` (``"msbn"`` default; ``"batch"`` shares one BN
            set, ``"bn"`` is its old name).
        width: base width f (16).
        dropout: drop probability p of every P layer (0.25; see the module docstring).
        negative_slope: LeakyReLU slope (0.2).
        shuffle_channels_per_class: channels per class after the pixel shuffle (8, giving 8*C).
        spatial_dims: 2 (paper 2's network) or 3 (see the module docstring).
        kernel_sizes, strides: not supported (accepted only to refuse them in one line): the three 2x pools and
            the x8 pixel shuffle are the network; for anisotropic volumes use the ``unet`` backbone.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        num_modalities: int = 2,
        norm: str = "msbn",
        width: int = 16,
        dropout: float = 0.25,
        negative_slope: float = 0.2,
        shuffle_channels_per_class: int = 8,
        spatial_dims: int = 2,
        kernel_sizes: Sequence[object] | None = None,
        strides: Sequence[object] | None = None,
    ) -> None:
        super().__init__()
        if kernel_sizes is not None or strides is not None:
            raise ConfigError(
                "dilated_fcn: kernel_sizes/strides are not supported (fixed 3x3 kernels, three 2x pools and an x8 "
                "pixel shuffle); use the 'unet' backbone for anisotropic layouts"
            )
        norm = _NORM_ALIASES.get(norm, norm) if isinstance(norm, str) else norm
        if norm not in layers.NORMS:
            raise ConfigError(f"dilated_fcn: norm must be one of {', '.join(layers.NORMS)} (or 'bn'), got {norm!r}")
        d = layers.check_spatial_dims(spatial_dims, "dilated_fcn")
        if in_channels < 1 or num_classes < 1 or width < 1 or num_modalities < 1:
            raise ConfigError(
                "dilated_fcn: in_channels, num_classes, width and num_modalities must be >= 1 "
                f"(got {in_channels}, {num_classes}, {width}, {num_modalities})"
            )
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dilated_fcn: dropout is a drop probability in [0, 1), got {dropout}")
        self.in_channels, self.num_classes, self.width = in_channels, num_classes, width
        self.num_modalities = num_modalities if norm == "msbn" else 1
        self.norm = norm
        self.spatial_dims = d
        factory = layers.norm_factory(norm, d, num_modalities=num_modalities, what="dilated_fcn")
        f = width
        kw = {"dropout": dropout, "negative_slope": negative_slope, "norm": factory, "spatial_dims": d}

        def res(i: int, o: int, dilation: int = 1) -> ResidualBlock:
            return ResidualBlock(i, o, dilation=dilation, **kw)

        self.group1 = nn.Sequential(
            layers.conv(d, in_channels, f, 3, padding=1, bias=False), res(f, f), layers.max_pool(d, 2)
        )
        self.group2 = nn.Sequential(res(f, 2 * f), layers.max_pool(d, 2))
        self.group3 = nn.Sequential(res(2 * f, 4 * f), res(4 * f, 4 * f), layers.max_pool(d, 2))
        self.group4 = nn.Sequential(res(4 * f, 8 * f), res(8 * f, 8 * f))
        self.group5 = nn.Sequential(res(8 * f, 16 * f), res(16 * f, 16 * f))
        self.group6 = nn.Sequential(res(16 * f, 16 * f), res(16 * f, 16 * f))
        self.group7 = nn.Sequential(res(16 * f, 32 * f), res(32 * f, 32 * f))
        self.group8 = nn.Sequential(res(32 * f, 32 * f, 2), res(32 * f, 32 * f, 2))
        self.group9 = nn.Sequential(PreActivation(32 * f, 32 * f, **kw), PreActivation(32 * f, 32 * f, **kw))
        up_ch = shuffle_channels_per_class * num_classes * OUTPUT_STRIDE**d
        self.group10 = nn.Sequential(
            layers.conv(d, 32 * f, up_ch, 3, padding=1, bias=False),
            factory(up_ch),
            nn.LeakyReLU(negative_slope, inplace=True),
            layers.pixel_shuffle(d, OUTPUT_STRIDE),
        )
        self.classifier = layers.conv(
            d, shuffle_channels_per_class * num_classes, num_classes, 5, padding=2, bias=False
        )
        self._init_weights(negative_slope)

    def _init_weights(self, negative_slope: float) -> None:
        # He initialisation for the leaky-ReLU convolutions (PyTorch's default is a scaled uniform).
        conv_type = layers.layer_type("conv", self.spatial_dims)
        for m in self.modules():
            if isinstance(m, conv_type):
                nn.init.kaiming_normal_(m.weight, a=negative_slope, nonlinearity="leaky_relu")

    #: stride 8, undone by an 8x pixel shuffle: sides must be multiples of 8
    size_multiple = 8
    min_size = 8

    def groups(self) -> list[tuple[str, nn.Module]]:
        """The named stages in forward order (``group1`` ... ``group10``, ``classifier``)."""
        return [(name, getattr(self, name)) for name in FEATURE_NAMES]

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Every name :meth:`forward_features` can return: the groups and the blocks inside them (``group5.1``)."""
        names: list[str] = []
        for name, module in self.groups():
            names.append(name)
            if isinstance(module, nn.Sequential):
                names += [f"{name}.{i}" for i in range(len(module))]
        return tuple(names)

    #: What ``forward_features`` returns without ``layers``: paper 2's affinity features
    default_features: tuple[str, ...] = DEFAULT_FEATURES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, ())[0]

    def forward_features(
        self, x: torch.Tensor, modality: int | None = None, *, layers: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits ``(B, C, *spatial)`` and the outputs of the named groups or blocks, in one forward pass.

        Default ``layers``: ``group5`` and ``group6`` (both at 1/8 resolution). ``modality`` selects the BN set
        (``norm="msbn"``) for this call; ``None`` keeps the current one.
        """
        names = self.default_features if layers is None else tuple(layers)
        unknown = [n for n in names if n not in self.feature_names]
        if unknown:
            known = ", ".join(FEATURE_NAMES)
            raise ConfigError(f"dilated_fcn: unknown feature layer(s) {unknown}; known: {known} (or groupN.i)")
        with selected_modality(self, modality):
            return self._run(x, names)

    def _run(self, x: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if x.dim() != 2 + self.spatial_dims:
            raise ConfigError(
                f"dilated_fcn: expects a {self.spatial_dims}D batch (B, C, *spatial), got {tuple(x.shape)}"
            )
        size = x.shape[2:]
        if any(s % OUTPUT_STRIDE for s in size):
            shown = "x".join(str(s) for s in size)
            raise ConfigError(
                f"dilated_fcn: input size {shown} is not a multiple of the output stride {OUTPUT_STRIDE}"
            )
        want = set(names)
        feats: dict[str, torch.Tensor] = {}
        for name, module in self.groups():
            if any(n.startswith(name + ".") for n in want):  # block by block to keep the blocks' outputs
                for i, block in enumerate(module):
                    x = block(x)
                    if f"{name}.{i}" in want:
                        feats[f"{name}.{i}"] = x
            else:
                x = module(x)
            if name in want:
                feats[name] = x
        return x, {n: feats[n] for n in names}
