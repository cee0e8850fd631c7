"""Unpaired cardiac-like 3D volumes (CT-like and MR-like) for paper 2's setting with 3D networks.

Why a second generator: the slice generator (:mod:`modalseg.data.synth.cardiac`) draws one short-axis ring per
slice, indexed by the slice number, so its heart has the same extent whatever the spacing and never closes at
the apex. Here the heart is one 3D object in physical units (in-plane pixels on every axis): the LV blood pool is
a half prolate ellipsoid whose long axis runs along the slice axis (short-axis stacks) with a small tilt, open at
the base and closed at the apex; the myocardium is a shell around it of varying thickness, capping the apex; the
RV is a shorter, flatter-ended half ellipsoid beside the septum minus the LV, with its own (in-plane) wall;
papillary muscles are columns in the mid-ventricle (labelled LV, as readers do). Body, subcutaneous fat, lungs,
descending aorta and spine run along the slice axis. On thick-slice grids the long axis is stretched to at least
five slices (the RV to four), so that every structure spans several slices; from 24 pixels on, LV, myocardium and
RV each cover at least three slices (at 16 pixels the RV can vanish).

The modality gap is the slice generator's: the same tissue tables and the same rendering
(:func:`modalseg.data.synth.cardiac._render`: CT in HU, int16, fine-grain noise, no bias field; MR bSSFP-like,
float32, flow inhomogeneity, bias field, Rician noise; ``modality_gap`` moves MR's contrast towards CT's), with
every smoothing extended across slices by its in-plane width in mm. Each modality has its own subjects (own
random streams, new ones, so the slice generator's datasets are unchanged); label values are MS-CMRSeg's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from modalseg.data.synth.breast import SynthCase
from modalseg.data.synth.breast3d import GENERATOR_3D_VERSION, check_params_3d, default_slices
from modalseg.data.synth.cardiac import (
    LABEL_VALUES,
    _check_gap,
    _check_modality,
    _label,
    _render,
    _rotated,
    modality_counts,
    write_cardiac_dataset,
)
from modalseg.data.synth.writer import case_rng, centred_affine

__all__ = [
    "CARDIAC_3D_STREAMS",
    "IN_PLANE_MM",
    "make_cardiac_dataset_3d",
    "synth_cardiac_case_3d",
]

#: Random streams of the 3D cardiac cases per modality (the slice generator uses 2 and 3).
CARDIAC_3D_STREAMS = {"CT": 12, "MR": 13}
#: Default in-plane spacing per modality (the middles of the slice generator's ranges): CT is sharper.
IN_PLANE_MM = {"CT": 0.75, "MR": 1.4}
#: z coverage of the default slice count, in pixels per image side (the heart with margins).
_Z_COVERAGE_PX = 0.5
#: The LV long axis spans at least this many slices (the RV one slice less).
_MIN_LONG_AXIS_SLICES = 5.0


def _heart_geometry_3d(rng: np.random.Generator, n: int, slices: int, z_px: float) -> dict[str, np.ndarray]:
    """Boolean masks ``(n, n, slices)`` of one subject's anatomy; ``z_px`` is one slice in in-plane pixels."""
    shape = (n, n, slices)
    i = np.arange(n, dtype=np.float64)[:, None, None]
    j = np.arange(n, dtype=np.float64)[None, :, None]
    z = ((np.arange(slices, dtype=np.float64) - (slices - 1) / 2.0) * z_px)[None, None, :]
    sampling = (1.0, 1.0, z_px)

    cu = (n - 1) / 2 + rng.uniform(-0.1, 0.03) * n
    cv = (n - 1) / 2 + rng.uniform(-0.07, 0.07) * n
    r0 = rng.uniform(0.09, 0.13) * n
    thick = rng.uniform(0.03, 0.05) * n
    thick_var, thick_phase = rng.uniform(0.1, 0.35), rng.uniform(0, 2 * math.pi)
    ellip = rng.uniform(0.0, 0.2)
    rot = rng.uniform(0, math.pi)
    length = max(rng.uniform(1.8, 2.4) * r0, _MIN_LONG_AXIS_SLICES * z_px)
    tilt = rng.uniform(-0.15, 0.15, size=2)
    z_base = (length + thick) / 2.0 + rng.uniform(-0.1, 0.1) * length
    rv_dir = 0.5 + rng.uniform(-0.5, 0.5)
    rv_gap = rng.uniform(0.2, 0.5) * r0
    rv_par, rv_perp = rng.uniform(1.0, 1.4) * r0, rng.uniform(1.7, 2.3) * r0
    rv_len = max(rng.uniform(0.7, 0.85) * length, (_MIN_LONG_AXIS_SLICES - 1.0) * z_px)
    body_a, body_b = rng.uniform(0.42, 0.49) * n, rng.uniform(0.34, 0.42) * n
    fat_skin = rng.uniform(0.015, 0.04) * n
    epi_fat = rng.uniform(0.008, 0.025) * n
    lung_shift = rng.uniform(-0.05, 0.05) * n
    pap = [(rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 0.75)) for _ in range(2)]

    a = z_base - z  # depth below the base plane along the (tilted) long axis
    ax_u, ax_v = cu + tilt[0] * a, cv + tilt[1] * a
    du, dv = _rotated(i - ax_u, j - ax_v, rot)
    dv = dv / (1.0 - ellip)
    rho = np.sqrt(du**2 + dv**2)
    theta = np.arctan2(dv, du)
    below = a >= 0
    lv = below & ((rho / r0) ** 2 + (a / length) ** 2 < 1.0)
    th = thick * (1.0 + thick_var * np.cos(theta - thick_phase))
    epi = below & ((rho / (r0 + th)) ** 2 + (a / (length + thick)) ** 2 < 1.0)
    myo = epi & ~lv
    m: dict[str, np.ndarray] = {"LV": lv, "Myo": myo}

    # papillary muscles: columns in the mid-ventricle, inside the blood pool
    local_r = r0 * np.sqrt(np.clip(1.0 - (a / length) ** 2, 0.0, None))
    papillary = np.zeros(shape, dtype=bool)
    for ang, frac in pap:
        pu = ax_u + frac * local_r * math.cos(ang + rot)
        pv = ax_v + frac * local_r * math.sin(ang + rot)
        column = ((i - pu) ** 2 + (j - pv) ** 2) < (0.18 * local_r) ** 2
        papillary |= lv & column & (a > 0.3 * length) & (a < 0.75 * length)
    m["papillary"] = papillary

    # RV: a shorter half ellipsoid beside the septum, minus the LV epicardium, with a wall
    off = r0 + thick + rv_gap - 0.35 * rv_par
    ru, rvv = _rotated(i - ax_u - off * math.cos(rv_dir), j - ax_v - off * math.sin(rv_dir), rv_dir)
    # flatter along the axis than the LV (exponent 4): the crescent keeps its width over most of its length
    q = np.sqrt((ru / rv_par) ** 2 + (rvv / rv_perp) ** 2 + (a / rv_len) ** 4)
    rv_outer = below & (q < 1.0) & ~epi
    wall = max(1.0, 0.35 * thick)
    # the free wall is in-plane (the RV opens towards the base): distances slice by slice
    dist_in, dist_epi = np.zeros(shape), np.full(shape, 1e9)
    for k in range(slices):
        if rv_outer[..., k].any():
            dist_in[..., k] = ndimage.distance_transform_edt(rv_outer[..., k])
        if epi[..., k].any():
            dist_epi[..., k] = ndimage.distance_transform_edt(~epi[..., k])
    m["RV"] = rv_outer & (dist_in > wall) & (dist_epi > wall)
    m["RV_wall"] = rv_outer & ~m["RV"]
    heart = epi | rv_outer

    body_q = np.sqrt(((i - (n - 1) / 2) / body_a) ** 2 + ((j - (n - 1) / 2 + 0.02 * n) / body_b) ** 2)
    body = np.broadcast_to(body_q < 1.0, shape)
    m["body"] = body.copy()
    m["skin_fat"] = np.broadcast_to(
        (body_q < 1.0) & (body_q > 1.0 - fat_skin / min(body_a, body_b)), shape
    ).copy()
    dist_heart = ndimage.distance_transform_edt(~heart, sampling=sampling) if heart.any() else np.full(shape, 1e9)
    m["epi_fat"] = (dist_heart < epi_fat + 1.0) & ~heart & body
    envelope = dist_heart < epi_fat + 0.03 * n
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        lu = (n - 1) / 2 + side * 0.22 * n + lung_shift
        lq = np.sqrt(((i - lu) / (0.17 * n)) ** 2 + ((j - (n - 1) / 2 + 0.03 * n) / (0.27 * n)) ** 2)
        lungs |= np.broadcast_to(lq < 1.0, shape)
    m["lungs"] = lungs & ~envelope & body & ~m["skin_fat"]
    sp_u, sp_v = (n - 1) / 2, (n - 1) / 2 - 0.28 * n
    m["spine"] = np.broadcast_to(((i - sp_u) ** 2 + (j - sp_v) ** 2) < (0.055 * n) ** 2, shape).copy()
    ao_u, ao_v = sp_u - 0.08 * n, sp_v + 0.07 * n
    m["aorta"] = np.broadcast_to(((i - ao_u) ** 2 + (j - ao_v) ** 2) < (0.035 * n) ** 2, shape).copy()
    for key in ("lungs", "epi_fat"):
        m[key] &= ~m["spine"] & ~m["aorta"]
    return m


def _resolve(modality: str, size: int, slices: int | None, in_plane_mm: float | None,
             slice_thickness_mm: float | None) -> tuple[int, float, float]:
    s_xy = float(IN_PLANE_MM[modality] if in_plane_mm is None else in_plane_mm)
    s_z = float(s_xy if slice_thickness_mm is None else slice_thickness_mm)
    minimum = int(math.ceil(_MIN_LONG_AXIS_SLICES)) + 2
    count = default_slices(size, s_xy, s_z, 2.0 * _Z_COVERAGE_PX, minimum) if slices is None else int(slices)
    return count, s_xy, s_z


def synth_cardiac_case_3d(
    seed: int,
    modality: str,
    index: int,
    *,
    size: int = 64,
    slices: int | None = None,
    in_plane_mm: float | None = None,
    slice_thickness_mm: float | None = None,
    difficulty: float = 1.0,
    modality_gap: float = 1.0,
) -> SynthCase:
    """Subject ``index`` of ``modality`` ("CT" or "MR") as a 3D volume (module docstring).

    ``in_plane_mm`` ``None``: the modality's :data:`IN_PLANE_MM`; ``slice_thickness_mm`` ``None``: isotropic;
    ``slices`` ``None``: enough to hold the heart with margins.
    """
    modality = _check_modality(modality)
    gap = _check_gap(modality_gap)
    S, s_xy, s_z = _resolve(modality, size, slices, in_plane_mm, slice_thickness_mm)
    check_params_3d(
        num_patients=1, size=size, slices=S, in_plane_mm=s_xy, slice_thickness_mm=s_z, seed=seed,
        difficulty=difficulty,
    )
    rng = case_rng(seed, CARDIAC_3D_STREAMS[modality], index)
    n = int(size)
    masks = _heart_geometry_3d(rng, n, S, s_z / s_xy)
    image = _render(rng, modality, masks, difficulty, gap, z_scale=s_xy / s_z)
    label = _label(masks)
    spacing = (s_xy, s_xy, s_z)
    spans = {
        name: int(np.count_nonzero((label == value).any(axis=(0, 1))))
        for name, value in LABEL_VALUES.items()
        if value
    }
    info = {"modality": modality, "spacing": [round(float(s), 4) for s in spacing], "slices_per_class": spans}
    return SynthCase(
        f"{modality.lower()}3d_{index:03d}", {modality: image}, label, centred_affine((n, n, S), spacing), info
    )


def make_cardiac_dataset_3d(
    out_dir: str | Path, *, num_patients_per_modality: int = 4, size: int = 64, slices: int | None = None,
    in_plane_mm: float | None = None, slice_thickness_mm: float | None = None, seed: int = 0, difficulty: float = 1.0,
    modalities: tuple[str, ...] = ("CT", "MR"), patients_per_modality: Mapping[str, int] | None = None,
    modality_gap: float = 1.0, overwrite: bool = False,
) -> Path:
    """Write the unpaired SynthCardiac3D dataset (nnU-Net raw + modalseg's unpaired keys); return its folder.

    As :func:`~modalseg.data.synth.cardiac.make_cardiac_dataset` (``"paired": false``, ``modalities``,
    ``case_modality``, one channel per case), with 3D volumes; the cases of one modality share one grid.
    """
    counts = modality_counts(modalities, num_patients_per_modality, patients_per_modality)
    gap = _check_gap(modality_gap)
    grids = {mod: _resolve(mod, size, slices, in_plane_mm, slice_thickness_mm) for mod in counts}
    for mod, (S, s_xy, s_z) in grids.items():
        check_params_3d(
            num_patients=counts[mod], size=size, slices=S, in_plane_mm=s_xy, slice_thickness_mm=s_z, seed=seed,
            difficulty=difficulty,
        )
    params: dict[str, Any] = {
        "generator": "cardiac3d",
        "version": GENERATOR_3D_VERSION,
        "dims": 3,
        "patients_per_modality": dict(counts),
        "size": int(size),
        "grids": {mod: {"slices": S, "spacing": [s_xy, s_xy, s_z]} for mod, (S, s_xy, s_z) in grids.items()},
        "seed": int(seed),
        "difficulty": float(difficulty),
        "modality_gap": gap,
    }

    def case(mod: str, index: int) -> SynthCase:
        S, s_xy, s_z = grids[mod]
        return synth_cardiac_case_3d(seed, mod, index, size=size, slices=S, in_plane_mm=s_xy, slice_thickness_mm=s_z,
                                     difficulty=difficulty, modality_gap=gap)

    description = ("Synthetic unpaired cardiac-like 3D volumes (CT-like and MR-like, different subjects) generated "
                   "by modalseg; LV, myocardium and RV span several slices; label values as MS-CMRSeg.")
    return write_cardiac_dataset(out_dir, counts, case, name="SynthCardiac3D", description=description,
                                 params=params, overwrite=overwrite)
