"""Paper 2 (Chen et al.) unpaired backbone(s) and modality-specific batch norm: registration.

``create_model("dilated_fcn", in_channels=1, num_classes=4, num_modalities=2, norm="msbn")`` builds the
UMMKD-style dilated residual FCN (36,979,408 trainable parameters in that configuration). The six training
settings of paper 2 wrap a backbone in :class:`modalseg.models.unpaired.UnpairedSegmenter`.
"""

from __future__ import annotations

from modalseg.models.dilated_fcn import DilatedFCN
from modalseg.models.registry import register_model

# The class is the builder: its signature and defaults are the one source of the model's options.
register_model(
    "dilated_fcn",
    "Paper 2 backbone: dilated residual FCN (UMMKD 2D), output stride 8, pixel-shuffle head; MSBN or BN.",
)(DilatedFCN)
