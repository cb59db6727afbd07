"""One job's tracking: take events from sites and the server, journal them, deliver them to each tracker.

```
site_events / global_metrics / log_params / add_artifact      (server's event loop: local disk only)
        │  judge (events.py), dedupe by seq, budget per site
        ▼
  <job>/tracking/journal/<run>.jsonl                          (the queue; survives outages and restarts)
        │  one delivery thread per tracker, batches per run, backoff while the tracker is down
        ▼
  MlflowSink / TensorBoardSink  ── watermark per (tracker, run) moves only after the tracker confirmed
```

Exactly-once, in short: a record is journaled once (seq dedupe), delivered in journal order, and the
watermark moves only after success, so nothing is lost; when the outcome of a batch is unknown (an
error after the request may have arrived, or a restart), the next attempt runs with `verify=True` and
the sink skips what already arrived, so nothing is written twice. See `mlflow_sink` for the details.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedserver.tracking.events import (
    EventLimits,
    Refused,
    TrackingEvent,
    check_event,
    describe,
    file_name,
    mlflow_name,
    normalize_params,
    shorten,
)
from fedserver.tracking.journal import (
    ARTIFACT,
    METRIC,
    PARAMS,
    TEXT,
    Mark,
    Record,
    RunJournal,
    Watermarks,
    write_json_atomic,
)
from fedserver.tracking.sink import JOB_RUN, RunRef, Sink

log = logging.getLogger("fedserver.tracking")

TRACKER_TYPES = ("mlflow", "tensorboard")
SERVER = "(server)"
"""Name under which the server's own refused records are counted."""

RETRY_FIRST = 0.5
RETRY_MAX = 30.0
RETRY_MAX_CLOSING = 1.0
IDLE_WAIT = 5.0
STAMP_WINDOW = 32
"""Recent timestamps remembered per metric key to keep points unique (see `_Run.unique_stamp`)."""


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


class SeqWindow:
    """The seqs of one site already handled: every seq up to `floor`, plus the few seen above it."""

    def __init__(self) -> None:
        self.floor = 0
        self.above: set[int] = set()

    def __contains__(self, seq: int) -> bool:
        return seq <= self.floor or seq in self.above

    def add(self, seq: int) -> None:
        if seq <= self.floor:
            return
        self.above.add(seq)
        while self.floor + 1 in self.above:
            self.floor += 1
            self.above.discard(self.floor)


@dataclass
class _Run:
    ref: RunRef
    stem: str
    """Where its files live under `<job>/tracking/`: "job" or "sites/<site>"."""
    journal: RunJournal
    text_dir: Path
    seqs: SeqWindow = field(default_factory=SeqWindow)
    params: dict[str, str] = field(default_factory=dict)
    stamps: dict[str, dict[int, set[tuple[int, float]]]] = field(default_factory=dict)
    handled: int = 0
    text_chars: int = 0
    staged: int = 0
    """Records numbered but not yet appended (within one call)."""

    def unique_stamp(self, key: str, timestamp_ms: int, step: int, value: float) -> int:
        """A timestamp that makes (key, timestamp, step, value) unique in this run: the original one,
        unless an identical point already holds it, then the next free millisecond.

        MLflow identifies a point by exactly these four, so two equal points logged within the same
        millisecond would merge, and a replay could not be told from a new point. Only the last
        `STAMP_WINDOW` timestamps of each key are remembered (memory stays O(keys)); an exact repeat of
        an older point, out of order by more than that, would merge with it in MLflow.
        """
        window = self.stamps.setdefault(key, {})
        while (step, value) in window.get(timestamp_ms, ()):
            timestamp_ms += 1
        self._note_stamp(window, timestamp_ms, step, value)
        return timestamp_ms

    @staticmethod
    def _note_stamp(window: dict[int, set[tuple[int, float]]], timestamp_ms: int, step: int, value: float) -> None:
        window.setdefault(timestamp_ms, set()).add((step, value))
        if len(window) > STAMP_WINDOW:
            del window[next(iter(window))]  # the oldest remembered

    def remember(self, record: Record) -> None:
        """Rebuild the run's judging state from a journaled record (after a restart)."""
        if record.seq:
            self.seqs.add(record.seq)
            self.handled += 1
        if record.kind == METRIC:
            self._note_stamp(self.stamps.setdefault(record.key, {}), record.timestamp_ms, record.step, record.value)
        elif record.kind == PARAMS:
            self.params.update(record.params)
        elif record.kind == TEXT:
            self.text_chars += len(record.text)


@dataclass
class _Tally:
    accepted: int = 0
    duplicates: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    """The first refusal of each reason, to name in the note and the warning."""
    adjusted: Counter[str] = field(default_factory=Counter)

    def refuse(self, reason: str, detail: str) -> None:
        self.refused[reason] += 1
        self.examples.setdefault(reason, detail)

    def note(self) -> str:
        total = sum(self.refused.values())
        text = f"accepted {self.accepted}, duplicate {self.duplicates}, rejected {total}"
        if total:
            text += f": {next(iter(self.examples.values()))}"
            if total > 1:
                text += " (" + ", ".join(f"{r} {n}" for r, n in self.refused.items()) + ")"
        if self.adjusted:
            text += "; " + ", ".join(f"{r} {n}" for r, n in self.adjusted.items())
        return text


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
        self._sites = set(sites)
        self._default_mlflow_uri = default_mlflow_uri
        self._dir = self.job_dir / "tracking"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._wake = threading.Condition()
        self._generation = 0
        self._closing = False
        self._started = False
        self._duplicates = 0
        self._refused: Counter[str] = Counter()
        self._refused_by_site: Counter[str] = Counter()
        self._adjusted: Counter[str] = Counter()
        self._warned: set[tuple[str, str]] = set()
        self._runs: dict[str, _Run] = {}
        self._created_ms = self._load_state()
        self._couriers = [self._courier(config) for config in trackers]

    # ------------------------------------------------------------------ the server's calls

    def start(self) -> None:
        """Start one delivery thread per tracker; returns at once, whether or not the trackers answer."""
        if self._started:
            return
        self._started = True
        for courier in self._couriers:
            courier.thread.start()

    def site_events(self, site: str, events: Sequence[TrackingEvent]) -> str:
        """Judge and journal a site's batch; returns a one-line note for the site. Local disk only."""
        tally = _Tally()
        now = time.time()
        limits = self.limits
        with self._lock:
            run = self._site_run(site) if (site in self._sites and not self._closing) else None
            if run is None:
                why = "tracking closed for this job" if self._closing else f"site {site!r} is not in this job"
                for _ in events:
                    tally.refuse("not accepted", why)
            else:
                records: list[Record] = []
                texts: list[tuple[Path, str]] = []
                looked = 0
                for event in events:
                    seq = event.seq
                    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
                        tally.refuse("bad seq", f"seq {seq!r} (want an integer from 1)")
                        continue
                    if seq in run.seqs:
                        tally.duplicates += 1
                        continue
                    if run.handled >= limits.max_events_per_site:
                        tally.refuse("site limit", f"over the limit of {limits.max_events_per_site} events per site")
                        continue
                    run.seqs.add(seq)
                    run.handled += 1
                    looked += 1
                    if looked > limits.max_events_per_call:
                        tally.refuse("batch limit", f"over the limit of {limits.max_events_per_call} events per call")
                        continue
                    if event.site != site:
                        tally.refuse("site mismatch", f"event names site {shorten(str(event.site))!r}")
                        continue
                    record = self._judge(run, event, tally, now, texts)
                    if record is not None:
                        records.append(record)
                self._commit(run, records, texts, tally)
            self._count(site, tally)
        self._notify()
        self._warn_new(site, tally)
        return tally.note()

    def global_metrics(self, round: int, metrics: Mapping[str, float]) -> None:
        """The server's per-round metrics, on the job's own run with step = round."""
        tally = _Tally()
        now_ms = int(time.time() * 1000)
        with self._lock:
            if self._closing:
                tally.refuse("not accepted", "tracking closed for this job")
            else:
                run = self._runs[JOB_RUN]
                records = []
                for name, raw in metrics.items():
                    try:
                        value = float(raw)
                    except (TypeError, ValueError):
                        tally.refuse("not a number", f"global metric {shorten(str(name))!r} = {shorten(str(raw))!r}")
                        continue
                    if not math.isfinite(value):
                        tally.refuse(
                            "non-finite value", f"{describe(value)} value for global metric {shorten(str(name))!r}"
                        )
                        continue
                    key = mlflow_name(str(name)) if name else "_"
                    stamp = run.unique_stamp(key, now_ms, int(round), value)
                    records.append(self._record(run, METRIC, key=key, value=value, step=int(round), timestamp_ms=stamp))
                self._commit(run, records, [], tally)
            self._count(SERVER, tally)
        self._notify()
        self._warn_new(SERVER, tally)

    def log_params(self, params: Mapping[str, str | float | int]) -> None:
        """The job's params, on the job's own run. A key logged again keeps its first value."""
        tally = _Tally()
        with self._lock:
            normalized = normalize_params(params, self.limits.max_tag_chars)
            if self._closing:
                tally.refuse("not accepted", "tracking closed for this job")
            elif isinstance(normalized, Refused):
                tally.refuse(normalized.reason, normalized.detail)
            else:
                run = self._runs[JOB_RUN]
                record = self._params_record(run, normalized[0], 0, int(time.time() * 1000), tally)
                self._commit(run, [record] if record else [], [], tally)
            self._count(SERVER, tally)
        self._notify()
        self._warn_new(SERVER, tally)

    def add_artifact(self, path: Path) -> None:
        """A file of the job (final model, metrics) to attach to the job's run where the tracker can hold files."""
        tally = _Tally()
        with self._lock:
            if self._closing:
                tally.refuse("not accepted", "tracking closed for this job")
            else:
                run = self._runs[JOB_RUN]
                record = self._record(
                    run,
                    ARTIFACT,
                    key=Path(path).name,
                    path=str(Path(path).resolve()),
                    timestamp_ms=int(time.time() * 1000),
                )
                self._commit(run, [record], [], tally)
            self._count(SERVER, tally)
        self._notify()
        self._warn_new(SERVER, tally)

    def close(self, timeout: float, *, status: str = "FINISHED") -> DeliveryReport:
        """Stop accepting, deliver what can be delivered within `timeout` seconds, end the runs that are
        complete (MLflow status `status`), and leave the rest pending on disk for a later session.

        Blocks up to `timeout`: call it from a worker thread, not the event loop."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            self._closing = True
        self.start()
        for courier in self._couriers:
            courier.begin_closing(deadline, status)
        self._notify(poke=True)
        for courier in self._couriers:
            courier.thread.join(max(0.0, deadline - time.monotonic()))
        for courier in self._couriers:
            courier.stop()
        self._notify(poke=True)
        with self._lock:
            for run in self._runs.values():
                run.journal.close()
        report = self.report
        level = logging.INFO if report.complete else logging.WARNING
        log.log(level, "job %s tracking closed: %s", self.job_id, _summary(report))
        return report

    @property
    def report(self) -> DeliveryReport:
        """Counts so far: accepted, duplicate and rejected events; delivered and pending records per tracker."""
        with self._lock:
            counts = {key: run.journal.count for key, run in self._runs.items()}
            accepted = sum(counts.values())
            refused = Counter(self._refused)
            by_site = Counter(self._refused_by_site)
            adjusted = Counter(self._adjusted)
            duplicates = self._duplicates
        return DeliveryReport(
            accepted=accepted,
            duplicates=duplicates,
            rejected=sum(refused.values()),
            rejected_reasons=dict(refused),
            rejected_by_site=dict(by_site),
            adjusted=dict(adjusted),
            trackers=tuple(c.account(counts) for c in self._couriers),
        )

    # ------------------------------------------------------------------ judging (under self._lock)

    def _judge(
        self, run: _Run, event: TrackingEvent, tally: _Tally, now: float, texts: list[tuple[Path, str]]
    ) -> Record | None:
        verdict = check_event(event, self.limits, now)
        if isinstance(verdict, Refused):
            tally.refuse(verdict.reason, verdict.detail)
            return None
        for adjustment in verdict.adjustments:
            tally.adjusted[adjustment] += 1
        if event.kind == "scalar":
            stamp = run.unique_stamp(verdict.key, verdict.timestamp_ms, verdict.step, verdict.value)
            return self._record(
                run, METRIC, key=verdict.key, value=verdict.value, step=verdict.step, timestamp_ms=stamp, seq=event.seq
            )
        if event.kind == "params":
            return self._params_record(run, verdict.params, event.seq, verdict.timestamp_ms, tally)
        if run.text_chars + len(verdict.text) > self.limits.max_text_chars_per_site:
            tally.refuse("text limit", f"over the limit of {self.limits.max_text_chars_per_site} text characters")
            return None
        run.text_chars += len(verdict.text)
        text_file = run.text_dir / f"{file_name(verdict.key)}.txt"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(verdict.timestamp_ms / 1000))
        texts.append((text_file, f"--- step {verdict.step} at {stamp}\n{verdict.text}\n"))
        return self._record(
            run,
            TEXT,
            key=verdict.key,
            step=verdict.step,
            timestamp_ms=verdict.timestamp_ms,
            text=verdict.text,
            path=str(text_file),
            seq=event.seq,
        )

    def _params_record(
        self, run: _Run, params: Mapping[str, str], seq: int, timestamp_ms: int, tally: _Tally
    ) -> Record | None:
        for key, value in params.items():
            if key in run.params and run.params[key] != value:
                tally.refuse(
                    "param changed",
                    f"param {shorten(key)!r} changed from {shorten(run.params[key])!r} to {shorten(value)!r} "
                    "(params are write-once)",
                )
                return None
        new = {k: v for k, v in params.items() if k not in run.params}
        if len(run.params) + len(new) > self.limits.max_params_per_site:
            tally.refuse("params limit", f"over the limit of {self.limits.max_params_per_site} params per run")
            return None
        run.params.update(new)
        return self._record(run, PARAMS, key="params", params=dict(params), timestamp_ms=timestamp_ms, seq=seq)

    def _record(self, run: _Run, kind: str, **fields: object) -> Record:
        run.staged += 1
        return Record(index=run.journal.count + run.staged, kind=kind, **fields)  # type: ignore[arg-type]

    def _commit(self, run: _Run, records: list[Record], texts: list[tuple[Path, str]], tally: _Tally) -> None:
        run.staged = 0
        if not records:
            return
        try:
            for path, text in texts:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8") as out:
                    out.write(text)
            run.journal.append(records)
        except OSError as exc:
            for _ in records:
                tally.refuse("server disk error", f"cannot write the tracking journal: {exc}")
            return
        tally.accepted += len(records)

    def _count(self, who: str, tally: _Tally) -> None:
        self._duplicates += tally.duplicates
        self._refused.update(tally.refused)
        if tally.refused:
            self._refused_by_site[who] += sum(tally.refused.values())
        self._adjusted.update(tally.adjusted)

    def _warn_new(self, who: str, tally: _Tally) -> None:
        """One warning per (site, reason) for the job's life: a flood must not flood the log too."""
        for reason in tally.refused:
            if (who, reason) not in self._warned:
                self._warned.add((who, reason))
                log.warning(
                    "job %s: %s: refusing tracking events (%s), e.g. %s; further ones are only counted",
                    self.job_id,
                    who,
                    reason,
                    tally.examples[reason],
                )

    def _notify(self, poke: bool = False) -> None:
        with self._wake:
            self._generation += 1
            if poke:
                for courier in self._couriers:
                    courier.poked = True
            self._wake.notify_all()

    # ------------------------------------------------------------------ runs and state on disk

    def _site_run(self, site: str) -> _Run:
        key = f"site:{site}"
        run = self._runs.get(key)
        if run is None:
            run = self._new_run(RunRef(key, site), f"sites/{file_name(site)}")
            self._save_runs()
        return run

    def _new_run(self, ref: RunRef, stem: str) -> _Run:
        run = _Run(
            ref=ref,
            stem=stem,
            journal=RunJournal(self._dir / "journal" / f"{stem}.jsonl"),
            text_dir=self._dir / "text" / stem,
        )
        self._runs[ref.key] = run
        return run

    def _save_runs(self) -> None:
        write_json_atomic(
            self._dir / "runs.json",
            {
                "job_id": self.job_id,
                "created_ms": self._created_ms,
                "runs": {key: {"site": run.ref.site, "stem": run.stem} for key, run in self._runs.items()},
            },
        )

    def _load_state(self) -> int:
        """Reopen what an earlier session of this job left (journals, judging state), or start fresh."""
        state_file = self._dir / "runs.json"
        if not state_file.exists():
            self._created_ms = int(time.time() * 1000)
            self._new_run(RunRef(JOB_RUN), "job")
            self._save_runs()
            return self._created_ms
        state = json.loads(state_file.read_text(encoding="utf-8"))
        for key, info in state["runs"].items():
            run = self._new_run(RunRef(key, info["site"]), info["stem"])
            for record in run.journal.load():
                run.remember(record)
        if JOB_RUN not in self._runs:
            self._new_run(RunRef(JOB_RUN), "job")
        return int(state.get("created_ms", time.time() * 1000))

    def _courier(self, config: TrackerConfig) -> _Courier:
        if config.type == "mlflow":
            target = config.tracking_uri or self._default_mlflow_uri
        else:
            target = str(self.job_dir / "result" / "tensorboard")
        tracker_id = f"{config.type}-{hashlib.sha256(target.encode()).hexdigest()[:8]}"
        return _Courier(self, config, tracker_id, target)

    def _make_sink(self, config: TrackerConfig, tracker_id: str, target: str) -> Sink:
        """Build the sink in its own thread: importing MLflow takes seconds the event loop must not wait."""
        if config.type == "mlflow":
            from fedserver.tracking.mlflow_sink import MlflowSink

            return MlflowSink(
                tracking_uri=target,
                experiment_name=config.experiment_name or self.job_name or self.job_id,
                job_id=self.job_id,
                job_name=self.job_name,
                start_time_ms=self._created_ms,
                state_file=self._dir / f"{tracker_id}-runs.json",
            )
        from fedserver.tracking.tensorboard_sink import TensorBoardSink

        return TensorBoardSink(Path(target))

    def _runs_snapshot(self) -> list[_Run]:
        with self._lock:
            runs = list(self._runs.values())
        # The job's run first: site runs nest under it.
        return sorted(runs, key=lambda r: (not r.ref.is_job, r.ref.key))


class _Courier:
    """The delivery thread of one tracker for one job."""

    def __init__(self, hub: JobTracking, config: TrackerConfig, tracker_id: str, target: str) -> None:
        self.hub = hub
        self.config = config
        self.tracker_id = tracker_id
        self.target = target
        self.marks = Watermarks(hub._dir / f"delivered-{tracker_id}.json")
        self.sink: Sink | None = None
        self.opened = False
        self.uncertain: set[str] = set()
        self.finished: set[str] = set()
        self.down = False
        self.last_error = ""
        self.poked = False
        self.deadline: float | None = None
        self.status = "FINISHED"
        self.stopped = False
        self._seen = -1
        self.thread = threading.Thread(target=self._loop, name=f"tracking-{hub.job_id[:8]}-{config.type}", daemon=True)

    def begin_closing(self, deadline: float, status: str) -> None:
        self.status = status
        self.deadline = deadline

    def stop(self) -> None:
        self.stopped = True

    def account(self, counts: Mapping[str, int]) -> TrackerReport:
        marks = self.marks.all()
        done = sum(min(marks.get(key, Mark()).count, n) for key, n in counts.items())
        refused = sum(m.refused for m in marks.values())
        return TrackerReport(
            tracker=self.config.type,
            target=self.target,
            delivered=done - refused,
            pending=sum(counts.values()) - done,
            rejected=refused,
            reachable=self.opened and not self.down,
            last_error=self.last_error,
        )

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        delay = 0.0
        while not self.stopped:
            current: list[str] = []
            try:
                if self.sink is None:
                    self.sink = self.hub._make_sink(self.config, self.tracker_id, self.target)
                if not self.opened:
                    self.sink.open()
                    self.opened = True
                moved = self._deliver_pass(current)
                self._healthy()
                delay = 0.0
                if self.deadline is not None and not moved and self._all_delivered():
                    self._finish_runs()
                    break
                if not moved:
                    self._wait(IDLE_WAIT, on_data=True)
            except Exception as exc:  # noqa: BLE001 - any failure: keep the records, back off, retry
                if current:
                    self.uncertain.add(current[0])
                self._failed(exc)
                cap = RETRY_MAX_CLOSING if self.deadline is not None else RETRY_MAX
                delay = min(max(delay * 2, RETRY_FIRST), cap)
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
        with self.hub._wake:
            self._seen = self.hub._generation
        moved = False
        for run in self.hub._runs_snapshot():
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
        return all(self.marks.get(r.ref.key).count >= r.journal.count for r in self.hub._runs_snapshot())

    def _finish_runs(self) -> None:
        assert self.sink is not None
        for run in sorted(self.hub._runs_snapshot(), key=lambda r: r.ref.is_job):
            if run.ref.key not in self.finished:
                self.sink.finish(run.ref, self.status)
                self.finished.add(run.ref.key)

    def _wait(self, seconds: float, *, on_data: bool) -> None:
        """Sleep up to `seconds`; new records end it only when `on_data` (never during a backoff), a
        poke from close() always does."""
        end = time.monotonic() + seconds
        with self.hub._wake:
            while not (self.poked or self.stopped or (on_data and self._seen != self.hub._generation)):
                left = end - time.monotonic()
                if left <= 0:
                    break
                self.hub._wake.wait(left)
            self.poked = False

    def _failed(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"[:500]
        if not self.down:
            self.down = True
            log.warning(
                "job %s: %s at %s unreachable (%s); keeping events in %s and retrying",
                self.hub.job_id,
                self.config.type,
                self.target,
                self.last_error,
                self.hub._dir,
            )
        else:
            log.debug("job %s: %s still unreachable: %s", self.hub.job_id, self.config.type, self.last_error)

    def _healthy(self) -> None:
        if self.down:
            self.down = False
            log.info("job %s: %s at %s reachable again; delivering", self.hub.job_id, self.config.type, self.target)


def _summary(report: DeliveryReport) -> str:
    parts = [f"accepted {report.accepted}, duplicate {report.duplicates}, rejected {report.rejected}"]
    for t in report.trackers:
        parts.append(f"{t.tracker}: delivered {t.delivered}, pending {t.pending}, rejected {t.rejected}")
    return "; ".join(parts)
