"""The robustness table (issue 16, item 3): a paired model's validation Dice / HD95 with each modality subset
removed, ``modalseg evaluate --checkpoint ... --robustness``.

Subsets are enumerated and parsed as documented; the "none removed" row is exactly what ``modalseg predict``
followed by ``modalseg evaluate`` gives on the same cases; removing a modality zeroes its channel (after
normalisation) and leaves the others' input unchanged; models trained without dropout are evaluated (and still
refused by ``predict --missing``); unpaired models and bad option combinations are refused in one line.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from modalseg.cli.main import main
from modalseg.errors import ConfigError
from modalseg.training.checkpoint import load_checkpoint, save_checkpoint
from modalseg.training.config import TrainConfig
from modalseg.training.engine import Trainer
from modalseg.training.robustness import parse_subsets, removal_subsets, subset_name

TINY = {"base_width": 4, "sa_reduction": 2}


def cfg_for(data: Path, out: Path, **kw) -> TrainConfig:
    values = dict(data=str(data), output=str(out), model="master_assistant", model_options=dict(TINY),
                  preprocess_options={"target_size": [32, 32]}, epochs=1, folds=2, fold=0, seed=3, lr=1e-2,
                  precision="fp32", progress=False, tensorboard=False, max_steps=3)
    values.update(kw)
    return TrainConfig(**values)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(breast_dataset, tmp_path_factory):
    """Tiny models trained 3 steps on fold 0 of 2: with modality dropout of T2W, without, and a T1C U-Net."""
    root = tmp_path_factory.mktemp("robustness_runs")
    out = {}
    for name, kw in (("dropout", {"modality_dropout": {"T2W": 0.5}}), ("plain", {}),
                     ("unet", {"model": "unet", "modalities": ["T1C"]})):
        trainer = Trainer(cfg_for(breast_dataset, root / name, **kw), callbacks=[])
        trainer.fit()
        trainer.save("latest.pt")
        out[name] = root / name
    return out


def run_cli(capsys, args: list[str]) -> tuple[int, str, list[str]]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def robustness(capsys, run: Path, data: Path, out: Path, *extra: str) -> tuple[int, str, list[str]]:
    return run_cli(capsys, ["evaluate", "--checkpoint", str(run / "fold_0" / "latest.pt"), "--data", str(data),
                            "--robustness", "--output", str(out), "--precision", "fp32", *extra])


# ------------------------------------------------------------------------------------------ subsets
def test_subsets_are_every_non_empty_proper_subset_and_none_first():
    assert removal_subsets(["T1C", "T2W"]) == [(), ("T1C",), ("T2W",)]
    three = removal_subsets(["T1C", "T2W", "DWI"])
    assert three == [(), ("T1C",), ("T2W",), ("DWI",), ("T1C", "T2W"), ("T1C", "DWI"), ("T2W", "DWI")]
    assert len(removal_subsets(list("abcd"))) == 2 ** 4 - 1
    assert removal_subsets(["T1C"]) == [()]
    assert [subset_name(s) for s in three[:5]] == ["none", "T1C", "T2W", "DWI", "T1C+T2W"]


def test_remove_option_parses_names_in_channel_order():
    mods = ["T1C", "T2W", "DWI"]
    assert parse_subsets(None, mods) == removal_subsets(mods)
    assert parse_subsets(["dwi+t2w", "none"], mods) == [(), ("T2W", "DWI")]  # table order, channel order
    assert parse_subsets(["T2W,none", "T2W"], mods) == [(), ("T2W",)]
    with pytest.raises(ConfigError, match="'ADC' is not one of the model's modalities"):
        parse_subsets(["ADC"], mods)
    with pytest.raises(ConfigError, match="every modality of the model would be removed"):
        parse_subsets(["T1C+T2W+DWI"], mods)


# ------------------------------------------------------------------------------------------ the table
def test_none_removed_row_equals_predict_then_evaluate(runs, breast_dataset, tmp_path, capsys):
    run = runs["dropout"]
    code, out, err = robustness(capsys, run, breast_dataset, tmp_path / "rob")
    assert code == 0, err
    rows = {r["removed"]: r for r in read_csv(tmp_path / "rob" / "robustness.csv")}
    assert list(rows) == ["none", "T1C", "T2W"]
    assert [rows[k]["trained"] for k in rows] == ["yes", "no", "yes"]  # dropout of T2W only, master kept
    assert rows["T2W"]["present"] == "T1C" and rows["none"]["present"] == "T1C+T2W"
    assert "not trained for removed T1C" in out
    assert not list((tmp_path / "rob").glob(".ms-tmp-*"))  # atomic writes leave nothing behind
    md = (tmp_path / "rob" / "robustness.md").read_text()
    assert "| none | T1C+T2W | yes |" in md and "| T1C | T2W | no |" in md

    # the same validation cases through the commands a user runs: predict (no post-processing), then evaluate
    val = json.loads((run / "splits.json").read_text())[0]["val"]
    images = tmp_path / "val_images"
    images.mkdir()
    for image in sorted((breast_dataset / "imagesTr").glob("*.nii.gz")):
        if image.name.rsplit("_", 1)[0] in val:
            shutil.copy(image, images / image.name)
    assert main(["predict", "--model", str(run / "fold_0"), "--checkpoint", "latest", "--input", str(images),
                 "--output", str(tmp_path / "pred"), "--precision", "fp32", "--postprocess", "none"]) == 0
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--labels", str(breast_dataset / "labelsTr"),
                 "--dataset", str(breast_dataset), "--output", str(tmp_path / "eval")]) == 0
    capsys.readouterr()
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    none = rows["none"]
    assert int(none["n_cases"]) == len(val) == len(summary["metric_per_case"])
    assert float(none["dice_mean"]) == pytest.approx(summary["foreground_mean"]["Dice"], abs=1e-12)
    assert float(none["dice_mass"]) == pytest.approx(summary["mean"]["1"]["Dice"], abs=1e-12)
    per_case = {Path(c["prediction_file"]).name.split(".")[0]: c["metrics"]["1"] for c in summary["metric_per_case"]}
    cases = [r for r in read_csv(tmp_path / "rob" / "robustness_cases.csv") if r["removed"] == "none"]
    assert sorted(r["case_id"] for r in cases) == sorted(per_case)
    for r in cases:
        assert float(r["dice"]) == pytest.approx(per_case[r["case_id"]]["Dice"], abs=1e-12)
        assert float(r["hd95"]) == pytest.approx(per_case[r["case_id"]]["HD95"], abs=1e-9)
    metrics = read_csv(tmp_path / "eval" / "summary.csv")[0]
    hd95 = float(none["hd95_mass"])
    assert (np.isnan(hd95) and metrics["hd95_mean"] in ("nan", "")) or hd95 == pytest.approx(
        float(metrics["hd95_mean"]), abs=1e-9)


def test_removing_a_modality_zeroes_its_channel_and_keeps_the_others(runs, breast_dataset, tmp_path, monkeypatch,
                                                                      capsys):
    import modalseg.training.robustness as robustness_module
    from modalseg.inference.inferers import SliceInferer

    batches: list[np.ndarray] = []

    class Spy(SliceInferer):  # the network's input batches, as the predictor hands them to the inferer
        def __call__(self, backend, batch, branch=None):
            batches.append(batch.copy())
            return super().__call__(backend, batch, branch)

    monkeypatch.setattr(robustness_module, "inferer_for", lambda meta, batch_size: Spy(batch_size))
    code, _, err = robustness(capsys, runs["plain"], breast_dataset, tmp_path / "rob")
    assert code == 0, err
    rows = read_csv(tmp_path / "rob" / "robustness.csv")
    assert [r["trained"] for r in rows] == ["yes", "no", "no"]  # a plain model is evaluated all the same
    cases = len({r["case_id"] for r in read_csv(tmp_path / "rob" / "robustness_cases.csv")})
    assert len(batches) == 3 * cases  # one prediction per case and subset: none, T1C, T2W
    for k in range(cases):
        full, no_t1c, no_t2w = batches[3 * k: 3 * k + 3]
        assert np.abs(full).reshape(len(full), 2, -1).sum(-1).min() > 0  # both channels present
        np.testing.assert_array_equal(no_t1c[:, 0], 0.0)
        np.testing.assert_array_equal(no_t1c[:, 1], full[:, 1])  # T2W preprocessed as with both
        np.testing.assert_array_equal(no_t2w[:, 1], 0.0)
        np.testing.assert_array_equal(no_t2w[:, 0], full[:, 0])
    # predict --missing still refuses this model: the measurement does not weaken the refusal
    case = next((breast_dataset / "imagesTr").glob("*_0000.nii.gz"))
    code, _, err = run_cli(capsys, ["predict", "--model", str(runs["plain"]), "--checkpoint", "latest", "--input",
                                    str(case), "--output", str(tmp_path / "p"), "--missing", "T2W"])
    assert code == 2 and len(err) == 1 and "not trained with modality dropout" in err[0]


def test_remove_restricts_rows_and_a_single_modality_model_has_only_none(runs, breast_dataset, tmp_path, capsys):
    code, _, err = robustness(capsys, runs["dropout"], breast_dataset, tmp_path / "some", "--remove", "T2W")
    assert code == 0, err
    assert [r["removed"] for r in read_csv(tmp_path / "some" / "robustness.csv")] == ["T2W"]
    code, out, err = robustness(capsys, runs["unet"], breast_dataset, tmp_path / "unet")
    assert code == 0, err
    rows = read_csv(tmp_path / "unet" / "robustness.csv")
    assert [(r["removed"], r["present"]) for r in rows] == [("none", "T1C")]
    assert "reads one modality (T1C)" in out


# ------------------------------------------------------------------------------------------ refusals
def test_unpaired_fold_all_and_bad_options_are_refused_in_one_line(runs, breast_dataset, tmp_path, capsys):
    plain = runs["plain"] / "fold_0" / "latest.pt"
    state = load_checkpoint(plain)
    fakes = tmp_path / "run"
    (fakes / "fold_0").mkdir(parents=True)
    shutil.copy(runs["plain"] / "splits.json", fakes / "splits.json")
    unpaired = {k: v for k, v in state.items() if k not in ("format", "version")}
    unpaired["meta"] = {**state["meta"], "kind": "unpaired", "setting": "csa"}
    save_checkpoint(unpaired, fakes / "fold_0" / "unpaired.pt")
    every = {k: v for k, v in state.items() if k not in ("format", "version")}
    every["config"] = {**state["config"], "train_all": True}
    save_checkpoint(every, fakes / "fold_0" / "all.pt")
    out = str(tmp_path / "o")
    cases = [
        (["--checkpoint", str(fakes / "fold_0" / "unpaired.pt"), "--robustness"], "applies to paired models"),
        (["--checkpoint", str(fakes / "fold_0" / "all.pt"), "--robustness"], "no validation cases"),
        (["--checkpoint", str(plain)], "give --checkpoint PATH and --robustness together"),
        (["--robustness"], "give --checkpoint PATH and --robustness together"),
        (["--checkpoint", str(plain), "--robustness", "--pred", out], "give either --pred and --labels"),
        (["--checkpoint", str(plain), "--robustness", "--remove", "DWI"], "'DWI' is not one of the model's"),
        (["--pred", out], "give --pred and --labels"),
    ]
    for extra, match in cases:
        code, _, err = run_cli(capsys, ["evaluate", "--data", str(breast_dataset), "--output", out, *extra])
        assert code == 2 and len(err) == 1 and match in err[0], (extra, err)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ the benchmarks
def test_the_measurement_scripts_run_end_to_end(capsys):
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    import augmentation_effect
    import missing_modality

    out = missing_modality.run(["--quick"])
    assert set(out["results"]) == {"dropout", "plain", "unet"}
    first = out["results"]["dropout"][0]
    assert set(first) == {"none", "T1C", "T2W"} and set(out["results"]["unet"][0]) == {"none"}
    assert first["T2W"]["trained"] == "yes" and out["results"]["plain"][0]["T2W"]["trained"] == "no"
    assert "| (3) U-Net, T1C only | – | – |" in out["table"]
    aug = augmentation_effect.run(["--quick"])
    assert aug["val_patients"] == 2 and set(aug["dice"]) == {"off", "medium"}
    assert aug["difference"] == [aug["dice"]["medium"][0] - aug["dice"]["off"][0]]
    text = capsys.readouterr().out
    assert "command: " in text and "budget: " in text


def test_a_3d_model_is_evaluated_with_its_sliding_windows(tmp_path, capsys):
    """The robustness table predicts with the model's own inferer: a 3D checkpoint through sliding windows (a slice
    inferer fed its slices to a 3D network as if they were channels). The "none" row scores the whole volumes."""
    from modalseg.data.synth import make_breast_dataset_3d

    data = make_breast_dataset_3d(tmp_path / "b3", num_patients=4, size=16, seed=3)
    trainer = Trainer(cfg_for(data, tmp_path / "run3d", dims=3, steps_per_epoch=1, max_steps=1,
                              preprocess_options={"target_size": [16, 16]}))
    trainer.fit()
    code, out, err = robustness(capsys, tmp_path / "run3d", data, tmp_path / "rob3d")
    assert code == 0, err
    rows = read_csv(tmp_path / "rob3d" / "robustness.csv")
    assert [r["removed"] for r in rows] == ["none", "T1C", "T2W"]
    assert all(int(r["n_cases"]) == 2 for r in rows)
