"""Entry point of the ``modalseg`` command.

Each sub-command lives in ``modalseg/cli/<name>.py`` and exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. User-facing errors (:class:`ModalsegError`) are
printed as one line on stderr with a non-zero exit; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import NoReturn

from modalseg import __version__
from modalseg.errors import ModalsegError
from modalseg.utils.host_memory import keep_freed_memory

COMMANDS = ["synth", "verify", "train", "evaluate", "predict", "postprocess", "export", "experiment", "demo"]


class OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage and the error on two or more lines; modalseg's rule is one line on stderr
    (``modalseg train: error: argument --runs: invalid int value: 'abc'``) and exit 2. Sub-parsers inherit this
    class, so every command and experiment option follows the rule; ``--help`` still prints the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="modalseg",
        description="Multi-modal medical image segmentation: paired fusion and unpaired learning.",
    )
    parser.add_argument("--version", action="version", version=f"modalseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"modalseg.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"modalseg.cli.{name}":
                continue
            raise
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Faster CPU training and prediction: keep freed tensor buffers in the heap (utils/host_memory.py).
    keep_freed_memory()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    return run_guarded(lambda: args._run(args), f"modalseg {args.command}")


def run_guarded(run: Callable[[], int | None], prog: str) -> int:
    """Run a command: a :class:`ModalsegError` is one line ``<prog>: error: ...`` on stderr and its exit code, an
    interrupt exit 130, a closed pipe exit 141 without a traceback (also used by the torch-free runtime)."""
    try:
        return int(run() or 0)
    except BrokenPipeError:
        # `modalseg ... | head`: the reader left. Python's advice: point stdout at devnull so that the flush at
        # exit does not raise again, and exit quietly (as other command-line tools do).
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the signal
    except ModalsegError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130

if __name__ == "__main__":
    sys.exit(main())
