"""One experiment runner under both paper reproductions: a grid of runs, key-based record reuse, one patient
split shared by every run, resume of interrupted trainings and one checkpoint vocabulary.

A paper module describes its grid and what one run computes by subclassing :class:`Experiment`; the
:class:`Runner` does the rest, the same way for both papers:

* **grid** (:func:`grid`): every combination of the axes, e.g. ``run x fold x model``; each cell's *key*
  (``{"model": "unet", "run": 0, "fold": 2}``) names its record, its run folder and its console lines.
* **record reuse by key** (:meth:`Runner.load_record`): a job's record is reused when it exists, is complete
  (readable JSON, companion files present) and holds the job's key and options (the budget, seed and validation
  patients it was made with) with equal values. A record of other options is refused in one line naming the
  file and the first differences (``--overwrite`` retrains); an unreadable or partial record is recomputed, with
  one line naming the file. Nothing is ever silently mixed in.
* **shared split**: ``DIR/splits.json`` (made by the paper module before the grid) is copied into every run
  folder before its training, and the trainer's fold is checked against it.
* **resume**: a fold folder with ``latest.pt`` and no record is an interrupted (or finished, unrecorded)
  training and is resumed; the trainer refuses a resume whose options changed. A fold folder without
  ``latest.pt`` is an interrupted start and is cleared. ``--overwrite`` clears the fold folder.
* **weights**: ``latest`` (the final epoch's ``latest.pt``) or ``best`` (``best.pt``, falling back to
  ``latest.pt`` where no validation epoch was eligible), the same words as ``modalseg predict --checkpoint``.
  ``last`` (paper 2's former spelling) is accepted with a deprecation line.

See docs/experiments.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modalseg.errors import ConfigError

if TYPE_CHECKING:
    from modalseg.training.config import TrainConfig
    from modalseg.training.engine import Trainer

#: Weights an experiment evaluates: the final epoch's ``latest.pt`` or the best validation epoch's ``best.pt``.
CHECKPOINTS: tuple[str, ...] = ("latest", "best")
#: Former spellings still accepted on the command line (with a deprecation line) and in stored records.
DEPRECATED_CHECKPOINTS: dict[str, str] = {"last": "latest"}


# ---------------------------------------------------------------------------------------------- checkpoint words
def checkpoint_name(value: str, *, warn: Callable[[str], None] | None = None) -> str:
    """``latest`` or ``best``; ``last`` (deprecated) becomes ``latest``, telling ``warn`` once. Why: both papers
    and ``modalseg predict`` name the same two files the same way."""
    text = str(value).strip().lower()
    if text in DEPRECATED_CHECKPOINTS:
        new = DEPRECATED_CHECKPOINTS[text]
        if warn is not None:
            warn(f"warning: --checkpoint {text} is deprecated; use --checkpoint {new} (the same final weights)")
        return new
    if text not in CHECKPOINTS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(CHECKPOINTS)}, got {value!r}")
    return text


def checkpoint_arg(text: str) -> str:
    """argparse ``type=`` of ``--checkpoint``: :func:`checkpoint_name` with the deprecation line on stderr."""
    return checkpoint_name(text, warn=lambda line: print(line, file=sys.stderr, flush=True))


def add_checkpoint_argument(p: argparse.ArgumentParser, help: str) -> None:  # noqa: A002 (argparse's word)
    """``--checkpoint {latest,best}`` (default latest), the same option in both experiments."""
    p.add_argument("--checkpoint", type=checkpoint_arg, default="latest", metavar="{latest,best}", help=help)


# ---------------------------------------------------------------------------------------------- grid and jobs
def grid(*axes: tuple[str, Iterable[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes as keys, the first axis outermost: ``grid(("run", [0, 1]), ("fold", [0]))``
    -> ``[{"run": 0, "fold": 0}, {"run": 1, "fold": 0}]``."""
    names = [name for name, _ in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"grid: axis names repeat: {names}")
    values = [list(v) for _, v in axes]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]


@dataclass(frozen=True)
class Job:
    """One cell of the grid: what identifies it, what its result depends on, and where it lives.

    ``key`` and ``options`` are record fields: a stored record is reused only if it holds every one of them with
    an equal value (``options`` may nest, e.g. ``{"budget": {...}}``). ``companions`` are files written with the
    record (predictions for the figures): without them the record is partial and recomputed.
    """

    key: Mapping[str, Any]
    options: Mapping[str, Any]
    record: Path
    run_root: Path
    fold: int
    companions: tuple[Path, ...] = ()
    label: str = ""

    @property
    def fold_dir(self) -> Path:
        """The training's folder (``TrainConfig.output/fold_<k>``)."""
        return self.run_root / f"fold_{self.fold}"


@dataclass
class Outcome:
    """A finished job: its record and how it was obtained (``reused``, ``trained`` or ``resumed``)."""

    job: Job
    record: dict[str, Any]
    how: str
    seconds: float = 0.0

    @property
    def reused(self) -> bool:
        """Whether the record was read back rather than computed in this call (tables count both)."""
        return self.how == "reused"


class Experiment:
    """What a paper reproduction supplies to the :class:`Runner`; override the methods marked so."""

    #: prefix of every console line, e.g. ``paper1``
    name: str = "experiment"
    #: weights to evaluate: ``latest`` or ``best``
    checkpoint: str = "latest"

    def job(self, key: Mapping[str, Any]) -> Job:
        """The :class:`Job` of one grid key (record path, run folder, options). Override."""
        raise NotImplementedError

    def describe(self, key: Mapping[str, Any]) -> str:
        """How console lines name a job, e.g. ``unet run 0 fold 2``."""
        return " ".join(f"{k} {v}" for k, v in key.items())

    def train_config(self, job: Job) -> TrainConfig:
        """The training configuration of ``job`` (``output`` must be ``job.run_root``). Override."""
        raise NotImplementedError

    def evaluate(self, job: Job, trainer: Trainer, summary: dict[str, Any], train_seconds: float,
                 weights: Path) -> dict[str, Any]:
        """Evaluate the trained (and weight-loaded) ``trainer``, write the companion files and return the record,
        which must hold ``job.key`` and ``job.options``. Override."""
        raise NotImplementedError

    def upgrade(self, record: dict[str, Any]) -> dict[str, Any]:
        """A stored record in today's vocabulary (e.g. ``"last"`` -> ``"latest"``), before it is compared."""
        return record

    def check_record(self, job: Job, record: dict[str, Any]) -> None:
        """Refuse (raise :class:`ConfigError`) a matching record that this call still cannot use."""

    def training_note(self, job: Job) -> str:
        """Extra words on the ``training``/``resuming`` line (e.g. the seed)."""
        return ""

    def summary(self, outcome: Outcome) -> str:
        """The end of the one line printed after each job (e.g. its mean Dice)."""
        return ""

    def say(self, line: str) -> None:
        print(f"{self.name}: {line}", flush=True)


# ---------------------------------------------------------------------------------------------- record matching
def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def differences(stored: Any, expected: Any, prefix: str = "") -> list[str]:
    """Where ``stored`` differs from ``expected``, nested dicts walked: ``["budget.epochs 1 there, 2 now"]``."""
    if isinstance(stored, Mapping) and isinstance(expected, Mapping):
        out: list[str] = []
        for key in sorted(set(stored) | set(expected), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored:
                out.append(f"{where} missing there, {_short(expected[key])} now")
            elif key not in expected:
                out.append(f"{where} {_short(stored[key])} there, not set now")
            else:
                out += differences(stored[key], expected[key], where)
        return out
    if stored == expected:
        return []
    return [f"{prefix} {_short(stored)} there, {_short(expected)} now"]


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_record(path: Path, record: Mapping[str, Any]) -> None:
    """The record, atomically and last: its presence marks the job as done."""
    from modalseg.utils.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(record, indent=1, default=_json_default))


# ---------------------------------------------------------------------------------------------- the runner
@dataclass
class Runner:
    """Runs an :class:`Experiment`'s grid: reuses finished records, trains or resumes the others.

    ``splits_path`` is the shared ``DIR/splits.json`` (already made), ``splits`` its folds.
    """

    experiment: Experiment
    splits_path: Path
    splits: Sequence[Mapping[str, Sequence[str]]]
    overwrite: bool = False
    outcomes: list[Outcome] = field(default_factory=list)

    def jobs(self, keys: Sequence[Mapping[str, Any]]) -> list[Job]:
        """The jobs of ``keys``, labelled ``[n/N] <describe(key)>``."""
        return [dataclasses.replace(self.experiment.job(key), label=f"[{n}/{len(keys)}] "
                                    f"{self.experiment.describe(key)}") for n, key in enumerate(keys, 1)]

    def run(self, keys: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        """Every job of ``keys`` in order, one console line each; returns their outcomes (also appended to
        ``self.outcomes``)."""
        done: list[Outcome] = []
        for job in self.jobs(keys):
            record = None if self.overwrite else self.load_record(job)
            outcome = Outcome(job, record, "reused") if record is not None else self.train(job)
            how = {"reused": f"reusing {job.record}", "trained": f"trained in {outcome.seconds:.1f} s",
                   "resumed": f"resumed and finished in {outcome.seconds:.1f} s"}[outcome.how]
            extra = self.experiment.summary(outcome)
            self.experiment.say(f"{job.label}: {how}{'; ' + extra if extra else ''}")
            done.append(outcome)
            self.outcomes.append(outcome)
        return done

    # ------------------------------------------------------------------ records
    def load_record(self, job: Job) -> dict[str, Any] | None:
        """``job``'s stored record if it can be reused; ``None`` if absent, unreadable or partial (said in one
        line naming the file); :class:`ConfigError` if it was made for another key or with other options."""
        path = job.record
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            self.experiment.say(f"{path}: unreadable record ({str(exc).splitlines()[0][:120]}); recomputing it")
            return None
        if not isinstance(record, dict):
            self.experiment.say(f"{path}: unreadable record (not a JSON object); recomputing it")
            return None
        record = self.experiment.upgrade(record)
        key_diff = differences({k: record.get(k) for k in job.key}, dict(job.key))
        if key_diff:
            raise ConfigError(f"is not the record of {self.experiment.describe(job.key)} ({'; '.join(key_diff[:3])})"
                              "; delete it or pass --overwrite", path)
        diff = differences({k: record[k] for k in job.options if k in record}, dict(job.options))
        diff += [f"{k} missing there" for k in job.options if k not in record]
        if diff:
            raise ConfigError(f"record was made with another budget ({'; '.join(diff[:3])}); pass --overwrite to "
                              "retrain or use another --output", path)
        missing = [c for c in job.companions if not c.is_file()]
        if missing:
            self.experiment.say(f"{path}: partial record ({missing[0].name} is missing); recomputing it")
            return None
        self.experiment.check_record(job, record)
        return record

    # ------------------------------------------------------------------ one training
    def install_split(self, run_root: Path) -> None:
        """``run_root/splits.json`` = the shared split, so the trainer uses it (and every run the same)."""
        from modalseg.utils.atomic import atomic_write_text

        text = self.splits_path.read_text(encoding="utf-8")
        own = run_root / "splits.json"
        if not own.exists() or own.read_text(encoding="utf-8") != text:
            atomic_write_text(own, text)

    def prepare_fold(self, job: Job) -> bool:
        """Clear what cannot be continued; returns whether to resume (``latest.pt`` of an earlier training)."""
        fold_dir = job.fold_dir
        if not fold_dir.exists():
            return False
        if self.overwrite:
            shutil.rmtree(fold_dir)
            return False
        if (fold_dir / "latest.pt").exists():
            return True
        self.experiment.say(f"{fold_dir}: an interrupted start without latest.pt; starting it again")
        shutil.rmtree(fold_dir)
        return False

    def train(self, job: Job) -> Outcome:
        """Train (or resume) ``job``, load the weights it evaluates, evaluate it and write its record."""
        from modalseg.training.engine import Trainer

        resume = self.prepare_fold(job)
        self.install_split(job.run_root)
        cfg = self.experiment.train_config(job)
        if Path(cfg.output) != job.run_root or int(cfg.fold) != job.fold:
            raise RuntimeError(f"{self.experiment.name}: train_config of {job.label} trains into {cfg.output} fold "
                               f"{cfg.fold}, not {job.run_root} fold {job.fold}")
        note = self.experiment.training_note(job)
        self.experiment.say(f"{job.label}: {'resuming' if resume else 'training'}{' ' + note if note else ''} -> "
                            f"{job.fold_dir}")
        t0 = time.perf_counter()
        trainer = Trainer(cfg, resume=resume)
        expected = self.splits[job.fold]
        if {k: list(trainer.split[k]) for k in ("train", "val")} != {k: list(expected[k]) for k in ("train", "val")}:
            raise RuntimeError(f"{job.run_root / 'splits.json'} differs from {self.splits_path}: the split must be "
                               "shared")
        summary = trainer.fit()
        train_s = time.perf_counter() - t0
        weights = load_weights(trainer, self.experiment.checkpoint, say=self.experiment.say)
        record = self.experiment.evaluate(job, trainer, summary, train_s, weights)
        del trainer
        problems = differences({k: record.get(k) for k in [*job.key, *job.options]}, {**job.key, **job.options})
        if problems:  # it would be refused by the next call: a bug of the experiment module
            raise RuntimeError(f"{self.experiment.name}: the record of {job.label} does not hold its key and "
                               f"options ({'; '.join(problems[:3])})")
        write_record(job.record, record)
        return Outcome(job, record, "resumed" if resume else "trained", train_s)


def load_weights(trainer: Trainer, checkpoint: str, *, say: Callable[[str], None] = print) -> Path:
    """Load ``checkpoint`` (``latest``/``best``) of the trainer's fold into its network; returns the file loaded.

    ``best.pt`` is never written from a degenerate or non-finite validation, so where it is missing the final
    weights (``latest.pt``) are evaluated, said in one line; callers record the path they got.
    """
    from modalseg.training.checkpoint import read_checkpoint

    name = checkpoint_name(checkpoint)
    path = trainer.run_dir / f"{name}.pt"
    if not path.exists() and name == "best":
        say(f"no best.pt in {trainer.run_dir} (no eligible validation epoch: degenerate or non-finite); "
            "evaluating latest.pt")
        path = trainer.run_dir / "latest.pt"
    read_checkpoint(path).load_weights(trainer.network)  # the one checkpoint reader (non-finite weights refused)
    return path


__all__ = ["CHECKPOINTS", "DEPRECATED_CHECKPOINTS", "Experiment", "Job", "Outcome", "Runner",
           "add_checkpoint_argument", "checkpoint_arg", "checkpoint_name", "differences", "grid", "load_weights",
           "write_record"]
