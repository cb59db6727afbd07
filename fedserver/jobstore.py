"""Where jobs live on the server: one SQLite file for metadata, one folder per job for files.

The database survives restarts, so `list_jobs` still shows every job after the server comes back;
jobs that were running when it stopped are marked failed with a clear reason (`fail_interrupted`).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgrid.errors import NotFoundError, StateError
from fedgrid.serde import JobInfo, RoundInfo

SUBMITTED = "SUBMITTED"
RUNNING = "RUNNING"
COMPLETED = "FINISHED:COMPLETED"
ABORTED = "FINISHED:ABORTED"
FAILED = "FINISHED:EXECUTION_EXCEPTION"
FINISHED = (COMPLETED, ABORTED, FAILED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    submitter TEXT NOT NULL,
    submitter_org TEXT NOT NULL,
    submit_time REAL NOT NULL,
    start_time REAL NOT NULL DEFAULT 0,
    end_time REAL NOT NULL DEFAULT 0,
    current_round INTEGER NOT NULL DEFAULT 0,
    num_rounds INTEGER NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    meta_json TEXT NOT NULL,
    sites_json TEXT NOT NULL DEFAULT '[]',
    encrypted INTEGER NOT NULL DEFAULT 0,
    cloned_from TEXT NOT NULL DEFAULT '',
    result_json TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS rounds (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    sites_asked INTEGER NOT NULL,
    sites_answered INTEGER NOT NULL,
    seconds REAL NOT NULL,
    metrics_json TEXT NOT NULL,
    bytes_moved INTEGER NOT NULL,
    PRIMARY KEY (job_id, round)
);
CREATE TABLE IF NOT EXISTS site_states (
    job_id TEXT NOT NULL,
    site TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (job_id, site)
);
"""


@dataclass(frozen=True)
class JobRecord(JobInfo):
    """A job as the store keeps it: what admins see of it (`JobInfo`), its meta.json and its result summary."""

    meta: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)


class JobStore:
    """Thread-safe: the server's event loop and its worker threads both record progress."""

    def __init__(self, workspace: Path, durable: bool = True) -> None:
        """`durable=False` skips waiting for the disk at each commit: for a store that need not survive a
        crash of the machine (the simulator's, whose jobs write a site's state a thousand times at start)."""
        self.root = workspace / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(workspace / "jobs.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        if not durable:
            self._db.execute("PRAGMA synchronous=OFF")
        self._db.executescript(SCHEMA)
        self._db.row_factory = sqlite3.Row

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    @staticmethod
    def new_id() -> str:
        return str(uuid.uuid4())

    def incoming_dir(self, job_id: str) -> Path:
        """A private folder to unpack and check an upload before it becomes a job."""
        path = self.root / f".incoming-{job_id}"
        path.mkdir(parents=True)
        return path

    def add(
        self,
        *,
        job_id: str,
        staged: Path,
        name: str,
        submitter: str,
        submitter_org: str,
        num_rounds: int,
        meta: dict[str, Any],
        encrypted: bool,
        cloned_from: str = "",
    ) -> JobRecord:
        """Move a checked upload into place and record it, or leave nothing behind."""
        final = self.job_dir(job_id)
        staged.rename(final)
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO jobs (job_id, name, status, submitter, submitter_org, submit_time, num_rounds,"
                    " meta_json, encrypted, cloned_from) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        job_id,
                        name,
                        SUBMITTED,
                        submitter,
                        submitter_org,
                        time.time(),
                        num_rounds,
                        json.dumps(meta),
                        int(encrypted),
                        cloned_from,
                    ),
                )
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no job {job_id!r}; list_jobs -a shows every job")
        return _record(row)

    def find(self, prefix: str) -> JobRecord:
        """A job by id or by a unique prefix of its id (as typed in the console)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE job_id LIKE ? ESCAPE '\\' LIMIT 2",
                (prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",),
            ).fetchall()
        if not prefix or not rows:
            raise NotFoundError(f"no job {prefix!r}; list_jobs -a shows every job")
        if len(rows) > 1 and rows[0]["job_id"] != prefix:
            raise NotFoundError(f"job id prefix {prefix!r} is ambiguous; type more of the id")
        return _record(rows[0])

    def list(self, *, include_finished: bool, name_prefix: str = "", limit: int = 0) -> list[JobRecord]:
        query = "SELECT * FROM jobs"
        where, args = [], []
        if not include_finished:
            where.append("status IN (?, ?)")
            args += [SUBMITTED, RUNNING]
        if name_prefix:
            where.append("substr(name, 1, ?) = ?")
            args += [len(name_prefix), name_prefix]
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY submit_time DESC"
        if limit > 0:
            query += f" LIMIT {int(limit)}"
        with self._lock:
            return [_record(r) for r in self._db.execute(query, args).fetchall()]

    def counts_by_status(self) -> dict[str, int]:
        """How many jobs the store holds in each status."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {row[0]: row[1] for row in rows}

    def queued(self) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY submit_time", (SUBMITTED,)).fetchall()
        return [_record(r) for r in rows]

    def update(self, job_id: str, **fields: Any) -> None:
        columns = {"status", "start_time", "end_time", "current_round", "error", "sites", "result"}
        sets, args = [], []
        for key, value in fields.items():
            if key not in columns:
                raise ValueError(f"unknown job field {key}")
            if key in ("sites", "result"):
                key, value = f"{key}_json", json.dumps(value)
            sets.append(f"{key} = ?")
            args.append(value)
        with self._tx() as db:
            db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE job_id = ?", (*args, job_id))  # noqa: S608 - keys checked above

    def add_round(self, job_id: str, record: RoundInfo) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO rounds VALUES (?,?,?,?,?,?,?)",
                (
                    job_id,
                    record.round,
                    record.sites_asked,
                    record.sites_answered,
                    record.seconds,
                    json.dumps(record.metrics),
                    record.bytes_moved,
                ),
            )

    def rounds(self, job_id: str) -> list[RoundInfo]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM rounds WHERE job_id = ? ORDER BY round", (job_id,)).fetchall()
        return [
            RoundInfo(
                round=r["round"],
                sites_answered=r["sites_answered"],
                sites_asked=r["sites_asked"],
                seconds=r["seconds"],
                metrics=json.loads(r["metrics_json"]),
                bytes_moved=r["bytes_moved"],
            )
            for r in rows
        ]

    def set_site_state(self, job_id: str, site: str, state: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO site_states VALUES (?,?,?)", (job_id, site, state))

    def site_states(self, job_id: str) -> dict[str, str]:
        with self._lock:
            rows = self._db.execute("SELECT site, state FROM site_states WHERE job_id = ?", (job_id,)).fetchall()
        return {r["site"]: r["state"] for r in rows}

    def delete(self, job_id: str) -> None:
        record = self.get(job_id)
        if not record.finished:
            raise StateError(f"job {job_id} is {record.status}; abort it first, only finished jobs can be deleted")
        trash = self.root / f".deleted-{job_id}"
        self.job_dir(job_id).rename(trash)
        with self._tx() as db:
            for table in ("jobs", "rounds", "site_states"):
                db.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))  # noqa: S608 - fixed table names
        shutil.rmtree(trash, ignore_errors=True)

    def interrupted(self) -> list[JobRecord]:
        """Jobs that were running when the server stopped."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status = ?", (RUNNING,)).fetchall()
        return [_record(row) for row in rows]

    def fail_interrupted(self, job_id: str, why: str) -> None:
        """End a job the server stopped under, saying where it stopped and `why` it does not resume."""
        record = self.get(job_id)
        where = f"during round {record.current_round}" if record.current_round else "before round 1"
        self.update(
            job_id,
            status=FAILED,
            end_time=time.time(),
            error=f"the server stopped {where} and {why}; its checkpoint is in the job folder; clone_job "
            "runs the job again",
        )

    def requeue(self, job_id: str, attempt: int, from_round: int) -> None:
        """Put a job the server stopped under back in the queue, to resume (its `attempt`-th time)."""
        record = self.get(job_id)
        resume = {"attempt": attempt, "from_round": from_round}
        self.update(job_id, status=SUBMITTED, result={**record.result, "resume": resume})

    def sweep_incoming(self) -> None:
        """Remove half-received uploads and half-deleted jobs left by a crash."""
        for path in self.root.glob(".incoming-*"):
            shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(".deleted-*"):
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        job_id=row["job_id"],
        name=row["name"],
        status=row["status"],
        submitter=row["submitter"],
        submitter_org=row["submitter_org"],
        submit_time=row["submit_time"],
        start_time=row["start_time"],
        end_time=row["end_time"],
        current_round=row["current_round"],
        num_rounds=row["num_rounds"],
        error=row["error"],
        meta=json.loads(row["meta_json"]),
        sites=tuple(json.loads(row["sites_json"])),
        encrypted=bool(row["encrypted"]),
        cloned_from=row["cloned_from"],
        result=json.loads(row["result_json"]),
    )
