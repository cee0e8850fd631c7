"""Deterministic synthetic datasets (no download): paired breast-like and unpaired cardiac-like.

The slice generators (``make_breast_dataset``, ``make_cardiac_dataset``: a few thick slices, shapes per slice)
and the 3D generators (``make_breast_dataset_3d``, ``make_cardiac_dataset_3d``: shapes in physical space,
isotropic or thick-slice grids; docs/3d.md) share their appearance models and never each other's random streams.
"""

from modalseg.data.synth.breast import SynthCase, make_breast_dataset, synth_breast_case
from modalseg.data.synth.breast3d import make_breast_dataset_3d, synth_breast_case_3d
from modalseg.data.synth.cardiac import make_cardiac_dataset, synth_cardiac_case
from modalseg.data.synth.cardiac3d import make_cardiac_dataset_3d, synth_cardiac_case_3d
from modalseg.data.synth.writer import raw_dataset_writer, save_nifti

__all__ = [
    "SynthCase",
    "make_breast_dataset",
    "make_breast_dataset_3d",
    "make_cardiac_dataset",
    "make_cardiac_dataset_3d",
    "raw_dataset_writer",
    "save_nifti",
    "synth_breast_case",
    "synth_breast_case_3d",
    "synth_cardiac_case",
    "synth_cardiac_case_3d",
]
