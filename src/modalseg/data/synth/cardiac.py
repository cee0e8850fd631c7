"""Unpaired cardiac-like short-axis volumes in two modalities (CT-like and MR-like) for paper 2.

Why (paper 2, Sec. 1 and Fig. 1): the two modalities show the same anatomy with different appearance, and
the subjects are not paired or aligned. Each modality here has its own subjects, drawn from its own random
stream, so no CT case has an MR twin. The intensity mapping and the texture also differ by modality.

* CT-like (Hounsfield-like, int16): contrast blood bright (~300 HU), myocardium mid (~100 HU), fat dark
  (~-100 HU), lungs very dark (~-850 HU), air -1000 HU, with fine-grain, slightly correlated noise and no
  bias field.
* MR-like (bSSFP/C0-like, float32 arbitrary units): blood bright, myocardium dark, fat bright. It has a
  smoother texture with flow inhomogeneity in the blood pool, a strong multiplicative bias field, and Rician
  noise.

Label values are those of MS-CMRSeg: 500 LV blood pool, 200 LV myocardium, 600 RV blood pool, 0 background.
Files hold them as uint16. Anatomy per subject: the LV is an ellipse with a ring of myocardium of varying
thickness, and the RV is a crescent attached beside it. Position, size, rotation and ellipticity vary.
Going from base to apex over the slices, the LV shrinks and the RV tapers away.

Knobs for experiments on joint learning (:func:`make_cardiac_dataset`): ``patients_per_modality`` makes one
modality short of labelled subjects (e.g. 20 CT, 5 MR), and ``modality_gap`` moves MR's tissue contrast towards
CT's (1 = the bSSFP-like mapping above, 0 = CT's contrast in MR units). Their defaults reproduce the files of
earlier versions byte for byte (pinned by a hash in tests/test_protocols.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from modalseg.data.synth.breast import GENERATOR_VERSION, SynthCase, check_params
from modalseg.data.synth.writer import bias_field, case_rng, centred_affine, raw_dataset_writer, rician, smooth_noise
from modalseg.errors import ConfigError

LABEL_VALUES = {"background": 0, "LV": 500, "Myo": 200, "RV": 600}
# One independent random stream per modality: different subjects, never paired.
MODALITY_STREAMS = {"CT": 2, "MR": 3}
#: Per-subject tissue intensity ranges (a uniform draw per subject, in this order), per tissue: CT in HU (air is
#: -1000), then MR (bSSFP-like: myocardium dark, fat bright) in arbitrary units before the x1000 scaling (air is 0).
TISSUE_RANGES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "body": ((30, 60), (0.25, 0.35)),
    "skin_fat": ((-120, -80), (0.75, 0.95)),
    "lungs": ((-880, -800), (0.03, 0.07)),
    "epi_fat": ((-110, -70), (0.7, 0.9)),
    "Myo": ((90, 130), (0.15, 0.25)),
    "RV_wall": ((90, 130), (0.15, 0.25)),
    "LV": ((280, 380), (0.85, 1.0)),
    "RV": ((220, 340), (0.75, 0.95)),
    "papillary": ((90, 130), (0.2, 0.3)),
    "aorta": ((280, 380), (0.7, 0.95)),
    "spine": ((300, 400), (0.3, 0.45)),
}
CT_TISSUE_RANGES = {tissue: ct for tissue, (ct, _) in TISSUE_RANGES.items()}
MR_TISSUE_RANGES = {tissue: mr for tissue, (_, mr) in TISSUE_RANGES.items()}
#: HU window mapped linearly onto MR's [0, 1] units when ``modality_gap`` < 1 (air -> 0, bone/contrast -> ~1).
CT_WINDOW = (-1000.0, 400.0)


def _rotated(du: np.ndarray, dv: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return c * du + s * dv, -s * du + c * dv


def _heart_geometry(rng: np.random.Generator, n: int, slices: int) -> dict[str, np.ndarray]:
    """Boolean masks (n, n, slices) of the heart and surrounding anatomy of one subject, in pixel units."""
    shape = (n, n, slices)
    i = np.arange(n, dtype=np.float64)[:, None]
    j = np.arange(n, dtype=np.float64)[None, :]
    cu = (n - 1) / 2 + rng.uniform(-0.1, 0.03) * n  # heart in the left chest
    cv = (n - 1) / 2 + rng.uniform(-0.07, 0.07) * n
    r0 = rng.uniform(0.09, 0.13) * n  # LV radius at the base
    thick = rng.uniform(0.03, 0.05) * n  # myocardial thickness
    thick_var, thick_phase = rng.uniform(0.1, 0.35), rng.uniform(0, 2 * math.pi)
    ellip = rng.uniform(0.0, 0.2)
    rot = rng.uniform(0, math.pi)
    # RV beside the LV, anterior and towards the subject's right (+i is right, +j anterior in RAS+)
    rv_dir = 0.5 + rng.uniform(-0.5, 0.5)
    rv_gap = rng.uniform(0.2, 0.5) * r0
    rv_par, rv_perp = rng.uniform(1.0, 1.4) * r0, rng.uniform(1.7, 2.3) * r0
    drift = rng.uniform(-0.04, 0.04, size=2) * n
    t_base, t_apex = rng.uniform(0.0, 0.15), rng.uniform(0.7, 0.95)
    body_a, body_b = rng.uniform(0.42, 0.49) * n, rng.uniform(0.34, 0.42) * n
    fat_skin = rng.uniform(0.015, 0.04) * n
    epi_fat = rng.uniform(0.008, 0.025) * n
    lung_shift = rng.uniform(-0.05, 0.05) * n
    pap = [(rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 0.75)) for _ in range(2)]

    m = {tissue: np.zeros(shape, dtype=bool) for tissue in TISSUE_RANGES}  # one mask per tissue
    for k in range(slices):
        t = t_base + (t_apex - t_base) * (k / (slices - 1) if slices > 1 else 0.5)
        ck_u, ck_v = cu + drift[0] * t, cv + drift[1] * t
        # body and subcutaneous fat (the body is centred on the image, not on the heart)
        body_q = np.sqrt(((i - (n - 1) / 2) / body_a) ** 2 + ((j - (n - 1) / 2 + 0.02 * n) / body_b) ** 2)
        body = body_q < 1.0
        m["body"][..., k] = body
        m["skin_fat"][..., k] = body & (body_q > 1.0 - fat_skin / min(body_a, body_b))
        # LV blood pool (ellipse) and myocardium (ring of varying thickness)
        r_lv = r0 * (1.0 - 0.6 * t**1.5)
        du, dv = _rotated(i - ck_u, j - ck_v, rot)
        dv = dv / (1.0 - ellip)
        r = np.sqrt(du**2 + dv**2)
        theta = np.arctan2(dv, du)
        th = thick * (1.0 - 0.2 * t) * (1.0 + thick_var * np.cos(theta - thick_phase))
        lv = r < r_lv
        myo = (r >= r_lv) & (r < r_lv + th)
        # papillary muscles: small dark dots inside the blood pool (labelled LV, as readers do)
        for ang, frac in pap:
            pu = ck_u + frac * r_lv * math.cos(ang + rot)
            pv = ck_v + frac * r_lv * math.sin(ang + rot)
            m["papillary"][..., k] |= lv & (((i - pu) ** 2 + (j - pv) ** 2) < (0.18 * r_lv) ** 2)
        # RV: crescent = ellipse beside the LV minus the LV epicardium (plus a septal gap)
        rv_scale = max(0.0, 1.0 - 1.1 * t**1.3)
        epi = r < r_lv + th
        if rv_scale > 0.05:
            a_par, a_perp = rv_par * rv_scale, rv_perp * (0.5 + 0.5 * rv_scale)
            off = r_lv + thick + rv_gap * rv_scale - 0.35 * a_par
            ru, rv_ = _rotated(i - ck_u - off * math.cos(rv_dir), j - ck_v - off * math.sin(rv_dir), rv_dir)
            q = np.sqrt((ru / max(a_par, 1e-3)) ** 2 + (rv_ / max(a_perp, 1e-3)) ** 2)
            rv_outer = (q < 1.0) & ~epi
            wall = max(1.0, 0.35 * thick)
            dist_in = ndimage.distance_transform_edt(rv_outer)
            rv_cav = rv_outer & (dist_in > wall) & ~(r < r_lv + th + wall)
            m["RV"][..., k] = rv_cav
            m["RV_wall"][..., k] = rv_outer & ~rv_cav
        m["LV"][..., k] = lv
        m["Myo"][..., k] = myo
        heart = epi | m["RV"][..., k] | m["RV_wall"][..., k]
        m["epi_fat"][..., k] = (ndimage.distance_transform_edt(~heart) < epi_fat + 1.0) & ~heart & body
        # lungs on both sides, pushed aside by the heart
        envelope = ndimage.distance_transform_edt(~heart) < epi_fat + 0.03 * n
        for side in (-1.0, 1.0):
            lu = (n - 1) / 2 + side * 0.22 * n + lung_shift
            lq = np.sqrt(((i - lu) / (0.17 * n)) ** 2 + ((j - (n - 1) / 2 + 0.03 * n) / (0.27 * n)) ** 2)
            m["lungs"][..., k] |= (lq < 1.0) & ~envelope & body & ~m["skin_fat"][..., k]
        # descending aorta and vertebral body at the posterior midline
        sp_u, sp_v = (n - 1) / 2, (n - 1) / 2 - 0.28 * n
        m["spine"][..., k] = ((i - sp_u) ** 2 + (j - sp_v) ** 2) < (0.055 * n) ** 2
        ao_u, ao_v = sp_u - 0.08 * n, sp_v + 0.07 * n  # descending aorta left of the spine
        m["aorta"][..., k] = ((i - ao_u) ** 2 + (j - ao_v) ** 2) < (0.035 * n) ** 2
    for key in ("lungs", "epi_fat"):
        m[key] &= ~m["spine"] & ~m["aorta"]
    return m


def _label(m: dict[str, np.ndarray]) -> np.ndarray:
    label = np.zeros(m["LV"].shape, dtype=np.uint16)
    label[m["Myo"]] = LABEL_VALUES["Myo"]
    label[m["LV"]] = LABEL_VALUES["LV"]
    label[m["RV"]] = LABEL_VALUES["RV"]
    return label


def _mix_towards_ct(tissues: dict[str, float], gap: float) -> dict[str, float]:
    """MR tissue values moved towards CT's contrast: ``gap`` 1 keeps bSSFP-like MR, 0 is CT's contrast.

    Each MR draw keeps its relative position in its range and takes the CT value at the same position, mapped
    linearly from :data:`CT_WINDOW` to MR units (air 0). No extra random draws, so the anatomy and every other
    draw of the case stay the same whatever ``gap``.
    """
    lo_w, hi_w = CT_WINDOW
    out = dict(tissues)
    for key, (lo, hi) in MR_TISSUE_RANGES.items():
        u = (tissues[key] - lo) / (hi - lo)
        ct_lo, ct_hi = CT_TISSUE_RANGES[key]
        ct_as_mr = (ct_lo + u * (ct_hi - ct_lo) - lo_w) / (hi_w - lo_w)
        out[key] = gap * tissues[key] + (1.0 - gap) * ct_as_mr
    return out


def _render(
    rng: np.random.Generator,
    modality: str,
    m: dict[str, np.ndarray],
    difficulty: float,
    modality_gap: float = 1.0,
    z_scale: float | None = None,
) -> np.ndarray:
    """Map tissue classes to modality-specific intensities and add the modality's texture and noise.

    ``z_scale`` (3D volumes, ``cardiac3d``): the in-plane voxel size over the slice thickness; every smoothing
    then also acts across slices with the in-plane width in mm. ``None`` (the slice generator): as before, no
    smoothing across slices beyond the texture's fixed widths (keep: it fixes the bytes of every dataset).
    """
    shape = m["LV"].shape
    n = shape[0]
    d = float(difficulty)

    def across(in_plane: float, default: float) -> float:
        return default if z_scale is None else in_plane * z_scale

    # One draw per tissue, in table order (the order fixes the random stream: keep it).
    ranges = CT_TISSUE_RANGES if modality == "CT" else MR_TISSUE_RANGES
    tissues = {"air": -1000.0 if modality == "CT" else 0.0}
    tissues.update({key: rng.uniform(lo, hi) for key, (lo, hi) in ranges.items()})
    if modality == "MR" and modality_gap != 1.0:
        tissues = _mix_towards_ct(tissues, modality_gap)
    img = np.full(shape, tissues["air"], dtype=np.float64)
    for key in (
        "body",
        "skin_fat",
        "lungs",
        "epi_fat",
        "spine",
        "aorta",
        "RV_wall",
        "Myo",
        "LV",
        "RV",
        "papillary",
    ):
        img[m[key]] = tissues[key]
    blood = m["LV"] | m["RV"] | m["aorta"]
    if modality == "CT":
        # lung parenchyma with small vessels; fine-grain, slightly correlated quantum noise
        lung_tex = smooth_noise(rng, shape, (0.7, 0.7, across(0.7, 0.3)))
        img = np.where(m["lungs"], img + 60.0 * np.clip(lung_tex - 1.2, 0, None) * 4 + 15 * lung_tex, img)
        img = ndimage.gaussian_filter(img, sigma=(0.6, 0.6, across(0.6, 0.0)))
        grain = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=(0.5, 0.5, across(0.5, 0.0)))
        grain /= grain.std() + 1e-12
        img = img + (10.0 + 12.0 * d) * grain
        return np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    # MR: flow inhomogeneity in the blood pool, smoother image, coil shading, Rician noise
    flow = smooth_noise(rng, shape, (0.08 * n, 0.08 * n, across(0.08 * n, 1.0)))
    img = np.where(blood, img * (1.0 + 0.08 * flow), img)
    img = ndimage.gaussian_filter(img, sigma=(0.9, 0.9, across(0.9, 0.0)))
    img *= bias_field(rng, shape, 0.25 + 0.1 * d)
    img = rician(rng, img, 0.015 + 0.02 * d)
    return (img * 1000.0).astype(np.float32)


def synth_cardiac_case(
    seed: int, modality: str, index: int, *, slices: int = 6, size: int = 128, difficulty: float = 1.0,
    modality_gap: float = 1.0,
) -> SynthCase:
    """Generate subject ``index`` of ``modality`` ("CT" or "MR"), independent of the other modality.

    ``modality_gap`` (MR only; see :func:`make_cardiac_dataset`) changes MR's tissue contrast, not its anatomy.
    """
    check_params(num_patients=1, slices=slices, size=size, seed=seed, difficulty=difficulty)
    modality = _check_modality(modality)
    gap = _check_gap(modality_gap)
    rng = case_rng(seed, MODALITY_STREAMS[modality], index)
    n, S = int(size), int(slices)
    if modality == "CT":
        spacing = (rng.uniform(0.6, 0.9),) * 2 + (rng.uniform(5.0, 8.0),)
    else:
        spacing = (rng.uniform(1.2, 1.6),) * 2 + (rng.uniform(8.0, 10.0),)
    masks = _heart_geometry(rng, n, S)
    image = _render(rng, modality, masks, difficulty, gap)
    label = _label(masks)
    info = {"modality": modality, "spacing": [round(float(s), 4) for s in spacing]}
    shape = (n, n, S)
    return SynthCase(
        f"{modality.lower()}_{index:03d}", {modality: image}, label, centred_affine(shape, spacing), info
    )


def _check_gap(value: float) -> float:
    gap = float(value)
    if not 0.0 <= gap <= 1.0:  # also refuses NaN
        raise ConfigError(f"modality gap must be between 0 (CT's contrast) and 1 (bSSFP-like MR), got {value}")
    return gap


def _check_modality(name: str) -> str:
    key = str(name).upper()
    if key not in MODALITY_STREAMS:
        raise ConfigError(f"unknown cardiac modality {name!r}; choose from {sorted(MODALITY_STREAMS)}")
    return key


def modality_counts(
    modalities: tuple[str, ...] | list[str], default: int, per_modality: Mapping[str, int] | None
) -> dict[str, int]:
    """Subjects per modality (in ``modalities`` order): ``default``, overridden by ``per_modality``; checked."""
    mods = [_check_modality(mod) for mod in modalities]
    if not mods or len(set(mods)) != len(mods):
        raise ConfigError(f"cardiac modalities must be distinct and non-empty, got {list(modalities)}")
    counts = {mod: int(default) for mod in mods}
    for name, value in (per_modality or {}).items():
        mod = _check_modality(name)
        if mod not in counts:
            raise ConfigError(f"patients_per_modality names {name!r}, which is not among the modalities {mods}")
        try:
            ok = not isinstance(value, bool) and int(value) == value and int(value) >= 1
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"patients_per_modality[{name!r}] must be a positive integer, got {value!r}")
        counts[mod] = int(value)
    return counts


def make_cardiac_dataset(
    out_dir: str | Path, *, num_patients_per_modality: int = 8, slices: int = 6, size: int = 128, seed: int = 0,
    difficulty: float = 1.0, modalities: tuple[str, ...] = ("CT", "MR"),
    patients_per_modality: Mapping[str, int] | None = None, modality_gap: float = 1.0, overwrite: bool = False,
) -> Path:
    """Write the unpaired SynthCardiac dataset (nnU-Net raw + modalseg's unpaired keys); return its folder.

    ``dataset.json`` has ``"paired": false``, the list of ``modalities`` and ``case_modality`` mapping every
    case id to its modality; each case has one image channel (``_0000``).

    Why the two knobs: joint learning (paper 2) can only matter when one modality is short of labelled
    subjects and the other can lend what transfers. ``patients_per_modality`` (e.g. ``{"CT": 20, "MR": 5}``)
    overrides ``num_patients_per_modality`` for the modalities it names; subject ``i`` of a modality is the
    same whatever the counts (own random stream per case). ``modality_gap`` sets how far MR's tissue contrast
    is from CT's: 1 (default) is bSSFP-like (myocardium dark, fat bright: a large gap), 0 gives MR the
    contrast of CT mapped to MR units, with MR's own texture, bias field and Rician noise. Defaults write the
    same bytes as before these options existed; non-default values are recorded under ``modalseg_synth``.
    """
    check_params(
        num_patients=num_patients_per_modality, slices=slices, size=size, seed=seed, difficulty=difficulty
    )
    counts = modality_counts(modalities, num_patients_per_modality, patients_per_modality)
    gap = _check_gap(modality_gap)
    params: dict[str, Any] = {"generator": "cardiac", "version": GENERATOR_VERSION}
    if len(set(counts.values())) == 1:
        params["num_patients_per_modality"] = next(iter(counts.values()))
    else:  # only when uneven, so that default datasets keep their exact bytes
        params["patients_per_modality"] = dict(counts)
    params.update(slices=int(slices), size=int(size), seed=int(seed), difficulty=float(difficulty))
    if gap != 1.0:
        params["modality_gap"] = gap

    def case(mod: str, index: int) -> SynthCase:
        return synth_cardiac_case(seed, mod, index, slices=slices, size=size, difficulty=difficulty, modality_gap=gap)

    description = ("Synthetic unpaired cardiac-like short-axis slices (CT-like and MR-like, different subjects) "
                   "generated by modalseg; label values as MS-CMRSeg.")
    return write_cardiac_dataset(out_dir, counts, case, name="SynthCardiac", description=description, params=params,
                                 overwrite=overwrite)


def write_cardiac_dataset(
    out_dir: str | Path, counts: Mapping[str, int], case: Callable[[str, int], SynthCase], *, name: str,
    description: str, params: dict[str, Any], overwrite: bool,
) -> Path:
    """Write ``counts[modality]`` unpaired cases ``case(modality, index)`` of each modality as an nnU-Net raw
    dataset with modalseg's unpaired keys (``"paired": false``, ``modalities``, ``case_modality``; one image
    channel per case); shared by the 2D and 3D generators."""
    case_modality: dict[str, str] = {}
    infos: dict[str, dict] = {}
    with raw_dataset_writer(out_dir, overwrite=overwrite) as writer:
        for mod, count in counts.items():
            for index in range(count):
                made = case(mod, index)
                writer.write_image(made.case_id, 0, made.images[mod], made.affine)
                writer.write_label(made.case_id, made.label, made.affine)
                case_modality[made.case_id] = mod
                infos[made.case_id] = made.info
        writer.set_dataset_json(
            {
                "name": name,
                "description": description,
                "channel_names": {"0": "image"},
                "labels": dict(LABEL_VALUES),
                "paired": False,
                "modalities": list(counts),
                "case_modality": case_modality,
                "numTraining": len(case_modality),
                "file_ending": ".nii.gz",
                "modalseg_synth": {**params, "cases": infos},
            }
        )
    return Path(out_dir)
