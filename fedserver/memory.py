"""Keep the server's memory O(model): glibc settings and trimming, measured in bench/aggregation_memory.py.

gRPC and the aggregation threads each get a glibc malloc arena by default, and freed payload buffers
stay cached in them: with 32 sites uploading 40 MB models, 768 MB were free but kept. Two arenas, a fixed
mmap threshold (glibc otherwise raises it to the size of the last large buffer freed, up to 32 MB, after
which chunk-sized buffers come from the heap and stay there when freed) and a trim after each round bring
the server back to what it uses.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 10
"""Buffers from this size on are mapped on their own and given back to the system when freed."""


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def limit_arenas(count: int = 2) -> None:
    """Call once at start-up, before threads are made (glibc only; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_ARENA_MAX, count)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def trim() -> None:
    """Give freed memory back to the system (after a round, when payload buffers were released)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
