"""Every training option is checked by its declared type and range before any work starts (issue 11, 13/18-20).

A bad value given with ``--set``, in a config file or as a flag of ``train``/``predict`` must end the CLI with exit
code 2 and exactly one stderr line naming the option, the value and what is expected; no traceback, no output
folder. Config files must be UTF-8 and must not repeat a key. Scientific notation (``1e-3``), which YAML 1.1 reads
as a string, is a number.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import modalseg.cli.train as cli_train
import modalseg.training.predict as mpredict
from modalseg.cli.main import build_parser, main
from modalseg.errors import ConfigError
from modalseg.training.config import OptionCheck, TrainConfig, describe_options, load_config
from test_reliability import assert_refused as _assert_refused  # noqa: E402

# ------------------------------------------------------------------------------------------------ helpers
from test_reliability import make_dataset, run_cli, train_args  # noqa: E402


def assert_refused(code: int, err: list[str], *fragments: str) -> str:
    """Exit code 2, exactly one stderr line containing every fragment, no traceback."""
    return _assert_refused(code, err, "", *fragments)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("trust") / "ds")


@pytest.fixture
def captured_train(monkeypatch) -> list[dict]:
    """Replace ``train_many`` by a recorder: what ``train`` would train, without training."""
    calls: list[dict] = []

    def fake(cfg, *, folds, runs=1, **kwargs):
        calls.append({"cfg": cfg, "folds": folds, "runs": runs})
        return []

    monkeypatch.setattr(cli_train, "train_many", fake)
    return calls


# --------------------------------------------------------------------------- item 18: --set type and range
BAD_SET_VALUES = [
    ("fold", "abc", "integer"), ("seed", "abc", "integer"), ("seed", "-1", "integer"),
    ("split_seed", "abc", "integer"), ("num_threads", "abc", "integer"), ("num_threads", "0", ">= 1"),
    ("checkpoint_every", "abc", "integer"), ("checkpoint_every", "-1", ">= 0"),
    ("model_options", "5", "mapping"), ("model_options", "{1: 2}", "string keys"),
    ("preprocess_options", "5", "mapping"), ("ce_weight", "abc", "number"), ("ce_weight", "-1", ">= 0"),
    ("lr", ".nan", "finite"), ("lr", ".inf", "finite"), ("lr", "-.inf", "finite"), ("lr", "nan", "finite"),
    ("lr", "1e999", "finite"), ("lr", "0", "> 0"), ("lr", "-1e-3", "> 0"),
    ("lr_step", "0", ">= 1"), ("lr_gamma", "abc", "(0, 1]"), ("lr_gamma", "0", "(0, 1]"),
    ("lr_gamma", "1.5", "(0, 1]"), ("lr_step_unit", "epochs", "epoch, iteration"),
    ("progress", "maybe", "true or false"), ("progress", "1", "true or false"),
    ("channels_last", "abc", "true, false or null"), ("tensorboard", "null", "true or false"),
    ("steps_per_epoch", "-3", ">= 1"), ("max_steps", "0", ">= 1"),
    ("batch_size", "true", "integer"), ("batch_size", "2.5", "integer"), ("epochs", "2.0", "integer"),
    ("kd_temperature", "0", "> 0"), ("affinity_weight", "-0.5", ">= 0"), ("affinity_weight", ".nan", "finite"),
    ("kd_weight", "-2e+1", ">= 0"), ("conv_l2", "-1e-4", ">= 0"), ("conv_l2", ".inf", "finite"),
    ("val_every", "0", ">= 1"), ("epochs", "0", ">= 1"), ("folds", "1", ">= 2"),
    ("modalities", "T1C", "list of strings"), ("modalities", "[1, 2]", "list of strings"),
    ("feature_layers", "[]", "non-empty list"), ("device", "gpu", "auto, cpu, cuda"),
    ("precision", "xyz", "auto, bf16, fp16, fp32"), ("layout", "bogus", "one of auto"),
    ("setting", "bogus", "one of single"), ("model", "5", "a string"), ("output", "[a, b]", "path"),
    ("model_options", "null", "mapping"),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD_SET_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_SET_VALUES])
def test_set_value_is_checked_by_declared_type_and_range(key, value, expected, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, train_args(dataset, out, "--set", f"{key}={value}", "--set", "max_steps=1"))
    line = assert_refused(code, err, f"--set {key}", "expected", expected)
    assert line.startswith("modalseg train: error: ")
    assert not out.exists()


def test_lr_gamma_refused_before_training(dataset, tmp_path, capsys):
    """Used to crash with a traceback only after ``lr_step`` epochs of training."""
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, train_args(dataset, out, "--set", "lr_step=1", "--set", "lr_gamma=abc"))
    assert_refused(code, err, "lr_gamma", "'abc'", "(0, 1]")
    assert not out.exists() and not (tmp_path / ".modalseg_cache").exists()


@pytest.mark.parametrize(("text", "expected"), [
    ("lr_gamma: abc", "lr_gamma"), ("kd_temperature: 0", "kd_temperature"), ("batch_size: true", "batch_size"),
    ("lr: .nan", "lr"), ("modalities: T1C", "modalities"), ("1: x", "unknown option(s) 1"),
])
def test_config_file_value_is_checked_and_names_the_file(text, expected, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: x\noutput: {tmp_path / 'run'}\n{text}\n")
    code, _, err = run_cli(capsys, ["train", "--config", str(cfg)])
    assert_refused(code, err, str(cfg), expected)
    assert not (tmp_path / "run").exists()


def test_every_option_declares_its_type_and_defaults_are_valid():
    for f in dataclasses.fields(TrainConfig):
        assert isinstance(f.metadata.get("check"), OptionCheck), f.name
    TrainConfig().validate()
    assert TrainConfig.from_dict({"data": "x", "lr": 1, "lr_gamma": 1}).lr == 1.0  # ints are numbers
    with pytest.raises(ConfigError, match="fold must be in 0..1"):
        TrainConfig.from_dict({"data": "x", "folds": 2, "fold": 2})


# ------------------------------------------------------------------------- item 13: scientific notation
SCIENTIFIC = [("1e-3", 1e-3), ("5E-4", 5e-4), ("1.0e-4", 1e-4), ("2e+1", 20.0), ("+3E-2", 0.03)]


@pytest.mark.parametrize(("text", "value"), SCIENTIFIC, ids=[t for t, _ in SCIENTIFIC])
def test_scientific_notation_in_yaml_config_is_a_number(text, value, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"data: x\nlr: {text}\nconv_l2: {text}\n")
    cfg = load_config(path)
    assert cfg.lr == value and isinstance(cfg.lr, float) and cfg.conv_l2 == value


def test_scientific_notation_on_the_command_line_is_a_number(tmp_path, capsys, captured_train):
    args = build_parser().parse_args(["train", "--set", "lr=1e-3", "--set", "kd_temperature=5E-1"])
    overrides = cli_train.collect_overrides(args)
    assert overrides["lr"] == 1e-3 and overrides["kd_temperature"] == 0.5
    assert main(["train", "--data", "x", "--output", str(tmp_path / "run"), "--set", "lr=1e-3"]) == 0
    assert captured_train[0]["cfg"].lr == 1e-3
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: x\nlr: 1e-4\n")
    assert main(["train", "--config", str(cfg), "--output", str(tmp_path / "run"), "--set", "lr=5E-4"]) == 0
    assert captured_train[1]["cfg"].lr == 5e-4


def test_direct_construction_is_normalised_by_validate():
    cfg = TrainConfig(data="x", lr="1e-3", output=Path("runs/x"))  # type: ignore[arg-type]
    cfg.validate()
    assert cfg.lr == 1e-3 and cfg.output == "runs/x"
    for bad in ("nan", "inf", "-inf", "1e-3x", ""):
        with pytest.raises(ConfigError, match="finite number"):
            TrainConfig(lr=bad).validate()  # type: ignore[arg-type]


# ---------------------------------------------------------------------- YAML/JSON/TOML: encoding, duplicates
def test_non_utf8_config_is_one_line_naming_the_file(tmp_path, capsys):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("data: café\n".encode("latin-1"))
    code, _, err = run_cli(capsys, ["train", "--config", str(cfg)])
    assert_refused(code, err, str(cfg), "UTF-8")


@pytest.mark.parametrize(("name", "text", "key"), [
    ("top.yaml", "data: x\nlr: 1e-4\nlr: 1e-4\n", "'lr'"),
    ("nested.yaml", "data: x\nmodel_options:\n  base_width: 4\n  base_width: 8\n", "'base_width'"),
    ("flow.yaml", "data: x\npreprocess_options: {target_size: [16, 16], target_size: [8, 8]}\n", "'target_size'"),
    ("dup.json", '{"data": "x", "lr": 0.001, "lr": 0.01}', "'lr'"),
    ("nested.json", '{"data": "x", "model_options": {"a": 1, "a": 2}}', "'a'"),
    ("dup.toml", 'data = "x"\nlr = 0.001\nlr = 0.01\n', "lr = 0.01"),
])
def test_duplicate_config_key_is_refused_naming_key_and_file(name, text, key, tmp_path, capsys):
    cfg = tmp_path / name
    cfg.write_text(text)
    code, _, err = run_cli(capsys, ["train", "--config", str(cfg), "--output", str(tmp_path / "run")])
    assert_refused(code, err, str(cfg), key)
    assert not (tmp_path / "run").exists()


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: x\nmodel_options: &m {base_width: 4}\npreprocess_options: {<<: *m, target_size: [16, 16]}\n")
    assert load_config(path).preprocess_options == {"base_width": 4, "target_size": [16, 16]}


def test_duplicate_key_in_set_value_is_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, ["train", "--data", "x", "--output", str(tmp_path / "run"),
                                    "--set", "model_options={base_width: 4, base_width: 8}"])
    assert_refused(code, err, "--set model_options", "duplicate key 'base_width'")


# ------------------------------------------------------------------------------- item 19: --runs and --fold
@pytest.mark.parametrize("flags", [["--runs", "0"], ["--runs", "-2"], ["--runs", "abc"], ["--runs", "1.5"],
                                   ["--fold", "x"], ["--fold", "-1"], ["--fold", "2"], ["--fold", "1.5"],
                                   ["--epochs", "abc"], ["--epochs", "0"], ["--seed", "abc"]],
                         ids=" ".join)
def test_train_flags_refused_with_one_line(flags, tmp_path, capsys, captured_train):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, ["train", "--data", "x", "--output", str(out), "--set", "folds=2", *flags])
    assert_refused(code, err, flags[0], repr(flags[1]) if flags[0] in ("--runs", "--fold") else flags[0])
    assert captured_train == [] and not out.exists()


def test_train_flags_accepted(tmp_path, captured_train):
    base = ["train", "--data", "x", "--output", str(tmp_path / "run"), "--set", "folds=3"]
    assert main([*base, "--fold", "cv", "--runs", "2", "--epochs", "3", "--seed", "7"]) == 0
    assert main([*base, "--fold", "1"]) == 0
    assert main([*base, "--fold", "all"]) == 0  # nnU-Net's meaning: one model on every case
    first, second, third = captured_train
    assert first["folds"] == [0, 1, 2] and first["runs"] == 2
    assert first["cfg"].epochs == 3 and first["cfg"].seed == 7
    assert second["folds"] == [1] and second["runs"] == 1
    assert third["folds"] == ["all"]


# ------------------------------------------------------------------------------------------ item 20: predict
@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(mpredict, "load_models", refuse)


@pytest.mark.parametrize("flags", [["--device", "gpu"], ["--precision", "xyz"], ["--batch-size", "0"],
                                   ["--batch-size", "-4"], ["--batch-size", "abc"], ["--batch-size", "2.5"]],
                         ids=" ".join)
def test_predict_options_refused_before_loading_models(flags, tmp_path, capsys, no_model_loading):
    out = tmp_path / "pred"
    argv = ["predict", "--model", str(tmp_path / "m.pt"), "--input", str(tmp_path), "--output", str(out), *flags]
    code, _, err = run_cli(capsys, argv)
    line = assert_refused(code, err, flags[0], repr(flags[1]), "expected")
    assert line.startswith("modalseg predict: error: ")
    assert not out.exists()


def test_predict_valid_options_reach_model_loading(tmp_path, monkeypatch, capsys):
    seen = {}

    def stop(models, precision, **kwargs):
        seen["precision"] = precision
        raise ConfigError("stopped at load_models")

    monkeypatch.setattr(mpredict, "load_models", stop)
    argv = ["predict", "--model", "m.pt", "--input", str(tmp_path), "--output", str(tmp_path / "p"),
            "--device", "cpu", "--precision", "fp32", "--batch-size", "3"]
    code, _, err = run_cli(capsys, argv)
    assert_refused(code, err, "stopped at load_models")
    assert seen["precision"].name == "fp32"


# ------------------------------------------------------------------------------ --help-config: type and range
def test_help_config_shows_type_and_range(capsys):
    assert main(["train", "--help-config"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines.keys() == set(TrainConfig.__dataclass_fields__)
    assert "a finite number > 0" in lines["lr"]
    assert "(0, 1] or null" in lines["lr_gamma"]
    assert "an integer >= 1 or null" in lines["batch_size"]
    assert "an integer >= 2" in lines["folds"]
    assert "one of auto, cpu, cuda" in lines["device"]
    assert "true or false" in lines["progress"]
    assert "mapping" in lines["model_options"]
    assert describe_options().count("\n") == len(lines) - 1
