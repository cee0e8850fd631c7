"""utils/host_memory.py: freed tensor memory stays in the heap (glibc), the opt-out, and the CLI applying it.

Each check runs in a fresh interpreter: the setting is process-wide and must not leak into other tests.
``mallinfo2`` (glibc >= 2.33) reports ``hblkhd`` (bytes in mmap'ed blocks) and ``fordblks`` (free bytes kept
in the heap), which is exactly what the setting changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from modalseg.utils.host_memory import _glibc

pytestmark = pytest.mark.skipif(
    _glibc() is None or not hasattr(_glibc(), "mallinfo2"), reason="needs glibc >= 2.33 (mallinfo2)"
)

PROBE = r"""
import ctypes, json, sys
import torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = None
if sys.argv[1] == "api":
    from modalseg.utils.host_memory import keep_freed_memory
    applied = keep_freed_memory()
elif sys.argv[1] == "cli":
    from modalseg.cli.main import main
    main([])  # prints the help; the setting is applied before parsing
size = 64 << 20
t = torch.empty(size, dtype=torch.uint8)
t.fill_(1)
during = libc.mallinfo2()
del t
after = libc.mallinfo2()
print(json.dumps({"applied": applied, "mmapped_during": during.hblkhd, "heap_free_after": after.fordblks}))
"""


def _probe(mode: str, env_value: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop("MODALSEG_MALLOC", None)
    if env_value is not None:
        env["MODALSEG_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_glibc_default_mmaps_large_blocks_and_returns_them():
    r = _probe("none")
    assert r["mmapped_during"] >= 64 << 20  # a 64 MiB tensor is a separate mapping ...
    assert r["heap_free_after"] < 64 << 20  # ... unmapped on free: nothing kept for the next step


def test_keep_freed_memory_serves_large_blocks_from_the_heap_and_keeps_them():
    r = _probe("api")
    assert r["applied"] is True
    assert r["mmapped_during"] < 64 << 20  # served from the heap
    assert r["heap_free_after"] >= 64 << 20  # and kept there after free, ready for reuse


def test_opt_out_by_environment():
    r = _probe("api", env_value="default")
    assert r["applied"] is False
    assert r["mmapped_during"] >= 64 << 20


def test_the_modalseg_command_applies_it():
    r = _probe("cli")
    assert r["mmapped_during"] < 64 << 20 and r["heap_free_after"] >= 64 << 20
