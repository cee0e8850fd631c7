"""Paper 1's training loss, Eq. (1): ``L = L_Dice + alpha * L_CE`` with ``eps = 1.0`` and ``alpha = 1.0``.

Dice term (Eq. 1, first bracket): ``1 - (2 sum_i p_i y_i + eps) / (sum_i p_i + sum_i y_i + eps)`` with
``p_i`` the softmax probability of the foreground class and ``y_i`` the binary label, summed over the pixels
of one image; the loss is the mean over the images of the batch (as in the authors' code). With more than
two classes the Dice loss is computed per foreground class and image and averaged (background excluded).

Cross-entropy term: the printed formula, ``-(1/N)(y_i sum_i p_i + (1 - y_i) sum_i (1 - p_i))``, is garbled
(the pixel index is used outside its sum and the logarithms are missing), so we implement what its text
names, the standard cross-entropy: the mean over all pixels of the batch of ``-log softmax(logits)[y]``.

The computation is MONAI's :class:`monai.losses.DiceCELoss` configured to give exactly this value
(``include_background=False, to_onehot_y=True, softmax=True, smooth_nr=smooth_dr=eps, batch=False,
lambda_dice=1, lambda_ce=alpha``); MONAI's defaults differ (background included, ``smooth = 1e-5``).
Logits are cast to float32 so the loss is exact under bf16 autocast.

nnU-Net's ``ignore`` label (``ignore_index``, the cache's 255): the same two terms over the annotated voxels only
(losses/ignore.py), computed here in torch because MONAI's loss has no voxel mask. Without ``ignore_index`` the
MONAI path above runs unchanged; with it, a batch without ignored voxels gives the same value up to float
rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.losses import DiceCELoss as _MonaiDiceCELoss
from torch import nn

from modalseg.losses.ignore import masked_cross_entropy, one_hot_valid, valid_mask

__all__ = ["DiceCELoss", "dice_ce_loss"]

#: The options of MONAI's DiceCELoss that Eq. (1) fixes (its defaults differ); ``eps`` and ``alpha`` set the rest.
_EQ1_MONAI_OPTIONS: dict[str, Any] = {
    "include_background": False, "to_onehot_y": True, "softmax": True, "batch": False, "lambda_dice": 1.0
}


class DiceCELoss(nn.Module):
    """Paper 1 Eq. (1). ``forward(logits (B, C, H, W), target (B, H, W) or (B, 1, H, W) class indices)``.

    ``C >= 2`` (softmax logits; class 0 is background). Returns a scalar. ``ignore_index``: target value of
    unannotated voxels, left out of both terms (module docstring).
    """

    def __init__(self, eps: float = 1.0, alpha: float = 1.0, ignore_index: int | None = None) -> None:
        super().__init__()
        if eps < 0 or alpha < 0:
            raise ValueError(f"eps and alpha must be >= 0, got eps={eps}, alpha={alpha}")
        self.eps = eps
        self.alpha = alpha
        self.ignore_index = ignore_index
        self._loss = _MonaiDiceCELoss(**_EQ1_MONAI_OPTIONS, smooth_nr=eps, smooth_dr=eps, lambda_ce=alpha)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() < 3 or logits.shape[1] < 2:
            raise ValueError(f"expected logits (B, C>=2, ...), got {tuple(logits.shape)}")
        if target.dim() == logits.dim() - 1:
            target = target.unsqueeze(1)
        if target.shape[1] != 1 or target.shape[2:] != logits.shape[2:] or target.shape[0] != logits.shape[0]:
            raise ValueError(f"target {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            if self.ignore_index is None:
                return self._loss(logits.float(), target.long())
            return self._masked(logits.float(), target[:, 0].long(), self.ignore_index)

    def _masked(self, logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """MONAI's value (per-image foreground Dice with eps, mean CE) over the annotated voxels only."""
        valid = valid_mask(target, ignore_index).unsqueeze(1).float()
        prob = torch.softmax(logits, dim=1)[:, 1:] * valid
        onehot = one_hot_valid(target, logits.shape[1], ignore_index)[:, 1:]
        dims = tuple(range(2, logits.dim()))
        inter = (prob * onehot).sum(dim=dims)
        denom = prob.sum(dim=dims) + onehot.sum(dim=dims)
        dice = 1.0 - (2.0 * inter + self.eps) / (denom + self.eps)
        return dice.mean() + self.alpha * masked_cross_entropy(logits, target, ignore_index)

    def extra_repr(self) -> str:
        ignore = "" if self.ignore_index is None else f", ignore_index={self.ignore_index}"
        return f"eps={self.eps}, alpha={self.alpha}{ignore}"


_DEFAULT = DiceCELoss()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """Functional form of :class:`DiceCELoss` (paper 1 Eq. 1)."""
    loss = _DEFAULT if (eps == 1.0 and alpha == 1.0) else DiceCELoss(eps=eps, alpha=alpha)
    return loss(logits, target)
