"""Paper 2 (Chen et al.) unpaired backbone(s) and modality-specific batch norm: registration with its card.

``create_model("dilated_fcn", in_channels=1, num_classes=4, num_modalities=2, norm="msbn")`` builds the
UMMKD-style dilated residual FCN (36,979,408 trainable parameters in that configuration; 39,342,552 for five
classes: the card's counts). The six training settings of paper 2 wrap a backbone in
:class:`modalseg.models.unpaired.UnpairedSegmenter`.
"""

from __future__ import annotations

from modalseg.models.dilated_fcn import DEFAULT_FEATURES, DilatedFCN
from modalseg.models.registry import ModelCard, ParamCount, register_model

__all__ = ["DILATED_FCN_CARD"]

_MSBN_TWO = (("in_channels", 1), ("num_modalities", 2), ("norm", "msbn"))

#: The card of paper 2's backbone. The paper prints no parameter count; the reconstructed counts are the
#: reference facts' (UMMKD 2D network, two BN sets, one input channel; MS-CMRSeg C=4, MM-WHS C=5).
DILATED_FCN_CARD = ModelCard(
    name="dilated_fcn",
    paper="paper2",
    family="dilated_fcn",
    inputs="unpaired",
    description="Paper 2 backbone: dilated residual FCN (UMMKD 2D), output stride 8, pixel-shuffle head; MSBN or BN.",
    default_width=16,
    width_option="width",
    counts=(
        ParamCount((*_MSBN_TWO, ("num_classes", 4)), 36_979_408, None, "MS-CMRSeg"),
        ParamCount((*_MSBN_TWO, ("num_classes", 5)), 39_342_552, None, "MM-WHS"),
    ),
    affinity_layers=DEFAULT_FEATURES,
)

# The class is the builder: its signature and defaults are the one source of the model's options.
register_model(DILATED_FCN_CARD)(DilatedFCN)
