"""Losses of both papers.

* :class:`DiceCELoss` / :func:`dice_ce_loss` — paper 1 Eq. (1), Dice + alpha * CE with eps = 1.
* :func:`class_affinity` (Eq. 2-3), :func:`csa_loss` (Eq. 4), :func:`affinity_loss` (class-agnostic variant) — paper 2.
* :func:`ummkd_kd_loss` — the knowledge-distillation loss of UMMKD (Dou et al.), paper 2's baseline.
"""

from modalseg.losses.affinity import affinity_loss, class_affinity, csa_loss
from modalseg.losses.dice_ce import DiceCELoss, dice_ce_loss
from modalseg.losses.kd import ummkd_kd_loss

__all__ = ["DiceCELoss", "affinity_loss", "class_affinity", "csa_loss", "dice_ce_loss", "ummkd_kd_loss"]
