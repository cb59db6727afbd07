"""The server's spool of an upload: a payload above the memory limit goes to a file reserved at the expected
size, and the file holds exactly the bytes that arrived, however many that was. A used file goes back to the
server's pool and the next upload overwrites it, within the pool's bound."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedserver.model import MEMORY_LIMIT
from fedserver.spool import FilePool, Spool

EXPECTED = MEMORY_LIMIT + (1 << 20)


@pytest.mark.parametrize("arrived", [EXPECTED - 12_345, EXPECTED, EXPECTED + 3 * (1 << 20) + 7])
def test_a_spooled_file_holds_exactly_what_arrived(tmp_path: Path, arrived: int) -> None:
    data = bytes(range(256)) * (arrived // 256) + b"\x01" * (arrived % 256)
    spool = Spool(tmp_path, "site-1-", expected=EXPECTED)
    assert not spool.in_memory
    for start in range(0, len(data), 512 << 10):  # frames as they come, flushed as the server flushes them
        spool.write(data[start : start + (512 << 10)])
        if spool.flush_due:
            spool.flush()
            assert not spool.flush_due
    path, held, release = spool.payload()
    assert held is None and release is not None and path is not None
    assert path.read_bytes() == data
    release()
    assert not path.exists()


def test_a_discarded_spool_leaves_no_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "site-1-", expected=EXPECTED)
    spool.write(b"x" * (1 << 20))
    spool.discard()
    assert list(tmp_path.iterdir()) == []


def spool_file(folder: Path, data: bytes) -> Path:
    spool = Spool(folder, "site-1-", expected=len(data))
    spool.write(data)
    path, _held, release = spool.payload()
    assert path is not None and release is not None
    assert path.read_bytes() == data
    release()
    return path


def test_a_used_spool_file_is_overwritten_by_the_next_upload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "left-by-a-crash").write_bytes(b"x")
    pool = FilePool(tmp_path / "pool", max_files=1)
    assert list(pool.folder.iterdir()) == []
    monkeypatch.setattr(Spool, "pool", pool)
    job = tmp_path / "job"
    job.mkdir()
    first = spool_file(job, b"a" * (EXPECTED + 100))
    assert not first.exists() and list(job.iterdir()) == []
    (kept,) = pool.folder.iterdir()
    inode = kept.stat().st_ino

    spool = Spool(job, "site-2-", expected=EXPECTED)
    spool.write(b"b" * EXPECTED)
    path, _held, release = spool.payload()
    assert path is not None and release is not None
    assert path.parent == job and path.name.startswith("site-2-")
    assert path.stat().st_ino == inode, "the kept file was not reused"
    assert path.read_bytes() == b"b" * EXPECTED, "the reused file holds more than the new payload"
    assert list(pool.folder.iterdir()) == []
    release()


def test_the_pool_keeps_at_most_its_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = FilePool(tmp_path / "pool", max_files=1)
    monkeypatch.setattr(Spool, "pool", pool)
    spools = [Spool(tmp_path, f"site-{n}-", expected=EXPECTED) for n in range(2)]
    for spool in spools:
        spool.write(b"c" * EXPECTED)
    released = [spool.payload()[2] for spool in spools]
    for release in released:
        assert release is not None
        release()
    assert len(list(pool.folder.iterdir())) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["pool"], "a file beyond the pool's bound was left behind"
    refused = Spool(tmp_path, "site-3-", expected=EXPECTED)
    refused.write(b"d" * 10)
    refused.discard()
    assert [p.name for p in tmp_path.iterdir()] == ["pool"]
