"""The one way fedgrid writes a file that must be whole: a reader, or a restart after a crash, sees the old
content or the new one, never half of either.

The data goes to a temporary file in the same folder, is flushed to the disk (fsync), renamed over the
target, and the folder is synced so that the rename itself survives a power cut. Errors (a full disk, a
folder that became read-only) raise OSError with the path, and the temporary file is removed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def write_atomic(path: Path, data: bytes | str | Iterable[bytes], *, mode: int = 0o644) -> None:
    """Replace `path` with `data` (bytes, text as UTF-8, or an iterable of byte chunks), file mode `mode`."""
    path = Path(path)
    try:
        _write(path, data, mode)
    except OSError as exc:
        if exc.filename is None:  # a failed write names no file: name the one we were writing
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def _write(path: Path, data: bytes | str | Iterable[bytes], mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            if isinstance(data, str):
                out.write(data.encode("utf-8"))
            elif isinstance(data, bytes | bytearray | memoryview):
                out.write(data)
            else:
                for chunk in data:
                    out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def write_json_atomic(path: Path, data: object, *, mode: int = 0o644) -> None:
    """`write_atomic` of `data` as indented JSON."""
    write_atomic(path, json.dumps(data, indent=2) + "\n", mode=mode)


def sync_folder(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
