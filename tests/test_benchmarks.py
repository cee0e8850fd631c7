"""Smoke tests of the benchmark scripts (benchmarks/*.py): each runs end to end at tiny sizes via main(argv).

The figures themselves are machine-dependent; these tests check that every script runs the real code paths,
that its derived columns (ratios, achieved FLOP/s, percentages) follow from its measurements, and that the
measuring tools (FLOP counter, peak-RSS reset) measure what they claim.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import allocator  # noqa: E402
import common  # noqa: E402
import data_pipeline  # noqa: E402
import flops  # noqa: E402
import gpu  # noqa: E402
import inference  # noqa: E402
import run_all  # noqa: E402
import scaling  # noqa: E402
import train_throughput  # noqa: E402


def test_train_throughput_quick_ratios_and_json(tmp_path, capsys):
    out = tmp_path / "train.json"
    payload = train_throughput.main(
        ["--quick", "--models", "master_assistant,dilated_fcn,monai_basicunet", "--modes", "fp32,bf16",
         "--json", str(out)]
    )
    rows = payload["results"]
    assert {(r["model"], r["mode"]) for r in rows} == {
        (m, p) for m in ("master_assistant", "dilated_fcn", "monai_basicunet") for p in ("fp32", "bf16")
    }
    base = next(r for r in rows if (r["model"], r["mode"]) == ("monai_basicunet", "fp32"))
    assert base["ratio_vs_basicunet_fp32"] == pytest.approx(1.0)
    for r in rows:
        assert r["n"] == 2 and r["median_s"] > 0
        assert r["img_per_s"] == pytest.approx(r["images_per_step"] / r["median_s"])
        assert r["ratio_vs_basicunet_fp32"] == pytest.approx(r["img_per_s"] / base["img_per_s"])
        assert r["peak_rss_mb"] >= r["rss_before_mb"] > 0
    # paper 2's backbone: one forward per modality, so a step holds batch x 2 images
    assert next(r for r in rows if r["model"] == "dilated_fcn")["images_per_step"] == 2 * 2
    assert json.loads(out.read_text())["results"][0]["model"] == rows[0]["model"]
    text = capsys.readouterr().out
    assert "x BasicUNet fp32" in text and "target master_assistant" in text


def test_full_size_models_have_the_published_sizes():
    # build only (no forward): the benchmark compares the real configurations
    assert common.build_model("master_assistant").params_m == pytest.approx(26.722, abs=0.002)
    assert common.build_model("unet").num_modalities == 1
    fcn = common.build_model("dilated_fcn")
    assert sum(p.numel() for p in fcn.network.parameters() if p.requires_grad) == 36_979_408
    basic = common.build_model("monai_basicunet")
    assert basic.params_m == pytest.approx(31.1, abs=0.1)
    assert common.parse_models("paper1,monai_unet") == [*common.PAPER1_MODELS, "monai_unet"]
    with pytest.raises(SystemExit):
        common.parse_models("no_such_model")


def test_flop_counter_scales_with_pixels_and_training_is_3x():
    spec = common.build_model("unet", width=4)
    small = common.forward_flops(common.make_train_case(spec, "fp32", 2, 32))
    large = common.forward_flops(common.make_train_case(spec, "fp32", 2, 64))
    assert small > 0
    assert large == pytest.approx(4 * small, rel=1e-6)  # convolutions only: FLOPs proportional to H x W


def test_flops_script_achieved_flops(tmp_path):
    payload = flops.main(["--quick", "--models", "unet,monai_basicunet", "--modes", "fp32"])
    rows = {r["model"]: r for r in payload["results"]}
    assert rows["monai_basicunet"]["flops_vs_basicunet"] == pytest.approx(1.0)
    for r in rows.values():
        assert r["gflops_train"] == pytest.approx(3 * r["gflops_fwd"])
        assert r["achieved_gflops"] == pytest.approx(r["gflops_train"] * r["img_per_s"])


def test_peak_rss_reset_sees_a_new_allocation():
    if not common.peak_rss_reset():
        pytest.skip("/proc/self/clear_refs not writable here")
    before, how = common.peak_rss_mb()
    assert how == "VmHWM"
    block = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
    peak, _ = common.peak_rss_mb()
    del block
    assert peak - before > 150
    common.peak_rss_reset()
    after_reset, _ = common.peak_rss_mb()
    assert after_reset < peak - 150


def test_inference_quick_writes_prediction_with_input_geometry(tmp_path):
    import nibabel as nib

    payload = inference.main(["--quick", "--modes", "fp32,bf16", "--cli", "--workdir", str(tmp_path)])
    rows = {r["mode"]: r for r in payload["results"]}
    assert set(rows) == {"fp32", "bf16"}
    for r in rows.values():
        assert r["total_s"] == pytest.approx(r["load_s"] + r["predict_s"] + r["write_s"])
        assert r["cli_wall_s"] > 0 and r["cli_peak_rss_mb"] > 0
    assert rows["bf16"]["speedup_vs_fp32"] == pytest.approx(rows["fp32"]["total_s"] / rows["bf16"]["total_s"])
    assert 0.0 <= payload["agreement_vs_fp32"]["bf16"]["voxels_equal"] <= 1.0
    src = nib.load(tmp_path / "input" / "case_0000.nii.gz")
    for folder in ("output/fp32", "output/bf16", "output/cli_fp32"):
        pred = nib.load(tmp_path / folder / "case.nii.gz")
        assert pred.shape == src.shape == (32, 32, 4)
        assert np.allclose(pred.affine, src.affine)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


def test_data_pipeline_quick_ratio():
    payload = data_pipeline.main(["--quick", "--modes", "fp32"])
    (row,) = payload["results"]
    assert row["data_warm_ms"] > 0 and row["step_s"] > 0
    assert row["ratio_warm_pct"] == pytest.approx(100 * row["data_warm_ms"] / 1e3 / row["step_s"])


def test_scaling_quick_sweeps():
    assert scaling.configs([128, 256, 512], [2, 3, 4], grid=False) == [
        (128, 2), (256, 2), (256, 3), (256, 4), (512, 2)]
    assert len(scaling.configs([128, 256], [2, 3], grid=True)) == 4
    payload = scaling.main(["--quick", "--modes", "bf16"])
    rows = payload["results"]
    assert [(r["size"], r["modalities"]) for r in rows] == [(16, 2), (32, 2), (32, 3)]
    assert rows[2]["params_m"] > rows[1]["params_m"]  # a third modality adds an assistant stream
    assert rows[0]["time_vs_first"] == pytest.approx(1.0)


def test_run_all_quick_subset(tmp_path):
    assert run_all.main(["--quick", "--only", "flops", "--json-dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "flops.json").read_text())["benchmark"] == "flops"
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nope"])


def test_train_throughput_interleaved_quick():
    payload = train_throughput.main(
        ["--quick", "--interleave", "--models", "unet,monai_basicunet", "--modes", "fp32", "--steps", "3"]
    )
    rows = payload["results"]
    assert [r["model"] for r in rows] == ["unet", "monai_basicunet"]
    for r in rows:
        assert r["n"] == 3 and r["peak_step_delta_mb"] >= 0
        assert r["img_per_s"] == pytest.approx(r["images_per_step"] / r["median_s"])
    assert rows[1]["ratio_vs_basicunet_fp32"] == pytest.approx(1.0)


def test_allocator_before_after_runs_both_settings_in_children(capsys):
    # one training workload, one round: a child with glibc's defaults, then one with freed memory kept
    payload = allocator.main(["--quick", "--only", "1"])
    rows = payload["results"]
    assert [r["malloc"] for r in rows] == ["default", "keep-freed"]  # run_child checked each child's setting
    assert all(r["workload"].startswith("train master_assistant") and r["value"] > 0 for r in rows)
    assert rows[0]["speedup"] == 1.0
    assert rows[1]["speedup"] == pytest.approx(rows[1]["value"] / rows[0]["value"])
    assert all(r["cpu_user_s"] > 0 for r in rows)
    assert "child sys CPU" in capsys.readouterr().out


def test_gpu_script_runs_its_code_on_cpu_mfu_and_amp_check_follow_from_measurements():
    payload = gpu.main(["--device", "cpu", "--quick", "--models", "master_assistant", "--peak-tflops", "2.0"])
    rows = {r["mode"]: r for r in payload["results"]}
    assert set(rows) == {"fp32", "bf16", "fp16"}
    for r in rows.values():
        assert r["img_per_s"] == pytest.approx(2 / r["median_s"])  # --quick: batch 2
        assert r["achieved_tflops"] == pytest.approx(r["gflop_per_img_train"] * r["img_per_s"] / 1e3)
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 2.0)
    checks = {c["mode"]: c for c in payload["amp_checks"]}
    assert set(checks) == {"bf16", "fp16"}
    for c in checks.values():
        assert 0.0 <= c["agreement"] <= 1.0 and c["finite"]
        assert 0 <= c["skipped_steps"] <= 3 and (c["mode"] == "fp16" or c["skipped_steps"] == 0)
        assert c["ok"] == (c["loss_gap"] <= 0.05 and c["agreement"] >= 0.995)


def test_gpu_script_refuses_cuda_without_a_device():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu.main(["--quick"])


def test_three_d_quick_ratios_follow_from_the_timings():
    import three_d

    rows = three_d.main(["--quick", "--modes", "fp32"])["rows"]
    assert [r["model"].split()[0] for r in rows] == ["master_assistant", "MONAI"]
    base = rows[1]
    assert base["train_ratio"] == pytest.approx(1.0) and base["predict_speedup"] == pytest.approx(1.0)
    for r in rows:
        assert r["patches_per_s"] == pytest.approx(2 / r["step_s"])
        assert r["train_ratio"] == pytest.approx(r["patches_per_s"] / base["patches_per_s"])
        assert r["predict_speedup"] == pytest.approx(base["predict_s"] / r["predict_s"])
    # the BasicUNet is the width whose parameter count is closest to the master-assistant network's
    assert abs(rows[1]["params"] - rows[0]["params"]) / rows[0]["params"] < 0.3


def test_dims_dice_quick_trains_every_layout():
    import dims_dice

    results = dims_dice.main(["--quick"])["results"]
    assert set(results) == {"2D", "2.5D (k=2)", "3D"}
    assert results["3D"][0]["patch"] and results["2D"][0]["patch"] is None
    assert all(0.0 <= r[0]["dice"] <= 1.0 for r in results.values())


def test_fp32_gap_quick_splits_the_forward_and_its_bound_follows_from_the_convolution_time():
    import fp32_gap

    payload = fp32_gap.main(["--quick", "--threads", "1"])
    rows = payload["results"]
    assert [r["layout"] for r in rows] == ["NCHW", "channels_last"]
    for r in rows:
        conv = sum(v for k, v in r["ops_s"].items() if "conv" in k)
        assert 0 < r["conv_share"] <= 1 and r["conv_share"] == pytest.approx(conv / sum(r["ops_s"].values()))
        # the bound is the convolutions' own time against FLOPs / peak: the inverse of their share of the peak
        assert r["bound_x_ideal"] * r["conv_pct_peak"] == pytest.approx(1.0)
        assert r["eager_x_ideal"] == pytest.approx(r["eager_s"] * payload["peak_gflops"] / r["gflop"])
        assert r["jit_s"] > 0  # TorchScript freezing ran and was timed
