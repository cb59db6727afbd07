"""The benchmarks stay runnable: each one parses its arguments and prints its help (nothing is timed).

Running a benchmark takes a federation and minutes; this only catches a benchmark that no longer
imports or whose options broke. Modules named with a leading underscore are the benchmarks' shared
helpers, not benchmarks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("name", sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_")))
def test_benchmark_prints_its_help(name: str) -> None:
    result = subprocess.run([sys.executable, str(BENCH / name), "--help"], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
