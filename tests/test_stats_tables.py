"""Statistics (Wilcoxon, mean ± s.d.) and the Markdown/CSV result tables."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from scipy import stats as sps

from modalseg.errors import ModalsegError
from modalseg.evaluation.stats import format_mean_sd, mean_sd, wilcoxon_test
from modalseg.evaluation.tables import class_table, results_table, summarise, write_table


# ---------------------------------------------------------------- Wilcoxon
@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_wilcoxon_matches_scipy(alternative):
    rng = np.random.default_rng(1)
    a = rng.normal(0.85, 0.05, 20)
    b = a - rng.normal(0.01, 0.02, 20)
    res = wilcoxon_test(a, b, alternative=alternative)
    ref = sps.wilcoxon(a, b, alternative=alternative)
    assert res["statistic"] == pytest.approx(ref.statistic)
    assert res["p_value"] == pytest.approx(ref.pvalue)
    assert res["n"] == 20 and res["n_dropped"] == 0
    assert res["median_diff"] == pytest.approx(np.median(a - b))


def test_wilcoxon_drops_nan_pairs_and_reports():
    rng = np.random.default_rng(2)
    a = rng.normal(size=12)
    b = rng.normal(size=12)
    a[3] = np.nan
    b[7] = np.nan
    res = wilcoxon_test(a, b)
    keep = np.ones(12, bool)
    keep[[3, 7]] = False
    ref = sps.wilcoxon(a[keep], b[keep])
    assert res["n"] == 10 and res["n_dropped"] == 2
    assert res["p_value"] == pytest.approx(ref.pvalue)


def test_wilcoxon_inf_minus_inf_is_dropped_but_single_inf_kept():
    a = [1.0, 2.0, math.inf, math.inf, 5.0, 3.0]
    b = [0.5, 1.0, math.inf, 2.0, 4.0, 3.5]
    res = wilcoxon_test(a, b)
    assert res["n"] == 5 and res["n_dropped"] == 1


def test_wilcoxon_all_zero_differences():
    res = wilcoxon_test([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert res["p_value"] == 1.0 and res["median_diff"] == 0.0


@pytest.mark.parametrize(
    "a, b, kwargs, text",
    [
        ([1.0, 2.0], [1.0], {}, "differ in length"),
        ([], [], {}, "no complete pair"),
        ([math.nan], [1.0], {}, "no complete pair"),
        ([1.0], [2.0], {"alternative": "bigger"}, "alternative"),
    ],
)
def test_wilcoxon_errors(a, b, kwargs, text):
    with pytest.raises(ModalsegError, match=text):
        wilcoxon_test(a, b, **kwargs)


# ---------------------------------------------------------------- mean ± sd
def test_mean_sd_conventions():
    m, s = mean_sd([0.1, 0.2, 0.6])
    assert m == pytest.approx(0.3) and s == pytest.approx(np.std([0.1, 0.2, 0.6], ddof=1))
    assert mean_sd([0.7]) == (0.7, 0.0)
    assert all(math.isnan(x) for x in mean_sd([]))
    with pytest.raises(ModalsegError, match="NaN or inf"):
        mean_sd([1.0, math.inf])


def test_format_mean_sd():
    assert format_mean_sd(0.776, 0.003) == "77.6 ± 0.3"
    assert format_mean_sd(4.1234, 0.5, scale=1, digits=2) == "4.12 ± 0.50"
    assert format_mean_sd(0.5, None) == "50.0"
    assert format_mean_sd(math.nan, math.nan) == "n/a"


# ---------------------------------------------------------------- write_table
def test_write_table_markdown_and_csv(tmp_path):
    rows = [
        {"Model": "U-Net", "Dice": 0.7331234567, "note": "a|b"},
        {"Model": "Proposed", "Dice": math.inf},
        {"Model": "FuseNet", "Dice": math.nan, "extra": "ignored"},
    ]
    md, cv = tmp_path / "out" / "t.md", tmp_path / "out" / "t.csv"
    write_table(rows, ["Model", "Dice", "note"], md, cv, title="Table 1")
    text = md.read_text()
    lines = text.splitlines()
    assert lines[0] == "**Table 1**"
    assert lines[2] == "| Model | Dice | note |"
    assert lines[4] == "| U-Net | 0.7331 | a\\|b |"
    assert "| Proposed | inf |  |" in lines and "| FuseNet | n/a |  |" in lines
    with open(cv, newline="") as fh:
        parsed = list(csv.DictReader(fh))
    assert [r["Model"] for r in parsed] == ["U-Net", "Proposed", "FuseNet"]
    assert float(parsed[0]["Dice"]) == 0.7331234567  # full precision in CSV
    assert math.isinf(float(parsed[1]["Dice"])) and math.isnan(float(parsed[2]["Dice"]))
    assert parsed[0]["note"] == "a|b" and "extra" not in parsed[2]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t.csv", "t.md"]  # no temp files left


# ---------------------------------------------------------------- paper-style tables
def _records():
    """2 models x 3 runs x 4 cases; the case values differ per run so the run means have a spread."""
    recs = []
    for model, base in (("U-Net", 0.70), ("Proposed", 0.78)):
        for run in range(3):
            for case in range(4):
                recs.append(
                    {
                        "model": model,
                        "run": run,
                        "fold": case % 2,
                        "case_id": f"p{case}",
                        "class_name": "mass",
                        "dice": base + 0.01 * run + 0.02 * case,
                        "sensitivity": base + 0.05,
                        "rad": 0.3 - 0.01 * run,
                        "status": "ok",
                    }
                )
    return recs


def test_results_table_paper1_style(tmp_path):
    recs = _records()
    rows, cols = results_table(recs, row_order=["Proposed", "U-Net"])
    assert cols == ["Model", "Dice", "Sensitivity", "Relative area difference", "Runs"]
    assert [r["Model"] for r in rows] == ["Proposed", "U-Net"]
    run_means = [np.mean([0.78 + 0.01 * run + 0.02 * c for c in range(4)]) for run in range(3)]
    expected = format_mean_sd(np.mean(run_means), np.std(run_means, ddof=1))
    assert rows[0]["Dice"] == expected == "82.0 ± 1.0"
    assert rows[1]["Relative area difference"] == "29.0 ± 1.0"
    assert rows[0]["Runs"] == 3
    write_table(rows, cols, tmp_path / "t1.md", tmp_path / "t1.csv", title="Table 1")
    with open(tmp_path / "t1.csv", newline="") as fh:
        parsed = list(csv.DictReader(fh))
    assert parsed[1]["Dice"] == rows[1]["Dice"]


def test_results_table_reports_exclusions():
    recs = _records()
    recs[0].update(dice=0.0, sensitivity=0.0, rad=1.0, status="pred_empty", hd=math.inf)
    for r in recs[1:]:
        r["hd"] = 3.0
    rows, cols = results_table(recs, metrics=("dice", "hd"))
    assert cols[-1] == "Excluded"
    assert rows[0]["Excluded"] == "HD: pred_empty: 1"
    assert rows[0]["HD"] == "3.0 ± 0.0" and rows[1]["Excluded"] == ""


def test_summarise_sd_over_cases():
    recs = [{"m": "a", "dice": v} for v in (0.2, 0.4, 0.9)]
    (s,) = summarise(recs, metric="dice", group_keys=("m",), sd_over="cases")
    assert s["n_runs"] == 1 and s["n_values"] == 3
    assert s["sd"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
    (r,) = summarise(recs, metric="dice", group_keys=("m",))
    assert r["sd"] == 0.0  # one run: no spread over runs


def test_class_table_paper2_style(tmp_path):
    recs = []
    for model in ("Single", "CSA"):
        for modality in ("CT", "MRI"):
            for k, cls in enumerate(("LVM", "LAC")):
                for case in range(3):
                    dice = 0.8 + 0.05 * k + (0.02 if model == "CSA" else 0) + 0.01 * case
                    recs.append(
                        {
                            "model": model,
                            "modality": modality,
                            "class_name": cls,
                            "case_id": str(case),
                            "dice": dice,
                            "hd": 5.0 + case,
                        }
                    )
    recs = [
        r
        for r in recs
        if not (r["model"] == "Single" and r["modality"] == "MRI" and r["class_name"] == "LAC")
    ]
    rows, cols = class_table(recs, metrics=("dice",), class_average=True)
    assert cols == ["Model", "CT LVM", "CT LAC", "CT Avg", "MRI LVM", "MRI LAC", "MRI Avg"]
    csa = rows[1]
    assert csa["CT LVM"] == "83.00" and csa["CT LAC"] == "88.00" and csa["CT Avg"] == "85.50"
    assert rows[0]["MRI LAC"] == "n/a" and rows[0]["MRI Avg"] == "n/a"
    rows2, cols2 = class_table(recs, metrics=("dice", "hd"), show_sd=True)
    assert "CT Dice LVM" in cols2 and "MRI HD LAC" in cols2
    assert rows2[1]["CT HD LVM"] == "6.00 ± 0.00"
    write_table(rows, cols, None, tmp_path / "t2.csv")
    with open(tmp_path / "t2.csv", newline="") as fh:
        parsed = list(csv.reader(fh))
    assert parsed[0] == cols and parsed[2][1] == "83.00"
    assert not (tmp_path / "t2.md").exists()


def test_tables_reject_empty_input():
    with pytest.raises(ModalsegError):
        results_table([])
    with pytest.raises(ModalsegError):
        class_table([])
