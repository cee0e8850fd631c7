"""Keep freed tensor memory in the process heap instead of handing it back to the kernel (glibc ``mallopt``).

Why: PyTorch's CPU allocator is plain ``malloc``/``free``. glibc serves every request above its mmap threshold
(dynamic, at most 32 MiB) with a fresh ``mmap`` and returns it with ``munmap`` on free. A 256x256 U-Net
step allocates and frees activation buffers of 8-128 MiB dozens of times, so every step page-faults (and
the kernel zeroes) hundreds of MiB again: on our 2-core CI machine 20-40 % of a bf16 training step and of a
``modalseg predict`` run was kernel time (``/usr/bin/time`` "sys"). Raising the mmap and trim thresholds
makes ``free`` keep those buffers in the heap, where the next step reuses them: measured 1.2-1.4x faster
bf16 training and prediction (``benchmarks/allocator.py``, figures in docs/benchmarks.md).

Cost: the process keeps its peak heap (freed memory is not returned to the OS until exit), i.e. the
resident set stays near its high-water mark instead of dropping between steps; the peak itself barely
changes (+10 % measured in training).

This is what ``LD_PRELOAD``-ing jemalloc/tcmalloc achieves in Intel's PyTorch guides, without an extra
library. It is process-wide and applied by the ``modalseg`` command (train, evaluate, predict, experiment,
demo); Python-API users call :func:`keep_freed_memory` themselves. Set ``MODALSEG_MALLOC=default`` to opt out.
On non-glibc systems (macOS, musl, Windows) it does nothing and returns ``False``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

#: ``mallopt`` parameter numbers from glibc's ``<malloc.h>``.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks below this size are served from (and kept in) the heap: 1 GiB covers every activation of a
#: 512x512 batch-4 paper-1 step; larger blocks are still mmap'ed and returned at once.
DEFAULT_THRESHOLD_BYTES = 1 << 30

ENV_VAR = "MODALSEG_MALLOC"

__all__ = ["DEFAULT_THRESHOLD_BYTES", "ENV_VAR", "keep_freed_memory"]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None  # musl or another libc: mallopt is absent or means something else
    return libc


def keep_freed_memory(threshold_bytes: int = DEFAULT_THRESHOLD_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold_bytes``; ``True`` if both were applied.

    Does nothing (``False``) without glibc or when the environment variable ``MODALSEG_MALLOC`` is
    ``default``. Safe to call more than once.
    """
    if os.environ.get(ENV_VAR, "").strip().lower() == "default":
        return False
    libc = _glibc()
    if libc is None:
        return False
    value = ctypes.c_int(min(int(threshold_bytes), 2**31 - 1))
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, value) == 1
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, value) == 1
    return mmap_ok and trim_ok
