"""Summary statistics and the paired test used by the papers.

Paper 1 reports mean ± s.d. over three independent runs; paper 2 tests its improvement over UMMKD with a
Wilcoxon signed-rank test on patient-level results (p = 0.010 for LGE, 0.048 for bSSFP).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from modalseg.errors import EvaluationError

ALTERNATIVES = ("two-sided", "greater", "less")


def wilcoxon_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    alternative: str = "two-sided",
) -> dict:
    """Wilcoxon signed-rank test on paired samples (one value per patient, same patient order in both).

    Pairs in which either value is NaN, or whose difference is NaN (inf - inf), are dropped and counted in
    ``n_dropped``; an infinite difference (e.g. an empty prediction's HD against a finite one) is kept, it
    simply gets the largest rank. ``alternative="greater"`` tests whether ``a`` tends to exceed ``b``.
    Returns ``statistic``, ``p_value``, ``n`` (pairs used), ``n_dropped``, ``median_diff`` (median of a - b).
    When every difference is zero there is no evidence either way: statistic 0, p-value 1.
    """
    if alternative not in ALTERNATIVES:
        raise EvaluationError(
            f"wilcoxon_test: alternative must be one of {ALTERNATIVES}, got {alternative!r}"
        )
    x = np.asarray(a, dtype=float).reshape(-1)
    y = np.asarray(b, dtype=float).reshape(-1)
    if x.shape != y.shape:
        raise EvaluationError(f"wilcoxon_test: paired samples differ in length ({x.size} vs {y.size})")
    with np.errstate(invalid="ignore"):
        d = x - y
    keep = ~(np.isnan(x) | np.isnan(y) | np.isnan(d))
    n = int(keep.sum())
    if n < 1:
        raise EvaluationError(
            f"wilcoxon_test: no complete pair left ({x.size} pairs, {x.size - n} with NaN); need at least 1"
        )
    d = d[keep]
    result = {"n": n, "n_dropped": int(x.size - n), "median_diff": float(np.median(d))}
    if np.all(d == 0):
        return {"statistic": 0.0, "p_value": 1.0, **result}
    from scipy import stats as sps  # here, not at the top: scipy.stats alone takes ~0.5 s to import

    res = sps.wilcoxon(x[keep], y[keep], alternative=alternative)
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue), **result}


def mean_sd(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1, as for paper 1's three runs).

    One value gives s.d. 0 (no spread can be estimated; the table still shows ``x ± 0.0``); no value gives
    ``(nan, nan)``. Non-finite values are refused: filter them first and report them (``aggregate`` does).
    """
    v = np.asarray(values, dtype=float).reshape(-1)
    bad = int((~np.isfinite(v)).sum())
    if bad:
        raise EvaluationError(
            f"mean_sd: {bad} of {v.size} values are NaN or inf; leave them out and report them first"
        )
    if v.size == 0:
        return math.nan, math.nan
    if v.size == 1:
        return float(v[0]), 0.0
    return float(v.mean()), float(v.std(ddof=1))


def format_mean_sd(mean: float, sd: float | None, scale: float = 100, digits: int = 1) -> str:
    """``"77.6 ± 0.3"`` from fractions (``scale=100`` for percentages; ``scale=1`` for mm).

    ``sd=None`` prints the mean alone; a NaN mean prints ``"n/a"``.
    """
    if mean is None or math.isnan(mean):
        return "n/a"
    m = f"{mean * scale:.{digits}f}"
    if sd is None or (isinstance(sd, float) and math.isnan(sd)):
        return m
    return f"{m} ± {sd * scale:.{digits}f}"
