"""The model side of paper 2's six settings for unpaired multi-modal segmentation (Sec. 3, Tables 1-3).

=========  ===============================================  ==================  ====================
setting    network                                          BN                  auxiliary loss
=========  ===============================================  ==================  ====================
single     one independent backbone per modality            own per network     none
joint      one backbone shared by all modalities            shared              none
msbn       one backbone, shared kernels                     per modality        none
ummkd      one backbone, shared kernels (Dou et al. 2020)   per modality        KD (losses.kd)
affinity   one backbone, shared kernels                     per modality        affinity, no classes
csa        one backbone, shared kernels (paper 2)           per modality        CSA (Eq. 2-4)
=========  ===============================================  ==================  ====================

Paper 2 fixes the architecture for all settings "so that different methods can be compared fairly". Each
modality's (unpaired) batch goes through its own forward pass, selecting its BN set;
``logits, features = model.forward_features(x, modality)`` returns the intermediate feature maps of the affinity
losses from that same pass: the backbone's own ``forward_features`` computes them (no hooks), named by the
paths of the modules that produce them (``group5``, ``master.blocks.3``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from modalseg.errors import ConfigError
from modalseg.models.msbn import convert_to_msbn, set_modality
from modalseg.models.registry import create_model, list_models, model_card

__all__ = ["DEFAULT_FEATURE_LAYERS", "SETTINGS", "UnpairedSegmenter", "build_unpaired_model", "feature_pairs"]

SETTINGS = ("single", "joint", "msbn", "ummkd", "affinity", "csa")
_MSBN_SETTINGS = frozenset({"msbn", "ummkd", "affinity", "csa"})
_AUX_LOSS = {"ummkd": "kd", "affinity": "affinity", "csa": "csa"}
#: Default affinity layers per backbone, from the model cards (``ModelCard.affinity_layers``). Paper 2: the
#: layers are "intermediate" and "relatively close"; group5 and group6 of the dilated FCN are consecutive groups
#: at the same 1/8 resolution (256 channels each at width 16). For paper 1's U-Net the closest intermediate pair
#: at equal resolution is the last encoder block before the bottleneck and the first decoder block (both 1/8
#: resolution, 8 x base_width channels).
DEFAULT_FEATURE_LAYERS: dict[str, tuple[str, ...]] = {
    name: model_card(name).affinity_layers for name in list_models() if model_card(name).affinity_layers
}


def feature_pairs(layers: Sequence[str]) -> list[tuple[str, str]]:
    """The layer pairs of the (CSA) affinity losses: every CONSECUTIVE pair ``(layers[i], layers[i + 1])``.

    Why consecutive (and not all pairs, nor only first and last): Fig. 4 shows three convolutional layers and
    "feature maps at multiple scales", contribution 2 speaks of "between-layer relationships at multiple
    scales", and Sec. 3 states that "the information between remote feature maps is difficult to express
    completely" and that CSA "within the closer layers is better" than between more distant ones. Chaining
    neighbours, l1-l2, l2-l3, ..., uses every configured layer and only pairs of close layers; the caller
    averages the pair losses. Two layers give the one pair of the paper's default.

    Raises ConfigError (one line) for fewer than two layers or a repeated layer (a layer's affinity with
    itself carries no between-layer relationship).
    """
    names = [str(n) for n in layers]
    if len(names) < 2:
        raise ConfigError(
            f"the affinity losses need at least two feature layers (consecutive pairs), got {names or 'none'}"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"feature layers must be distinct, {repeated} repeated in {names}")
    return list(zip(names[:-1], names[1:], strict=True))


class UnpairedSegmenter(nn.Module):
    """A backbone wrapped for one of paper 2's six settings.

    Args:
        backbone_name: a registered model: ``"dilated_fcn"`` (paper 2) or ``"unet"`` (paper 1's U-Net,
            built with ``num_modalities=1``); other registered names get ``in_channels``, ``num_classes``
            and the options.
        modalities: modality names in index order, e.g. ``["LGE", "bSSFP"]``.
        setting: one of :data:`SETTINGS`.
        num_classes: C, background included.
        in_channels: image channels per modality.
        feature_layers: names of the backbone's features (its ``feature_names``: module paths such as
            ``group5`` or ``master.blocks.3``) that :meth:`forward_features` returns; default: the card's
            ``affinity_layers`` (``("group5", "group6")`` for ``dilated_fcn``, ``("master.blocks.3",
            "decoder.ups.0")`` for ``unet``, ``master.blocks.{depth - 1}`` when it is built with another depth);
            must be given for other backbones (an empty tuple: no features).
            The affinity losses use every consecutive pair (:func:`feature_pairs`), so two or more distinct
            names (checked by the loss, so that checkpoints stay loadable).
        **backbone_options: passed to the backbone builder (e.g. ``width``, ``dropout``, ``base_width``). The
            normalisation is decided by ``setting``: msbn-type settings build the backbone with ordinary BN
            and convert every ``nn.BatchNorm2d`` with :func:`convert_to_msbn`.
    """

    def __init__(
        self,
        backbone_name: str,
        modalities: Sequence[str],
        setting: str,
        num_classes: int,
        in_channels: int = 1,
        feature_layers: Sequence[str] | None = None,
        **backbone_options: Any,
    ) -> None:
        super().__init__()
        if setting not in SETTINGS:
            raise ConfigError(f"unknown unpaired setting {setting!r}; known: {', '.join(SETTINGS)}")
        modalities = [str(m) for m in modalities]
        if not modalities or len(set(modalities)) != len(modalities):
            raise ConfigError(f"modalities must be a non-empty list of distinct names, got {modalities}")
        for key in ("norm", "num_modalities", "in_channels", "num_classes"):
            if key in backbone_options:
                raise ConfigError(
                    f"backbone option {key!r} is set by the unpaired wrapper (setting {setting!r}); remove it"
                )
        self.backbone_name = backbone_name
        self.modalities = modalities
        self.setting = setting
        self.num_classes = num_classes
        self.in_channels = in_channels
        default_layers = feature_layers is None
        if feature_layers is None:
            feature_layers = model_card(backbone_name).affinity_layers
        self.feature_layers = tuple(feature_layers)
        if self.needs_features and not self.feature_layers:
            raise ConfigError(
                f"setting {setting!r} needs feature_layers for backbone {backbone_name!r} (two layer names)"
            )

        n_nets = len(modalities) if setting == "single" else 1
        nets = [self._build_backbone(backbone_options) for _ in range(n_nets)]
        if setting in _MSBN_SETTINGS:
            nets = [convert_to_msbn(net, len(modalities)) for net in nets]
        self.networks = nn.ModuleList(nets)

        net = self.networks[0]
        depth_aware = getattr(net, "affinity_layers", None)
        if default_layers and self.feature_layers and depth_aware:
            # the card's pair is for the default depth 4; a shallower or deeper U-Net (a 3D plan) has its own
            self.feature_layers = tuple(depth_aware)
        if not callable(getattr(net, "forward_features", None)):
            raise ConfigError(f"backbone {backbone_name!r} has no forward_features (it cannot give features)")
        known = tuple(getattr(net, "feature_names", ()))
        missing = [name for name in self.feature_layers if name not in known]
        if missing:
            raise ConfigError(
                f"backbone {backbone_name!r} has no layer(s) {missing}; its feature layers: {', '.join(known)}"
            )

    def _build_backbone(self, options: Mapping[str, Any]) -> nn.Module:
        opts = dict(options)
        if self.backbone_name == "dilated_fcn":
            opts.update(norm="batch", num_modalities=1)
        elif self.backbone_name == "unet":
            opts.update(num_modalities=1)
        try:
            return create_model(
                self.backbone_name, in_channels=self.in_channels, num_classes=self.num_classes, **opts
            )
        except TypeError as exc:
            raise ConfigError(
                f"backbone {self.backbone_name!r}: invalid options {sorted(options)} ({exc})"
            ) from None

    # -- properties the trainer uses -------------------------------------------------------------------------
    @property
    def uses_msbn(self) -> bool:
        """Whether BN statistics and affine parameters are kept per modality."""
        return self.setting in _MSBN_SETTINGS

    @property
    def auxiliary_loss(self) -> str | None:
        """``"kd"``, ``"affinity"``, ``"csa"`` or ``None``: the extra loss the setting trains with."""
        return _AUX_LOSS.get(self.setting)

    @property
    def needs_features(self) -> bool:
        """Whether the setting's loss needs the intermediate feature maps."""
        return self.setting in ("affinity", "csa")

    @property
    def feature_pairs(self) -> list[tuple[str, str]]:
        """Consecutive pairs of :attr:`feature_layers` (see :func:`feature_pairs`); ConfigError if < 2 layers."""
        return feature_pairs(self.feature_layers)

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def size_multiple(self) -> int:
        """The backbone's: input sides must be multiples of it (see ``modalseg.training.inference``)."""
        return max(int(getattr(net, "size_multiple", 1)) for net in self.networks)

    @property
    def min_size(self) -> int:
        """The backbone's smallest input side."""
        return max(int(getattr(net, "min_size", 1)) for net in self.networks)

    @property
    def min_shape(self) -> tuple[int, ...] | None:
        """The backbone's smallest side per axis (U-Net backbones with per-axis ``strides``), else ``None``."""
        shape = getattr(self.networks[0], "min_shape", None)
        return tuple(int(s) for s in shape) if shape is not None else None

    def modality_index(self, modality: int | str) -> int:
        """Index of a modality given by index or name."""
        if isinstance(modality, str):
            if modality not in self.modalities:
                raise ConfigError(f"unknown modality {modality!r}; known: {', '.join(self.modalities)}")
            return self.modalities.index(modality)
        index = int(modality)
        if not 0 <= index < len(self.modalities):
            raise ConfigError(f"modality index {index} out of range for modalities {self.modalities}")
        return index

    def network(self, modality: int | str) -> nn.Module:
        """The backbone that serves ``modality``, with its BN set selected (for export or inspection)."""
        index = self.modality_index(modality)
        net = self.networks[index if self.setting == "single" else 0]
        if self.uses_msbn:
            set_modality(net, index)
        return net

    def forward(
        self, x: torch.Tensor, modality: int | str, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (B, C, *spatial) for a batch of one modality.

        All images of ``x`` must be of ``modality`` (MSBN normalises the batch with that modality's moments).
        ``return_features=True`` is the old spelling of :meth:`forward_features` (kept for its callers).
        """
        if return_features:
            return self.forward_features(x, modality)
        return self.network(modality)(x)

    def forward_features(
        self, x: torch.Tensor, modality: int | str | None = None, *, layers: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the affinity features (:attr:`feature_layers`, or ``layers``) of one forward pass.

        ``modality`` (index or name) selects the network and BN set; it may be left out only when there is a
        single modality. The features keep their gradients (the affinity losses train through them).
        """
        if modality is None:
            if len(self.modalities) != 1:
                raise ConfigError(f"forward_features needs a modality (one of {', '.join(self.modalities)})")
            modality = 0
        net = self.network(modality)
        return net.forward_features(x, layers=self.feature_layers if layers is None else tuple(layers))

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone_name!r}, setting={self.setting!r}, modalities={self.modalities}, "
            f"feature_layers={self.feature_layers}"
        )


_CFG_KEYS = {"backbone", "modalities", "setting", "num_classes", "in_channels", "feature_layers", "options"}


def build_unpaired_model(cfg: Mapping[str, Any]) -> UnpairedSegmenter:
    """Build an :class:`UnpairedSegmenter` from a config mapping.

    Keys: ``backbone`` (default ``"dilated_fcn"``), ``modalities`` (required), ``setting`` (required),
    ``num_classes`` (required), ``in_channels`` (1), ``feature_layers`` (backbone default), ``options``
    (dict of backbone options, e.g. ``{"width": 16, "dropout": 0.25}``).
    """
    unknown = sorted(set(cfg) - _CFG_KEYS)
    if unknown:
        raise ConfigError(f"unknown unpaired model key(s) {unknown}; known: {', '.join(sorted(_CFG_KEYS))}")
    missing = [k for k in ("modalities", "setting", "num_classes") if k not in cfg]
    if missing:
        raise ConfigError(f"unpaired model config is missing {missing}")
    options = cfg.get("options") or {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"unpaired model 'options' must be a mapping, got {type(options).__name__}")
    feature_layers = cfg.get("feature_layers")
    return UnpairedSegmenter(
        str(cfg.get("backbone", "dilated_fcn")),
        list(cfg["modalities"]),
        str(cfg["setting"]),
        int(cfg["num_classes"]),
        in_channels=int(cfg.get("in_channels", 1)),
        feature_layers=tuple(feature_layers) if feature_layers is not None else None,
        **dict(options),
    )
