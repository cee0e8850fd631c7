"""Model registry: ``@register_model(name)`` on a builder, ``create_model(name, **kwargs)`` to build.

Builders are plain functions returning an ``nn.Module``; every model of both papers is a configuration
of shared parts registered here by name (compare timm's ``create_model``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from modalseg.errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_model(name: str, description: str = "") -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model builder under ``name``."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = builder
        doc_lines = (builder.__doc__ or "").strip().splitlines()
        _DESCRIPTIONS[name] = description or (doc_lines[0] if doc_lines else "")
        return builder

    return decorator


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build a registered model. Unknown names raise :class:`ConfigError` listing the known ones."""
    _ensure_loaded()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def model_description(name: str) -> str:
    _ensure_loaded()
    return _DESCRIPTIONS.get(name, "")


def _ensure_loaded() -> None:
    # Importing the model modules registers their builders.
    import modalseg.models  # noqa: F401
