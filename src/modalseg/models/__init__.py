"""Segmentation networks of both papers, built from shared parts and registered by name.

``paper1`` registers the paired fusion family (Li et al.), ``paper2`` the unpaired backbone (Chen et al.).
"""

from modalseg.models import paper1, paper2  # noqa: F401  (registration side effects)
from modalseg.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
