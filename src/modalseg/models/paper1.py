"""Paper 1 (Li et al.) paired fusion models: the ten Table 1 configurations, each registered with its card.

Every builder takes ``num_modalities`` (master first), ``in_channels`` (per modality), ``num_classes`` and
keyword options (:data:`PAPER1_OPTIONS`):

- ``base_width``: width of the first encoder block; widths double per level. Default (the card's
  ``default_width``) 64 for U-Net, U-Net + SA, EarlyFuseUNet, FuseOriginUNet and FuseNet; 32 (half width) for
  LateFuseUNet, FuseUNet, FuseUNet + SA and the proposed network.
- ``depth``: number of poolings (default 4; FuseNet's VGG16 encoder has 5 stages and accepts only 5).
- ``sa_reduction`` (r, default 16), ``sa_dilation`` (d, default 4): the SA block of Fig. 3b.
- ``assistant_from_sa`` (default True): assistant block k+1 reads the SA-gated assistant features (the SA
  block sits "before each pooling layer"); False: the ungated ones. Same parameter count either way.
- ``norm``: a name of :data:`modalseg.models.layers.NORMS` ("batch" default, "instance", "group", "msbn",
  "none") or a factory ``channels -> nn.Module``; ``norm_sets``: BN sets of "msbn" (default 2).
- ``spatial_dims``: 2 (default, the paper's networks) or 3.
- ``kernel_sizes`` (one per encoder level, ``depth + 1``) and ``strides`` (one per pooling, ``depth``): per-level
  conv kernels and pooling steps, each an int or one int per axis (``[[1, 3, 3], [3, 3, 3], ...]``,
  ``[[1, 2, 2], [2, 2, 2], ...]``) for anisotropic volumes; ``depth`` follows ``len(strides)`` when not given.
  Default ``None``: the papers' 3 and 2 everywhere (the 2D networks are unchanged). U-Net family only: FuseNet
  (fixed VGG/SegNet pooling with indices) refuses them with a ConfigError.

Options that a model does not use (e.g. ``sa_reduction`` for FuseUNet) are accepted and ignored, so one
``model_options`` mapping can serve a whole Table 1 sweep; unknown names raise :class:`ConfigError`.
See :mod:`modalseg.models.fusion` for the layouts and how widths grow with more than two modalities.

The card of each model (:func:`modalseg.models.model_card`) holds its Table 1 row, the printed and the
reconstructed parameter count (3 input channels per modality, 2 classes, BN, two modalities for the fusion
models; reference facts, Paper 1); the constants below are derived from the cards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

import modalseg.models.layers as layers
from modalseg.errors import ConfigError
from modalseg.models.fusenet import FuseNet
from modalseg.models.fusion import FusionConfig, FusionUNet
from modalseg.models.registry import ModelCard, ParamCount, list_models, model_cards, register_model

__all__ = [
    "NORM_LAYERS",
    "PAPER1_MODELS",
    "PAPER1_OPTIONS",
    "PAPER1_RECONSTRUCTED_PARAMS",
    "PAPER1_TABLE1_PARAMS",
    "PAPER1_TABLE1_ROWS",
]

#: Keyword options of every paper-1 builder (beyond num_modalities, in_channels, num_classes).
PAPER1_OPTIONS = (
    "base_width",
    "depth",
    "sa_reduction",
    "sa_dilation",
    "assistant_from_sa",
    "norm",
    "norm_sets",
    "spatial_dims",
    "kernel_sizes",
    "strides",
)


def _int_option(name: str, model: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model {model}: option {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _options(model: str, options: dict[str, Any], base_width: int) -> dict[str, Any]:
    unknown = sorted(set(options) - set(PAPER1_OPTIONS))
    if unknown:
        known = ", ".join(PAPER1_OPTIONS)
        raise ConfigError(f"model {model}: unknown option(s) {', '.join(unknown)}; known: {known}")
    strides, kernels = options.get("strides"), options.get("kernel_sizes")
    default_depth = 4
    if strides is not None and isinstance(strides, (list, tuple)):
        default_depth = len(strides)
    elif kernels is not None and isinstance(kernels, (list, tuple)):
        default_depth = len(kernels) - 1
    out = {
        "base_width": _int_option("base_width", model, options.get("base_width", base_width)),
        "depth": _int_option("depth", model, options.get("depth", default_depth)),
        "sa_reduction": _int_option("sa_reduction", model, options.get("sa_reduction", 16)),
        "sa_dilation": _int_option("sa_dilation", model, options.get("sa_dilation", 4)),
        "assistant_from_sa": options.get("assistant_from_sa", True),
        "norm": options.get("norm", "batch"),
        "norm_sets": _int_option("norm_sets", model, options.get("norm_sets", 2)),
        "spatial_dims": layers.check_spatial_dims(options.get("spatial_dims", 2), f"model {model}"),
        "kernel_sizes": _levels(kernels),
        "strides": _levels(strides),
    }
    if not isinstance(out["assistant_from_sa"], bool):
        raise ConfigError(f"model {model}: option assistant_from_sa must be true or false")
    if isinstance(out["norm"], str):
        if out["norm"] not in layers.NORMS:
            known = ", ".join(layers.NORMS)
            raise ConfigError(f"model {model}: option norm must be one of {known}, got {out['norm']!r}")
    elif not callable(out["norm"]):
        raise ConfigError(f"model {model}: option norm must be a name or a callable channels -> module")
    return out


def _levels(value: Any) -> Any:
    """Lists (from YAML/JSON configs) as tuples, so that the frozen FusionConfig stays hashable; checked there."""
    if isinstance(value, list | tuple):
        return tuple(tuple(v) if isinstance(v, list | tuple) else v for v in value)
    return value


#: 2D factories of the config-file ``norm`` names (kept for old callers; models take the names themselves).
#: "instance" and "group" normalise each image on its own, which makes multi-process (DDP) training on CPU
#: match single-process training exactly (BatchNorm uses per-rank batch statistics under DDP).
NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    name: layers.norm_factory(name, 2) for name in ("batch", "instance", "group")
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


def _sizes(card: ModelCard, num_modalities: Any, in_channels: Any, num_classes: Any) -> dict[str, int]:
    """A build's checked input and output sizes, as the keyword arguments that FusionConfig and FuseNet share."""
    name = card.name
    return {
        "num_modalities": _check_modalities(name, num_modalities, card.inputs == "single"),
        "in_channels": _int_option("in_channels", name, in_channels),
        "num_classes": _int_option("num_classes", name, num_classes),
    }


def _reference(name: str, single: bool, count: int, printed: float, note: str = "") -> tuple[ParamCount, ...]:
    """Paper 1's counting configuration: 3 input channels per modality, 2 classes, BN, two modalities."""
    options = (("num_modalities", 1 if single else 2), ("in_channels", 3), ("num_classes", 2))
    return (ParamCount(options, count, printed, note),)


def _card(
    name: str, row: int, label: str, inputs: str, width: int, count: int, printed: float, description: str,
    family: str = "fusion_unet", note: str = "", affinity_layers: tuple[str, ...] = (),
) -> ModelCard:
    return ModelCard(
        name=name,
        paper="paper1",
        family=family,
        inputs=inputs,
        description=description,
        default_width=width,
        table1_row=row,
        table1_label=label,
        counts=_reference(name, inputs == "single", count, printed, note),
        options=PAPER1_OPTIONS,
        affinity_layers=affinity_layers,
    )


def _fusion_builder(card: ModelCard, **layout: Any) -> Callable[..., FusionUNet]:
    name, single = card.name, card.inputs == "single"

    def build(
        num_modalities: int = 1 if single else 2, in_channels: int = 1, num_classes: int = 2, **options: Any
    ) -> FusionUNet:
        sizes = _sizes(card, num_modalities, in_channels, num_classes)
        opts = _options(name, options, card.default_width)
        widths = tuple(opts["base_width"] * 2**k for k in range(opts["depth"] + 1))
        config = FusionConfig(
            **sizes,
            widths=widths,
            assistant_from_sa=opts["assistant_from_sa"],
            sa_reduction=opts["sa_reduction"],
            sa_dilation=opts["sa_dilation"],
            name=name,
            spatial_dims=opts["spatial_dims"],
            kernel_sizes=opts["kernel_sizes"],
            strides=opts["strides"],
            **layout,
        )
        return FusionUNet(config, norm=opts["norm"], norm_sets=opts["norm_sets"])

    return _named(card, build)


def _named(card: ModelCard, builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    builder.__doc__ = card.description
    builder.__name__ = builder.__qualname__ = f"build_{card.name}"
    return register_model(card)(builder)


#: Paper 1's U-Net family (Table 1), one row per model: the card's facts (name, Table-1 row and label, inputs,
#: default width, reconstructed and printed parameter counts, description) and the FusionConfig layout switches.
#: fuse_origin_unet: the reconstructed 56.164M includes the assistants' deepest block; paper 1 does not say what it
#: feeds. Rather than leave ~14M parameters dead we add it into the master's bottleneck (parameter-free,
#: FuseNet-style sum), so every parameter is trained. unet: as paper 2's backbone (unpaired), the closest
#: intermediate pair at equal resolution is the last encoder block before the bottleneck and the first decoder
#: block (1/8).
_FUSION_FAMILY: tuple[tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]], ...] = (
    (("unet", 1, "U-Net (T1C)", "single", 64, 34_527_106, 34.5,
      "U-Net (Table 1 row 1): one modality, widths 64..1024, bilinear + conv upsampling."),
     {"affinity_layers": ("master.blocks.3", "decoder.ups.0")}, {}),
    (("unet_sa", 2, "U-Net + SA (T1C)", "single", 64, 34_713_121, 34.7,
      "U-Net + SA: an SA gate after each of the 5 encoder blocks; the gated map is skip and next input."),
     {}, {"attention": "master"}),
    (("early_fuse_unet", 6, "EarlyFuseUNet", "paired", 64, 34_528_834, 34.5,
      "EarlyFuseUNet: U-Net on all modalities stacked at the input."),
     {}, {"stack_inputs": True}),
    (("late_fuse_unet", 7, "LateFuseUNet", "paired", 32, 25_108_354, 25.1,
      "LateFuseUNet: independent half-width streams, concatenated only at the skips and the bottleneck."),
     {}, {"fusion": "concat"}),
    (("fuse_origin_unet", 5, "FuseOriginUNet", "paired", 64, 56_163_522, 56.2,
      "FuseOriginUNet: full-width streams, master block k+1 reads concat(master_k, assistants_k); decoder on the "
      "master's skips; transposed-conv upsampling."),
     {}, {"fusion": "concat", "fuse_into_master": True, "skip_source": "master", "bottleneck": "sum",
          "upsample": "transpose"}),
    (("fuse_unet", 8, "FuseUNet", "paired", 32, 26_675_074, 26.7,
      "FuseUNet: half-width streams; y_k = concat(master_k, assistants_k) is skip k and next master input."),
     {}, {"fusion": "concat", "fuse_into_master": True}),
    (("fuse_unet_sa", 9, "FuseUNet + SA", "paired", 32, 26_768_352, 26.8,
      "FuseUNet + SA: every stream gated by its own SA map at each of the 5 encoder blocks."),
     {}, {"fusion": "concat", "fuse_into_master": True, "attention": "per_stream"}),
    (("master_assistant", 10, "Proposed", "paired", 32, 26_721_713, 26.7,
      "Proposed (paper 1): FuseUNet whose master SA maps gate the master and every assistant stream."),
     {}, {"fusion": "concat", "fuse_into_master": True, "attention": "master"}),
)
for _facts, _extra, _layout in _FUSION_FAMILY:
    _fusion_builder(_card(*_facts, **_extra), **_layout)


def _fusenet_builder(card: ModelCard, fusion: str) -> Callable[..., FuseNet]:
    name = card.name

    def build(num_modalities: int = 2, in_channels: int = 1, num_classes: int = 2, **options: Any) -> FuseNet:
        sizes = _sizes(card, num_modalities, in_channels, num_classes)
        opts = _options(name, options, card.default_width)
        if "depth" in options and opts["depth"] != 5:
            raise ConfigError(f"model {name}: the VGG16 encoder has 5 stages; depth must be 5, got {opts['depth']}")
        if opts["kernel_sizes"] is not None or opts["strides"] is not None:
            raise ConfigError(
                f"model {name}: kernel_sizes/strides are not supported (fixed VGG16 stages and SegNet unpooling); "
                "use a U-Net-family model (e.g. fuse_unet, master_assistant) for anisotropic layouts"
            )
        return FuseNet(
            **sizes,
            fusion=fusion,
            base_width=opts["base_width"],
            norm=opts["norm"],
            spatial_dims=opts["spatial_dims"],
            norm_sets=opts["norm_sets"],
        )

    return _named(card, build)


_NO_MATCH = "no faithful FuseNet gives the printed count; see fusenet.py"
_fusenet_builder(
    _card(
        "fusenet", 3, "FuseNet", "paired", 64, 44_167_298, 29.4,
        "FuseNet (Hazirbas et al.): two VGG16-BN encoders, assistant summed into the master after each stage, "
        "SegNet decoder.",
        family="fusenet",
        note=_NO_MATCH,
    ),
    "sum",
)
_fusenet_builder(
    _card(
        "fusenet_concat", 4, "FuseNetConcate", "paired", 64, 50_434_178, 74.0,
        "FuseNetConcate: FuseNet with channel concatenation instead of summation.",
        family="fusenet",
        note=_NO_MATCH,
    ),
    "concat",
)

_CARDS = model_cards(list_models(paper="paper1"))  # in Table 1 order

#: The ten Table 1 models in the paper's row order.
PAPER1_MODELS: tuple[str, ...] = tuple(c.name for c in _CARDS)
#: Paper 1 Table 1's "Number of parameters" column, in millions (as printed), from the cards.
PAPER1_TABLE1_PARAMS: dict[str, float] = {c.name: c.counts[0].printed_m for c in _CARDS}  # type: ignore[misc]
#: Counts of our builds in millions (3 input channels per modality, 2 classes, BN, two modalities), from the
#: cards. All U-Net-based rows match the paper to its printed precision; the FuseNet rows do not (fusenet.py).
PAPER1_RECONSTRUCTED_PARAMS: dict[str, float] = {c.name: c.counts[0].reconstructed_m for c in _CARDS}
#: Table 1 row label of each registered name, from the cards.
PAPER1_TABLE1_ROWS: dict[str, str] = {c.name: c.table1_label for c in _CARDS}  # type: ignore[misc]
