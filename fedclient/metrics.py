"""The site daemon's Prometheus metrics in one place (the server's are in fedserver/metrics.py).

The daemon's state (connected to the server, jobs running, its workers' memory) is read from the daemon
when Prometheus scrapes; events (a worker started, a job report sent) are counted by one-line calls
from fedclient/daemon.py. Labels take a few fixed values only. The README's "Metrics" table lists them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from prometheus_client import CollectorRegistry, Counter, Info, ProcessCollector
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fedgrid import __version__, metrics_http
from fedgrid.metrics_http import Endpoint
from fedgrid.settings import SiteSettings

if TYPE_CHECKING:
    from fedclient.daemon import SiteDaemon

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes of the daemon, its CPU seconds, open fds, ...

Info("fedgrid_build", "The fedgrid release this site daemon runs.", registry=REGISTRY).info({"version": __version__})

WORKERS_STARTED = Counter(
    "fedgrid_site_workers_started",
    "Job worker processes the daemon started, by mode: ahead (waiting for the next job, torch imported) or "
    "on_demand (for a job that found no worker started ahead).",
    ["mode"],
    registry=REGISTRY,
)
JOB_REPORTS = Counter(
    "fedgrid_site_job_reports",
    "Reports the daemon sent the server about its jobs, by state: started, finished, failed, aborted, refused.",
    ["state"],
    registry=REGISTRY,
)

WorkerMode = Literal["ahead", "on_demand"]
REPORT_STATES = ("started", "finished", "failed", "aborted", "refused")
for _mode in ("ahead", "on_demand"):
    WORKERS_STARTED.labels(_mode)
for _state in REPORT_STATES:
    JOB_REPORTS.labels(_state)


def worker_started(mode: WorkerMode) -> None:
    WORKERS_STARTED.labels(mode).inc()


def job_report(state: str) -> None:
    JOB_REPORTS.labels(state).inc()


def resident_bytes(pid: int) -> int:
    """A process's resident memory (0 once it has ended)."""
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


class _State(Collector):
    """The scrape-time gauges, read from the daemon; empty until `serve` names it."""

    def __init__(self) -> None:
        self.daemon: SiteDaemon | None = None

    def collect(self) -> Iterator[Metric]:
        daemon = self.daemon
        if daemon is None:
            return
        yield GaugeMetricFamily(
            "fedgrid_site_server_connected",
            "1 while the daemon is registered with the server and its command stream is open, else 0.",
            value=float(daemon.connected),
        )
        yield GaugeMetricFamily(
            "fedgrid_site_jobs_running", "Jobs whose worker runs at this site.", value=len(daemon.running_jobs())
        )
        yield GaugeMetricFamily(
            "fedgrid_site_workers_resident_memory_bytes",
            "Resident memory of the daemon's job workers together, the one started ahead included.",
            value=sum(resident_bytes(pid) for pid in daemon.worker_pids()),
        )


STATE = _State()
REGISTRY.register(STATE)


def serve(daemon: SiteDaemon, settings: SiteSettings, settings_file: Path) -> Endpoint | None:
    """Start the /metrics endpoint the settings ask for (none when metrics_port is 0)."""
    if not settings.metrics_port:
        return None
    STATE.daemon = daemon
    return metrics_http.serve(REGISTRY, settings.metrics_address, settings.metrics_port, settings_file)
