"""Modality-specific batch normalisation (paper 2, Sec. 2.2, Eq. 1; Karani et al. 2018), in 2D and 3D.

Paper 2 shares every convolution kernel between modalities but keeps the batch normalisation local to each
modality: Eq. 1's gamma and beta are "modality-dependent", and each modality's batch is normalised with its
own moments. :class:`ModalitySpecificBatchNorm` therefore holds one ordinary ``nn.BatchNorm{2,3}d`` per modality
(own affine parameters *and* own running statistics) and routes the input through the copy of the active
modality. The active modality is a plain attribute set from outside with :func:`set_modality` or the
:func:`modality` context manager, so any architecture (dilated FCN, U-Net, MONAI nets) can be converted with
:func:`convert_to_msbn` without changing its ``forward`` signature, in the way
``nn.SyncBatchNorm.convert_sync_batchnorm`` converts a model. Models built with ``norm="msbn"``
(:mod:`modalseg.models.layers`) get the same layers directly.

:class:`ModalitySpecificBatchNorm2d` and :class:`ModalitySpecificBatchNorm3d` are the 2D and 3D layers (what the
factories build); ``isinstance(m, ModalitySpecificBatchNorm)`` matches both.

Each modality's batch must go through its own forward pass (mixing modalities in one batch would mix their
statistics, which is exactly what MSBN avoids).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from modalseg.errors import ConfigError

__all__ = [
    "ModalitySpecificBatchNorm",
    "ModalitySpecificBatchNorm2d",
    "ModalitySpecificBatchNorm3d",
    "convert_to_msbn",
    "get_modality",
    "modality",
    "modality_specific_batch_norm",
    "msbn_modules",
    "selected_modality",
    "set_modality",
]

_BATCH_NORMS: dict[int, type[nn.modules.batchnorm._BatchNorm]] = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class ModalitySpecificBatchNorm(nn.Module):
    """``num_modalities`` independent ``nn.BatchNorm{2,3}d`` layers; ``forward`` uses the active one.

    Args:
        num_features: channels C of the (B, C, *spatial) input.
        num_modalities: number of modalities (any number >= 1).
        eps, momentum, affine, track_running_stats: as ``nn.BatchNorm2d`` (PyTorch defaults; the TensorFlow
            code paper 2 builds on used its own defaults, which the paper does not report).
        spatial_dims: 2 or 3 (the subclasses fix it).

    The state dict holds ``bns.<i>.weight``, ``bns.<i>.bias``, ``bns.<i>.running_mean`` ... per modality i,
    the same in 2D and 3D.
    """

    spatial_dims: int = 2

    def __init__(
        self,
        num_features: int,
        num_modalities: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        spatial_dims: int | None = None,
    ) -> None:
        super().__init__()
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
        dims = type(self).spatial_dims if spatial_dims is None else spatial_dims
        if type(self) is not ModalitySpecificBatchNorm and dims != type(self).spatial_dims:
            raise ConfigError(f"{type(self).__name__} is {type(self).spatial_dims}D; got spatial_dims={dims!r}")
        if dims not in _BATCH_NORMS:
            raise ConfigError(f"modality-specific batch norm: spatial_dims must be 2 or 3, got {dims!r}")
        self.spatial_dims = dims
        self.num_features = num_features
        self.num_modalities = num_modalities
        bn = _BATCH_NORMS[dims]
        self.bns = nn.ModuleList(
            bn(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
            for _ in range(num_modalities)
        )
        self.active = 0

    def set_modality(self, index: int) -> None:
        """Select the modality whose statistics and affine parameters ``forward`` uses."""
        index = int(index)
        if not 0 <= index < self.num_modalities:
            raise IndexError(f"modality index {index} out of range for {self.num_modalities} modalities")
        self.active = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bns[self.active](x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_modalities={self.num_modalities}, active={self.active}"


class ModalitySpecificBatchNorm2d(ModalitySpecificBatchNorm):
    """2D modality-specific BN: one ``nn.BatchNorm2d`` per modality (paper 2's networks)."""

    spatial_dims = 2


class ModalitySpecificBatchNorm3d(ModalitySpecificBatchNorm):
    """3D modality-specific BN: one ``nn.BatchNorm3d`` per modality."""

    spatial_dims = 3


_MSBN_CLASSES: dict[int, type[ModalitySpecificBatchNorm]] = {
    2: ModalitySpecificBatchNorm2d,
    3: ModalitySpecificBatchNorm3d,
}


def modality_specific_batch_norm(
    num_features: int, num_modalities: int, spatial_dims: int = 2, **kwargs: object
) -> ModalitySpecificBatchNorm:
    """The 2D or 3D MSBN layer (the class the ``norm="msbn"`` factory builds); ``kwargs`` as BatchNorm's."""
    if spatial_dims not in _MSBN_CLASSES:
        raise ConfigError(f"modality-specific batch norm: spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return _MSBN_CLASSES[spatial_dims](num_features, num_modalities, **kwargs)  # type: ignore[arg-type]


def msbn_modules(model: nn.Module) -> list[ModalitySpecificBatchNorm]:
    """All modality-specific BN layers in ``model`` (itself included)."""
    return [m for m in model.modules() if isinstance(m, ModalitySpecificBatchNorm)]


def set_modality(model: nn.Module, index: int) -> nn.Module:
    """Walk ``model`` and make every :class:`ModalitySpecificBatchNorm` use modality ``index``.

    Returns ``model`` for chaining. Models without MSBN layers are left untouched (a shared-BN model is
    valid for every modality).
    """
    for m in msbn_modules(model):
        m.set_modality(index)
    return model


def get_modality(model: nn.Module) -> int | None:
    """The active modality of ``model``'s MSBN layers, or ``None`` when it has none.

    Raises ``RuntimeError`` if the layers disagree (only possible if they were set one by one).
    """
    actives = {m.active for m in msbn_modules(model)}
    if not actives:
        return None
    if len(actives) > 1:
        raise RuntimeError(f"MSBN layers disagree on the active modality: {sorted(actives)}")
    return actives.pop()


@contextlib.contextmanager
def modality(model: nn.Module, index: int) -> Iterator[nn.Module]:
    """Context manager: run ``model`` with modality ``index``; the previous selection is restored after."""
    layers = msbn_modules(model)
    previous = [m.active for m in layers]
    for m in layers:
        m.set_modality(index)
    try:
        yield model
    finally:
        for m, p in zip(layers, previous, strict=True):
            m.active = p


@contextlib.contextmanager
def selected_modality(model: nn.Module, index: int | None) -> Iterator[nn.Module]:
    """:func:`modality` for a model's ``forward_features(x, modality=...)``: ``None`` leaves the selection alone.

    A model without MSBN layers serves every modality (its BN, if any, is shared), so any index is accepted
    there; with MSBN layers an index out of range raises :class:`ConfigError`.
    """
    if index is None:
        yield model
        return
    if isinstance(index, bool) or not isinstance(index, int):
        raise ConfigError(f"modality must be an integer index, got {index!r}")
    layers = msbn_modules(model)
    sets = min((m.num_modalities for m in layers), default=None)
    if index < 0 or (sets is not None and index >= sets):
        raise ConfigError(f"modality index {index} out of range for {sets} modality-specific BN sets")
    with modality(model, index):
        yield model


def _to_msbn(bn: nn.modules.batchnorm._BatchNorm, num_modalities: int, spatial_dims: int) -> ModalitySpecificBatchNorm:
    ref = bn.running_mean if bn.running_mean is not None else bn.weight
    new = modality_specific_batch_norm(
        bn.num_features,
        num_modalities,
        spatial_dims,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None else None,
    )
    with torch.no_grad():
        for copy in new.bns:
            if bn.affine:
                copy.weight.copy_(bn.weight)
                copy.bias.copy_(bn.bias)
                copy.weight.requires_grad_(bn.weight.requires_grad)
                copy.bias.requires_grad_(bn.bias.requires_grad)
            if bn.track_running_stats:
                copy.running_mean.copy_(bn.running_mean)
                copy.running_var.copy_(bn.running_var)
                copy.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def convert_to_msbn(model: nn.Module, num_modalities: int) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` / ``nn.BatchNorm3d`` of ``model`` (any depth) with the MSBN layer of its dims.

    Every copy starts from the original layer's affine parameters and running statistics, so converting a
    trained shared-BN model gives identical outputs for every modality before further training. Existing MSBN
    layers are left as they are. Like ``nn.SyncBatchNorm.convert_sync_batchnorm``, the model is modified in
    place and returned; when ``model`` itself is a BatchNorm, the new layer is returned.
    """
    if num_modalities < 1:
        raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
    if isinstance(model, ModalitySpecificBatchNorm):
        return model
    for dims, bn in _BATCH_NORMS.items():
        if isinstance(model, bn):
            return _to_msbn(model, num_modalities, dims)
    for name, child in model.named_children():
        converted = convert_to_msbn(child, num_modalities)
        if converted is not child:
            model.add_module(name, converted)
    return model
