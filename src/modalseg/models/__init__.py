"""Segmentation networks of both papers, built from shared parts and registered by name with a model card.

``paper1`` registers the paired fusion family (Li et al.), ``paper2`` the unpaired backbone (Chen et al.).
Every model builds its layers through :mod:`modalseg.models.layers` (``spatial_dims`` 2 or 3, one ``norm``
vocabulary) and returns its side outputs with ``logits, features = model.forward_features(x, modality)``
(docs/models.md). 3D: per-level ``kernel_sizes``/``strides`` for anisotropic volumes, the nnU-Net-style planner
:mod:`modalseg.models.planning` (``plan_3d``) and the 3D parameter table :mod:`modalseg.models.counts3d`
(docs/3d.md).
"""

from modalseg.models import paper1, paper2  # noqa: F401  (registration side effects)
from modalseg.models.fusion import attention_maps
from modalseg.models.registry import (
    ModelCard,
    ParamCount,
    builder_options,
    create_model,
    list_models,
    model_card,
    model_cards,
    register_model,
)

__all__ = [
    "ModelCard",
    "ParamCount",
    "attention_maps",
    "builder_options",
    "create_model",
    "list_models",
    "model_card",
    "model_cards",
    "register_model",
]
