"""Shared fixtures: tiny synthetic datasets generated once per test session (no download)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Tests are sized for 2 cores; keep torch from oversubscribing when pytest-xdist runs 2 workers.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# `precision: auto` caches its measured choice; tests must not write to the user's ~/.cache (one folder per worker).
os.environ["MODALSEG_CACHE_DIR"] = tempfile.mkdtemp(prefix="modalseg-test-cache-")


@pytest.fixture(scope="session")
def breast_dataset(tmp_path_factory):
    from modalseg.data.synth import make_breast_dataset

    root = tmp_path_factory.mktemp("synth") / "breast"
    make_breast_dataset(root, num_patients=5, slices=3, size=32, seed=1)
    return root


@pytest.fixture(scope="session")
def cardiac_dataset(tmp_path_factory):
    from modalseg.data.synth import make_cardiac_dataset

    root = tmp_path_factory.mktemp("synth") / "cardiac"
    make_cardiac_dataset(root, num_patients_per_modality=5, slices=3, size=32, seed=2)
    return root


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """(dataset, run folder) of a real 2-step ``modalseg train`` run (latest.pt at step 2), shared by the
    reliability and trust tests (tiny dataset and options of tests/test_reliability.py)."""
    from modalseg.cli.main import main
    from test_reliability import make_dataset, train_args

    root = tmp_path_factory.mktemp("trained")
    data = make_dataset(root / "ds")
    assert main(train_args(data, root / "run", "--set", "max_steps=2")) == 0
    return data, root / "run"
