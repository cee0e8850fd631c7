"""Paper 1 (Li et al.) paired fusion models: registration of the ten Table 1 configurations.

Every builder takes ``num_modalities`` (master first), ``in_channels`` (per modality), ``num_classes`` and
keyword options:

- ``base_width``: width of the first encoder block; widths double per level. Default 64 for U-Net,
  U-Net + SA, EarlyFuseUNet, FuseOriginUNet and FuseNet; 32 (half width) for LateFuseUNet, FuseUNet,
  FuseUNet + SA and the proposed network.
- ``depth``: number of poolings (default 4; FuseNet's VGG16 encoder has 5 stages and accepts only 5).
- ``sa_reduction`` (r, default 16), ``sa_dilation`` (d, default 4): the SA block of Fig. 3b.
- ``assistant_from_sa`` (default True): assistant block k+1 reads the SA-gated assistant features (the SA
  block sits "before each pooling layer"); False: the ungated ones. Same parameter count either way.
- ``norm``: normalisation factory ``channels -> nn.Module`` or a name from :data:`NORM_LAYERS`
  ("batch", "instance", "group"; default ``nn.BatchNorm2d``).

Options that a model does not use (e.g. ``sa_reduction`` for FuseUNet) are accepted and ignored, so one
``model_options`` mapping can serve a whole Table 1 sweep; unknown names raise :class:`ConfigError`.
See :mod:`modalseg.models.fusion` for the layouts and how widths grow with more than two modalities.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from modalseg.errors import ConfigError
from modalseg.models.fusenet import FuseNet
from modalseg.models.fusion import FusionConfig, FusionUNet
from modalseg.models.registry import register_model

__all__ = ["PAPER1_TABLE1_PARAMS", "PAPER1_RECONSTRUCTED_PARAMS", "PAPER1_TABLE1_ROWS", "PAPER1_MODELS"]

#: Paper 1 Table 1's "Number of parameters" column, in millions (as printed).
PAPER1_TABLE1_PARAMS: dict[str, float] = {
    "unet": 34.5,
    "unet_sa": 34.7,
    "fusenet": 29.4,
    "fusenet_concat": 74.0,
    "fuse_origin_unet": 56.2,
    "early_fuse_unet": 34.5,
    "late_fuse_unet": 25.1,
    "fuse_unet": 26.7,
    "fuse_unet_sa": 26.8,
    "master_assistant": 26.7,
}

#: Counts of our builds in millions (3 input channels per modality, 2 classes, BN, two modalities).
#: All U-Net-based rows match the paper to its printed precision; the FuseNet rows do not (see fusenet.py).
PAPER1_RECONSTRUCTED_PARAMS: dict[str, float] = {
    "unet": 34.527,
    "unet_sa": 34.713,
    "fusenet": 44.167,
    "fusenet_concat": 50.434,
    "fuse_origin_unet": 56.164,
    "early_fuse_unet": 34.529,
    "late_fuse_unet": 25.108,
    "fuse_unet": 26.675,
    "fuse_unet_sa": 26.768,
    "master_assistant": 26.722,
}

#: Table 1 row label of each registered name.
PAPER1_TABLE1_ROWS: dict[str, str] = {
    "unet": "U-Net (T1C)",
    "unet_sa": "U-Net + SA (T1C)",
    "fusenet": "FuseNet",
    "fusenet_concat": "FuseNetConcate",
    "fuse_origin_unet": "FuseOriginUNet",
    "early_fuse_unet": "EarlyFuseUNet",
    "late_fuse_unet": "LateFuseUNet",
    "fuse_unet": "FuseUNet",
    "fuse_unet_sa": "FuseUNet + SA",
    "master_assistant": "Proposed",
}

PAPER1_MODELS: tuple[str, ...] = tuple(PAPER1_TABLE1_PARAMS)

_OPTIONS = ("base_width", "depth", "sa_reduction", "sa_dilation", "assistant_from_sa", "norm")


def _int_option(name: str, model: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model {model}: option {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _options(model: str, options: dict[str, Any], base_width: int) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"model {model}: unknown option(s) {', '.join(unknown)}; known: {', '.join(_OPTIONS)}")
    out = {
        "base_width": _int_option("base_width", model, options.get("base_width", base_width)),
        "depth": _int_option("depth", model, options.get("depth", 4)),
        "sa_reduction": _int_option("sa_reduction", model, options.get("sa_reduction", 16)),
        "sa_dilation": _int_option("sa_dilation", model, options.get("sa_dilation", 4)),
        "assistant_from_sa": options.get("assistant_from_sa", True),
        "norm": options.get("norm", nn.BatchNorm2d),
    }
    if not isinstance(out["assistant_from_sa"], bool):
        raise ConfigError(f"model {model}: option assistant_from_sa must be true or false")
    if isinstance(out["norm"], str):
        if out["norm"] not in NORM_LAYERS:
            known = ", ".join(NORM_LAYERS)
            raise ConfigError(f"model {model}: option norm must be one of {known}, got {out['norm']!r}")
        out["norm"] = NORM_LAYERS[out["norm"]]
    if not callable(out["norm"]):
        raise ConfigError(f"model {model}: option norm must be a name or a callable channels -> module")
    return out


def _instance_norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=True)


def _group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(min(8, channels), channels)


#: Names usable in config files for the ``norm`` option. "instance" and "group" normalise each image on its own,
#: which makes multi-process (DDP) training on CPU match single-process training exactly (BatchNorm uses per-rank
#: batch statistics under DDP; SyncBatchNorm is CUDA-only).
NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "batch": nn.BatchNorm2d,
    "instance": _instance_norm,
    "group": _group_norm,
}


def _check_modalities(model: str, num_modalities: Any, single: bool) -> int:
    n = _int_option("num_modalities", model, num_modalities)
    if single and n != 1:
        raise ConfigError(
            f"model {model}: is a single-modality network but num_modalities={n}; "
            "use early_fuse_unet to stack modalities, or a fusion model"
        )
    if not single and n < 2:
        raise ConfigError(f"model {model}: fuses modalities and needs num_modalities >= 2, got {n}")
    return n


def _fusion_builder(name: str, single: bool, default_base: int, **layout: Any) -> Callable[..., FusionUNet]:
    def build(
        num_modalities: int = 1 if single else 2, in_channels: int = 1, num_classes: int = 2, **options: Any
    ) -> FusionUNet:
        n = _check_modalities(name, num_modalities, single)
        opts = _options(name, options, default_base)
        widths = tuple(opts["base_width"] * 2**k for k in range(opts["depth"] + 1))
        config = FusionConfig(
            num_modalities=n,
            in_channels=_int_option("in_channels", name, in_channels),
            num_classes=_int_option("num_classes", name, num_classes),
            widths=widths,
            assistant_from_sa=opts["assistant_from_sa"],
            sa_reduction=opts["sa_reduction"],
            sa_dilation=opts["sa_dilation"],
            name=name,
            **layout,
        )
        return FusionUNet(config, norm=opts["norm"])

    return build


def _register(name: str, doc: str, builder: Callable[..., nn.Module]) -> None:
    builder.__doc__ = doc
    builder.__name__ = builder.__qualname__ = f"build_{name}"
    register_model(name)(builder)


_register(
    "unet",
    "U-Net (Table 1 row 1): one modality, widths 64..1024, bilinear + conv upsampling.",
    _fusion_builder("unet", True, 64),
)
_register(
    "unet_sa",
    "U-Net + SA: an SA gate after each of the 5 encoder blocks; the gated map is skip and next input.",
    _fusion_builder("unet_sa", True, 64, attention="master"),
)
_register(
    "early_fuse_unet",
    "EarlyFuseUNet: U-Net on all modalities stacked at the input.",
    _fusion_builder("early_fuse_unet", False, 64, stack_inputs=True),
)
_register(
    "late_fuse_unet",
    "LateFuseUNet: independent half-width streams, concatenated only at the skips and the bottleneck.",
    _fusion_builder("late_fuse_unet", False, 32, fusion="concat"),
)
_register(
    "fuse_origin_unet",
    "FuseOriginUNet: full-width streams, master block k+1 reads concat(master_k, assistants_k); "
    "decoder on the master's skips; transposed-conv upsampling.",
    # The reconstructed 56.164M includes the assistants' deepest block; paper 1 does not say what it
    # feeds. Rather than leave ~14M parameters dead we add it into the master's bottleneck (parameter-free,
    # FuseNet-style sum), so every parameter is trained.
    _fusion_builder(
        "fuse_origin_unet",
        False,
        64,
        fusion="concat",
        fuse_into_master=True,
        skip_source="master",
        bottleneck="sum",
        upsample="transpose",
    ),
)
_register(
    "fuse_unet",
    "FuseUNet: half-width streams; y_k = concat(master_k, assistants_k) is skip k and next master input.",
    _fusion_builder("fuse_unet", False, 32, fusion="concat", fuse_into_master=True),
)
_register(
    "fuse_unet_sa",
    "FuseUNet + SA: every stream gated by its own SA map at each of the 5 encoder blocks.",
    _fusion_builder("fuse_unet_sa", False, 32, fusion="concat", fuse_into_master=True, attention="per_stream"),
)
_register(
    "master_assistant",
    "Proposed (paper 1): FuseUNet whose master SA maps gate the master and every assistant stream.",
    _fusion_builder("master_assistant", False, 32, fusion="concat", fuse_into_master=True, attention="master"),
)


def _fusenet_builder(name: str, fusion: str) -> Callable[..., FuseNet]:
    def build(num_modalities: int = 2, in_channels: int = 1, num_classes: int = 2, **options: Any) -> FuseNet:
        n = _check_modalities(name, num_modalities, False)
        opts = _options(name, options, 64)
        if "depth" in options and opts["depth"] != 5:
            raise ConfigError(f"model {name}: the VGG16 encoder has 5 stages; depth must be 5, got {opts['depth']}")
        return FuseNet(
            num_modalities=n,
            in_channels=_int_option("in_channels", name, in_channels),
            num_classes=_int_option("num_classes", name, num_classes),
            fusion=fusion,
            base_width=opts["base_width"],
            norm=opts["norm"],
        )

    return build


_register(
    "fusenet",
    "FuseNet (Hazirbas et al.): two VGG16-BN encoders, assistant summed into the master after each stage, "
    "SegNet decoder.",
    _fusenet_builder("fusenet", "sum"),
)
_register(
    "fusenet_concat",
    "FuseNetConcate: FuseNet with channel concatenation instead of summation.",
    _fusenet_builder("fusenet_concat", "concat"),
)
