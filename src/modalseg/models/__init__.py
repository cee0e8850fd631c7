"""Segmentation networks of both papers, built from shared parts and registered by name."""

from modalseg.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
