"""What one training step computes, for paired (paper 1) and unpaired (paper 2) learning.

Each task wraps the segmentation network in a *loss module* whose ``forward`` takes the step's tensors and
returns ``(loss, parts)``. The engine wraps that module (not the bare network) in DDP, so one forward and one
backward cover all modalities of an unpaired step, as DDP requires.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from modalseg.losses.affinity import affinity_loss, class_affinity, csa_loss
from modalseg.losses.dice_ce import DiceCELoss
from modalseg.losses.kd import ummkd_kd_loss
from modalseg.models.unpaired import UnpairedSegmenter
from modalseg.training.model_meta import (  # noqa: F401  (re-exported: the public names of this module)
    SINGLE_MODALITY_MODELS,
    ModelMeta,
    build_network,
    paired_channels,
)


class PairedLoss(nn.Module):
    """Paper 1: L = L_Dice + alpha * L_CE (Eq. 1) on the fused network's logits."""

    def __init__(self, network: nn.Module, ce_weight: float) -> None:
        super().__init__()
        self.network = network
        self.criterion = DiceCELoss(eps=1.0, alpha=ce_weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.network(x)
        loss = self.criterion(logits.float(), y)
        return loss, {"loss": float(loss.detach())}


class UnpairedLoss(nn.Module):
    """Paper 2 Eq. 5: L = sum_m (Dice_m + beta * CE_m) + lambda * L_aux (alpha = 1).

    ``L_aux`` depends on the setting: CSA (Eq. 2-4) for ``csa``, class-agnostic affinity for ``affinity``,
    the UMMKD knowledge-distillation loss (plus L2 on conv kernels) for ``ummkd``, nothing otherwise. With more
    than two modalities the auxiliary loss is averaged over all modality pairs.
    """

    def __init__(
        self,
        network: UnpairedSegmenter,
        setting: str,
        *,
        ce_weight: float,
        affinity_weight: float,
        kd_weight: float,
        kd_temperature: float,
        conv_l2: float,
    ) -> None:
        super().__init__()
        self.network = network
        self.setting = setting
        self.seg = DiceCELoss(eps=1.0, alpha=ce_weight)
        self.affinity_weight = affinity_weight
        self.kd_weight = kd_weight
        self.kd_temperature = kd_temperature
        self.conv_l2 = conv_l2

    def forward(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        need_features = self.setting in {"csa", "affinity"}
        seg_total = torch.zeros((), device=xs[0].device)
        logits_all, onehots, features = [], [], []
        for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
            if need_features:
                logits, feats = self.network(x, modality=k, return_features=True)
                features.append({name: f.float() for name, f in feats.items()})
            else:
                logits = self.network(x, modality=k)
            logits = logits.float()
            seg_total = seg_total + self.seg(logits, y)
            logits_all.append(logits)
            onehots.append(F.one_hot(y, logits.shape[1]).permute(0, 3, 1, 2).float())
        parts = {"seg": float(seg_total.detach())}
        loss = seg_total
        pairs = list(itertools.combinations(range(len(xs)), 2))
        if self.setting in {"csa", "affinity"} and pairs:
            aux = torch.zeros((), device=loss.device)
            layers = list(features[0])
            for i, j in pairs:
                if self.setting == "csa":
                    a_i = class_affinity(features[i][layers[0]], features[i][layers[-1]], onehots[i])
                    a_j = class_affinity(features[j][layers[0]], features[j][layers[-1]], onehots[j])
                    aux = aux + csa_loss(a_i, a_j)
                else:
                    aux = aux + affinity_loss(
                        features[i][layers[0]], features[i][layers[-1]],
                        features[j][layers[0]], features[j][layers[-1]],
                    )
            aux = aux / len(pairs)
            loss = loss + self.affinity_weight * aux
            parts[self.setting] = float(aux.detach())
        elif self.setting == "ummkd" and pairs:
            kd = sum(
                ummkd_kd_loss(logits_all[i], onehots[i], logits_all[j], onehots[j], T=self.kd_temperature)
                for i, j in pairs
            ) / len(pairs)
            loss = loss + self.kd_weight * kd
            parts["kd"] = float(kd.detach())
        if self.conv_l2 > 0:
            l2 = sum((m.weight.float() ** 2).sum() for m in self.network.modules() if isinstance(m, nn.Conv2d))
            loss = loss + self.conv_l2 * 0.5 * l2
        parts["loss"] = float(loss.detach())
        return loss, parts
