"""Trust (issue 11): names are never paths, outputs never replace inputs or other runs, diverged or damaged models
are never saved or used, temporaries of killed writers are cleaned, permissions follow the umask, prediction memory
is bounded by pixels, and any slice size can be predicted.

Every test drives the real CLI or the real writer and fails on the code before these fixes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from modalseg.training.checkpoint import load_checkpoint, save_checkpoint
from modalseg.training.inference import predict_probabilities
from modalseg.training.precision import resolve_precision
from modalseg.utils import atomic as matomic
from test_reliability import (
    _img,
    _predict,
    assert_no_temp_files,
    assert_refused,
    files_under,
    make_dataset,
    run_cli,
    tiny_checkpoint,
    train_args,
)


def _edit_checkpoint(src: Path, dst: Path, edit) -> Path:
    state = load_checkpoint(src)
    edit(state)
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, dst)
    return dst


def _edit_json(ds: Path, **changes) -> None:
    meta = json.loads((ds / "dataset.json").read_text())
    meta.update(changes)
    (ds / "dataset.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("trust") / "fuse.pt")


@pytest.fixture
def scans(tmp_path) -> list[Path]:
    return [_img(tmp_path / "scans" / "t1c.nii.gz", seed=1), _img(tmp_path / "scans" / "t2w.nii.gz", seed=2)]


# ------------------------------------------------------------------------------------------------ 1-2 names
def test_class_name_from_checkpoint_cannot_write_outside_output(ckpt, scans, tmp_path, capsys):
    victim = _img(tmp_path / "other" / "labelsTr" / "case001.nii.gz", seed=3)
    before = victim.read_bytes()
    hostile = "x/../../other/labelsTr/case001"

    def rename(state):
        state["meta"]["labels"] = {"background": 0, hostile: 1}

    bad = _edit_checkpoint(ckpt, tmp_path / "hostile.pt", rename)
    out = tmp_path / "out"
    code, _, err = _predict(capsys, bad, scans, out, "--probabilities")
    assert_refused(code, err, bad, "class name", "'..'")
    assert victim.read_bytes() == before
    assert files_under(out) == []


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/abs_cache_name", "a\\b", "ok\x00no", "tab\there"])
def test_dataset_name_is_not_a_path(name, tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds")
    _edit_json(ds, name=name)
    out = tmp_path / "runs" / "r"
    code, _, err = run_cli(capsys, train_args(ds, out))
    assert_refused(code, err, ds / "dataset.json", "dataset name")
    assert not out.exists()
    assert not (tmp_path / "escaped").exists()
    assert files_under(tmp_path / "runs") == []
    code, _, err = run_cli(capsys, ["verify", str(ds)])
    assert_refused(code, err, ds / "dataset.json", "dataset name")


def test_class_and_modality_names_in_dataset_json_are_checked(tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds", labels={"background": 0, "../mass": 1})
    code, _, err = run_cli(capsys, ["verify", str(ds)])
    assert_refused(code, err, ds / "dataset.json", "class name")
    ds2 = make_dataset(tmp_path / "ds2")
    _edit_json(ds2, channel_names={"0": "T1C", "1": "T2/W"})
    code, _, err = run_cli(capsys, ["verify", str(ds2)])
    assert_refused(code, err, ds2 / "dataset.json", "modality name")


# ------------------------------------------------------------------------------------------------ 3 output = input
def test_predict_never_replaces_an_input(ckpt, scans, capsys):
    before = [p.read_bytes() for p in scans]
    code, _, err = _predict(capsys, ckpt, scans, scans[0].parent)
    assert_refused(code, err, scans[0], "would overwrite the input file")
    assert [p.read_bytes() for p in scans] == before
    assert sorted(p.name for p in scans[0].parent.iterdir()) == ["t1c.nii.gz", "t2w.nii.gz"]


def test_predict_refuses_an_output_that_is_a_hard_link_to_an_input(ckpt, tmp_path, capsys):
    a, b = _img(tmp_path / "in" / "p_0000.nii.gz", seed=1), _img(tmp_path / "in" / "p_0001.nii.gz", seed=2)
    out = tmp_path / "out"
    out.mkdir()
    os.link(a, out / "p.nii.gz")  # the output name exists as another name of the T1C input
    before = a.read_bytes()
    code, _, err = _predict(capsys, ckpt, [a, b], out)
    assert_refused(code, err, out / "p.nii.gz", "would overwrite the input file")
    assert a.read_bytes() == before


# ------------------------------------------------------------------------------------------------ 4-5 run folders
def _fingerprint(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in files_under(folder) if "tensorboard" not in p.parts}


def test_train_into_a_finished_run_is_refused_unless_resume_or_overwrite(trained_run, tmp_path, capsys):
    data, run = trained_run
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run), str(copy)], check=True)
    before = _fingerprint(copy)
    code, _, err = run_cli(capsys, train_args(data, copy, "--set", "max_steps=1"))
    assert_refused(code, err, copy / "fold_0", "previous training", "--resume", "--overwrite")
    assert _fingerprint(copy) == before
    code, _, err = run_cli(capsys, train_args(data, copy, "--set", "max_steps=1", "--overwrite"))
    assert code == 0, err
    assert load_checkpoint(copy / "fold_0" / "latest.pt")["global_step"] == 1


def test_second_train_on_one_run_folder_gets_one_line_and_a_dead_holder_does_not_block(tmp_path, capsys):
    data = make_dataset(tmp_path / "ds")
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from modalseg.utils.run_lock import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)", str(run / "fold_0")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_cli(capsys, train_args(data, run, "--set", "max_steps=1"))
        line = assert_refused(code, err, run / "fold_0", "another modalseg process")
        assert f"pid {holder.pid}" in line
        assert not (run / "fold_0" / "latest.pt").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / "fold_0" / ".modalseg.lock").exists()  # left by the killed holder, no longer locked
    code, _, err = run_cli(capsys, train_args(data, run, "--set", "max_steps=1"))
    assert code == 0, err
    assert not (run / "fold_0" / ".modalseg.lock").exists()  # released (and removed) on exit


# ------------------------------------------------------------------------------------------------ 6-7 non-finite
def test_divergence_on_the_last_step_is_never_saved(tmp_path, capsys):
    """lr 1e39 is a finite Python float but overflows the fp32 update: the weights are inf after the only step,
    whose loss was finite. Before the fix, best.pt held inf weights (Dice 0.0 beat -inf) and train exited 0."""
    data = make_dataset(tmp_path / "ds")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, train_args(data, out, "--set", "max_steps=1", "--set", "lr=1.0e+39"))
    line = assert_refused(code, err, out / "fold_0", "non-finite", "lower lr")
    assert "Traceback" not in line
    assert not (out / "fold_0" / "best.pt").exists()
    assert not (out / "fold_0" / "latest.pt").exists()


def test_predict_refuses_nan_weights(ckpt, scans, tmp_path, capsys):
    def poison(state):
        state["model_state"]["decoder.head.weight"][0, 0, 0, 0] = float("nan")

    bad = _edit_checkpoint(ckpt, tmp_path / "nan.pt", poison)
    out = tmp_path / "out"
    code, _, err = _predict(capsys, bad, scans, out)
    assert_refused(code, err, bad, "non-finite", "decoder.head.weight")
    assert files_under(out) == []


def test_predict_refuses_non_finite_probabilities(ckpt, scans, tmp_path, capsys):
    def overflow(state):  # finite weights whose activations overflow to inf, then NaN (inf - inf) downstream
        state["model_state"]["master.blocks.0.0.0.weight"].fill_(3e38)

    bad = _edit_checkpoint(ckpt, tmp_path / "overflow.pt", overflow)
    out = tmp_path / "out"
    code, _, err = _predict(capsys, bad, scans, out)
    assert_refused(code, err, scans[0], "non-finite (NaN/inf) probabilities")
    assert files_under(out) == []


# ------------------------------------------------------------------------------------------------ 8-9 dataset.json
@pytest.mark.parametrize("channels", [{"0": "T1C", "1": "T1C"}, {"0": "T1C", "1": "t1c"}])
def test_duplicate_channel_names_are_refused(channels, tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds")
    _edit_json(ds, channel_names=channels)
    for argv in (["verify", str(ds)], train_args(ds, tmp_path / "run")):
        code, _, err = run_cli(capsys, argv)
        assert_refused(code, err, ds / "dataset.json", "declared twice")
    assert not (tmp_path / "run").exists()


def test_unknown_dataset_key_warns_with_the_closest_known_key(tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds")
    _edit_json(ds, case_patients={"c0": "p0", "c1": "p0"})
    code, out, err = run_cli(capsys, ["verify", str(ds)])
    assert code == 0, err
    assert "unknown key 'case_patients' is ignored (did you mean 'case_patient'?)" in out


def test_case_patient_naming_no_case_is_refused(tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds")
    _edit_json(ds, case_patient={"c0": "p0", "case1": "p0"})
    code, _, err = run_cli(capsys, ["verify", str(ds)])
    assert_refused(code, err, ds / "dataset.json", "case_patient", "'case1'")


# ------------------------------------------------------------------------------------------------ 10 resume
def test_resume_with_changed_options_is_refused_and_config_untouched(trained_run, tmp_path, capsys):
    data, run = trained_run
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run), str(copy)], check=True)
    config_before = (copy / "fold_0" / "config.yaml").read_bytes()
    for change, name in (("lr=0.01", "lr"), ("seed=7", "seed"), ("batch_size=4", "batch_size"),
                         ("amsgrad=false", "amsgrad")):
        code, _, err = run_cli(capsys, train_args(data, copy, "--epochs", "2", "--set", change, "--resume"))
        assert_refused(code, err, copy / "fold_0" / "latest.pt", "changed option", f"{name}:")
        assert (copy / "fold_0" / "config.yaml").read_bytes() == config_before
    # moving the end of the run is not a change of the run
    code, _, err = run_cli(capsys, train_args(data, copy, "--epochs", "2", "--set", "max_steps=3", "--resume"))
    assert code == 0, err
    assert load_checkpoint(copy / "fold_0" / "latest.pt")["global_step"] == 3
    assert "epochs: 2" in (copy / "fold_0" / "config.yaml").read_text()  # applied and recorded truthfully


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    data = make_dataset(tmp_path / "ds")
    out = tmp_path / "typo"
    code, _, err = run_cli(capsys, train_args(data, out, "--resume"))
    assert_refused(code, err, out, "nothing to resume")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ 13b predict folder
def test_predict_folder_with_two_files_for_one_image_is_refused(ckpt, tmp_path, capsys):
    folder = tmp_path / "in"
    _img(folder / "a_0000.nii.gz", seed=1)
    _img(folder / "a_0001.nii.gz", seed=2)
    import SimpleITK as sitk

    noise = np.random.default_rng(0).normal(size=(2, 16, 16)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(noise), str(folder / "a_0000.nrrd"))
    code, _, err = _predict(capsys, ckpt, [folder], tmp_path / "out")
    assert_refused(code, err, folder, "a_0000.nii.gz", "a_0000.nrrd")


# ------------------------------------------------------------------------------------------------ 14-15 files
def test_temporary_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    script = (
        "import os, sys; from modalseg.utils.atomic import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    open(tmp, 'wb').write(b'x' * 1000000)\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(folder / "latest.pt")])
    assert proc.returncode == -9
    left = [p.name for p in folder.iterdir()]
    assert len(left) == 1 and left[0].startswith(matomic.TMP_PREFIX), left
    live = folder / f"{matomic.TMP_PREFIX}{matomic._host()}-{os.getppid()}-live.pt"  # a running process's temp
    live.write_bytes(b"busy")
    matomic._swept.discard(folder)
    matomic.atomic_write_text(folder / "summary.md", "ok\n")
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, "summary.md"])


def test_a_245_byte_output_name_can_be_written(tmp_path):
    name = "c" * 238 + ".nii.gz"
    assert len(name.encode()) == 245
    matomic.atomic_write_bytes(tmp_path / name, b"data")
    assert (tmp_path / name).read_bytes() == b"data"
    assert_no_temp_files(tmp_path)


def test_outputs_follow_the_umask(ckpt, tmp_path, capsys):
    old = os.umask(0o027)
    try:
        a, b = _img(tmp_path / "in" / "p_0000.nii.gz", seed=1), _img(tmp_path / "in" / "p_0001.nii.gz", seed=2)
        code, _, err = _predict(capsys, ckpt, [a, b], tmp_path / "out")
        assert code == 0, err
        assert (tmp_path / "out" / "p.nii.gz").stat().st_mode & 0o777 == 0o640
        data = make_dataset(tmp_path / "ds")
        code, _, err = run_cli(capsys, train_args(data, tmp_path / "runs" / "r", "--set", "max_steps=1"))
        assert code == 0, err
        cache_dirs = [p for p in (tmp_path / "runs" / ".modalseg_cache").rglob("*") if p.is_dir()]
        assert cache_dirs and all(p.stat().st_mode & 0o777 == 0o750 for p in cache_dirs)
        assert (tmp_path / "runs" / "r" / "fold_0" / "latest.pt").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------------------ 16 versions
def test_checkpoint_of_an_unknown_format_version_is_refused(ckpt, scans, tmp_path, capsys):
    state = load_checkpoint(ckpt)
    state["version"] = 99
    bad = tmp_path / "future.pt"
    torch.save(state, bad)
    code, _, err = _predict(capsys, bad, scans, tmp_path / "out")
    assert_refused(code, err, bad, "version 99", "version 1")


@pytest.mark.parametrize("edit", [
    lambda m: m.update(labels={"background": "zero", "mass": 1}),
    lambda m: m.update(num_classes="2"),
    lambda m: m.update(modalities=[1, 2]),
    lambda m: m.update(preprocess={"slice_axis": 7}),
    lambda m: m.update(modalities=["T1C", "T1C"], channel_names=["T1C", "T1C"]),
])
def test_malformed_checkpoint_description_is_one_line(edit, ckpt, scans, tmp_path, capsys):
    bad = _edit_checkpoint(ckpt, tmp_path / "bad.pt", lambda s: edit(s["meta"]))
    code, _, err = _predict(capsys, bad, scans, tmp_path / "out")
    assert_refused(code, err, bad, "invalid")


# ------------------------------------------------------------------------------------------------ 17-18 sizes
class _Recorder(torch.nn.Module):
    """1x1 conv that records the batch shapes it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 1)
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.conv(x)


def test_prediction_batches_are_bounded_by_pixels_not_slices():
    from modalseg.training.inference import slices_per_batch

    assert slices_per_batch(8, 256, 256) == 8
    assert slices_per_batch(8, 2048, 2048) == 1
    model = _Recorder()
    images = np.random.default_rng(0).normal(size=(5, 1, 512, 512)).astype(np.float32)
    fp32 = resolve_precision(torch.device("cpu"), "fp32")
    probs = predict_probabilities(model, images, fp32, batch_size=8)
    assert max(s[0] for s in model.shapes) == 2  # 8 x 256 x 256 pixels = 2 slices of 512 x 512
    one_by_one = np.concatenate([predict_probabilities(model, images[i:i + 1], fp32) for i in range(5)])
    np.testing.assert_allclose(probs, one_by_one, rtol=1e-6, atol=1e-7)


def test_slices_smaller_than_the_networks_downsampling_are_predicted(tmp_path, capsys):
    """A 6x6 slice through a depth-4 U-Net (16x downsampling) crashed in the encoder's pooling before."""
    ckpt = tiny_checkpoint(tmp_path / "small.pt", target=None)
    small = (6, 6, 2)
    a = _img(tmp_path / "in" / "p_0000.nii.gz", shape=small, seed=1)
    b = _img(tmp_path / "in" / "p_0001.nii.gz", shape=small, seed=2)
    code, _, err = _predict(capsys, ckpt, [a, b], tmp_path / "out")
    assert code == 0, err
    out = nib.load(str(tmp_path / "out" / "p.nii.gz"))
    assert out.shape == small
    np.testing.assert_array_equal(out.affine, nib.load(str(a)).affine)


def test_training_on_slices_too_small_for_the_network_is_one_line(tmp_path, capsys):
    data = make_dataset(tmp_path / "ds")
    args = train_args(data, tmp_path / "run")
    args[args.index("preprocess_options={target_size: [16, 16]}")] = "preprocess_options={target_size: [8, 8]}"
    code, _, err = run_cli(capsys, args)
    assert_refused(code, err, "", "slices are 8x8", "at least 16")


def test_lock_file_and_temporaries_do_not_outlive_a_normal_run(trained_run):
    _, run = trained_run
    assert_no_temp_files(run)  # no .modalseg.lock, no .ms-tmp-* after a run that ended normally


# ------------------------------------------------------------------------------------------------ 18 argparse
@pytest.mark.parametrize("argv", [
    ["verify", "x", "--max-anisotropy", "abc"],
    ["experiment", "paper1", "--runs", "abc"],
    ["predict", "--model", "m.pt"],  # --input and --output missing
    ["frobnicate"],
])
def test_argument_errors_are_one_line(argv, capsys):
    from modalseg.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert len(err) == 1 and "error:" in err[0] and "usage" not in err[0], err


def test_resume_of_a_checkpoint_from_an_older_release_is_not_a_changed_option(trained_run, tmp_path, capsys):
    """Options added since a checkpoint was written count as their defaults (what the older release did)."""
    data, run = trained_run
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run), str(copy)], check=True)
    latest = copy / "fold_0" / "latest.pt"
    state = load_checkpoint(latest)
    for key in ("strict_geometry", "csa_reading", "train_all", "grad_ratio_every"):
        state["config"].pop(key)
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, latest)
    code, _, err = run_cli(capsys, train_args(data, copy, "--epochs", "2", "--resume"))
    assert code == 0, err
    # a release without foreground oversampling did not oversample: resuming with it would change the run
    state = load_checkpoint(latest)
    state["config"].pop("foreground_fraction")
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, latest)
    code, _, err = run_cli(capsys, train_args(data, copy, "--epochs", "3", "--resume"))
    assert_refused(code, err, latest, "foreground_fraction: (not recorded: an older release) -> 0.333")
