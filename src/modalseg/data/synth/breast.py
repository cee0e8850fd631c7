"""Paired breast-like MR volumes (T1C master, T2W assistant) for paper 1, generated deterministically.

Why it looks the way it does (paper 1, Sec. 2 and Fig. 2): contrast-enhanced T1 (T1C) is sensitive but not
specific. The mass enhances, and so do vessels, patches of background parenchymal enhancement (BPE) in
dense glandular tissue, and the heart behind the chest wall. T2-weighted images (T2W) show the mass only
faintly against glandular tissue, but they show each of those distractors clearly: vessels, the heart and
cysts are very bright, and BPE patches are brighter than the mass. So T1C alone gives false positives and
T2W can rule them out, while T2W alone cannot find the mass. ``tests/test_synth.py`` checks this with
threshold classifiers.

A case is one patient: a volume of ``size x size x slices`` (array axes i, j, k point to the subject's
right, anterior and superior, as in RAS+). The affine has a patient-specific anisotropic spacing
(in-plane 0.6-0.8 mm, slices 1-2 mm). Shapes are drawn in voxel units, so physical sizes scale with
``size``. Everything varies smoothly with the slice index. Masses (1-2 per patient; round, lobulated,
spiculated or ill-defined) cover only some slices. When ``slices >= 2`` at least one slice of every patient
holds no mass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from modalseg.data.synth.writer import (
    bias_field,
    case_rng,
    centred_affine,
    raw_dataset_writer,
    rician,
    smooth_noise,
)
from modalseg.errors import ConfigError

BREAST_STREAM = 1
MASS_SHAPES = ("round", "lobulated", "spiculated", "ill-defined")
GENERATOR_VERSION = 1
INTENSITY_SCALE = 1000.0  # arbitrary MR units: tissue values below are fractions of this


@dataclass
class SynthCase:
    """One generated case held in memory: ``images`` in channel order, ``label`` and geometry."""

    case_id: str
    images: dict[str, np.ndarray]
    label: np.ndarray
    affine: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def check_params(*, num_patients: int, slices: int, size: int, seed: int, difficulty: float) -> None:
    """Raise :class:`ConfigError` for generator parameters that cannot give a sensible dataset."""
    if int(num_patients) < 1:
        raise ConfigError(f"number of patients must be at least 1, got {num_patients}")
    if int(slices) < 1:
        raise ConfigError(f"number of slices must be at least 1, got {slices}")
    if int(size) < 32:
        raise ConfigError(f"image size must be at least 32 pixels, got {size}")
    if int(seed) < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed}")
    if not (0.0 <= float(difficulty) <= 3.0) or math.isnan(float(difficulty)):
        raise ConfigError(f"difficulty must be between 0 and 3, got {difficulty}")


def _ellipse(u: np.ndarray, v: np.ndarray, cu, cv, au, av, angle: float = 0.0) -> np.ndarray:
    """Normalised radius of an (optionally rotated) ellipse: < 1 inside."""
    du, dv = u - cu, v - cv
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        du, dv = c * du + s * dv, -s * du + c * dv
    return np.sqrt((du / au) ** 2 + (dv / av) ** 2)


def _in_plane_distance(mask: np.ndarray) -> np.ndarray:
    """Distance (pixels) from each voxel of ``mask`` to the mask's outside, computed slice by slice."""
    out = np.zeros(mask.shape, dtype=np.float64)
    for k in range(mask.shape[2]):
        if mask[..., k].any():
            out[..., k] = ndimage.distance_transform_edt(mask[..., k])
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _composite(layers: list[tuple[np.ndarray, float | np.ndarray]], shape) -> np.ndarray:
    """Alpha-composite tissue layers (later layers cover earlier ones; alpha gives partial volumes)."""
    img = np.zeros(shape, dtype=np.float64)
    for alpha, value in layers:
        img = img * (1.0 - alpha) + alpha * value
    return img


def _draw_mass(
    rng: np.random.Generator,
    n: int,
    slices: int,
    centre: tuple[float, float],
    kc: int,
    hz: float,
    radius: float,
    shape: str,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Hard label and soft image membership of one mass, as a star-shaped radius function r_b(theta, z).

    Spiculated masses get narrow radial spikes; ill-defined ones a wide sigmoid edge in the image while the
    label stays the sharp r < r_b region (how a reader would still delineate it).
    """
    i = np.arange(n, dtype=np.float64)[:, None]
    j = np.arange(n, dtype=np.float64)[None, :]
    label = np.zeros((n, n, slices), dtype=bool)
    member = np.zeros((n, n, slices), dtype=np.float64)
    elong = rng.uniform(0.0, 0.3)
    orient = rng.uniform(0, math.pi)
    drift = rng.uniform(-0.6, 0.6, size=2)
    lobes = []
    if shape in ("lobulated", "ill-defined"):
        for m in (2, 3, 4, 5):
            lobes.append((m, rng.uniform(0.05, 0.16), rng.uniform(0, 2 * math.pi)))
    spikes = []
    if shape == "spiculated":
        for _ in range(int(rng.integers(6, 14))):
            spikes.append((rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 1.3), rng.uniform(0.05, 0.1)))
        lobes.append((3, rng.uniform(0.03, 0.08), rng.uniform(0, 2 * math.pi)))
    edge = rng.uniform(1.6, 3.0) if shape == "ill-defined" else rng.uniform(0.35, 0.6)
    twist = rng.uniform(-0.15, 0.15)
    for k in range(slices):
        dz = (k - kc) / hz
        if abs(dz) >= 1.0:
            continue
        r_k = radius * math.sqrt(1.0 - dz * dz)
        ci, cj = centre[0] + drift[0] * (k - kc), centre[1] + drift[1] * (k - kc)
        du, dv = i - ci, j - cj
        c, s = math.cos(orient), math.sin(orient)
        ru, rv = c * du + s * dv, -s * du + c * dv
        rv = rv / (1.0 - elong)
        theta = np.arctan2(rv, ru)
        r = np.sqrt(ru * ru + rv * rv)
        boundary = np.ones_like(theta)
        for m, amp, phase in lobes:
            boundary += amp * np.cos(m * theta + phase + twist * (k - kc))
        for ang, amp, width in spikes:
            d = np.angle(np.exp(1j * (theta - ang - twist * (k - kc))))
            boundary += amp * np.exp(-0.5 * (d / width) ** 2) * (1.0 - 0.5 * abs(dz))
        boundary *= r_k
        label[..., k] = r < boundary
        member[..., k] = _sigmoid((boundary - r) / edge)
    info = {
        "shape": shape,
        "radius_px": round(float(radius), 2),
        "centre_slice": int(kc),
        "half_extent_slices": round(float(hz), 2),
    }
    return label, member, info


def render_breast(
    rng: np.random.Generator,
    tissues: dict[str, np.ndarray],
    difficulty: float,
    *,
    tex_sigma: tuple[float, float, float],
    psf_sigma: tuple[float, float, float],
) -> dict[str, np.ndarray]:
    """T1C and T2W images of one case from its tissue maps (the module docstring's contrasts), float32.

    Shared by the 2D-slice generator and the 3D one (``breast3d``), so both show the same appearance; the
    draws are made in a fixed order (keep it: it fixes the bytes of every dataset). ``tex_sigma`` (gland
    texture) and ``psf_sigma`` (point-spread function) are in voxels per axis.
    """
    d = float(difficulty)
    shape = tissues["gland"].shape
    breasts, thorax, inner = tissues["breasts"], tissues["thorax"], tissues["inner"]
    lungs, heart, gland, bpe = tissues["lungs"], tissues["heart"], tissues["gland"], tissues["bpe"]
    cysts, vessels, mass_member, mass_t1_gain = tissues["cysts"], tissues["vessels"], tissues["mass"], tissues[
        "mass_t1_gain"
    ]
    jitter = lambda: rng.uniform(0.9, 1.1)  # noqa: E731  per-patient tissue intensity variation
    # ---- tissue intensities (fractions of INTENSITY_SCALE), difficulty-controlled contrasts ----
    conspicuity = float(np.clip(1.15 - 0.2 * d, 0.45, 1.2))
    distractor = float(np.clip(0.8 + 0.2 * d, 0.5, 1.4))
    gland_t1, gland_t2 = 0.3 * jitter(), 0.45 * jitter()
    mass_t1 = gland_t1 + rng.uniform(0.55, 0.75) * conspicuity
    mass_t2 = gland_t2 * (1.0 + rng.choice([-1.0, 1.0]) * rng.uniform(0.04, 0.14) * conspicuity)
    bpe_t1 = gland_t1 + rng.uniform(0.45, 0.7) * distractor
    gland_tex = 1.0 + 0.07 * smooth_noise(rng, shape, tex_sigma)
    body = (breasts | thorax).astype(np.float64)
    t1_layers = [
        (body, 0.12 * jitter() * gland_tex),  # fat (fat-suppressed)
        (thorax * 1.0, 0.27 * jitter()),  # chest wall muscle
        (inner * 1.0, 0.2 * jitter()),  # mediastinum
        (lungs * 1.0, 0.03),
        (heart * 1.0, 1.0 * distractor * jitter() * gland_tex),
        (gland, gland_t1 * gland_tex),
        (bpe, bpe_t1 * gland_tex),
        (cysts, 0.08),
        (vessels, 0.95 * distractor * jitter()),
        (mass_member, mass_t1 * mass_t1_gain),
    ]
    t2_layers = [
        (body, 0.15 * jitter() * gland_tex),
        (thorax * 1.0, 0.22 * jitter()),
        (inner * 1.0, 0.3 * jitter()),
        (lungs * 1.0, 0.03),
        (heart * 1.0, 1.0 * jitter() * gland_tex),
        (gland, gland_t2 * gland_tex),
        (bpe, (gland_t2 + rng.uniform(0.3, 0.42)) * gland_tex),
        (cysts, 1.15 * jitter()),
        (vessels, 1.0 * jitter()),
        (mass_member, mass_t2 * gland_tex),
    ]
    noise_sigma = 0.015 + 0.02 * d
    images = {}
    for name, layers, amp in (("T1C", t1_layers, 0.2), ("T2W", t2_layers, 0.25)):
        clean = _composite(layers, shape)
        clean = ndimage.gaussian_filter(clean, sigma=psf_sigma)  # point-spread function
        clean *= bias_field(rng, shape, amp)
        noisy = rician(rng, clean, noise_sigma)
        images[name] = (noisy * INTENSITY_SCALE).astype(np.float32)

    return images


def synth_breast_case(
    seed: int, index: int, *, slices: int = 6, size: int = 128, difficulty: float = 1.0
) -> SynthCase:
    """Generate patient ``index`` of the breast dataset with ``seed`` (independent of the patient count)."""
    check_params(num_patients=1, slices=slices, size=size, seed=seed, difficulty=difficulty)
    rng = case_rng(seed, BREAST_STREAM, index)
    n, S, d = int(size), int(slices), float(difficulty)
    shape = (n, n, S)
    coords = (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) / (n / 2.0)
    u = np.broadcast_to(coords[:, None, None], shape)  # right-left, in [-1, 1]
    v = np.broadcast_to(coords[None, :, None], shape)  # posterior (-1) to anterior (+1)
    t = np.linspace(-1.0, 1.0, S)[None, None, :] if S > 1 else np.zeros((1, 1, 1))

    spacing = (rng.uniform(0.6, 0.8),) * 2 + (rng.uniform(1.0, 2.0),)

    # ---- anatomy: thorax at the posterior side, two prone breasts hanging anteriorly ----
    vc = rng.uniform(-0.6, -0.45)  # chest wall
    t0 = rng.uniform(-0.3, 0.3)
    g = np.sqrt(np.clip(1.0 - 0.3 * (t - t0) ** 2, 0.2, None))  # breasts shrink away from the centre slice
    breasts = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        ub = side * rng.uniform(0.44, 0.52)
        a, b = rng.uniform(0.36, 0.46) * g, rng.uniform(0.75, 1.0) * g
        q = _ellipse(u, v, ub, vc, a, b)
        breasts |= (q < 1.0) & (v > vc - 0.02)
    thorax = _ellipse(u, v, 0.0, vc - 0.6, 0.98, 0.62) < 1.0
    breast_region = breasts & ~thorax
    inner = _ellipse(u, v, 0.0, vc - 0.62, 0.86, 0.5) < 1.0
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        lungs |= _ellipse(u, v, side * 0.42, vc - 0.7, 0.34 * rng.uniform(0.9, 1.1), 0.42) < 1.0
    th = rng.uniform(-0.5, 0.5)
    gh = np.sqrt(np.clip(1.0 - ((t - th) / rng.uniform(1.3, 2.2)) ** 2, 0.05, None))
    heart = (
        _ellipse(
            u,
            v,
            rng.uniform(-0.05, 0.15),
            vc - rng.uniform(0.33, 0.4),
            rng.uniform(0.26, 0.33) * gh,
            rng.uniform(0.19, 0.24) * gh,
            rng.uniform(-0.4, 0.4),
        )
        < 1.0
    )
    heart &= inner
    lungs &= inner & ~heart

    # ---- fibroglandular tissue: textured, thresholded smooth noise, fat towards the skin ----
    depth = _in_plane_distance(breast_region)
    gland = glandular_tissue(rng, breast_region, depth, n, (n * 0.012, n * 0.012, 0.7), (n * 0.04, n * 0.04, 1.0))

    # ---- background parenchymal enhancement patches inside glandular tissue ----
    n_bpe = int(rng.poisson(1.5 * d)) + (1 if d > 0 else 0)
    bpe = np.zeros(shape)
    i_idx = np.arange(n, dtype=np.float64)[:, None, None]
    j_idx = np.arange(n, dtype=np.float64)[None, :, None]
    k_idx = np.arange(S, dtype=np.float64)[None, None, :]
    gland_vox = np.argwhere(gland > 0.5)
    for _ in range(n_bpe):
        if len(gland_vox) == 0:
            break
        ci, cj, ck = gland_vox[rng.integers(len(gland_vox))]
        r = rng.uniform(0.05, 0.12) * n
        blob = ((i_idx - ci) ** 2 + (j_idx - cj) ** 2) / r**2 + ((k_idx - ck) / rng.uniform(1.0, 2.5)) ** 2
        bpe = np.maximum(bpe, np.exp(-blob * 1.5))
    bpe = np.clip((bpe - 0.25) / 0.5, 0.0, 1.0) * gland

    # ---- masses (label 1), with at least one mass-free slice when slices >= 2 ----
    label = np.zeros(shape, dtype=bool)
    mass_member = np.zeros(shape)
    mass_t1_gain = np.ones(shape)
    free = int(rng.choice([0, S - 1])) if S >= 2 else -1
    n_mass = 1 + int(rng.random() < 0.4)
    masses = []
    for _ in range(n_mass):
        small = rng.random() < 0.3
        radius = max(2.2, (rng.uniform(0.02, 0.035) if small else rng.uniform(0.035, 0.085)) * n)
        if S >= 2:
            # centre slice away from the mass-free slice, so that the mass can span several slices
            far = [k for k in range(S) if abs(k - free) >= min(2, S - 1)]
            kc = int(rng.choice(far))
            hz = min(rng.uniform(0.9, 2.4), abs(kc - free) - 0.01)
        else:
            kc, hz = 0, 1.0
        cand = np.argwhere(
            (depth[..., kc] > radius + 2) & (gland[..., kc] > 0.5 if rng.random() < 0.8 else True)
        )
        if len(cand) == 0:
            cand = np.argwhere(depth[..., kc] > min(radius + 2, depth[..., kc].max() * 0.7))
        ci, cj = cand[rng.integers(len(cand))]
        shape_name = str(rng.choice(MASS_SHAPES))
        lab, mem, info = _draw_mass(rng, n, S, (float(ci), float(cj)), kc, hz, radius, shape_name)
        label |= lab & breast_region
        mass_member = np.maximum(mass_member, mem * breast_region)
        if rng.random() < 0.3:  # rim enhancement
            dist = ndimage.distance_transform_edt(lab, sampling=(1.0, 1.0, 50.0))
            rim = np.clip(dist / max(radius * 0.5, 1.0), 0.0, 1.0)
            mass_t1_gain = np.where(lab, 1.15 - 0.35 * rim, mass_t1_gain)
        masses.append(info)
    mass_t1_gain = mass_t1_gain * (1.0 + 0.08 * smooth_noise(rng, shape, (1.2, 1.2, 0.5)))

    # ---- cysts: dark on T1C, very bright on T2W ----
    def cyst(ci: int, cj: int, ck: int) -> tuple[np.ndarray, float]:
        r = rng.uniform(0.015, 0.04) * n + 1.0
        return np.sqrt(((i_idx - ci) ** 2 + (j_idx - cj) ** 2) / r**2 + ((k_idx - ck) / 1.2) ** 2), r

    cysts = draw_cysts(rng, breast_region, depth, label, d, cyst)

    # ---- vessels: thin tubes from the chest wall towards the nipple, plus internal mammary vessels ----
    skel = np.zeros(shape, dtype=bool)
    n_vessels = 2 + int(rng.poisson(2.5 * d))
    for _ in range(n_vessels):
        side = rng.choice([-1.0, 1.0])
        p0 = np.array([side * rng.uniform(0.2, 0.7), vc + rng.uniform(0.0, 0.08), rng.uniform(0, S - 1)])
        ang = math.pi / 2 + rng.uniform(-0.8, 0.8)
        length = rng.uniform(0.3, 0.65)
        dzds = rng.uniform(-2.0, 2.0) / max(length, 1e-6)
        amp, freq, ph = rng.uniform(0.01, 0.05), rng.uniform(1.0, 3.0), rng.uniform(0, 2 * math.pi)
        s = np.linspace(0.0, length, 4 * n)
        pu = p0[0] + s * math.cos(ang) - amp * np.sin(2 * math.pi * freq * s / length + ph) * math.sin(ang)
        pv = p0[1] + s * math.sin(ang) + amp * np.sin(2 * math.pi * freq * s / length + ph) * math.cos(ang)
        mark_path(skel, pu, pv, np.rint(p0[2] + dzds * s).astype(int))
    vessels = vessel_tissue(rng, skel, vc, (1.0, 1.0, 4.0), breasts | thorax, label, cysts)

    tissues = {
        "breasts": breasts, "thorax": thorax, "inner": inner, "lungs": lungs, "heart": heart, "gland": gland,
        "bpe": bpe, "cysts": cysts, "vessels": vessels, "mass": mass_member, "mass_t1_gain": mass_t1_gain,
    }
    return finish_breast_case(f"breast_{index:03d}", rng, tissues, d, label, spacing, masses, n_vessels, n_bpe,
                              tex_sigma=(0.8, 0.8, 0.5), psf_sigma=(0.5, 0.5, 0.0))


def draw_cysts(
    rng: np.random.Generator, breast_region: np.ndarray, depth: np.ndarray, label: np.ndarray, d: float,
    cyst: Callable[[int, int, int], tuple[np.ndarray, float]],
) -> np.ndarray:
    """Cysts (dark on T1C, very bright on T2W): Poisson(0.8 d) soft spheres centred on breast voxels deeper than 3
    pixels outside the masses; ``cyst(i, j, k)`` draws one's radius and gives its normalised distance map and
    its radius in pixels (the sphere's shape is the generator's: per slice in 2D, in mm in 3D)."""
    cysts = np.zeros(breast_region.shape)
    for _ in range(int(rng.poisson(0.8 * d))):
        cand = np.argwhere(breast_region & (depth > 3) & ~label)
        if len(cand) == 0:
            break
        dist, r_px = cyst(*cand[rng.integers(len(cand))])
        cysts = np.maximum(cysts, _sigmoid((1.0 - dist) * r_px / 0.5))
    cysts *= breast_region & ~label
    return cysts


def mark_path(skel: np.ndarray, pu: np.ndarray, pv: np.ndarray, pk: np.ndarray) -> None:
    """Set the voxels of a vessel's centre line in ``skel`` (``pu``, ``pv`` in half-FOV units, ``pk`` slice
    indices); points outside the volume are dropped."""
    n, _, slices = skel.shape
    pi_ = np.rint(pu * n / 2 + (n - 1) / 2).astype(int)
    pj = np.rint(pv * n / 2 + (n - 1) / 2).astype(int)
    ok = (pi_ >= 0) & (pi_ < n) & (pj >= 0) & (pj < n) & (pk >= 0) & (pk < slices)
    skel[pi_[ok], pj[ok], pk[ok]] = True


def vessel_tissue(
    rng: np.random.Generator, skel: np.ndarray, vc: float, sampling: tuple[float, float, float], body: np.ndarray,
    label: np.ndarray, cysts: np.ndarray,
) -> np.ndarray:
    """Soft vessel map: the centre lines ``skel`` plus the internal mammary vessels beside the sternum (through
    all slices; ``vc`` is the chest wall), widened to a random radius (distances in pixels by ``sampling``)
    inside ``body``. A vessel does not run through a mass or a cyst."""
    n = skel.shape[0]
    for side in (-1.0, 1.0):
        ci = int(round((side * rng.uniform(0.12, 0.2)) * n / 2 + (n - 1) / 2))
        cj = int(round((vc - 0.07) * n / 2 + (n - 1) / 2))
        if 0 <= cj < n:
            skel[ci, cj, :] = True
    vessel_r = max(0.7, rng.uniform(0.006, 0.011) * n)
    vdist = ndimage.distance_transform_edt(~skel, sampling=sampling) if skel.any() else np.full(skel.shape, 1e9)
    vessels = _sigmoid((vessel_r - vdist) / 0.35) * body
    vessels *= 1.0 - (label | (cysts > 0.5))
    return vessels


def glandular_tissue(
    rng: np.random.Generator, breast_region: np.ndarray, depth: np.ndarray, n: int,
    fine_sigma: tuple[float, float, float], coarse_sigma: tuple[float, float, float],
) -> np.ndarray:
    """Fibroglandular tissue: two-scale noise plus depth below the skin, thresholded at a random density
    (15-50 % of the breast's inner voxels); shared by the 2D and 3D generators (their noise scales differ)."""
    shape = breast_region.shape
    texture = 0.6 * smooth_noise(rng, shape, fine_sigma) + 0.8 * smooth_noise(rng, shape, coarse_sigma)
    score = texture + 1.6 * np.clip(depth / (n * 0.07), 0.0, 1.0)
    density = rng.uniform(0.15, 0.5)
    inside = breast_region & (depth > 1.5)
    thr = np.quantile(score[inside], 1.0 - density) if inside.any() else np.inf
    return _sigmoid((score - thr) / 0.12) * inside


def finish_breast_case(
    name: str, rng: np.random.Generator, tissues: dict[str, np.ndarray], d: float, label: np.ndarray,
    spacing: tuple[float, ...], masses: list, n_vessels: int, n_bpe: int, *,
    tex_sigma: tuple[float, float, float], psf_sigma: tuple[float, float, float],
) -> SynthCase:
    """Render the tissues (:func:`render_breast`) and describe the case; shared by the 2D and 3D generators."""
    images = render_breast(rng, tissues, d, tex_sigma=tex_sigma, psf_sigma=psf_sigma)
    lab = label.astype(np.uint8)
    info = {
        "spacing": [round(float(s), 4) for s in spacing],
        "masses": masses,
        "mass_slices": [int(k) for k in range(lab.shape[2]) if lab[..., k].any()],
        "distractors": {"vessels": n_vessels, "bpe_patches": n_bpe,
                        "cysts": int((tissues["cysts"] > 0.5).any())},
    }
    return SynthCase(name, images, lab, centred_affine(lab.shape, spacing), info)


def make_breast_dataset(
    out_dir: str | Path,
    *,
    num_patients: int = 12,
    slices: int = 6,
    size: int = 128,
    seed: int = 0,
    difficulty: float = 1.0,
    overwrite: bool = False,
) -> Path:
    """Write the paired SynthBreast dataset (nnU-Net raw; channel 0 = T1C, 1 = T2W) and return its folder."""
    check_params(num_patients=num_patients, slices=slices, size=size, seed=seed, difficulty=difficulty)
    out_dir = Path(out_dir)
    params = {
        "generator": "breast",
        "version": GENERATOR_VERSION,
        "num_patients": int(num_patients),
        "slices": int(slices),
        "size": int(size),
        "seed": int(seed),
        "difficulty": float(difficulty),
    }
    cases = (synth_breast_case(seed, index, slices=slices, size=size, difficulty=difficulty)
             for index in range(int(num_patients)))
    description = ("Synthetic paired breast-like MR (T1C master, T2W assistant) generated by modalseg; T1C enhances "
                   "masses and distractors (vessels, BPE, heart), T2W rules the distractors out.")
    write_breast_dataset(out_dir, cases, name="SynthBreast", description=description, params=params,
                         overwrite=overwrite)
    return out_dir


def write_breast_dataset(out_dir: str | Path, cases: Iterable[SynthCase], *, name: str, description: str,
                         params: dict, overwrite: bool) -> Path:
    """Write paired breast cases (channel 0 = T1C, 1 = T2W) as an nnU-Net raw dataset (2D and 3D generators)."""
    infos = {}
    with raw_dataset_writer(out_dir, overwrite=overwrite) as writer:
        for case in cases:
            writer.write_image(case.case_id, 0, case.images["T1C"], case.affine)
            writer.write_image(case.case_id, 1, case.images["T2W"], case.affine)
            writer.write_label(case.case_id, case.label, case.affine)
            infos[case.case_id] = case.info
        writer.set_dataset_json(
            {
                "name": name,
                "description": description,
                "channel_names": {"0": "T1C", "1": "T2W"},
                "labels": {"background": 0, "mass": 1},
                "numTraining": len(infos),
                "file_ending": ".nii.gz",
                "modalseg_synth": {**params, "cases": infos},
            }
        )
    return Path(out_dir)
