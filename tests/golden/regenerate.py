"""Golden values of today's 2D training and predict paths (issue 14, item 1); see tests/test_golden.py.

Regenerating the golden files is a deliberate act, never done by the tests::

    .venv/bin/python tests/golden/regenerate.py          # rewrites tests/golden/*.json
    .venv/bin/python tests/golden/regenerate.py --check  # records again and only reports differences

Do it only after a change that is *meant* to alter what training or prediction computes (see "What the goldens
depend on" below), say why in the commit, and review the diff of the JSON files. A refactoring that is meant to
compute the same thing (e.g. the N-dimensional core redesign) must pass tests/test_golden.py unchanged.

How the values are recorded (the test rebuilds every run from scratch with the same functions):

* CPU only, fp32 (``precision="fp32"``), one torch thread (``num_threads=1`` and ``torch.set_num_threads(1)``),
  ``torch.use_deterministic_algorithms(True)``, fixed seeds. Measured on torch 2.13 (CPU): two runs give
  bit-identical losses and weights (in one process and across processes), with or without deterministic
  algorithms; 1 vs 2 threads differ from the second step on (paired; unpaired from the fifth): the first,
  forward-only loss is identical, the backward's summation order changes with the thread count and Adam
  amplifies it until the run ends elsewhere (another best epoch, other predicted labels). Hence one thread.
* Every option that a default or an ``auto`` rule would otherwise decide is given explicitly (model, preset and
  every preprocessing field, recipe, folds, seeds, feature layers, foreground fraction), so a change of a default
  does not move the goldens.
* Runs are longer than the 2 epochs first asked for (paired: 13 epochs at lr 1e-2; unpaired: 10 x 4 steps at
  lr 3e-3): with 2 epochs at lr 1e-3 the tiny paired model predicts nothing on every case, so best.pt would not
  exist, the validation table would be all "empty prediction" and the predicted label volume all background,
  which a broken predict path (a flipped axis, a lost resampling) would reproduce too. Note: the CSA term of the
  unpaired run is tiny (~1.5e-7 per step: Eq. 3's division by the region size, squared in Eq. 4), so CSA's
  forward value is checked (loss part ``csa``, rtol 1e-6) but its gradient barely moves the weights.

What the goldens depend on (a deliberate change of any of these requires regeneration):

* the synthetic generators (``make_breast_dataset``, ``make_cardiac_dataset``) and the NIfTI arrays they write:
  recorded as ``inputs`` fingerprints, checked first, so a generator change is reported as such;
* reading, canonical reorientation, slicing and the cache (slice order, ``only_labelled_slices``), the
  normalisations ``max_slice`` / ``zscore_slice`` and the bilinear/nearest resize rules;
* the patient split (``make_splits`` for ``split_seed`` 0, 5 folds, fold 0; unpaired: stratified by modality);
* the batch order (``EpochBatchSampler`` / ``UnpairedBatchSampler``, pure functions of seed and epoch);
* model construction and initialisation (module creation order, init schemes, ``seed_everything``): recorded as
  ``init_weights``; the architectures ``master_assistant`` and ``unet`` (widths, depth 4, SA block, BatchNorm);
* the losses (Dice + CE with eps 1, CSA affinity on the feature layers), Adam/AMSGrad and the step schedulers;
* validation: ``foreground_dice_per_group``, the degenerate-epoch rule (empty / all-foreground predictions on every
  case never become best.pt) and best-epoch selection (strictly greater val Dice), which decide best.pt, hence
  ``validation.csv`` (``evaluate_trainer`` on best.pt) and the predicted labels;
* the metrics (Dice, HD, HD95 in mm from the cached spacing, status names) of ``evaluate_case``;
* ``modalseg predict``: ``--checkpoint best`` default (best.pt, else latest.pt), slicing of the input volume,
  restoring to the input grid, the output dtype/geometry and the ``CASE_prob_<class>`` files;
* options added after the goldens were recorded: pin each new one in the configs above at the value that
  reproduces today's computation (as done for ``csa_reading``, ``csa_region_norm``, ``dice_form``).

What the *recording code* (not the values) touches of the engine, to adapt here if a redesign renames it:
``Trainer(cfg, console=False)``, ``.network``, ``.step_module`` (a forward hook reads ``(loss, parts)`` per
step), ``.fit()``'s summary, ``.history``, ``.run_dir``, ``.meta.labels``, ``evaluate_trainer`` and the
``model_state`` of latest.pt / best.pt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

GOLDEN_DIR = Path(__file__).resolve().parent
FILES = {"paired": GOLDEN_DIR / "paired.json", "unpaired": GOLDEN_DIR / "unpaired.json"}

BREAST_DATA: dict[str, Any] = {"num_patients": 6, "slices": 3, "size": 32, "seed": 1}
CARDIAC_DATA: dict[str, Any] = {"num_patients_per_modality": 5, "slices": 3, "size": 32, "seed": 2}

_COMMON: dict[str, Any] = {
    "folds": 5, "fold": 0, "split_seed": 0, "device": "cpu", "precision": "fp32", "channels_last": False,
    "num_threads": 1, "val_every": 1, "checkpoint_every": 0, "progress": False, "tensorboard": False,
    "ce_weight": 1.0, "conv_l2": 0.0, "augmentation": "off", "modality_dropout": 0.0,
}
#: Paper 1's preset, spelled out field by field (target_size 32), so the preset's definition is not a dependency.
PAIRED_CONFIG: dict[str, Any] = {
    **_COMMON, "model": "master_assistant", "model_options": {"base_width": 4, "sa_reduction": 2},
    "modalities": ["T1C", "T2W"], "preprocess": "paper1",
    "preprocess_options": {"slice_axis": 2, "normalization": "max_slice", "target_size": [32, 32], "crop": "none",
                           "only_labelled_slices": True},
    "foreground_fraction": 0.0, "epochs": 13, "batch_size": 2, "lr": 1e-2, "amsgrad": True, "lr_step": 30,
    "lr_gamma": 0.5, "lr_step_unit": "epoch", "seed": 3,
}
UNPAIRED_CONFIG: dict[str, Any] = {
    **_COMMON, "model": "unet", "model_options": {"base_width": 4}, "setting": "csa", "modalities": ["CT", "MR"],
    "feature_layers": ["master.blocks.3", "decoder.ups.0"], "preprocess": "paper2_synth",
    "preprocess_options": {"slice_axis": 2, "normalization": "zscore_slice", "target_size": None, "crop": "none",
                           "only_labelled_slices": False},
    "foreground_fraction": 0.0, "epochs": 10, "steps_per_epoch": 4, "batch_size": 2, "lr": 3e-3, "amsgrad": False,
    "lr_step": 1000, "lr_gamma": 0.95, "lr_step_unit": "iteration", "affinity_weight": 0.5, "seed": 5,
    # paper 2 readings as printed (the defaults when these options appeared; the goldens predate them)
    "csa_reading": "literal", "csa_region_norm": True, "dice_form": "per_image",
    "grad_ratio_every": 0,  # a diagnostic without effect on training: not computed
}
#: Columns of validation.csv kept in the golden (per patient, per class).
VALIDATION_COLUMNS = ("dice", "hd", "hd95")
DIGITS = 6  # rounding of table metrics, as asked; sums keep 10 significant digits (compared with rtol 1e-5)


# ----------------------------------------------------------------------------------------------- environment
@contextmanager
def pinned_cpu() -> Iterator[None]:
    """One torch thread and deterministic algorithms for the block; the previous settings are restored."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def _sig(x: float, digits: int = 10) -> float | str:
    """A float for JSON: ``digits`` significant digits; non-finite values as the strings nan / inf / -inf."""
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return float(f"{x:.{digits}g}")


def _rounded(x: float) -> float | str:
    x = float(x)
    return round(x, DIGITS) if math.isfinite(x) else str(x)


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------- fingerprints
def dataset_fingerprint(root: Path) -> dict[str, Any]:
    """SHA-256 of every NIfTI array (dtype, shape and affine included) of a generated dataset, read with nibabel."""
    files = {}
    total = hashlib.sha256()
    for path in sorted(root.rglob("*.nii.gz")):
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj)
        h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
        h.update(np.round(np.asarray(img.affine, dtype=np.float64), 6).tobytes())
        rel = path.relative_to(root).as_posix()
        files[rel] = h.hexdigest()[:16]
        total.update(rel.encode() + h.digest())
    return {"sha256": total.hexdigest(), "files": files}


def weights_record(state: dict[str, torch.Tensor], detail: str = "tensors") -> dict[str, Any]:
    """SHA-256 of the float32 bytes of the state-dict tensors in sorted key order, plus what a failure can name.

    ``detail="tensors"``: [sum, |sum|] of every tensor (BatchNorm's ``num_batches_tracked`` counters are in the
    hash only); ``"groups"``: the same per module group (the first three components of the keys, e.g.
    ``master.blocks.0``) and a hash of the keys and shapes, to tell a changed architecture from a changed init;
    ``"hash"``: the hash alone. Sums are taken in float64 and kept to 9 significant digits.
    """
    h, layout = hashlib.sha256(), hashlib.sha256()
    tensors: dict[str, list] = {}
    groups: dict[str, list[float]] = {}
    numel = 0
    for key in sorted(state):
        t = state[key].detach().cpu().to(torch.float32).contiguous()
        h.update(t.numpy().tobytes())
        layout.update(f"{key}{tuple(t.shape)};".encode())
        numel += t.numel()
        if key.endswith("num_batches_tracked"):
            continue
        s, a = float(t.double().sum()), float(t.double().abs().sum())
        tensors[key] = [_sig(s, 9), _sig(a, 9)]
        g = groups.setdefault(".".join(key.split(".")[:3]), [0.0, 0.0])
        g[0], g[1] = g[0] + s, g[1] + a
    record: dict[str, Any] = {"sha256": h.hexdigest(), "num_tensors": len(state), "numel": numel}
    if detail == "tensors":
        record["tensors"] = tensors
    elif detail == "groups":
        record["layout_sha256"] = layout.hexdigest()
        record["groups"] = {k: [_sig(s, 9), _sig(a, 9)] for k, (s, a) in groups.items()}
    return record


# ----------------------------------------------------------------------------------------------- runs
def make_datasets(root: Path) -> dict[str, Path]:
    """The two synthetic datasets of the goldens, written under ``root``."""
    from modalseg.data.synth import make_breast_dataset, make_cardiac_dataset

    return {"paired": make_breast_dataset(root / "breast", **BREAST_DATA),
            "unpaired": make_cardiac_dataset(root / "cardiac", **CARDIAC_DATA)}


def _read_validation(path: Path, unpaired: bool) -> list[dict[str, Any]]:
    import csv

    rows = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            out: dict[str, Any] = {"modality": row["modality"]} if unpaired else {}
            out.update(case_id=row["case_id"], class_name=row["class_name"], status=row["status"])
            out.update({c: _rounded(float(row[c])) if row[c] != "" else None for c in VALIDATION_COLUMNS})
            rows.append(out)
    return rows


def record_training(kind: str, data: Path, work: Path) -> tuple[dict[str, Any], Any]:
    """Train the ``kind`` golden run in ``work`` and return (its record, the trainer)."""
    from modalseg.training.checkpoint import load_checkpoint
    from modalseg.training.config import TrainConfig
    from modalseg.training.engine import Trainer
    from modalseg.training.evaluate import evaluate_trainer

    values = dict(PAIRED_CONFIG if kind == "paired" else UNPAIRED_CONFIG)
    cfg = TrainConfig(data=str(data), output=str(work / kind), **values)
    with pinned_cpu():
        trainer = Trainer(cfg, console=False)
        init = weights_record(trainer.network.state_dict(), "groups")
        steps: list[dict[str, float]] = []

        def on_step(module: torch.nn.Module, args: Any, output: Any) -> None:
            loss, parts = output
            steps.append({"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items() if k != "loss"}})

        handle = trainer.step_module.register_forward_hook(on_step)
        try:
            summary = trainer.fit()
        finally:
            handle.remove()
        run_dir = Path(trainer.run_dir)
        final = weights_record(load_checkpoint(run_dir / "latest.pt")["model_state"])
        best = (weights_record(load_checkpoint(run_dir / "best.pt")["model_state"], "hash")
                if (run_dir / "best.pt").is_file() else None)
        evaluate_trainer(trainer)
    # the total and every loss part that each step reports (diagnostics logged on some steps only are left out)
    names = [name for name in steps[0] if all(name in s for s in steps)] if steps else ["loss"]
    losses = {name: [s[name] for s in steps] for name in names}
    record = {
        "losses": losses,
        "init_weights": init,
        "final_weights": final,
        "best_weights": best,
        "history": {
            "epochs": int(summary["epochs"]), "steps": int(summary["steps"]), "best_epoch": summary["best_epoch"],
            "val_dice": [_sig(h["val_dice"]) for h in trainer.history],
            "degenerate": [int(h["degenerate"]) for h in trainer.history],
            "train_loss": [_sig(h["train_loss"]) for h in trainer.history],
        },
        "validation": _read_validation(run_dir / "validation.csv", kind == "unpaired"),
    }
    return record, trainer


def _runs(labels: np.ndarray) -> list[list[int]]:
    """Run-length encoding [[value, count], ...] of the C-order flattened label array."""
    flat = labels.reshape(-1)
    edges = np.flatnonzero(np.diff(flat)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [flat.size]])
    return [[int(flat[s]), int(e - s)] for s, e in zip(starts, ends, strict=True)]


def record_predict(data: Path, run_root: Path, work: Path, class_names: list[str]) -> dict[str, Any]:
    """``modalseg predict --precision fp32 --probabilities`` of the dataset's first case with the paired run."""
    from modalseg.cli.main import main
    from modalseg.data.layouts import load_dataset

    case = load_dataset(data).cases[0]
    out = work / "predict"
    args = ["predict", "--model", str(run_root), "--input", *map(str, case.images), "--output", str(out),
            "--probabilities", "--precision", "fp32", "--device", "cpu"]
    with pinned_cpu(), redirect_stdout(sys.stderr):
        code = main(args)
    if code != 0:
        raise RuntimeError(f"modalseg predict exited with {code}")
    label_img = nib.load(str(out / f"{case.case_id}.nii.gz"))
    labels = np.asarray(label_img.dataobj)
    values, counts = np.unique(labels, return_counts=True)
    as_int = labels.astype(np.int64)
    probabilities = {}
    for name in class_names:
        raw = np.asarray(nib.load(str(out / f"{case.case_id}_prob_{name}.nii.gz")).dataobj)
        p = raw.astype(np.float64)
        probabilities[name] = {
            "dtype": str(raw.dtype),
            "sum": _sig(p.sum()),
            # marginal sums along each array axis: a flipped or transposed output changes them, a sum would not
            "axis_sums": [[_sig(v) for v in p.sum(axis=tuple(a for a in range(p.ndim) if a != k))]
                          for k in range(p.ndim)],
        }
    return {
        "case": case.case_id,
        "labels": {
            "shape": list(labels.shape), "dtype": str(labels.dtype),
            "affine": [[_sig(v, 8) for v in row] for row in np.asarray(label_img.affine)],
            "sha256_int64": _sha256(as_int),
            "values": [int(v) for v in values], "counts": [int(c) for c in counts],
            "runs": _runs(as_int),
        },
        "probabilities": probabilities,
    }


def record_all(work: Path, kinds: tuple[str, ...] = ("paired", "unpaired")) -> dict[str, dict[str, Any]]:
    """Every golden record, computed from scratch in ``work`` (an empty folder)."""
    datasets = make_datasets(work / "data")
    records = {}
    for kind in kinds:
        record, trainer = record_training(kind, datasets[kind], work / "runs")
        record = {"inputs": dataset_fingerprint(datasets[kind]), **record}
        if kind == "paired":
            record["predict"] = record_predict(datasets[kind], Path(trainer.cfg.output), work,
                                               list(trainer.meta.labels))
        records[kind] = record
    return records


# ----------------------------------------------------------------------------------------------- files
def about() -> dict[str, Any]:
    """Where and with what the goldens were recorded (information for a reader of a failure, never compared)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=GOLDEN_DIR, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src")
    return {
        "regenerate": "python tests/golden/regenerate.py (deliberately; see its docstring)",
        "git_head": git("rev-parse", "HEAD"),
        "src_modified_files": [line[3:] for line in dirty.splitlines()] if dirty != "unknown" else "unknown",
        "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()} {platform.processor()}".strip(),
    }


def load_golden(kind: str) -> dict[str, Any]:
    return json.loads(FILES[kind].read_text())


def dumps(value: Any, indent: int = 0) -> str:
    """JSON with one key per line and every list of numbers/strings (or of such lists) on one line: short
    files whose diffs name the values that moved."""
    def flat(v: Any) -> bool:
        return not isinstance(v, dict) and (not isinstance(v, list) or all(flat(x) for x in v))

    if isinstance(value, dict) and value:
        pad = " " * (indent + 1)
        items = [f"{pad}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(value, list) and not flat(value):
        pad = " " * (indent + 1)
        return "[\n" + ",\n".join(pad + dumps(v, indent + 1) for v in value) + "\n" + " " * indent + "]"
    return json.dumps(value, allow_nan=False)


def write_golden(records: dict[str, dict[str, Any]]) -> None:
    info = about()
    for kind, record in records.items():
        FILES[kind].write_text(dumps({"about": info, **record}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="record and compare with the files, write nothing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="modalseg-golden-") as tmp:
        records = record_all(Path(tmp))
    if args.check:
        sys.path.insert(0, str(GOLDEN_DIR.parent))
        from test_golden import compare_record

        problems = [f"{kind}: {p}" for kind, rec in records.items() for p in compare_record(load_golden(kind), rec)]
        print("\n".join(problems) or "the goldens match")
        return 1 if problems else 0
    write_golden(records)
    for kind, path in FILES.items():
        print(f"wrote {path} ({path.stat().st_size} bytes): {records[kind]['history']['steps']} steps, "
              f"best epoch {records[kind]['history']['best_epoch']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
