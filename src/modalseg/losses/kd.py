"""UMMKD knowledge-distillation loss (Dou et al. 2020), paper 2's "UMMKD" setting.

For each class c (background included) and each modality's batch, the pre-softmax logit vectors (length C)
of the ground-truth pixels of c are averaged over the whole batch, ``z^c = sum / (count + 1e-6)``, and turned
into a soft prediction ``p^c = softmax(z^c / T)`` with T = 2. The two modalities' soft predictions are
matched with the symmetric KL divergence ``[KL(p1 || p2) + KL(p2 || p1)] / 2``, averaged over classes. The
UMMKD training weight of this term is 0.5 (applied by the caller).

Deviation (documented): classes absent from either batch are skipped (their averaged logits would be the zero
vector, i.e. a uniform "prediction" that is not knowledge about the class); the mean runs over the classes
present in both batches, and is a zero connected to the graph when there is none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["class_mean_logits", "ummkd_kd_loss"]


def class_mean_logits(logits: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean logit vector of each class's ground-truth pixels over the batch: (C, C) and counts (C,)."""
    if logits.shape != onehot.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and one-hot labels {tuple(onehot.shape)} differ")
    z = logits.float()
    m = onehot.float()
    sums = torch.einsum("bkhw,bchw->ck", z, m)  # sum of logit vectors over pixels of class c
    counts = m.sum(dim=(0, 2, 3))
    return sums / (counts[:, None] + 1e-6), counts


def ummkd_kd_loss(
    logits1: torch.Tensor,
    onehot1: torch.Tensor,
    logits2: torch.Tensor,
    onehot2: torch.Tensor,
    T: float = 2.0,
) -> torch.Tensor:
    """Symmetric-KL distillation between the class-wise soft predictions of two unpaired batches.

    Args:
        logits1, logits2: pre-softmax outputs (B1, C, H, W), (B2, C, H', W') of the two modalities.
        onehot1, onehot2: their one-hot ground truths, same shapes as the logits.
        T: softmax temperature (2 in UMMKD).

    Returns a scalar (float32), symmetric in the two modalities.
    """
    if logits1.shape[1] != logits2.shape[1]:
        raise ValueError(f"class counts differ: {logits1.shape[1]} vs {logits2.shape[1]}")
    with torch.autocast(device_type=logits1.device.type, enabled=False):
        z1, n1 = class_mean_logits(logits1, onehot1)
        z2, n2 = class_mean_logits(logits2, onehot2)
        logp1 = F.log_softmax(z1 / T, dim=1)
        logp2 = F.log_softmax(z2 / T, dim=1)
        kl12 = (logp1.exp() * (logp1 - logp2)).sum(dim=1)  # KL(p1 || p2), per class
        kl21 = (logp2.exp() * (logp2 - logp1)).sum(dim=1)
        per_class = 0.5 * (kl12 + kl21)
        both = (n1 > 0) & (n2 > 0)
        total = torch.where(both, per_class, torch.zeros_like(per_class)).sum()
        return total / both.sum().clamp_min(1).to(total.dtype)
