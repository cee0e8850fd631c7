"""Class-specific affinity (CSA) and plain affinity losses of paper 2 (Sec. 2.3-2.4, Eq. 2-4).

For two layers l and k of one network and a class c:

* Eq. 2: ``F^c(l) = F(l) (.) M^c``, with ``M^c`` the one-hot ground-truth mask of class c resized (nearest
  neighbour) to the feature map's size.
* Eq. 3: ``a^c_{m,n} = cos(F^c_m(l), F^c_n(k)) / S_c``: cosine similarity between channel m of layer l and
  channel n of layer k, each flattened over space, divided by ``S_c``, the number of pixels of class c in the
  resized mask *of that image*. ``A^c`` is the M x N matrix of these entries.
* Eq. 4: ``L_CSA = (1/C) sum_c || (1/P) sum_i (A^{c,1}_i - A^{c,2}_i) ||_2^2`` with P = M*N entries.

Interpretation choices (the paper is silent or ambiguous; see each function):

* **Eq. 4 reading** (``form``, the ``csa_reading`` training option). Eq. 4 taken literally sums the P entry
  differences *inside* the norm, so the norm is of a scalar and
  ``L_CSA = (1/C) sum_c (mean_i(A^{c,1}_i - A^{c,2}_i))^2``: only the per-class *mean* entry is compared, and
  two matrices with the same mean but different structure give zero loss. That is the default
  (``form="literal"``, paper preset). ``form="mean_squared"`` (alias ``"mse"``) is the element-wise reading
  ``(1/C) sum_c (1/P) sum_i (A^{c,1}_i - A^{c,2}_i)^2``, which compares every entry.
* **Region normalisation** (``region_norm``, the ``csa_region_norm`` option). Eq. 3 divides each cosine by
  ``S_c`` "to ensure that the affinity is invariant to the size of the saliency region". The cosine is already
  invariant to the region's size (it is a normalised inner product), so ``1/S_c`` in fact *rescales* every
  entry by the region size: entries of a region of S_c pixels are at most 1/S_c, and after the square in Eq. 4
  the loss of a region of S_c = 200 pixels is (1/200)^2 = 2.5e-5 times its plain-cosine loss.
  ``region_norm=True`` (default) is Eq. 3 as printed; ``region_norm=False`` keeps the plain cosine in [-1, 1].
* The modalities are unpaired (different images, even different batch sizes), so each modality's affinity is
  first averaged per class over the images of its batch in which the class is present; classes absent from
  either batch contribute nothing and C counts only the classes present on both sides.
* Features of different sizes: layer k is resized (bilinear) to layer l's size before the cosine, and the mask
  (nearest) to layer l's size; :func:`check_pairable` refuses sizes that are not integer multiples.
* Everything is computed in float32 (also under bf16/fp16 autocast): the entries are cosines divided by pixel
  counts and small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modalseg.errors import ConfigError

__all__ = [
    "CSA_READINGS",
    "affinity_loss",
    "check_pairable",
    "class_affinity",
    "csa_loss",
    "csa_loss_from_features",
    "resize_mask",
]

_EPS = 1e-8
#: Readings of Eq. 4 (see the module docstring); ``"mse"`` is accepted as an alias of ``"mean_squared"``.
CSA_READINGS: tuple[str, ...] = ("literal", "mean_squared")
_FORMS = {"literal": "literal", "mean_squared": "mean_squared", "mse": "mean_squared"}


def resize_mask(onehot: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """One-hot mask (B, C, *spatial) resized to ``size`` with nearest neighbour (Eq. 2's "reshape"), as float32.

    PyTorch's ``"nearest"`` (source index = floor(dst * scale)) is the convention of TensorFlow 1's
    ``resize_nearest_neighbor`` used by the original code.
    """
    onehot = onehot.float()
    if tuple(onehot.shape[2:]) == tuple(size):
        return onehot
    return F.interpolate(onehot, size=size, mode="nearest")


def _flat_unit(x: torch.Tensor) -> torch.Tensor:
    """Flatten the spatial axes of (B, C, M, *spatial) and scale each map to unit L2 norm; all-zero maps stay zero
    (cosine 0)."""
    x = x.flatten(3)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def check_pairable(name_l: str, size_l: tuple[int, ...], name_k: str, size_k: tuple[int, ...]) -> None:
    """Refuse a layer pair whose spatial sizes are not integer multiples of each other (same direction).

    Why: layer k is resized bilinearly onto layer l's grid before the cosine (Eq. 3); between incommensurate
    grids (e.g. 3x4 and 2x2) the resampled channels no longer describe the same image positions.
    """
    if len(size_l) not in (2, 3) or len(size_k) != len(size_l):
        raise ConfigError(f"feature layers {name_l!r} and {name_k!r} must output (B, C, H, W) or (B, C, D, H, W) maps "
                          "of one dimensionality to be paired")
    if tuple(size_l) == tuple(size_k):
        return
    up = all(a % b == 0 for a, b in zip(size_l, size_k, strict=True)) and all(
        a >= b for a, b in zip(size_l, size_k, strict=True))
    down = all(b % a == 0 for a, b in zip(size_l, size_k, strict=True)) and all(
        b >= a for a, b in zip(size_l, size_k, strict=True))
    if not (up or down):
        raise ConfigError(
            f"feature layers {name_l!r} {tuple(size_l)} and {name_k!r} {tuple(size_k)} cannot be paired: their "
            "sizes are not integer multiples of each other"
        )


def class_affinity(
    feat_l: torch.Tensor,
    feat_k: torch.Tensor,
    onehot: torch.Tensor,
    return_valid: bool = False,
    region_norm: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Class-specific affinity matrices (Eq. 2-3) of a batch of one modality.

    Args:
        feat_l: features of layer l, (B, M, H, W).
        feat_k: features of layer k, (B, N, H', W'); resized bilinearly to (H, W) if different.
        onehot: ground truth, (B, C, H0, W0), one channel per class (background included if wanted);
            resized nearest to (H, W).
        return_valid: also return the (B, C) boolean mask of classes present (S_c > 0) per image.
        region_norm: divide by ``S_c`` (Eq. 3 as printed, default); False keeps the plain cosine (the cosine
            is already size-invariant, ``1/S_c`` rescales the entries by the region size).

    Returns:
        ``A`` (B, C, M, N) with ``A[b, c, m, n] = cos(F^c_m(l), F^c_n(k)) / S_c`` (float32; without the
        division when ``region_norm`` is False), and
        optionally the validity mask. A class absent from an image (S_c = 0) gives an all-zero matrix,
        never NaN.
    """
    if feat_l.dim() not in (4, 5) or not feat_l.dim() == feat_k.dim() == onehot.dim():
        raise ValueError("class_affinity expects tensors (B, channels, H, W), or (B, channels, D, H, W) for 3D "
                         "networks (the paper's future work: the same equations over voxels)")
    if not (feat_l.shape[0] == feat_k.shape[0] == onehot.shape[0]):
        raise ValueError(
            f"batch sizes differ: feat_l {feat_l.shape[0]}, feat_k {feat_k.shape[0]}, "
            f"onehot {onehot.shape[0]}"
        )
    with torch.autocast(device_type=feat_l.device.type, enabled=False):
        fl, fk = feat_l.float(), feat_k.float()
        size = tuple(fl.shape[2:])
        if fk.shape[2:] != fl.shape[2:]:
            mode = "bilinear" if len(size) == 2 else "trilinear"
            fk = F.interpolate(fk, size=size, mode=mode, align_corners=False)
        mask = resize_mask(onehot, size)  # (B, C, *spatial)
        s_c = mask.sum(dim=tuple(range(2, mask.dim())))  # (B, C)
        # Eq. 2 (Hadamard product with the class mask), then unit maps for the cosine of Eq. 3.
        ul = _flat_unit(fl.unsqueeze(1) * mask.unsqueeze(2))  # (B, C, M, HW)
        uk = _flat_unit(fk.unsqueeze(1) * mask.unsqueeze(2))  # (B, C, N, HW)
        cos = torch.einsum("bcmp,bcnp->bcmn", ul, uk)
        affinity = cos / s_c.clamp_min(1.0)[..., None, None] if region_norm else cos
    if return_valid:
        return affinity, s_c > 0
    return affinity


def _class_means(a: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean affinity over the images where the class is present: (C, M, N) and (C,) presence."""
    w = valid.to(a.dtype)  # (B, C)
    count = w.sum(dim=0)  # (C,)
    mean = (a * w[..., None, None]).sum(dim=0) / count.clamp_min(1.0)[:, None, None]
    return mean, count > 0


def csa_loss(
    a1: torch.Tensor,
    a2: torch.Tensor,
    valid1: torch.Tensor | None = None,
    valid2: torch.Tensor | None = None,
    form: str = "literal",
) -> torch.Tensor:
    """Eq. 4: consistency of the class-specific affinity between two modalities' (unpaired) batches.

    Args:
        a1, a2: (B1, C, M, N) and (B2, C, M, N) from :func:`class_affinity`; batch sizes may differ.
        valid1, valid2: (B, C) presence masks (``return_valid=True``). If omitted, a class counts as present
            in an image when its matrix has a non-zero entry (an absent class gives exact zeros).
        form: ``"literal"``: ``(1/C') sum_c ((1/P) sum_i d_i)^2`` (Eq. 4 as printed: the sum is inside the
            norm, giving the squared mean difference); ``"mean_squared"`` (alias ``"mse"``):
            ``(1/C') sum_c (1/P) sum_i d_i^2`` (every entry compared).

    Each modality's matrices are averaged per class over the images where the class is present, then
    ``d = mean A^{c,1} - mean A^{c,2}``; C' counts the classes present in both batches (absent classes add
    nothing). With no such class the loss is a zero that is still connected to the graph.
    """
    if a1.dim() != 4 or a2.dim() != 4 or a1.shape[1:] != a2.shape[1:]:
        raise ValueError(
            f"affinity shapes must be (B, C, M, N) with equal C, M, N: {tuple(a1.shape)}, {tuple(a2.shape)}"
        )
    if form not in _FORMS:
        raise ValueError(f"form must be one of {', '.join(CSA_READINGS)} (or 'mse'), got {form!r}")
    a1, a2 = a1.float(), a2.float()
    if valid1 is None:
        valid1 = a1.detach().flatten(2).ne(0).any(dim=-1)
    if valid2 is None:
        valid2 = a2.detach().flatten(2).ne(0).any(dim=-1)
    mean1, present1 = _class_means(a1, valid1.bool())
    mean2, present2 = _class_means(a2, valid2.bool())
    both = present1 & present2  # (C,)
    diff = (mean1 - mean2).flatten(1)  # (C, P)
    per_class = diff.mean(dim=1).square() if _FORMS[form] == "literal" else diff.square().mean(dim=1)
    n_valid = both.sum()
    total = torch.where(both, per_class, torch.zeros_like(per_class)).sum()
    return total / n_valid.clamp_min(1).to(total.dtype)


def csa_loss_from_features(
    feats1: tuple[torch.Tensor, torch.Tensor],
    onehot1: torch.Tensor,
    feats2: tuple[torch.Tensor, torch.Tensor],
    onehot2: torch.Tensor,
    form: str = "literal",
    region_norm: bool = True,
) -> torch.Tensor:
    """L_CSA from the (layer l, layer k) features and one-hot labels of each modality's batch (Eq. 2-4)."""
    a1, v1 = class_affinity(feats1[0], feats1[1], onehot1, return_valid=True, region_norm=region_norm)
    a2, v2 = class_affinity(feats2[0], feats2[1], onehot2, return_valid=True, region_norm=region_norm)
    return csa_loss(a1, a2, v1, v2, form=form)


def affinity_loss(
    feat1_l: torch.Tensor,
    feat1_k: torch.Tensor,
    feat2_l: torch.Tensor,
    feat2_k: torch.Tensor,
    form: str = "literal",
    region_norm: bool = True,
) -> torch.Tensor:
    """Paper 2's "Affinity" setting: Eq. 3-4 without class masks.

    The whole feature map is one "class": M is all ones, so S = H*W and every image counts. Same
    normalisation (``region_norm``: divide by S = H*W) and reduction (``form``) as :func:`csa_loss`.
    """
    ones1 = feat1_l.new_ones((feat1_l.shape[0], 1, *feat1_l.shape[2:]), dtype=torch.float32)
    ones2 = feat2_l.new_ones((feat2_l.shape[0], 1, *feat2_l.shape[2:]), dtype=torch.float32)
    a1, v1 = class_affinity(feat1_l, feat1_k, ones1, return_valid=True, region_norm=region_norm)
    a2, v2 = class_affinity(feat2_l, feat2_k, ones2, return_valid=True, region_norm=region_norm)
    return csa_loss(a1, a2, v1, v2, form=form)
