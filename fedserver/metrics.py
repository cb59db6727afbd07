"""The server's Prometheus metrics in one place: what is measured, under which name, and how it is served.

Two kinds:
- events (RPCs, rounds, bytes, refused updates) are counted by one-line calls from the code that sees
  them (fedserver/rpc.py, worker_io.py, job_io.py, admin_service.py, jobrun.py, fedavg.py) into the
  counters and histograms below;
- state (sites, jobs, pending tracking records) is read when Prometheus scrapes, from the objects that
  hold it, on the event loop that owns them (`_State`): nothing is kept twice, so nothing goes stale.
Every label has a bounded set of values: RPC methods and status codes, kinds of requests and bytes,
classes of refusal, job states, tracker types, and the sites of the roster. No label names a job,
a round or a task. The README's "Metrics" table lists them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, ProcessCollector
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fedgrid import __version__, metrics_http
from fedgrid.errors import (
    EncryptionError,
    LayoutError,
    LimitError,
    NonFiniteError,
    NotFoundError,
    PayloadError,
    SampleCountError,
    TransferError,
)
from fedgrid.metrics_http import Endpoint
from fedgrid.settings import ServerSettings
from fedserver import jobstore

if TYPE_CHECKING:
    from fedserver.peers import PeerAuthority
    from fedserver.scheduler import Scheduler

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, process_cpu_seconds_total, open fds, ...

Info("fedgrid_build", "The fedgrid release this server runs.", registry=REGISTRY).info({"version": __version__})

RPCS = Counter(
    "fedgrid_rpc_handled",
    "RPCs the server finished, by method and gRPC status code (both ports).",
    ["method", "code"],
    registry=REGISTRY,
)
RPC_SECONDS = Histogram(
    "fedgrid_rpc_duration_seconds",
    "Time from an RPC's start to its status, by method. Streams (Work, Commands, WatchJob) last a job or a session.",
    ["method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120, 600, 3600),
    registry=REGISTRY,
)
WORK_REQUESTS = Counter(
    "fedgrid_work_requests",
    "Requests on job workers' Work streams, by kind (hello, next_task, upload_slot, result, events, ping).",
    ["kind"],
    registry=REGISTRY,
)
ROUNDS = Counter(
    "fedgrid_rounds_completed", "Training rounds completed and recorded, over all jobs.", registry=REGISTRY
)
ROUND_SECONDS = Histogram(
    "fedgrid_round_duration_seconds",
    "Time from sending a round's training task to its aggregate, over all jobs.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
    registry=REGISTRY,
)
SENT = Counter(
    "fedgrid_server_sent_bytes",
    "Bytes of the messages the server sent, by kind: job packages to sites, tasks (global models) to job "
    "workers, job downloads to admins.",
    ["kind"],
    registry=REGISTRY,
)
RECEIVED = Counter(
    "fedgrid_server_received_bytes",
    "Bytes of the messages the server received, by kind: results (updates, evaluations) from job workers, "
    "job uploads from admins.",
    ["kind"],
    registry=REGISTRY,
)
REFUSED = Counter(
    "fedgrid_updates_refused",
    "Results from sites the server did not use, by reason: layout (tensor names, shapes or dtypes), non_finite, "
    "sample_count, payload (not a readable tensor set), encryption (an unusable ciphertext), transfer (cut short, "
    "oversized, bad digest, silent), late (its round had closed).",
    ["reason"],
    registry=REGISTRY,
)

SentKind = Literal["package", "task", "download"]
ReceivedKind = Literal["result", "upload"]
REFUSAL_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (LayoutError, "layout"),
    (NonFiniteError, "non_finite"),
    (SampleCountError, "sample_count"),
    (PayloadError, "payload"),
    (EncryptionError, "encryption"),
    (TransferError, "transfer"),
    (LimitError, "transfer"),
)
JOB_STATES = {
    jobstore.SUBMITTED: "submitted",
    jobstore.RUNNING: "running",
    jobstore.COMPLETED: "completed",
    jobstore.ABORTED: "aborted",
    jobstore.FAILED: "failed",
}
SNAPSHOT_TIMEOUT = 5.0
"""Seconds a scrape waits for the event loop to describe the server's state; a loop busier than that fails it."""

# Every value a bounded label can take exists from the start at 0, so rates and sums work from the first scrape.
for _kind in ("package", "task", "download"):
    SENT.labels(_kind)
for _kind in ("result", "upload"):
    RECEIVED.labels(_kind)
for _reason in ("layout", "non_finite", "sample_count", "payload", "encryption", "transfer", "late"):
    REFUSED.labels(_reason)
for _kind in ("hello", "next_task", "upload_slot", "result", "events", "ping"):
    WORK_REQUESTS.labels(_kind)


# ---------------------------------------------------------------------- events


class RPCCall:
    """One RPC being served, counted once with its status code."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.started = time.perf_counter()
        self.counted = False

    def count(self, code: str) -> None:
        """Count the call with `code` (the first time only). An abort counts it before its status goes out,
        so that a client that has seen the status finds it in /metrics."""
        if not self.counted:
            self.counted = True
            RPCS.labels(self.method, code).inc()
            RPC_SECONDS.labels(self.method).observe(time.perf_counter() - self.started)


@contextlib.contextmanager
def rpc_call(method: str, context: grpc.aio.ServicerContext) -> Iterator[RPCCall]:
    """Count one RPC and time it; its code is the status the servicer set (OK when it returned)."""
    call = RPCCall(method)
    code = "OK"
    try:
        yield call
    except grpc.aio.AbortError:
        status = context.code()
        code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
        raise
    except (asyncio.CancelledError, GeneratorExit):
        code = "CANCELLED"
        raise
    except BaseException:
        code = "UNKNOWN"
        raise
    finally:
        call.count(code)


def work_request(kind: str | None) -> None:
    """A request on a Work stream (`kind` is the WorkerMessage's oneof)."""
    WORK_REQUESTS.labels(kind or "empty").inc()


def round_completed(seconds: float) -> None:
    ROUNDS.inc()
    ROUND_SECONDS.observe(seconds)


def sent(kind: SentKind, nbytes: int) -> None:
    """`nbytes` of payload of `kind` went out (the frames' data: what a model or package weighs; the few
    bytes of headers around it are left out, and so is a ByteSize() per message, which costs as much as
    serializing it)."""
    SENT.labels(kind).inc(nbytes)


def received(kind: ReceivedKind, nbytes: int) -> None:
    RECEIVED.labels(kind).inc(nbytes)


async def counted(kind: ReceivedKind, frames: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """`frames` as they arrive, their data counted as received (job uploads: rare, so reading each frame's
    data once more costs nothing that matters)."""
    async for frame in frames:
        received(kind, len(frame.data))
        yield frame


def update_refused(cause: BaseException | Literal["late"]) -> None:
    """A result the server did not use: `cause` is the error that refused it, or "late"."""
    REFUSED.labels(cause if isinstance(cause, str) else refusal_reason(cause)).inc()


def refusal_reason(exc: BaseException) -> str:
    for cls, reason in REFUSAL_REASONS:
        if isinstance(exc, cls):
            return reason
    return "other"


# ---------------------------------------------------------------------- state, read at scrape time


@dataclass
class _Snapshot:
    """What the event loop's objects say at one moment, as plain values the scrape thread may read."""

    now: float
    roster: set[str]
    connected: dict[str, bool] = field(default_factory=dict)
    heartbeat: dict[str, float] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)
    late_jobs: list[str] = field(default_factory=list)


@dataclass
class _Source:
    scheduler: Scheduler
    peers: PeerAuthority
    loop: asyncio.AbstractEventLoop

    async def snapshot(self) -> _Snapshot:
        registry = self.scheduler.registry
        shot = _Snapshot(now=time.time(), roster=self.peers.site_names())
        for site in registry.sites():
            shot.connected[site.name] = registry.is_alive(site) and site.stream_open
            shot.heartbeat[site.name] = site.last_heartbeat
        for run in self.scheduler.runs.values():
            if run.tracking is not None:
                for tracker in run.tracking.report.trackers:
                    shot.pending[tracker.tracker] = shot.pending.get(tracker.tracker, 0) + tracker.pending
        shot.late_jobs = self.scheduler.late_deliveries()
        return shot

    def families(self) -> Iterator[Metric]:
        shot = asyncio.run_coroutine_threadsafe(self.snapshot(), self.loop).result(SNAPSHOT_TIMEOUT)
        sites = sorted(shot.roster | set(shot.connected))
        yield GaugeMetricFamily("fedgrid_sites_known", "Sites in the project's roster.", value=len(shot.roster))
        yield GaugeMetricFamily(
            "fedgrid_sites_connected",
            "Sites registered, heartbeating within heartbeat_timeout, with their command stream open.",
            value=sum(shot.connected.values()),
        )
        connected = GaugeMetricFamily(
            "fedgrid_site_connected",
            "1 while the site is connected (as fedgrid_sites_connected), else 0.",
            labels=["site"],
        )
        for site in sites:
            connected.add_metric([site], float(shot.connected.get(site, False)))
        yield connected
        age = GaugeMetricFamily(
            "fedgrid_site_heartbeat_age_seconds",
            "Seconds since the site's last heartbeat (sites that registered since the server started).",
            labels=["site"],
        )
        for site, last in sorted(shot.heartbeat.items()):
            age.add_metric([site], max(0.0, shot.now - last))
        yield age
        store = self.scheduler.store
        counts = store.counts_by_status()
        jobs = GaugeMetricFamily("fedgrid_jobs", "Jobs in the job store, by state.", labels=["state"])
        for status, state in JOB_STATES.items():
            jobs.add_metric([state], counts.get(status, 0))
        yield jobs
        pending = dict(shot.pending)
        for job_id in shot.late_jobs:
            with contextlib.suppress(NotFoundError):  # deleted since the snapshot
                for tracker in store.get(job_id).result.get("tracking", {}).get("trackers", []):
                    pending[tracker["tracker"]] = pending.get(tracker["tracker"], 0) + int(tracker["pending"])
        tracking = GaugeMetricFamily(
            "fedgrid_tracking_pending_records",
            "Tracking records (metric points, params, artifacts) accepted but not yet delivered to their tracker, "
            "by tracker type: running jobs, and ended jobs whose delivery is retried.",
            labels=["tracker"],
        )
        for tracker in sorted({"mlflow", "tensorboard", *pending}):
            tracking.add_metric([tracker], pending.get(tracker, 0))
        yield tracking


class _State(Collector):
    """The scrape-time gauges; empty until `serve` names the objects they describe."""

    def __init__(self) -> None:
        self.source: _Source | None = None

    def collect(self) -> Iterator[Metric]:
        source = self.source
        if source is not None:
            yield from source.families()


STATE = _State()
REGISTRY.register(STATE)


def serve(
    settings: ServerSettings, settings_file: Path, *, scheduler: Scheduler, peers: PeerAuthority
) -> Endpoint | None:
    """Start the /metrics endpoint the settings ask for (none when metrics_port is 0). Call on the event loop."""
    if not settings.metrics_port:
        return None
    STATE.source = _Source(scheduler=scheduler, peers=peers, loop=asyncio.get_running_loop())
    return metrics_http.serve(REGISTRY, settings.metrics_address, settings.metrics_port, settings_file)
