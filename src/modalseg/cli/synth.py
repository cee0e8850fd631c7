"""``modalseg synth``: write a built-in synthetic dataset (no download) in the nnU-Net raw layout.

``synth cardiac --patients-ct 20 --patients-mr 5 --modality-gap 0.5`` gives the modalities unequal subject counts
and a smaller contrast difference (the setting where joint learning can help the short modality); without those
options the files are byte-identical to earlier versions.

``--dims 3`` writes the 3D datasets (SynthBreast3D, SynthCardiac3D; docs/3d.md): shapes drawn in physical space,
lesions and heart structures spanning several slices, isotropic voxels unless ``--slice-thickness`` is given
(e.g. ``--slice-thickness 6.5`` for thick-slice data). Without ``--dims`` (or with ``--dims 2``) nothing changes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HELP = "Write a deterministic synthetic dataset: paired breast-like (paper 1) or unpaired cardiac (paper 2)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "kind",
        choices=["breast", "cardiac"],
        help="breast: paired T1C+T2W masses; cardiac: unpaired CT/MR with LV, Myo, RV",
    )
    parser.add_argument("--output", "-o", required=True, type=Path, help="dataset folder to create")
    parser.add_argument(
        "--patients",
        type=int,
        default=None,
        help="patients (breast, default 12) or subjects per modality (cardiac, default 8)",
    )
    for mod in ("CT", "MR"):
        parser.add_argument(
            f"--patients-{mod.lower()}",
            type=int,
            default=None,
            help=f"cardiac: {mod} subjects, overriding --patients for {mod} (e.g. --patients-ct 20 "
            "--patients-mr 5: one modality short of labels, where joint learning can matter)",
        )
    parser.add_argument(
        "--modality-gap",
        type=float,
        default=1.0,
        help="cardiac: 0-1, how far MR's tissue contrast is from CT's (1 = bSSFP-like MR, the default; "
        "0 = CT's contrast in MR units, MR's texture, bias field and noise kept)",
    )
    parser.add_argument(
        "--dims",
        type=int,
        choices=[2, 3],
        default=2,
        help="2: a few thick slices per case, shapes per slice (the default, paper 1 and 2's 2D setting); "
        "3: 3D volumes whose lesions and structures span several slices (docs/3d.md)",
    )
    parser.add_argument(
        "--slices",
        type=int,
        default=None,
        help="slices per volume (default 6; with --dims 3 enough to cover the anatomy at the spacing)",
    )
    parser.add_argument(
        "--size", type=int, default=None, help="in-plane size in pixels (default 128; 64 with --dims 3)"
    )
    parser.add_argument(
        "--slice-thickness",
        type=float,
        default=None,
        metavar="MM",
        help="--dims 3: slice thickness in mm (default: the in-plane spacing, isotropic voxels); e.g. 6.5",
    )
    parser.add_argument(
        "--in-plane",
        type=float,
        default=None,
        metavar="MM",
        help="--dims 3: in-plane pixel size in mm (default 0.7 breast; 0.75 CT and 1.4 MR cardiac)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed; equal seeds give identical files")
    parser.add_argument(
        "--difficulty",
        type=float,
        default=1.0,
        help="0-3: scales noise, distractors and (breast) mass conspicuity (default 1)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing dataset folder (only once the new one is complete)",
    )


def run(args: argparse.Namespace) -> int:
    from modalseg.data.synth import (
        make_breast_dataset,
        make_breast_dataset_3d,
        make_cardiac_dataset,
        make_cardiac_dataset_3d,
    )
    from modalseg.errors import ConfigError

    if args.dims == 2 and (args.slice_thickness is not None or args.in_plane is not None):
        raise ConfigError("--slice-thickness and --in-plane are options of `synth --dims 3`")
    if args.size is None:
        args.size = 128 if args.dims == 2 else 64
    if args.slices is None and args.dims == 2:
        args.slices = 6
    common = dict(
        slices=args.slices,
        size=args.size,
        seed=args.seed,
        difficulty=args.difficulty,
        overwrite=args.overwrite,
    )
    if args.dims == 3:
        common["slice_thickness_mm"] = args.slice_thickness
        if args.in_plane is not None:
            common["in_plane_mm"] = args.in_plane
    start = time.perf_counter()
    if args.kind == "breast" and (
        args.patients_ct is not None or args.patients_mr is not None or args.modality_gap != 1.0
    ):
        raise ConfigError("--patients-ct, --patients-mr and --modality-gap are options of `synth cardiac`")
    if args.kind == "breast":
        kw = {} if args.patients is None else {"num_patients": args.patients}
        make = make_breast_dataset if args.dims == 2 else make_breast_dataset_3d
        out = make(args.output, **kw, **common)
    else:
        kw = {} if args.patients is None else {"num_patients_per_modality": args.patients}
        per_mod = {m: n for m, n in (("CT", args.patients_ct), ("MR", args.patients_mr)) if n is not None}
        make = make_cardiac_dataset if args.dims == 2 else make_cardiac_dataset_3d
        out = make(args.output, **kw, patients_per_modality=per_mod, modality_gap=args.modality_gap, **common)
    meta = json.loads((out / "dataset.json").read_text())
    n_images = len(list((out / "imagesTr").glob("*.nii.gz")))
    n_labels = len(list((out / "labelsTr").glob("*.nii.gz")))
    if meta.get("paired", True):
        what = f"{meta['numTraining']} paired cases, channels {', '.join(meta['channel_names'].values())}"
    else:
        counts = {m: sum(v == m for v in meta["case_modality"].values()) for m in meta["modalities"]}
        what = "unpaired cases: " + ", ".join(f"{c} {m}" for m, c in counts.items())
    if args.dims == 2:
        grid = f"{args.size}x{args.size}x{args.slices} voxels"
    else:
        synth = meta["modalseg_synth"]
        grids = synth.get("grids") or {"": {"slices": synth["slices"], "spacing": synth["spacing"]}}
        grid = "; ".join(
            f"{(m + ' ') if m else ''}{args.size}x{args.size}x{g['slices']} voxels of "
            f"{'x'.join(f'{s:g}' for s in g['spacing'])} mm"
            for m, g in grids.items()
        )
    print(
        f"wrote {meta['name']} to {out}: {what}; {n_images} images, {n_labels} labels, "
        f"{grid}, labels {meta['labels']}, seed {args.seed} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0
