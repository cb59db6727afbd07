"""The data lane (fedgrid/lane.py) with real daemons over mutual TLS: jobs move their models and
updates over it, go on over gRPC when its port is closed, and the server refuses strangers and
garbage on it while it goes on serving everyone else."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ProvisionedProject, provision_project
from federation import Federation, log_text, running, set_local, wait_until

from fedgrid import lane
from fedgrid.errors import IdentityError, NotFoundError, StateError
from fedgrid.kit import load_kit
from fedgrid.recipe import FedAvgRecipe
from fedgrid.transfer import MAX_MESSAGE_BYTES
from fedgrid.v1 import common_pb2
from fedgrid.v1 import federation_pb2 as fpb

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    return provision_project(tmp_path_factory.mktemp("lane"), n_sites=2)


@pytest.fixture(scope="module")
def federation(project: ProvisionedProject) -> Iterator[Federation]:
    with running(project) as fed:
        yield fed


def run_job(fed: Federation, tmp: Path, name: str) -> str:
    recipe = FedAvgRecipe(name=name, model=torch.nn.Linear(8, 1), train_script=SCRIPT, num_rounds=2, min_clients=2)
    with fed.session() as session:
        job_id = session.submit_job(recipe.export(tmp / "jobs" / name))
        assert session.wait(job_id).status == "FINISHED:COMPLETED"
        return job_id


def site_job_log(site: Path, job_id: str) -> str:
    return (site / "workspace" / "jobs" / job_id / "log.txt").read_text(errors="replace")


def connect(project: ProvisionedProject, kit: Path, trust: Path | None = None) -> ssl.SSLSocket:
    """A raw lane connection presenting `kit`'s certificate (and trusting `trust`'s root CA)."""
    context = lane.client_context(load_kit(kit))
    if trust is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(load_kit(trust).root_ca_path))
        own = load_kit(kit)
        context.load_cert_chain(str(own.cert_path), str(own.key_path))
    raw = socket.create_connection((project.host, project.data_port), timeout=10)
    return context.wrap_socket(raw, server_hostname=project.host)


def refusal(sock: ssl.SSLSocket) -> Exception:
    kind, body = lane.receive(sock)
    assert kind == lane.ERROR, f"expected a refusal, got {kind!r}"
    return lane.error_from_body(body, "test")


def assert_lane_serves(project: ProvisionedProject) -> None:
    """A site's fresh connection is answered: the server is still serving the lane."""
    with connect(project, project.sites[0]) as sock:
        lane.send(sock, lane.TASK, fpb.TaskRequest(job_id="no-such-job"))
        assert isinstance(refusal(sock), NotFoundError)


def test_a_job_moves_its_models_and_updates_over_the_data_lane(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    job_id = run_job(federation, tmp_path, "over-the-lane")
    server_log = log_text(project.server)
    for site in project.sites:
        assert f"data lane: {site.name} connected" in server_log
        assert "data lane:" not in site_job_log(site, job_id), "the worker fell back to gRPC"


def test_with_the_data_port_closed_jobs_go_on_over_grpc(tmp_path: Path) -> None:
    project = provision_project(tmp_path / "closed", n_sites=2)
    set_local(project.server, "server.json", data_lane=False)
    with running(project) as fed:
        assert "data port closed (data_lane is off" in log_text(project.server)
        job_id = run_job(fed, tmp_path, "over-grpc")
    for site in project.sites:
        text = site_job_log(site, job_id)
        assert "data lane: cannot connect" in text and "going on over gRPC" in text


def test_a_site_that_turns_the_lane_off_stays_on_grpc(tmp_path: Path) -> None:
    project = provision_project(tmp_path / "site-off", n_sites=2)
    for site in project.sites:
        set_local(site, "site.json", data_lane=False)
    with running(project) as fed:
        job_id = run_job(fed, tmp_path, "site-off")
    assert "data lane: site-" not in log_text(project.server)
    assert all("data lane:" not in site_job_log(site, job_id) for site in project.sites)


def test_an_admin_certificate_is_refused_on_the_lane(project: ProvisionedProject, federation: Federation) -> None:
    with connect(project, project.admins[0]) as sock:
        error = refusal(sock)
    assert isinstance(error, IdentityError)
    assert "admin certificate on the federation port" in str(error)
    assert_lane_serves(project)


def test_a_certificate_of_another_ca_fails_the_handshake(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    stranger = provision_project(tmp_path / "stranger", n_sites=1)
    with pytest.raises((ssl.SSLError, OSError, lane.LaneError)):
        with connect(project, stranger.sites[0], trust=project.server) as sock:
            lane.send(sock, lane.TASK, fpb.TaskRequest(job_id="x"))
            lane.receive(sock)
    wait_until(lambda: "data lane: TLS handshake with" in log_text(project.server), 10, "the refusal in the server log")
    assert_lane_serves(project)


def test_refused_requests_keep_the_connection(project: ProvisionedProject, federation: Federation) -> None:
    with connect(project, project.sites[0]) as sock:
        lane.send(sock, lane.TASK, fpb.TaskRequest(job_id="no-such-job"))
        error = refusal(sock)
        assert isinstance(error, NotFoundError) and "no-such-job" in str(error)
        header = fpb.ResultHeader(job_id="no-such-job", task_id="t1", payload_format="")
        lane.send(sock, lane.RESULT, fpb.ResultFrame(header=header))
        lane.send(sock, lane.RESULT, fpb.ResultFrame(trailer=common_pb2.Trailer(size=0)))
        error = refusal(sock)
        assert isinstance(error, (NotFoundError, StateError)) and "no-such-job" in str(error)
        lane.send(sock, lane.TASK, fpb.TaskRequest(job_id="no-such-job"))
        assert isinstance(refusal(sock), NotFoundError)


_HEADER = fpb.ResultFrame(header=fpb.ResultHeader(job_id="no-such-job", task_id="t1")).SerializeToString()
HEADER_ONLY = lane.PREFIX.pack(lane.RESULT, len(_HEADER)) + _HEADER


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (lane.PREFIX.pack(b"Z", 0), "unknown message kind"),
        (lane.PREFIX.pack(lane.TASK, MAX_MESSAGE_BYTES + 1), "above the limit"),
        (lane.PREFIX.pack(lane.ACK, 0), "not message kind b'A'"),
        (lane.PREFIX.pack(lane.TASK, 3) + b"\xff\xff\xff", "not a valid task request"),
        (lane.PREFIX.pack(lane.RESULT, 3) + b"\xff\xff\xff", "result frame: not a valid frame"),
        (HEADER_ONLY + lane.PREFIX.pack(lane.TASK, 0), "a result ended before its trailer"),
    ],
    ids=["unknown kind", "oversized", "out of turn", "bad task request", "bad result frame", "result cut short"],
)
def test_garbage_on_the_lane_is_refused_and_the_connection_closed(
    project: ProvisionedProject, federation: Federation, message: bytes, expected: str
) -> None:
    with connect(project, project.sites[0]) as sock:
        sock.sendall(message)
        error = refusal(sock)
        assert expected in str(error)
        with pytest.raises(lane.Closed):
            lane.receive(sock)
    assert_lane_serves(project)


def test_the_server_refuses_to_start_when_the_data_port_is_taken(tmp_path: Path) -> None:
    project = provision_project(tmp_path / "taken", n_sites=1)
    with socket.create_server((project.host, project.data_port)):
        fed = Federation(project)
        with pytest.raises(AssertionError) as failed:
            fed.start(project.server)
        fed.close()
    assert f"cannot listen on {project.host}:{project.data_port} (data port)" in str(failed.value)
    assert "change data_port in project.yml" in str(failed.value)


def test_error_bodies_name_the_class_the_server_raised() -> None:
    body = lane.error_body(StateError("task t1 is no longer open"), "SubmitResult")
    error = lane.error_from_body(body, "send")
    assert isinstance(error, StateError) and str(error) == "send: task t1 is no longer open"
    internal = json.loads(lane.error_body(ValueError("secret detail"), "GetTask"))
    assert internal["code"] == "INTERNAL" and "secret detail" not in internal["message"]
