"""The server's spool of an upload: a payload above the memory limit goes to a file reserved at the expected
size, and the file holds exactly the bytes that arrived, however many that was."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedserver.model import MEMORY_LIMIT
from fedserver.spool import Spool

EXPECTED = MEMORY_LIMIT + (1 << 20)


@pytest.mark.parametrize("arrived", [EXPECTED - 12_345, EXPECTED, EXPECTED + 3 * (1 << 20) + 7])
def test_a_spooled_file_holds_exactly_what_arrived(tmp_path: Path, arrived: int) -> None:
    data = bytes(range(256)) * (arrived // 256) + b"\x01" * (arrived % 256)
    spool = Spool(tmp_path, "site-1-", expected=EXPECTED)
    assert not spool.in_memory
    for start in range(0, len(data), 2 << 20):
        spool.write(data[start : start + (2 << 20)])
    path, held, release = spool.payload()
    assert held is None and release is None and path is not None
    assert path.read_bytes() == data


def test_a_discarded_spool_leaves_no_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "site-1-", expected=EXPECTED)
    spool.write(b"x" * (1 << 20))
    spool.discard()
    assert list(tmp_path.iterdir()) == []
