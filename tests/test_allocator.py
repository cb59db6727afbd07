"""The daemons' malloc settings (fedgrid/allocator.py): frame-sized buffers come from the heap, where they
are reused, instead of being mapped (and zeroed by the kernel) again for every frame."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedgrid import allocator

pytestmark = pytest.mark.skipif(allocator.libc() is None, reason="glibc only")

PROBE = """
import ctypes, json, sys
from fedgrid import allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

if sys.argv[1] == "tuned":
    allocator.tune()
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
frame = bytearray(2 << 20)  # a frame's worth (fedgrid.transfer.CHUNK_SIZE)
print(json.dumps({"mapped": libc.mallinfo2().hblkhd}))
"""


def mapped_bytes(mode: str, env: dict[str, str] | None = None) -> int:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60, env=env, check=True
    )
    return json.loads(result.stdout)["mapped"]


def test_a_frame_comes_from_the_heap_once_tuned_and_is_mapped_on_its_own_by_default() -> None:
    assert mapped_bytes("default") >= 2 << 20
    assert mapped_bytes("tuned") < 2 << 20


def test_malloc_settings_in_glibc_tunables_are_left_to_rule() -> None:
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}
    assert mapped_bytes("tuned", env) >= 2 << 20
