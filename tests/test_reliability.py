"""Hostile and broken inputs for ``modalseg verify``, ``train``, ``evaluate`` and ``predict`` (the CLI).

Every refusal must be: exit code 2, exactly one line on stderr naming the offending file and the problem, no
traceback, and nothing half-written in the output folder (no partial or temporary file; for ``train`` no output
folder and no slice cache at all). A few inputs are *not* errors and must be read correctly (uint16/int8 voxels,
very anisotropic spacing). Volumes are tiny (16x16x2) and models tiny (base width 4) so that the battery is fast.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import modalseg.data.cache as mcache
import modalseg.utils.atomic as matomic
from modalseg.cli.main import main
from modalseg.data.io import read_volume
from modalseg.data.preprocess import PreprocessConfig
from modalseg.training.checkpoint import load_checkpoint, save_checkpoint
from modalseg.training.tasks import ModelMeta, build_network

AFF = np.diag([0.8, 0.8, 3.0, 1.0])
SHAPE = (16, 16, 2)


# ------------------------------------------------------------------------------------------------ helpers
def _img(path: Path, shape=SHAPE, affine=AFF, seed=0, array=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        array = np.random.default_rng(seed).normal(100, 20, size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _lab(path: Path, shape=SHAPE, affine=AFF, value=1, dtype=np.uint8) -> Path:
    arr = np.zeros(shape, dtype)
    arr[4:10, 5:11, :] = value
    return _img(path, affine=affine, array=arr)


def make_dataset(root: Path, n: int = 4, labels: dict | None = None, affine=AFF) -> Path:
    """A clean paired nnU-Net dataset: channels T1C, T2W; labels background/mass; ``n`` cases c0..c{n-1}."""
    for k in range(n):
        _img(root / "imagesTr" / f"c{k}_0000.nii.gz", seed=k, affine=affine)
        _img(root / "imagesTr" / f"c{k}_0001.nii.gz", seed=k + 10, affine=affine)
        _lab(root / "labelsTr" / f"c{k}.nii.gz", affine=affine)
    meta = {
        "channel_names": {"0": "T1C", "1": "T2W"},
        "labels": labels or {"background": 0, "mass": 1},
        "numTraining": n,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--output", str(out), "--model", "unet", "--epochs", "1",
        "--set", "model_options={base_width: 4}", "--set", "preprocess_options={target_size: [16, 16]}",
        "--set", "precision=fp32", "--set", "progress=false", "--set", "tensorboard=false",
        "--set", "folds=2", "--set", "num_threads=1", "--set", "batch_size=2", *extra,
    ]


def run_cli(capsys, argv: list[str]) -> tuple[int, str, list[str]]:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def assert_refused(code: int, err: list[str], path: Path | str, *fragments: str, exit_code: int = 2) -> str:
    """Exit code, exactly one stderr line, naming ``path`` and every fragment of the problem, no traceback."""
    assert code == exit_code, (code, err)
    assert len(err) == 1, err
    line = err[0]
    assert "Traceback" not in line
    assert str(path) in line, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def assert_no_train_output(out: Path) -> None:
    """A refused ``train`` leaves no output folder and no (partial) slice cache beside it."""
    assert not out.exists(), files_under(out)
    assert files_under(out.parent / ".modalseg_cache") == []


def assert_no_temp_files(folder: Path) -> None:
    hidden = [p for p in folder.rglob(".*")] if folder.exists() else []
    assert hidden == [], hidden


def tiny_checkpoint(path: Path, *, modalities=("T1C", "T2W"), labels=None, model="fuse_unet", seed=0,
                    bias: dict[int, float] | None = None, target=(16, 16)) -> Path:
    """A freshly initialised checkpoint written the way training/engine.py does (ModelMeta + save_checkpoint)."""
    labels = labels or {"background": 0, "mass": 1}
    options = {"base_width": 4} if model != "master_assistant" else {"base_width": 4, "sa_reduction": 2}
    meta = ModelMeta(
        kind="paired", model=model, model_options=options, modalities=list(modalities),
        num_classes=len(labels), labels=dict(labels),
        preprocess=PreprocessConfig(normalization="zscore_slice", target_size=target).to_dict(),
        channel_names=list(modalities),
    )
    torch.manual_seed(seed)
    network = build_network(meta)
    state = network.state_dict()
    if bias:
        for cls, value in bias.items():
            state["decoder.head.bias"][cls] = value
    save_checkpoint({"model_state": state, "meta": meta.to_dict()}, path)
    return path


class Payload:
    """Unpickling this object calls ``open(marker, "w")``: a marker file proves the pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def write_hostile_checkpoints(folder: Path, marker: Path) -> list[Path]:
    """The same code-executing payload as torch.save (zip) and as plain pickles (protocols 2 and default)."""
    folder.mkdir(parents=True, exist_ok=True)
    zipped = folder / "torch_save.pt"
    torch.save({"format": "modalseg-checkpoint", "version": 1, "meta": Payload(marker)}, zipped)
    plain2 = folder / "pickle_p2.pt"
    plain2.write_bytes(pickle.dumps({"format": "modalseg-checkpoint", "x": Payload(marker)}, protocol=2))
    plain = folder / "pickle_default.pt"
    plain.write_bytes(pickle.dumps(Payload(marker)))
    return [zipped, plain2, plain]


@pytest.fixture(scope="module")
def paired_ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "fuse.pt")


# ------------------------------------------------------------------------------ dataset faults: verify + train
def _missing(ds: Path) -> Path:
    path = ds / "imagesTr" / "c1_0001.nii.gz"
    path.unlink()
    return path


def _shape(ds: Path) -> Path:
    return _img(ds / "imagesTr" / "c1_0001.nii.gz", shape=(16, 14, 2))


def _spacing(ds: Path) -> Path:
    return _img(ds / "imagesTr" / "c1_0001.nii.gz", affine=np.diag([0.8, 0.9, 3.0, 1.0]))


def _flipped(ds: Path) -> Path:
    return _img(ds / "imagesTr" / "c1_0001.nii.gz", affine=np.diag([-0.8, 0.8, 3.0, 1.0]))


def _rotated(ds: Path) -> Path:
    """Same axis codes, 3 degrees of in-plane rotation: beyond the 1e-3 direction-cosine tolerance."""
    a = np.deg2rad(3.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 0.8, 3.0])
    return _img(ds / "imagesTr" / "c1_0001.nii.gz", affine=affine)


def _nan(ds: Path) -> Path:
    arr = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    arr[3, 4, 1] = np.nan
    return _img(ds / "imagesTr" / "c1_0001.nii.gz", array=arr)


def _inf(ds: Path) -> Path:
    arr = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    arr[0, 0, 0], arr[1, 0, 0] = np.inf, -np.inf
    return _img(ds / "imagesTr" / "c2_0000.nii.gz", array=arr)


def _constant(ds: Path) -> Path:
    return _img(ds / "imagesTr" / "c1_0001.nii.gz", array=np.zeros(SHAPE, np.float32))


def _label_value(ds: Path) -> Path:
    return _lab(ds / "labelsTr" / "c1.nii.gz", value=7)


def _label_shape(ds: Path) -> Path:
    return _lab(ds / "labelsTr" / "c1.nii.gz", shape=(16, 15, 2))


def _label_spacing(ds: Path) -> Path:
    return _lab(ds / "labelsTr" / "c1.nii.gz", affine=np.diag([0.8, 0.8, 2.0, 1.0]))


def _truncated(ds: Path) -> Path:
    path = ds / "imagesTr" / "c1_0001.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _garbage(ds: Path) -> Path:
    path = ds / "imagesTr" / "c1_0000.nii.gz"
    path.write_bytes(b"\x1f\x8b" + os.urandom(300))  # gzip magic, then noise
    return path


def _not_gzip(ds: Path) -> Path:
    """Wrong extension: an uncompressed NIfTI named .nii.gz."""
    path = ds / "imagesTr" / "c1_0001.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), AFF), str(ds / "plain.nii"))
    os.replace(ds / "plain.nii", path)
    return path


def _four_d(ds: Path) -> Path:
    return _img(ds / "imagesTr" / "c1_0001.nii.gz", shape=(16, 16, 2, 3))


def _json_edit(edit):
    def mutate(ds: Path) -> Path:
        path = ds / "dataset.json"
        meta = json.loads(path.read_text())
        edit(meta)
        path.write_text(json.dumps(meta))
        return path

    return mutate


def _json_invalid(ds: Path) -> Path:
    path = ds / "dataset.json"
    path.write_text('{"channel_names": {"0": "T1C"},')
    return path


DATASET_FAULTS = {
    # name: (mutate -> offending file, fragment for verify, fragment for train)
    "missing modality file": (_missing, "file not found", "file not found"),
    "NaN voxel": (_nan, "1 NaN/inf voxel(s)", "1 NaN/inf voxel(s)"),
    "inf voxels": (_inf, "2 NaN/inf voxel(s)", "2 NaN/inf voxel(s)"),
    "constant volume": (_constant, "constant image (every voxel is 0)", "constant image (every voxel is 0)"),
    "undeclared label value": (_label_value, "unexpected label values 7 (declared: 0, 1)",
                               "label value(s) 7 not declared"),
    "truncated .nii.gz": (_truncated, "cannot read (truncated or corrupt file", "truncated or corrupt"),
    "corrupt .nii.gz": (_garbage, "cannot read (truncated or corrupt file", "truncated or corrupt"),
    "uncompressed file named .nii.gz": (_not_gzip, "named .gz but not gzip-compressed",
                                        "named .gz but not gzip-compressed"),
    "4D file": (_four_d, "4D image (shape (16, 16, 2, 3)) where a 3D volume is expected", "4D image"),
    "dataset.json missing key": (_json_edit(lambda m: m.pop("labels")), "missing key 'labels'",
                                 "missing key 'labels'"),
    "dataset.json wrong type": (_json_edit(lambda m: m.update(numTraining="4")),
                                "key 'numTraining' must be an integer, found string '4'", "numTraining"),
    "dataset.json label not an int": (_json_edit(lambda m: m["labels"].update(mass="1")),
                                      "value of 'mass' must be an integer", "value of 'mass'"),
    "dataset.json wrong file ending": (_json_edit(lambda m: m.update(file_ending=".png")),
                                       "unsupported file ending '.png'", "unsupported file ending '.png'"),
    "dataset.json invalid JSON": (_json_invalid, "invalid JSON", "invalid JSON"),
}


# Grids that differ between a case's files: refused only in strict mode; by default training resamples them onto
# the master image's grid (modalseg.data.geometry) and verify warns. (These were DATASET_FAULTS before.)
GRID_FAULTS = {
    # name: (mutate -> offending file, fragment of the strict refusal in verify, in train)
    "modality shapes differ": (_shape, "shape (16, 14, 2) differs", "shape (16, 14, 2) differs"),
    "modality spacing differs": (_spacing, "spacing (0.8, 0.9, 3) differs", "spacing (0.8, 0.9, 3) differs"),
    "modality flipped": (_flipped, "orientation LAS differs", "orientation LAS differs"),
    "modality rotated 3 degrees": (_rotated, "orientation (", "direction cosines differ by up to 0.05"),
    "label/image shape": (_label_shape, "label shape (16, 15, 2) differs", "label shape (16, 15, 2) differs"),
    "label/image spacing": (_label_spacing, "label spacing (0.8, 0.8, 2) differs",
                            "label spacing (0.8, 0.8, 2) differs"),
}


@pytest.mark.parametrize("fault", list(GRID_FAULTS))
def test_grid_difference_is_resampled_and_refused_only_when_strict(fault, tmp_path, capsys):
    from modalseg.data.layouts import load_dataset
    from modalseg.data.verify import verify_dataset
    from modalseg.errors import DataError

    mutate, verify_fragment, train_fragment = GRID_FAULTS[fault]
    bad = mutate(make_dataset(tmp_path / "ds"))
    code, out, err = run_cli(capsys, ["verify", str(tmp_path / "ds")])
    assert code == 0 and err == [] and out.rstrip().endswith("OK"), (out, err)
    (warning,) = [ln for ln in out.splitlines() if ln.startswith(f"warning: {bad}: ")]
    assert "will be resampled" in warning
    spec = load_dataset(tmp_path / "ds")
    problems = verify_dataset(spec, strict=True).problems
    assert len(problems) >= 1 and problems[0].startswith(str(bad)) and verify_fragment in problems[0]
    case = next(c for c in spec.cases if c.case_id == "c1")
    with pytest.raises(DataError, match="differ") as info:
        mcache._read_case(spec, case, spec.label_lut(), strict=True)
    assert str(bad) in str(info.value) and train_fragment in str(info.value)
    code, out, err = run_cli(capsys, train_args(tmp_path / "ds", tmp_path / "run", "--set", "max_steps=1"))
    assert code == 0, err
    (note,) = [ln for ln in out.splitlines() if ln.startswith("case c1: ")]
    assert "resampled" in note and "onto" in note


@pytest.mark.parametrize("fault", list(DATASET_FAULTS))
def test_verify_refuses_with_one_line(fault, tmp_path, capsys):
    mutate, fragment, _ = DATASET_FAULTS[fault]
    bad = mutate(make_dataset(tmp_path / "ds"))
    code, out, err = run_cli(capsys, ["verify", str(tmp_path / "ds")])
    assert_refused(code, err, bad, fragment)
    assert "OK" not in out.split()


@pytest.mark.parametrize("fault", list(DATASET_FAULTS))
def test_train_refuses_with_one_line_and_writes_nothing(fault, tmp_path, capsys):
    mutate, _, fragment = DATASET_FAULTS[fault]
    bad = mutate(make_dataset(tmp_path / "ds"))
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, train_args(tmp_path / "ds", out, "--set", "max_steps=1"))
    line = assert_refused(code, err, bad, fragment)
    assert line.startswith("modalseg train: error: ")
    assert_no_train_output(out)


def test_geometry_within_tolerance_is_accepted(tmp_path, capsys):
    """Spacing off by 1e-5 (relative) and direction cosines off by 1e-5 are within tolerance: not errors."""
    ds = make_dataset(tmp_path / "ds")
    a = 1e-5
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8 * (1 + 1e-5), 0.8, 3.0])
    _img(ds / "imagesTr" / "c1_0001.nii.gz", affine=affine, seed=11)
    code, out, err = run_cli(capsys, ["verify", str(ds)])
    assert code == 0 and err == [] and out.rstrip().endswith("OK")


def test_verify_reports_every_problem_one_line_each(tmp_path, capsys):
    """Several faults: one line per faulty file plus a count (verify collects everything in one pass)."""
    ds = make_dataset(tmp_path / "ds")
    bad = [_missing(ds), _inf(ds), _label_value(ds)]
    code, _, err = run_cli(capsys, ["verify", str(ds)])
    assert code == 2 and len(err) == 4 and err[-1] == "modalseg verify: 3 problems found"
    for path in bad:
        assert sum(str(path) in line for line in err[:-1]) == 1


# ------------------------------------------------------------------------------ inputs that must be accepted
def test_uint16_and_int8_voxels_are_read_exactly_and_train(tmp_path, capsys):
    """Overflow-prone on-disk types are values, not errors: uint16 up to 65535, int8 down to -128, and a uint16
    label file with value 500 (declared) all read exactly; verify passes and training runs."""
    ds = make_dataset(tmp_path / "ds", labels={"background": 0, "lesion": 500})
    rng = np.random.default_rng(0)
    u16 = rng.integers(0, 65536, size=SHAPE, dtype=np.uint16)
    u16[0, 0, 0], u16[1, 0, 0] = 65535, 0
    i8 = rng.integers(-128, 128, size=SHAPE, dtype=np.int8)
    i8[0, 0, 0], i8[1, 0, 0] = -128, 127
    for k in range(4):
        _img(ds / "imagesTr" / f"c{k}_0000.nii.gz", array=np.roll(u16, k))
        _img(ds / "imagesTr" / f"c{k}_0001.nii.gz", array=np.roll(i8, k))
        _lab(ds / "labelsTr" / f"c{k}.nii.gz", value=500, dtype=np.uint16)
    assert nib.load(ds / "imagesTr" / "c0_0000.nii.gz").get_data_dtype() == np.uint16
    assert nib.load(ds / "imagesTr" / "c0_0001.nii.gz").get_data_dtype() == np.int8
    np.testing.assert_array_equal(read_volume(ds / "imagesTr" / "c0_0000.nii.gz").array, u16.astype(np.float32))
    np.testing.assert_array_equal(read_volume(ds / "imagesTr" / "c0_0001.nii.gz").array, i8.astype(np.float32))
    label = read_volume(ds / "labelsTr" / "c0.nii.gz", kind="label").array
    assert label.dtype == np.int32 and set(np.unique(label)) == {0, 500}

    code, out, err = run_cli(capsys, ["verify", str(ds)])
    assert code == 0 and err == [] and "label values found: 0, 500" in out
    code, out, err = run_cli(capsys, train_args(ds, tmp_path / "run", "--set", "max_steps=1"))
    assert code == 0, err
    from modalseg.data.cache import SliceCache

    cache = SliceCache(next((tmp_path / ".modalseg_cache" / ds.name).glob("*/index.json")).parent)
    assert set(np.unique(np.asarray(cache.labels))) == {0, 1}  # file value 500 -> class index 1
    assert np.isfinite(np.asarray(cache.images)).all()


def test_extremely_anisotropic_spacing_warns_in_verify_and_trains(tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds")
    aff = np.diag([0.3, 0.3, 12.0, 1.0])  # ratio 40 > default 20
    for f in [*(ds / "imagesTr").iterdir(), *(ds / "labelsTr").iterdir()]:
        nib.save(nib.Nifti1Image(np.asanyarray(nib.load(f).dataobj), aff), str(f))
    code, out, err = run_cli(capsys, ["verify", str(ds)])
    assert code == 0 and err == [] and out.rstrip().endswith("OK")
    warnings = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 4 and all("is anisotropic (ratio 40.0 > 20)" in w for w in warnings)
    code, out, err = run_cli(capsys, train_args(ds, tmp_path / "run", "--set", "max_steps=1", "--json"))
    assert code == 0, err
    assert json.loads(out)[0]["steps"] == 1


# ------------------------------------------------------------------------------ train: output and checkpoints
@pytest.mark.parametrize("under", [False, True])
def test_train_output_not_writable(under, tmp_path, capsys):
    """Output folder without write permission. Tests run as root (chmod is ignored), so this is simulated by
    making the output path a regular FILE (under=False) or a path under a regular file (under=True)."""
    ds = make_dataset(tmp_path / "ds")
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out = blocker / "run" if under else blocker
    code, _, err = run_cli(capsys, train_args(ds, out, "--set", "max_steps=1"))
    why = f"{blocker} is a file, not a folder" if under else "exists and is not a folder"
    assert_refused(code, err, out, "cannot use as output folder", why)
    assert blocker.read_text() == "not a folder"
    assert files_under(tmp_path / ".modalseg_cache") == []  # refused before any cache was built


def test_train_fold_folder_is_a_file(tmp_path, capsys):
    """A stray regular file where the fold folder goes (``<output>/fold_0``) is refused before any work."""
    ds = make_dataset(tmp_path / "ds")
    out = tmp_path / "run"
    out.mkdir()
    (out / "fold_0").write_text("stray")
    code, _, err = run_cli(capsys, train_args(ds, out, "--set", "max_steps=1"))
    assert_refused(code, err, out / "fold_0", "exists and is not a folder")
    assert [p.name for p in files_under(out)] == ["fold_0"]
    assert files_under(tmp_path / ".modalseg_cache") == []


def test_disk_full_while_building_the_slice_cache(tmp_path, capsys, monkeypatch):
    """ENOSPC on the second array chunk of the slice cache (``numpy.save`` as called by modalseg.data.cache
    writes half the bytes, then raises OSError(ENOSPC)): one line, no cache, no temporary folder."""
    ds = make_dataset(tmp_path / "ds")
    out = tmp_path / "run"
    real_save = mcache.np.save
    calls = {"n": 0}

    def full_disk(file, arr, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(file).write_bytes(b"\x93NUMPY" + bytes(16))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(file, arr, *args, **kwargs)

    monkeypatch.setattr(mcache.np, "save", full_disk)
    code, _, err = run_cli(capsys, train_args(ds, out, "--set", "max_steps=1"))
    cache_root = tmp_path / ".modalseg_cache" / ds.name
    assert_refused(code, err, cache_root, "cannot write the slice cache (No space left on device)")
    assert list(cache_root.iterdir()) == []
    assert not out.exists()


def test_disk_full_while_writing_checkpoint_keeps_previous(tmp_path, capsys, monkeypatch):
    """ENOSPC half-way through the second latest.pt write (``open`` inside modalseg.utils.atomic is patched to
    return a file whose write() stores half the bytes, then raises OSError(ENOSPC)): one line, the previous
    latest.pt intact and loadable, no temporary file left; ``--resume`` then continues from it."""
    ds = make_dataset(tmp_path / "ds")
    out = tmp_path / "run"
    real_open = builtins.open
    writes = {"latest": 0}

    class HalfThenFull:
        def __init__(self, fh) -> None:
            self.fh = fh

        def write(self, data) -> int:
            self.fh.write(bytes(data[: len(data) // 2]))
            self.fh.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self) -> None:
            self.fh.flush()

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.fh.close()

    def fake_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        # temporaries are named .ms-tmp-<host>-<pid>-<random>.pt; the first two .pt writes are latest.pt (steps
        # 1 and 2), best.pt comes only after validation
        if "w" in mode and Path(file).name.startswith(matomic.TMP_PREFIX) and Path(file).name.endswith(".pt"):
            writes["latest"] += 1
            if writes["latest"] >= 2:
                return HalfThenFull(fh)
        return fh

    monkeypatch.setattr(matomic, "open", fake_open, raising=False)
    args = train_args(ds, out, "--set", "max_steps=2", "--set", "checkpoint_every=1")
    code, _, err = run_cli(capsys, args)
    latest = out / "fold_0" / "latest.pt"
    assert_refused(code, err, latest, "cannot write (No space left on device)")
    assert writes["latest"] == 2
    assert load_checkpoint(latest)["global_step"] == 1
    assert_no_temp_files(out)
    monkeypatch.undo()
    code, _, err = run_cli(capsys, [*args, "--resume"])
    assert code == 0, err
    assert load_checkpoint(latest)["global_step"] == 2


def test_resume_with_other_class_count_is_refused(trained_run, tmp_path, capsys):
    data, run = trained_run
    ds3 = tmp_path / "ds3"
    shutil.copytree(data, ds3)
    meta = json.loads((ds3 / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "mass": 1, "cyst": 2}
    (ds3 / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "run"
    shutil.copytree(run, out)
    latest = out / "fold_0" / "latest.pt"
    before = latest.read_bytes()
    code, _, err = run_cli(capsys, [*train_args(ds3, out), "--resume"])
    assert_refused(code, err, latest, "different model (unet, 2 classes", "this run is (unet, 3 classes")
    assert latest.read_bytes() == before


def test_resume_from_pickled_object_is_refused_never_executed(trained_run, tmp_path, capsys):
    data, run = trained_run
    marker = tmp_path / "MARKER"
    control = tmp_path / "CONTROL"
    pickle.loads(pickle.dumps(Payload(control)))  # the payload is live: plain unpickling runs it
    assert control.exists()
    for hostile in write_hostile_checkpoints(tmp_path / "hostile", marker):
        out = tmp_path / f"run_{hostile.stem}"
        shutil.copytree(run, out)
        latest = out / "fold_0" / "latest.pt"
        shutil.copy(hostile, latest)
        code, _, err = run_cli(capsys, [*train_args(data, out), "--resume"])
        assert_refused(code, err, latest, "refused: not a plain-weights checkpoint", "nothing in it was executed")
        assert not marker.exists()
        assert latest.read_bytes() == hostile.read_bytes()


def test_interrupted_cache_build_leaves_no_half_cache(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the slice cache is half built (3rd case): one line, exit 130, no cache and no temporary
    folder; the next run builds the complete cache."""
    ds = make_dataset(tmp_path / "ds")
    out = tmp_path / "run"
    real = mcache.preprocess_volume
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(mcache, "preprocess_volume", interrupted)
    code, _, err = run_cli(capsys, train_args(ds, out, "--set", "max_steps=1"))
    assert code == 130 and err == ["modalseg train: interrupted"]
    cache_root = tmp_path / ".modalseg_cache" / ds.name
    assert list(cache_root.iterdir()) == []
    assert not out.exists()
    monkeypatch.undo()
    assert run_cli(capsys, train_args(ds, out, "--set", "max_steps=1"))[0] == 0
    (built,) = list(cache_root.iterdir())
    assert (built / "index.json").is_file() and len(json.loads((built / "index.json").read_text())["records"]) == 8


# ------------------------------------------------------------------------------ predict
def _predict(capsys, model: Path | list[Path], inputs: list[Path], out: Path, *extra: str):
    models = [str(m) for m in (model if isinstance(model, list) else [model])]
    return run_cli(capsys, ["predict", "--model", *models, "--input", *map(str, inputs), "--output", str(out),
                            "--precision", "fp32", "--device", "cpu", *extra])


@pytest.fixture
def case_files(tmp_path) -> list[Path]:
    return [_img(tmp_path / "in" / "p_0000.nii.gz", seed=1), _img(tmp_path / "in" / "p_0001.nii.gz", seed=2)]


def _png(d: Path) -> Path:
    (d / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    return d / "scan.png"


def _cut(d: Path) -> Path:
    (d / "t.nii.gz").write_bytes((d / "p_0001.nii.gz").read_bytes()[:200])
    return d / "t.nii.gz"


def _one_nan() -> np.ndarray:
    arr = np.random.default_rng(3).normal(size=SHAPE).astype(np.float32)
    arr[5, 5, 1] = np.nan
    return arr


PREDICT_FAULTS = {
    # name: (make the second (T2W) input in folder d -> its path, fragment of the one-line message)
    "second modality missing": (lambda d: d / "absent_0001.nii.gz", "input not found"),
    "NaN voxel": (lambda d: _img(d / "n.nii.gz", array=_one_nan()), "1 NaN/inf voxel(s)"),
    "constant volume": (lambda d: _img(d / "c.nii.gz", array=np.full(SHAPE, 7, np.float32)),
                        "constant image (every voxel is 7)"),
    "4D file": (lambda d: _img(d / "f.nii.gz", shape=(16, 16, 2, 2)), "4D image (shape (16, 16, 2, 2))"),
    "wrong extension": (_png, "unsupported file type"),
    "truncated": (_cut, "cannot read (truncated or corrupt file"),
}


# Refused only with strict=True; by default predict resamples the T2W onto the T1C's grid (one printed line).
PREDICT_GRID_FAULTS = {
    "modality shapes differ": (lambda d: _img(d / "s.nii.gz", shape=(16, 14, 2)), "T2W shape (16, 14, 2) differs"),
    "modality spacing differs": (lambda d: _img(d / "s.nii.gz", affine=np.diag([0.8, 0.9, 3, 1])),
                                 "T2W spacing (0.8, 0.9, 3) differs"),
    "modality flipped": (lambda d: _img(d / "s.nii.gz", affine=np.diag([0.8, -0.8, 3, 1])),
                         "T2W orientation RPS differs"),
}


@pytest.mark.parametrize("fault", list(PREDICT_GRID_FAULTS))
def test_predict_resamples_other_grid_and_refuses_it_when_strict(fault, paired_ckpt, case_files, tmp_path, capsys):
    from modalseg.errors import DataError
    from modalseg.training.precision import resolve_precision
    from modalseg.training.predict import load_models, predict_case

    make, fragment = PREDICT_GRID_FAULTS[fault]
    other = make(case_files[0].parent)
    out = tmp_path / "out"
    code, stdout, err = _predict(capsys, paired_ckpt, [case_files[0], other], out)
    assert code == 0 and err == [], err
    assert sum("T2W resampled (linear) onto T1C's grid" in ln for ln in stdout.splitlines()) == 1
    written = read_volume(out / "p_0000.nii.gz", kind="label")
    assert written.shape == SHAPE and np.array_equal(written.affine, read_volume(case_files[0]).affine)
    fp32 = resolve_precision(torch.device("cpu"), "fp32")
    models = load_models([paired_ckpt], fp32)
    with pytest.raises(DataError, match="differs") as info:
        predict_case(models, [case_files[0], other], strict=True)
    assert str(other) in str(info.value) and fragment in str(info.value)


@pytest.mark.parametrize("fault", list(PREDICT_FAULTS))
def test_predict_refuses_bad_input(fault, paired_ckpt, case_files, tmp_path, capsys):
    make, fragment = PREDICT_FAULTS[fault]
    bad = make(case_files[0].parent)
    out = tmp_path / "out"
    code, _, err = _predict(capsys, paired_ckpt, [case_files[0], bad], out)
    assert_refused(code, err, bad, fragment)
    assert files_under(out) == []


def test_predict_wrong_number_of_files(paired_ckpt, case_files, tmp_path, capsys):
    code, _, err = _predict(capsys, paired_ckpt, case_files[:1], tmp_path / "out")
    assert_refused(code, err, case_files[0], "the model needs 2 file(s), one per modality (T1C, T2W); got 1")


@pytest.mark.parametrize("how", ["file", "under a file", "no permission"])
def test_predict_output_not_writable(how, paired_ckpt, case_files, tmp_path, capsys, monkeypatch):
    """Tests run as root, which ignores chmod, so a read-only output is simulated: the output path is a regular
    FILE, a path under a regular file, or (``no permission``) ``os.access`` as used by modalseg.utils.atomic is
    monkeypatched to deny write access. Refused before any model is loaded; nothing is created."""
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = {"file": blocker, "under a file": blocker / "sub", "no permission": tmp_path / "ro" / "out"}[how]
    if how == "no permission":
        (tmp_path / "ro").mkdir()
        real_access = os.access

        def access(path, mode, *args, **kwargs):
            return Path(path) != tmp_path / "ro" and real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(matomic.os, "access", access)
    code, _, err = _predict(capsys, paired_ckpt, case_files, out)
    why = {"file": "cannot use as output folder (exists and is not a folder)",
           "under a file": f"cannot use as output folder ({blocker} is a file, not a folder)",
           "no permission": f"cannot create or write the folder (no write permission in {tmp_path / 'ro'})"}[how]
    assert_refused(code, err, out, why)
    assert blocker.read_text() == "x"
    assert not (tmp_path / "ro" / "out").exists()


def test_predict_unsupported_output_ending(paired_ckpt, case_files, tmp_path, capsys):
    code, _, err = _predict(capsys, paired_ckpt, case_files, tmp_path / "out", "--file-ending", ".png")
    assert_refused(code, err, "--file-ending '.png'", "not a supported output format")
    assert not (tmp_path / "out").exists()


def test_predict_refuses_pickled_checkpoint_never_executed(case_files, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    for hostile in write_hostile_checkpoints(tmp_path / "hostile", marker):
        code, _, err = _predict(capsys, hostile, case_files, tmp_path / "out")
        assert_refused(code, err, hostile, "refused: not a plain-weights checkpoint", "nothing in it was executed")
        assert not marker.exists()
    zipped_err = run_cli(capsys, ["predict", "--model", str(tmp_path / "hostile" / "torch_save.pt"), "--input",
                                  *map(str, case_files), "--output", str(tmp_path / "out")])[2][0]
    assert "it references io.open" in zipped_err  # names what it refused (builtins.open is io.open)
    assert not (tmp_path / "out").exists()


def test_predict_checkpoint_of_other_class_count_or_model(paired_ckpt, case_files, tmp_path, capsys):
    # weights of a 2-class model under a description that claims 3 classes
    state = load_checkpoint(paired_ckpt)
    state["meta"]["labels"] = {"background": 0, "mass": 1, "cyst": 2}
    state["meta"]["num_classes"] = 3
    save_checkpoint(state, tmp_path / "three.pt")
    code, _, err = _predict(capsys, tmp_path / "three.pt", case_files, tmp_path / "out")
    assert_refused(code, err, tmp_path / "three.pt", "checkpoint does not match this model",
                   "in the checkpoint, (3, 8, 1, 1) here")
    # weights of fuse_unet described as another model
    state = load_checkpoint(paired_ckpt)
    state["meta"]["model"] = "early_fuse_unet"
    save_checkpoint(state, tmp_path / "other.pt")
    code, _, err = _predict(capsys, tmp_path / "other.pt", case_files, tmp_path / "out")
    assert_refused(code, err, tmp_path / "other.pt", "checkpoint does not match this model")
    # two consistent checkpoints that cannot be ensembled
    three = tiny_checkpoint(tmp_path / "three_ok.pt", labels={"background": 0, "mass": 1, "cyst": 2})
    code, _, err = _predict(capsys, [paired_ckpt, three], case_files, tmp_path / "out")
    assert_refused(code, err, three, "cannot ensemble", "3 classes", "2 classes")
    # a malformed description, an unknown model and a truncated file
    for name, edit, fragment in [
        ("meta_key.pt", lambda m: m.update(bogus=1), "invalid model description"),
        ("meta_classes.pt", lambda m: m.update(num_classes=5), "5 classes but 2 labels"),
        ("unknown.pt", lambda m: m.update(model="no_such_net"), "cannot rebuild the model it describes"),
    ]:
        state = load_checkpoint(paired_ckpt)
        edit(state["meta"])
        save_checkpoint(state, tmp_path / name)
        code, _, err = _predict(capsys, tmp_path / name, case_files, tmp_path / "out")
        assert_refused(code, err, tmp_path / name, fragment)
    data = paired_ckpt.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    code, _, err = _predict(capsys, tmp_path / "cut.pt", case_files, tmp_path / "out")
    assert_refused(code, err, tmp_path / "cut.pt", "unreadable or corrupt checkpoint")
    assert files_under(tmp_path / "out") == []


def test_predict_several_cases_stops_at_the_bad_one(paired_ckpt, tmp_path, capsys):
    """Cases are written one by one, each atomically: the good case before the bad one is complete, the bad
    one has no file, and there is no temporary file."""
    folder = tmp_path / "in"
    for case, seed in (("a", 1), ("b", 2)):
        _img(folder / f"{case}_0000.nii.gz", seed=seed)
        _img(folder / f"{case}_0001.nii.gz", seed=seed + 5)
    bad = _img(folder / "b_0001.nii.gz", array=np.zeros(SHAPE, np.float32))
    out = tmp_path / "out"
    code, _, err = _predict(capsys, paired_ckpt, [folder], out)
    assert_refused(code, err, bad, "constant image")
    assert [p.name for p in files_under(out)] == ["a.nii.gz"]
    assert read_volume(out / "a.nii.gz", kind="label").shape == SHAPE


# ------------------------------------------------------------------------------ evaluate
def _eval_folders(tmp_path: Path) -> tuple[Path, Path]:
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    for case in ("c0", "c1"):
        _lab(ref / f"{case}.nii.gz")
        _lab(pred / f"{case}.nii.gz")
    return pred, ref


def _garbage_pred(p: Path) -> Path:
    (p / "c1.nii.gz").write_bytes(b"\x1f\x8b" + bytes(64))
    return p / "c1.nii.gz"


def _orphan_pred(p: Path) -> Path:
    """A prediction without a reference (a missing prediction is not an error: that case is listed, unscored)."""
    return _lab(p / "c9.nii.gz")


EVAL_FAULTS = {
    "shape": (lambda p: _lab(p / "c1.nii.gz", shape=(16, 15, 2)), "shape (16, 15, 2) differs from the reference"),
    "spacing": (lambda p: _lab(p / "c1.nii.gz", affine=np.diag([1.6, 0.8, 3, 1])),
                "prediction spacing (1.6, 0.8, 3) differs from reference"),
    "orientation": (lambda p: _lab(p / "c1.nii.gz", affine=np.diag([-0.8, 0.8, 3, 1])),
                    "prediction orientation LAS differs from reference"),
    "undeclared value": (lambda p: _lab(p / "c1.nii.gz", value=9), "label value(s) [9] not declared"),
    "non-integer labels": (lambda p: _img(p / "c1.nii.gz", array=np.full(SHAPE, 0.5, np.float32)),
                           "label file has non-integer values (e.g. 0.5)"),
    "NaN in labels": (lambda p: _img(p / "c1.nii.gz", array=np.full(SHAPE, np.nan, np.float32)),
                      "label file has 512 NaN/inf voxels"),
    "4D": (lambda p: _img(p / "c1.nii.gz", shape=(16, 16, 2, 2)), "4D image"),
    "corrupt": (_garbage_pred, "cannot read (truncated or corrupt file"),
    "prediction without reference": (_orphan_pred, "no reference label 'c9' in"),
}


@pytest.mark.parametrize("fault", list(EVAL_FAULTS))
def test_evaluate_refuses_bad_prediction(fault, tmp_path, capsys):
    pred, ref = _eval_folders(tmp_path)
    make_dataset(tmp_path / "ds", n=1)
    make, fragment = EVAL_FAULTS[fault]
    bad = make(pred)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, ["evaluate", "--pred", str(pred), "--labels", str(ref),
                                    "--dataset", str(tmp_path / "ds"), "--output", str(out)])
    assert_refused(code, err, bad, fragment)
    assert files_under(out) == []


@pytest.mark.parametrize("under", [False, True])
def test_evaluate_output_not_writable(under, tmp_path, capsys):
    """Simulated (tests run as root): the output path is a regular FILE, or a path under a regular file."""
    pred, ref = _eval_folders(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker / "sub" if under else blocker
    code, _, err = run_cli(capsys, ["evaluate", "--pred", str(pred), "--labels", str(ref), "--output", str(out)])
    assert_refused(code, err, out, "cannot use as output folder")


def test_evaluate_write_failure_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    """``os.replace`` inside modalseg.utils.atomic is patched to raise PermissionError (a folder that turns
    read-only mid-run): one line, and the table being written leaves no temporary file behind."""
    pred, ref = _eval_folders(tmp_path)
    out = tmp_path / "out"

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))

    monkeypatch.setattr(matomic.os, "replace", refuse)
    code, _, err = run_cli(capsys, ["evaluate", "--pred", str(pred), "--labels", str(ref), "--output", str(out)])
    assert_refused(code, err, out / "metrics.md", "cannot write (Permission denied)")
    assert files_under(out) == []
