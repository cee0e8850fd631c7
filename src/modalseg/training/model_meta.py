"""What a trained network is (``ModelMeta``, stored in every checkpoint) and how to rebuild it.

Kept apart from :mod:`modalseg.training.tasks` (the training losses) so that loading a checkpoint for
``modalseg predict`` imports neither the losses nor MONAI (about 1.2 s of the command's start-up).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from modalseg.data.types import IGNORE_INDEX, DatasetSpec, paint_regions
from modalseg.errors import ConfigError

if TYPE_CHECKING:  # the models (torch) are imported where a network is built: ModelMeta is plain data
    from torch import nn

__all__ = ["ModelMeta", "build_network", "check_missing", "decode_outputs", "paint_regions", "regions_of",
           "paired_channels", "single_modality_models"]

#: Fields added after the first release, with their defaults: left out of ``to_dict`` while at the default, so a
#: model without them writes the very description older releases wrote (and ``--resume`` compares equal).
_OPTIONAL_FIELDS: dict[str, Any] = {"regions": None, "ignore_label": None, "modality_dropout": None,
                                     "patch_size": None, "context_slices": 0}


def single_modality_models() -> frozenset[str]:
    """Models that see one modality (paper 1: U-Net and U-Net + SA are trained on T1C only): the registered models
    whose card says ``inputs="single"``. A function (``SINGLE_MODALITY_MODELS`` is computed on first use) because it
    needs the model registry, hence torch, which ``ModelMeta`` itself does not (the exported-model runtime)."""
    from modalseg.models import list_models

    return frozenset(list_models(inputs="single"))


def __getattr__(name: str) -> Any:
    if name == "SINGLE_MODALITY_MODELS":
        return single_modality_models()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to rebuild a trained network (stored in checkpoints; plain types only).

    ``labels`` names the network's output channels in order, each with its label value: every class (background
    first; softmax, argmax -> value) or, for a region-based model (``regions`` set), one sigmoid channel per
    region -> the value painted for it (nnU-Net's ``regions_class_order``; no background channel). ``regions``:
    region name -> the label values it unites (the training target). ``ignore_label``: the file value of
    nnU-Net's ``ignore`` label in the training data (recorded; never a class, never predicted).
    ``modality_dropout``: modality -> the probability with which training dropped (zeroed) it, for the modalities
    it dropped; None: trained with every modality always present (and every checkpoint written before the option
    existed). Only such a model predicts with modalities missing (:func:`check_missing`).
    ``patch_size``: a 3D network's training patch ``(d, h, w)``, the window of its sliding-window inference (its
    topology, ``spatial_dims=3`` with the planned ``kernel_sizes`` / ``strides``, is in ``model_options``).
    ``context_slices``: a 2.5D network reads each slice with this many neighbours on either side as extra channels
    of every modality (``in_channels = 2 * context_slices + 1``).
    """

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
    #: region-based model: region name (= ``labels`` key) -> its label values; None: softmax classes
    regions: dict[str, list[int]] | None = None
    #: file value of nnU-Net's ignore label in the training data (None: none)
    ignore_label: int | None = None
    #: paired: modality -> drop probability in training (modality dropout); None: never dropped
    modality_dropout: dict[str, float] | None = None
    #: 3D: training patch / inference window (d, h, w); None: a 2D network
    patch_size: list[int] | None = None
    #: 2.5D: neighbouring slices on either side fed as extra channels per modality
    context_slices: int = 0

    @property
    def spatial_dims(self) -> int:
        """2 (slice networks, 2.5D included) or 3."""
        return int(self.model_options.get("spatial_dims", 2))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in _OPTIONAL_FIELDS or v != _OPTIONAL_FIELDS[k]}

    @property
    def activation(self) -> str:
        """``"sigmoid"`` (one independent probability per region) or ``"softmax"`` (classes)."""
        return "sigmoid" if self.regions is not None else "softmax"

    @property
    def ignore_index(self) -> int | None:
        """The value of ignored voxels in cached (validation) label maps, or None."""
        return IGNORE_INDEX if self.ignore_label is not None else None

    def scored_classes(self) -> dict[str, tuple[int, ...]]:
        """Foreground class or region name -> the values of validation label maps it covers: the class index
        (softmax models), or the region's label values (region models, whose cache keeps label values)."""
        if self.regions is not None:
            return {name: tuple(int(v) for v in values) for name, values in self.regions.items()}
        return {name: (index,) for index, name in enumerate(self.labels) if index > 0}

    def scoring(self) -> dict[str, Any]:
        """Keyword options of :func:`modalseg.training.inference.foreground_dice_per_group` for this model's
        validation: nothing for plain classes without ignore (the scoring as it always was)."""
        options: dict[str, Any] = {}
        if self.regions is not None:
            options["classes"] = list(self.scored_classes().values())
        if self.ignore_index is not None:
            options["ignore_index"] = self.ignore_index
        return options

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelMeta:
        return cls(**d)

    def describe(self) -> str:
        what = self.model if self.kind == "paired" else f"{self.model}/{self.setting}"
        outputs = f"{self.num_classes} regions" if self.regions is not None else f"{self.num_classes} classes"
        return f"({what}, {outputs}, modalities {', '.join(self.modalities)})"


def check_missing(meta: ModelMeta, missing: Sequence[str] | None, *, trained_only: bool = True) -> list[str]:
    """``missing`` (modality names, case-insensitive) in the model's channel order, if the model may predict
    without them: a paired model trained with modality dropout that dropped each of them, and one modality left.
    Else one ConfigError line saying why (a model trained without dropout never saw a blank channel, so its
    output without one is not to be trusted). ``trained_only=False`` drops the dropout condition, for measuring
    what such a model does (the robustness table, which marks those rows); ``predict --missing`` never does."""
    if not missing:
        return []
    by_fold = {m.casefold(): m for m in meta.modalities}
    names = []
    for name in missing:
        if name.casefold() not in by_fold:
            raise ConfigError(f"missing modality {name!r} is not one of the model's ({', '.join(meta.modalities)})")
        names.append(by_fold[name.casefold()])
    ordered = [m for m in meta.modalities if m in names]
    if meta.kind != "paired":
        raise ConfigError("missing modalities apply to paired models (one input per modality); an unpaired model "
                          "reads one modality, chosen with --modality")
    if trained_only:
        _check_trained_for(meta, ordered)
    if len(ordered) == len(meta.modalities):
        raise ConfigError(f"every modality of the model ({', '.join(meta.modalities)}) is missing; at least one "
                          "must be given")
    return ordered


def _check_trained_for(meta: ModelMeta, ordered: list[str]) -> None:
    """Refuse (one line) unless modality dropout dropped each of ``ordered`` in training."""
    dropped = meta.modality_dropout or {}
    if not dropped:
        raise ConfigError(f"this model was not trained with modality dropout, so it cannot predict without "
                          f"{', '.join(ordered)}: it needs every modality ({', '.join(meta.modalities)}); retrain "
                          "with modality_dropout to predict with modalities missing")
    never = [m for m in ordered if dropped.get(m, 0.0) <= 0]
    if never:
        trained = ", ".join(f"{m} {p:g}" for m, p in dropped.items())
        raise ConfigError(f"this model was trained with {', '.join(never)} always present (modality dropout: "
                          f"{trained}), so it cannot predict without {', '.join(never)}")


def decode_outputs(probs: np.ndarray, meta: ModelMeta, axis: int = 1) -> np.ndarray:
    """Probabilities (classes or regions on ``axis``) -> the label map validation scores: class indices (argmax)
    for softmax models, the painted label values for region models (the values their cache holds)."""
    if meta.regions is None:
        return probs.argmax(axis).astype(np.uint8)
    return paint_regions(probs, list(meta.labels.values()), axis=axis)


def build_network(meta: ModelMeta) -> nn.Module:
    """Rebuild the network described by ``meta`` (weights freshly initialised)."""
    from modalseg.models import create_model
    from modalseg.models.unpaired import UnpairedSegmenter

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


def regions_of(spec: DatasetSpec) -> dict[str, list[int]] | None:
    """The dataset's regions as the model description stores them (plain lists), or None."""
    if spec.regions is None:
        return None
    return {name: [int(v) for v in values] for name, values in spec.regions.items()}


def paired_channels(spec: DatasetSpec, model: str, modalities: list[str] | None) -> list[str]:
    """Modalities a paired model uses, master first (single-modality models: the first channel)."""
    if modalities is None:
        modalities = spec.modalities[:1] if model in single_modality_models() else list(spec.modalities)
    unknown = [m for m in modalities if m not in spec.modalities]
    if unknown:
        raise ConfigError(f"modalities {unknown} not in the dataset's channels {spec.modalities}")
    return list(modalities)
