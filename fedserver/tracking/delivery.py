"""Delivery of one job's journaled records to its trackers: one courier thread per tracker.

A courier reads each run's journal past its watermark, hands the records in batches to its sink (MLflow,
TensorBoard) and moves the watermark only after the sink confirmed them. While a tracker is down the
records wait on disk and the courier backs off by the shared retry policy (`fedgrid.retry.Backoff`).
`Couriers.finish` gives the couriers until a deadline, ends the runs that are complete and leaves the
rest pending for a later session. Sinks are built on the courier's own thread: importing MLflow takes
seconds the server's event loop must not wait.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedgrid.retry import Backoff
from fedserver.tracking.journal import Mark, Watermarks
from fedserver.tracking.runs import RunState
from fedserver.tracking.sink import Sink

log = logging.getLogger("fedserver.tracking")

TRACKER_TYPES = ("mlflow", "tensorboard")

RETRY_FIRST = 0.5
RETRY_MAX = 30.0
"""Longest wait between attempts while a tracker is down."""
RETRY_MAX_CLOSING = 1.0
"""Longest wait between attempts once the job is closing and a deadline is near."""
IDLE_WAIT = 5.0
"""Longest sleep with nothing to deliver; new records end it at once."""


@dataclass(frozen=True)
class TrackerConfig:
    """Where a job's metrics go: "mlflow" (a tracking URI, or the server's own store) or "tensorboard"."""

    type: str
    tracking_uri: str = ""
    experiment_name: str = ""

    def __post_init__(self) -> None:
        if self.type not in TRACKER_TYPES:
            raise ValueError(f"tracker type must be one of {', '.join(TRACKER_TYPES)}, not {self.type!r}")


@dataclass(frozen=True)
class TrackerReport:
    """One tracker's account, in records (a metric point, a set of params, a text entry, an artifact)."""

    tracker: str
    target: str
    delivered: int
    pending: int
    """Accepted but not yet written; kept in `<job>/tracking/` and delivered by a later session."""
    rejected: int
    """Refused by the tracker itself and never retried (for example an artifact file that vanished)."""
    reachable: bool
    last_error: str = ""


class Bell:
    """What wakes an idle courier: `ring` after records were journaled; a courier's `poke` ends any wait."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.rings = 0

    def ring(self) -> None:
        with self.condition:
            self.rings += 1
            self.condition.notify_all()


class Courier:
    """The delivery thread of one tracker for one job."""

    def __init__(
        self,
        *,
        job_id: str,
        config: TrackerConfig,
        target: str,
        marks: Watermarks,
        make_sink: Callable[[], Sink],
        runs: Callable[[], Sequence[RunState]],
        bell: Bell,
        folder: Path,
    ) -> None:
        self.job_id = job_id
        self.config = config
        self.target = target
        self.marks = marks
        self._make_sink = make_sink
        self._runs = runs
        self._bell = bell
        self._folder = folder
        self.sink: Sink | None = None
        self.opened = False
        self.uncertain: set[str] = set()
        """Runs whose last batch may or may not have arrived: the next attempt asks the sink to verify."""
        self.finished: set[str] = set()
        self.down = False
        self.last_error = ""
        self.poked = False
        self.deadline: float | None = None
        self.status = "FINISHED"
        self.stopped = False
        self.backoff = Backoff(RETRY_FIRST, RETRY_MAX)
        self._seen = -1
        self.thread = threading.Thread(target=self._loop, name=f"tracking-{job_id[:8]}-{config.type}", daemon=True)

    def begin_closing(self, deadline: float, status: str) -> None:
        self.status = status
        self.deadline = deadline

    def poke(self) -> None:
        """End the courier's current wait, even a backoff."""
        with self._bell.condition:
            self.poked = True
            self._bell.condition.notify_all()

    def stop(self) -> None:
        self.stopped = True

    def account(self, journaled: Mapping[str, int]) -> TrackerReport:
        marks = self.marks.all()
        done = sum(min(marks.get(key, Mark()).count, n) for key, n in journaled.items())
        refused = sum(m.refused for m in marks.values())
        return TrackerReport(
            tracker=self.config.type,
            target=self.target,
            delivered=done - refused,
            pending=sum(journaled.values()) - done,
            rejected=refused,
            reachable=self.opened and not self.down,
            last_error=self.last_error,
        )

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while not self.stopped:
            current: list[str] = []
            try:
                if self.sink is None:
                    self.sink = self._make_sink()
                if not self.opened:
                    self.sink.open()
                    self.opened = True
                moved = self._deliver_pass(current)
                self._healthy()
                if self.deadline is not None and not moved and self._all_delivered():
                    self._finish_runs()
                    break
                if not moved:
                    self._wait(IDLE_WAIT, on_data=True)
            except Exception as exc:  # noqa: BLE001 - any failure: keep the records, back off, retry
                if current:
                    self.uncertain.add(current[0])
                self._failed(exc)
                delay = self.backoff.next()
                if self.deadline is not None:
                    delay = min(delay, RETRY_MAX_CLOSING)
                self._wait(delay, on_data=False)
            if self.deadline is not None and time.monotonic() >= self.deadline:
                break
        if self.sink is not None:
            try:
                self.sink.close()
            except Exception as exc:  # noqa: BLE001 - closing must not raise out of a daemon thread
                log.debug("closing %s sink: %s", self.config.type, exc)

    def _deliver_pass(self, current: list[str]) -> bool:
        """One batch for every run with pending records; True if anything moved."""
        assert self.sink is not None
        with self._bell.condition:
            self._seen = self._bell.rings
        moved = False
        for run in self._runs():
            count, size = run.journal.committed
            mark = self.marks.get(run.ref.key)
            if mark.count >= count:
                continue
            records, end = run.journal.read(mark.offset, size, self.sink.max_records)
            if not records:
                continue
            current[:] = [run.ref.key]
            outcome = self.sink.deliver(run.ref, records, verify=run.ref.key in self.uncertain)
            self.uncertain.discard(run.ref.key)
            if outcome.error:
                self.last_error = outcome.error
            self.marks.advance(run.ref.key, Mark(records[-1].index, end, mark.refused + outcome.refused))
            current.clear()
            moved = True
            if self.stopped:
                break
        return moved

    def _all_delivered(self) -> bool:
        return all(self.marks.get(r.ref.key).count >= r.journal.count for r in self._runs())

    def _finish_runs(self) -> None:
        """End every run, the job's own last (site runs nest under it)."""
        assert self.sink is not None
        for run in sorted(self._runs(), key=lambda r: r.ref.is_job):
            if run.ref.key not in self.finished:
                self.sink.finish(run.ref, self.status)
                self.finished.add(run.ref.key)

    def _wait(self, seconds: float, *, on_data: bool) -> None:
        """Sleep up to `seconds`; new records end it only when `on_data` (never during a backoff), a
        poke always does."""
        end = time.monotonic() + seconds
        bell = self._bell
        with bell.condition:
            while not (self.poked or self.stopped or (on_data and self._seen != bell.rings)):
                left = end - time.monotonic()
                if left <= 0:
                    break
                bell.condition.wait(left)
            self.poked = False

    def _failed(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"[:500]
        if not self.down:
            self.down = True
            log.warning(
                "job %s: %s at %s unreachable (%s); keeping events in %s and retrying",
                self.job_id,
                self.config.type,
                self.target,
                self.last_error,
                self._folder,
            )
        else:
            log.debug("job %s: %s still unreachable: %s", self.job_id, self.config.type, self.last_error)

    def _healthy(self) -> None:
        self.backoff.reset()
        if self.down:
            self.down = False
            log.info("job %s: %s at %s reachable again; delivering", self.job_id, self.config.type, self.target)


class Couriers:
    """The couriers of one job, one per tracker: started with the job, finished when it closes."""

    def __init__(
        self,
        *,
        job_id: str,
        job_name: str,
        job_dir: Path,
        folder: Path,
        created_ms: int,
        trackers: Sequence[TrackerConfig],
        default_mlflow_uri: str,
        runs: Callable[[], Sequence[RunState]],
    ) -> None:
        self.job_id = job_id
        self.job_name = job_name
        self.job_dir = job_dir
        self.folder = folder
        self.created_ms = created_ms
        self.default_mlflow_uri = default_mlflow_uri
        self.runs = runs
        self.bell = Bell()
        self._started = False
        self.couriers = [self._courier(config) for config in trackers]

    def start(self) -> None:
        """Start one thread per tracker; returns at once, whether or not the trackers answer."""
        if self._started:
            return
        self._started = True
        for courier in self.couriers:
            courier.thread.start()

    def ring(self) -> None:
        """New records are in the journals."""
        self.bell.ring()

    def finish(self, deadline: float, status: str) -> None:
        """Deliver what can be delivered before `deadline` (a `time.monotonic()` value), end the runs that
        are complete with `status`, then stop every courier."""
        self.start()
        for courier in self.couriers:
            courier.begin_closing(deadline, status)
            courier.poke()
        for courier in self.couriers:
            courier.thread.join(max(0.0, deadline - time.monotonic()))
        for courier in self.couriers:
            courier.stop()
            courier.poke()

    def accounts(self, journaled: Mapping[str, int]) -> tuple[TrackerReport, ...]:
        """Each tracker's account, given the records journaled per run key."""
        return tuple(courier.account(journaled) for courier in self.couriers)

    def _courier(self, config: TrackerConfig) -> Courier:
        if config.type == "mlflow":
            target = config.tracking_uri or self.default_mlflow_uri
        else:
            target = str(self.job_dir / "result" / "tensorboard")
        tracker_id = f"{config.type}-{hashlib.sha256(target.encode()).hexdigest()[:8]}"
        return Courier(
            job_id=self.job_id,
            config=config,
            target=target,
            marks=Watermarks(self.folder / f"delivered-{tracker_id}.json"),
            make_sink=lambda: self._make_sink(config, tracker_id, target),
            runs=self.runs,
            bell=self.bell,
            folder=self.folder,
        )

    def _make_sink(self, config: TrackerConfig, tracker_id: str, target: str) -> Sink:
        if config.type == "mlflow":
            from fedserver.tracking.mlflow_sink import MlflowSink

            return MlflowSink(
                tracking_uri=target,
                experiment_name=config.experiment_name or self.job_name or self.job_id,
                job_id=self.job_id,
                job_name=self.job_name,
                start_time_ms=self.created_ms,
                state_file=self.folder / f"{tracker_id}-runs.json",
            )
        from fedserver.tracking.tensorboard_sink import TensorBoardSink

        return TensorBoardSink(Path(target))
