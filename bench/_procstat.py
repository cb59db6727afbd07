"""CPU time and child processes from /proc, shared by the benchmarks that measure the real daemons (Linux only;
not a benchmark itself, hence the leading underscore)."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(pid: int, *, reaped: bool = False) -> float:
    """User + system CPU seconds of a process so far (0 once it is gone); with `reaped`, plus those of the
    children it has waited for (a site daemon's job workers, once they end)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11 : 15 if reaped else 13]) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (the job workers of a site daemon)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out
