"""A job worker's Work stream against the real server daemon, over mutual TLS with real site kits: every
way a stream can break the protocol is refused with a status that says why, the stream is closed, and
the server goes on serving everyone else; a refusal that leaves the stream in step keeps it usable;
silent streams are closed after their deadline; one identity cannot hold more streams than its quota."""

from __future__ import annotations

import os
import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from conftest import ProvisionedProject, provision_project
from federation import Federation, log_text, running, set_local, wait_until

from fedclient.work_stream import WorkStream
from fedgrid import transfer
from fedgrid.errors import NotFoundError
from fedgrid.kit import load_kit
from fedgrid.recipe import FedAvgRecipe
from fedgrid.session import Session
from fedgrid.tls import secure_channel
from fedgrid.v1 import federation_pb2 as fpb
from fedgrid.v1 import federation_pb2_grpc

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
IDLE = 3.0
"""The server's stream_idle_timeout in this module: short, so that silence is noticed quickly."""
QUOTA = 6
"""The server's max_streams_per_identity in this module."""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    project = provision_project(tmp_path_factory.mktemp("stream"), n_sites=3)
    set_local(project.server, "server.json", stream_idle_timeout=IDLE, max_streams_per_identity=QUOTA)
    return project


@pytest.fixture(scope="module")
def federation(project: ProvisionedProject) -> Iterator[Federation]:
    with running(project) as fed:
        yield fed


class RawStream:
    """A Work stream whose requests are raw bytes, so that a test can send anything at all."""

    def __init__(self, kit: Path) -> None:
        self.channel = secure_channel(load_kit(kit), load_kit(kit).fed_port)
        call = self.channel.stream_stream(
            "/fedgrid.v1.Federation/Work",
            request_serializer=lambda raw: raw,
            response_deserializer=fpb.ServerMessage.FromString,
        )
        self.outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.answers = call(iter(self.outbox.get, None), timeout=60)

    def send(self, message: fpb.WorkerMessage | bytes) -> None:
        self.outbox.put(message if isinstance(message, bytes) else message.SerializeToString())

    def answer(self) -> fpb.ServerMessage:
        return next(self.answers)

    def closed_with(self) -> grpc.RpcError:
        """Read until the server ends the stream; its error."""
        with pytest.raises(grpc.RpcError) as err:
            while True:
                next(self.answers)
        return err.value

    def close(self) -> None:
        self.outbox.put(None)
        self.channel.close()


def hello(job_id: str = "no-such-job") -> fpb.WorkerMessage:
    return fpb.WorkerMessage(hello=fpb.WorkerHello(job_id=job_id))


def result(task_id: str, data: bytes = b"", trailer: int | None = None, header: bool = True) -> fpb.WorkerMessage:
    frame = fpb.ResultFrame(data=data)
    if header:
        frame.header.CopyFrom(fpb.ResultHeader(job_id="x", task_id=task_id, payload_format="safetensors"))
    if trailer is not None:
        frame.trailer.size = trailer
    return fpb.WorkerMessage(result=frame)


def run_tiny_job(project: ProvisionedProject, tmp: Path, name: str) -> str:
    recipe = FedAvgRecipe(name=name, model=torch.nn.Linear(8, 1), train_script=SCRIPT, num_rounds=2, min_clients=3)
    with Session(project.admin_roles["project_admin"], timeout=20) as session:
        job_id = session.submit_job(recipe.export(tmp / name))
        info = session.wait(job_id)
    assert info.status == "FINISHED:COMPLETED", info.error
    return job_id


def garbage_cases() -> list[tuple[str, list[fpb.WorkerMessage | bytes], grpc.StatusCode, str]]:
    return [
        ("no hello", [fpb.WorkerMessage(next_task=fpb.TaskRequest())], grpc.StatusCode.INVALID_ARGUMENT, "hello"),
        ("unknown message", [hello(), fpb.WorkerMessage()], grpc.StatusCode.INVALID_ARGUMENT, "unexpected message"),
        ("does not parse", [hello(), b"\xff\xff\xff\xff\x07"], grpc.StatusCode.INVALID_ARGUMENT, "does not parse"),
        (
            "result without header",
            [hello(), result("t", b"abc", header=False)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "does not start with a header",
        ),
        (
            "oversized message",
            [hello(), result("t", os.urandom(transfer.MAX_MESSAGE_BYTES + 1))],
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "",
        ),
    ]


@pytest.mark.parametrize(("case", "messages", "code", "detail"), garbage_cases(), ids=[c[0] for c in garbage_cases()])
def test_garbage_closes_the_stream_with_a_status_that_says_why(
    federation: Federation, project: ProvisionedProject, case: str, messages: list, code: grpc.StatusCode, detail: str
) -> None:
    stream = RawStream(project.sites[0])
    try:
        for message in messages:
            stream.send(message)
        error = stream.closed_with()
    finally:
        stream.close()
    assert error.code() == code, error.details()
    assert detail in (error.details() or "")
    assert "internal error" not in (error.details() or "")
    federation.wait_alive([s.name for s in project.sites])


def test_a_result_cut_short_is_refused_and_its_bytes_are_dropped(
    federation: Federation, project: ProvisionedProject, tmp_path: Path
) -> None:
    job_id = _running_job(project, tmp_path, "cut-short")
    try:
        stream = RawStream(project.sites[0])
        stream.send(hello(job_id))
        assert stream.answer().reply.idle_timeout == IDLE
        stream.send(result("round-1-train", b"x" * 1000, trailer=5000))
        error = stream.closed_with()
        stream.close()
        assert error.code() == grpc.StatusCode.DATA_LOSS
        assert "announces 5000 bytes, 1000 arrived" in error.details()
    finally:
        _abort(project, job_id)
    tmp_dir = project.server / "workspace" / "jobs" / job_id / "tmp"
    assert not list(tmp_dir.glob("*.part")), "a refused result must leave nothing spooled"


def test_a_refusal_in_step_keeps_the_stream_usable(federation: Federation, project: ProvisionedProject) -> None:
    stream = WorkStream(load_kit(project.sites[1]), "no-such-job")
    try:
        with pytest.raises(NotFoundError, match="no job 'no-such-job'"):
            stream.result(fpb.ResultHeader(task_id="t"), lambda: [b"abc"])
        header, _payload = stream.task(fpb.TaskRequest(job_id="no-such-job"))
        assert header.kind == "end"
    finally:
        stream.close()


def test_a_silent_stream_is_closed_after_its_deadline(federation: Federation, project: ProvisionedProject) -> None:
    for opening in ([], [hello()]):
        stream = RawStream(project.sites[2])
        try:
            for message in opening:
                stream.send(message)
            if opening:
                assert stream.answer().HasField("reply")
            error = stream.closed_with()
        finally:
            stream.close()
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"nothing received for {IDLE:g} s" in error.details()


def test_one_identity_holds_at_most_its_quota_of_streams_and_200_idle_connections_stop_nobody(
    federation: Federation, project: ProvisionedProject, tmp_path: Path
) -> None:
    kit = load_kit(project.sites[0])
    channels = [secure_channel(kit, kit.fed_port) for _ in range(200)]
    streams: list[RawStream] = []
    try:
        for channel in channels:
            federation_pb2_grpc.FederationStub(channel).Heartbeat(fpb.HeartbeatRequest(), timeout=20)
        # site-1's daemon holds its command stream, and its job worker will need one more: fill the rest.
        while True:
            stream = RawStream(project.sites[0])
            streams.append(stream)
            stream.send(hello())
            try:
                stream.answer()
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "max_streams_per_identity" in exc.details()
                break
            assert len(streams) <= QUOTA, "the quota was not enforced"
        for stream in streams:
            stream.close()
        streams.clear()
        wait_until(lambda: "refused a Work stream of site-1" in log_text(project.server), 30, "the refusal logged")
        # 200 idle connections of site-1 are still open: every site, site-1 too, still runs a whole job.
        run_tiny_job(project, tmp_path, "after-idle")
    finally:
        for stream in streams:
            stream.close()
        for channel in channels:
            channel.close()


def test_a_job_runs_with_workers_that_ping_within_a_short_deadline(
    federation: Federation, project: ProvisionedProject, tmp_path: Path
) -> None:
    """The module's idle deadline is 3 s; a worker training for longer stays connected by its pings."""
    recipe = FedAvgRecipe(
        name="slow-steps",
        model=torch.nn.Linear(8, 1),
        train_script=SCRIPT,
        train_args="--step_seconds 5",
        num_rounds=1,
        min_clients=3,
    )
    with Session(project.admin_roles["project_admin"], timeout=20) as session:
        info = session.wait(session.submit_job(recipe.export(tmp_path / "slow")))
    assert info.status == "FINISHED:COMPLETED", info.error


def _running_job(project: ProvisionedProject, tmp: Path, name: str) -> str:
    """A job whose round 1 waits on a slow step at every site, so a test can talk to it while it runs."""
    recipe = FedAvgRecipe(
        name=name,
        model=torch.nn.Linear(8, 1),
        train_script=SCRIPT,
        train_args="--step_seconds 30",
        num_rounds=1,
        min_clients=3,
    )
    with Session(project.admin_roles["project_admin"], timeout=20) as session:
        job_id = session.submit_job(recipe.export(tmp / name))
        wait_until(lambda: "model sent to" in _job_log(project, job_id), 60, "round 1 dispatched")
    return job_id


def _job_log(project: ProvisionedProject, job_id: str) -> str:
    path = project.server / "workspace" / "jobs" / job_id / "log.txt"
    return path.read_text(errors="replace") if path.exists() else ""


def _abort(project: ProvisionedProject, job_id: str) -> None:
    with Session(project.admin_roles["project_admin"], timeout=20) as session:
        session.abort_job(job_id)
        session.wait(job_id)
