"""One writer per run folder: an exclusive ``flock`` on ``<run>/.modalseg.lock``.

Two ``train`` processes on one output would overwrite each other's checkpoints and logs and both exit 0. The
lock is an advisory ``fcntl.flock``: the kernel releases it when its process ends, however it ends (SIGKILL
included), so a lock file left by a dead process is never mistaken for a live one. The file records the
holder's host and pid for the message the second process prints, and is removed on release.

Not covered: network file systems whose ``flock`` is local to each client (some NFS set-ups).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from modalseg.errors import OutputError

LOCK_NAME = ".modalseg.lock"


class RunLock:
    """``with RunLock(folder):`` holds the folder's lock or raises :class:`OutputError` naming the holder."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputError(
                    f"another modalseg process ({holder}) is writing this run folder; wait for it to finish "
                    "or choose another --output", self.path.parent) from None
            # The holder we waited on may have removed the file between our open and our lock: then we hold a
            # lock on a deleted inode, which excludes nobody. Retry on the file that is there now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding the lock, so nobody can be waiting on this inode's lock
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "unknown pid"
