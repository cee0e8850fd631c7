"""Paper 2 (Chen et al.) unpaired backbone(s) and modality-specific batch norm: registration.

``create_model("dilated_fcn", in_channels=1, num_classes=4, num_modalities=2, norm="msbn")`` builds the
UMMKD-style dilated residual FCN (36,979,408 trainable parameters in that configuration). The six training
settings of paper 2 wrap a backbone in :class:`modalseg.models.unpaired.UnpairedSegmenter`.
"""

from __future__ import annotations

from torch import nn

from modalseg.models.dilated_fcn import DilatedFCN
from modalseg.models.registry import register_model


@register_model("dilated_fcn")
def dilated_fcn(
    in_channels: int = 1,
    num_classes: int = 4,
    num_modalities: int = 2,
    norm: str = "msbn",
    width: int = 16,
    dropout: float = 0.25,
    negative_slope: float = 0.2,
) -> nn.Module:
    """Paper 2 backbone: dilated residual FCN (UMMKD 2D), output stride 8, pixel-shuffle head; MSBN or BN."""
    return DilatedFCN(
        in_channels=in_channels,
        num_classes=num_classes,
        num_modalities=num_modalities,
        norm=norm,
        width=width,
        dropout=dropout,
        negative_slope=negative_slope,
    )
