"""int8 post-training quantization of exports (issue 17, item 4): off by default, calibrated on training slices,
labels >= 99 % equal to the fp32 export's on a (briefly trained) tiny model.

The model is trained for 30 steps first: an untrained network's probabilities sit near 0.5 everywhere, where any
rounding flips labels (about 96.5 % agreement measured), whereas a trained one's margins are wide.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from modalseg.deploy.card import CARD_NAME  # noqa: E402
from test_export import assert_one_line, compare_outputs, run_cli  # noqa: E402


def test_int8_export_agrees_with_fp32(tmp_path, capsys, breast_dataset):
    import onnx

    run = tmp_path / "run"
    code, _, err = run_cli(capsys, [
        "train", "--data", breast_dataset, "--output", run, "--model", "master_assistant", "--epochs", "10",
        "--set", "model_options={base_width: 4}", "--set", "preprocess_options={target_size: [16, 16]}",
        "--set", "precision=fp32", "--set", "progress=false", "--set", "tensorboard=false",
        "--set", "num_threads=1", "--set", "batch_size=4", "--set", "lr=0.01"])
    assert code == 0, err
    common = ["--model", run, "--checkpoint", "latest"]
    assert run_cli(capsys, ["export", *common, "--output", tmp_path / "fp32"])[0] == 0
    code, out, err = run_cli(capsys, ["export", *common, "--output", tmp_path / "int8", "--int8",
                                      "--calibration-data", breast_dataset, "--calibration-slices", "32"])
    assert code == 0, err
    assert "int8 labels agree" in out
    card = json.loads((tmp_path / "int8" / CARD_NAME).read_text())
    fp32_card = json.loads((tmp_path / "fp32" / CARD_NAME).read_text())
    assert card["precision"] == "int8" and fp32_card["precision"] == "fp32"
    graph = card["folds"][0]["graphs"][0]
    fp32_graph = fp32_card["folds"][0]["graphs"][0]
    report = graph["int8"]
    assert 0 < report["calibration_slices"] <= 32 and report["label_agreement"] >= 0.99
    assert report["fp32_sha256"] == fp32_graph["sha256"]  # the quantized graph is that fp32 graph's
    assert graph["bytes"] < fp32_graph["bytes"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8" / graph["file"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "Softmax" in ops

    images = ["--input", breast_dataset / "imagesTr", "--probabilities"]
    assert run_cli(capsys, ["predict", "--model", tmp_path / "fp32", "--output", tmp_path / "p32", *images])[0] == 0
    code, out, err = run_cli(capsys, ["predict", "--model", tmp_path / "int8", "--output", tmp_path / "p8", *images])
    assert code == 0, err
    assert "onnxruntime int8 on cpu" in out
    agree, _ = compare_outputs(tmp_path / "p32", tmp_path / "p8")  # same names and geometry; labels:
    assert agree >= 0.99, agree


def test_calibration_data_without_int8_is_refused(tmp_path, capsys, breast_dataset):
    code, _, err = run_cli(capsys, ["export", "--model", tmp_path, "--output", tmp_path / "out",
                                    "--calibration-data", breast_dataset])
    assert_one_line(code, err, "--calibration-data is for --int8")
