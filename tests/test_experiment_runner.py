"""The experiment runner shared by paper 1 and paper 2: grid, key-based record reuse, shared split, resume."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modalseg.errors import ConfigError
from modalseg.experiments.runner import (
    Experiment,
    Job,
    Outcome,
    Runner,
    add_checkpoint_argument,
    checkpoint_name,
    differences,
    grid,
)


# ------------------------------------------------------------------------------------------------ small parts
def test_grid_is_the_product_with_the_first_axis_outermost() -> None:
    keys = grid(("run", [0, 1]), ("fold", [3]), ("model", ["a", "b"]))
    assert keys == [{"run": 0, "fold": 3, "model": "a"}, {"run": 0, "fold": 3, "model": "b"},
                    {"run": 1, "fold": 3, "model": "a"}, {"run": 1, "fold": 3, "model": "b"}]
    assert grid(("run", []), ("fold", [0])) == []
    with pytest.raises(ValueError, match="repeat"):
        grid(("run", [0]), ("run", [1]))


def test_one_checkpoint_vocabulary_with_the_old_spelling_deprecated(capsys: pytest.CaptureFixture) -> None:
    lines: list[str] = []
    assert checkpoint_name("best", warn=lines.append) == "best" and lines == []
    assert checkpoint_name("latest", warn=lines.append) == "latest" and lines == []
    assert checkpoint_name("last", warn=lines.append) == "latest"
    assert len(lines) == 1 and "deprecated" in lines[0] and "--checkpoint latest" in lines[0]
    with pytest.raises(argparse.ArgumentTypeError, match="latest, best"):
        checkpoint_name("final")
    parser = argparse.ArgumentParser()
    add_checkpoint_argument(parser, help="weights")
    assert parser.parse_args([]).checkpoint == "latest"
    assert capsys.readouterr().err == ""  # the default is no deprecated spelling
    assert parser.parse_args(["--checkpoint", "last"]).checkpoint == "latest"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "deprecated" in err  # one line
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkpoint", "bogus"])


def test_differences_walk_nested_options() -> None:
    stored = {"budget": {"epochs": 1, "lr": 0.1, "old": True}, "seed": 0}
    expected = {"budget": {"epochs": 2, "lr": 0.1, "new": 3}, "seed": 0}
    assert differences(stored, expected) == [
        "budget.epochs 1 there, 2 now", "budget.new missing there, 3 now", "budget.old True there, not set now"]
    assert differences(expected, expected) == []
    long = differences({"v": list(range(100))}, {"v": []})[0]
    assert long.startswith("v [0, 1, 2") and long.endswith("there, [] now") and len(long) < 100


# ------------------------------------------------------------------------------------------------ record reuse
class Listing(Experiment):
    """An experiment whose jobs live under ``root``; what it says is kept in ``lines``."""

    name = "test"

    def __init__(self, root: Path, epochs: int = 1) -> None:
        self.root, self.epochs, self.lines = root, epochs, []

    def job(self, key: dict[str, Any]) -> Job:
        record = self.root / "records" / f"{key['model']}_run{key['run']}.json"
        return Job(key=dict(key), options={"budget": {"epochs": self.epochs}}, record=record,
                   run_root=self.root / "runs" / key["model"] / f"run_{key['run']}", fold=0,
                   companions=(record.with_suffix(".npz"),))

    def say(self, line: str) -> None:
        self.lines.append(line)


class CountingRunner(Runner):
    """A runner whose training is a stub: records what it would have trained."""

    def train(self, job: Job) -> Outcome:
        self.trained = [*getattr(self, "trained", []), dict(job.key)]
        return Outcome(job, {**job.key, **job.options, "value": 1.0}, "trained")


def _store(job: Job, record: dict, companion: bool = True) -> None:
    job.record.parent.mkdir(parents=True, exist_ok=True)
    job.record.write_text(json.dumps(record))
    if companion:
        np.savez(job.companions[0], x=np.zeros(1))


def test_finished_records_are_reused_by_key_and_options(tmp_path: Path) -> None:
    exp = Listing(tmp_path)
    keys = grid(("run", [0]), ("model", ["a", "b"]))
    runner = CountingRunner(exp, tmp_path / "splits.json", [])
    a = runner.jobs(keys)[0]
    _store(a, {"model": "a", "run": 0, "budget": {"epochs": 1}, "value": 0.5, "extra": "kept"})
    outcomes = runner.run(keys)
    assert [o.how for o in outcomes] == ["reused", "trained"]
    assert outcomes[0].record["value"] == 0.5 and runner.trained == [{"run": 0, "model": "b"}]
    assert exp.lines[0] == f"[1/2] run 0 model a: reusing {a.record}"
    assert exp.lines[1].startswith("[2/2] run 0 model b: trained in")
    # --overwrite: nothing is reused
    again = CountingRunner(exp, tmp_path / "splits.json", [], overwrite=True)
    assert [o.how for o in again.run(keys)] == ["trained", "trained"]


def test_a_record_of_other_options_or_another_key_is_refused(tmp_path: Path) -> None:
    job = CountingRunner(Listing(tmp_path), tmp_path / "s.json", []).jobs([{"model": "a", "run": 0}])[0]
    _store(job, {"model": "a", "run": 0, "budget": {"epochs": 1}})
    changed = CountingRunner(Listing(tmp_path, epochs=2), tmp_path / "s.json", [])
    with pytest.raises(ConfigError, match=r"another budget \(budget.epochs 1 there, 2 now\)") as info:
        changed.run([{"model": "a", "run": 0}])
    assert str(job.record) in str(info.value) and "--overwrite" in str(info.value)
    assert not hasattr(changed, "trained")  # refused before anything was trained
    _store(job, {"model": "b", "run": 0, "budget": {"epochs": 1}})  # e.g. a file copied to the wrong name
    with pytest.raises(ConfigError, match="not the record of model a run 0 .*model 'b' there, 'a' now"):
        CountingRunner(Listing(tmp_path), tmp_path / "s.json", []).load_record(job)
    _store(job, {"model": "a", "run": 0})  # no options at all: another experiment's or an older format
    with pytest.raises(ConfigError, match="budget missing there"):
        CountingRunner(Listing(tmp_path), tmp_path / "s.json", []).load_record(job)


@pytest.mark.parametrize("damage", ["truncated", "not_an_object", "no_companion"])
def test_an_unreadable_or_partial_record_is_recomputed_with_one_line(tmp_path: Path, damage: str) -> None:
    exp = Listing(tmp_path)
    runner = CountingRunner(exp, tmp_path / "s.json", [])
    job = runner.jobs([{"model": "a", "run": 0}])[0]
    good = {"model": "a", "run": 0, "budget": {"epochs": 1}}
    _store(job, good, companion=damage != "no_companion")
    if damage == "truncated":
        job.record.write_text(json.dumps(good)[:-5])
    elif damage == "not_an_object":
        job.record.write_text("[1, 2]")
    assert runner.load_record(job) is None
    assert len(exp.lines) == 1 and str(job.record) in exp.lines[0] and "recomputing" in exp.lines[0]
    assert ("partial record (a_run0.npz is missing)" in exp.lines[0]) == (damage == "no_companion")
    assert ("unreadable record" in exp.lines[0]) == (damage != "no_companion")
    assert [o.how for o in runner.run([{"model": "a", "run": 0}])] == ["trained"]


def test_upgrade_and_check_hooks(tmp_path: Path) -> None:
    class Old(Listing):
        def upgrade(self, record: dict) -> dict:
            if "epochs" in record:  # an older layout of the same options
                record = {**record, "budget": {"epochs": record.pop("epochs")}}
            return record

        def check_record(self, job: Job, record: dict) -> None:
            if record.get("value") is None:
                raise ConfigError("has no value; pass --overwrite", job.record)

    exp = Old(tmp_path)
    runner = CountingRunner(exp, tmp_path / "s.json", [])
    job = runner.jobs([{"model": "a", "run": 0}])[0]
    _store(job, {"model": "a", "run": 0, "epochs": 1, "value": 2.0})
    assert runner.load_record(job)["budget"] == {"epochs": 1}
    _store(job, {"model": "a", "run": 0, "epochs": 1})
    with pytest.raises(ConfigError, match="has no value"):
        runner.load_record(job)


def test_fold_folders_resume_or_restart_and_the_split_is_installed(tmp_path: Path) -> None:
    exp = Listing(tmp_path)
    (tmp_path / "splits.json").write_text('[{"train": ["p1"], "val": ["p2"]}]')
    runner = Runner(exp, tmp_path / "splits.json", [{"train": ["p1"], "val": ["p2"]}])
    job = runner.jobs([{"model": "a", "run": 0}])[0]
    assert runner.prepare_fold(job) is False  # nothing there
    job.fold_dir.mkdir(parents=True)
    (job.fold_dir / "config.yaml").write_text("x: 1")  # killed before the first checkpoint
    assert runner.prepare_fold(job) is False and not job.fold_dir.exists()
    assert len(exp.lines) == 1 and str(job.fold_dir) in exp.lines[0] and "without latest.pt" in exp.lines[0]
    job.fold_dir.mkdir(parents=True)
    (job.fold_dir / "latest.pt").write_bytes(b"")
    assert runner.prepare_fold(job) is True and (job.fold_dir / "latest.pt").exists()
    assert Runner(exp, tmp_path / "splits.json", [], overwrite=True).prepare_fold(job) is False
    assert not job.fold_dir.exists()
    runner.install_split(job.run_root)
    assert (job.run_root / "splits.json").read_text() == (tmp_path / "splits.json").read_text()
    (job.run_root / "splits.json").write_text("[]")  # a stale copy is replaced
    runner.install_split(job.run_root)
    assert (job.run_root / "splits.json").read_text() == (tmp_path / "splits.json").read_text()


# ------------------------------------------------------------------------------------------------ real trainings
class Tiny(Experiment):
    """A two-epoch U-Net (base width 2) on the tiny breast data; the record holds per-slice foreground Dice."""

    name = "tiny"

    def __init__(self, data: Path, out: Path, epochs: int = 2) -> None:
        self.data, self.out, self.epochs = data, out, epochs

    def job(self, key: dict[str, Any]) -> Job:
        record = self.out / "records" / f"run{key['run']}.json"
        return Job(key=dict(key), options={"epochs": self.epochs}, record=record,
                   run_root=self.out / "runs" / f"run_{key['run']}", fold=0)

    def train_config(self, job: Job) -> Any:
        from modalseg.training.config import TrainConfig

        return TrainConfig.from_dict({
            "data": str(self.data), "output": str(job.run_root), "model": "unet", "model_options": {"base_width": 2},
            "preprocess": "paper1", "preprocess_options": {"target_size": [32, 32]}, "epochs": self.epochs,
            "batch_size": 2, "lr": 1e-3, "precision": "fp32", "folds": 5, "fold": 0, "seed": 7, "split_seed": 0,
            "progress": False, "tensorboard": False, "cache_dir": str(self.out.parent / "cache"),
        }, source="test")

    def evaluate(self, job: Job, trainer: Any, summary: dict, train_seconds: float, weights: Path) -> dict:
        val = trainer.predict_split("val")["all"]
        p, g = val.pred > 0, val.target > 0
        inter = (p & g).reshape(len(p), -1).sum(1)
        denom = p.reshape(len(p), -1).sum(1) + g.reshape(len(g), -1).sum(1)
        dice = np.where(denom == 0, 1.0, 2 * inter / np.maximum(denom, 1))
        return {**job.key, **job.options, "epochs_trained": summary["epochs"], "dice": dice.tolist(),
                "patients": sorted(set(val.patients)), "weights": str(weights)}


def _shared_split(data: Path, out: Path) -> list[dict]:
    from modalseg.data.layouts import load_dataset
    from modalseg.training.splits import make_splits

    splits = make_splits(sorted({c.patient_id for c in load_dataset(str(data)).cases}), 5, 0)
    out.mkdir(parents=True, exist_ok=True)
    (out / "splits.json").write_text(json.dumps(splits, indent=2))
    return splits


def test_an_interrupted_training_resumes_to_the_uninterrupted_result(breast_dataset, tmp_path, monkeypatch):
    import torch

    from modalseg.training.engine import Trainer

    straight = Tiny(breast_dataset, tmp_path / "straight")
    splits = _shared_split(breast_dataset, straight.out)
    (ref,) = Runner(straight, straight.out / "splits.json", splits).run([{"run": 0}])
    assert ref.how == "trained" and ref.record["epochs_trained"] == 2
    assert ref.record["patients"] == splits[0]["val"]  # the shared split was used
    assert json.loads((straight.out / "runs" / "run_0" / "splits.json").read_text()) == splits

    # the same job killed after its first epoch: latest.pt of epoch 1, no record
    killed = Tiny(breast_dataset, tmp_path / "killed")
    _shared_split(breast_dataset, killed.out)
    runner = Runner(killed, killed.out / "splits.json", splits)
    job = runner.jobs([{"run": 0}])[0]
    runner.install_split(job.run_root)
    Trainer(Tiny(breast_dataset, killed.out, epochs=1).train_config(job)).fit()
    assert not job.record.exists() and (job.fold_dir / "latest.pt").exists()
    (resumed,) = runner.run([{"run": 0}])
    assert resumed.how == "resumed" and resumed.record["epochs_trained"] == 2
    assert resumed.record["dice"] == ref.record["dice"]
    a = torch.load(straight.out / "runs" / "run_0" / "fold_0" / "latest.pt", weights_only=True)["model_state"]
    b = torch.load(job.fold_dir / "latest.pt", weights_only=True)["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # exact resume: the same weights
    assert Path(resumed.record["weights"]) == job.fold_dir / "latest.pt"

    # a third call reuses the record without training; other options are refused
    monkeypatch.setattr(Trainer, "fit", lambda self: (_ for _ in ()).throw(AssertionError("must not train")))
    (again,) = Runner(killed, killed.out / "splits.json", splits).run([{"run": 0}])
    assert again.reused and again.record == resumed.record
    with pytest.raises(ConfigError, match="epochs 2 there, 3 now"):
        Runner(Tiny(breast_dataset, killed.out, epochs=3), killed.out / "splits.json", splits).run([{"run": 0}])


def test_best_weights_fall_back_to_latest_with_one_line(breast_dataset, tmp_path, monkeypatch):
    from modalseg.training.engine import Trainer

    lines: list[str] = []
    exp = Tiny(breast_dataset, tmp_path / "best", epochs=1)
    exp.checkpoint = "best"
    exp.say = lines.append  # type: ignore[method-assign]
    monkeypatch.setattr(Trainer, "save", lambda self, name, real=Trainer.save: None if name == "best.pt"
                        else real(self, name))
    splits = _shared_split(breast_dataset, exp.out)
    (outcome,) = Runner(exp, exp.out / "splits.json", splits).run([{"run": 0}])
    assert Path(outcome.record["weights"]).name == "latest.pt"
    assert sum("no best.pt" in line and "evaluating latest.pt" in line for line in lines) == 1
