"""What one training step computes, for paired (paper 1) and unpaired (paper 2) learning.

Each task wraps the segmentation network in a *loss module* whose ``forward`` takes the step's tensors and
returns ``(loss, parts)``. The engine wraps that module (not the bare network) in DDP, so one forward and one
backward cover all modalities of an unpaired step, as DDP requires.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from modalseg.errors import ConfigError
from modalseg.losses.affinity import CSA_READINGS, affinity_loss, check_pairable, class_affinity, csa_loss
from modalseg.losses.dice_ce import DiceCELoss
from modalseg.losses.kd import KD_ABSENT, ummkd_dice_loss, ummkd_kd_loss
from modalseg.models.msbn import ModalitySpecificBatchNorm2d
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


#: Dice terms of the unpaired loss: paper 1's per-image foreground Dice (default) or UMMKD's batch Dice.
DICE_FORMS: tuple[str, ...] = ("per_image", "ummkd_batch")


class UnpairedLoss(nn.Module):
    """Paper 2 Eq. 5: L = sum_m (Dice_m + beta * CE_m) + lambda * L_aux (alpha = 1).

    ``L_aux`` depends on the setting: CSA (Eq. 2-4) for ``csa``, class-agnostic affinity for ``affinity``,
    the UMMKD knowledge-distillation loss (plus L2 on conv kernels) for ``ummkd``, nothing otherwise. With more
    than two modalities the auxiliary loss is averaged over all modality pairs; with more than two feature
    layers the (CSA) affinity is averaged over every consecutive layer pair
    (:func:`modalseg.models.unpaired.feature_pairs`, Fig. 4's "multiple scales").

    Options (defaults = the paper preset, i.e. the behaviour before these options existed):

    * ``csa_reading``: ``"literal"`` (Eq. 4 as printed: squared difference of the per-class mean entries) or
      ``"mean_squared"`` (mean squared entry difference); ``csa`` and ``affinity``. See losses.affinity.
    * ``csa_region_norm``: Eq. 3's division of every entry by the region size S_c (True) or the plain cosine.
    * ``dice_form``: ``"per_image"`` (per image, foreground classes, eps 1: losses.dice_ce) or
      ``"ummkd_batch"`` (UMMKD's Dice over the whole batch, background included: losses.kd); every setting.
    * ``kd_absent_classes``: ``"skip"`` or ``"ummkd"`` (UMMKD's code: every class counts), ``ummkd`` only.
    * ``grad_ratio_every``: every N-th training forward (the first included; 0 = never) ``parts`` gains
      ``aux_grad_ratio = ||grad_theta(lambda L_aux)|| / ||grad_theta(sum_m Dice_m + beta CE_m)||`` over the
      shared parameters theta (everything outside the BN layers: the kernels shared by the modalities). Why:
      it shows whether the auxiliary term can act at all (at initialisation the literal Eq. 4 with 1/S_c is
      orders of magnitude below the segmentation gradient). Measured with ``torch.autograd.grad`` on the two
      terms (graph retained), so no ``.grad`` is touched, no random number is drawn and the step's result is
      unchanged; a measured step costs about two extra backward passes. Each term is divided by its own
      (detached) magnitude before differentiation and the norm multiplied back, so that a tiny term is not
      lost to fp16 underflow in the backward pass (reasoned, not measured: no GPU run yet). ``aux_forwards``
      counts those forwards (the engine may set it, e.g. to the batch index within the epoch after a resume,
      to keep measuring at epoch starts); ``grad_ratio_every`` may be changed after construction. Under DDP
      every rank measures its own batch (checked with gloo on CPU).
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
        csa_reading: str = "literal",
        csa_region_norm: bool = True,
        dice_form: str = "per_image",
        kd_absent_classes: str = "skip",
        grad_ratio_every: int = 0,
    ) -> None:
        super().__init__()
        if csa_reading not in CSA_READINGS:
            raise ConfigError(f"csa_reading must be one of {', '.join(CSA_READINGS)}, got {csa_reading!r}")
        if dice_form not in DICE_FORMS:
            raise ConfigError(f"dice_form must be one of {', '.join(DICE_FORMS)}, got {dice_form!r}")
        if kd_absent_classes not in KD_ABSENT:
            raise ConfigError(f"kd_absent_classes must be one of {', '.join(KD_ABSENT)}, got {kd_absent_classes!r}")
        if isinstance(grad_ratio_every, bool) or int(grad_ratio_every) != grad_ratio_every or grad_ratio_every < 0:
            raise ConfigError(f"grad_ratio_every must be an integer >= 0, got {grad_ratio_every!r}")
        self.network = network
        self.setting = setting
        self.ce_weight = ce_weight
        self.seg = DiceCELoss(eps=1.0, alpha=ce_weight)
        self.affinity_weight = affinity_weight
        self.kd_weight = kd_weight
        self.kd_temperature = kd_temperature
        self.conv_l2 = conv_l2
        self.csa_reading = csa_reading
        self.csa_region_norm = bool(csa_region_norm)
        self.dice_form = dice_form
        self.kd_absent_classes = kd_absent_classes
        self.grad_ratio_every = int(grad_ratio_every)
        self.aux_forwards = 0  # training forwards with an auxiliary loss (see grad_ratio_every)
        self.layer_pairs = network.feature_pairs if setting in {"csa", "affinity"} else []

    def extra_repr(self) -> str:
        opts = [f"setting={self.setting!r}", f"dice_form={self.dice_form!r}"]
        if self.setting in {"csa", "affinity"}:
            opts += [f"csa_reading={self.csa_reading!r}", f"csa_region_norm={self.csa_region_norm}",
                     f"layer_pairs={self.layer_pairs}"]
        if self.setting == "ummkd":
            opts.append(f"kd_absent_classes={self.kd_absent_classes!r}")
        return ", ".join(opts)

    def _segmentation(self, logits: torch.Tensor, y: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """Dice + beta * CE of one modality's batch (Eq. 5's bracketed terms, alpha = 1)."""
        if self.dice_form == "per_image":
            return self.seg(logits, y)
        return ummkd_dice_loss(logits, onehot) + self.ce_weight * F.cross_entropy(logits, y)

    def auxiliary(
        self,
        logits_all: list[torch.Tensor],
        onehots: list[torch.Tensor],
        features: list[dict[str, torch.Tensor]],
    ) -> torch.Tensor | None:
        """The unweighted auxiliary loss L_aux of Eq. 5 (None for settings without one or one modality)."""
        pairs = list(itertools.combinations(range(len(logits_all)), 2))
        if not pairs:
            return None
        if self.setting == "ummkd":
            return sum(
                ummkd_kd_loss(logits_all[i], onehots[i], logits_all[j], onehots[j], T=self.kd_temperature,
                              absent=self.kd_absent_classes)
                for i, j in pairs
            ) / len(pairs)
        if self.setting not in {"csa", "affinity"}:
            return None
        form, norm = self.csa_reading, self.csa_region_norm
        aux = torch.zeros((), device=logits_all[0].device)
        for a, b in self.layer_pairs:
            for feats in features:
                check_pairable(a, tuple(feats[a].shape[2:]), b, tuple(feats[b].shape[2:]))
            if self.setting == "csa":
                # Validity inferred from all-zero matrices, as before the options existed (csa_loss docs).
                mats = [class_affinity(f[a], f[b], oh, region_norm=norm) for f, oh in zip(features, onehots,
                                                                                         strict=True)]
                for i, j in pairs:
                    aux = aux + csa_loss(mats[i], mats[j], form=form)
            else:
                for i, j in pairs:
                    aux = aux + affinity_loss(features[i][a], features[i][b], features[j][a], features[j][b],
                                              form=form, region_norm=norm)
        return aux / (len(pairs) * len(self.layer_pairs))

    def _shared_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters outside every (modality-specific) BN layer: the kernels all modalities share."""
        norm_types = (nn.modules.batchnorm._NormBase, ModalitySpecificBatchNorm2d)
        skip = {id(p) for m in self.network.modules() if isinstance(m, norm_types) for p in m.parameters()}
        return [p for p in self.network.parameters() if p.requires_grad and id(p) not in skip]

    def gradient_ratio(self, aux_term: torch.Tensor, seg_term: torch.Tensor) -> float:
        """``||grad aux_term|| / ||grad seg_term||`` on :meth:`_shared_parameters` (graph kept, ``.grad`` untouched)."""
        params = self._shared_parameters()

        def grad_norm(term: torch.Tensor) -> float:
            if not term.requires_grad:
                return 0.0
            size = float(term.detach().abs())
            scale = size if math.isfinite(size) and size > 0 else 1.0
            grads = torch.autograd.grad(term / scale, params, retain_graph=True, allow_unused=True)
            squares = [g.double().square().sum() for g in grads if g is not None]
            return float(torch.stack(squares).sum().sqrt()) * scale if squares else 0.0

        seg_norm = grad_norm(seg_term)
        aux_norm = grad_norm(aux_term)
        return aux_norm / seg_norm if seg_norm > 0 else math.nan

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
            onehot = F.one_hot(y, logits.shape[1]).permute(0, 3, 1, 2).float()
            seg_total = seg_total + self._segmentation(logits, y, onehot)
            logits_all.append(logits)
            onehots.append(onehot)
        parts = {"seg": float(seg_total.detach())}
        loss = seg_total
        aux = self.auxiliary(logits_all, onehots, features)
        if aux is not None:
            weight = self.kd_weight if self.setting == "ummkd" else self.affinity_weight
            weighted = weight * aux
            loss = loss + weighted
            parts["kd" if self.setting == "ummkd" else self.setting] = float(aux.detach())
            if self.training and torch.is_grad_enabled():
                if self.grad_ratio_every and self.aux_forwards % self.grad_ratio_every == 0:
                    parts["aux_grad_ratio"] = self.gradient_ratio(weighted, seg_total)
                self.aux_forwards += 1
        if self.conv_l2 > 0:
            l2 = sum((m.weight.float() ** 2).sum() for m in self.network.modules() if isinstance(m, nn.Conv2d))
            loss = loss + self.conv_l2 * 0.5 * l2
        parts["loss"] = float(loss.detach())
        return loss, parts
