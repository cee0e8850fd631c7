"""The in-memory prediction API: trained model(s) + their preprocessing, applied to volumes.

``Predictor.from_checkpoints(paths)`` reads checkpoints (the one reader, training/checkpoint.py), rebuilds the
networks, folds BN for inference and wraps each in a backend; ``predict(volumes)`` returns the label volume
and the class probabilities on the first volume's grid and voxel order, whatever the inputs' orientation.
The steps are the checkpoint's deterministic transforms, each inverted on the way back:

1. assistant modalities onto the first volume's grid (data/geometry.py ``onto_grid``; refused if ``strict``);
2. the checkpoint's invertible transforms (data/transforms.py, built by ``preprocessing_pipeline``): canonical
   (closest to RAS) voxel order as in training, normalisation, slices, crop box, resize;
3. the model's inferer over every backend (batched slices in 2D, slices with their neighbours in 2.5D,
   Gaussian-weighted sliding windows in 3D: ``inferer_for``), probabilities averaged over models (fold ensembling);
   With ``missing`` modalities (a model trained with modality dropout, ``meta.modality_dropout``), the given
   volumes are the modalities present and each missing channel is filled with 0 after normalisation, exactly
   as training dropped it (data/augment.py ``ModalityDropout``); the first volume given is the reference grid;
4. back: ``invert`` of the recorded trace (un-resize, un-crop, the inverse reorientation), argmax to the file's
   label values; a region-based model (``meta.regions``: sigmoid per region, nnU-Net's ``regions_class_order``)
   instead paints each region where its probability > 0.5 with its value, in order, onto background 0.

The ``modalseg predict`` command is a thin layer over this (file discovery, output naming, writing); 3D Slicer
or MONAI Deploy integrations call :meth:`Predictor.predict` or :meth:`Predictor.predict_arrays` directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from modalseg.data.geometry import geometry_problems, onto_grid
from modalseg.data.io import read_volume, strip_extension
from modalseg.data.preprocess import PreprocessConfig, preprocessing_pipeline
from modalseg.data.transforms import Sample, invert
from modalseg.data.types import Volume, paint_regions
from modalseg.data.verify import intensity_problems
from modalseg.errors import CheckpointError, DataError
from modalseg.inference.backends import Backend, TorchBackend
from modalseg.inference.inferers import Inferer, ensemble_probabilities, inferer_for
from modalseg.training.model_meta import ModelMeta, check_missing

if TYPE_CHECKING:  # torch is imported where a torch model is loaded: exported models run without it
    import torch

    from modalseg.training.checkpoint import TrainedCheckpoint
    from modalseg.training.precision import Precision

__all__ = ["LoadedModel", "Prediction", "Predictor", "load_models"]


@dataclass
class LoadedModel:
    """One trained network ready for inference: its backend, description and where it came from."""

    backend: Backend
    meta: ModelMeta
    path: Path
    precision: Precision | None = None
    #: epochs completed when the checkpoint was written, and the best validation score so far (if recorded)
    epoch: int | None = None
    best_score: float | None = None

    @property
    def network(self) -> torch.nn.Module:
        """The torch module behind a :class:`TorchBackend` (other backends have none)."""
        network = getattr(self.backend, "network", None)
        if network is None:
            raise AttributeError(f"the {type(self.backend).__name__} of {self.path} has no torch network")
        return network

    def describe(self) -> str:
        """``runs/x/fold_0/best.pt (epoch 12, best validation Dice 0.8123)``: what predict says it loads."""
        facts = [f"epoch {self.epoch}" if self.epoch is not None else "epoch unknown"]
        if self.best_score is not None and np.isfinite(self.best_score):
            facts.append(f"best validation Dice {self.best_score:.4f}")
        return f"{self.path} ({', '.join(facts)})"


def _choose_inference_precision(
    network: torch.nn.Module, meta: ModelMeta, device: str | torch.device, batch_size: int
) -> Precision:
    """``--precision auto``: the fastest measured mode for this network at its input size (one printed line)."""
    import torch

    from modalseg.training.precision_probe import choose_precision

    pp = meta.preprocess
    size = pp.get("target_size") or pp.get("crop_size") or [256, 256]
    channels = meta.in_channels * (len(meta.modalities) if meta.kind == "paired" else 1)
    kwargs = None if meta.kind == "paired" else {"modality": 0}
    chosen, line = choose_precision(network, (batch_size, channels, int(size[0]), int(size[1])),
                                    torch.device(device),
                                    "infer", model_name=meta.model, forward_kwargs=kwargs)
    print(line, flush=True)
    return chosen


def load_torch_model(
    checkpoint: TrainedCheckpoint, precision: Precision | None, *, device: str | torch.device = "cpu",
    batch_size: int = 8,
) -> LoadedModel:
    """The checkpoint's network with BN folded into its convolutions, prepared for ``precision`` (``None``:
    measured now, see :func:`load_models`), in a :class:`TorchBackend`."""
    from modalseg.models.fold import fold_batch_norm

    network = checkpoint.build_network()
    fold_batch_norm(network)  # inference only: conv + eval-mode BN = one conv (models/fold.py)
    if precision is None:
        precision = _choose_inference_precision(network, checkpoint.meta, device, batch_size)
    network = precision.prepare_model(network).eval()
    backend = TorchBackend(network, precision, activation=checkpoint.meta.activation)
    return LoadedModel(backend, checkpoint.meta, checkpoint.path, precision, checkpoint.epoch, checkpoint.best_score)


def load_models(
    paths: Sequence[str | Path], precision: Precision | None, *, device: str | torch.device = "cpu",
    batch_size: int = 8, which: str = "best",
) -> list[LoadedModel]:
    """Load every checkpoint found under ``paths`` (files, fold or run folders); all must describe the same
    kind of model.

    ``precision=None`` means ``auto``: the modes are timed on the first network as it will run (weights
    loaded, BN folded) on a batch of ``batch_size`` slices of its input size (training/precision_probe.py), the
    choice is printed in one line and used for every model (``models[0].precision``).
    """
    from modalseg.training.checkpoint import find_checkpoints, read_checkpoint

    models: list[LoadedModel] = []
    for p in paths:
        for ckpt in find_checkpoints(p, which):
            model = load_torch_model(read_checkpoint(ckpt), precision, device=device, batch_size=batch_size)
            precision = model.precision
            models.append(model)
    first = models[0].meta
    for m in models[1:]:
        if (m.meta.labels, m.meta.regions, m.meta.modalities, m.meta.preprocess) != (
                first.labels, first.regions, first.modalities, first.preprocess):
            raise CheckpointError(f"cannot ensemble: model {m.meta.describe()} differs from {first.describe()}", m.path)
    return models


@dataclass(frozen=True)
class Prediction:
    """A case's result on the reference (first) volume's grid and voxel order."""

    labels: np.ndarray  # label values of the training data (not class indices); never the ignore label
    #: (C, X, Y, Z) float32 in ``meta.labels`` order: softmax per class, or sigmoid per region (region models)
    probabilities: np.ndarray
    reference: Volume


def _check_inputs(volumes: Sequence[Volume], names: Sequence[str], tol: float = 1e-3, *, strict: bool = False) -> None:
    """Refuse what ``modalseg verify`` refuses: NaN/inf or constant images and, with ``strict``, modalities whose
    shape, spacing (relative ``tol``) or orientation (direction cosines, absolute ``tol``) differ from the first
    (without ``strict`` the predictor puts them on the first one's grid instead)."""
    ref = volumes[0]
    for i, v in enumerate(volumes):
        problems = intensity_problems(v)
        if i and strict:
            name = names[i] if i < len(names) else f"modality {i}"
            problems = geometry_problems(v, ref, name, names[0], spacing_tol=tol, direction_tol=tol) + problems
        if problems:
            raise DataError(problems[0])


class Predictor:
    """Model(s) of one kind + their preprocessing -> labels and probabilities for a case's volumes."""

    def __init__(self, models: Sequence[LoadedModel], *, inferer: Inferer | None = None) -> None:
        if not models:
            raise CheckpointError("no model to predict with")
        self.models = list(models)
        self.meta = self.models[0].meta
        layouts = {(m.meta.spatial_dims, tuple(m.meta.patch_size or ()), m.meta.context_slices) for m in self.models}
        if len(layouts) > 1:
            raise CheckpointError("the models to ensemble differ in layout (2D / 2.5D / 3D or the 3D window): "
                                  f"{sorted(layouts)}; ensemble models of one configuration")
        self.inferer = inferer or inferer_for(self.meta)

    @classmethod
    def from_checkpoints(
        cls, paths: Sequence[str | Path], *, precision: Precision | None = None, device: str | torch.device = "cpu",
        batch_size: int = 8, which: str = "best",
    ) -> Predictor:
        """Checkpoint files, fold folders or run folders (every fold: an ensemble). ``precision=None``: measured."""
        models = load_models(paths, precision, device=device, batch_size=batch_size, which=which)
        return cls(models, inferer=inferer_for(models[0].meta, batch_size))

    @property
    def precision(self) -> Precision | None:
        return self.models[0].precision

    def input_names(self, modality: str | None = None, missing: Sequence[str] | None = None, *,
                    trained_only: bool = True) -> list[str]:
        """The modalities :meth:`predict` expects, in order (paired: the model's channels but ``missing``;
        unpaired: one)."""
        if self.meta.kind == "paired":
            absent = check_missing(self.meta, missing, trained_only=trained_only)
            return [m for m in self.meta.modalities if m not in absent]
        check_missing(self.meta, missing)  # refuses: unpaired models read one modality
        return [self.choose_modality(modality)]

    def choose_modality(self, modality: str | None, path: Path | None = None) -> str:
        """The unpaired model's branch for ``modality`` (required when the model has several)."""
        meta = self.meta
        if modality is None:
            if len(meta.modalities) > 1:
                raise DataError(f"this unpaired model has modalities {meta.modalities}: choose one with --modality",
                                path)
            return meta.modalities[0]
        if modality not in meta.modalities:
            raise DataError(f"modality {modality!r} is not one of the model's {meta.modalities}", path)
        return modality

    def predict_files(
        self, files: Sequence[str | Path], *, modality: str | None = None, strict: bool = False,
        case: str | None = None, missing: Sequence[str] | None = None,
    ) -> Prediction:
        """Read one file (or DICOM series folder) per modality, in the model's order, and :meth:`predict`."""
        paths = [f if isinstance(f, Path) else Path(f) for f in files]  # an ImageRef keeps its series/channel
        if case is None:
            case = strip_extension(paths[0].name)
        return self.predict([read_volume(f) for f in paths], modality=modality, strict=strict, case=case,
                            missing=missing)

    def predict_arrays(
        self, arrays: Sequence[np.ndarray], *, affine: np.ndarray | None = None, modality: str | None = None,
        missing: Sequence[str] | None = None,
    ) -> Prediction:
        """In-memory volumes (X, Y, Z) on one grid ``affine`` (voxel -> RAS mm; identity = 1 mm voxels)."""
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
        return self.predict([Volume(np.asarray(a), affine) for a in arrays], modality=modality, missing=missing)

    def predict(
        self, volumes: Sequence[Volume], *, modality: str | None = None, strict: bool = False,
        case: str | None = None, missing: Sequence[str] | None = None, trained_only: bool = True,
    ) -> Prediction:
        """Labels and probabilities for one case: ``volumes`` in the order of :meth:`input_names`.

        Assistant modalities are put on the first volume's grid (one printed line each, naming ``case``;
        ``strict`` refuses instead); NaN/inf or constant images and non-finite probabilities are refused.
        ``missing``: modalities not given (a model trained with modality dropout only; others refuse in one
        line), each fed as a channel of zeros after normalisation, as training dropped it. ``trained_only=False``
        feeds the zeros to a model not trained for them too (a measurement: the robustness table; never predict).
        """
        meta = self.meta
        first_path = volumes[0].path if volumes and volumes[0].path is not None else None
        absent = check_missing(meta, missing, trained_only=trained_only)
        names = (self.input_names(modality, absent, trained_only=trained_only) if meta.kind == "paired"
                 else [modality or "image"])
        if absent and len(volumes) != len(names):
            raise DataError(f"{len(volumes)} volume(s) given for the {len(names)} modalities present "
                            f"({', '.join(names)}; missing {', '.join(absent)})", first_path)
        _check_inputs(volumes, names, strict=strict)
        aligned = [volumes[0]]
        for i, vol in enumerate(volumes[1:], start=1):
            name = names[i] if i < len(names) else f"modality {i}"
            vol, note = onto_grid(vol, volumes[0], name=name, ref_name=names[0], strict=strict, case=case)
            if note:
                print(note, flush=True)
            aligned.append(vol)
        pp = PreprocessConfig.from_dict(meta.preprocess)
        if meta.kind == "paired":
            channel_names = meta.channel_names or meta.modalities
            channels: list[int] | None = [channel_names.index(m) for m in names]
            branch = None
        else:
            chosen = self.choose_modality(modality, first_path)
            branch = meta.modalities.index(chosen)
            # the modality's place in a per-modality normalisation list, as the training cache used it
            channels = [(meta.channel_names or meta.modalities).index(chosen)]
        # the checkpoint's deterministic transforms (canonical order, normalise, slices, crop, resize), recorded
        # in the sample's trace so that one invert() returns to the first volume's grid and voxel order
        stacked = np.stack([v.array for v in aligned], axis=0)
        pipeline = preprocessing_pipeline(pp, len(stacked), channels=channels, all_slices=True, canonical=True)
        sample = pipeline(Sample(stacked, None, affine=volumes[0].affine, path=volumes[0].path))
        image = sample.image
        if absent:  # the model's channels, a missing one 0 after normalisation: training's dropout fill
            image = np.zeros((len(meta.modalities), *image.shape[1:]), dtype=np.float32)
            image[[meta.modalities.index(m) for m in names]] = sample.image
        batch = np.ascontiguousarray(np.moveaxis(image, 1, 0))  # (slices, C, H, W)
        probs = ensemble_probabilities([self.inferer(m.backend, batch, branch) for m in self.models])
        if not np.isfinite(probs).all():
            raise DataError(
                f"the model produced {int((~np.isfinite(probs)).sum())} non-finite (NaN/inf) probabilities for this "
                "case; nothing was written", first_path)
        if meta.regions is not None:  # sigmoid per region, 0 outside what was predicted; painted in order
            restored = invert(np.moveaxis(probs, 1, 0), sample.trace, "region_probabilities")
            labels = paint_regions(restored, list(meta.labels.values()), axis=0)
            return Prediction(labels, restored.astype(np.float32), volumes[0])
        restored = invert(np.moveaxis(probs, 1, 0), sample.trace, "probabilities")
        values = np.asarray(list(meta.labels.values()))
        return Prediction(values[restored.argmax(axis=0)], restored.astype(np.float32), volumes[0])
