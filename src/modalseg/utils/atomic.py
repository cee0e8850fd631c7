"""Atomic file writes: write to a temporary file in the target folder, fsync, then ``os.replace``.

A crash, a kill or a full disk while writing leaves the previous file intact and no partial file behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from modalseg.errors import OutputError


def _folder_error(folder: Path, exc: OSError | None = None) -> OutputError:
    """A one-line reason why ``folder`` cannot be (or become) a writable folder."""
    existing = folder
    for candidate in (folder, *folder.parents):
        if candidate.exists() or candidate.is_symlink():
            if not candidate.is_dir():
                what = "exists and is not a folder" if candidate == folder else f"{candidate} is a file, not a folder"
                return OutputError(f"cannot use as output folder ({what})", folder)
            existing = candidate
            break
    reason = (exc.strerror or str(exc)) if exc is not None else f"no write permission in {existing}"
    return OutputError(f"cannot create or write the folder ({reason})", folder)


def check_output_folder(folder: str | Path) -> None:
    """Fail early (before any work) if ``folder`` cannot be an output folder; creates nothing.

    Catches an output path that is a file or lies under a file, and a missing write permission on the nearest
    existing ancestor (``os.access``; note that root passes any permission check).
    """
    folder = Path(folder)
    for candidate in (folder, *folder.parents):
        if candidate.exists() or candidate.is_symlink():
            if not candidate.is_dir() or not os.access(candidate, os.W_OK | os.X_OK):
                raise _folder_error(folder)
            return


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically.

    ``suffix`` defaults to the target's own suffixes (so writers that infer the format from the
    extension, such as nibabel and SimpleITK, still work).
    """
    target = Path(target)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _folder_error(parent, exc) from None
    if suffix is None:
        suffix = "".join(target.suffixes) or ".tmp"
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot write ({exc.strerror or exc})", target) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write ({exc.strerror or exc})", target) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(target: str | Path, writer: Callable[[IO[bytes]], None]) -> None:
    """Call ``writer(fh)`` on a binary file handle, then atomically move the result to ``target``."""
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        writer(fh)
        fh.flush()


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    atomic_write(target, lambda fh: fh.write(data))


def atomic_write_text(target: str | Path, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_torch_save(obj: object, target: str | Path) -> None:
    """``torch.save`` through a temporary file; the previous checkpoint survives any failure."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(target, buf.getvalue())
