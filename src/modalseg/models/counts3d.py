"""Parameter counts of the 3D networks at the papers' widths (docs/3d.md embeds :func:`parameter_counts_3d_markdown`).

Why a function and not numbers in a document: the counts follow from the builders, so the table is generated
and a test checks that docs/3d.md holds the current one (as docs/models.md holds the cards' table). The models
are built on PyTorch's ``meta`` device, so counting a 226M-parameter network allocates nothing.

Configurations: each card's headline counting configuration (paper 1: 3 input channels per modality, 2 classes,
BN, two modalities; paper 2: one channel, two BN sets, four classes) with ``spatial_dims=3`` at the card's default
(paper) width, once with the papers' 3x3x3 kernels and 2x2x2 poolings and once with the layout the planner gives
thick-slice data of 6.5 x 1 x 1 mm (:func:`modalseg.models.planning.plan_topology`: ``(1, 3, 3)`` kernels at the
first two levels). Paper 2's unpaired U-Net backbone (paper 1's U-Net in :class:`UnpairedSegmenter`, MSBN with two
modalities) is counted too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modalseg.errors import ConfigError
from modalseg.models.planning import plan_topology
from modalseg.models.registry import create_model, list_models, model_cards
from modalseg.models.unpaired import UnpairedSegmenter

__all__ = ["ANISOTROPIC_SPACING", "Count3D", "parameter_counts_3d", "parameter_counts_3d_markdown"]

#: The thick-slice spacing (z, y, x) of the table's anisotropic column.
ANISOTROPIC_SPACING = (6.5, 1.0, 1.0)


@dataclass(frozen=True)
class Count3D:
    """One row: the configuration and its counts (``None`` where the model refuses the layout)."""

    model: str
    configuration: str
    params_2d: int
    params_3d: int
    params_3d_anisotropic: int | None


def _count(build: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> int:
    """Trainable parameters of ``build(*args, **kwargs)``, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        net = build(*args, **kwargs)
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def _anisotropic(depth: int) -> dict[str, Any]:
    kernels, strides = plan_topology(ANISOTROPIC_SPACING, None, max_poolings=depth)
    return {"kernel_sizes": kernels, "strides": strides}


def parameter_counts_3d() -> list[Count3D]:
    """The rows of the table (module docstring), paper 1's Table 1 order, then paper 2."""
    rows: list[Count3D] = []
    for card in model_cards(list_models()):
        name, kwargs = card.name, card.counts[0].kwargs
        shown = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        two = _count(create_model, name, **kwargs)
        three = _count(create_model, name, **kwargs, spatial_dims=3)
        try:
            aniso: int | None = _count(create_model, name, **kwargs, spatial_dims=3, **_anisotropic(4))
        except ConfigError:
            aniso = None
        rows.append(Count3D(card.name, shown, two, three, aniso))
    seg = ("unet", ["A", "B"], "msbn", 4)

    rows.append(
        Count3D(
            "UnpairedSegmenter(unet)",
            "in_channels=1, two modalities (MSBN), num_classes=4",
            _count(UnpairedSegmenter, *seg, in_channels=1),
            _count(UnpairedSegmenter, *seg, in_channels=1, spatial_dims=3),
            _count(UnpairedSegmenter, *seg, in_channels=1, spatial_dims=3, **_anisotropic(4)),
        )
    )
    return rows


def _fmt(value: int | None, ref: int | None = None) -> str:
    if value is None:
        return "- (fixed topology)"
    text = f"{value:,}"
    if ref:
        text += f" (x{value / ref:.2f})"
    return text


def parameter_counts_3d_markdown(rows: list[Count3D] | None = None) -> str:
    """A Markdown table of :func:`parameter_counts_3d` (docs/3d.md embeds it; a test checks it is current)."""
    z, y, x = ANISOTROPIC_SPACING
    lines = [
        f"| model | counted with | 2D | 3D, 3x3x3 kernels | 3D, planned for {z:g} x {y:g} x {x:g} mm |",
        "|---|---|---|---|---|",
    ]
    for row in parameter_counts_3d() if rows is None else rows:
        lines.append(
            f"| {row.model} | {row.configuration} | {row.params_2d:,} | {_fmt(row.params_3d, row.params_2d)} "
            f"| {_fmt(row.params_3d_anisotropic, row.params_2d)} |"
        )
    return "\n".join(lines) + "\n"
