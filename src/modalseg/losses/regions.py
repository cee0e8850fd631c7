"""Region-based training (BraTS: whole tumour, tumour core, enhancing tumour), as nnU-Net trains it.

The network has one output channel per region and no background channel; each channel is a sigmoid (regions
overlap: an enhancing voxel is in all three). Region ``r``'s target is built on the fly from the cached label
values: a voxel belongs to it when its value is one of the region's values (``{"tumor core": [2, 3]}``).

Loss = ``bce_weight * BCE-with-logits + soft Dice``, nnU-Net's ``DC_and_BCE_loss`` with weights 1 and 1:

* BCE: the mean over voxels and regions (``torch.nn.functional.binary_cross_entropy_with_logits``).
* Dice: nnU-Net's ``MemoryEfficientSoftDiceLoss`` for regions (``do_bg=True``: every channel is a region) with
  ``smooth = 1e-5`` and **batch Dice**: the sums run over the whole batch and all pixels per region, then the mean
  over regions, because nnU-Net's planner sets ``batch_dice`` for its 2D configuration and modalseg trains 2D
  slices. Where we deviate: nnU-Net returns ``-Dice``; we return ``1 - Dice`` (the same gradient, and the logged
  loss stays >= 0).

nnU-Net's ``ignore`` label (``ignore_index``): the ignored voxels leave both terms (BCE averaged over the annotated
voxel-region entries, Dice sums with prediction and target cleared there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RegionDiceBCELoss", "region_targets"]

#: nnU-Net's smoothing of the soft Dice (``smooth=1e-5`` in its trainer)
REGION_DICE_SMOOTH = 1e-5


def region_targets(target: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, R, *spatial) float: 1 where ``target`` (B, *spatial) label values are in region ``r``'s values."""
    if not regions:
        raise ValueError("no regions")
    masks = [torch.isin(target, torch.as_tensor(list(values), dtype=target.dtype, device=target.device))
             for values in regions]
    return torch.stack(masks, dim=1).float()


class RegionDiceBCELoss(nn.Module):
    """``forward(logits (B, R, H, W), target (B, H, W) label values)`` -> scalar (module docstring)."""

    def __init__(
        self, regions: Sequence[Sequence[int]], *, bce_weight: float = 1.0, smooth: float = REGION_DICE_SMOOTH,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        if not regions or any(not values for values in regions):
            raise ValueError(f"regions must be non-empty lists of label values, got {regions!r}")
        if bce_weight < 0 or smooth < 0:
            raise ValueError(f"bce_weight and smooth must be >= 0, got {bce_weight}, {smooth}")
        self.regions = [tuple(int(v) for v in values) for values in regions]
        self.bce_weight = float(bce_weight)
        self.smooth = float(smooth)
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() == logits.dim():
            target = target[:, 0]
        if logits.dim() < 3 or logits.shape[1] != len(self.regions) or target.shape[1:] != logits.shape[2:] \
                or target.shape[0] != logits.shape[0]:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match "
                             f"{len(self.regions)} regions")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            z = logits.float()
            y = region_targets(target, self.regions)
            bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
            p = torch.sigmoid(z)
            if self.ignore_index is None:
                bce_term = bce.mean()
            else:
                valid = (target != self.ignore_index).unsqueeze(1).float()
                bce_term = (bce * valid).sum() / (valid.sum() * len(self.regions)).clamp_min(1.0)
                p, y = p * valid, y * valid
            dims = (0, *range(2, z.dim()))  # batch Dice: over the batch and every pixel, per region
            inter = (p * y).sum(dim=dims)
            denom = p.sum(dim=dims) + y.sum(dim=dims)
            dice = (2.0 * inter + self.smooth) / (denom + self.smooth).clamp_min(1e-8)
            return self.bce_weight * bce_term + (1.0 - dice.mean())

    def extra_repr(self) -> str:
        ignore = "" if self.ignore_index is None else f", ignore_index={self.ignore_index}"
        return f"regions={self.regions}, bce_weight={self.bce_weight}, smooth={self.smooth}{ignore}"
