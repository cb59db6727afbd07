"""Soak: 18 short jobs back to back on one running federation; no daemon may grow with the jobs it ran.

After each job the server's and each site daemon's resident memory, threads and open file descriptors
are sampled (tests/soak.py). The first jobs warm caches up (imports, the warm worker, gRPC's pools); over
the rest, the least-squares slope of memory must stay under a bound well below what a per-job leak gives
(a job's state left behind is megabytes), and threads and descriptors must not climb. The server's memory
swings by ~1.5 MB from one job to the next (whether a closed TLS connection's buffers were freed yet when
it is sampled), so over twelve samples the slope's noise reaches ~0.2 MB/job: the bound sits above that.
bench/soak.py runs the same over 100 jobs and prints the figures, the finer measure.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ProvisionedProject, provision_project
from federation import Federation, running
from soak import run_jobs, series, slope

JOBS = 18
WARMUP = 6
RSS_SLOPE_MB = 0.5
"""Largest growth of resident memory allowed per job, by a linear fit over the jobs after the warm-up."""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    return provision_project(tmp_path_factory.mktemp("soak"), n_sites=2)


@pytest.fixture(scope="module")
def federation(project: ProvisionedProject) -> Iterator[Federation]:
    with running(project) as fed:
        yield fed


def test_a_dozen_jobs_leave_every_daemon_where_it_was(federation: Federation, tmp_path: Path) -> None:
    samples = run_jobs(federation, JOBS, tmp_path)[WARMUP:]
    report = []
    for daemon in samples[0]:
        rss = series(samples, daemon, "rss_mb")
        threads = series(samples, daemon, "threads")
        fds = series(samples, daemon, "fds")
        report.append(f"{daemon}: {slope(rss):+.3f} MB/job, threads {threads}, fds {fds}")
        assert slope(rss) < RSS_SLOPE_MB, f"{daemon} grows {slope(rss):.2f} MB per job: {rss}"
        assert max(threads[-5:]) <= max(threads[:5]) + 1, f"{daemon} holds more threads: {threads}"
        assert max(fds[-5:]) <= max(fds[:5]) + 2, f"{daemon} holds more file descriptors: {fds}"
    print("\n".join(report))
