"""What one job's tracking accepts: site batches and the server's own metrics, params and artifacts, judged,
de-duplicated by seq and written to the run journals before the caller hears back.

Everything here runs on the caller's thread (the server's event loop) and touches only the local disk;
it never waits on a tracker. Delivery reads the journals on its own threads (`delivery`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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
from fedserver.tracking.journal import ARTIFACT, METRIC, PARAMS, TEXT, Record
from fedserver.tracking.runs import Runs, RunState

log = logging.getLogger("fedserver.tracking")

SERVER = "(server)"
"""Name under which the server's own refused records are counted."""
CLOSED = "tracking closed for this job"


@dataclass
class _Tally:
    """The outcome of one call, for its note, the job's counters and the warnings."""

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


@dataclass(frozen=True)
class IntakeCounts:
    """What intake did so far: records journaled per run key, and what it turned away or changed."""

    journaled: Mapping[str, int]
    duplicates: int
    refused: Mapping[str, int]
    refused_by_site: Mapping[str, int]
    adjusted: Mapping[str, int]


class Intake:
    """Judges and journals what the server hands to one job's tracking; local disk only, never a tracker."""

    def __init__(self, *, job_id: str, folder: Path, sites: Sequence[str], limits: EventLimits) -> None:
        self.job_id = job_id
        self.folder = folder
        self.limits = limits
        self._sites = set(sites)
        self._lock = threading.Lock()
        self._closing = False
        self._duplicates = 0
        self._refused: Counter[str] = Counter()
        self._refused_by_site: Counter[str] = Counter()
        self._adjusted: Counter[str] = Counter()
        self._warned: set[tuple[str, str]] = set()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._runs = Runs(folder, job_id)
        self.created_ms = self._runs.created_ms

    # ------------------------------------------------------------------ the server's calls

    def site_events(self, site: str, events: Sequence[TrackingEvent]) -> str:
        """Judge and journal a site's batch; returns a one-line note for the site."""
        tally = _Tally()
        now = time.time()
        limits = self.limits
        with self._lock:
            run = self._runs.site(site) if (site in self._sites and not self._closing) else None
            if run is None:
                why = CLOSED if self._closing else f"site {site!r} is not in this job"
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
        self._warn_new(site, tally)
        return tally.note()

    def global_metrics(self, round: int, metrics: Mapping[str, float]) -> None:
        """The server's per-round metrics, on the job's own run with step = round."""
        now_ms = int(time.time() * 1000)

        def build(run: RunState, tally: _Tally) -> list[Record]:
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
            return records

        self._from_server(build)

    def log_params(self, params: Mapping[str, str | float | int]) -> None:
        """The job's params, on the job's own run. A key logged again keeps its first value."""

        def build(run: RunState, tally: _Tally) -> list[Record]:
            normalized = normalize_params(params, self.limits.max_tag_chars)
            if isinstance(normalized, Refused):
                tally.refuse(normalized.reason, normalized.detail)
                return []
            record = self._params_record(run, normalized[0], 0, int(time.time() * 1000), tally)
            return [record] if record else []

        self._from_server(build)

    def add_artifact(self, path: Path) -> None:
        """A file of the job (final model, metrics) to attach to the job's run where the tracker can hold files."""

        def build(run: RunState, tally: _Tally) -> list[Record]:
            source = Path(path)
            fields = {"key": source.name, "path": str(source.resolve()), "timestamp_ms": int(time.time() * 1000)}
            return [self._record(run, ARTIFACT, **fields)]

        self._from_server(build)

    def stop(self) -> None:
        """Refuse everything from now on (the job is closing); what is journaled stays to be delivered."""
        with self._lock:
            self._closing = True

    def close_journals(self) -> None:
        with self._lock:
            for run in self._runs.all():
                run.journal.close()

    def runs(self) -> list[RunState]:
        """The job's runs, the job's own first: site runs nest under it."""
        with self._lock:
            runs = self._runs.all()
        return sorted(runs, key=lambda r: (not r.ref.is_job, r.ref.key))

    def counts(self) -> IntakeCounts:
        with self._lock:
            return IntakeCounts(
                journaled={run.ref.key: run.journal.count for run in self._runs.all()},
                duplicates=self._duplicates,
                refused=dict(self._refused),
                refused_by_site=dict(self._refused_by_site),
                adjusted=dict(self._adjusted),
            )

    # ------------------------------------------------------------------ judging (under self._lock)

    def _from_server(self, build: Callable[[RunState, _Tally], list[Record]]) -> None:
        """Journal the records `build` makes on the job's own run, unless tracking is closing."""
        tally = _Tally()
        with self._lock:
            if self._closing:
                tally.refuse("not accepted", CLOSED)
            else:
                run = self._runs.job
                self._commit(run, build(run, tally), [], tally)
            self._count(SERVER, tally)
        self._warn_new(SERVER, tally)

    def _judge(
        self, run: RunState, event: TrackingEvent, tally: _Tally, now: float, texts: list[tuple[Path, str]]
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
        self, run: RunState, params: Mapping[str, str], seq: int, timestamp_ms: int, tally: _Tally
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

    def _record(self, run: RunState, kind: str, **fields: object) -> Record:
        run.staged += 1
        return Record(index=run.journal.count + run.staged, kind=kind, **fields)  # type: ignore[arg-type]

    def _commit(self, run: RunState, records: list[Record], texts: list[tuple[Path, str]], tally: _Tally) -> None:
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
