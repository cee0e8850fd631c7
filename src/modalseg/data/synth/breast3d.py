"""Paired breast-like 3D MR volumes (T1C master, T2W assistant): lesions are ellipsoids spanning several slices.

Why a second generator: the slice generator (:mod:`modalseg.data.synth.breast`) draws its shapes per slice in
slice-index units (a few thick slices around the labelled centre, paper 1's setting), so its masses cover one
to five slices whatever the spacing. A 3D network needs volumes whose anatomy is three-dimensional in physical
space: here every shape is drawn in one set of coordinates with the same unit on all axes (fractions of half
the in-plane field of view), so an ellipsoid is an ellipsoid in millimetres, on isotropic and on thick-slice
grids alike (``slice_thickness_mm`` > ``in_plane_mm``), and the affine carries that spacing.

The appearance is the slice generator's (one shared :func:`~modalseg.data.synth.breast.render_breast`): T1C
enhances the masses and, as distractors, vessels, background parenchymal enhancement (BPE) and the heart; T2W
shows the mass faintly but each distractor clearly (cysts, vessels and the heart very bright). Every mass has a
T1C rim brighter than its core, measured in 3D (a shell, not a ring per slice); in about a third of the masses the
core is markedly darker (a necrotic-looking, strongly rim-enhancing lesion). Both channels share one grid and
one anatomy (paired data).

Guarantees (tested): every mass spans at least 3 slices (its z semi-axis is at least 1.25 slice steps divided by
the smallest value of its boundary function, and its centre slice has a slice on both sides inside the breast),
so the 3D label is never a single-slice blob; equal seeds give equal bytes; the random streams are new ones, so
the slice generator's datasets are unchanged. The price of the guarantee on very thick slices (6.5 mm against
0.7 mm in-plane on a 64-pixel grid) is masses elongated along z.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from modalseg.data.synth.breast import (
    MASS_SHAPES,
    SynthCase,
    _sigmoid,
    check_params,
    draw_cysts,
    finish_breast_case,
    glandular_tissue,
    mark_path,
    vessel_tissue,
    write_breast_dataset,
)
from modalseg.data.synth.writer import case_rng, smooth_noise
from modalseg.errors import ConfigError

__all__ = [
    "BREAST_3D_STREAM",
    "GENERATOR_3D_VERSION",
    "check_params_3d",
    "default_slices",
    "rim_gain",
    "make_breast_dataset_3d",
    "synth_breast_case_3d",
    "volume_grid",
]

#: Random stream of the 3D breast cases (the slice generator uses 1, the cardiac one 2 and 3).
BREAST_3D_STREAM = 11
GENERATOR_3D_VERSION = 1
#: Breast z coverage of the default slice count: w in [-0.55, 0.55] (half field-of-view units).
_BREAST_Z_COVERAGE = 1.1


def check_params_3d(
    *, num_patients: int, size: int, slices: int, in_plane_mm: float, slice_thickness_mm: float, seed: int,
    difficulty: float,
) -> None:
    """:class:`ConfigError` for 3D generator parameters that cannot give a sensible volume (one line each)."""
    if int(size) < 16:
        raise ConfigError(f"3D image size must be at least 16 pixels, got {size}")
    if int(slices) < 3:
        raise ConfigError(f"3D volumes need at least 3 slices (lesions span 3), got {slices}")
    for name, value in (("in-plane spacing", in_plane_mm), ("slice thickness", slice_thickness_mm)):
        if not (math.isfinite(float(value)) and float(value) > 0):
            raise ConfigError(f"{name} must be a positive number of mm, got {value}")
    check_params(num_patients=num_patients, slices=slices, size=32, seed=seed, difficulty=difficulty)


def default_slices(size: int, in_plane_mm: float, slice_thickness_mm: float, coverage: float, minimum: int) -> int:
    """Slices that cover ``coverage`` half-fields-of-view along z (at least ``minimum``)."""
    half_fov_mm = float(size) / 2.0 * float(in_plane_mm)
    return max(int(minimum), int(round(coverage * half_fov_mm / float(slice_thickness_mm))))


def volume_grid(
    size: int, slices: int, in_plane_mm: float, slice_thickness_mm: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Coordinates ``u, v, w`` (broadcastable to ``(size, size, slices)``) in half-FOV units, and one slice step.

    ``u`` runs right-left and ``v`` posterior-anterior in [-1, 1]; ``w`` is the slice axis in the same physical
    unit, centred on the middle slice. The returned step is one slice's thickness in that unit.
    """
    n, s = int(size), int(slices)
    half = n / 2.0
    coords = (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) / half
    step = float(slice_thickness_mm) / (float(in_plane_mm) * half)
    w = (np.arange(s, dtype=np.float64) - (s - 1) / 2.0) * step
    return coords[:, None, None], coords[None, :, None], w[None, None, :], step


def _ellipsoid(u, v, w, centre, axes, angle: float = 0.0) -> np.ndarray:
    """Normalised radius of an ellipsoid rotated by ``angle`` about the slice axis: < 1 inside."""
    du, dv, dw = u - centre[0], v - centre[1], w - centre[2]
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        du, dv = c * du + s * dv, -s * du + c * dv
    return np.sqrt((du / axes[0]) ** 2 + (dv / axes[1]) ** 2 + (dw / axes[2]) ** 2)


def rim_gain(label: np.ndarray, radius_px: float, strong: bool, sampling: tuple[float, ...]) -> np.ndarray:
    """T1C enhancement factor of one mass: highest on its surface, falling to the core over half its radius.

    Distances are 3D (``sampling`` in pixels per axis), so the rim is a shell that also caps the mass above and
    below, not a ring per slice. ``strong``: 1.25 at the surface to 0.75 in the core (a necrotic-looking core);
    otherwise 1.1 to 0.9.
    """
    dist = ndimage.distance_transform_edt(label, sampling=sampling) if label.any() else np.zeros(label.shape)
    depth = np.clip((dist - 1.0) / max(radius_px * 0.5, 1.0), 0.0, 1.0)  # 0 on the outermost voxels
    return (1.25 - 0.5 * depth) if strong else (1.1 - 0.2 * depth)


def _draw_mass_3d(
    rng: np.random.Generator,
    grid: tuple[np.ndarray, np.ndarray, np.ndarray],
    centre: tuple[float, float, float],
    radius: float,
    step: float,
    shape_name: str,
    px: float,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Label and soft membership of one mass: a star-shaped ellipsoid ``rho < b(direction)``.

    ``radius`` is the in-plane semi-axis (half-FOV units); ``px`` is one pixel in those units (edge widths).
    """
    u, v, w = grid
    elong = rng.uniform(0.0, 0.3)
    orient = rng.uniform(0, math.pi)
    lobes = []
    if shape_name in ("lobulated", "ill-defined"):
        for m in (2, 3, 4, 5):
            lobes.append((m, rng.uniform(0.05, 0.16), rng.uniform(0, 2 * math.pi), rng.uniform(0, math.pi)))
    spikes = []
    if shape_name == "spiculated":
        for _ in range(int(rng.integers(6, 14))):
            d = rng.standard_normal(3)
            spikes.append((d / (np.linalg.norm(d) + 1e-12), rng.uniform(0.5, 1.3), rng.uniform(0.12, 0.22)))
        lobes.append((3, rng.uniform(0.03, 0.08), rng.uniform(0, 2 * math.pi), rng.uniform(0, math.pi)))
    edge = rng.uniform(1.6, 3.0) if shape_name == "ill-defined" else rng.uniform(0.35, 0.6)
    b_min = max(0.3, 1.0 - sum(amp for _, amp, _, _ in lobes))
    # z semi-axis: about the in-plane size (an ellipsoid in mm), but long enough for kc - 1 .. kc + 1
    c_axis = max(radius * rng.uniform(0.8, 1.2), 1.25 * step / b_min)
    du, dv, dw = u - centre[0], v - centre[1], w - centre[2]
    cos_o, sin_o = math.cos(orient), math.sin(orient)
    ru = (cos_o * du + sin_o * dv) / radius
    rv = (-sin_o * du + cos_o * dv) / (radius * (1.0 - elong))
    rw = dw / c_axis
    rho = np.sqrt(ru * ru + rv * rv + rw * rw)
    theta = np.arctan2(rv, ru)
    elev = np.arctan2(rw, np.sqrt(ru * ru + rv * rv))
    boundary = np.ones(np.broadcast_shapes(ru.shape, rw.shape))
    for m, amp, phase, tilt in lobes:
        boundary += amp * np.cos(m * theta + phase) * np.cos(elev) ** 2 + 0.5 * amp * np.cos(m * elev + tilt)
    if spikes:
        safe = np.maximum(rho, 1e-9)
        for direction, amp, width in spikes:
            cosang = (ru * direction[0] + rv * direction[1] + rw * direction[2]) / safe
            ang = np.arccos(np.clip(cosang, -1.0, 1.0))
            boundary += amp * np.exp(-0.5 * (ang / width) ** 2)
    label = rho < boundary
    member = _sigmoid((boundary - rho) * radius / (edge * px))
    info = {
        "shape": shape_name,
        "radius_px": round(float(radius / px), 2),
        "z_semi_axis_slices": round(float(c_axis / step), 2),
    }
    return label, member, info


def synth_breast_case_3d(
    seed: int,
    index: int,
    *,
    size: int = 64,
    slices: int | None = None,
    in_plane_mm: float = 0.7,
    slice_thickness_mm: float | None = None,
    difficulty: float = 1.0,
) -> SynthCase:
    """Patient ``index`` of the 3D breast dataset (independent of the patient count; module docstring).

    ``slice_thickness_mm`` ``None`` gives isotropic voxels; ``slices`` ``None`` covers the breasts along z.
    """
    thick = float(in_plane_mm if slice_thickness_mm is None else slice_thickness_mm)
    S = default_slices(size, in_plane_mm, thick, _BREAST_Z_COVERAGE, 5) if slices is None else int(slices)
    check_params_3d(
        num_patients=1, size=size, slices=S, in_plane_mm=in_plane_mm, slice_thickness_mm=thick, seed=seed,
        difficulty=difficulty,
    )
    rng = case_rng(seed, BREAST_3D_STREAM, index)
    n, d = int(size), float(difficulty)
    shape = (n, n, S)
    spacing = (float(in_plane_mm), float(in_plane_mm), thick)
    u, v, w, step = volume_grid(n, S, in_plane_mm, thick)
    px = 2.0 / n  # one pixel in half-FOV units
    zs = spacing[0] / spacing[2]  # a voxel width of the in-plane axes, in slices
    sampling = (1.0, 1.0, 1.0 / zs)  # distances in pixels
    z_half = (S - 1) / 2.0 * step

    def full(mask: np.ndarray) -> np.ndarray:
        return np.broadcast_to(mask, shape).copy()

    # ---- anatomy: thorax (a long elliptic cylinder) at the posterior side, two prone breasts (ellipsoids) ----
    vc = rng.uniform(-0.6, -0.45)
    w0 = rng.uniform(-0.1, 0.1) * max(z_half, step)
    breasts = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        ub = side * rng.uniform(0.44, 0.52)
        axes = (rng.uniform(0.36, 0.46), rng.uniform(0.75, 1.0), rng.uniform(0.42, 0.55))
        breasts |= (_ellipsoid(u, v, w, (ub, vc, w0), axes) < 1.0) & (v > vc - 0.02)
    zero = np.zeros_like(w)
    thorax = full(_ellipsoid(u, v, zero, (0.0, vc - 0.6, 0.0), (0.98, 0.62, 1.0)) < 1.0)
    breast_region = breasts & ~thorax
    inner = full(_ellipsoid(u, v, zero, (0.0, vc - 0.62, 0.0), (0.86, 0.5, 1.0)) < 1.0)
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        lungs |= _ellipsoid(u, v, zero, (side * 0.42, vc - 0.7, 0.0), (0.34 * rng.uniform(0.9, 1.1), 0.42, 1.0)) < 1.0
    heart_centre = (rng.uniform(-0.05, 0.15), vc - rng.uniform(0.33, 0.4), rng.uniform(-0.3, 0.3) * max(z_half, step))
    heart_axes = (rng.uniform(0.26, 0.33), rng.uniform(0.19, 0.24), rng.uniform(0.25, 0.35))
    heart = (_ellipsoid(u, v, w, heart_centre, heart_axes, rng.uniform(-0.4, 0.4)) < 1.0) & inner
    lungs &= inner & ~heart

    # ---- fibroglandular tissue: textured 3D noise, thresholded, fat towards the skin ----
    depth = ndimage.distance_transform_edt(breast_region, sampling=sampling) if breast_region.any() else np.zeros(shape)
    gland = glandular_tissue(rng, breast_region, depth, n, (n * 0.012, n * 0.012, n * 0.012 * zs),
                             (n * 0.04, n * 0.04, n * 0.04 * zs))

    # ---- background parenchymal enhancement: ellipsoidal blobs in glandular tissue ----
    n_bpe = int(rng.poisson(1.5 * d)) + (1 if d > 0 else 0)
    bpe = np.zeros(shape)
    gland_vox = np.argwhere(gland > 0.5)
    for _ in range(n_bpe):
        if len(gland_vox) == 0:
            break
        ci, cj, ck = gland_vox[rng.integers(len(gland_vox))]
        r = rng.uniform(0.1, 0.24)
        centre = (u[ci, 0, 0], v[0, cj, 0], w[0, 0, ck])
        blob = _ellipsoid(u, v, w, centre, (r, r, r * rng.uniform(0.6, 1.2))) ** 2
        bpe = np.maximum(bpe, np.exp(-blob * 1.5))
    bpe = np.clip((bpe - 0.25) / 0.5, 0.0, 1.0) * gland

    # ---- masses (label 1): centred on a slice with a breast slice on both sides ----
    label = np.zeros(shape, dtype=bool)
    mass_member = np.zeros(shape)
    mass_t1_gain = np.ones(shape)
    n_mass = 1 + int(rng.random() < 0.4)
    masses = []
    middle = np.zeros(S, dtype=bool)
    middle[1 : S - 1] = True
    three = breast_region & np.roll(breast_region, 1, axis=2) & np.roll(breast_region, -1, axis=2) & middle
    for _ in range(n_mass):
        small = rng.random() < 0.3
        radius_px = max(2.2, (rng.uniform(0.02, 0.035) if small else rng.uniform(0.035, 0.085)) * n)
        in_gland = rng.random() < 0.8
        cand = np.argwhere(three & (depth > radius_px + 1) & ((gland > 0.5) if in_gland else True))
        if len(cand) == 0 and three.any():
            cand = np.argwhere(three & (depth >= depth[three].max() * 0.7))
        if len(cand) == 0:  # no breast tissue on three slices (a degenerate grid): the middle of the volume
            cand = np.array([[n // 2, n // 2, S // 2]])
        ci, cj, ck = cand[rng.integers(len(cand))]
        shape_name = str(rng.choice(MASS_SHAPES))
        centre = (float(u[ci, 0, 0]), float(v[0, cj, 0]), float(w[0, 0, ck]))
        lab, mem, info = _draw_mass_3d(rng, (u, v, w), centre, radius_px * px, step, shape_name, px)
        if three.any():
            lab = lab & breast_region
        # one lesion: the part connected to its centre (spikes cut off by the breast outline are dropped, and so
        # is their appearance beyond two pixels)
        parts, _ = ndimage.label(lab)
        lab = parts == parts[ci, cj, ck]
        near = ndimage.distance_transform_edt(~lab, sampling=sampling) <= 2.0
        label |= lab
        mass_member = np.maximum(mass_member, mem * breast_region * near)
        strong = rng.random() < 0.35
        mass_t1_gain = np.where(lab, rim_gain(lab, radius_px, strong, sampling), mass_t1_gain)
        spanned = np.flatnonzero(lab.any(axis=(0, 1)))
        info.update(
            centre_voxel=[int(ci), int(cj), int(ck)],
            rim="strong" if strong else "mild",
            slices=[int(spanned.min()), int(spanned.max())] if spanned.size else [],
        )
        masses.append(info)
    mass_t1_gain = mass_t1_gain * (1.0 + 0.08 * smooth_noise(rng, shape, (1.2, 1.2, 1.2 * zs)))

    # ---- cysts: spheres, dark on T1C, very bright on T2W ----
    def cyst(ci: int, cj: int, ck: int) -> tuple[np.ndarray, float]:
        r = rng.uniform(0.03, 0.08) + px
        return _ellipsoid(u, v, w, (u[ci, 0, 0], v[0, cj, 0], w[0, 0, ck]), (r, r, r)), r / px

    cysts = draw_cysts(rng, breast_region, depth, label, d, cyst)

    # ---- vessels: 3D tubes from the chest wall towards the nipple, internal mammary vessels along z ----
    skel = np.zeros(shape, dtype=bool)
    n_vessels = 2 + int(rng.poisson(2.5 * d))
    for _ in range(n_vessels):
        side = rng.choice([-1.0, 1.0])
        p0 = np.array([side * rng.uniform(0.2, 0.7), vc + rng.uniform(0.0, 0.08), rng.uniform(-1.0, 1.0) * z_half])
        ang, elev = math.pi / 2 + rng.uniform(-0.8, 0.8), rng.uniform(-0.5, 0.5)
        length = rng.uniform(0.3, 0.65)
        amp, freq, ph = rng.uniform(0.01, 0.05), rng.uniform(1.0, 3.0), rng.uniform(0, 2 * math.pi)
        s = np.linspace(0.0, length, 4 * n)
        wiggle = amp * np.sin(2 * math.pi * freq * s / length + ph)
        pu = p0[0] + s * math.cos(ang) * math.cos(elev) - wiggle * math.sin(ang)
        pv = p0[1] + s * math.sin(ang) * math.cos(elev) + wiggle * math.cos(ang)
        pw = p0[2] + s * math.sin(elev)
        mark_path(skel, pu, pv, np.rint(pw / step + (S - 1) / 2).astype(int))
    vessels = vessel_tissue(rng, skel, vc, sampling, breasts | thorax, label, cysts)

    tissues = {
        "breasts": breasts, "thorax": thorax, "inner": inner, "lungs": lungs, "heart": heart, "gland": gland,
        "bpe": bpe, "cysts": cysts, "vessels": vessels, "mass": mass_member, "mass_t1_gain": mass_t1_gain,
    }
    return finish_breast_case(f"breast3d_{index:03d}", rng, tissues, d, label, spacing, masses, n_vessels, n_bpe,
                              tex_sigma=(0.8, 0.8, 0.8 * zs), psf_sigma=(0.5, 0.5, 0.5 * zs))


def make_breast_dataset_3d(
    out_dir: str | Path,
    *,
    num_patients: int = 4,
    size: int = 64,
    slices: int | None = None,
    in_plane_mm: float = 0.7,
    slice_thickness_mm: float | None = None,
    seed: int = 0,
    difficulty: float = 1.0,
    overwrite: bool = False,
) -> Path:
    """Write the paired SynthBreast3D dataset (nnU-Net raw; channel 0 = T1C, 1 = T2W) and return its folder.

    All cases share the grid ``size x size x slices`` with spacing ``(in_plane_mm, in_plane_mm,
    slice_thickness_mm)`` (isotropic when the thickness is ``None``); ``dataset.json`` records it under
    ``modalseg_synth`` with ``"dims": 3``.
    """
    thick = float(in_plane_mm if slice_thickness_mm is None else slice_thickness_mm)
    S = default_slices(size, in_plane_mm, thick, _BREAST_Z_COVERAGE, 5) if slices is None else int(slices)
    check_params_3d(
        num_patients=num_patients, size=size, slices=S, in_plane_mm=in_plane_mm, slice_thickness_mm=thick,
        seed=seed, difficulty=difficulty,
    )
    params = {
        "generator": "breast3d",
        "version": GENERATOR_3D_VERSION,
        "dims": 3,
        "num_patients": int(num_patients),
        "size": int(size),
        "slices": S,
        "spacing": [float(in_plane_mm), float(in_plane_mm), thick],
        "seed": int(seed),
        "difficulty": float(difficulty),
    }
    cases = (synth_breast_case_3d(seed, index, size=size, slices=S, in_plane_mm=in_plane_mm,
                                  slice_thickness_mm=thick, difficulty=difficulty)
             for index in range(int(num_patients)))
    description = ("Synthetic paired breast-like 3D MR (T1C master, T2W assistant) generated by modalseg; "
                   "ellipsoidal masses spanning several slices with a T1C-enhancing rim; T1C enhances masses and "
                   "distractors (vessels, BPE, heart), T2W rules the distractors out.")
    write_breast_dataset(out_dir, cases, name="SynthBreast3D", description=description, params=params,
                         overwrite=overwrite)
    return Path(out_dir)
