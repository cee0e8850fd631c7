"""Evaluate prediction files against label files (``modalseg evaluate``), in mm using each file's spacing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modalseg.data.io import is_supported, read_volume, strip_extension
from modalseg.data.layouts import load_dataset
from modalseg.data.verify import ORIGIN_TOL_VOXELS, geometry_problems
from modalseg.errors import DataError
from modalseg.evaluation.metrics import aggregate, evaluate_case
from modalseg.evaluation.tables import write_table

COLUMNS = ["case_id", "class_name", "status", "dice", "sensitivity", "rad", "hd", "hd95", "n_gt", "n_pred"]


_PROB = "_prob_"


def _label_files(folder: Path, keep: frozenset[str] = frozenset()) -> tuple[dict[str, Path], int]:
    """Case id -> file of every supported volume in ``folder``, and how many probability maps were left out.

    ``predict --probabilities`` writes ``CASE_prob_<class>`` beside ``CASE``: a file is skipped as a
    probability map only when the part of its name before a ``_prob_`` is itself a case id in ``folder``, so a
    case genuinely named e.g. ``a_prob_x`` (with no case ``a``) is evaluated; ids in ``keep`` (the reference
    cases, for the prediction folder) are never skipped. Two files for one case id (e.g.
    ``a.nii.gz`` and ``a.nrrd``) are refused rather than one silently winning.
    """
    if not folder.is_dir():
        raise DataError("not a folder", folder)
    files: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if not (f.is_file() and is_supported(f)):
            continue
        case = strip_extension(f.name)
        if case in files:
            raise DataError(f"a second file for case {case!r} beside {files[case]} (one file per case; remove one)", f)
        files[case] = f
    maps = {k for k in files if k not in keep and _prob_prefix(k, files) is not None}
    return {k: v for k, v in files.items() if k not in maps}, len(maps)


def _prob_prefix(case: str, cases: dict[str, Path]) -> str | None:
    """The case id that ``case`` is a probability map of (``<that case>_prob_<class>``), if any."""
    start = case.find(_PROB)
    while start != -1:
        prefix = case[:start]
        if prefix and prefix in cases and len(case) > start + len(_PROB):
            return prefix
        start = case.find(_PROB, start + 1)
    return None


def evaluate_folders(
    pred_dir: Path, label_dir: Path, out_dir: Path, *, dataset: Path | None = None, hd95_convention: str = "monai"
) -> list[dict]:
    """Per-case, per-class metrics for every reference label that has a prediction; missing ones are errors.

    Probability maps (``CASE_prob_<class>`` beside ``CASE``) are skipped, and counted in one line on stdout.
    A prediction must lie on its reference's grid: shape, spacing, orientation and origin (within half a
    voxel) are checked, as ``modalseg verify`` checks a label against its image.
    """
    labels, label_maps = _label_files(label_dir)
    preds, pred_maps = _label_files(pred_dir, keep=frozenset(labels))
    if pred_maps or label_maps:
        where = [f"{n} in {d}" for n, d in ((pred_maps, pred_dir), (label_maps, label_dir)) if n]
        total = pred_maps + label_maps
        print(f"skipped {total} probability map{'s' if total != 1 else ''} (CASE_prob_<class> files beside "
              f"their CASE): {', '.join(where)}")
    if not labels:
        raise DataError("no label files found", label_dir)
    missing = sorted(set(labels) - set(preds))
    if missing:
        raise DataError(f"no prediction for {len(missing)} case(s), e.g. {missing[0]}", pred_dir)
    if dataset is not None:
        spec = load_dataset(dataset)
        declared = spec.labels
        lut = spec.label_lut()
    else:
        values: set[int] = set()
        for f in labels.values():
            values |= set(np.unique(read_volume(f, kind="label").array).tolist())
        declared = {("background" if v == 0 else f"label_{v}"): v for v in sorted(values | {0})}
        lut = {v: i for i, v in enumerate(declared.values())}
    class_names = list(declared)
    results = []
    for case, label_path in labels.items():
        gt_vol = read_volume(label_path, kind="label")
        pred_vol = read_volume(preds[case], kind="label")
        if gt_vol.shape != pred_vol.shape:
            raise DataError(f"shape {pred_vol.shape} differs from the reference {gt_vol.shape}", preds[case])
        # Distances are in the reference's mm: a prediction on another grid (spacing, axis order, flips or a
        # shifted origin) would be scored against the wrong voxels, so refuse it as `modalseg verify` would.
        problems = geometry_problems(pred_vol, gt_vol, "prediction", "reference", origin_tol_voxels=ORIGIN_TOL_VOXELS)
        if problems:
            raise DataError(problems[0])
        gt = _to_index(gt_vol.array, lut, label_path)
        pred = _to_index(pred_vol.array, lut, preds[case])
        results += evaluate_case(pred, gt, num_classes=len(class_names), class_names=class_names,
                                 spacing=gt_vol.spacing, case_id=case, hd95_convention=hd95_convention)
    write_table([m.as_dict() for m in results], COLUMNS, out_dir / "metrics.md", out_dir / "metrics.csv",
                title="Per-case metrics (distances in mm)")
    summary = aggregate(results)
    cols = ["class_name", "n_cases", "dice_mean", "dice_sd", "sensitivity_mean", "rad_mean", "hd_mean", "hd95_mean",
            "hd_excluded"]
    write_table(summary, cols, out_dir / "summary.md", out_dir / "summary.csv", title="Summary over cases")
    return summary


def _to_index(array: np.ndarray, lut: dict[int, int], path: Path) -> np.ndarray:
    values = np.unique(array)
    unknown = [int(v) for v in values if int(v) not in lut]
    if unknown:
        raise DataError(f"label value(s) {unknown[:5]} not declared", path)
    out = np.zeros(array.shape, dtype=np.int64)
    for v in values:
        out[array == v] = lut[int(v)]
    return out
