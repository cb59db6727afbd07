"""Where a payload a site uploads waits until its job's controller folds it in: memory or a file.

Small payloads (the common case, a model of a few MB) stay in memory while the server's budget for
them lasts, so a round of small models never touches the disk. A payload larger than `MEMORY_LIMIT`,
or one that arrives when the budget is spent, goes to a file in the job's folder as it arrives and is
later read back in blocks: the server never holds a large update whole (bench/aggregation_memory.py).
The budget is shared by every upload in flight, so memory stays bounded however many sites upload.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedgrid.transfer import Chunks
from fedserver.model import MEMORY_LIMIT

WRITE_BYTES = 4 << 20
"""A spooled payload reaches its file in writes of this size, whatever the size of the frames it came in:
the kernel's cost per byte of a write into the page cache fell with the size of the write (512 KB frames
written one by one: uploads at 0.22 of a TCP copy; gathered into 4 MB writes: 0.6; bench/transfer.py)."""


class Spool:
    """One upload's bytes, in memory or in a file created when the first byte arrives."""

    budget = 64 << 20
    """Bytes of payloads kept in memory across all uploads in flight."""
    _in_memory = 0

    def __init__(self, folder: Path, prefix: str, expected: int) -> None:
        self.folder, self.prefix = folder, prefix
        self.path: Path | None = None
        self._file: Any = None
        self._memory: Chunks | None = None
        self._reserved = 0
        self._expected = expected
        if 0 < expected <= MEMORY_LIMIT and Spool._in_memory + expected <= Spool.budget:
            Spool._in_memory += expected
            self._reserved = expected
            self._memory = Chunks()

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    def write(self, data: bytes | memoryview) -> int:
        if self._memory is not None:
            if self._memory.tell() + len(data) <= self._reserved:
                return self._memory.write(data)
            self._to_file()
        if self._file is None:
            self._open()
        return self._file.write(data)

    def _open(self) -> None:
        self._file = tempfile.NamedTemporaryFile(
            dir=self.folder, prefix=self.prefix, suffix=".part", delete=False, buffering=WRITE_BYTES
        )
        self.path = Path(self._file.name)
        if self._expected:
            # Reserving the expected size at once halves the cost of each write on ext4 (its per-page
            # block reservation is skipped); `payload` cuts the file to what arrived.
            os.posix_fallocate(self._file.fileno(), 0, self._expected)

    def _to_file(self) -> None:
        held = self._memory.getvalue() if self._memory is not None else b""
        self._release()
        self._open()
        self._file.write(held)

    def _release(self) -> None:
        Spool._in_memory -= self._reserved
        self._reserved = 0
        self._memory = None

    def payload(self) -> tuple[Path | None, bytes | None, Callable[[], None] | None]:
        """(file, None, None) or (None, bytes, release) once complete. An in-memory payload keeps its
        share of the budget until `release` is called (by `Result.discard`, once it has been folded)."""
        if self._file is not None:
            self._file.truncate()
            self._file.close()
            return self.path, None, None
        if self._memory is None:
            return None, None, None
        data = self._memory.getvalue()
        self._memory = None
        return None, data or None, self._release

    def discard(self) -> None:
        self._release()
        if self._file is not None:
            self._file.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
