"""The runtime of exported models needs no PyTorch (issue 17, item 3).

``python -m modalseg.deploy.runtime`` runs in a subprocess whose ``sitecustomize`` makes ``torch`` unimportable (a
meta-path finder raising ImportError) and records, at exit, which torch modules were loaded (none may be). It must
reproduce ``modalseg predict`` (torch backend) on a folder: the same output names, labels >= 99.9 % equal,
probabilities within 1e-4 and exactly the same geometry, including cases whose files are not in RAS order and whose
assistant modality lies on another grid (reorientation and resampling are on the torch-free path too).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from test_export import LABEL_AGREEMENT, compare_outputs, paired_run, run_cli  # noqa: E402

BLOCKER = textwrap.dedent('''
    import atexit, os, sys

    class _NoTorch:
        """Any import of torch fails, as in an environment where it is not installed."""

        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"No module named {name!r} (torch is blocked in this test)")
            return None

    sys.meta_path.insert(0, _NoTorch())

    def _report():
        with open(os.environ["MODALSEG_TORCH_REPORT"], "w") as fh:
            fh.write("\\n".join(sorted(m for m in sys.modules if m.split(".")[0] == "torch")) + "\\n")

    atexit.register(_report)
''')


def torch_free_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    site = tmp_path / "no_torch"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    report = tmp_path / "torch_modules.txt"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env["MODALSEG_TORCH_REPORT"] = str(report)
    env["OMP_NUM_THREADS"] = "1"
    return env, report


def run_torch_free(tmp_path: Path, *args: str | Path) -> subprocess.CompletedProcess:
    env, report = torch_free_env(tmp_path)
    proc = subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    assert report.is_file(), f"the blocker did not run:\n{proc.stderr[-3000:]}"
    proc.torch_modules = [m for m in report.read_text().split() if m]  # type: ignore[attr-defined]
    return proc


def _write_like(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine), str(path))


def mixed_geometry_inputs(breast_dataset: Path, folder: Path) -> Path:
    """The breast cases plus one whose T1C is stored flipped (LPS-like voxel order, the same anatomy) and whose T2W
    has half the in-plane resolution (another grid: resampled onto the T1C's)."""
    shutil.copytree(breast_dataset / "imagesTr", folder)
    t1 = nib.load(str(folder / "breast_000_0000.nii.gz"))
    t2 = nib.load(str(folder / "breast_000_0001.nii.gz"))
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = t1.shape[0] - 1, t1.shape[1] - 1
    _write_like(folder / "oblique_0000.nii.gz", np.asarray(t1.dataobj)[::-1, ::-1, :], t1.affine @ flip)
    coarse = t2.affine.copy()
    coarse[:3, :2] *= 2
    _write_like(folder / "oblique_0001.nii.gz", np.asarray(t2.dataobj)[::2, ::2, :], coarse)
    return folder


def test_runtime_modules_import_without_torch(tmp_path):
    code = ("import modalseg.deploy.runtime, modalseg.deploy.loader, modalseg.deploy.onnx_backend, "
            "modalseg.deploy.openvino_backend, modalseg.deploy.card, modalseg.inference, modalseg.training.predict, "
            "modalseg.cli.predict")
    proc = run_torch_free(tmp_path, "-c", code)
    assert proc.returncode == 0, f"a runtime module imports torch:\n{proc.stderr[-3000:]}"
    assert proc.torch_modules == []


def test_runtime_reproduces_modalseg_predict_without_torch(tmp_path, capsys, breast_dataset):
    run = paired_run(tmp_path / "run")  # two folds: the ensemble mean is on the torch-free path too
    export = tmp_path / "export"
    assert run_cli(capsys, ["export", "--model", run, "--output", export])[0] == 0
    inputs = mixed_geometry_inputs(breast_dataset, tmp_path / "inputs")
    code, _, err = run_cli(capsys, ["predict", "--model", run, "--input", inputs, "--output", tmp_path / "torch",
                                    "--precision", "fp32", "--probabilities"])
    assert code == 0, err

    proc = run_torch_free(tmp_path, "-m", "modalseg.deploy.runtime", "--model", export, "--input", inputs,
                          "--output", tmp_path / "runtime", "--probabilities")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.torch_modules == []
    assert "onnxruntime fp32 on cpu" in proc.stdout and "oblique" in proc.stdout
    assert "resampl" in proc.stdout  # the assistant on another grid was put on the T1C's, and said so
    agree, prob = compare_outputs(tmp_path / "torch", tmp_path / "runtime")
    assert agree >= LABEL_AGREEMENT and prob <= 1e-4, (agree, prob)


def test_runtime_refuses_a_checkpoint_in_one_line(tmp_path, capsys, breast_dataset):
    run = paired_run(tmp_path / "run", folds=1)
    proc = run_torch_free(tmp_path, "-m", "modalseg.deploy.runtime", "--model", run, "--input",
                          breast_dataset / "imagesTr", "--output", tmp_path / "out")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not an export folder" in lines[0] and str(run) in lines[0], lines
    assert proc.torch_modules == []
    assert not (tmp_path / "out").exists()


def test_a_25d_model_exports_and_the_torch_free_runtime_reproduces_its_predict(tmp_path, capsys):
    """2.5D (``context_slices``): the graph reads each slice with its neighbours as channels, the card says so, and
    both ONNX Runtime through ``modalseg predict`` and the torch-free runtime give torch's labels and geometry; int8
    calibrates on slices with their neighbours too."""
    import json

    from modalseg.data.synth import make_breast_dataset_3d
    from modalseg.deploy.card import CARD_NAME

    data = make_breast_dataset_3d(tmp_path / "b3", num_patients=4, size=16, seed=3)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, [
        "train", "--data", data, "--output", run, "--model", "master_assistant", "--epochs", "3", "--set",
        "context_slices=1", "--set", "model_options={base_width: 4, sa_reduction: 2, depth: 2}", "--set",
        "preprocess_options={target_size: [16, 16]}", "--set", "folds=2", "--set", "precision=fp32", "--set",
        "progress=false", "--set", "tensorboard=false", "--set", "num_threads=1", "--set", "lr=0.01"])
    assert code == 0, err
    export, int8 = tmp_path / "export", tmp_path / "int8"
    common = ["--model", run, "--checkpoint", "latest"]
    assert run_cli(capsys, ["export", *common, "--output", export])[0] == 0
    code, _, err = run_cli(capsys, ["export", *common, "--output", int8, "--int8", "--calibration-data", data,
                                    "--calibration-slices", "16"])
    assert code == 0, err
    card = json.loads((export / CARD_NAME).read_text())
    assert card["input"]["context_slices"] == 1 and card["input"]["shape"][1] == 6
    assert card["input"]["channels"][:3] == ["T1C slice d-1", "T1C slice d", "T1C slice d+1"]
    assert any("2.5D" in step for step in card["preprocessing"]["steps"])

    images = data / "imagesTr"
    code, _, err = run_cli(capsys, ["predict", *common, "--input", images, "--output", tmp_path / "torch",
                                    "--precision", "fp32", "--probabilities"])
    assert code == 0, err
    assert run_cli(capsys, ["predict", "--model", export, "--input", images, "--output", tmp_path / "ort",
                            "--probabilities"])[0] == 0
    proc = run_torch_free(tmp_path, "-m", "modalseg.deploy.runtime", "--model", export, "--input", images,
                          "--output", tmp_path / "runtime", "--probabilities")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.torch_modules == []
    for out in ("ort", "runtime"):
        agree, prob = compare_outputs(tmp_path / "torch", tmp_path / out)
        assert agree >= LABEL_AGREEMENT and prob <= 1e-4, (out, agree, prob)
    assert run_cli(capsys, ["predict", "--model", int8, "--input", images, "--output", tmp_path / "p8"])[0] == 0
    graph = json.loads((int8 / CARD_NAME).read_text())["folds"][0]["graphs"][0]
    assert graph["int8"]["calibration_slices"] > 0  # the recorded inputs had the graph's 6 channels, or ORT fails
