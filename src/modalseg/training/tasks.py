"""Paired (paper 1) and unpaired (paper 2) learning: every difference between them lives here.

A :class:`Task` owns what differs: the recipe it resolves ``auto`` options with, which modalities the network
sees, the loss module, how the fold's slices become batches (one batch of all channels, or one batch per
modality), how the network is called per modality, and how validation slices are grouped. The trainer
(training/engine.py) only asks the task; it has no ``paired`` branch.

Each task wraps the segmentation network in a *loss module* whose ``forward`` takes the step's tensors and
returns ``(loss, parts)``. The engine wraps that module (not the bare network) in DDP, so one forward and one
backward cover all modalities of an unpaired step, as DDP requires.

Per-sample random transforms (data/augment.py, docs/augmentation.md) are applied here too: augmentation (spatial
jointly on channels and label, intensity per modality) and, for paired data, modality dropout, each drawing from
``(seed, step, global sample index)`` only, so resume and DDP stay exact. ``augmentation: auto`` resolves to
``medium`` with the ``default`` preprocessing and ``off`` with the paper presets; with both off a batch is exactly
what it was before these options existed.

nnU-Net's extras (docs/conventions.md) are decided here too: a dataset with an ``ignore`` label gives every loss an
``ignore_index`` (the cache's :data:`~modalseg.data.types.IGNORE_INDEX`), and a region-based dataset (BraTS) makes
the paired task train one sigmoid channel per region (:class:`RegionLoss`); unpaired learning refuses regions.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import modalseg.training.layout as layout
from modalseg.data.augment import (
    AugmentConfig,
    IntensityAugment,
    ModalityDropout,
    RandomPipeline,
    SpatialAugment,
    dropout_probabilities,
)
from modalseg.data.patches import PatchSampler, SlicePatchSampler, UnpairedSlicePatchSampler, squeeze_depth
from modalseg.data.sampling import EpochBatchSampler, UnpairedBatchSampler
from modalseg.data.transforms import stream_key
from modalseg.data.types import IGNORE_INDEX, DatasetSpec
from modalseg.errors import ConfigError
from modalseg.inference.inferers import layout_inferer
from modalseg.losses.affinity import CSA_READINGS, affinity_loss, check_pairable, class_affinity, csa_loss
from modalseg.losses.dice_ce import DiceCELoss
from modalseg.losses.ignore import masked_cross_entropy, one_hot_valid, valid_mask
from modalseg.losses.kd import KD_ABSENT, ummkd_dice_loss, ummkd_kd_loss
from modalseg.losses.regions import RegionDiceBCELoss
from modalseg.models.msbn import ModalitySpecificBatchNorm
from modalseg.models.unpaired import UnpairedSegmenter
from modalseg.training.model_meta import (  # noqa: F401  (re-exported: the public names of this module)
    SINGLE_MODALITY_MODELS,
    ModelMeta,
    build_network,
    paired_channels,
)
from modalseg.training.precision import Precision

if TYPE_CHECKING:
    from modalseg.data.cache import SliceCache
    from modalseg.inference.backends import Backend
    from modalseg.training.config import TrainConfig


class PairedLoss(nn.Module):
    """Paper 1: L = L_Dice + alpha * L_CE (Eq. 1) on the fused network's logits (``ignore_index``: nnU-Net's
    ignore voxels leave both terms)."""

    def __init__(self, network: nn.Module, ce_weight: float, ignore_index: int | None = None) -> None:
        super().__init__()
        self.network = network
        self.criterion = DiceCELoss(eps=1.0, alpha=ce_weight, ignore_index=ignore_index)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.network(x)
        loss = self.criterion(logits.float(), y)
        return loss, {"loss": float(loss.detach())}


class RegionLoss(nn.Module):
    """Region-based paired training (BraTS): one sigmoid channel per region, ``ce_weight * BCE + batch soft Dice``
    (nnU-Net's ``DC_and_BCE_loss``, losses/regions.py); ``regions`` are the label values of each region, which
    the cache keeps as they are in the files (region targets are built from them on the fly)."""

    def __init__(self, network: nn.Module, regions: list[tuple[int, ...]], ce_weight: float,
                 ignore_index: int | None = None) -> None:
        super().__init__()
        self.network = network
        self.criterion = RegionDiceBCELoss(regions, bce_weight=ce_weight, ignore_index=ignore_index)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.criterion(self.network(x).float(), y)
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
        ignore_index: int | None = None,
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
        self.ignore_index = ignore_index
        self.seg = DiceCELoss(eps=1.0, alpha=ce_weight, ignore_index=ignore_index)
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
        if self.ignore_index is not None:  # nnU-Net's ignore voxels leave the batch Dice and the CE
            return (ummkd_dice_loss(logits, onehot, mask=valid_mask(y, self.ignore_index))
                    + self.ce_weight * masked_cross_entropy(logits, y, self.ignore_index))
        return ummkd_dice_loss(logits, onehot) + self.ce_weight * F.cross_entropy(logits, y)

    def _one_hot(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The one-hot labels of the Dice, CSA and KD terms; ignored voxels belong to no class."""
        if self.ignore_index is None:
            return F.one_hot(y, num_classes).movedim(-1, 1).float()
        return one_hot_valid(y, num_classes, self.ignore_index)

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
        norm_types = (nn.modules.batchnorm._NormBase, ModalitySpecificBatchNorm)
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
                logits, feats = self.network.forward_features(x, modality=k)
                features.append({name: f.float() for name, f in feats.items()})
            else:
                logits = self.network(x, modality=k)
            logits = logits.float()
            onehot = self._one_hot(y, logits.shape[1])
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
            convs = [m for m in self.network.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
            l2 = sum((m.weight.float() ** 2).sum() for m in convs)
            loss = loss + self.conv_l2 * 0.5 * l2
        parts["loss"] = float(loss.detach())
        return loss, parts


# ---------------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class TrainBatch:
    """One step's input: ``args`` for the loss module's ``forward`` and the number of images in it (this process)."""

    args: tuple[Any, ...]
    num_images: int


@dataclass(frozen=True)
class SplitPrediction:
    """Predictions of one validation group with the cache slices they belong to (same order): argmax class
    indices, or for region models the painted label values (training.model_meta.decode_outputs)."""

    pred: np.ndarray  # (N, H, W) uint8
    target: np.ndarray  # (N, H, W)
    records: list[dict[str, Any]]  # cache records of the N slices
    indices: np.ndarray  # their (sorted) cache indices

    @property
    def patients(self) -> list[str]:
        return [str(r["patient_id"]) for r in self.records]


class Task:
    """What a kind of learning decides; the trainer asks, never branches.

    Life cycle (the trainer's order): :meth:`resolve` (``auto`` options), :meth:`model_modalities`,
    :meth:`build_loss`, :meth:`plan` (the fold's slices, samplers, steps per epoch), :meth:`start` (after a
    resume), then :meth:`batches` per epoch and :meth:`groups` / :meth:`inputs` for validation.
    """

    kind: ClassVar[str]
    #: the column that tells validation groups apart in tables (None: one group, "all")
    group_column: ClassVar[str | None] = None
    #: optimisation recipe of the paper whose data this is (``None``/``auto`` options are filled from it)
    recipe: ClassVar[dict[str, Any]]

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self.cache: SliceCache | None = None
        self.steps_per_epoch = 0
        self.modalities: list[str] = []
        #: the sample layout (training/layout.py): 2.5D neighbours per side, 3D patch (None: slices)
        self.context = 0
        self.patch_size: list[int] | None = None

    # ---------------------------------------------------------------- configuration
    def resolve(self, cfg: TrainConfig) -> TrainConfig:
        """``cfg`` with ``None``/``auto`` options filled (see :func:`modalseg.training.engine.resolve_recipe`)."""
        recipe = self._recipe(cfg)
        updates = {k: v for k, v in recipe.items() if getattr(cfg, k) in (None, "auto")}
        preprocess = cfg.preprocess
        if preprocess == "auto":
            preprocess = updates["preprocess"] = self.default_preprocess()
        if cfg.foreground_fraction is None:
            updates["foreground_fraction"] = 1.0 / 3.0 if preprocess == "default" else 0.0
        if cfg.augmentation == "auto":
            # for your data (the default preset) on, as nnU-Net; the paper presets reproduce papers that had none
            updates["augmentation"] = "medium" if preprocess == "default" else "off"
        elif cfg.augmentation == "on":
            updates["augmentation"] = "medium"
        if cfg.dims == 3 and cfg.batch_size is None:
            updates["batch_size"] = 2  # patches per step: nnU-Net's 3D batch (the planner fits two in the budget)
        resolved = dataclasses.replace(cfg, **updates)
        self.check_random_options(resolved)
        return resolved

    def check_random_options(self, cfg: TrainConfig) -> None:
        """Refuse bad augmentation / dropout options before any cache is built (one line each)."""
        augment_config(cfg)
        if cfg.modality_dropout_master and not _dropout_requested(cfg):
            raise ConfigError("modality_dropout_master is true but modality_dropout is 0 (off)")

    def meta_fields(self, cfg: TrainConfig) -> dict[str, Any]:
        """Extra :class:`ModelMeta` fields this task records for ``cfg`` (after :meth:`model_modalities`): the
        per-modality drop probabilities of a model trained with modality dropout, which ``predict --missing``
        requires. Empty without dropout, so the description stays what older releases wrote."""
        return {}

    def network_layout(self, cfg: TrainConfig, cache: SliceCache, device: Any = None,
                       recorded: dict[str, Any] | None = None) -> tuple[dict[str, Any], str | None]:
        """:class:`ModelMeta` fields of the sample layout (2.5D channels, the 3D plan; training/layout.py) and
        the line that reports a 3D plan (after :meth:`model_modalities`; nothing in 2D). ``recorded``: the
        resumed checkpoint's model description, whose 3D plan is kept."""
        fields, line = layout.network_fields(cfg, cache, model=cfg.model, num_modalities=len(self.modalities),
                                             num_classes=len(self.spec.output_labels), device=device,
                                             recorded=recorded)
        self.context = int(fields.get("context_slices", 0))
        self.patch_size = fields.get("patch_size")
        self.probe_patch = layout.probe_patch(fields) if self.patch_size else None
        return fields, line

    @property
    def probe_budget_s(self) -> float:
        """Seconds ``precision: auto`` may spend timing the modes: 2 (the 2D start-up budget); 15 for a 3D network,
        whose first call in each mode builds many 3D kernels (measured on 2 shared cores: warm-up calls of an
        8x16x16 patch took 0.7-3.7 s per mode, so 2 s never reached a second mode, while bf16 trains the 3D network
        3x faster than fp32 on the AMX Xeon); small against a 3D training run."""
        return 15.0 if self.patch_size else 2.0

    @property
    def layered(self) -> bool:
        """Whether samples are more than single slices (2.5D or 3D)."""
        return bool(self.context or self.patch_size)

    def _layered_batch(self, refs: list, channels: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A 2.5D batch (depth ``2k + 1`` patches, not yet folded) or a 3D batch of patches, channels selected."""
        x, y = self._cache().get_patches(layout.context_refs(refs, self.context) if self.context else refs)
        return (x if channels is None else x[:, channels]), y

    def _finish(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """After the random transforms: 2.5D folds the neighbours into the channels, keeps the centre label."""
        return layout.fold_context(x, y, self.context) if self.context else (x, y)

    def _patch_sampler(self, cfg: TrainConfig, positions: list[int], rank: int, world_size: int,
                       stream: int = 0) -> PatchSampler:
        if not positions:
            raise ConfigError(f"fold {cfg.fold} has no training cases for 3D patches")
        return PatchSampler(self._cache(), self.patch_size or (), cfg.batch_size // world_size, cases=positions,
                            seed=cfg.seed, rank=rank, world_size=world_size,
                            foreground_fraction=cfg.foreground_fraction or 0.0, stream=stream)

    def predict(self, backend: Backend, group: str, indices: np.ndarray, batch_size: int = 8) -> np.ndarray:
        """Probabilities ``(N, K, H, W)`` of the validation (or training) slices ``indices`` of ``group``: batched
        slices in 2D; whole cached volumes through the layout's inferer in 2.5D and 3D (training/layout.py)."""
        if not self.layered:
            images, modality = self.inputs(group, indices)
            return layout_inferer(None, 0, batch_size)(backend, images, modality)
        channels, modality = self._group_inputs(group)
        inferer = layout_inferer(self.patch_size, self.context, batch_size)
        return layout.predict_slices(self._cache(), inferer, backend, indices, channels, modality)

    def _group_inputs(self, group: str) -> tuple[list[int] | None, int | None]:
        """The cached channels a group is read with (None: all) and the network's ``modality`` argument."""
        raise NotImplementedError

    def inputs(self, group: str, indices: np.ndarray) -> tuple[np.ndarray, int | None]:
        """The network's input slices for ``indices`` of ``group`` and the ``modality`` argument to call it with."""
        channels, modality = self._group_inputs(group)
        return self._slice_inputs(indices, channels), modality

    def _probe_batch(self, batch_size: int, channels: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``batch_size`` training-like samples of the layout (slices, 2.5D stacks or small 3D patches)."""
        cache = self._cache()
        count = min(len(cache), batch_size)
        if self.patch_size:
            return self._layered_batch(layout.probe_refs(cache, range(cache.num_cases), self.probe_patch, count),
                                       channels)
        if self.context:
            return self._finish(*self._layered_batch(cache.slice_refs(np.arange(count)), channels))
        x, y = cache.get_batch(np.arange(count))
        return (x if channels is None else x[:, channels]), y

    def _slice_inputs(self, indices: np.ndarray, channels: list[int] | None) -> np.ndarray:
        """Network inputs of cached slices ``indices``: the slices (2D), or with their neighbours folded into the
        channels (2.5D). A 3D network reads volumes (:meth:`predict`), not slices."""
        cache = self._cache()
        if self.patch_size:
            raise ConfigError("a 3D network reads patches of volumes, not slices (this step is 2D only)")
        if self.context:
            x, _ = self._finish(*self._layered_batch(cache.slice_refs(indices), channels))
            return x.numpy()
        images = cache.images[indices]
        return images if channels is None else images[:, channels]

    def random_transforms(self, cfg: TrainConfig, key: str = "") -> RandomPipeline:
        """The per-sample augmentation of ``cfg`` (empty when off); ``key`` separates streams (unpaired:
        one per modality)."""
        aug = augment_config(cfg)
        if aug is None:
            return RandomPipeline([])
        return RandomPipeline([SpatialAugment(aug, cfg.seed, key=f"augment.spatial{key}"),
                               IntensityAugment(aug, cfg.seed, key=f"augment.intensity{key}")])

    def _recipe(self, cfg: TrainConfig) -> dict[str, Any]:
        return dict(self.recipe)

    def default_preprocess(self) -> str:
        raise NotImplementedError

    def describe_auto_model(self, cfg: TrainConfig) -> str:
        """The one line ``model: auto`` prints before any cache is built."""
        raise NotImplementedError

    def model_modalities(self, cfg: TrainConfig) -> list[str]:
        """The modalities the network sees, in its input order."""
        raise NotImplementedError

    def setting(self, cfg: TrainConfig) -> str | None:
        """The paper-2 setting recorded in the model's meta (None for paired learning)."""
        return None

    def build_loss(self, network: nn.Module, cfg: TrainConfig) -> nn.Module:
        raise NotImplementedError

    def strata(self, cache: SliceCache) -> dict[str, str] | None:
        """Patient -> stratum for the CV split (None: unstratified)."""
        return None

    # ---------------------------------------------------------------- data
    def plan(self, cache: SliceCache, train_cases: list[str], val_cases: list[str], cfg: TrainConfig,
             rank: int, world_size: int) -> int:
        """Index the fold's slices, build the sampler; returns the steps per epoch."""
        raise NotImplementedError

    def start(self, loss_module: nn.Module, cfg: TrainConfig, batch_in_epoch: int) -> None:
        """Called once the run's position is known (fresh or resumed)."""

    def batches(self, epoch: int, start: int, precision: Precision) -> Iterator[TrainBatch]:
        """This process's batches of ``epoch`` from batch ``start`` on (a pure function of seed, epoch, rank)."""
        raise NotImplementedError

    def probe_example(self, batch_size: int) -> tuple[Any, ...]:
        """A training batch (CPU tensors) for the precision probe."""
        raise NotImplementedError

    def groups(self, which: str = "val") -> dict[str, np.ndarray]:
        """Validation grouping: ``{group: sorted cache indices}`` of the fold's ``val`` or ``train`` slices."""
        raise NotImplementedError

    def _cache(self) -> SliceCache:
        if self.cache is None:
            raise RuntimeError("Task.plan() was not called")
        return self.cache


PAPER1_RECIPE = {"batch_size": 4, "amsgrad": True, "lr_step": 30, "lr_gamma": 0.5, "lr_step_unit": "epoch",
                 "conv_l2": 0.0, "model": "master_assistant"}
PAPER2_RECIPE = {"batch_size": 8, "amsgrad": False, "lr_step": 1000, "lr_gamma": 0.95, "lr_step_unit": "iteration",
                 "conv_l2": 0.0, "model": "dilated_fcn"}


class PairedTask(Task):
    """Paper 1: every case has all channels; one batch (B, M, H, W) of the model's channels per step."""

    kind = "paired"
    recipe = PAPER1_RECIPE

    def _recipe(self, cfg: TrainConfig) -> dict[str, Any]:
        recipe = dict(self.recipe)
        if len(cfg.modalities or self.spec.modalities) == 1:
            recipe["model"] = "unet"
        return recipe

    def default_preprocess(self) -> str:
        # Not paper 1's recipe (labelled slices only, per-slice max scaling, stretched to 256x256): it misleads
        # on user data. The paper presets are chosen by name (experiment paper1, the paper configs).
        return "default"

    def describe_auto_model(self, cfg: TrainConfig) -> str:
        mods = list(cfg.modalities or self.spec.modalities)
        if cfg.model in SINGLE_MODALITY_MODELS:
            return f"model auto: {cfg.model} (one channel: {mods[0]})"
        rest = f", {', '.join(mods[1:])} assistant{'s' if len(mods) > 2 else ''}" if len(mods) > 1 else ""
        return f"model auto: {cfg.model} ({len(mods)} channels: {mods[0]} master{rest})"

    def model_modalities(self, cfg: TrainConfig) -> list[str]:
        self.modalities = paired_channels(self.spec, cfg.model, cfg.modalities)
        self.channel_index = [self.spec.modalities.index(m) for m in self.modalities]
        return self.modalities

    def check_random_options(self, cfg: TrainConfig) -> None:
        super().check_random_options(cfg)
        self.dropout_probabilities(cfg)

    def dropout_probabilities(self, cfg: TrainConfig) -> dict[str, float]:
        """Modality -> drop probability (those > 0) of the model's channels; empty without dropout."""
        if not _dropout_requested(cfg):
            return {}
        channels = paired_channels(self.spec, cfg.model, cfg.modalities)
        return dropout_probabilities(cfg.modality_dropout, channels, drop_master=cfg.modality_dropout_master)

    def meta_fields(self, cfg: TrainConfig) -> dict[str, Any]:
        probs = self.dropout_probabilities(cfg)
        return {"modality_dropout": probs} if probs else {}

    def build_loss(self, network: nn.Module, cfg: TrainConfig) -> nn.Module:
        ignore = ignore_index_of(self.spec)
        if self.spec.regions is not None:
            return RegionLoss(network, list(self.spec.regions.values()), cfg.ce_weight, ignore_index=ignore)
        return PairedLoss(network, cfg.ce_weight, ignore_index=ignore)

    def plan(self, cache: SliceCache, train_cases: list[str], val_cases: list[str], cfg: TrainConfig,
             rank: int, world_size: int) -> int:
        self.cache = cache
        self.train_idx = cache.indices_for(case_ids=train_cases)
        self.val_idx = cache.indices_for(case_ids=val_cases)
        foreground = np.array([bool(cache.records[i].get("foreground")) for i in self.train_idx])
        self.patches: PatchSampler | None = None
        if self.patch_size:  # 3D: patches of the training cases, a pure function of (seed, step, rank)
            positions = cache.positions(train_cases)
            self.patches = self._patch_sampler(cfg, positions, rank, world_size)
            self.steps_per_epoch = cfg.steps_per_epoch or layout.steps_per_epoch_3d(cache, positions, self.patch_size,
                                                                                    cfg.batch_size)
        else:  # 2D (and 2.5D) reads depth-1 patches of the cached volumes, in the slice order of EpochBatchSampler
            self.sampler = SlicePatchSampler(cache, EpochBatchSampler(
                self.train_idx, cfg.batch_size // world_size, shuffle=True, seed=cfg.seed, drop_last=True,
                rank=rank, world_size=world_size, foreground=foreground,
                foreground_fraction=cfg.foreground_fraction or 0.0,
            ))
            self.steps_per_epoch = self.sampler.num_batches(0)
        if self.steps_per_epoch < 1:
            raise ConfigError(f"fold {cfg.fold} has {len(self.train_idx)} training slices, fewer than one batch")
        # augmentation, then dropout: a dropped channel stays exactly 0, as prediction fills a missing modality
        probs = self.dropout_probabilities(cfg)
        dropout = [ModalityDropout([probs.get(m, 0.0) for m in self.modalities], cfg.seed)] if probs else []
        self.transforms = RandomPipeline([*self.random_transforms(cfg).transforms, *dropout])
        self.first_index = rank * (cfg.batch_size // world_size)  # this rank's share of the global batch
        return self.steps_per_epoch

    def batches(self, epoch: int, start: int, precision: Precision) -> Iterator[TrainBatch]:
        cache = self._cache()
        if self.patches is not None:
            first = epoch * self.steps_per_epoch + start
            refs_of = enumerate(self.patches.steps(first, self.steps_per_epoch - start), start=start)
        else:
            refs_of = enumerate(self.sampler.batches(epoch, start_batch=start), start=start)
        for b, refs in refs_of:
            if self.layered:
                x, y = self._layered_batch(refs, self.channel_index)
            else:
                x, y = squeeze_depth(*cache.get_patches(refs))
                x = x[:, self.channel_index]
            if self.transforms:
                x, y = self.transforms.batch(x, y, step=epoch * self.steps_per_epoch + b,
                                             first_index=self.first_index)
            x, y = self._finish(x, y)
            yield TrainBatch((precision.to_input(x), y.to(precision.device)), len(refs))

    def probe_example(self, batch_size: int) -> tuple[Any, ...]:
        return self._probe_batch(batch_size, self.channel_index)

    def groups(self, which: str = "val") -> dict[str, np.ndarray]:
        return {"all": np.sort(self.val_idx if which == "val" else self.train_idx)}

    def _group_inputs(self, group: str) -> tuple[list[int] | None, int | None]:
        return self.channel_index, None


class UnpairedTask(Task):
    """Paper 2: each modality has its own patients; one batch per modality per step, one shared network."""

    kind = "unpaired"
    group_column = "modality"
    recipe = PAPER2_RECIPE

    def __init__(self, spec: DatasetSpec) -> None:
        if spec.regions is not None:
            raise ConfigError(f"dataset {spec.name!r} has region-based labels ({', '.join(spec.regions)}); region "
                              "training is paired only (unpaired learning trains softmax classes)")
        super().__init__(spec)

    def _recipe(self, cfg: TrainConfig) -> dict[str, Any]:
        recipe = dict(self.recipe)
        if cfg.setting == "ummkd":
            recipe["conv_l2"] = 1e-4  # UMMKD's L2 on conv kernels (facts file)
        if cfg.dims == 3:
            recipe["model"] = "unet"  # the dilated FCN's x8 pixel shuffle is a seam in 3D, not a model (docs/3d.md)
        return recipe

    def default_preprocess(self) -> str:
        # the only unpaired recipe is paper 2's
        return {"mscmrseg": "paper2_mscmrseg", "mmwhs": "paper2_mmwhs"}.get(self.spec.layout, "paper2_synth")

    def describe_auto_model(self, cfg: TrainConfig) -> str:
        mods = list(cfg.modalities or self.spec.modalities)
        return f"model auto: {cfg.model} (unpaired data, setting {cfg.setting}, modalities {', '.join(mods)})"

    def model_modalities(self, cfg: TrainConfig) -> list[str]:
        modalities = list(cfg.modalities or self.spec.modalities)
        unknown = [m for m in modalities if m not in self.spec.modalities]
        if unknown:
            raise ConfigError(f"modalities {unknown} not in the dataset's modalities {self.spec.modalities}")
        self.modalities = modalities
        return modalities

    def setting(self, cfg: TrainConfig) -> str | None:
        return cfg.setting

    def check_random_options(self, cfg: TrainConfig) -> None:
        super().check_random_options(cfg)
        if _dropout_requested(cfg):
            raise ConfigError("modality_dropout is for paired data (every case has every modality); in unpaired "
                              "data each case has one modality, so there is nothing to drop")

    def build_loss(self, network: nn.Module, cfg: TrainConfig) -> nn.Module:
        return UnpairedLoss(
            network, cfg.setting, ce_weight=cfg.ce_weight, affinity_weight=cfg.affinity_weight,
            kd_weight=cfg.kd_weight, kd_temperature=cfg.kd_temperature, conv_l2=float(cfg.conv_l2 or 0.0),
            csa_reading=cfg.csa_reading, csa_region_norm=cfg.csa_region_norm, dice_form=cfg.dice_form,
            kd_absent_classes=cfg.kd_absent_classes, ignore_index=ignore_index_of(self.spec),
        )

    def strata(self, cache: SliceCache) -> dict[str, str] | None:
        # each modality has its own patients: stratify so every fold validates on every modality
        return {r["patient_id"]: r["modality"] for r in cache.records}

    def plan(self, cache: SliceCache, train_cases: list[str], val_cases: list[str], cfg: TrainConfig,
             rank: int, world_size: int) -> int:
        self.cache = cache
        self.train_idx_by_mod = {m: cache.indices_for(case_ids=train_cases, modality=m) for m in self.modalities}
        self.val_idx_by_mod = {m: cache.indices_for(case_ids=val_cases, modality=m) for m in self.modalities}
        for m, idx in self.train_idx_by_mod.items():
            if len(idx) == 0:
                raise ConfigError(f"no training slices of modality {m} in fold {cfg.fold}")
        self.patches_by_mod: dict[str, PatchSampler] = {}
        if self.patch_size:  # 3D: one patch stream per modality (its own cases, its own draws)
            positions = {m: cache.positions(train_cases, modality=m) for m in self.modalities}
            self.patches_by_mod = {m: self._patch_sampler(cfg, positions[m], rank, world_size, stream_key(m))
                                   for m in self.modalities}
            self.steps_per_epoch = cfg.steps_per_epoch or max(
                layout.steps_per_epoch_3d(cache, pos, self.patch_size, cfg.batch_size) for pos in positions.values())
        else:
            self.sampler = UnpairedSlicePatchSampler(cache, UnpairedBatchSampler(
                self.train_idx_by_mod, cfg.batch_size // world_size, seed=cfg.seed, rank=rank,
                world_size=world_size))
            largest = max(len(v) for v in self.train_idx_by_mod.values())
            self.steps_per_epoch = cfg.steps_per_epoch or max(1, math.ceil(largest / cfg.batch_size))
        # one stream per modality: sample j of modality m's global batch draws independently of modality n's
        self.transforms_by_mod = {m: self.random_transforms(cfg, key=f":{m}") for m in self.modalities}
        self.first_index = rank * (cfg.batch_size // world_size)
        return self.steps_per_epoch

    def start(self, loss_module: nn.Module, cfg: TrainConfig, batch_in_epoch: int) -> None:
        # Eq. 5 diagnostics: ||grad aux|| / ||grad seg|| once per epoch by default, at epoch starts after a
        # resume too (set here, after the precision probe: its model copies never measure)
        every = cfg.grad_ratio_every
        loss_module.grad_ratio_every = self.steps_per_epoch if every is None else int(every)
        loss_module.aux_forwards = batch_in_epoch

    def batches(self, epoch: int, start: int, precision: Precision) -> Iterator[TrainBatch]:
        cache = self._cache()
        first = epoch * self.steps_per_epoch + start
        for step in range(first, first + self.steps_per_epoch - start):
            if self.patches_by_mod:
                batch = {m: sampler.batch_at(step) for m, sampler in self.patches_by_mod.items()}
            else:
                batch = self.sampler.batch_at(step)
            xs, ys = [], []
            for m in self.modalities:
                if self.layered:
                    x, y = self._layered_batch(batch[m])
                else:
                    x, y = squeeze_depth(*cache.get_patches(batch[m]))
                transforms = self.transforms_by_mod[m]
                if transforms:
                    x, y = transforms.batch(x, y, step=step, first_index=self.first_index)
                x, y = self._finish(x, y)
                xs.append(precision.to_input(x))
                ys.append(y.to(precision.device))
            yield TrainBatch((xs, ys), sum(len(v) for v in batch.values()))

    def probe_example(self, batch_size: int) -> tuple[Any, ...]:
        x, y = self._probe_batch(batch_size, None)
        return [x] * len(self.modalities), [y] * len(self.modalities)

    def groups(self, which: str = "val") -> dict[str, np.ndarray]:
        by_mod = self.val_idx_by_mod if which == "val" else self.train_idx_by_mod
        return {m: np.sort(idx) for m, idx in by_mod.items()}

    def _group_inputs(self, group: str) -> tuple[list[int] | None, int | None]:
        return None, self.modalities.index(group)


def _dropout_requested(cfg: TrainConfig) -> bool:
    """Whether ``modality_dropout`` asks for any dropout (a number > 0 or a mapping with a value > 0)."""
    option = cfg.modality_dropout
    if isinstance(option, dict):
        return any(float(v) > 0 for v in option.values())
    return float(option) > 0


def augment_config(cfg: TrainConfig) -> AugmentConfig | None:
    """The augmentation of a resolved ``cfg`` (None when off); ``augmentation_options`` override the strength."""
    if cfg.augmentation == "off":
        if cfg.augmentation_options:
            raise ConfigError("augmentation_options are given but augmentation is off; set augmentation: light, "
                              "medium or strong (or auto with the default preprocessing)")
        return None
    if cfg.augmentation == "auto":
        raise RuntimeError("augmentation 'auto' must be resolved by Task.resolve first")
    return AugmentConfig.preset(cfg.augmentation, cfg.augmentation_options)


def ignore_index_of(spec: DatasetSpec) -> int | None:
    """The target value the losses leave out: the cache's index of nnU-Net's ignore label, or None."""
    return IGNORE_INDEX if spec.ignore_label is not None else None


#: Kinds of learning by the dataset's kind (one-way: the trainer looks a task up, tasks know no trainer).
TASKS: dict[str, type[Task]] = {"paired": PairedTask, "unpaired": UnpairedTask}


def task_for(spec: DatasetSpec) -> Task:
    """The task for a dataset: paired (all channels per case) or unpaired (one modality per case)."""
    return TASKS["paired" if spec.paired else "unpaired"](spec)
