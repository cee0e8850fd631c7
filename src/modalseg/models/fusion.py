"""Encoder streams, fusion operators, the U-Net decoder and ONE generic fusion network (paper 1, Li et al.).

Every U-Net-based row of paper 1's Table 1 is a :class:`FusionConfig` of :class:`FusionUNet`:

==================  ==========================================================================================
U-Net               one stream, widths 64..1024, 4 poolings, bilinear + conv upsampling
U-Net + SA          + an SA gate after each of the 5 encoder blocks; the gated map is skip and next input
EarlyFuseUNet       U-Net with all modalities stacked on the input channels
LateFuseUNet        one stream per modality (32..512), independent; concatenated only at skips/bottleneck
FuseOriginUNet      full-width streams (64..1024); master block k+1 reads concat(master_k, assistants_k);
                    the decoder reads the master's skips and master + assistants summed at the bottleneck
                    (the deepest assistant block must feed something: see paper1.py); transposed convs
FuseUNet            half-width streams (32..512); y_k = concat(master_k, assistants_k) is skip k and, pooled,
                    the input of master block k+1
FuseUNet + SA       FuseUNet + an SA gate per stream and level, each stream gated by its own map
Proposed            FuseUNet + SA gates on the master only; the master's map s_k multiplies the master AND
                    every assistant before concatenation (paper 1, Fig. 3)
==================  ==========================================================================================

Generalisation to M >= 2 modalities (one master, M-1 assistants, each its own stream of the same widths
``w_k``): fusion concatenates the master with all assistants, so a fused feature has ``M * w_k`` channels;
a master block fed by a fused feature reads ``M * w_{k-1}`` channels, and the decoder's widths follow its
skips (``M * w_k`` for the concatenation-skip models). With M = 2 this is exactly the paper's layouts.

Side outputs: ``logits, features = model.forward_features(x)`` returns, in the same forward pass, the SA maps
keyed by the path of the gate that made them (``"master.gates.k"``, ``"assistants.i.gates.k"``; one
``(B, 1, h_k, w_k)`` tensor per encoder block, k = 0 shallow .. depth; the proposed network only has master
gates, whose maps gate every stream); :func:`attention_maps` groups them per stream as
``{"master": [s_0 .. s_depth], "assistant1": [...]}``. ``layers=[...]`` asks for other intermediate features
instead (:attr:`FusionUNet.feature_names`: encoder blocks, gates, decoder steps), e.g. paper 2's affinity
features when the U-Net is its unpaired backbone. The features are not detached (they carry gradients).

Deprecated (kept for the callers that read it): after every forward pass ``model.attention_maps`` holds the
detached maps grouped as :func:`attention_maps` does, unless ``model.record_attention = False``.

``spatial_dims=3`` (:class:`FusionConfig`) builds the same layouts from 3D layers (trilinear upsampling,
3x3x3 kernels, SA maps ``(B, 1, d, h, w)``); every side needs ``2**depth`` voxels at least.

Per-level ``kernel_sizes`` (one per encoder level, ``depth + 1``) and pooling ``strides`` (one per pooling,
``depth``), each an int or one value per axis, give nnU-Net-style anisotropic layouts for thick-slice volumes:
e.g. ``kernel_sizes=((1, 3, 3), (1, 3, 3), (3, 3, 3), ...)``, ``strides=((1, 2, 2), (1, 2, 2), (2, 2, 2), ...)``
pools in-plane only until the in-plane spacing has caught up with the slice thickness
(:mod:`modalseg.models.planning` chooses them). The decoder mirrors them (the up step of level k undoes
pooling k; its convs use level k's kernel) and so do the SA blocks (:class:`~modalseg.models.blocks.SpatialAttention`).
Without the options every level has the square kernel 3 and pooling 2 of the papers, built exactly as before.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

import modalseg.models.layers as layers
from modalseg.errors import ConfigError
from modalseg.models.blocks import ConvBlock, Norm, SpatialAttention, UpBlock
from modalseg.models.layers import Size
from modalseg.models.msbn import selected_modality

__all__ = [
    "EncoderStream",
    "Fusion",
    "UNetDecoder",
    "FusionConfig",
    "FusionUNet",
    "attention_maps",
]


def attention_maps(features: Mapping[str, torch.Tensor], detach: bool = True) -> dict[str, list[torch.Tensor]]:
    """SA maps of a ``forward_features`` result grouped per stream, shallow to deep (paper 1, Fig. 5).

    ``"master.gates.k"`` goes to ``"master"``, ``"assistants.i.gates.k"`` to ``f"assistant{i + 1}"``; other
    features are ignored. With ``detach`` (default) the maps are detached, as the old ``attention_maps``
    attribute held them.
    """
    grouped: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in features.items():
        parts = key.split(".")
        if parts[:2] == ["master", "gates"] and len(parts) == 3:
            stream, level = "master", parts[2]
        elif len(parts) == 4 and parts[0] == "assistants" and parts[2] == "gates":
            stream, level = f"assistant{int(parts[1]) + 1}", parts[3]
        else:
            continue
        grouped.setdefault(stream, {})[int(level)] = value.detach() if detach else value
    order = sorted(grouped, key=lambda s: (s != "master", len(s), s))
    return {s: [grouped[s][k] for k in sorted(grouped[s])] for s in order}


class EncoderStream(nn.Module):
    """One modality's encoder: a double-conv block per level, optionally an SA gate after each block.

    ``in_channels[k]`` is what block ``k`` reads (it differs from ``widths[k-1]`` when the block is fed a
    fused feature). Pooling is left to the caller, which decides what each block reads.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        widths: Sequence[int],
        attention: bool = False,
        sa_reduction: int = 16,
        sa_dilation: int = 4,
        norm: Norm = "batch",
        spatial_dims: int = 2,
        kernel_sizes: Sequence[Size] | None = None,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(widths):
            raise ValueError("one input width per level is needed")
        self.widths = tuple(widths)
        d = spatial_dims
        kernels: Sequence[Size] = [3] * len(widths) if kernel_sizes is None else kernel_sizes
        if len(kernels) != len(widths):
            raise ValueError("one kernel size per level is needed")
        self.blocks = nn.ModuleList(
            ConvBlock(c, w, norm=norm, spatial_dims=d, kernel_size=k)
            for c, w, k in zip(in_channels, widths, kernels, strict=True)
        )
        self.gates = (
            nn.ModuleList(
                SpatialAttention(w, sa_reduction, sa_dilation, norm=norm, spatial_dims=d, kernel_size=k)
                for w, k in zip(widths, kernels, strict=True)
            )
            if attention
            else None
        )

    def __len__(self) -> int:
        return len(self.blocks)


class Fusion(nn.Module):
    """Multi-layer fusion operator: channel concatenation (paper 1) or element-wise sum (FuseNet)."""

    def __init__(self, mode: str = "concat") -> None:
        super().__init__()
        if mode not in ("concat", "sum"):
            raise ValueError(f"unknown fusion {mode!r} (concat | sum)")
        self.mode = mode

    def out_channels(self, channels: Sequence[int]) -> int:
        if self.mode == "concat":
            return sum(channels)
        if len(set(channels)) != 1:
            raise ValueError(f"sum fusion needs equal widths, got {list(channels)}")
        return channels[0]

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) == 1:
            return features[0]
        if self.mode == "concat":
            return torch.cat(tuple(features), dim=1)
        out = features[0] + features[1]
        for f in features[2:]:
            out = out + f
        return out

    def extra_repr(self) -> str:
        return self.mode


class UNetDecoder(nn.Module):
    """U-Net decoder: one :class:`UpBlock` per skip (deep to shallow), then a Conv1x1 head to logits.

    ``skip_channels`` and ``widths`` are listed shallow to deep (``widths`` default to the skip widths,
    as in U-Net). The softmax is left to the loss (paper 1 Eq. 1). ``kernel_sizes`` and ``strides`` (shallow to
    deep, one per skip level) are the encoder's kernel at that level and the pooling that left it.
    """

    def __init__(
        self,
        bottleneck_channels: int,
        skip_channels: Sequence[int],
        num_classes: int,
        widths: Sequence[int] | None = None,
        upsample: str = "bilinear",
        norm: Norm = "batch",
        spatial_dims: int = 2,
        kernel_sizes: Sequence[Size] | None = None,
        strides: Sequence[Size] | None = None,
    ) -> None:
        super().__init__()
        widths = tuple(skip_channels) if widths is None else tuple(widths)
        if len(widths) != len(skip_channels):
            raise ValueError("one decoder width per skip is needed")
        n = len(skip_channels)
        kernels: Sequence[Size] = [3] * n if kernel_sizes is None else kernel_sizes
        scales: Sequence[Size] = [2] * n if strides is None else strides
        if len(kernels) != n or len(scales) != n:
            raise ValueError("one decoder kernel size and stride per skip is needed")
        ups = []
        cin = bottleneck_channels
        for k in reversed(range(n)):
            ups.append(
                UpBlock(
                    cin, skip_channels[k], widths[k], mode=upsample, norm=norm, spatial_dims=spatial_dims,
                    kernel_size=kernels[k], scale=scales[k],
                )
            )
            cin = widths[k]
        self.ups = nn.ModuleList(ups)
        self.head = layers.conv(spatial_dims, cin, num_classes, 1)

    def forward(self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.forward_features(bottleneck, skips)[0]

    def forward_features(
        self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor], keep: Collection[int] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits and the outputs of the decoder steps ``keep`` (index j of ``ups``, deep to shallow)."""
        x = bottleneck
        kept: dict[int, torch.Tensor] = {}
        for j, (up, skip) in enumerate(zip(self.ups, reversed(skips), strict=True)):
            x = up(x, skip)
            if j in keep:
                kept[j] = x
        return self.head(x), kept


def _per_level(
    value: object, count: int, spatial_dims: int, what: str, name: str
) -> tuple[tuple[int, ...], ...]:
    """``count`` entries (an int or one int per axis each) as per-axis tuples; one-line ConfigError otherwise."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != count:
        shown = len(value) if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else repr(value)
        unit = "one per pooling" if what == "strides" else "one per encoder level"
        raise ConfigError(f"model {name}: {what} needs {count} entries ({unit}), got {shown}")
    return tuple(layers.size_tuple(v, spatial_dims, f"model {name}: {what} entry") for v in value)


_FUSIONS = ("none", "concat", "sum")
_ATTENTIONS = ("none", "per_stream", "master")
_SOURCES = ("fused", "master")
_BOTTLENECKS = ("fused", "master", "sum")
_UPSAMPLES = ("bilinear", "transpose")


@dataclass(frozen=True)
class FusionConfig:
    """What a :class:`FusionUNet` is made of.

    Attributes:
        num_modalities: channel groups of the input, master first.
        in_channels: channels per modality.
        num_classes: output logits.
        widths: encoder widths per level of every stream (``depth + 1`` entries; ``depth`` poolings).
        stack_inputs: one stream reads all modalities stacked (early fusion); no assistant streams.
        fusion: ``none`` (single stream), ``concat`` or ``sum`` of master and assistant features.
        fuse_into_master: master block k+1 reads the pooled fused feature y_k (multi-layer fusion);
            otherwise the master continues from its own features (late fusion).
        skip_source: the decoder's skips are the fused features (``fused``) or the master's own
            (``master``, FuseOriginUNet).
        bottleneck: what the decoder starts from: the fused deepest features (``fused``), the master's
            (``master``) or master + assistants (``sum``, parameter-free; FuseOriginUNet, see its builder).
        attention: ``none``; ``per_stream`` (every stream gated by its own SA map); ``master`` (only the
            master has SA gates and its map multiplies the master and every assistant; the proposed network).
        assistant_from_sa: assistant block k+1 reads the SA-gated assistant features (True) or the ungated
            ones (False). Paper 1 leaves this open (same parameter count); the default True follows the
            paper's "SA block before each pooling layer" and U-Net + SA, where the gated map is pooled.
        upsample: ``bilinear`` (+ Conv3x3-BN-ReLU) or ``transpose`` (2x2 transposed conv).
        decoder_widths: decoder widths per skip level (default: the skip widths).
        sa_reduction, sa_dilation: SA block's r and d (paper 1: 16 and 4).
        spatial_dims: 2 (paper 1's networks) or 3 (the same layouts on volumes).
        kernel_sizes: per encoder level (``depth + 1``), one int per axis each; ``None``: 3 everywhere.
        strides: per pooling (``depth``), one int per axis each; ``None``: 2 everywhere (the papers').
            Both are normalised to tuples of per-axis tuples when given (``None`` keeps the papers' layers).
    """

    num_modalities: int
    in_channels: int
    num_classes: int
    widths: tuple[int, ...]
    stack_inputs: bool = False
    fusion: str = "none"
    fuse_into_master: bool = False
    skip_source: str = "fused"
    bottleneck: str = "fused"
    attention: str = "none"
    assistant_from_sa: bool = True
    upsample: str = "bilinear"
    decoder_widths: tuple[int, ...] | None = None
    sa_reduction: int = 16
    sa_dilation: int = 4
    name: str = field(default="fusion_unet", compare=False)
    spatial_dims: int = 2
    kernel_sizes: tuple[tuple[int, ...], ...] | None = None
    strides: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"model {self.name}: {msg}")

        layers.check_spatial_dims(self.spatial_dims, f"model {self.name}")
        if self.kernel_sizes is not None:
            kernels = _per_level(self.kernel_sizes, len(self.widths), self.spatial_dims, "kernel_sizes", self.name)
            if any(k < 1 or k % 2 == 0 for ks in kernels for k in ks):
                raise bad(f"kernel sizes must be odd and >= 1 (padding keeps the size), got {list(kernels)}")
            object.__setattr__(self, "kernel_sizes", kernels)
        if self.strides is not None:
            strides = _per_level(self.strides, len(self.widths) - 1, self.spatial_dims, "strides", self.name)
            if any(v < 1 for st in strides for v in st):
                raise bad(f"strides must be >= 1, got {list(strides)}")
            object.__setattr__(self, "strides", strides)

        for key, value, allowed in (
            ("fusion", self.fusion, _FUSIONS),
            ("attention", self.attention, _ATTENTIONS),
            ("skip_source", self.skip_source, _SOURCES),
            ("bottleneck", self.bottleneck, _BOTTLENECKS),
            ("upsample", self.upsample, _UPSAMPLES),
        ):
            if value not in allowed:
                raise bad(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        if self.num_modalities < 1 or self.in_channels < 1 or self.num_classes < 1:
            raise bad(
                "num_modalities, in_channels and num_classes must be >= 1, got "
                f"{self.num_modalities}, {self.in_channels}, {self.num_classes}"
            )
        if len(self.widths) < 2 or min(self.widths) < 1:
            raise bad(f"needs depth >= 1 and positive widths, got widths {list(self.widths)}")
        if self.sa_reduction < 1 or self.sa_dilation < 1:
            raise bad(f"sa_reduction and sa_dilation must be >= 1, got {self.sa_reduction}, {self.sa_dilation}")
        if self.fusion == "none":
            if self.num_modalities > 1 and not self.stack_inputs:
                raise bad(f"is single-modality but num_modalities={self.num_modalities}")
        else:
            if self.stack_inputs:
                raise bad("stack_inputs (early fusion) has a single stream; use fusion='none'")
            if self.num_modalities < 2:
                raise bad(f"fuses a master with assistants and needs num_modalities >= 2, got {self.num_modalities}")
        if self.decoder_widths is not None and len(self.decoder_widths) != self.depth:
            raise bad(f"needs {self.depth} decoder widths, got {list(self.decoder_widths)}")

    @property
    def depth(self) -> int:
        return len(self.widths) - 1

    @property
    def level_kernels(self) -> tuple[Size, ...]:
        """The conv kernel of each level: the configured per-axis tuples, or the papers' int 3."""
        return self.kernel_sizes if self.kernel_sizes is not None else (3,) * (self.depth + 1)

    @property
    def level_strides(self) -> tuple[Size, ...]:
        """The pooling step after each level but the last: the configured per-axis tuples, or the papers' 2."""
        return self.strides if self.strides is not None else (2,) * self.depth

    @property
    def min_shape(self) -> tuple[int, ...]:
        """Per axis, the product of its pooling steps: the smallest side that reaches the bottleneck with one voxel."""
        total = [1] * self.spatial_dims
        for step in self.level_strides:
            for a, v in enumerate(layers.size_tuple(step, self.spatial_dims)):
                total[a] *= v
        return tuple(total)

    @property
    def num_assistants(self) -> int:
        return 0 if self.fusion == "none" else self.num_modalities - 1


class FusionUNet(nn.Module):
    """The generic paired-fusion U-Net of paper 1: every U-Net-based Table 1 row is a :class:`FusionConfig`.

    Input: ``(B, num_modalities * in_channels, *spatial)``, modalities as channel groups, master first.
    Output: logits ``(B, num_classes, *spatial)``. ``norm`` is a name of :data:`~modalseg.models.layers.NORMS`
    or a factory; ``norm_sets`` is the number of BN sets of ``"msbn"``. See the module docstring for the layouts
    and :meth:`forward_features` for the side outputs.
    """

    def __init__(self, config: FusionConfig, norm: Norm = "batch", norm_sets: int = 2) -> None:
        super().__init__()
        self.config = cfg = config
        d = cfg.spatial_dims
        norm = layers.norm_factory(norm, d, num_modalities=norm_sets, what=f"model {cfg.name}")
        widths = cfg.widths
        n_assist = cfg.num_assistants
        self.fusion = Fusion(cfg.fusion if cfg.fusion != "none" else "concat")
        fused = [self.fusion.out_channels([w] * (1 + n_assist)) for w in widths]

        stream_in = cfg.in_channels * (cfg.num_modalities if cfg.stack_inputs else 1)
        master_in = [stream_in] + [fused[k] if cfg.fuse_into_master else widths[k] for k in range(cfg.depth)]
        assistant_in = [stream_in] + list(widths[:-1])
        sa_kw = dict(
            sa_reduction=cfg.sa_reduction, sa_dilation=cfg.sa_dilation, norm=norm, spatial_dims=d,
            kernel_sizes=cfg.kernel_sizes,
        )
        self.master = EncoderStream(master_in, widths, attention=cfg.attention != "none", **sa_kw)
        self.assistants = nn.ModuleList(
            EncoderStream(assistant_in, widths, attention=cfg.attention == "per_stream", **sa_kw)
            for _ in range(n_assist)
        )
        self.pool = layers.max_pool(d, 2)
        # Per-level poolings only when strides are configured (parameter-free: the state dict is the same).
        self.pools: nn.ModuleList | None = (
            nn.ModuleList(layers.max_pool(d, s, s) for s in cfg.strides) if cfg.strides is not None else None
        )
        self.sum = Fusion("sum")
        skip_in = fused[:-1] if cfg.skip_source == "fused" else list(widths[:-1])
        bottleneck_in = fused[-1] if cfg.bottleneck == "fused" else widths[-1]
        self.decoder = UNetDecoder(
            bottleneck_in,
            skip_in,
            cfg.num_classes,
            widths=cfg.decoder_widths,
            upsample=cfg.upsample,
            norm=norm,
            spatial_dims=d,
            kernel_sizes=cfg.kernel_sizes[:-1] if cfg.kernel_sizes is not None else None,
            strides=cfg.strides,
        )
        self.record_attention = True
        self.attention_maps: dict[str, list[torch.Tensor]] = {}

    @property
    def expected_channels(self) -> int:
        return self.config.num_modalities * self.config.in_channels

    @property
    def min_size(self) -> int:
        """Sides smaller than this (one pixel at the deepest level) cannot pass the encoder's poolings; other
        sides need not be multiples of it (the decoder sizes each upsampling to its skip). With per-axis
        ``strides`` it is the largest of :attr:`min_shape` (a 3D inferer should use :attr:`min_shape`)."""
        return max(self.config.min_shape) if self.config.strides is not None else 2**self.config.depth

    @property
    def min_shape(self) -> tuple[int, ...]:
        """Per spatial axis, the smallest side (the product of that axis's pooling steps)."""
        return self.config.min_shape

    @property
    def gate_names(self) -> tuple[str, ...]:
        """Feature names of the SA maps (``master.gates.k``, ``assistants.i.gates.k``), shallow to deep."""
        names = [f"master.gates.{k}" for k in range(len(self.master))] if self.master.gates is not None else []
        for i, stream in enumerate(self.assistants):
            if stream.gates is not None:
                names += [f"assistants.{i}.gates.{k}" for k in range(len(stream))]
        return tuple(names)

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Every name :meth:`forward_features` can return: the output of the module of that path.

        Encoder blocks (``master.blocks.k``, ``assistants.i.blocks.k``; before the SA gate), SA maps
        (:attr:`gate_names`) and decoder steps (``decoder.ups.j``, j = 0 the deepest).
        """
        names = [f"master.blocks.{k}" for k in range(len(self.master))]
        for i, stream in enumerate(self.assistants):
            names += [f"assistants.{i}.blocks.{k}" for k in range(len(stream))]
        names += self.gate_names
        names += [f"decoder.ups.{j}" for j in range(len(self.decoder.ups))]
        return tuple(names)

    @property
    def affinity_layers(self) -> tuple[str, ...]:
        """Paper 2's affinity pair when this U-Net is the unpaired backbone, for its depth: the last encoder block
        before the bottleneck and the first decoder step, both at the same resolution (the ``unet`` card's
        ``("master.blocks.3", "decoder.ups.0")`` at depth 4)."""
        return (f"master.blocks.{self.config.depth - 1}", "decoder.ups.0")

    @property
    def default_features(self) -> tuple[str, ...]:
        """What :meth:`forward_features` returns without ``layers``: the SA maps (none for models without SA)."""
        return self.gate_names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, ())[0]

    def forward_features(
        self, x: torch.Tensor, modality: int | None = None, *, layers: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and side outputs of one forward pass: the SA maps by default, or the named ``layers``.

        ``modality`` selects the BN set of a model built with ``norm="msbn"`` for this call (a paired model
        sees every modality at once, so it is normally ``None``). Names: :attr:`feature_names`.
        """
        names = self.default_features if layers is None else tuple(layers)
        unknown = [n for n in names if n not in self.feature_names]
        if unknown:
            raise ConfigError(
                f"model {self.config.name}: unknown feature layer(s) {unknown}; known: {', '.join(self.feature_names)}"
            )
        with selected_modality(self, modality):
            return self._run(x, names)

    def _check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        if x.dim() != 2 + cfg.spatial_dims or x.shape[1] != self.expected_channels:
            axes = "H, W" if cfg.spatial_dims == 2 else "D, H, W"
            raise ConfigError(
                f"model {cfg.name}: expects input (B, {self.expected_channels}, {axes}) = {cfg.num_modalities} "
                f"modalities x {cfg.in_channels} channels, got {tuple(x.shape)}"
            )

    def _run(self, x: torch.Tensor, names: Collection[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The forward pass; keeps the outputs named in ``names`` (and records ``attention_maps``)."""
        cfg = self.config
        self._check_input(x)
        want = set(names)
        n_assist = len(self.assistants)
        if n_assist:
            inputs = list(torch.split(x, cfg.in_channels, dim=1))
            m_in, a_in = inputs[0], inputs[1:]
        else:
            m_in, a_in = x, []
        record = self.record_attention and cfg.attention != "none"
        feats: dict[str, torch.Tensor] = {}
        maps: dict[str, torch.Tensor] = {}

        def keep(name: str, value: torch.Tensor) -> None:
            if name in want:
                feats[name] = value

        fused_skips = cfg.skip_source == "fused" and n_assist > 0
        skips: list[torch.Tensor] = []
        last = cfg.depth
        for k in range(last + 1):
            fm = self.master.blocks[k](m_in)
            fa = [s.blocks[k](a) for s, a in zip(self.assistants, a_in, strict=True)]
            keep(f"master.blocks.{k}", fm)
            for i, f in enumerate(fa):
                keep(f"assistants.{i}.blocks.{k}", f)
            if cfg.attention == "none":
                gm, ga = fm, fa
            else:
                sm = self.master.gates[k](fm)
                gm = fm * sm
                maps[f"master.gates.{k}"] = sm
                if cfg.attention == "master":
                    ga = [f * sm for f in fa]
                else:
                    sa = [s.gates[k](f) for s, f in zip(self.assistants, fa, strict=True)]
                    ga = [f * s for f, s in zip(fa, sa, strict=True)]
                    for i, s in enumerate(sa):
                        maps[f"assistants.{i}.gates.{k}"] = s
            if k < last:
                into_master = cfg.fuse_into_master and n_assist > 0
                y = self.fusion([gm, *ga]) if (into_master or fused_skips) else gm
                skips.append(y if fused_skips else gm)
                pool = self.pool if self.pools is None else self.pools[k]
                m_in = pool(y if into_master else gm)
                a_in = [pool(g) for g in (ga if cfg.assistant_from_sa else fa)]
        if not n_assist or cfg.bottleneck == "master":
            bottleneck = gm
        elif cfg.bottleneck == "fused":
            bottleneck = self.fusion([gm, *ga])
        else:
            bottleneck = self.sum([gm, *ga])
        ups = {int(n.rsplit(".", 1)[1]) for n in want if n.startswith("decoder.ups.")}
        if ups:
            logits, up_out = self.decoder.forward_features(bottleneck, skips, ups)
        else:  # through __call__, as before forward_features existed (hooks on the decoder still fire)
            logits, up_out = self.decoder(bottleneck, skips), {}
        for j, value in up_out.items():
            feats[f"decoder.ups.{j}"] = value
        for name, value in maps.items():
            keep(name, value)
        self.attention_maps = attention_maps(maps) if record else {}
        return logits, {n: feats[n] for n in names}
