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
modality's (unpaired) batch goes through its own forward pass, selecting its BN set; intermediate feature maps
for the affinity losses are captured by forward hooks registered once on the named layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from modalseg.errors import ConfigError
from modalseg.models.msbn import convert_to_msbn, set_modality
from modalseg.models.registry import create_model

__all__ = ["SETTINGS", "UnpairedSegmenter", "build_unpaired_model", "feature_pairs"]

SETTINGS = ("single", "joint", "msbn", "ummkd", "affinity", "csa")
_MSBN_SETTINGS = frozenset({"msbn", "ummkd", "affinity", "csa"})
_AUX_LOSS = {"ummkd": "kd", "affinity": "affinity", "csa": "csa"}
# Paper 2: affinity layers are "intermediate" and "relatively close"; group5 and group6 of the dilated FCN are
# consecutive groups at the same 1/8 resolution (256 channels each at width 16). For paper 1's U-Net the
# closest intermediate pair at equal resolution is the last encoder block before the bottleneck and the first
# decoder block (both 1/8 resolution, 8 x base_width channels).
DEFAULT_FEATURE_LAYERS: dict[str, tuple[str, ...]] = {
    "dilated_fcn": ("group5", "group6"),
    "unet": ("master.blocks.3", "decoder.ups.0"),
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


class _TapState:
    """Shared, deep-copyable store the feature hooks write into (no closures over the model)."""

    def __init__(self) -> None:
        self.active = False
        self.features: dict[str, torch.Tensor] = {}


class _FeatureTap:
    """Forward hook recording one module's output under ``name`` while capture is on."""

    def __init__(self, state: _TapState, name: str) -> None:
        self.state, self.name = state, name

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if self.state.active:
            self.state.features[self.name] = output


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
        feature_layers: module names (as in ``named_modules()``) whose outputs ``forward(...,
            return_features=True)`` returns; default ``("group5", "group6")`` for ``dilated_fcn`` and
            ``("master.blocks.3", "decoder.ups.0")`` for ``unet``; must be given for other backbones (an empty
            tuple disables the taps). The affinity losses use every consecutive pair (:func:`feature_pairs`),
            so two or more distinct names (checked by the loss, so that checkpoints stay loadable).
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
        if feature_layers is None:
            feature_layers = DEFAULT_FEATURE_LAYERS.get(backbone_name, ())
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

        self._taps = _TapState()
        for net in self.networks:
            named = dict(net.named_modules())
            missing = [name for name in self.feature_layers if name not in named]
            if missing:
                candidates = ", ".join(n for n, _ in net.named_children())
                raise ConfigError(
                    f"backbone {backbone_name!r} has no layer(s) {missing}; top-level layers: {candidates} "
                    "(any name from named_modules() is accepted)"
                )
            for name in self.feature_layers:
                named[name].register_forward_hook(_FeatureTap(self._taps, name))

    def _build_backbone(self, options: Mapping[str, Any]) -> nn.Module:
        opts = dict(options)
        if self.backbone_name == "dilated_fcn":
            opts.update(norm="bn", num_modalities=1)
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
        """Logits (B, C, H, W) for a batch of one modality; with ``return_features`` also the tapped maps.

        All images of ``x`` must be of ``modality`` (MSBN normalises the batch with that modality's moments).
        """
        net = self.network(modality)
        if not return_features:
            return net(x)
        self._taps.features = {}
        self._taps.active = True
        try:
            logits = net(x)
        finally:
            self._taps.active = False
            features, self._taps.features = self._taps.features, {}
        missing = [n for n in self.feature_layers if n not in features]
        if missing:
            raise RuntimeError(f"feature layer(s) {missing} were not executed in the forward pass")
        return logits, {n: features[n] for n in self.feature_layers}

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
