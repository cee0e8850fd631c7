"""Exceptions that the CLI turns into one clear line and a non-zero exit.

Every problem a user can cause (bad file, bad config, incompatible checkpoint) raises a subclass of
:class:`ModalsegError` whose message names the file and the problem, e.g.
``"data/imagesTr/case_001_0001.nii.gz: shape (256, 256, 40) differs from modality 0 (256, 256, 42)"``.
Programming errors stay ordinary exceptions (and keep their tracebacks).
"""

from __future__ import annotations

from pathlib import Path


class ModalsegError(Exception):
    """Base class of user-facing errors. ``str(err)`` is the one line shown to the user."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)


class DataError(ModalsegError):
    """A dataset, image or label file is missing, unreadable or inconsistent."""


class ConfigError(ModalsegError):
    """A configuration file or command-line option is invalid."""


class CheckpointError(ModalsegError):
    """A checkpoint is unreadable, unsafe or does not match the model it is loaded into."""


class OutputError(ModalsegError):
    """An output location cannot be written (permissions, disk full)."""


class TrainingError(ModalsegError):
    """Training cannot go on (e.g. the loss became NaN/inf); the last checkpoint is kept."""


class EvaluationError(ModalsegError):
    """Inputs to an evaluation (metrics, statistics, tables, figures) are inconsistent or unusable.

    Lives here, not in ``evaluation.metrics``, so that ``evaluation.stats`` and ``evaluation.tables`` can raise it
    without importing the metrics module (and with it MONAI and torch).
    """
