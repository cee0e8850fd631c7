"""``modalseg predict``: segment NIfTI/NRRD volumes or DICOM series with trained models (several folds are ensembled);
labels are written as images or, with ``--output-format dicom-seg``, as DICOM Segmentations (data/dicom_seg.py).

``--backend`` chooses how the networks run: PyTorch (checkpoints), or ONNX Runtime / OpenVINO (export folders of
``modalseg export``; a run or fold given with one of these is exported to a temporary folder first). The path for
export folders imports no torch: ``python -m modalseg.deploy.runtime`` is this command without it.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modalseg.inference.predictor import LoadedModel

OUTPUT_FORMATS = ("image", "dicom-seg")
BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
HELP = "segment volumes (one file per modality) and write label volumes with the input's geometry"


def add_arguments(p: argparse.ArgumentParser, *, runtime: bool = False) -> None:
    """The command's options; ``runtime``: those of the torch-free runtime (export folders only)."""
    if runtime:
        p.add_argument("--model", nargs="+", required=True,
                       help="export folder(s) of `modalseg export` (all folds are ensembled)")
        p.add_argument("--backend", default="onnxruntime", help="onnxruntime (default) | openvino")
    else:
        p.add_argument("--model", nargs="+", required=True,
                       help="checkpoint file(s), fold folder(s) or a run folder (all folds are ensembled), or the "
                            "export folder(s) of `modalseg export`")
        p.add_argument("--backend", default="auto",
                       help="auto (default: torch for checkpoints, onnxruntime for export folders) | torch | "
                            "onnxruntime | openvino (runs and folds are exported to a temporary folder first)")
    p.add_argument("--input", nargs="+", required=True,
                   help="a folder of CASE_0000.nii.gz-style files or of 4D files (one per case, channels = "
                        "modalities); a folder of <modality>.nii.gz files or <modality>/ DICOM series folders (one "
                        "case); a folder of such case folders; a folder of DICOM series; or the files / DICOM folders "
                        "of one case (ordered by the modality names or _NNNN indices in their names, else as given)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--strict-geometry", action="store_true",
                   help="refuse modalities on another grid than the first (default: resample onto it, one line)")
    p.add_argument("--checkpoint", default="best", choices=("best", "latest"),
                   help="best: best.pt by validation (latest.pt where a fold has none); latest: the final weights")
    p.add_argument("--modality", help="unpaired models: which modality the input is")
    p.add_argument("--missing", nargs="+", default=None, metavar="MODALITY",
                   help="paired models trained with modality dropout: modalities the cases do not have (e.g. "
                        "--missing T2W); each is fed as zeros after normalisation, as in training. A model trained "
                        "without modality dropout refuses")
    p.add_argument("--probabilities", action="store_true", help="also write CASE_prob_<class><file ending>")
    # No argparse `type=`/`choices=`: their errors print usage on a second line; `run` checks these (one line).
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (onnxruntime and openvino: cpu)")
    p.add_argument("--precision", default="auto",
                   help="auto | bf16 | fp16 | fp32 (onnxruntime: fp32, the graphs as exported; openvino: fp32 or "
                        "bf16; auto is fp32 for both)")
    p.add_argument("--batch-size", default=8,
                   help="slices per forward pass (default 8: fastest measured on 2 CPU cores at 256x256)")
    p.add_argument("--file-ending", default=None,
                   help="output format: .nii.gz, .nii, .nrrd or .mha (default: the input's format; .nii.gz for DICOM)")
    p.add_argument("--tta", default="none",
                   help="test-time augmentation: none (default) | flip (mean of the 4 in-plane mirrored predictions)")
    p.add_argument("--postprocess", default="auto",
                   help="auto (default: the run's postprocessing.json from `modalseg postprocess --determine`, if "
                        "any) | none | largest-component | min-size=N (voxels), per foreground class")
    p.add_argument("--output-format", default="image",
                   help="image (default): label volumes as --file-ending says; dicom-seg: one DICOM Segmentation per "
                        "case, CASE.dcm, referring to the DICOM series of the first modality (DICOM inputs only; "
                        "needs pip install 'modalseg[dicom]'; --probabilities are still written as images)")


def choose_backend(requested: str, models: Sequence[str | Path]) -> str:
    """The backend ``--backend`` means for these ``--model`` paths (``auto``: torch for checkpoints, onnxruntime
    for export folders); export folders and checkpoints are not mixed, and torch cannot run an export."""
    from modalseg.deploy.card import is_export
    from modalseg.errors import ConfigError

    if requested not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    exports = [is_export(m) for m in models]
    if any(exports) and not all(exports):
        raise ConfigError("--model mixes export folders and checkpoints or runs; give one kind")
    if requested == "auto":
        return "onnxruntime" if all(exports) else "torch"
    if requested == "torch" and all(exports):
        raise ConfigError(f"--backend torch needs checkpoints; {models[0]} is an export folder (ONNX graphs): use "
                          "--backend onnxruntime or openvino")
    return requested


def exported_precision(backend: str, precision: str, device: str) -> str:
    """The precision of an onnxruntime/openvino run (``auto`` = fp32: nothing is measured), refusing what they
    cannot do (one line naming the flag)."""
    from modalseg.errors import ConfigError

    if device not in ("auto", "cpu"):
        raise ConfigError(f"--device {device}: the {backend} backend runs on the CPU (use --device cpu or auto)")
    allowed = ("fp32", "bf16") if backend == "openvino" else ("fp32",)
    chosen = "fp32" if precision == "auto" else precision
    if chosen not in allowed:
        raise ConfigError(f"--precision {precision}: the {backend} backend runs {' or '.join(allowed)}")
    return chosen


def load_exported(
    paths: Sequence[str | Path], backend: str, precision: str, *, which: str, stack: contextlib.ExitStack,
) -> tuple[list[LoadedModel], str]:
    """(models, "onnxruntime fp32 on cpu") for export folders, or for runs/folds/checkpoints exported first into a
    temporary folder that ``stack`` removes when predict ends; every model must describe the same kind of model."""
    import tempfile

    from modalseg.deploy.card import is_export, read_card
    from modalseg.deploy.loader import describe_backend, load_export
    from modalseg.errors import CheckpointError

    models: list[LoadedModel] = []
    label = None
    for k, p in enumerate(paths):
        folder = Path(p)
        exported_now = not is_export(folder)
        if exported_now:
            from modalseg.deploy.export import export_run  # needs torch, as the checkpoint does

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="modalseg-export-")))
            folder = tmp / f"export_{k}"
            export_run(p, folder, which=which, echo=False)
        card = read_card(folder)
        label = label or describe_backend(backend, card, precision)
        loaded = load_export(folder, backend, precision=precision)
        if exported_now:  # name the checkpoints, not the temporary graphs
            base = Path(p) if Path(p).is_dir() else Path(p).parent
            for m, fold in zip(loaded, card.folds(), strict=True):
                m.path = base / fold["checkpoint"]
        models.extend(loaded)
    first = models[0].meta
    for m in models[1:]:
        mine = (m.meta.labels, getattr(m.meta, "regions", None), m.meta.modalities, m.meta.preprocess)
        if mine != (first.labels, getattr(first, "regions", None), first.modalities, first.preprocess):
            raise CheckpointError(f"cannot ensemble: model {m.meta.describe()} differs from {first.describe()}", m.path)
    return models, label or backend


def choose_postprocessing(option: str, models: Sequence[str | Path], meta):  # noqa: ANN001, ANN201
    """The post-processing ``--postprocess`` means (None: none). ``auto`` takes ``postprocessing.json`` of a
    single run folder given as ``--model`` (written by ``modalseg postprocess --determine``)."""
    from modalseg.errors import ConfigError
    from modalseg.inference.postprocess import PostProcessing, load_postprocessing

    regions = getattr(meta, "regions", None) is not None
    if option == "none":
        return None
    if option != "auto":
        if regions:
            raise ConfigError(f"--postprocess {option}: region-based models paint nested regions; connected-component "
                              "post-processing is not defined for them yet")
        return PostProcessing.for_all(option, list(meta.labels.values()))
    if len(models) != 1 or not Path(models[0]).is_dir():
        return None
    found = load_postprocessing(Path(models[0]))
    if found is None or not found.rules or regions:
        return None
    unknown = sorted(set(found.rules) - set(meta.labels.values()))
    if unknown:
        raise ConfigError(f"post-processing for label value(s) {unknown} that the model does not predict",
                          Path(models[0]) / "postprocessing.json")
    return found


def _missing_names(values: Sequence[str] | None) -> list[str]:
    """``--missing T2W FLAIR`` or ``--missing T2W,FLAIR`` as names (empty entries dropped)."""
    return [name.strip() for value in values or () for name in value.split(",") if name.strip()]


def run(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        return _run(args, stack)


def _run(args: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    from modalseg.data.io import is_supported
    from modalseg.errors import ConfigError, OutputError
    from modalseg.training.config import check_option, cli_int
    from modalseg.training.predict import (
        check_outputs_spare_inputs,
        dicom_seg_output_paths,
        find_cases,
        output_ending,
        output_paths,
        predict_case,
        write_dicom_seg_prediction,
        write_prediction,
    )
    from modalseg.utils.atomic import check_output_folder

    # Option values first: one line naming the flag, before any folder is checked or model loaded.
    check_option("device", args.device, label="--device")
    check_option("precision", args.precision, label="--precision")
    args.batch_size = cli_int("--batch-size", args.batch_size, minimum=1)
    from modalseg.inference.tta import TTA_MODES

    if args.tta not in TTA_MODES:
        raise ConfigError(f"--tta must be one of {', '.join(TTA_MODES)}, got {args.tta!r}")
    if args.postprocess not in ("auto", "none"):
        from modalseg.inference.postprocess import parse_operation

        parse_operation(args.postprocess)
    backend = choose_backend(args.backend, args.model)
    exported = None if backend == "torch" else exported_precision(backend, args.precision, args.device)
    if args.output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"--output-format must be {' or '.join(OUTPUT_FORMATS)}, got {args.output_format!r}")
    dicom_seg = args.output_format == "dicom-seg"
    if dicom_seg:
        from modalseg.data import dicom_seg as dseg

        dseg.require_highdicom()  # before any model is loaded
    check_output_folder(args.output)  # fail before loading models or reading any volume
    if args.file_ending is not None and not is_supported(f"x{args.file_ending}"):
        raise OutputError(f"--file-ending {args.file_ending!r} is not a supported output format "
                          "(.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd)")
    if exported is None:
        from modalseg.training.precision import resolve_device, resolve_precision
        from modalseg.training.predict import load_models

        device = resolve_device(args.device)
        requested = None if args.precision == "auto" else resolve_precision(device, args.precision)
        models = load_models(args.model, requested, device=device, batch_size=args.batch_size, which=args.checkpoint)
        precision = models[0].precision
        how, what = f"{precision.label} on {precision.device}", "checkpoint"
    else:
        models, how = load_exported(args.model, backend, exported, which=args.checkpoint, stack=stack)
        what = "graph" if all(m.path.suffix == ".onnx" for m in models) else "checkpoint"
    meta = models[0].meta
    from modalseg.training.model_meta import check_missing

    missing = check_missing(meta, _missing_names(getattr(args, "missing", None)))
    cases = find_cases(args.input, meta, missing=missing)
    out = Path(args.output)
    # Every output name is checked before anything is written: none may replace an input or another case's output.
    endings = {case: output_ending(files, args.file_ending) for case, files in cases.items()}
    classes = list(meta.labels) if args.probabilities else None
    planned = {case: (dicom_seg_output_paths if dicom_seg else output_paths)(out, case, classes, endings[case])
               for case in cases}
    if dicom_seg:  # each case's first input must be a DICOM series that a SEG can refer to; no CASE.dcm beside it
        first = next(m for m in meta.modalities if m not in missing) if meta.kind == "paired" else None
        dseg.check_dicom_seg_inputs(cases, first or args.modality or "image")
        check_outputs_spare_inputs(planned, dseg.series_input_files(cases))
        dseg.check_outside_series_folders(planned, cases)
    else:
        check_outputs_spare_inputs(planned, cases)
    postprocessing = choose_postprocessing(args.postprocess, args.model, meta)
    print(f"{len(models)} model(s) {meta.describe()}, {len(cases)} case(s), {how}"
          + (", test-time flips" if args.tta == "flip" else ""))
    for m in models:
        print(f"  {what} {m.describe()}")
    if postprocessing is not None:
        print(f"  post-processing: {postprocessing.describe()}")
    if missing:
        print(f"  without {', '.join(missing)}: fed as zeros after normalisation, as modality dropout did in "
              "training")
    t_start = time.perf_counter()
    for case, files in cases.items():
        t0 = time.perf_counter()
        labels, probs, ref = predict_case(models, files, modality=args.modality,
                                          strict=args.strict_geometry, case=case,
                                          batch_size=args.batch_size, tta=args.tta, missing=missing)
        if postprocessing is not None:
            labels = postprocessing.apply(labels)
        if dicom_seg:
            written = write_dicom_seg_prediction(out, case, labels, probs if args.probabilities else None, ref,
                                                 files[0], dict(meta.labels), model_name=meta.model,
                                                 file_ending=endings[case])
        else:
            written = write_prediction(out, case, labels, probs if args.probabilities else None, ref,
                                       list(meta.labels), endings[case])
        print(f"{case}: {written[0]} ({time.perf_counter() - t0:.1f} s)")
    total = time.perf_counter() - t_start
    used = ", ".join(sorted({m.path.name for m in models}))
    print(f"done: {len(cases)} case(s) written to {out} in {total:.1f} s ({total / max(len(cases), 1):.1f} s per "
          f"case) with {len(models)} {what}(s) ({used})")
    return 0
