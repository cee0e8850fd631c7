"""Atomic file writes: write to a temporary file in the target folder, fsync, then ``os.replace``.

A crash, a kill or a full disk while writing leaves the previous file intact and no partial file behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
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


#: Temporary files are ``.ms-tmp-<host>-<pid>-<random><ext>``: short (a 245-byte output name must still fit in
#: 255 bytes), and they name their writer, so that temporaries of a killed process can be recognised and removed.
TMP_PREFIX = ".ms-tmp-"
_COMPOUND_EXTENSIONS = (".nii.gz", ".tar.gz")
_swept: set[Path] = set()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"


def _temp_suffix(target: Path) -> str:
    """The target's format extension (writers such as nibabel and SimpleITK infer the format from it)."""
    name = target.name.lower()
    for ext in _COMPOUND_EXTENSIONS:
        if name.endswith(ext):
            return target.name[-len(ext):]
    suffix = target.suffix
    return suffix if 0 < len(suffix) <= 16 else ".tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove temporaries that killed writers on this host left in ``folder`` (their process is gone)."""
    folder = Path(folder)
    removed: list[Path] = []
    host = _host()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(TMP_PREFIX):
            continue
        parts = entry.name[len(TMP_PREFIX):].split("-")
        if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                import shutil

                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (other threads may be creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a new file under the process umask (``mkstemp`` alone would give 0600)."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """Permissions of a new folder under the process umask (``mkdtemp`` alone would give 0700)."""
    return 0o777 & ~_umask()


def make_temp_file(parent: Path, suffix: str) -> Path:
    """A new empty temporary file in ``parent`` with the umask's permissions, named by :data:`TMP_PREFIX`."""
    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{_host()}-{os.getpid()}-", suffix=suffix, dir=parent)
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    return Path(name)


def make_temp_folder(parent: Path, prefix: str = TMP_PREFIX) -> Path:
    """A new temporary folder in ``parent`` with the umask's permissions (named after this host and process)."""
    name = tempfile.mkdtemp(prefix=f"{prefix}{_host()}-{os.getpid()}-", dir=parent)
    os.chmod(name, folder_mode())
    return Path(name)


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically.

    ``suffix`` defaults to the target's format extension (so writers that infer the format from the
    extension, such as nibabel and SimpleITK, still work). The first write into a folder removes the
    temporaries that killed processes of this host left there.
    """
    target = Path(target)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _folder_error(parent, exc) from None
    if parent not in _swept:
        _swept.add(parent)
        remove_stale_temporaries(parent)
    try:
        tmp = make_temp_file(parent, suffix if suffix is not None else _temp_suffix(target))
    except OSError as exc:
        raise OutputError(f"cannot write ({exc.strerror or exc})", target) from None
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
