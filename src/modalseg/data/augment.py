"""Training-time augmentation and modality dropout: random transforms whose draws depend on (seed, step, sample).

Why a module of its own: the paired and unpaired tasks (training/tasks.py) apply these transforms to every sample
of their batches, and the benchmark (benchmarks/augment_cost.py) times exactly what they apply. Every transform is
a :class:`~modalseg.data.transforms.RandomTransform`: its generator is
``PCG64(SeedSequence([seed, crc32(key), step, index]))`` with ``index`` the sample's position in the *global* batch
of ``step``, so a resumed run and every DDP layout draw what one uninterrupted process draws. Each transform draws
a fixed set of numbers in a fixed order whatever it then applies, so changing one probability never moves another
transform's draws.

* :class:`SpatialAugment`, jointly on all channels and the label: flips (every spatial axis), in-plane 90-degree
  rotations (square planes only), one in-plane resampling for a small rotation and/or a scaling (bilinear for
  images, nearest for labels, 0 outside = the mean of a z-scored image, background for labels);
* :class:`IntensityAugment`, per channel (modality) with its own draws, labels untouched: a smooth multiplicative
  bias field, brightness (multiplicative), contrast (around the mean, range kept), gamma (on the range-normalised
  image, range kept) and Gaussian noise, in this order;
* :class:`ModalityDropout`: zeroes a random proper subset of the channels (never all) after normalisation and
  after the other transforms, so a dropped channel is exactly what prediction feeds for a missing modality.

Deviations from nnU-Net's default 2D augmentation (batchgenerators), stated: no elastic deformation, blur or
low-resolution simulation; rotations are small (nnU-Net 2D: any angle) unless ``rotate_degrees`` says otherwise;
rotation and scaling share one resampling whose probabilities are drawn independently (nnU-Net likewise); gamma
is never applied to the inverted image. MONAI's deterministic ``Affine`` would do the resampling, but measured
1.7 ms per 2x128x128 sample against 0.14 ms for the ``torch.nn.functional.grid_sample`` call it wraps (2 CPU
cores), so the call is made directly; the intensity steps are one numpy expression each. MONAI's own random
transforms are not used: their state is a stream advanced by earlier draws, which breaks exact resume and DDP.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from modalseg.data.transforms import RandomTransform, Sample
from modalseg.errors import ConfigError

__all__ = [
    "STRENGTHS",
    "AugmentConfig",
    "IntensityAugment",
    "ModalityDropout",
    "RandomPipeline",
    "SpatialAugment",
    "dropout_probabilities",
]

#: ``augmentation`` strengths (``off``, ``on`` and ``auto`` are resolved by the task before these are looked up).
STRENGTHS: tuple[str, ...] = ("light", "medium", "strong")


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of every augmentation step (defaults: the ``medium`` strength).

    Probabilities are per sample (spatial) or per sample and channel (intensity); ranges are ``(low, high)`` of a
    uniform draw. ``flip_p`` applies to each spatial axis on its own; ``rot90_p`` picks k in {1, 2, 3} quarter
    turns of the in-plane (last two) axes when they are of equal size; ``rotate_degrees`` bounds the in-plane
    angle; ``scale_range`` > 1 zooms in. ``noise_std`` bounds the standard deviation of the added noise (in units
    of the normalised image), ``bias_coefficient`` the coefficients of the degree-3 polynomial whose exponential
    is the bias field.
    """

    flip_p: float = 0.5
    rot90_p: float = 0.5
    rotate_p: float = 0.2
    rotate_degrees: float = 15.0
    scale_p: float = 0.2
    scale_range: tuple[float, float] = (0.85, 1.25)
    bias_p: float = 0.1
    bias_coefficient: float = 0.3
    brightness_p: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    contrast_p: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    gamma_p: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    noise_p: float = 0.1
    noise_std: tuple[float, float] = (0.0, 0.3)

    @classmethod
    def preset(cls, strength: str, overrides: Mapping[str, Any] | None = None) -> AugmentConfig:
        """The ``strength`` preset (light, medium, strong) with ``overrides`` (``augmentation_options``) applied
        and checked; a bad name or value is one :class:`ConfigError` line naming the option."""
        if strength not in _PRESETS:
            raise ConfigError(f"augmentation must be one of auto, off, on, {', '.join(STRENGTHS)}, got {strength!r}")
        values = {**dataclasses.asdict(cls()), **_PRESETS[strength]}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in (overrides or {}) if k not in fields)
        if unknown:
            raise ConfigError(f"augmentation_options: unknown option(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(fields))}")
        for name, value in (overrides or {}).items():
            values[name] = _checked(name, value)
        return cls(**values)

    def describe(self) -> str:
        """One line for the console and the docs."""
        return (f"flips p {self.flip_p:g}, rot90 p {self.rot90_p:g}, rotate p {self.rotate_p:g} "
                f"(+-{self.rotate_degrees:g} deg), scale p {self.scale_p:g} {list(self.scale_range)}, bias p "
                f"{self.bias_p:g}, brightness p {self.brightness_p:g}, contrast p {self.contrast_p:g}, gamma p "
                f"{self.gamma_p:g} {list(self.gamma_range)}, noise p {self.noise_p:g}")


#: What each strength changes from the ``medium`` defaults of :class:`AugmentConfig`.
_PRESETS: dict[str, dict[str, Any]] = {
    "light": {"rot90_p": 0.0, "rotate_degrees": 10.0, "scale_range": (0.9, 1.1), "bias_p": 0.0,
              "brightness_range": (0.85, 1.15), "contrast_range": (0.85, 1.15), "gamma_range": (0.8, 1.25),
              "noise_std": (0.0, 0.2)},
    "medium": {},
    "strong": {"rotate_p": 0.3, "rotate_degrees": 30.0, "scale_p": 0.3, "scale_range": (0.7, 1.4), "bias_p": 0.2,
               "bias_coefficient": 0.5, "brightness_p": 0.2, "brightness_range": (0.7, 1.3), "contrast_p": 0.2,
               "contrast_range": (0.65, 1.5), "noise_p": 0.15},
}

#: Ranges whose values must be > 0 (factors) and those that may start at 0 (a standard deviation).
_POSITIVE_RANGES = ("scale_range", "brightness_range", "contrast_range", "gamma_range")


def _checked(name: str, value: Any) -> Any:
    """One ``augmentation_options`` value checked against its field's meaning."""
    def finite(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if name.endswith("_p"):
        if not finite(value) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"augmentation_options {name}: expected a probability in [0, 1], got {value!r}")
        return float(value)
    if name.endswith(("_range", "_std")):
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(finite(v) for v in value)
        positive = name in _POSITIVE_RANGES
        if ok:
            ok = value[0] <= value[1] and (value[0] > 0 if positive else value[0] >= 0)
        if not ok:
            low = "> 0" if positive else ">= 0"
            raise ConfigError(f"augmentation_options {name}: expected [low, high] with {low} <= high, got {value!r}")
        return (float(value[0]), float(value[1]))
    if name == "rotate_degrees":
        if not finite(value) or not 0.0 <= value <= 180.0:
            raise ConfigError(f"augmentation_options {name}: expected degrees in [0, 180], got {value!r}")
        return float(value)
    if not finite(value) or value < 0:  # bias_coefficient
        raise ConfigError(f"augmentation_options {name}: expected a number >= 0, got {value!r}")
    return float(value)


class _ConfiguredAugment(RandomTransform):
    """A random transform set by an :class:`AugmentConfig`; ``key`` defaults to the class's own ``default_key``, so
    the spatial and the intensity steps draw from independent streams."""

    default_key: ClassVar[str]

    def __init__(self, config: AugmentConfig, seed: int = 0, key: str | None = None) -> None:
        super().__init__(seed, key or self.default_key)
        self.config = config


# ------------------------------------------------------------------------------------------------ spatial
class SpatialAugment(_ConfiguredAugment):
    """Flips, quarter turns and one rotation/scaling resampling, applied alike to every channel and the label.

    Works on ``(C, *spatial)`` with 2 or 3 spatial axes; turns, rotation and scaling act on the in-plane (last
    two) axes, as the 2D slices and the in-plane resize of the cache do. Draws per sample, always in this order:
    one uniform per spatial axis (flips), one (quarter turn) and its k, two (rotation, scaling) and their angle
    and factor.
    """

    default_key = "augment.spatial"

    def draw(self, sample: Sample, rng: np.random.Generator) -> Sample:
        cfg = self.config
        image = np.asarray(sample.image)
        spatial = image.ndim - 1
        if spatial not in (2, 3):
            raise ValueError(f"expected an image (C, H, W) or (C, D, H, W), got shape {image.shape}")
        label = None if sample.label is None else np.asarray(sample.label)
        flips = rng.random(spatial) < cfg.flip_p
        turn, k = rng.random() < cfg.rot90_p, int(rng.integers(1, 4))
        rotate, angle = rng.random() < cfg.rotate_p, rng.uniform(-cfg.rotate_degrees, cfg.rotate_degrees)
        scale, factor = rng.random() < cfg.scale_p, rng.uniform(*cfg.scale_range)
        changed = False
        axes = tuple(int(a) for a in np.flatnonzero(flips))
        if axes:
            image = np.flip(image, axis=tuple(1 + a for a in axes))
            label = None if label is None else np.flip(label, axis=axes)
            changed = True
        if turn and image.shape[-1] == image.shape[-2]:
            image = np.rot90(image, k, axes=(-2, -1))
            label = None if label is None else np.rot90(label, k, axes=(-2, -1))
            changed = True
        if rotate or scale:
            image, label = _resample(image, label, math.radians(angle) if rotate else 0.0,
                                     factor if scale else 1.0)
            changed = True
        if not changed:
            return sample.replace()
        return sample.replace(image=np.ascontiguousarray(image, dtype=np.float32),
                              label=None if label is None else np.ascontiguousarray(label))


def _resample(image: np.ndarray, label: np.ndarray | None, angle: float, factor: float
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """In-plane rotation by ``angle`` (radians) about the centre and zoom by ``factor`` of ``(C, ..., H, W)`` and its
    label: bilinear images, nearest labels (exact values), 0 outside. The angle is in pixel units (no shear on
    non-square planes): normalised coordinates are scaled by the half sizes before and after the rotation."""
    h, w = image.shape[-2:]
    c, s = math.cos(angle), math.sin(angle)
    # output pixel (x, y) relative to the centre reads input R (x, y) / factor; affine_grid works in [-1, 1]
    theta = torch.tensor([[c / factor, -s * h / w / factor, 0.0],
                          [s * w / h / factor, c / factor, 0.0]], dtype=torch.float32)[None]
    grid = F.affine_grid(theta, [1, 1, h, w], align_corners=False)
    planes = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32).reshape(1, -1, h, w))
    out = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    image = out.numpy().reshape(image.shape)
    if label is not None:
        lab = torch.from_numpy(np.ascontiguousarray(label).astype(np.float32).reshape(1, -1, h, w))
        lab = F.grid_sample(lab, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        label = lab.numpy().reshape(label.shape).astype(label.dtype)
    return image, label


# ------------------------------------------------------------------------------------------------ intensity
class IntensityAugment(_ConfiguredAugment):
    """Per channel, each with probability: bias field, brightness, contrast, gamma, noise. Labels untouched.

    Draws per sample, always in this order: a ``(C, 5)`` block of uniforms (which steps apply to which channel),
    a ``(C, 5)`` block for their parameters, the bias coefficients ``(C, 10)``, then one noise field for each
    channel that gets noise, in channel order. Contrast and gamma keep each channel's value range (nnU-Net's
    ``preserve_range``); a constant channel (e.g. a dropped one) is left as it is by both.
    """

    default_key = "augment.intensity"

    def draw(self, sample: Sample, rng: np.random.Generator) -> Sample:
        cfg = self.config
        image = np.asarray(sample.image)
        channels = image.shape[0]
        probs = np.array([cfg.bias_p, cfg.brightness_p, cfg.contrast_p, cfg.gamma_p, cfg.noise_p])
        apply = rng.random((channels, 5)) < probs
        u = rng.random((channels, 5))
        coeffs = rng.uniform(-cfg.bias_coefficient, cfg.bias_coefficient, (channels, len(_BIAS_TERMS)))
        if not apply.any():
            return sample.replace()
        out = np.array(image, dtype=np.float32, copy=True)
        for ch in range(channels):
            if not apply[ch].any():
                continue
            x = out[ch]
            if apply[ch, 0]:
                x *= _bias_field(x.shape, coeffs[ch])
            if apply[ch, 1]:
                x *= np.float32(_lerp(cfg.brightness_range, u[ch, 1]))
            if apply[ch, 2]:
                lo, hi, mean = x.min(), x.max(), x.mean()
                np.clip((x - mean) * np.float32(_lerp(cfg.contrast_range, u[ch, 2])) + mean, lo, hi, out=x)
            if apply[ch, 3]:
                lo, hi = x.min(), x.max()
                if hi > lo:
                    span = hi - lo
                    x[...] = np.power((x - lo) / span, np.float32(_lerp(cfg.gamma_range, u[ch, 3]))) * span + lo
            if apply[ch, 4]:
                std = np.float32(_lerp(cfg.noise_std, u[ch, 4]))
                x += std * rng.standard_normal(x.shape, dtype=np.float32)
        return sample.replace(image=out)


def _lerp(bounds: tuple[float, float], u: float) -> float:
    return float(bounds[0] + (bounds[1] - bounds[0]) * u)


#: Monomials x^i y^j with i + j <= 3 of the bias field's polynomial (MONAI's RandBiasField uses Legendre
#: polynomials of degree 3; the span is the same).
_BIAS_TERMS: tuple[tuple[int, int], ...] = tuple((i, j) for i in range(4) for j in range(4 - i))


def _bias_field(shape: tuple[int, ...], coeffs: np.ndarray) -> np.ndarray:
    """``exp(sum c_ij x^i y^j)`` over the in-plane axes (coordinates in [-1, 1]), the same for every slice."""
    h, w = shape[-2:]
    y = np.linspace(-1.0, 1.0, h, dtype=np.float32)
    x = np.linspace(-1.0, 1.0, w, dtype=np.float32)
    powers_y = np.stack([y**i for i in range(4)])
    powers_x = np.stack([x**j for j in range(4)])
    log_field = np.zeros((h, w), dtype=np.float32)
    for c, (i, j) in zip(coeffs, _BIAS_TERMS, strict=True):
        log_field += np.float32(c) * np.outer(powers_y[i], powers_x[j])
    return np.exp(log_field)


# ------------------------------------------------------------------------------------------------ dropout
class ModalityDropout(RandomTransform):
    """Zero each channel ``c`` with probability ``probabilities[c]``, never all of them.

    The fill is 0: applied to normalised images, that is the mean of a z-scored channel (and the value the cache
    pads with), and what prediction feeds for a missing modality. Draws per sample: one uniform per channel; when
    every channel came out dropped, another row, until one survives (so the dropped set is the independent draw
    conditioned on "not all": a channel's marginal rate is ``(p_c - prod p) / (1 - prod p)``, slightly below
    ``p_c`` where every channel may be dropped, exactly ``p_c`` where one never is).
    """

    def __init__(self, probabilities: Sequence[float], seed: int = 0, key: str | None = None) -> None:
        super().__init__(seed, key or "modality_dropout")
        probs = [float(p) for p in probabilities]
        if not probs or any(not 0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"probabilities must be in [0, 1], got {probs}")
        if all(p >= 1.0 for p in probs):
            raise ValueError("modality dropout with probability 1 for every channel would drop them all")
        self.probabilities = np.array(probs)

    def dropped(self, rng: np.random.Generator) -> np.ndarray:
        """The channel mask to drop (bool, never all True), drawn from ``rng``."""
        while True:
            mask = rng.random(len(self.probabilities)) < self.probabilities
            if not mask.all():
                return mask

    def dropped_at(self, step: int, index: int) -> list[int]:
        """The channels sample ``index`` of ``step`` drops (what :meth:`draw` zeroes)."""
        return [int(c) for c in np.flatnonzero(self.dropped(self.generator(step, index)))]

    def draw(self, sample: Sample, rng: np.random.Generator) -> Sample:
        image = np.asarray(sample.image)
        if image.shape[0] != len(self.probabilities):
            raise ValueError(f"{len(self.probabilities)} dropout probabilities for {image.shape[0]} channels")
        mask = self.dropped(rng)
        if not mask.any():
            return sample.replace()
        out = np.array(image, dtype=np.float32, copy=True)
        out[mask] = 0.0
        return sample.replace(image=out)


def dropout_probabilities(option: float | Mapping[str, float], modalities: Sequence[str], *,
                          drop_master: bool = False) -> dict[str, float]:
    """Per-channel drop probabilities of the ``modality_dropout`` option for a model's ``modalities`` (master
    first): a number applies to every assistant (and to the master with ``drop_master``); a mapping names the
    channels to drop. Only channels with p > 0 are returned (empty: no dropout). One-line ConfigError for a name
    the model does not read, the master without ``drop_master``, a single-channel model, or every channel at 1."""
    mods = list(modalities)
    requested = any(float(v) > 0 for v in option.values()) if isinstance(option, Mapping) else float(option) > 0
    if requested and len(mods) < 2:
        raise ConfigError(f"modality_dropout needs a model of two or more channels; this one reads {mods[0]} only")
    if isinstance(option, Mapping):
        unknown = [m for m in option if m not in mods]
        if unknown:
            raise ConfigError(f"modality_dropout names {', '.join(unknown)}, which the model does not read "
                              f"(its channels: {', '.join(mods)})")
        probs = {m: float(option[m]) for m in mods if m in option}
        if mods[0] in probs and probs[mods[0]] > 0 and not drop_master:
            raise ConfigError(f"modality_dropout names the master {mods[0]}; set modality_dropout_master: true to "
                              "drop it too (its attention maps then gate every stream from a blank image)")
    else:
        p = float(option)
        probs = {m: p for m in (mods if drop_master else mods[1:])}
    probs = {m: p for m, p in probs.items() if p > 0}
    if probs and len(probs) == len(mods) and all(p >= 1.0 for p in probs.values()):
        raise ConfigError("modality_dropout of 1 for every channel would drop them all; lower one")
    if drop_master and probs and mods[0] not in probs:
        raise ConfigError(f"modality_dropout_master is true but modality_dropout gives the master {mods[0]} no "
                          "probability; name it (or set modality_dropout_master: false)")
    return probs


# ------------------------------------------------------------------------------------------------ pipeline
class RandomPipeline:
    """Random transforms applied in order to every sample of a batch: what a task applies to its batches.

    ``batch(images, labels, step=s, first_index=i0)`` works on numpy ``(B, C, ...)`` / ``(B, ...)`` arrays (or
    torch CPU tensors, returned as tensors); sample ``b`` has global index ``i0 + b``. Each transform draws from its
    own generator, so the pipeline's result depends on (seed, key, step, index) and nothing else.
    """

    def __init__(self, transforms: Sequence[RandomTransform]) -> None:
        self.transforms = list(transforms)

    def __bool__(self) -> bool:
        return bool(self.transforms)

    def __call__(self, sample: Sample, *, step: int, index: int) -> Sample:
        for t in self.transforms:
            sample = t(sample, step=step, index=index)
        return sample

    def batch(self, images: Any, labels: Any, *, step: int, first_index: int = 0) -> tuple[Any, Any]:
        """The transformed batch (same types as given); labels keep their dtype."""
        as_tensor = isinstance(images, torch.Tensor)
        x = images.numpy() if as_tensor else np.asarray(images)
        y = None if labels is None else (labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels))
        outs, labs = [], []
        for b in range(len(x)):
            s = self(Sample(x[b], None if y is None else y[b]), step=step, index=first_index + b)
            outs.append(np.asarray(s.image, dtype=np.float32))
            labs.append(s.label)
        xb = np.stack(outs)
        yb = None if y is None else np.stack(labs).astype(y.dtype, copy=False)
        if as_tensor:
            return torch.from_numpy(xb), (None if yb is None else torch.from_numpy(yb))
        return xb, yb
