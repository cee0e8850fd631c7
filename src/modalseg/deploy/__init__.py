"""Deployment: trained models exported to ONNX with a JSON model card, and a runtime that needs no PyTorch.

* :mod:`~modalseg.deploy.export` (needs torch): ``modalseg export``, one graph per fold (and per modality for
  unpaired networks) computing softmax probabilities, plus ``model.json``;
* :mod:`~modalseg.deploy.card`: the model card (what a graph expects and how its output becomes labels);
* :mod:`~modalseg.deploy.onnx_backend` / :mod:`~modalseg.deploy.openvino_backend`: inference backends for
  ONNX Runtime and OpenVINO (the :class:`~modalseg.inference.backends.Backend` contract);
* :mod:`~modalseg.deploy.runtime`: loads an export folder as models for :class:`~modalseg.inference.Predictor`
  and runs ``modalseg predict``'s file layer on it (``python -m modalseg.deploy.runtime``), torch-free;
* :mod:`~modalseg.deploy.quantize`: optional int8 post-training quantization (ONNX Runtime, static, QDQ).

Only the export module imports torch; this package's ``__init__`` imports nothing.
"""
