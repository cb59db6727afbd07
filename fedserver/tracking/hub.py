"""One job's tracking, as the server sees it: `JobTracking` joins the intake and the delivery, and reports.

```
site_events / global_metrics / log_params / add_artifact      (server's event loop: local disk only)
        │  intake.py: judge (events.py), dedupe by seq, budget per site
        ▼
  <job>/tracking/journal/<run>.jsonl                          (the queue; survives outages and restarts)
        │  delivery.py: one courier thread per tracker, batches per run, backoff while the tracker is down
        ▼
  MlflowSink / TensorBoardSink  ── watermark per (tracker, run) moves only after the tracker confirmed
```

Exactly-once, in short: a record is journaled once (seq dedupe), delivered in journal order, and the
watermark moves only after success, so nothing is lost; when the outcome of a batch is unknown (an
error after the request may have arrived, or a restart), the next attempt runs with `verify=True` and
the sink skips what already arrived, so nothing is written twice. See `mlflow_sink` for the details.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedserver.tracking.delivery import Couriers, TrackerConfig, TrackerReport
from fedserver.tracking.events import EventLimits, TrackingEvent
from fedserver.tracking.intake import Intake

__all__ = ["DeliveryReport", "JobTracking", "TrackerConfig", "TrackerReport"]

log = logging.getLogger("fedserver.tracking")


@dataclass(frozen=True)
class DeliveryReport:
    """What happened to a job's metrics: what sites sent, what was kept, where it is now."""

    accepted: int
    duplicates: int
    rejected: int
    rejected_reasons: Mapping[str, int] = field(default_factory=dict)
    rejected_by_site: Mapping[str, int] = field(default_factory=dict)
    adjusted: Mapping[str, int] = field(default_factory=dict)
    """Accepted after a change: renamed keys, truncated text."""
    trackers: tuple[TrackerReport, ...] = ()

    @property
    def complete(self) -> bool:
        """True when every tracker has every accepted record."""
        return all(t.pending == 0 for t in self.trackers)

    def as_dict(self) -> dict[str, object]:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "rejected_reasons": dict(self.rejected_reasons),
            "rejected_by_site": dict(self.rejected_by_site),
            "adjusted": dict(self.adjusted),
            "complete": self.complete,
            "trackers": [asdict(t) for t in self.trackers],
        }

    def summary(self) -> str:
        """One line for the server's log."""
        parts = [f"accepted {self.accepted}, duplicate {self.duplicates}, rejected {self.rejected}"]
        for t in self.trackers:
            parts.append(f"{t.tracker}: delivered {t.delivered}, pending {t.pending}, rejected {t.rejected}")
        return "; ".join(parts)


class JobTracking:
    """The tracking of one job: called by the server, delivers in the background, never blocks on a tracker."""

    def __init__(
        self,
        *,
        job_id: str,
        job_name: str,
        job_dir: Path,
        trackers: Sequence[TrackerConfig],
        default_mlflow_uri: str,
        sites: Sequence[str],
        limits: EventLimits | None = None,
    ) -> None:
        self.job_id = job_id
        self.job_name = job_name
        self.job_dir = Path(job_dir)
        self.limits = limits or EventLimits()
        folder = self.job_dir / "tracking"
        self._intake = Intake(job_id=job_id, folder=folder, sites=sites, limits=self.limits)
        self._couriers = Couriers(
            job_id=job_id,
            job_name=job_name,
            job_dir=self.job_dir,
            folder=folder,
            created_ms=self._intake.created_ms,
            trackers=trackers,
            default_mlflow_uri=default_mlflow_uri,
            runs=self._intake.runs,
        )

    def start(self) -> None:
        """Start delivering in the background; returns at once, whether or not the trackers answer."""
        self._couriers.start()

    def site_events(self, site: str, events: Sequence[TrackingEvent]) -> str:
        """Judge and journal a site's batch; returns a one-line note for the site. Local disk only."""
        note = self._intake.site_events(site, events)
        self._couriers.ring()
        return note

    def global_metrics(self, round: int, metrics: Mapping[str, float]) -> None:
        """The server's per-round metrics, on the job's own run with step = round."""
        self._intake.global_metrics(round, metrics)
        self._couriers.ring()

    def log_params(self, params: Mapping[str, str | float | int]) -> None:
        """The job's params, on the job's own run. A key logged again keeps its first value."""
        self._intake.log_params(params)
        self._couriers.ring()

    def add_artifact(self, path: Path) -> None:
        """A file of the job (final model, metrics) to attach to the job's run where the tracker can hold files."""
        self._intake.add_artifact(path)
        self._couriers.ring()

    def close(self, timeout: float, *, status: str = "FINISHED") -> DeliveryReport:
        """Stop accepting, deliver what can be delivered within `timeout` seconds, end the runs that are
        complete (MLflow status `status`), and leave the rest pending on disk for a later session.

        Blocks up to `timeout`: call it from a worker thread, not the event loop."""
        deadline = time.monotonic() + max(0.0, timeout)
        self._intake.stop()
        self._couriers.finish(deadline, status)
        self._intake.close_journals()
        report = self.report
        level = logging.INFO if report.complete else logging.WARNING
        log.log(level, "job %s tracking closed: %s", self.job_id, report.summary())
        return report

    @property
    def report(self) -> DeliveryReport:
        """Counts so far: accepted, duplicate and rejected events; delivered and pending records per tracker."""
        counts = self._intake.counts()
        return DeliveryReport(
            accepted=sum(counts.journaled.values()),
            duplicates=counts.duplicates,
            rejected=sum(counts.refused.values()),
            rejected_reasons=dict(counts.refused),
            rejected_by_site=dict(counts.refused_by_site),
            adjusted=dict(counts.adjusted),
            trackers=self._couriers.accounts(counts.journaled),
        )
