"""FuseNet (Hazirbas et al., ACCV 2016; paper 1's reference [11]) and its concatenation variant.

Two VGG16-BN encoders (stages of 2-2-3-3-3 Conv3x3-BN-ReLU, widths 64-128-256-512-512): the RGB stream is
the master, the depth stream the assistant. After each stage the assistant's features are fused into the
master stream, by element-wise sum (FuseNet) or channel concatenation (paper 1's "FuseNetConcate"), before
the master pools; the assistant continues from its own (unfused) features. The decoder is SegNet's: per
stage, max-unpooling with the master's pooling indices, then the mirrored convs, and a Conv3x3 classifier.

Parameter counts (3 input channels per modality, 2 classes, BN): FuseNet 44.167M, FuseNetConcate 50.434M.
Paper 1's Table 1 prints 29.4M and 74.0M, which no faithful FuseNet reproduces (29.4M is about the two
VGG16-BN encoders alone); we build the faithful networks and report the paper's numbers beside them.

With M >= 2 modalities every assistant has its own VGG stream; sum adds all of them into the master,
concatenation feeds master stage k+1 with ``M * w_k`` channels. Deviations from Hazirbas et al., whose
encoders start from ImageNet weights and use dropout: no pre-training (paper 1's grey MR inputs), no dropout.

``spatial_dims=3`` builds the same network from 3D layers (max-pooling and unpooling over 2x2x2 cubes); every
side then needs 32 voxels at least. ``forward_features(x, layers=[...])`` returns stage outputs by module path
(``master.k``, ``assistants.i.k``, ``decoder.j``); FuseNet has no SA maps, so by default it returns none.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import nn

import modalseg.models.layers as layers
from modalseg.errors import ConfigError
from modalseg.models.blocks import ConvBlock, Norm
from modalseg.models.fusion import Fusion
from modalseg.models.msbn import selected_modality

__all__ = ["FuseNet", "VGG16_STAGE_CONVS"]

VGG16_STAGE_CONVS = (2, 2, 3, 3, 3)


class FuseNet(nn.Module):
    """FuseNet with ``fusion="sum"`` (Hazirbas et al.) or ``"concat"`` (paper 1's FuseNetConcate).

    Input ``(B, num_modalities * in_channels, *spatial)``, master first; logits ``(B, num_classes, *spatial)``.
    ``base_width`` scales the VGG widths ``(b, 2b, 4b, 8b, 8b)`` (64 in VGG16). ``norm``: a name of
    :data:`~modalseg.models.layers.NORMS` or a factory (``norm_sets``: BN sets of ``"msbn"``).
    """

    def __init__(
        self,
        num_modalities: int = 2,
        in_channels: int = 1,
        num_classes: int = 2,
        fusion: str = "sum",
        base_width: int = 64,
        norm: Norm = "batch",
        spatial_dims: int = 2,
        norm_sets: int = 2,
    ) -> None:
        super().__init__()
        d = layers.check_spatial_dims(spatial_dims, "model fusenet")
        norm = layers.norm_factory(norm, d, num_modalities=norm_sets, what="model fusenet")
        if num_modalities < 2:
            raise ConfigError(f"model fusenet: needs num_modalities >= 2 (master + assistants), got {num_modalities}")
        if fusion not in ("sum", "concat"):
            raise ConfigError(f"model fusenet: fusion must be sum or concat, got {fusion!r}")
        if in_channels < 1 or num_classes < 1 or base_width < 1:
            raise ConfigError(
                f"model fusenet: in_channels, num_classes and base_width must be >= 1, got "
                f"{in_channels}, {num_classes}, {base_width}"
            )
        self.num_modalities = num_modalities
        self.in_channels = in_channels
        self.spatial_dims = d
        widths = [min(base_width * 2**k, base_width * 8) for k in range(len(VGG16_STAGE_CONVS))]
        self.widths = tuple(widths)
        self.fusion = Fusion(fusion)
        fused = [self.fusion.out_channels([w] * num_modalities) for w in widths]
        master_in = [in_channels, *fused[:-1]]
        assistant_in = [in_channels, *widths[:-1]]
        stages = list(zip(widths, VGG16_STAGE_CONVS, strict=True))
        self.master = nn.ModuleList(
            ConvBlock(c, w, num_convs=n, norm=norm, spatial_dims=d) for c, (w, n) in zip(master_in, stages, strict=True)
        )
        self.assistants = nn.ModuleList(
            nn.ModuleList(
                ConvBlock(c, w, num_convs=n, norm=norm, spatial_dims=d)
                for c, (w, n) in zip(assistant_in, stages, strict=True)
            )
            for _ in range(num_modalities - 1)
        )
        # SegNet decoder, deep to shallow: stage k reads the unpooled features (the fused width at the
        # deepest stage), keeps w_k and ends at w_{k-1}; the shallowest stage has one conv + the classifier.
        dec = []
        for k in reversed(range(len(widths))):
            cin = fused[k] if k == len(widths) - 1 else widths[k]
            cout = widths[k - 1] if k > 0 else widths[0]
            n = VGG16_STAGE_CONVS[k] if k > 0 else VGG16_STAGE_CONVS[0] - 1
            dec.append(ConvBlock(cin, cout, num_convs=n, mid_channels=widths[k], norm=norm, spatial_dims=d))
        self.decoder = nn.ModuleList(dec)
        self.classifier = layers.conv(d, widths[0], num_classes, 3, padding=1)
        # parameter-free: the state dict is that of the 2D-only FuseNet before the factories
        self.pool = layers.max_pool(d, 2, 2)
        self.pool_with_indices = layers.max_pool(d, 2, 2, return_indices=True)
        self.unpool = layers.max_unpool(d, 2, 2)
        self.record_attention = False
        self.attention_maps: dict[str, list[torch.Tensor]] = {}  # no SA blocks: always empty

    #: five VGG stages, each halving the size with a max-pool (the decoder unpools to each stage's own size, so
    #: sides need not be multiples of 32, but one pixel must be left at the fifth)
    min_size = 32

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Names :meth:`forward_features` can return: encoder stage outputs (before fusion and pooling) and
        decoder stage outputs, by module path (``master.k``, ``assistants.i.k``, ``decoder.j`` deep to shallow)."""
        stages = range(len(self.master))
        names = [f"master.{k}" for k in stages]
        names += [f"assistants.{i}.{k}" for i in range(len(self.assistants)) for k in stages]
        names += [f"decoder.{j}" for j in range(len(self.decoder))]
        return tuple(names)

    #: FuseNet has no side outputs (no SA blocks): ``forward_features(x)`` returns an empty dict
    default_features: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, ())[0]

    def forward_features(
        self, x: torch.Tensor, modality: int | None = None, *, layers: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the named stage outputs of one forward pass (none by default; see :attr:`feature_names`).

        ``modality`` selects the BN set of a model built with ``norm="msbn"`` for this call.
        """
        names = self.default_features if layers is None else tuple(layers)
        unknown = [n for n in names if n not in self.feature_names]
        if unknown:
            known = ", ".join(self.feature_names)
            raise ConfigError(f"model fusenet: unknown feature layer(s) {unknown}; known: {known}")
        with selected_modality(self, modality):
            return self._run(x, names)

    def _run(self, x: torch.Tensor, names: Collection[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        expected = self.num_modalities * self.in_channels
        if x.dim() != 2 + self.spatial_dims or x.shape[1] != expected:
            axes = "H, W" if self.spatial_dims == 2 else "D, H, W"
            raise ConfigError(
                f"model fusenet: expects input (B, {expected}, {axes}) = {self.num_modalities} modalities x "
                f"{self.in_channels} channels, got {tuple(x.shape)}"
            )
        want = set(names)
        feats: dict[str, torch.Tensor] = {}
        streams = torch.split(x, self.in_channels, dim=1)
        m_in, a_in = streams[0], list(streams[1:])
        last = len(self.master) - 1
        indices: list[torch.Tensor] = []
        sizes: list[torch.Size] = []
        for k in range(last + 1):
            fm = self.master[k](m_in)
            fa = [a[k](t) for a, t in zip(self.assistants, a_in, strict=True)]
            for name, value in ((f"master.{k}", fm), *((f"assistants.{i}.{k}", f) for i, f in enumerate(fa))):
                if name in want:
                    feats[name] = value
            sizes.append(fm.shape[2:])
            if self.fusion.mode == "sum":
                m_in, idx = self.pool_with_indices(self.fusion([fm, *fa]))
                if k < last:
                    a_in = [self.pool(f) for f in fa]
            elif k < last:
                # max-pooling is per channel, so pooling each part equals pooling the concatenation; the
                # decoder only needs the master part's indices here.
                pm, idx = self.pool_with_indices(fm)
                a_in = [self.pool(f) for f in fa]
                m_in = torch.cat((pm, *a_in), dim=1)
            else:
                m_in, idx = self.pool_with_indices(self.fusion([fm, *fa]))
            indices.append(idx)
        out = m_in
        for j, (stage, k) in enumerate(zip(self.decoder, reversed(range(last + 1)), strict=True)):
            out = stage(self.unpool(out, indices[k], output_size=sizes[k]))
            if f"decoder.{j}" in want:
                feats[f"decoder.{j}"] = out
        return self.classifier(out), {n: feats[n] for n in names}
