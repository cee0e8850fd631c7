"""Metrics against an independent numpy/scipy computation, and the empty-mask conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from modalseg.errors import ConfigError, DataError, ModalsegError
from modalseg.evaluation.metrics import CaseMetrics, aggregate, evaluate_case, evaluate_slices

NAMES2 = ["background", "fg"]


# ---------------------------------------------------------------- independent reference (numpy / scipy only)
def ref_dice(p: np.ndarray, g: np.ndarray) -> float:
    return 2.0 * np.logical_and(p, g).sum() / (p.sum() + g.sum())


def ref_edges(m: np.ndarray) -> np.ndarray:
    """Surface voxels: in the mask but removed by one erosion (outside the array counts as background)."""
    return m & ~ndimage.binary_erosion(m, border_value=0)


def ref_directed(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Distances (mm) from every surface voxel of ``a`` to the nearest surface voxel of ``b``."""
    dist_to_b = ndimage.distance_transform_edt(~ref_edges(b), sampling=spacing)
    return dist_to_b[ref_edges(a)]


def ref_hd(p, g, spacing, q=None, pooled=False) -> float:
    d1, d2 = ref_directed(p, g, spacing), ref_directed(g, p, spacing)
    if q is None:
        return float(max(d1.max(), d2.max()))
    if pooled:
        return float(np.percentile(np.concatenate([d1, d2]), q))
    return float(max(np.percentile(d1, q), np.percentile(d2, q)))


def masks(shape):
    return arrays(np.bool_, shape, elements=st.booleans()).filter(lambda m: m.any())


spacing_2d = st.tuples(*[st.floats(0.3, 3.0)] * 2)
spacing_3d = st.tuples(*[st.floats(0.3, 3.0)] * 3)


# ---------------------------------------------------------------- property tests
# (distances: rel 2e-4, since MONAI computes them in float32 — a hypothesis example once gave 0.149986 vs 0.15)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(p=masks((9, 11)), g=masks((9, 11)), spacing=spacing_2d)
def test_binary_2d_matches_reference(p, g, spacing):
    (m,) = evaluate_case(
        p.astype(int), g.astype(int), num_classes=2, class_names=NAMES2, spacing=spacing, case_id="c"
    )
    assert m.status == "ok"
    assert m.n_gt == g.sum() and m.n_pred == p.sum()
    assert m.dice == pytest.approx(ref_dice(p, g), rel=1e-6)
    assert m.sensitivity == pytest.approx(np.logical_and(p, g).sum() / g.sum(), rel=1e-6)
    assert m.rad == pytest.approx(abs(int(p.sum()) - int(g.sum())) / g.sum())
    assert m.hd == pytest.approx(ref_hd(p, g, spacing), rel=2e-4, abs=1e-5)
    assert m.hd95 == pytest.approx(ref_hd(p, g, spacing, 95), rel=2e-4, abs=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(p=masks((5, 6, 4)), g=masks((5, 6, 4)), spacing=spacing_3d)
def test_binary_3d_anisotropic_matches_reference(p, g, spacing):
    (m,) = evaluate_case(
        p.astype(np.uint8),
        g.astype(np.uint8),
        num_classes=2,
        class_names=NAMES2,
        spacing=spacing,
        case_id="v",
    )
    assert m.dice == pytest.approx(ref_dice(p, g), rel=1e-6)
    assert m.hd == pytest.approx(ref_hd(p, g, spacing), rel=2e-4, abs=1e-5)
    assert m.hd95 == pytest.approx(ref_hd(p, g, spacing, 95), rel=2e-4, abs=1e-5)
    (pooled,) = evaluate_case(
        p.astype(int),
        g.astype(int),
        num_classes=2,
        class_names=NAMES2,
        spacing=spacing,
        case_id="v",
        hd95_convention="pooled",
    )
    assert pooled.hd95 == pytest.approx(ref_hd(p, g, spacing, 95, pooled=True), rel=2e-4, abs=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    pred=arrays(np.int64, (10, 10), elements=st.integers(0, 3)),
    gt=arrays(np.int64, (10, 10), elements=st.integers(0, 3)),
    spacing=spacing_2d,
)
def test_multiclass_equals_per_class_binary(pred, gt, spacing):
    names = ["bg", "a", "b", "c"]
    res = evaluate_case(pred, gt, num_classes=4, class_names=names, spacing=spacing, case_id="m")
    assert [m.class_name for m in res] == ["a", "b", "c"]
    for k, m in enumerate(res, start=1):
        (b,) = evaluate_case(
            (pred == k).astype(int),
            (gt == k).astype(int),
            num_classes=2,
            class_names=NAMES2,
            spacing=spacing,
            case_id="m",
        )
        assert (m.dice, m.status, m.n_gt, m.n_pred) == (b.dice, b.status, b.n_gt, b.n_pred)
        assert m.hd == b.hd or (math.isnan(m.hd) and math.isnan(b.hd))


# ---------------------------------------------------------------- hand-checked values
def test_known_square_values():
    g = np.zeros((20, 20), int)
    g[5:15, 5:15] = 1  # 100 px
    p = np.zeros_like(g)
    p[5:18, 5:15] = 1  # 130 px, contains g
    (m,) = evaluate_case(p, g, num_classes=2, class_names=NAMES2, spacing=(2.0, 1.0), case_id="sq")
    assert m.rad == pytest.approx(0.3)  # |130 - 100| / 100, paper 1
    assert m.sensitivity == pytest.approx(1.0)
    assert m.dice == pytest.approx(200 / 230, rel=1e-6)
    # Bottom edges are 3 rows apart; rows are 2 mm -> 6 mm.
    assert m.hd == pytest.approx(6.0)


def test_hd95_conventions_differ_on_a_protrusion():
    g = np.zeros((20, 24), int)
    g[5:15, 3:10] = 1
    p = g.copy()
    p[9, 10:22] = 1  # a one-pixel-wide spur: only the pred->gt distances have a long tail
    kw = {"num_classes": 2, "class_names": NAMES2, "spacing": (1.0, 1.0), "case_id": "spur"}
    (monai,) = evaluate_case(p, g, **kw)
    (pooled,) = evaluate_case(p, g, hd95_convention="pooled", **kw)
    ref_m, ref_p = ref_hd(p > 0, g > 0, (1, 1), 95), ref_hd(p > 0, g > 0, (1, 1), 95, pooled=True)
    assert (monai.hd95, pooled.hd95) == (pytest.approx(ref_m), pytest.approx(ref_p))
    assert pooled.hd95 < monai.hd95 < monai.hd == pytest.approx(12.0)


def test_include_background_reports_background():
    g = np.zeros((8, 8), int)
    g[2:5, 2:5] = 1
    res = evaluate_case(
        g, g, num_classes=2, class_names=NAMES2, spacing=1.0, case_id="b", include_background=True
    )
    assert [m.class_name for m in res] == ["background", "fg"]
    assert all(m.dice == pytest.approx(1.0) and m.hd == 0.0 for m in res)


# ---------------------------------------------------------------- empty-mask conventions
def _one(pred, gt):
    (m,) = evaluate_case(pred, gt, num_classes=2, class_names=NAMES2, spacing=(1.0, 1.0), case_id="e")
    return m


def test_both_empty_convention():
    z = np.zeros((8, 8), int)
    m = _one(z, z)
    assert m.status == "both_empty"
    assert (m.dice, m.hd, m.hd95, m.n_gt, m.n_pred) == (1.0, 0.0, 0.0, 0, 0)
    assert math.isnan(m.sensitivity) and math.isnan(m.rad)


def test_gt_empty_convention():
    z = np.zeros((8, 8), int)
    p = z.copy()
    p[1:3, 1:3] = 1
    m = _one(p, z)
    assert m.status == "gt_empty"
    assert m.dice == 0.0 and math.isnan(m.sensitivity)
    assert math.isinf(m.rad) and math.isinf(m.hd) and math.isinf(m.hd95)
    assert (m.n_gt, m.n_pred) == (0, 4)


def test_pred_empty_convention():
    z = np.zeros((8, 8), int)
    g = z.copy()
    g[1:4, 1:3] = 1
    m = _one(z, g)
    assert m.status == "pred_empty"
    assert (m.dice, m.sensitivity, m.rad) == (0.0, 0.0, 1.0)
    assert m.hd == math.inf and m.hd95 == math.inf  # MONAI alone would give NaN for HD95


# ---------------------------------------------------------------- slices
def test_evaluate_slices_matches_cases_and_per_slice_spacing():
    rng = np.random.default_rng(3)
    pred = rng.integers(0, 3, size=(4, 12, 12))
    gt = rng.integers(0, 3, size=(4, 12, 12))
    pred[2] = 0  # an empty prediction slice
    spacings = [(1.0, 1.0), (0.5, 2.0), (1.5, 1.5), (1.0, 3.0)]
    names = ["bg", "a", "b"]
    res = evaluate_slices(pred, gt, num_classes=3, class_names=names, spacing=spacings, case_ids=list("wxyz"))
    assert len(res) == 8
    for i in range(4):
        ref = evaluate_case(
            pred[i], gt[i], num_classes=3, class_names=names, spacing=spacings[i], case_id="wxyz"[i]
        )
        assert res[2 * i : 2 * i + 2] == ref
    assert {m.status for m in res if m.case_id == "y"} == {"pred_empty"}
    default = evaluate_slices(pred, gt, num_classes=3, class_names=names, spacing=(1.0, 1.0))
    assert default[0].case_id == "slice_000"


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, exc, text",
    [
        ({"gt": np.zeros((8, 9), int)}, DataError, "differs"),
        ({"pred": np.full((8, 8), 2)}, DataError, "outside 0..1"),
        ({"pred": np.full((8, 8), 0.5)}, DataError, "non-integer"),
        ({"class_names": ["bg"]}, ConfigError, "class names"),
        ({"spacing": (1.0,)}, DataError, "spacing"),
        ({"spacing": (1.0, -1.0)}, DataError, "spacing"),
        ({"hd95_convention": "medpy"}, ConfigError, "hd95_convention"),
    ],
)
def test_errors_are_clear(kwargs, exc, text):
    args = {
        "pred": np.zeros((8, 8), int),
        "gt": np.zeros((8, 8), int),
        "num_classes": 2,
        "class_names": NAMES2,
        "spacing": (1.0, 1.0),
        "case_id": "case_7",
    }
    args.update(kwargs)
    with pytest.raises(exc, match=text) as info:
        evaluate_case(**args)
    assert isinstance(info.value, ModalsegError)


def test_slice_count_mismatch():
    with pytest.raises(DataError, match="case ids"):
        evaluate_slices(
            np.zeros((2, 4, 4), int),
            np.zeros((2, 4, 4), int),
            num_classes=2,
            class_names=NAMES2,
            spacing=1.0,
            case_ids=["a"],
        )


# ---------------------------------------------------------------- aggregation
def _cm(case, cls, dice, hd, status="ok", sens=0.5):
    return CaseMetrics(case, cls, dice, sens, 0.1, hd, hd, status, 10, 10)


def test_aggregate_reports_exclusions():
    ms = [
        _cm("1", "LV", 0.8, 2.0),
        _cm("2", "LV", 0.6, 4.0),
        _cm("3", "LV", 0.0, math.inf, "pred_empty", sens=0.0),
        _cm("1", "RV", 1.0, 0.0, "both_empty", sens=math.nan),
        _cm("2", "RV", 0.7, 3.0),
    ]
    rows = {r["class_name"]: r for r in aggregate(ms)}
    lv, rv = rows["LV"], rows["RV"]
    assert lv["n_cases"] == 3 and lv["n_pred_empty"] == 1 and lv["n_ok"] == 2
    assert lv["dice_mean"] == pytest.approx(np.mean([0.8, 0.6, 0.0])) and lv["dice_n_excluded"] == 0
    assert lv["dice_sd"] == pytest.approx(np.std([0.8, 0.6, 0.0], ddof=1))
    assert lv["hd_mean"] == pytest.approx(3.0) and lv["hd_n"] == 2
    assert lv["hd_n_excluded"] == 1 and lv["hd_excluded"] == "pred_empty: 1 (inf)"
    assert rv["sensitivity_n_excluded"] == 1 and rv["sensitivity_excluded"] == "both_empty: 1 (NaN)"
    assert rv["sensitivity_mean"] == pytest.approx(0.5) and rv["sensitivity_sd"] == 0.0


def test_aggregate_by_case_and_all_excluded():
    ms = [_cm("1", "LV", 0.0, math.inf, "pred_empty"), _cm("1", "RV", 0.0, math.inf, "pred_empty")]
    (row,) = aggregate(ms, by=("case_id",), metric_names=("hd",))
    assert row["case_id"] == "1" and row["hd_n"] == 0 and row["hd_n_excluded"] == 2
    assert math.isnan(row["hd_mean"])
    with pytest.raises(ConfigError):
        aggregate(ms, by=("model",))
