"""Run exported models without PyTorch: ``python -m modalseg.deploy.runtime --model EXPORT --input IN --output OUT``.

An export folder (``modalseg export``) becomes models for :class:`modalseg.inference.Predictor`, each fold's graph(s)
in an ONNX Runtime or OpenVINO backend (:func:`modalseg.deploy.loader.load_export`); everything else is ``modalseg
predict``'s own code: which files form a case, the checkpoint's preprocessing and its inverse, the geometry, output
names and writing.
The command takes ``modalseg predict``'s options (``--backend onnxruntime`` by default) and writes the same files.

What this imports: NumPy, modalseg's data and file layers, nibabel / SimpleITK (image files) and onnxruntime or
openvino; never torch (tests/test_runtime_torch_free.py runs it with torch made unimportable).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from modalseg.deploy.card import is_export, read_card
from modalseg.deploy.loader import RUNTIME_BACKENDS, load_export

__all__ = ["RUNTIME_BACKENDS", "load_export", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``modalseg predict`` for export folders, without torch: same options, outputs and one-line errors."""
    from modalseg.cli import predict as predict_cli
    from modalseg.cli.main import OneLineParser, run_guarded

    parser = OneLineParser(prog="python -m modalseg.deploy.runtime",
                           description="segment volumes with an exported model (ONNX Runtime or OpenVINO, no "
                                       "PyTorch); the options and outputs of `modalseg predict`")
    predict_cli.add_arguments(parser, runtime=True)
    args = parser.parse_args(argv)

    def run() -> int:
        for m in args.model:
            if not is_export(m):
                read_card(m)  # the one-line reason: not an export folder, unreadable card, ...
        return int(predict_cli.run(args) or 0)

    return run_guarded(run, parser.prog)


if __name__ == "__main__":
    sys.exit(main())
