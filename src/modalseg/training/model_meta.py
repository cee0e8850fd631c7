"""What a trained network is (``ModelMeta``, stored in every checkpoint) and how to rebuild it.

Kept apart from :mod:`modalseg.training.tasks` (the training losses) so that loading a checkpoint for
``modalseg predict`` imports neither the losses nor MONAI (about 1.2 s of the command's start-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from modalseg.data.types import DatasetSpec
from modalseg.errors import ConfigError
from modalseg.models import create_model, list_models
from modalseg.models.unpaired import UnpairedSegmenter

__all__ = ["SINGLE_MODALITY_MODELS", "ModelMeta", "build_network", "paired_channels"]

#: Models that see one modality (paper 1: U-Net and U-Net + SA are trained on T1C only): the registered models
#: whose card says ``inputs="single"``.
SINGLE_MODALITY_MODELS = frozenset(list_models(inputs="single"))


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to rebuild a trained network (stored in checkpoints; plain types only)."""

    kind: str  # "paired" | "unpaired"
    model: str
    model_options: dict
    modalities: list[str]
    num_classes: int
    labels: dict[str, int]
    preprocess: dict
    setting: str | None = None
    feature_layers: list[str] | None = None
    in_channels: int = 1
    #: the dataset's channel names (paired: file ``CASE_000k`` holds ``channel_names[k]``)
    channel_names: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelMeta:
        return cls(**d)

    def describe(self) -> str:
        what = self.model if self.kind == "paired" else f"{self.model}/{self.setting}"
        return f"({what}, {self.num_classes} classes, modalities {', '.join(self.modalities)})"


def build_network(meta: ModelMeta) -> nn.Module:
    """Rebuild the network described by ``meta`` (weights freshly initialised)."""
    if meta.kind == "paired":
        return create_model(
            meta.model,
            num_modalities=len(meta.modalities),
            in_channels=meta.in_channels,
            num_classes=meta.num_classes,
            **meta.model_options,
        )
    kwargs: dict[str, Any] = dict(meta.model_options)
    if meta.feature_layers:
        kwargs["feature_layers"] = tuple(meta.feature_layers)
    return UnpairedSegmenter(
        meta.model,
        list(meta.modalities),
        meta.setting or "csa",
        num_classes=meta.num_classes,
        in_channels=meta.in_channels,
        **kwargs,
    )


def paired_channels(spec: DatasetSpec, model: str, modalities: list[str] | None) -> list[str]:
    """Modalities a paired model uses, master first (single-modality models: the first channel)."""
    if modalities is None:
        modalities = spec.modalities[:1] if model in SINGLE_MODALITY_MODELS else list(spec.modalities)
    unknown = [m for m in modalities if m not in spec.modalities]
    if unknown:
        raise ConfigError(f"modalities {unknown} not in the dataset's channels {spec.modalities}")
    return list(modalities)
