"""The server's metric receivers against real trackers: a real `mlflow server` subprocess on a free
loopback port (killed and restarted to simulate outages), the embedded SQLite store, MLflow's file store
(which does not dedupe, to prove the read-back), and TensorBoard event files read back with TensorBoard.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from conftest import free_ports
from federation import wait_until

from fedserver.tracking import EventLimits, JobTracking, TrackerConfig, TrackingEvent
from fedserver.tracking.events import mlflow_name

ROOT = Path(__file__).resolve().parent.parent
MLFLOW_CLI = Path(sys.executable).parent / "mlflow"
SITES = ("site-1", "site-2", "site-3")
TAGS = ("train/loss", "val/accuracy", "lr")
STEPS = 20


# ---------------------------------------------------------------------------------------- helpers


class MlflowServer:
    """`mlflow server` on a free loopback port with a SQLite store; can be killed and restarted in place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240.0) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        command = [
            str(MLFLOW_CLI),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--workers",
            "1",
        ]
        began = time.monotonic()
        with open(self.root / "server.log", "ab") as log_file:
            # A session of its own, so that killing the group ends uvicorn's worker too.
            self.proc = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - began > timeout:
                self.kill()
                raise RuntimeError(f"mlflow server did not answer within {timeout:.0f} s")
            time.sleep(0.25)

    def kill(self) -> None:
        """SIGKILL the server's process group: a crash, not a shutdown."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.kill()


@pytest.fixture()
def live_server(mlflow_server: MlflowServer) -> Iterator[MlflowServer]:
    """The module's server, running before and after the test (tests may kill it)."""
    if not mlflow_server.running:
        mlflow_server.start()
    yield mlflow_server
    if not mlflow_server.running:
        mlflow_server.start()


def client_for(uri: str):  # noqa: ANN201 - an MlflowClient; mlflow is imported lazily like the server does
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def value_of(site: int, tag: int, step: int) -> float:
    return round(0.25 + 0.01 * step + 0.1 * site + tag, 6)


class FakeSite:
    """What a site's worker sends: SummaryWriter events with increasing seqs, in batches."""

    def __init__(self, name: str, index: int) -> None:
        self.name = name
        self.index = index
        self.seq = 0
        self.sent: list[TrackingEvent] = []

    def scalars(self, steps: Sequence[int], tags: Sequence[str] = TAGS) -> list[TrackingEvent]:
        events = []
        for step in steps:
            for t, tag in enumerate(tags):
                self.seq += 1
                events.append(
                    TrackingEvent(
                        site=self.name,
                        seq=self.seq,
                        kind="scalar",
                        tag=tag,
                        value=value_of(self.index, t, step),
                        step=step,
                        wall_time=1_800_000_000.0 + step + self.index / 10 + t / 100,
                    )
                )
        self.sent.extend(events)
        return events

    def event(self, kind: str, **fields: object) -> TrackingEvent:
        self.seq += 1
        values: dict[str, object] = {"tag": "", "value": 0.0, "step": 0, "wall_time": time.time()}
        values.update(fields)
        event = TrackingEvent(site=self.name, seq=self.seq, kind=kind, **values)  # type: ignore[arg-type]
        self.sent.append(event)
        return event


def send(tracking: JobTracking, site: FakeSite, events: Sequence[TrackingEvent], batch: int = 7) -> None:
    """Send in batches like the worker does; every batch must be accepted."""
    for i in range(0, len(events), batch):
        note = tracking.site_events(site.name, events[i : i + batch])
        assert note.startswith("accepted"), note


def returns_while_down(call: Callable[[], object], what: str, bound: float = 60.0) -> None:
    """Run `call` on a thread of its own and fail unless it returns while the tracker is still down.

    The caller brings the tracker back only after this returned, so a call that waited for the
    tracker would never return: the bound is a deadlock detector, not a speed requirement.
    """
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread below
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"while-down: {what}", daemon=True)
    thread.start()
    thread.join(bound)
    assert not thread.is_alive(), f"{what} did not return within {bound:.0f} s while the tracker was down"
    if errors:
        raise errors[0]


def journal_lines(job_dir: Path, stem: str) -> int:
    """Records kept in the job's journal for run `stem` ("job" or "sites/<site>")."""
    path = job_dir / "tracking" / "journal" / f"{stem}.jsonl"
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def new_tracking(job_dir: Path, trackers: Sequence[TrackerConfig], default_uri: str, job_id: str, **kw: object):
    return JobTracking(
        job_id=job_id,
        job_name=kw.pop("job_name", "tracking-test"),  # type: ignore[arg-type]
        job_dir=job_dir,
        trackers=trackers,
        default_mlflow_uri=default_uri,
        sites=SITES,
        **kw,  # type: ignore[arg-type]
    )


def job_runs(client, job_id: str) -> dict[str, object]:  # noqa: ANN001
    """{"job": parent run, site name: child run} found the way a researcher would: by the job_id tag."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.job_id = '{job_id}'")
    found: dict[str, object] = {}
    for run in runs:
        tags = run.data.tags
        key = "job" if tags.get("fedgrid.role") == "job" else tags["site"]
        assert key not in found, f"two runs for {key} of job {job_id}"
        found[key] = run
    return found


def assert_points(client, run, site: FakeSite, steps: Sequence[int], tags: Sequence[str] = TAGS) -> None:  # noqa: ANN001
    """Every (tag, step) exactly once, with its value and the site's own timestamp."""
    for t, tag in enumerate(tags):
        history = client.get_metric_history(run.info.run_id, mlflow_name(tag))
        assert sorted(m.step for m in history) == sorted(steps), f"{site.name} {tag}: steps"
        by_step = {m.step: m for m in history}
        for step in steps:
            assert by_step[step].value == pytest.approx(value_of(site.index, t, step))
            wall_time = 1_800_000_000.0 + step + site.index / 10 + t / 100
            assert by_step[step].timestamp == int(wall_time * 1000)


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "fedserver.tracking" and r.levelno == logging.WARNING and text in r.getMessage()
    ]


# ---------------------------------------------------------------------------------------- MLflow server


def test_every_point_reaches_mlflow_nested_under_the_job(live_server: MlflowServer, tmp_path: Path) -> None:
    tracking = new_tracking(tmp_path / "job", [TrackerConfig("mlflow", live_server.uri)], "", "job-all-points")
    tracking.start()
    sites = [FakeSite(name, i) for i, name in enumerate(SITES)]
    for site in sites:
        send(tracking, site, site.scalars(range(STEPS)))
        tracking.site_events(site.name, [site.event("params", params={"batch_size": 32, "site_lr": 0.01})])
    for rnd in range(1, 11):
        tracking.global_metrics(rnd, {"accuracy": rnd / 10, "loss": 1 - rnd / 10, "sites_answered": 3})
    tracking.log_params({"num_rounds": 10, "aggregation": "weighted_mean"})
    model = tmp_path / "final_model.safetensors"
    model.write_bytes(b"not really a model")
    tracking.add_artifact(model)

    report = tracking.close(timeout=120)

    assert report.complete, report
    expected = len(SITES) * (len(TAGS) * STEPS + 1) + 10 * 3 + 1 + 1
    assert report.accepted == expected and report.rejected == 0
    assert report.trackers[0].delivered == expected and report.trackers[0].pending == 0
    client = client_for(live_server.uri)
    runs = job_runs(client, "job-all-points")
    assert set(runs) == {"job", *SITES}
    parent = runs["job"]
    assert parent.info.run_name == "job-all-points" and parent.info.status == "FINISHED"
    assert parent.data.tags["job_name"] == "tracking-test"
    assert parent.data.params == {"num_rounds": "10", "aggregation": "weighted_mean"}
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["final_model.safetensors"]
    accuracy = client.get_metric_history(parent.info.run_id, "accuracy")
    assert sorted((m.step, m.value) for m in accuracy) == [(r, r / 10) for r in range(1, 11)]
    for site in sites:
        run = runs[site.name]
        assert run.info.run_name == site.name and run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["job_id"] == "job-all-points" and run.data.tags["site"] == site.name
        assert run.data.params == {"batch_size": "32", "site_lr": "0.01"}
        assert run.info.experiment_id == parent.info.experiment_id
        assert_points(client, run, site, range(STEPS))
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.name == "tracking-test"


def test_resent_and_overlapping_batches_are_delivered_once(live_server: MlflowServer, tmp_path: Path) -> None:
    tracking = new_tracking(tmp_path / "job", [TrackerConfig("mlflow", live_server.uri)], "", "job-resend")
    tracking.start()
    site = FakeSite("site-1", 0)
    events = site.scalars(range(10), tags=("loss",))

    first = tracking.site_events("site-1", events[:6])
    again = tracking.site_events("site-1", events[:6])  # the worker resends after a lost reply
    overlap = tracking.site_events("site-1", events[3:8])
    later = tracking.site_events("site-1", events[9:])  # arrives before the batch it follows
    gap = tracking.site_events("site-1", events[8:10])

    assert first == "accepted 6, duplicate 0, rejected 0"
    assert again == "accepted 0, duplicate 6, rejected 0"
    assert overlap == "accepted 2, duplicate 3, rejected 0"
    assert later == "accepted 1, duplicate 0, rejected 0"
    assert gap == "accepted 1, duplicate 1, rejected 0"
    # Two separate events identical in tag, step, value and time are two points, not one.
    twins = [site.event("scalar", tag="twin", value=0.5, step=7, wall_time=1_800_000_000.0) for _ in range(2)]
    assert tracking.site_events("site-1", twins) == "accepted 2, duplicate 0, rejected 0"
    report = tracking.close(timeout=60)
    assert report.complete and report.accepted == 12 and report.duplicates == 10
    client = client_for(live_server.uri)
    run = job_runs(client, "job-resend")["site-1"]
    assert_points(client, run, site, range(10), tags=("loss",))
    twin_points = client.get_metric_history(run.info.run_id, "twin")
    assert sorted(m.timestamp for m in twin_points) == [1_800_000_000_000, 1_800_000_000_001]


class DroppingProxy:
    """A TCP relay in front of MLflow that can swallow the answer to one log-batch request after MLflow
    handled it: the request arrived, the response was lost, exactly the case a retry must not double."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.drop_next_log_batch = threading.Event()
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        swallow = threading.Event()

        def forward_requests() -> None:
            try:
                while data := client.recv(65536):
                    if b"/runs/log-batch" in data and self.drop_next_log_batch.is_set():
                        self.drop_next_log_batch.clear()
                        swallow.set()
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=forward_requests, daemon=True).start()
        try:
            while data := upstream.recv(65536):
                if swallow.is_set():
                    self.dropped += 1  # MLflow answered, so it handled the batch; the client never hears
                    break
                client.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


def test_lost_response_to_a_delivered_batch_does_not_duplicate(
    live_server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedserver.tracking")
    proxy = DroppingProxy(live_server.port)
    try:
        uri = f"http://127.0.0.1:{proxy.port}"
        tracking = new_tracking(tmp_path / "job", [TrackerConfig("mlflow", uri)], "", "job-lost-response")
        proxy.drop_next_log_batch.set()
        tracking.start()
        site = FakeSite("site-2", 1)
        tracking.site_events("site-2", site.scalars(range(STEPS)))
        report = tracking.close(timeout=60)
    finally:
        proxy.close()

    assert proxy.dropped == 1
    assert report.complete and report.trackers[0].delivered == len(TAGS) * STEPS
    # The retry read the run back and found the batch there (MLflow's SQL store would also have
    # absorbed a blind resend; the read-back is what protects stores that do not).
    assert any("already in MLflow" in r.getMessage() for r in caplog.records)
    client = client_for(live_server.uri)
    assert_points(client, job_runs(client, "job-lost-response")["site-2"], site, range(STEPS))


def test_mlflow_killed_mid_job_then_back(
    live_server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While MLflow is down the server keeps taking events: each call returns, the events wait in the
    journal, none is lost, and once MLflow is back every one of them arrives exactly once."""
    caplog.set_level(logging.INFO, logger="fedserver.tracking")
    job_dir = tmp_path / "job"
    tracking = new_tracking(job_dir, [TrackerConfig("mlflow", live_server.uri)], "", "job-outage")
    tracking.start()
    sites = [FakeSite(name, i) for i, name in enumerate(SITES)]
    for site in sites:
        send(tracking, site, site.scalars(range(0, 5)))
    tracking.global_metrics(1, {"accuracy": 0.5})
    wait_until(lambda: tracking.report.trackers[0].pending == 0, 60, "first rounds delivered")
    delivered_before = tracking.report.trackers[0].delivered

    live_server.kill()

    def rounds_while_down() -> None:
        for site in sites:
            send(tracking, site, site.scalars(range(5, STEPS)))
        tracking.global_metrics(2, {"accuracy": 0.75})

    returns_while_down(rounds_while_down, "site_events and global_metrics")
    wait_until(lambda: tracking.report.trackers[0].last_error, 60, "the outage noticed")

    def notes_while_known_down() -> None:
        for site in sites:
            send(tracking, site, [site.event("text", tag="notes", text="still training")])

    returns_while_down(notes_while_known_down, "site_events after the outage was noticed")
    during = tracking.report
    sent_while_down = len(SITES) * (len(TAGS) * (STEPS - 5) + 1) + 1
    assert during.accepted == delivered_before + sent_while_down
    assert during.trackers[0].pending == sent_while_down and not during.trackers[0].reachable
    assert during.trackers[0].delivered == delivered_before
    for site in sites:
        assert journal_lines(job_dir, f"sites/{site.name}") == len(TAGS) * STEPS + 1
    assert journal_lines(job_dir, "job") == 2
    assert len(warnings_about(caplog, "unreachable")) == 1

    live_server.start()
    report = tracking.close(timeout=120)

    assert report.complete, report
    assert len(warnings_about(caplog, "unreachable")) == 1
    client = client_for(live_server.uri)
    runs = job_runs(client, "job-outage")
    for site in sites:
        assert_points(client, runs[site.name], site, range(STEPS))
        assert [a.path for a in client.list_artifacts(runs[site.name].info.run_id, "text")] == ["text/notes.txt"]
    accuracy = client.get_metric_history(runs["job"].info.run_id, "accuracy")
    assert sorted((m.step, m.value) for m in accuracy) == [(1, 0.5), (2, 0.75)]


def test_mlflow_unreachable_from_the_start(
    live_server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A tracker that is down when the job starts holds up neither the start nor the events; they are
    kept in the journal and delivered once it is up."""
    caplog.set_level(logging.INFO, logger="fedserver.tracking")
    live_server.kill()
    job_dir = tmp_path / "job"
    tracking = new_tracking(job_dir, [TrackerConfig("mlflow", live_server.uri)], "", "job-down-at-start")
    sites = [FakeSite(name, i) for i, name in enumerate(SITES)]

    def job_while_down() -> None:
        tracking.start()
        for site in sites:
            send(tracking, site, site.scalars(range(STEPS)))
        for rnd in range(1, 4):
            tracking.global_metrics(rnd, {"accuracy": rnd / 4})

    returns_while_down(job_while_down, "start, site_events and global_metrics")
    wait_until(lambda: tracking.report.trackers[0].last_error, 60, "the outage noticed")
    during = tracking.report
    assert during.trackers[0].pending == during.accepted == len(SITES) * len(TAGS) * STEPS + 3
    assert not during.trackers[0].reachable
    for site in sites:
        assert journal_lines(job_dir, f"sites/{site.name}") == len(TAGS) * STEPS
    assert len(warnings_about(caplog, "unreachable")) == 1

    live_server.start()
    report = tracking.close(timeout=120)

    assert report.complete, report
    assert len(warnings_about(caplog, "unreachable")) == 1
    client = client_for(live_server.uri)
    runs = job_runs(client, "job-down-at-start")
    assert set(runs) == {"job", *SITES}
    for site in sites:
        assert runs[site.name].data.tags["mlflow.parentRunId"] == runs["job"].info.run_id
        assert_points(client, runs[site.name], site, range(STEPS))


# ---------------------------------------------------------------------------------------- no server needed


def test_replay_after_a_crash_is_filtered_even_on_a_store_that_keeps_duplicates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file store appends whatever it gets: only the sink's read-back keeps a replay from doubling."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    from mlflow.entities import Metric

    probe = client_for(uri)
    probe_run = probe.create_run(probe.create_experiment("probe")).info.run_id
    probe.log_batch(probe_run, metrics=[Metric("m", 1.0, 1000, 1)])
    probe.log_batch(probe_run, metrics=[Metric("m", 1.0, 1000, 1)])
    assert len(probe.get_metric_history(probe_run, "m")) == 2, "this store should keep duplicates"

    job_dir = tmp_path / "job"
    site = FakeSite("site-1", 0)
    first = new_tracking(job_dir, [TrackerConfig("mlflow", uri)], "", "job-replay")
    first.start()
    send(first, site, site.scalars(range(10)))
    assert first.close(timeout=60).complete
    # A crash between MLflow's answer and the watermark write, and the run ids lost with it: the next
    # session must find the runs by their tags and resend everything it cannot prove was delivered.
    for stale in (job_dir / "tracking").glob("delivered-mlflow-*.json"):
        stale.write_text(json.dumps({"runs": {}}))
    for state in (job_dir / "tracking").glob("mlflow-*-runs.json"):
        state.unlink()

    second = new_tracking(job_dir, [TrackerConfig("mlflow", uri)], "", "job-replay")
    assert second.report.trackers[0].pending == len(TAGS) * 10
    second.start()
    old = site.sent[:5]
    assert second.site_events("site-1", old) == "accepted 0, duplicate 5, rejected 0"
    send(second, site, site.scalars(range(10, 15)))
    report = second.close(timeout=60)

    assert report.complete
    client = client_for(uri)
    runs = job_runs(client, "job-replay")
    assert set(runs) == {"job", "site-1"}
    assert_points(client, runs["site-1"], site, range(15))


@pytest.fixture(scope="module")
def sqlite_job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A finished fake job tracked into the embedded default (SQLite in the server workspace) and TensorBoard."""
    workspace = tmp_path_factory.mktemp("server-workspace")
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    job_dir = workspace / "jobs" / "job-sqlite"
    tracking = new_tracking(
        job_dir, [TrackerConfig("mlflow"), TrackerConfig("tensorboard")], uri, "job-sqlite", job_name="fashion"
    )
    tracking.start()
    sites = [FakeSite(name, i) for i, name in enumerate(SITES)]
    for site in sites:
        send(tracking, site, site.scalars(range(STEPS)), batch=25)
        tracking.site_events(site.name, [site.event("text", tag="notes", text=f"{site.name} done", step=19)])
    for rnd in range(1, 6):
        tracking.global_metrics(rnd, {"accuracy": 0.5 + rnd / 20, "loss": 1 / rnd})
    (job_dir / "result").mkdir(parents=True, exist_ok=True)
    model = job_dir / "result" / "final_model.safetensors"
    model.write_bytes(b"weights")
    tracking.add_artifact(model)
    report = tracking.close(timeout=120)
    return {"uri": uri, "workspace": workspace, "job_dir": job_dir, "sites": sites, "report": report}


def test_embedded_sqlite_default(sqlite_job: dict[str, object]) -> None:
    report = sqlite_job["report"]
    assert report.complete and [t.tracker for t in report.trackers] == ["mlflow", "tensorboard"]  # type: ignore[attr-defined]
    assert report.trackers[0].target == sqlite_job["uri"]  # type: ignore[attr-defined]
    client = client_for(str(sqlite_job["uri"]))
    runs = job_runs(client, "job-sqlite")
    assert set(runs) == {"job", *SITES}
    assert client.get_experiment(runs["job"].info.experiment_id).name == "fashion"
    for site in sqlite_job["sites"]:  # type: ignore[attr-defined]
        assert runs[site.name].data.tags["mlflow.parentRunId"] == runs["job"].info.run_id
        assert_points(client, runs[site.name], site, range(STEPS))
    # Artifacts land next to the database, not in whatever folder the server was started from.
    workspace = Path(str(sqlite_job["workspace"]))
    assert list(workspace.glob("mlartifacts/*/artifacts/final_model.safetensors"))


def test_tensorboard_event_files_one_folder_per_site(sqlite_job: dict[str, object]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = Path(str(sqlite_job["job_dir"])) / "result" / "tensorboard"
    assert sorted(p.name for p in board.iterdir()) == ["server", *SITES]
    for site in sqlite_job["sites"]:  # type: ignore[attr-defined]
        events = EventAccumulator(str(board / site.name), size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        for t, tag in enumerate(TAGS):
            scalars = events.Scalars(tag)
            assert [s.step for s in scalars] == list(range(STEPS))
            assert [s.value for s in scalars] == pytest.approx([value_of(site.index, t, s) for s in range(STEPS)])
            assert scalars[3].wall_time == pytest.approx(1_800_000_000.0 + 3 + site.index / 10 + t / 100)
        assert "notes/text_summary" in events.Tags()["tensors"]
    server = EventAccumulator(str(board / "server"))
    server.Reload()
    assert [(s.step, round(s.value, 4)) for s in server.Scalars("accuracy")] == [
        (r, round(0.5 + r / 20, 4)) for r in range(1, 6)
    ]


def test_plot_mlflow_renders_png(
    sqlite_job: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fig.png"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "plot_mlflow.py"),
            "--tracking-uri",
            str(sqlite_job["uri"]),
            "--job-id",
            "job-sqlite",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "3 sites + global" in done.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    # The error path in-process (the script's main()), sparing a second start of MLflow.
    spec = importlib.util.spec_from_file_location("plot_mlflow", ROOT / "bench" / "plot_mlflow.py")
    assert spec is not None and spec.loader is not None
    plot_mlflow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_mlflow)
    argv = ["--tracking-uri", str(sqlite_job["uri"]), "--job-id", "no-such-job", "--out", str(tmp_path / "no.png")]
    assert plot_mlflow.main(argv) == 1
    assert "no MLflow runs tagged job_id=no-such-job" in capsys.readouterr().err
    assert not (tmp_path / "no.png").exists()


def test_bad_events_are_bounded_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    caplog.set_level(logging.WARNING, logger="fedserver.tracking")
    limits = EventLimits(max_events_per_call=50, max_events_per_site=300, max_text_chars=200, max_params_per_site=5)
    job_dir = tmp_path / "job"
    tracking = new_tracking(job_dir, [TrackerConfig("tensorboard")], "", "job-bad", limits=limits)
    tracking.start()
    bad = FakeSite("site-1", 0)

    nan = tracking.site_events("site-1", [bad.event("scalar", tag="loss", value=float("nan"), step=3)])
    inf = tracking.site_events("site-1", [bad.event("scalar", tag="loss", value=float("-inf"), step=4)])
    huge_tag = tracking.site_events("site-1", [bad.event("scalar", tag="x" * 10_000, value=1.0)])
    long_tag = tracking.site_events("site-1", [bad.event("scalar", tag="y" * 300, value=1.0)])
    odd_name = tracking.site_events("site-1", [bad.event("scalar", tag="acc@val#1//../x", value=0.5, step=1)])
    empty = tracking.site_events("site-1", [bad.event("scalar", tag="", value=1.0)])
    kind = tracking.site_events("site-1", [bad.event("histogram", tag="w", value=1.0)])
    bad_seq = tracking.site_events("site-1", [TrackingEvent("site-1", 0, "scalar", "loss", 1.0, 0, time.time())])
    big_text = tracking.site_events("site-1", [bad.event("text", tag="log", text="z" * 100_000)])
    params = tracking.site_events("site-1", [bad.event("params", params={f"p{i}": i for i in range(4)})])
    too_many = tracking.site_events("site-1", [bad.event("params", params={f"q{i}": i for i in range(4)})])
    changed = tracking.site_events("site-1", [bad.event("params", params={"p1": "other"})])
    stranger = tracking.site_events("site-9", [TrackingEvent("site-9", 1, "scalar", "loss", 1.0, 0, time.time())])

    assert nan == "accepted 0, duplicate 0, rejected 1: NaN value for 'loss' at step 3"
    assert inf == "accepted 0, duplicate 0, rejected 1: -inf value for 'loss' at step 4"
    assert huge_tag.startswith("accepted 0, duplicate 0, rejected 1: tag of 10000 characters")
    assert long_tag == "accepted 1, duplicate 0, rejected 0; renamed 1"
    assert odd_name == "accepted 1, duplicate 0, rejected 0; renamed 1"
    assert empty.startswith("accepted 0, duplicate 0, rejected 1: empty tag")
    assert kind.startswith("accepted 0, duplicate 0, rejected 1: unknown kind 'histogram'")
    assert bad_seq.startswith("accepted 0, duplicate 0, rejected 1: seq 0")
    assert big_text == "accepted 1, duplicate 0, rejected 0; text truncated 1"
    assert params == "accepted 1, duplicate 0, rejected 0"
    assert too_many.startswith("accepted 0, duplicate 0, rejected 1: over the limit of 5 params")
    assert changed.startswith("accepted 0, duplicate 0, rejected 1: param 'p1' changed from '1' to 'other'")
    assert stranger.startswith("accepted 0, duplicate 0, rejected 1: site 'site-9' is not in this job")

    # A flood: 50 events looked at per call, 300 judged per site and job; the rest dropped unread, counted,
    # warned once. Unread shows: the NaN values sent past the site's limit count as over the limit, never as
    # NaN, and the journal holds the 100 accepted events and nothing of the rest.
    flood = FakeSite("site-2", 1)
    notes = []
    for call in range(10):
        if call < 2:
            events = flood.scalars(range(40), tags=("a", "b", "c", "d", "e"))  # 200 events a call
        else:
            events = [flood.event("scalar", tag="a", value=float("nan"), step=step) for step in range(200)]
        notes.append(tracking.site_events("site-2", events))
    assert notes[0] == "accepted 50, duplicate 0, rejected 150: over the limit of 50 events per call (batch limit 150)"
    assert notes[1] == (
        "accepted 50, duplicate 0, rejected 150: over the limit of 50 events per call (batch limit 50, site limit 100)"
    )
    assert notes[2] == "accepted 0, duplicate 0, rejected 200: over the limit of 300 events per site (site limit 200)"
    assert notes[9] == notes[2]
    assert journal_lines(job_dir, "sites/site-2") == 100
    # The job goes on: the other sites and the server still get through.
    good = FakeSite("site-3", 2)
    assert tracking.site_events("site-3", good.scalars(range(3))) == "accepted 9, duplicate 0, rejected 0"
    tracking.global_metrics(1, {"accuracy": 0.9, "broken": float("nan")})

    report = tracking.close(timeout=60)

    assert report.complete
    assert report.accepted == 4 + 100 + 9 + 1  # site-1 4, flood 100, site-3 9, global 1
    assert report.rejected_reasons == {
        "non-finite value": 3,
        "tag too long": 1,
        "empty tag": 1,
        "unknown kind": 1,
        "bad seq": 1,
        "params limit": 1,
        "param changed": 1,
        "not accepted": 1,
        "batch limit": 200,
        "site limit": 1700,
    }
    assert report.rejected_by_site == {"site-1": 8, "site-9": 1, "site-2": 1900, "(server)": 1}
    assert report.adjusted == {"renamed": 2, "text truncated": 1}
    assert len(warnings_about(caplog, "site-2:")) == 2  # one per reason, not one per event
    assert len(warnings_about(caplog, "refusing")) == 11  # site-1 7, site-9 1, site-2 2, server 1
    events = EventAccumulator(str(job_dir / "result" / "tensorboard" / "site-1"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert "acc_val_1/_/_/x" in scalars
    long_key = next(tag for tag in scalars if tag.startswith("yyy"))
    assert len(long_key) == 250 and long_key == mlflow_name("y" * 300)
    text_file = job_dir / "tracking" / "text" / "sites" / "site-1" / "log.txt"
    assert "[... truncated" in text_file.read_text() and text_file.stat().st_size < 1000


def test_state_survives_a_server_restart(tmp_path: Path) -> None:
    """A new JobTracking on the same job folder knows what was accepted: resends stay duplicates."""
    job_dir = tmp_path / "job"
    site = FakeSite("site-1", 0)
    first = new_tracking(job_dir, [], "", "job-restart")
    send(first, site, site.scalars(range(5)))
    first.close(timeout=1)
    # A torn last line, as a crash in the middle of a write would leave it.
    journal = job_dir / "tracking" / "journal" / "sites" / "site-1.jsonl"
    with journal.open("ab") as out:
        out.write(b'{"i":16,"k":"met')

    second = new_tracking(job_dir, [], "", "job-restart")
    assert second.site_events("site-1", site.sent) == f"accepted 0, duplicate {len(site.sent)}, rejected 0"
    assert second.site_events("site-1", site.scalars(range(5, 6))) == "accepted 3, duplicate 0, rejected 0"
    assert second.report.accepted == 18
    lines = journal.read_bytes().splitlines()
    assert [json.loads(line)["i"] for line in lines] == list(range(1, 19))


def test_job_params_from_a_job_spec() -> None:
    from fedgrid.jobspec import ServerConfig, TargetMetric, Tracking
    from fedserver.tracking.factory import job_params

    class Spec:
        name = "fashion"
        server = ServerConfig(
            num_rounds=5,
            min_clients=2,
            target_metric=TargetMetric(name="accuracy", value=0.8),
            tracking=(Tracking(type="mlflow"),),
        )

    params = job_params(Spec(), ["site-1", "site-2"])  # type: ignore[arg-type]
    assert params["num_rounds"] == 5 and params["sites"] == 2 and params["job_name"] == "fashion"
    assert params["target_metric"] == "accuracy >= 0.8"
    assert "tracking" not in params
