"""Result tables as Markdown and CSV (written atomically).

Input everywhere is a flat list of records, one per case (or per run), e.g.
``{"model": "Proposed", "run": 0, "fold": 2, "modality": "T1C", "class_name": "mass", "case_id": "p01",
"dice": 0.81, "sensitivity": 0.85, "rad": 0.2, "status": "ok"}`` (``CaseMetrics.as_dict(model=..., ...)``).

* :func:`results_table`: paper 1 Table 1 -- rows = models, columns = Dice, Sensitivity, Relative area
  difference as mean ± s.d. **over runs** (each run's value is its mean over all cases of the five folds).
* :func:`class_table`: paper 2 Tables 1-3 -- rows = models (settings), columns = modality × class (× metric),
  mean Dice (%) or Hausdorff distance (mm).

NaN and inf values (see ``metrics`` for when they occur) are left out of every mean and counted; tables
get an ``Excluded`` column naming them whenever any was left out.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from modalseg.errors import EvaluationError
from modalseg.evaluation.stats import format_mean_sd, mean_sd
from modalseg.utils.atomic import atomic_write_text

METRIC_LABELS: dict[str, str] = {
    "dice": "Dice",
    "sensitivity": "Sensitivity",
    "rad": "Relative area difference",
    "hd": "HD",
    "hd95": "HD95",
}
# Display scale: fractions as percentages (paper 1 "# Values in percentage"), distances in mm as they are.
METRIC_SCALES: dict[str, float] = {"dice": 100, "sensitivity": 100, "rad": 100, "hd": 1, "hd95": 1}


def _cell_md(value: object, float_digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return "n/a"
        return "inf" if math.isinf(value) else f"{value:.{float_digits}g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _cell_csv(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float | np.floating):
        return repr(float(value))
    return str(value)


def markdown_table(
    rows: Sequence[Mapping], columns: Sequence[str], *, title: str | None = None, float_digits: int = 4
) -> str:
    """A GitHub-flavoured Markdown table (missing keys give empty cells)."""
    lines = [f"**{title}**", ""] if title else []
    lines.append("| " + " | ".join(_cell_md(c, float_digits) for c in columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_cell_md(row.get(c), float_digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_table(
    rows: Sequence[Mapping],
    columns: Sequence[str],
    path_md: str | Path | None,
    path_csv: str | Path | None,
    *,
    title: str | None = None,
    float_digits: int = 4,
) -> None:
    """Write ``rows`` (dicts) restricted to ``columns`` as Markdown and/or CSV, each file atomically.

    Markdown shows floats with ``float_digits`` significant digits; CSV keeps full precision (``repr``),
    NaN as ``nan`` and inf as ``inf`` (``float()`` reads them back). A ``None`` value is an empty cell in both
    (``modalseg evaluate`` gives the s.d. of a single case as None: no spread to show, rather than 0 or NaN).
    Pass ``None`` as a path to skip a format.
    """
    if not columns:
        raise EvaluationError("write_table: no columns given")
    if path_md is not None:
        atomic_write_text(path_md, markdown_table(rows, columns, title=title, float_digits=float_digits))
    if path_csv is not None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell_csv(row.get(c)) for c in columns])
        atomic_write_text(path_csv, buf.getvalue())


def _ordered_unique(values: Iterable) -> list:
    seen: dict = {}
    for v in values:
        seen.setdefault(v, None)
    return list(seen)


def summarise(
    records: Sequence[Mapping],
    *,
    metric: str,
    group_keys: Sequence[str],
    run_key: str = "run",
    sd_over: str = "runs",
) -> list[dict]:
    """Mean ± s.d. of ``metric`` per group, two-stage as in paper 1.

    Stage 1: per run (records without ``run_key`` form a single run), the mean over that run's finite values.
    Stage 2: ``sd_over="runs"``: mean and s.d. of the run means (paper 1's three runs);
    ``sd_over="cases"``: mean of the run means, s.d. over all finite case values pooled.
    Returns one dict per group: the group keys, ``mean``, ``sd``, ``n_runs``, ``n_values`` (finite values
    used), ``n_excluded`` and ``excluded`` (e.g. ``"pred_empty: 2"``, by the records' ``status`` if present).
    """
    if sd_over not in ("runs", "cases"):
        raise EvaluationError(f"summarise: sd_over must be 'runs' or 'cases', got {sd_over!r}")
    groups: dict[tuple, list[Mapping]] = {}
    for rec in records:
        if metric not in rec:
            continue
        groups.setdefault(tuple(rec.get(k) for k in group_keys), []).append(rec)
    out: list[dict] = []
    for key, recs in groups.items():
        run_values: dict = {}
        reasons: dict[str, int] = {}
        pooled: list[float] = []
        for rec in recs:
            v = rec[metric]
            v = math.nan if v is None else float(v)
            if not math.isfinite(v):
                reason = str(rec.get("status") or ("NaN" if math.isnan(v) else "inf"))
                reasons[reason] = reasons.get(reason, 0) + 1
                continue
            run_values.setdefault(rec.get(run_key), []).append(v)
            pooled.append(v)
        run_means = [float(np.mean(v)) for v in run_values.values()]
        mean, sd = mean_sd(run_means)
        if sd_over == "cases":
            sd = mean_sd(pooled)[1]
        n_excl = sum(reasons.values())
        out.append(
            {
                **dict(zip(group_keys, key, strict=True)),
                "mean": mean,
                "sd": sd,
                "n_runs": len(run_means),
                "n_values": len(pooled),
                "n_excluded": n_excl,
                "excluded": "; ".join(f"{r}: {k}" for r, k in sorted(reasons.items())),
            }
        )
    return out


def _order(present: list, order: Sequence | None) -> list:
    if order is None:
        return present
    return [v for v in order if v in present] + [v for v in present if v not in order]


def results_table(
    records: Sequence[Mapping],
    *,
    metrics: Sequence[str] = ("dice", "sensitivity", "rad"),
    row_key: str = "model",
    run_key: str = "run",
    labels: Mapping[str, str] | None = None,
    scales: Mapping[str, float] | None = None,
    digits: int = 1,
    sd_over: str = "runs",
    row_order: Sequence | None = None,
) -> tuple[list[dict], list[str]]:
    """Paper 1 Table 1: one row per ``row_key`` value, one ``"mean ± sd"`` column per metric.

    Returns ``(rows, columns)`` ready for :func:`write_table`. Fractions are shown as percentages
    (``METRIC_SCALES``), distances in mm. A ``Runs`` column gives the number of runs, and an ``Excluded``
    column appears when any value was left out (which metric, why, how many).
    """
    labels = {**METRIC_LABELS, **(labels or {})}
    scales = {**METRIC_SCALES, **(scales or {})}
    if not records:
        raise EvaluationError("results_table: no records")
    first_col = row_key.replace("_", " ").capitalize()
    row_values = _order(_ordered_unique(r.get(row_key) for r in records), row_order)
    rows: dict = {v: {first_col: v} for v in row_values}
    excluded: dict = {v: [] for v in row_values}
    for metric in metrics:
        for s in summarise(records, metric=metric, group_keys=(row_key,), run_key=run_key, sd_over=sd_over):
            v = s[row_key]
            rows[v][labels.get(metric, metric)] = format_mean_sd(
                s["mean"], s["sd"], scales.get(metric, 1), digits
            )
            rows[v]["Runs"] = max(rows[v].get("Runs", 0), s["n_runs"])
            if s["n_excluded"]:
                excluded[v].append(f"{labels.get(metric, metric)}: {s['excluded']}")
    columns = [first_col] + [labels.get(m, m) for m in metrics] + ["Runs"]
    if any(excluded.values()):
        columns.append("Excluded")
        for v in row_values:
            rows[v]["Excluded"] = "; ".join(excluded[v])
    return [rows[v] for v in row_values], columns


def class_table(
    records: Sequence[Mapping],
    *,
    metrics: Sequence[str] = ("dice",),
    row_key: str = "model",
    column_keys: Sequence[str] = ("modality", "class_name"),
    run_key: str = "run",
    labels: Mapping[str, str] | None = None,
    scales: Mapping[str, float] | None = None,
    digits: int = 2,
    show_sd: bool = False,
    sd_over: str = "runs",
    class_average: bool = False,
    row_order: Sequence | None = None,
) -> tuple[list[dict], list[str]]:
    """Paper 2 Tables 1-3: rows = settings, columns = metric × modality × class.

    Column names join the metric label (only when several metrics are shown) and the ``column_keys`` values,
    e.g. ``"CT LVM"`` or ``"LGE Dice LV"``. Cells are means (``digits`` decimals), ``"mean ± sd"`` with
    ``show_sd``. ``class_average`` adds, per metric and modality, the mean of the class means (paper 2's
    "overall average Dice score of three classes") as ``"... Avg"``. Missing combinations read ``n/a``.
    """
    labels = {**METRIC_LABELS, **(labels or {})}
    scales = {**METRIC_SCALES, **(scales or {})}
    if not records:
        raise EvaluationError("class_table: no records")
    if not column_keys:
        raise EvaluationError("class_table: column_keys must name at least one key (e.g. class_name)")
    first_col = row_key.replace("_", " ").capitalize()
    row_values = _order(_ordered_unique(r.get(row_key) for r in records), row_order)
    col_values = [_ordered_unique(r.get(k) for r in records) for k in column_keys]
    rows: dict = {v: {first_col: v} for v in row_values}
    excluded: dict = {v: [] for v in row_values}
    columns = [first_col]
    for metric in metrics:
        scale = scales.get(metric, 1)
        summ = {
            (s[row_key], *(s[k] for k in column_keys)): s
            for s in summarise(
                records, metric=metric, group_keys=(row_key, *column_keys), run_key=run_key, sd_over=sd_over
            )
        }
        prefix = [labels.get(metric, metric)] if len(metrics) > 1 else []
        outer = [()]
        for vals in col_values[:-1]:
            outer = [o + (v,) for o in outer for v in vals]
        for o in outer:
            class_cols: list[str] = []
            for last in col_values[-1]:
                combo = (*o, last)
                name = " ".join(str(x) for x in (*o[:1], *prefix, *o[1:], last))
                columns.append(name)
                class_cols.append(name)
                for rv in row_values:
                    s = summ.get((rv, *combo))
                    if s is None:
                        rows[rv][name] = "n/a"
                        continue
                    rows[rv][name] = format_mean_sd(s["mean"], s["sd"] if show_sd else None, scale, digits)
                    rows[rv][f"_{name}"] = s["mean"]
                    if s["n_excluded"]:
                        excluded[rv].append(f"{name}: {s['excluded']}")
            if class_average:
                avg_name = " ".join(str(x) for x in (*o[:1], *prefix, *o[1:], "Avg"))
                columns.append(avg_name)
                for rv in row_values:
                    means = [rows[rv].get(f"_{c}") for c in class_cols]
                    ok = [m for m in means if m is not None and math.isfinite(m)]
                    rows[rv][avg_name] = (
                        format_mean_sd(float(np.mean(ok)), None, scale, digits)
                        if len(ok) == len(means)
                        else "n/a"
                    )
    for rv in row_values:
        for k in [k for k in rows[rv] if k.startswith("_")]:
            del rows[rv][k]
    if any(excluded.values()):
        columns.append("Excluded")
        for rv in row_values:
            rows[rv]["Excluded"] = "; ".join(excluded[rv])
    return [rows[v] for v in row_values], columns
