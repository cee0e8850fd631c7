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
