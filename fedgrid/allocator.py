"""glibc malloc settings for processes that move multi-megabyte payloads every round.

By default glibc maps every buffer above 128 KB on its own and unmaps it when it is freed (raising that
threshold, after a while, to the size of the last large buffer freed). A round moves a few 2 MB frames
and model-sized buffers through each process; with those defaults each would be mapped again and the
kernel would zero every page of it again: about a third of a job worker's CPU in a one-step round, and
a third to a half of the CPU per MB of a large transfer (bench/round_overhead.py, bench/transfer.py).
With a fixed threshold of MMAP_THRESHOLD, buffers up to that size come from the heap and are reused, and
the heap keeps up to TRIM_THRESHOLD free at its top before giving memory back. The server also caps its
arenas and trims after each round (fedserver/memory.py), so what it keeps stays O(model)
(bench/aggregation_memory.py). glibc only: elsewhere these are no-ops.
"""

from __future__ import annotations

import ctypes
import functools
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD = 16 << 20
"""Buffers from this size on are mapped on their own and given back to the system when freed: above a
frame (fedgrid.transfer.CHUNK_SIZE), the quickstart's model and its encrypted aggregate (10.2 MB), so
those are reused from the heap. Below the aggregate's size, it would be mapped afresh every round at the
server (where it is joined) and at every site (where it is received): 2,500 page faults each, about half
of each site's page faults in an encrypted round (perf record -e page-faults, bench/he_overhead.py)."""

TRIM_THRESHOLD = 64 << 20
"""Free memory at the top of the heap beyond this goes back to the system."""


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    try:
        library = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return library if hasattr(library, "mallopt") else None


def tune(arenas: int | None = None) -> None:
    """Set the thresholds above, and at most `arenas` malloc arenas when given. Call once at start-up,
    before threads are made. A GLIBC_TUNABLES environment variable that sets malloc tunables is left to rule."""
    library = _tunable()
    if library is None:
        return
    library.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    library.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    if arenas is not None:
        library.mallopt(M_ARENA_MAX, arenas)


def _tunable() -> ctypes.CDLL | None:
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    return libc()
