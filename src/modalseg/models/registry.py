"""Model registry: a :class:`ModelCard` and a builder per name; ``create_model(name, **options)`` builds.

Each model module registers its builders with ``@register_model(card)`` (compare timm's ``default_cfgs`` and
``create_model``): the card beside the builder is the one source of the model's facts (paper, Table-1 row,
parameter counts as printed and as reconstructed, default width, inputs, supported ``spatial_dims``, options).
Constants elsewhere (``PAPER1_TABLE1_PARAMS``, ``SINGLE_MODALITY_MODELS``, ...) are derived from the cards.

This module imports nothing from modalseg but :mod:`modalseg.errors`: importing the package
:mod:`modalseg.models` registers every model (its ``__init__`` imports the model modules), and the registry
never imports them back (no import cycle).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from modalseg.errors import ConfigError

__all__ = [
    "INPUTS",
    "ModelCard",
    "ParamCount",
    "builder_options",
    "create_model",
    "list_models",
    "model_card",
    "model_cards",
    "model_cards_markdown",
    "model_description",
    "register_model",
]

#: What a model reads: one modality; paired modalities stacked as channel groups (master first); one
#: modality per forward pass of an unpaired multi-modal network (paper 2).
INPUTS: tuple[str, ...] = ("single", "paired", "unpaired")

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ParamCount:
    """One parameter count: the configuration, our build's exact count and the paper's printed figure.

    ``options`` are ``create_model`` keyword arguments as ``(name, value)`` pairs (a frozen card stays
    hashable); ``printed_m`` is the paper's number in millions as printed (``None`` when the paper prints none).
    """

    options: tuple[tuple[str, Any], ...]
    reconstructed: int
    printed_m: float | None = None
    note: str = ""

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def reconstructed_m(self) -> float:
        """The reconstructed count in millions, to the paper's 3-decimal precision of our tables."""
        return round(self.reconstructed / 1e6, 3)


@dataclass(frozen=True)
class ModelCard:
    """The facts of one registered model (see the module docstring).

    Attributes:
        name: registry name.
        paper: ``"paper1"`` (Li et al., paired fusion) or ``"paper2"`` (Chen et al., unpaired learning).
        family: architecture family (``"fusion_unet"``, ``"fusenet"``, ``"dilated_fcn"``).
        inputs: one of :data:`INPUTS`.
        description: one line.
        default_width: width of the first stage when the width option is not given.
        width_option: the builder option that sets it (``base_width`` or ``width``).
        table1_row: 1-based row of the paper's Table 1 (paper 1), or ``None``.
        table1_label: the row's label as printed, or ``None``.
        counts: reference parameter counts (the first is the card's headline count).
        spatial_dims: dimensions the builder accepts.
        options: keyword options the builder accepts beyond its signature's named parameters (builders with
            ``**options``); ``create_model`` refuses every other name.
        affinity_layers: default feature layers when the model is paper 2's unpaired backbone (the two
            intermediate layers of the (CSA) affinity loss); empty when it is not used as one.
    """

    name: str
    paper: str
    family: str
    inputs: str
    description: str
    default_width: int
    width_option: str = "base_width"
    table1_row: int | None = None
    table1_label: str | None = None
    counts: tuple[ParamCount, ...] = ()
    spatial_dims: tuple[int, ...] = (2, 3)
    options: tuple[str, ...] = ()
    affinity_layers: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise ValueError(f"model card {self.name}: inputs must be one of {', '.join(INPUTS)}, got {self.inputs!r}")
        if (self.table1_row is None) != (self.table1_label is None):
            raise ValueError(f"model card {self.name}: table1_row and table1_label go together")

    @property
    def params_printed_m(self) -> float | None:
        """The paper's printed count (millions) of the headline configuration."""
        return self.counts[0].printed_m if self.counts else None

    @property
    def params_reconstructed(self) -> int | None:
        """Our exact count of the headline configuration."""
        return self.counts[0].reconstructed if self.counts else None


_REGISTRY: dict[str, tuple[ModelCard, Builder]] = {}


def register_model(card: ModelCard) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` under ``card.name`` with its card (names are unique)."""

    def decorator(builder: Builder) -> Builder:
        if card.name in _REGISTRY:
            raise ValueError(f"model {card.name!r} registered twice")
        _REGISTRY[card.name] = (card, builder)
        return builder

    return decorator


def _entry(name: str) -> tuple[ModelCard, Builder]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def builder_options(name: str) -> tuple[str, ...]:
    """Every keyword ``create_model(name, ...)`` accepts: the builder's named parameters and the card's options."""
    card, builder = _entry(name)
    params = inspect.signature(builder).parameters.values()
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return tuple(dict.fromkeys([*named, *card.options]))


def create_model(name: str, **options: Any) -> nn.Module:
    """Build a registered model.

    Unknown names raise :class:`ConfigError` listing the known ones; an option the builder does not take
    raises :class:`ConfigError` naming the option and the model (nothing is silently dropped), and so does a
    ``spatial_dims`` the card does not list.
    """
    card, builder = _entry(name)
    known = builder_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"model {name}: unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}")
    dims = options.get("spatial_dims", 2)
    if dims not in card.spatial_dims or isinstance(dims, bool):
        raise ConfigError(
            f"model {name}: spatial_dims must be one of {', '.join(map(str, card.spatial_dims))}, got {dims!r}"
        )
    return builder(**options)


def list_models(*, paper: str | None = None, inputs: str | None = None, family: str | None = None) -> list[str]:
    """Names of the registered models, sorted; optionally only those of one paper, input kind or family."""
    return sorted(
        name
        for name, (card, _) in _REGISTRY.items()
        if (paper is None or card.paper == paper)
        and (inputs is None or card.inputs == inputs)
        and (family is None or card.family == family)
    )


def model_card(name: str) -> ModelCard:
    """The card of a registered model (:class:`ConfigError` for unknown names)."""
    return _entry(name)[0]


def model_cards(names: Iterable[str] | None = None) -> list[ModelCard]:
    """Cards in a stable reading order: by paper, then Table-1 row, then name."""
    cards = [model_card(n) for n in names] if names is not None else [c for c, _ in _REGISTRY.values()]
    return sorted(cards, key=lambda c: (c.paper, c.table1_row if c.table1_row is not None else 10**6, c.name))


def model_description(name: str) -> str:
    """The card's one-line description (kept for callers of the old registry)."""
    return model_card(name).description


def _fmt_options(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def model_cards_markdown(cards: Iterable[ModelCard] | None = None) -> str:
    """A Markdown table of the cards (docs/models.md embeds it; a test checks it is current)."""
    rows = [
        "| model | paper | Table 1 row | inputs | default width | params printed | params reconstructed "
        "| counted with | spatial_dims | description |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for card in model_cards() if cards is None else list(cards):
        for i, count in enumerate(card.counts or (None,)):
            first = i == 0
            row = f"{card.table1_row}. {card.table1_label}" if card.table1_row is not None else "-"
            printed = "-" if count is None or count.printed_m is None else f"{count.printed_m}M"
            exact = "-" if count is None else f"{count.reconstructed:,}"
            how = "-" if count is None else _fmt_options(count.kwargs)
            if count is not None and count.note:
                how += f" ({count.note})"
            rows.append(
                f"| {card.name if first else ''} | {card.paper if first else ''} | {row if first else ''} "
                f"| {card.inputs if first else ''} | {f'{card.width_option}={card.default_width}' if first else ''} "
                f"| {printed} | {exact} | {how} | {', '.join(map(str, card.spatial_dims)) if first else ''} "
                f"| {card.description.replace('|', '/') if first else ''} |"
            )
    return "\n".join(rows) + "\n"
