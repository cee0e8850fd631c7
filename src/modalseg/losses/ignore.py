"""nnU-Net's ``ignore`` label in the losses: its voxels are unannotated, so they take no part in any term.

The cache stores them as :data:`~modalseg.data.types.IGNORE_INDEX` (255) in the label maps. Every loss that is
given an ``ignore_index`` uses these helpers: a voxel with that value contributes nothing to the cross-entropy (the
mean runs over the annotated voxels only), nothing to the Dice sums (prediction and one-hot are both cleared there,
nnU-Net's ``loss_mask``) and belongs to no class of the paper-2 one-hots (CSA masks, UMMKD class means). Where a
batch has no annotated voxel at all the cross-entropy is 0, as in nnU-Net (``DC_and_CE_loss`` skips it), not the
NaN of ``0 / 0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["masked_cross_entropy", "one_hot_valid", "valid_mask"]


def valid_mask(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Boolean mask of the annotated voxels of ``target`` (class indices, any shape)."""
    return target != ignore_index


def one_hot_valid(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(B, C, *spatial) float one-hot of ``target`` (B, *spatial); ignored voxels are all-zero (no class)."""
    valid = valid_mask(target, ignore_index)
    clean = torch.where(valid, target, torch.zeros_like(target))
    onehot = F.one_hot(clean.long(), num_classes).movedim(-1, 1).float()
    return onehot * valid.unsqueeze(1).to(onehot.dtype)


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over the annotated voxels (0 when there is none): ``logits`` (B, C, *spatial),
    ``target`` (B, *spatial) class indices with ``ignore_index`` where unannotated."""
    valid = valid_mask(target, ignore_index)
    clean = torch.where(valid, target, torch.zeros_like(target)).long()
    per_voxel = F.cross_entropy(logits.float(), clean, reduction="none")
    weights = valid.to(per_voxel.dtype)
    return (per_voxel * weights).sum() / weights.sum().clamp_min(1.0)
