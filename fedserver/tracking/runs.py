"""The runs of one job's tracking (the job's own run and one per site) and `runs.json`, which lists them.

Each run holds its journal and what judging its next events needs (seqs seen, params, recent
timestamps, text budget); after a restart that state is rebuilt from the journal, so a resent batch is
still a duplicate.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedserver.tracking.events import file_name
from fedserver.tracking.journal import METRIC, PARAMS, TEXT, Record, RunJournal, write_json_atomic
from fedserver.tracking.sink import JOB_RUN, RunRef

STAMP_WINDOW = 32
"""Recent timestamps remembered per metric key to keep points unique (see `RunState.unique_stamp`)."""


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
class RunState:
    """One run of the job as intake knows it: its journal and what judging its next events needs."""

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


class Runs:
    """The job's runs by key, listed in `<job>/tracking/runs.json`; reopened with their state after a restart.

    Not locked: the intake calls it under its own lock.
    """

    def __init__(self, folder: Path, job_id: str) -> None:
        self.folder = folder
        self.job_id = job_id
        self._runs: dict[str, RunState] = {}
        self.created_ms = self._load()

    @property
    def job(self) -> RunState:
        return self._runs[JOB_RUN]

    def all(self) -> list[RunState]:
        return list(self._runs.values())

    def site(self, site: str) -> RunState:
        """The site's run, made (and listed in `runs.json`) on its first event."""
        key = f"site:{site}"
        run = self._runs.get(key)
        if run is None:
            run = self._add(RunRef(key, site), f"sites/{file_name(site)}")
            self._save()
        return run

    def _add(self, ref: RunRef, stem: str) -> RunState:
        run = RunState(
            ref=ref,
            stem=stem,
            journal=RunJournal(self.folder / "journal" / f"{stem}.jsonl"),
            text_dir=self.folder / "text" / stem,
        )
        self._runs[ref.key] = run
        return run

    def _save(self) -> None:
        write_json_atomic(
            self.folder / "runs.json",
            {
                "job_id": self.job_id,
                "created_ms": self.created_ms,
                "runs": {key: {"site": run.ref.site, "stem": run.stem} for key, run in self._runs.items()},
            },
        )

    def _load(self) -> int:
        """Reopen what an earlier session of this job left (journals, judging state), or start fresh."""
        state_file = self.folder / "runs.json"
        if not state_file.exists():
            self.created_ms = int(time.time() * 1000)
            self._add(RunRef(JOB_RUN), "job")
            self._save()
            return self.created_ms
        state = json.loads(state_file.read_text(encoding="utf-8"))
        for key, info in state["runs"].items():
            run = self._add(RunRef(key, info["site"]), info["stem"])
            for record in run.journal.load():
                run.remember(record)
        if JOB_RUN not in self._runs:
            self._add(RunRef(JOB_RUN), "job")
        return int(state.get("created_ms", time.time() * 1000))
