"""Where a payload a site uploads waits until its job's controller folds it in: memory or a file.

Small payloads (the common case, a model of a few MB) stay in memory while the server's budget for
them lasts, so a round of small models never touches the disk. A payload larger than `MEMORY_LIMIT`,
or one that arrives when the budget is spent, goes to a file in the job's folder as it arrives and is
later read back in blocks: the server never holds a large update whole (bench/aggregation_memory.py).
The budget is shared by every upload in flight, so memory stays bounded however many sites upload.

A spool file whose payload has been used goes back to the server's `FilePool`, and the next large upload
overwrites it: the kernel then copies into page-cache pages it already holds. Pages of a new file are
fresh memory, and on this VM, which hands freed pages back to its host, writing 100 MB into a new file
took 250-300 ms and overwriting a kept one 12-42 ms, measured alone (bench/transfer.py measures whole
uploads: 0.71-1.01 of a TCP copy into kept files, the first one into a new file 0.3-0.8).
"""

from __future__ import annotations

import os
import secrets
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from fedgrid.transfer import Chunks
from fedserver.model import MEMORY_LIMIT

WRITE_BYTES = 2 << 20
"""A spooled payload reaches its file in writes of about this size, whatever the size of the frames it came
in: the frames are kept by reference and written with one `writev`, off the event loop, not copied into a
buffer and handed to a thread one by one (100 MB in 512 KB frames: 29-82 ms of CPU against 65-321 ms).
Each upload in flight holds this much: with 4 MB the server's peak with 32 sites rose from 2.6x the model to
2.9-3.2x in some runs, with 2 MB it stayed at 2.4-2.8x (bench/aggregation_memory.py)."""


class FilePool:
    """Spool files kept after use, for the next large upload to overwrite (at most `max_files` of them and
    `max_bytes` in all; files beyond that are deleted).

    The files live in `folder` (emptied when the pool is made: nothing in it outlives a server) and are
    renamed into a job's folder when taken, so they must be on the same file system. A kept file keeps its
    disk blocks and its cached pages; the kernel writes the dirty ones back to disk in the background and
    may drop clean ones under memory pressure, like any file's.
    """

    def __init__(self, folder: Path, max_files: int = 4, max_bytes: int = 1 << 30) -> None:
        self.folder, self.max_files, self.max_bytes = folder, max_files, max_bytes
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            stale.unlink()
        self._free: list[tuple[Path, int]] = []
        self._lock = threading.Lock()

    def take(self, folder: Path, prefix: str) -> tuple[int, Path] | None:
        """A kept file, renamed into `folder` and opened for writing (None when none is kept)."""
        with self._lock:
            if not self._free:
                return None
            kept, _size = self._free.pop()
        target = folder / f"{prefix}{secrets.token_hex(6)}.part"
        try:
            os.rename(kept, target)
            return os.open(target, os.O_WRONLY), target
        except OSError:
            kept.unlink(missing_ok=True)
            target.unlink(missing_ok=True)
            return None

    def give_back(self, path: Path) -> None:
        """Keep `path` for a later upload, or delete it when the pool is full."""
        try:
            size = path.stat().st_size
            with self._lock:
                if len(self._free) < self.max_files and sum(s for _, s in self._free) + size <= self.max_bytes:
                    kept = self.folder / f"free-{secrets.token_hex(6)}"
                    os.rename(path, kept)
                    self._free.append((kept, size))
                    return
        except OSError:
            pass
        path.unlink(missing_ok=True)


class Spool:
    """One upload's bytes, in memory or in a file created when the first byte arrives.

    `write` never blocks on the disk: it keeps the frames of a file-bound payload until about WRITE_BYTES
    are pending (`flush_due`), and the caller runs `flush` off its event loop.
    """

    budget = 64 << 20
    """Bytes of payloads kept in memory across all uploads in flight."""
    _in_memory = 0
    pool: FilePool | None = None
    """Where used spool files are kept for reuse; the server sets it (without one, they are deleted)."""

    def __init__(self, folder: Path, prefix: str, expected: int) -> None:
        self.folder, self.prefix = folder, prefix
        self.path: Path | None = None
        self._fd: int | None = None
        self._file_lock = threading.Lock()
        """Held while the file is written or closed: a stream cancelled while its flush runs in a thread
        closes the file only once that write is done, never while it could land in a reused descriptor."""
        self._pending: list[bytes | memoryview] = []
        self._pending_bytes = 0
        self._written = 0
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

    @property
    def flush_due(self) -> bool:
        """Whether enough of a file-bound payload is pending for one large write."""
        return self._pending_bytes >= WRITE_BYTES

    def write(self, data: bytes | memoryview) -> int:
        if self._memory is not None:
            if self._memory.tell() + len(data) <= self._reserved:
                return self._memory.write(data)
            self._to_file()
        if self._fd is None:
            self._open()
        self._pending.append(data)
        self._pending_bytes += len(data)
        return len(data)

    def flush(self) -> None:
        """Write the pending frames to the file, in one gathered write (blocks on the disk)."""
        with self._file_lock:
            self._flush()

    def _flush(self) -> None:
        while self._pending and self._fd is not None:
            done = os.writev(self._fd, self._pending[: _IOV_MAX])
            self._written += done
            self._pending_bytes -= done
            while done and len(self._pending[0]) <= done:
                done -= len(self._pending.pop(0))
            if done:
                self._pending[0] = memoryview(self._pending[0])[done:]

    def _open(self) -> None:
        taken = Spool.pool.take(self.folder, self.prefix) if Spool.pool is not None else None
        if taken is None:
            fd, name = tempfile.mkstemp(dir=self.folder, prefix=self.prefix, suffix=".part")
            taken = fd, Path(name)
        fd, self.path = taken
        self._fd = fd
        if self._expected:
            # Reserving the expected size at once halves the cost of each write on ext4 (its per-page
            # block reservation is skipped); `payload` cuts the file to what arrived.
            os.posix_fallocate(fd, 0, self._expected)

    def _to_file(self) -> None:
        held = self._memory.getvalue() if self._memory is not None else b""
        self._release()
        self._open()
        self._pending.append(held)
        self._pending_bytes += len(held)

    def _release(self) -> None:
        Spool._in_memory -= self._reserved
        self._reserved = 0
        self._memory = None

    def payload(self) -> tuple[Path | None, bytes | None, Callable[[], None] | None]:
        """(file, None, release) or (None, bytes, release) once complete. `release` (called by
        `Result.discard`, once the payload has been folded) gives the file to the pool or deletes it, or
        gives an in-memory payload's share back to the budget."""
        if self._fd is not None:
            self.flush()
            os.ftruncate(self._fd, self._written)
            self._close()
            path = self.path
            assert path is not None
            self.path = None
            return path, None, lambda: _release_file(path)
        if self._memory is None:
            return None, None, None
        data = self._memory.getvalue()
        self._memory = None
        return None, data or None, self._release

    def discard(self) -> None:
        self._release()
        self._close()
        self._pending.clear()
        if self.path is not None:
            _release_file(self.path)
            self.path = None

    def _close(self) -> None:
        with self._file_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _release_file(path: Path) -> None:
    if Spool.pool is not None:
        Spool.pool.give_back(path)
    else:
        path.unlink(missing_ok=True)


_IOV_MAX = os.sysconf("SC_IOV_MAX")
