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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modalseg.errors import ConfigError
from modalseg.models.blocks import ConvBlock, NormFactory
from modalseg.models.fusion import Fusion

__all__ = ["FuseNet", "VGG16_STAGE_CONVS"]

VGG16_STAGE_CONVS = (2, 2, 3, 3, 3)


class FuseNet(nn.Module):
    """FuseNet with ``fusion="sum"`` (Hazirbas et al.) or ``"concat"`` (paper 1's FuseNetConcate).

    Input ``(B, num_modalities * in_channels, H, W)``, master first; logits ``(B, num_classes, H, W)``.
    ``base_width`` scales the VGG widths ``(b, 2b, 4b, 8b, 8b)`` (64 in VGG16).
    """

    def __init__(
        self,
        num_modalities: int = 2,
        in_channels: int = 1,
        num_classes: int = 2,
        fusion: str = "sum",
        base_width: int = 64,
        norm: NormFactory = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
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
        widths = [min(base_width * 2**k, base_width * 8) for k in range(len(VGG16_STAGE_CONVS))]
        self.widths = tuple(widths)
        self.fusion = Fusion(fusion)
        fused = [self.fusion.out_channels([w] * num_modalities) for w in widths]
        master_in = [in_channels, *fused[:-1]]
        assistant_in = [in_channels, *widths[:-1]]
        stages = list(zip(widths, VGG16_STAGE_CONVS, strict=True))
        self.master = nn.ModuleList(
            ConvBlock(c, w, num_convs=n, norm=norm) for c, (w, n) in zip(master_in, stages, strict=True)
        )
        self.assistants = nn.ModuleList(
            nn.ModuleList(
                ConvBlock(c, w, num_convs=n, norm=norm) for c, (w, n) in zip(assistant_in, stages, strict=True)
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
            dec.append(ConvBlock(cin, cout, num_convs=n, mid_channels=widths[k], norm=norm))
        self.decoder = nn.ModuleList(dec)
        self.classifier = nn.Conv2d(widths[0], num_classes, kernel_size=3, padding=1)
        self.record_attention = False
        self.attention_maps: dict[str, list[torch.Tensor]] = {}  # no SA blocks: always empty

    #: five VGG stages, each halving the size with a max-pool (the decoder unpools to each stage's own size, so
    #: sides need not be multiples of 32, but one pixel must be left at the fifth)
    min_size = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = self.num_modalities * self.in_channels
        if x.dim() != 4 or x.shape[1] != expected:
            raise ConfigError(
                f"model fusenet: expects input (B, {expected}, H, W) = {self.num_modalities} modalities x "
                f"{self.in_channels} channels, got {tuple(x.shape)}"
            )
        streams = torch.split(x, self.in_channels, dim=1)
        m_in, a_in = streams[0], list(streams[1:])
        last = len(self.master) - 1
        indices: list[torch.Tensor] = []
        sizes: list[torch.Size] = []
        for k in range(last + 1):
            fm = self.master[k](m_in)
            fa = [a[k](t) for a, t in zip(self.assistants, a_in, strict=True)]
            sizes.append(fm.shape[-2:])
            if self.fusion.mode == "sum":
                m_in, idx = F.max_pool2d(self.fusion([fm, *fa]), 2, 2, return_indices=True)
                if k < last:
                    a_in = [F.max_pool2d(f, 2, 2) for f in fa]
            elif k < last:
                # max-pooling is per channel, so pooling each part equals pooling the concatenation; the
                # decoder only needs the master part's indices here.
                pm, idx = F.max_pool2d(fm, 2, 2, return_indices=True)
                a_in = [F.max_pool2d(f, 2, 2) for f in fa]
                m_in = torch.cat((pm, *a_in), dim=1)
            else:
                m_in, idx = F.max_pool2d(self.fusion([fm, *fa]), 2, 2, return_indices=True)
            indices.append(idx)
        out = m_in
        for stage, k in zip(self.decoder, reversed(range(last + 1)), strict=True):
            out = stage(F.max_unpool2d(out, indices[k], 2, 2, output_size=sizes[k]))
        return self.classifier(out)
