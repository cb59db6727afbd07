"""MLflow as a tracking sink: the only module of fedserver that imports mlflow.

Layout in MLflow (experiment = the job's `experiment_name`, else the job name):
- one run per job, named by the job id, tags `job_id`, `job_name`, `fedgrid.role=job`: the job's
  params, the server's per-round metrics (step = round) and the job's artifacts;
- one nested run per site, named by the site, tags `mlflow.parentRunId`, `job_id`, `job_name`, `site`,
  `fedgrid.role=site`: the site's metrics with their own steps and original timestamps, its params,
  and its text as artifacts `text/<tag>.txt`.
Grouping by the `job_id` tag in the MLflow UI therefore shows one job's runs together.

Why a replay cannot duplicate a point (MLflow 3.17):
- Every point has a deterministic identity (key, timestamp, step, value), unique within its run (the
  intake moves an exact repeat 1 ms on), and the same record always carries the same identity.
- The SQL store's `metrics` table has exactly that identity (plus the run) as primary key, and
  `SqlAlchemyStore._log_metrics_once` answers an IntegrityError by inserting only the rows not yet
  present; so against `mlflow server` on a database, and against the embedded SQLite default, a
  re-sent batch is a no-op.
- That is a property of the backend, not of MLflow's API (the deprecated file store appends
  duplicates), so whenever a batch's fate is unknown (an error after the request left, or records
  of a run this process did not create) the next attempt first reads the run's history for the
  batch's keys and sends only the points missing. Params are write-once with the same value (MLflow
  accepts a re-logged equal value), text and artifacts are whole files re-uploaded under the same
  name, and runs are found by their tags before one is created.
- The window left: a request that outlives its client-side timeout and commits after that read-back
  would be sent twice; the SQL stores absorb it, a file store would not.

MLflow's HTTP client retries a failed request 7 times with exponential backoff and waits up to 120 s
for each, which would hold the delivery thread for minutes. MLflow reads these settings from the
environment on every request and has no per-client knob, so this module sets short values with
`os.environ.setdefault` (an operator's explicit setting wins); the courier (`delivery`) retries with
backoff instead. MLflow's usage telemetry is turned off the same way (a federation server should not
send anything anywhere its operator did not configure), and so is its printing of run URLs to stdout.
Nothing else in fedserver uses MLflow.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # MLflow prints "View run ... at <url>" to stdout when a run ends; the server logs it once instead.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
for _name, _value in ENV_DEFAULTS.items():
    os.environ.setdefault(_name, _value)

from mlflow import MlflowClient  # noqa: E402 - after the environment defaults above
from mlflow.entities import Metric, Param, ViewType  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.utils.validation import (  # noqa: E402
    MAX_ENTITIES_PER_BATCH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from fedserver.tracking.journal import ARTIFACT, METRIC, PARAMS, TEXT, Record, write_json_atomic  # noqa: E402
from fedserver.tracking.sink import JOB_RUN, Delivery, RunRef  # noqa: E402

log = logging.getLogger("fedserver.tracking")

REQUEST_BYTES_BUDGET = 800_000
"""MLflow refuses a log-batch request over 1 MB (MAX_BATCH_LOG_REQUEST_SIZE); stay well under it."""


class MlflowSink:
    """Writes one job's records into MLflow with `MlflowClient.log_batch`, one run per (job, site)."""

    max_records = MAX_METRICS_PER_BATCH

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment_name: str,
        job_id: str,
        job_name: str,
        start_time_ms: int,
        state_file: Path,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.job_id = job_id
        self.job_name = job_name
        self.start_time_ms = start_time_ms
        self.state_file = state_file
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._run_ids: dict[str, str] = {}
        self._clean: set[str] = set()
        """Runs whose every point this session wrote or checked: no read-back needed."""
        self._found: dict[str, str] | None = None
        if state_file.exists():
            state = json.loads(state_file.read_text(encoding="utf-8"))
            self._experiment_id = state.get("experiment_id")
            self._run_ids = dict(state.get("runs", {}))

    # ------------------------------------------------------------------ Sink

    def open(self) -> None:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        if self._experiment_id is not None:
            experiment = self._client.get_experiment(self._experiment_id)  # also proves MLflow answers
            if experiment.lifecycle_stage == "deleted":
                raise RuntimeError(f"MLflow experiment {experiment.name!r} is deleted; restore it to deliver")
        self._experiment()

    def deliver(self, run: RunRef, records: Sequence[Record], *, verify: bool) -> Delivery:
        client = self._connected()
        try:
            run_id = self._run_id(run)
            metrics = [Metric(r.key, r.value, r.timestamp_ms, r.step) for r in records if r.kind == METRIC]
            params: dict[str, str] = {}
            for r in records:
                if r.kind == PARAMS:
                    params.update(r.params)
            if metrics and (verify or run.key not in self._clean):
                metrics = self._missing(run_id, metrics)
            refused, error = 0, ""
            try:
                for chunk_metrics, chunk_params in _batches(metrics, params):
                    client.log_batch(run_id, metrics=chunk_metrics, params=chunk_params)
            except MlflowException as exc:
                if not _permanent(exc):
                    raise
                # Names, values and params were checked against MLflow's rules on arrival, so a refusal
                # here is about the run as a whole (deleted, read-only): refuse the batch, do not loop.
                refused = sum(1 for r in records if r.kind in (METRIC, PARAMS))
                error = f"MLflow refused {refused} records of {run.key}: {exc.message[:300]}"
            self._clean.add(run.key)
            files_refused, files_error = self._upload(run_id, records)
            return Delivery(refused + files_refused, files_error or error)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                # The run or experiment vanished from MLflow (deleted for good, database replaced):
                # look everything up again, recreating what is missing, on the next attempt.
                self._forget()
            raise

    def finish(self, run: RunRef, status: str) -> None:
        run_id = self._run_ids.get(run.key)
        if run_id is not None:
            self._connected().set_terminated(run_id, status)

    def close(self) -> None:
        self._client = None

    # ------------------------------------------------------------------ runs and experiment

    def _connected(self) -> MlflowClient:
        if self._client is None:
            raise RuntimeError("MLflow sink used before open()")
        return self._client

    def _ensure_experiment(self) -> str:
        client = self._connected()
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            try:
                return client.create_experiment(self.experiment_name, artifact_location=self._artifact_location())
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(self.experiment_name)  # created meanwhile
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise RuntimeError(f"MLflow experiment {self.experiment_name!r} is deleted; restore it to deliver")
        return experiment.experiment_id

    def _artifact_location(self) -> str | None:
        """Next to the database for a SQLite store (MLflow would use the server's working directory)."""
        if not self.tracking_uri.startswith("sqlite:///"):
            return None
        db = Path(self.tracking_uri[len("sqlite:///") :].split("?", 1)[0])
        return (db.parent.resolve() / "mlartifacts").as_uri()

    def _run_id(self, run: RunRef) -> str:
        """The MLflow run of `run`: remembered, else found by its tags, else created (parent first)."""
        known = self._run_ids.get(run.key)
        if known is not None:
            return known
        parent = None if run.is_job else self._run_id(RunRef(JOB_RUN))
        found = self._existing_runs().get(run.key)
        if found is not None:
            run_id = found
        else:
            tags = {"job_id": self.job_id, "job_name": self.job_name, "fedgrid.role": "job" if run.is_job else "site"}
            if parent is not None:
                tags["mlflow.parentRunId"] = parent
                tags["site"] = str(run.site)
            created = self._connected().create_run(
                self._experiment(),
                start_time=self.start_time_ms,
                tags=tags,
                run_name=self.job_id if run.is_job else str(run.site),
            )
            run_id = created.info.run_id
            self._clean.add(run.key)
            if run.is_job:
                log.info(
                    "job %s: MLflow run %s in experiment %r at %s",
                    self.job_id,
                    run_id,
                    self.experiment_name,
                    self.tracking_uri,
                )
        self._run_ids[run.key] = run_id
        self._save()
        return run_id

    def _existing_runs(self) -> dict[str, str]:
        """This job's runs already in MLflow (a create whose answer was lost, or an earlier session)."""
        if self._found is not None:
            return self._found
        found: dict[str, str] = {}
        quote = "'" if "'" not in self.job_id else '"'
        if quote not in self.job_id:
            token = None
            while True:
                page = self._connected().search_runs(
                    [self._experiment()],
                    filter_string=f"tags.job_id = {quote}{self.job_id}{quote}",
                    run_view_type=ViewType.ACTIVE_ONLY,
                    max_results=1000,
                    page_token=token,
                )
                for existing in page:
                    tags = existing.data.tags
                    if tags.get("fedgrid.role") == "job":
                        found.setdefault(JOB_RUN, existing.info.run_id)
                    elif tags.get("fedgrid.role") == "site" and "site" in tags:
                        found.setdefault(f"site:{tags['site']}", existing.info.run_id)
                token = page.token
                if not token:
                    break
        self._found = found
        return found

    def _experiment(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self._ensure_experiment()
            self._save()
        return self._experiment_id

    def _forget(self) -> None:
        self._experiment_id = None
        self._run_ids.clear()
        self._found = None
        self._clean.clear()
        self._save()

    def _save(self) -> None:
        write_json_atomic(self.state_file, {"experiment_id": self._experiment_id, "runs": self._run_ids})

    # ------------------------------------------------------------------ points and files

    def _missing(self, run_id: str, metrics: list[Metric]) -> list[Metric]:
        """The points of `metrics` that MLflow does not hold yet (read back per key)."""
        client = self._connected()
        present: set[tuple[str, int, int, float]] = set()
        for key in {m.key for m in metrics}:
            for m in client.get_metric_history(run_id, key):
                present.add((m.key, m.timestamp, m.step, m.value))
        missing = [m for m in metrics if (m.key, m.timestamp, m.step, m.value) not in present]
        if len(missing) < len(metrics):
            log.info(
                "job %s: %d of %d points of a retried batch were already in MLflow (run %s); sending %d",
                self.job_id,
                len(metrics) - len(missing),
                len(metrics),
                run_id,
                len(missing),
            )
        return missing

    def _upload(self, run_id: str, records: Sequence[Record]) -> tuple[int, str]:
        """Text files and artifacts of the batch, each uploaded once under its own name (idempotent)."""
        client = self._connected()
        refused, error = 0, ""
        text_files: dict[str, int] = {}
        for r in records:
            if r.kind == TEXT:
                text_files[r.path] = text_files.get(r.path, 0) + 1
        for path, count in text_files.items():
            if Path(path).is_file():
                client.log_artifact(run_id, path, artifact_path="text")
            else:
                refused += count
                error = f"text file {path} is gone; its {count} entries were not uploaded"
        for r in records:
            if r.kind != ARTIFACT:
                continue
            source = Path(r.path)
            if source.is_dir():
                client.log_artifacts(run_id, str(source), artifact_path=source.name)
            elif source.is_file():
                client.log_artifact(run_id, str(source))
            else:
                refused += 1
                error = f"artifact {source} is gone; not uploaded"
        return refused, error


def _permanent(exc: MlflowException) -> bool:
    """A refusal that a retry cannot change (4xx other than not-found, timeout and rate limiting)."""
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status not in (404, 408, 429)


def _batches(metrics: list[Metric], params: dict[str, str]) -> list[tuple[list[Metric], list[Param]]]:
    """Split into log_batch calls within MLflow's limits: 1000 metrics, 100 params, 1000 entities, 1 MB."""
    batches: list[tuple[list[Metric], list[Param]]] = []
    chunk_m: list[Metric] = []
    chunk_p: list[Param] = []
    size = 0

    def flush() -> None:
        nonlocal chunk_m, chunk_p, size
        if chunk_m or chunk_p:
            batches.append((chunk_m, chunk_p))
        chunk_m, chunk_p, size = [], [], 0

    for key, value in params.items():
        cost = len(json.dumps(key)) + len(json.dumps(value)) + 32
        if len(chunk_p) >= MAX_PARAMS_TAGS_PER_BATCH or size + cost > REQUEST_BYTES_BUDGET:
            flush()
        chunk_p.append(Param(key, value))
        size += cost
    for metric in metrics:
        cost = len(json.dumps(metric.key)) + 96
        if (
            len(chunk_m) >= MAX_METRICS_PER_BATCH
            or len(chunk_m) + len(chunk_p) >= MAX_ENTITIES_PER_BATCH
            or size + cost > REQUEST_BYTES_BUDGET
        ):
            flush()
        chunk_m.append(metric)
        size += cost
    flush()
    return batches
