"""Applying trained models: backends (how a network runs) x inferers (how a volume is cut into network inputs)
x the checkpoint's preprocessing (how a file's voxels become network inputs and back).

* :mod:`~modalseg.inference.backends`: ``TorchBackend`` (any ``nn.Module`` under a ``Precision``); other
  runtimes (ONNX Runtime, OpenVINO) implement the same small contract.
* :mod:`~modalseg.inference.inferers`: ``SliceInferer`` (2D networks, slice batches bounded by pixels).
* :mod:`~modalseg.inference.predictor`: ``Predictor`` -- the in-memory API ``predict(volumes)`` that the
  ``modalseg predict`` command, evaluation and integrators (3D Slicer, MONAI Deploy) call.
"""

from modalseg.inference.backends import Backend, TorchBackend
from modalseg.inference.inferers import SliceInferer, ensemble_probabilities, predict_probabilities

__all__ = ["Backend", "SliceInferer", "TorchBackend", "ensemble_probabilities", "predict_probabilities"]
