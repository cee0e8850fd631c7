"""UMMKD knowledge-distillation loss (Dou et al. 2020), paper 2's "UMMKD" setting, and UMMKD's Dice loss.

For each class c (background included) and each modality's batch, the pre-softmax logit vectors (length C)
of the ground-truth pixels of c are averaged over the whole batch, ``z^c = sum / (count + 1e-6)``, and turned
into a soft prediction ``p^c = softmax(z^c / T)`` with T = 2. The two modalities' soft predictions are
matched with the symmetric KL divergence ``[KL(p1 || p2) + KL(p2 || p1)] / 2``, averaged over classes. The
UMMKD training weight of this term is 0.5 (applied by the caller).

Classes absent from a batch (``absent``, the ``kd_absent_classes`` training option):

* ``"skip"`` (default, documented deviation): classes absent from either batch are skipped (their averaged
  logits would be the zero vector, i.e. a uniform "prediction" that is not knowledge about the class); the
  mean runs over the classes present in both batches, and is a zero connected to the graph when there is none.
* ``"ummkd"`` (UMMKD's code exactly): every class counts. An absent class's mean logit vector is
  ``0 / (0 + 1e-6) = 0``, so its soft prediction is uniform; the present side is pulled towards uniform, a
  class absent from both sides adds 0, and the sum is divided by C (all classes).

:func:`ummkd_dice_loss` is UMMKD's Dice term (its code, for paper 2's tables): one soft Dice per class over the
*whole batch*, background included, with the squared softmax in the denominator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["KD_ABSENT", "class_mean_logits", "ummkd_dice_loss", "ummkd_kd_loss"]

#: Treatments of classes absent from a batch (see the module docstring).
KD_ABSENT: tuple[str, ...] = ("skip", "ummkd")


def class_mean_logits(logits: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean logit vector of each class's ground-truth pixels (voxels, for 3D networks) over the batch: (C, C) and
    counts (C,)."""
    if logits.shape != onehot.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and one-hot labels {tuple(onehot.shape)} differ")
    z = logits.float()
    m = onehot.float()
    if z.dim() == 4:
        sums = torch.einsum("bkhw,bchw->ck", z, m)  # sum of logit vectors over pixels of class c
    else:  # 3D: the same sum over voxels
        sums = torch.einsum("bkp,bcp->ck", z.flatten(2), m.flatten(2))
    counts = m.sum(dim=(0, *range(2, m.dim())))
    return sums / (counts[:, None] + 1e-6), counts


def ummkd_kd_loss(
    logits1: torch.Tensor,
    onehot1: torch.Tensor,
    logits2: torch.Tensor,
    onehot2: torch.Tensor,
    T: float = 2.0,
    absent: str = "skip",
) -> torch.Tensor:
    """Symmetric-KL distillation between the class-wise soft predictions of two unpaired batches.

    Args:
        logits1, logits2: pre-softmax outputs (B1, C, H, W), (B2, C, H', W') of the two modalities.
        onehot1, onehot2: their one-hot ground truths, same shapes as the logits.
        T: softmax temperature (2 in UMMKD).
        absent: ``"skip"`` (default) or ``"ummkd"``: classes absent from a batch (module docstring).

    Returns a scalar (float32), symmetric in the two modalities.
    """
    if logits1.shape[1] != logits2.shape[1]:
        raise ValueError(f"class counts differ: {logits1.shape[1]} vs {logits2.shape[1]}")
    if absent not in KD_ABSENT:
        raise ValueError(f"absent must be one of {', '.join(KD_ABSENT)}, got {absent!r}")
    with torch.autocast(device_type=logits1.device.type, enabled=False):
        z1, n1 = class_mean_logits(logits1, onehot1)
        z2, n2 = class_mean_logits(logits2, onehot2)
        logp1 = F.log_softmax(z1 / T, dim=1)
        logp2 = F.log_softmax(z2 / T, dim=1)
        kl12 = (logp1.exp() * (logp1 - logp2)).sum(dim=1)  # KL(p1 || p2), per class
        kl21 = (logp2.exp() * (logp2 - logp1)).sum(dim=1)
        per_class = 0.5 * (kl12 + kl21)
        if absent == "ummkd":
            return per_class.mean()
        both = (n1 > 0) & (n2 > 0)
        total = torch.where(both, per_class, torch.zeros_like(per_class)).sum()
        return total / both.sum().clamp_min(1).to(total.dtype)


def ummkd_dice_loss(
    logits: torch.Tensor, onehot: torch.Tensor, eps: float = 1e-7, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """UMMKD's Dice loss of one modality's batch: ``1 - (1/C) sum_c 2 I_c / (L_c + R_c + eps)``.

    ``I_c = sum p_c g_c``, ``L_c = sum p_c^2``, ``R_c = sum g_c``, each summed over the whole batch and all
    pixels; c runs over all C classes, background included; ``p = softmax(logits)``. UMMKD's code writes
    ``-(1/C) sum_c ...``; the constant 1 changes no gradient and keeps the logged loss >= 0. Why an option:
    paper 2 builds on UMMKD's code, so its tables may come from this Dice rather than the per-image
    foreground Dice of :class:`modalseg.losses.dice_ce.DiceCELoss`. ``mask`` (B, H, W), True = annotated:
    nnU-Net's ignore voxels leave the sums (``onehot`` must already be zero there, losses/ignore.py).
    """
    if logits.shape != onehot.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and one-hot labels {tuple(onehot.shape)} differ")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        p = torch.softmax(logits.float(), dim=1)
        if mask is not None:
            p = p * mask.unsqueeze(1).float()
        g = onehot.float()
        dims = (0, *range(2, logits.dim()))  # the batch and every pixel (voxel)
        inter = (p * g).sum(dim=dims)
        dice = 2.0 * inter / ((p * p).sum(dim=dims) + g.sum(dim=dims) + eps)
        return 1.0 - dice.mean()
