"""Keep the server's memory O(model), measured in bench/aggregation_memory.py: two malloc arenas and a
trim after large uploads and rounds.

gRPC and the aggregation threads would each get a glibc malloc arena by default, and freed payload
buffers stay cached in them: with 32 sites uploading 40 MB models, 768 MB were free but kept. Two arenas
(with the thresholds of fedgrid/allocator.py) and a trim after each large upload and round bring the
server back to what it uses.
"""

from __future__ import annotations

from fedgrid import allocator

ARENAS = 2


def trim() -> None:
    """Give freed memory back to the system (after a round, when payload buffers were released)."""
    library = allocator.libc()
    if library is not None:
        library.malloc_trim(0)
