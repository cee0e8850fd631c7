"""Smoke test of benchmarks/deploy.py: every backend configuration runs end to end at a tiny size, interleaved, and
the derived columns follow from the measurements."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import deploy  # noqa: E402


def test_deploy_benchmark_quick_runs_every_backend(tmp_path, capsys):
    out = tmp_path / "deploy.json"
    payload = deploy.main(["--quick", "--int8", "--workdir", str(tmp_path), "--json", str(out)])
    rows = {r["config"]: r for r in payload["results"]}
    expected = [c[0] for c in deploy.CONFIGS if deploy.available(c[1])]
    assert list(rows) == expected
    assert {"torch fp32", "torch fp32+CL", "torch bf16+CL", "onnxruntime fp32", "onnxruntime int8"} <= set(rows)
    base = rows["torch fp32"]
    assert base["speedup_vs_torch_fp32"] == pytest.approx(1.0)
    pipeline = rows.pop("pipeline only")  # everything but the network: no network figures of its own
    assert pipeline["n"] == 1 and pipeline["predict_s"] > 0 and "x_ideal" not in pipeline
    for r in rows.values():
        assert r["n"] == 1 and r["total_s"] >= r["predict_s"] > 0
        assert r["speedup_vs_torch_fp32"] == pytest.approx(base["total_s"] / r["total_s"])
        assert r["slices_per_s"] == pytest.approx(4 / r["predict_s"])
        # achieved network FLOP/s and the time against FLOPs / measured dense peak follow from the measurements
        flops, peaks = payload["network_flops_per_volume"], payload["machine"]["peak_gflops"]
        assert flops > 0 and peaks["fp32"] > 0 and peaks["bf16"] > 0
        assert r["achieved_gflops"] == pytest.approx(flops / r["predict_s"] / 1e9)
        peak = peaks["fp32"] if "fp32" in r["precision"] else peaks["bf16"] if "bf16" in r["precision"] else None
        if peak is None:
            assert r["x_ideal"] is None  # int8: no dense int8 peak measured
        else:
            assert r["x_ideal"] == pytest.approx(r["predict_s"] * peak * 1e9 / flops)
            assert r["network_x_ideal"] == pytest.approx((r["predict_s"] - pipeline["predict_s"]) * peak * 1e9 / flops)
    for name in ("torch fp32+CL", "onnxruntime fp32", "openvino fp32"):
        if name in rows:  # fp32 everywhere: the same labels, probabilities within float rounding
            assert rows[name]["labels_equal_pct"] >= 99.9 and rows[name]["max_abs_prob_diff"] < 1e-3
    assert json.loads(out.read_text())["benchmark"] == "deploy"
    text = capsys.readouterr().out
    assert "x torch fp32" in text and "onnxruntime" in text and "logical CPUs" in text
