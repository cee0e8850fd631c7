"""Deterministic synthetic datasets (no download): paired breast-like and unpaired cardiac-like."""

from modalseg.data.synth.breast import SynthCase, make_breast_dataset, synth_breast_case
from modalseg.data.synth.cardiac import make_cardiac_dataset, synth_cardiac_case
from modalseg.data.synth.writer import raw_dataset_writer, save_nifti

__all__ = [
    "SynthCase",
    "make_breast_dataset",
    "make_cardiac_dataset",
    "raw_dataset_writer",
    "save_nifti",
    "synth_breast_case",
    "synth_cardiac_case",
]
