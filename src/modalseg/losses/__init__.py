"""Losses of both papers.

* :class:`DiceCELoss` / :func:`dice_ce_loss` — paper 1 Eq. (1), Dice + alpha * CE with eps = 1.
* :func:`class_affinity` (Eq. 2-3), :func:`csa_loss` (Eq. 4), :func:`affinity_loss` (class-agnostic variant) — paper 2.
* :func:`ummkd_kd_loss` — the knowledge-distillation loss of UMMKD (Dou et al.), paper 2's baseline.
* :class:`RegionDiceBCELoss` — nnU-Net's region-based (BraTS) loss: sigmoid per region, BCE + batch soft Dice.
* nnU-Net's ``ignore`` label: ``ignore_index`` of the losses above (helpers in :mod:`modalseg.losses.ignore`).
"""

from modalseg.losses.affinity import affinity_loss, class_affinity, csa_loss
from modalseg.losses.dice_ce import DiceCELoss, dice_ce_loss
from modalseg.losses.kd import ummkd_kd_loss
from modalseg.losses.regions import RegionDiceBCELoss

__all__ = ["DiceCELoss", "RegionDiceBCELoss", "affinity_loss", "class_affinity", "csa_loss", "dice_ce_loss",
           "ummkd_kd_loss"]
