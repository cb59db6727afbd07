"""The secure foundation end to end: real daemons from real kits, real gRPC over mutual TLS on loopback.

Each refusal case checks two things: the caller is refused (with a log line on the server saying who
and why), and the server goes on serving everyone else.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import ProvisionedProject, provision_project
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from federation import ENV, Federation, log_text, running, set_local, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedgrid.certs import Identity
from fedgrid.errors import KitError
from fedgrid.grpc_errors import UnreachableError
from fedgrid.session import Session
from fedgrid.transfer import GRPC_OPTIONS
from fedgrid.v1 import admin_pb2, admin_pb2_grpc, federation_pb2, federation_pb2_grpc
from provision.ca import create_root_ca, issue_certificate

ROLES = ("project_admin", "org_admin", "lead", "member")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    project = provision_project(tmp_path_factory.mktemp("foundation"), n_sites=3, admins=ROLES)
    set_local(project.server, "server.json", heartbeat_timeout=2.0)
    for site in project.sites:
        set_local(site, "site.json", heartbeat_interval=0.5)
    return project


@pytest.fixture(scope="module")
def federation(project: ProvisionedProject) -> Iterator[Federation]:
    with running(project, project.sites[:2]) as fed:
        yield fed


def pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def channel(project: ProvisionedProject, port: int, key_pem: bytes, cert_pem: bytes) -> grpc.Channel:
    root = (project.server / "startup" / "rootCA.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key_pem, certificate_chain=cert_pem)
    return grpc.secure_channel(f"{project.host}:{port}", creds, options=GRPC_OPTIONS)


def kit_channel(project: ProvisionedProject, kit: Path, port: int) -> grpc.Channel:
    return channel(
        project, port, (kit / "startup" / "key.pem").read_bytes(), (kit / "startup" / "cert.pem").read_bytes()
    )


def register(ch: grpc.Channel) -> federation_pb2.RegisterReply:
    return federation_pb2_grpc.FederationStub(ch).Register(federation_pb2.RegisterRequest(hostname="test"), timeout=10)


def forged(project: ProvisionedProject, identity: Identity, **kwargs: object) -> tuple[bytes, bytes]:
    """A key and certificate signed by the project's own root CA (from its state folder)."""
    ca_key = serialization.load_pem_private_key((project.state_dir / "rootCA.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((project.state_dir / "rootCA.pem").read_bytes())
    key, cert = issue_certificate(ca_key, ca_cert, identity, **kwargs)  # type: ignore[arg-type]
    return pem(key), cert.public_bytes(serialization.Encoding.PEM)


def assert_still_serving(fed: Federation) -> None:
    with fed.session() as session:
        assert fed.alive(session) == ["site-1", "site-2"]


def test_server_and_two_sites_are_seen_by_check_status(federation: Federation) -> None:
    with federation.session() as session:
        assert (session.name, session.role) == ("project-admin@org-a.example", "project_admin")
        sites = {s.name: s for s in session.check_status("client")}  # type: ignore[union-attr]
        assert sites["site-1"].state == sites["site-2"].state == "alive"
        assert sites["site-3"].state == "never connected"
        assert "127.0.0.1" in sites["site-1"].address
        server = session.check_status("server")
        assert server.sites_alive == 2 and server.sites_known == 3  # type: ignore[union-attr]
        only = session.check_status("client", ["site-2"])
        assert [s.name for s in only] == ["site-2"]  # type: ignore[union-attr]


def test_every_role_can_check_status(federation: Federation) -> None:
    for role in ROLES:
        with federation.session(role) as session:
            assert session.role == role
            assert len(session.check_status("client")) == 3  # type: ignore[arg-type]


def test_health_service_answers_on_both_ports(project: ProvisionedProject, federation: Federation) -> None:
    for kit, port in ((project.sites[0], project.fed_port), (project.admin_roles["member"], project.admin_port)):
        with kit_channel(project, kit, port) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for service in ("", "fedgrid.v1.Federation", "fedgrid.v1.Admin"):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_site_certificate_on_admin_port_is_refused(project: ProvisionedProject, federation: Federation) -> None:
    with kit_channel(project, project.sites[0], project.admin_port) as ch:
        with pytest.raises(grpc.RpcError) as err:
            admin_pb2_grpc.AdminStub(ch).Hello(admin_pb2.HelloRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "site certificate on the admin port" in err.value.details()
    wait_until(
        lambda: "refused site-1" in log_text(project.server) and "admin port" in log_text(project.server),
        10,
        "the refusal in the server log",
    )
    assert_still_serving(federation)


def test_admin_certificate_on_federation_port_is_refused(project: ProvisionedProject, federation: Federation) -> None:
    admin = project.admin_roles["project_admin"]
    with kit_channel(project, admin, project.fed_port) as ch, pytest.raises(grpc.RpcError) as err:
        register(ch)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "admin certificate on the federation port" in err.value.details()
    wait_until(lambda: f"refused {admin.name}" in log_text(project.server), 10, "the refusal in the server log")
    assert_still_serving(federation)


def test_certificate_of_another_project_ca_is_refused(project: ProvisionedProject, federation: Federation) -> None:
    other_key, other_ca = create_root_ca("intruders")
    key, cert = issue_certificate(other_key, other_ca, Identity("site-1", "org-a", "client", None, project.name))
    with channel(project, project.fed_port, pem(key), cert.public_bytes(serialization.Encoding.PEM)) as ch:
        with pytest.raises(grpc.RpcError) as err:
            register(ch)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_until(lambda: "not issued by this project's root CA" in log_text(project.server), 10, "TLS refusal logged")
    assert_still_serving(federation)


def test_expired_certificate_is_refused(project: ProvisionedProject, federation: Federation) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    key, cert = forged(
        project, Identity("site-1", "org-a", "client", None, project.name), not_before=past, validity_days=10
    )
    with channel(project, project.fed_port, key, cert) as ch, pytest.raises(grpc.RpcError) as err:
        register(ch)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_until(lambda: "client certificate has expired" in log_text(project.server), 10, "expiry logged")
    assert_still_serving(federation)


def test_certificate_of_a_non_participant_is_refused(project: ProvisionedProject, federation: Federation) -> None:
    key, cert = forged(project, Identity("mallory", "org-a", "client", None, project.name))
    with channel(project, project.fed_port, key, cert) as ch, pytest.raises(grpc.RpcError) as err:
        register(ch)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not a participant" in err.value.details()
    wait_until(lambda: "refused mallory" in log_text(project.server), 10, "the refusal in the server log")
    assert_still_serving(federation)


def test_second_daemon_of_the_same_site_is_refused(project: ProvisionedProject, federation: Federation) -> None:
    site = project.sites[0]
    result = subprocess.run(
        [sys.executable, "-m", "fedclient", "--kit", str(site), "--no-ready-file"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 4
    assert "site-1 is already connected" in result.stderr
    assert_still_serving(federation)


def test_silent_site_is_shown_dead_then_alive_again(project: ProvisionedProject, federation: Federation) -> None:
    site = project.sites[1]
    pid = federation.pid(site)
    os.kill(pid, signal.SIGSTOP)
    try:
        with federation.session() as session:
            wait_until(lambda: "site-2" not in federation.alive(session), 15, "site-2 shown dead")
            state = {s.name: s.state for s in session.check_status("client")}  # type: ignore[union-attr]
            assert state["site-2"] == "dead" and state["site-1"] == "alive"
    finally:
        os.kill(pid, signal.SIGCONT)
    federation.wait_alive(["site-1", "site-2"], timeout=15)


def test_sites_reconnect_after_the_server_restarts(project: ProvisionedProject, federation: Federation) -> None:
    federation.stop(project.server)
    with pytest.raises(UnreachableError, match="is it running"):
        Session(project.admin_roles["member"], timeout=3)
    federation.start(project.server)
    federation.wait_alive(["site-1", "site-2"], timeout=30)
    assert log_text(project.sites[0]).count("registered with") >= 2


def test_site_added_by_a_later_provisioning_joins_the_running_server(
    project: ProvisionedProject, federation: Federation
) -> None:
    later = provision_project(
        project.project_file.parent, n_sites=4, admins=ROLES, fed_port=project.fed_port, admin_port=project.admin_port
    )
    assert later.prod_dir.name == "prod_01"
    assert (later.state_dir / "rootCA.pem").read_bytes() == (project.state_dir / "rootCA.pem").read_bytes()
    new_site = later.prod_dir / "site-4"
    federation.start(new_site)
    try:
        with federation.session() as session:
            wait_until(lambda: "site-4" in federation.alive(session), 20, "site-4 alive")
        assert "adopted roster version 2" in log_text(project.server)
    finally:
        federation.stop(new_site)


def test_tampered_kit_is_refused_and_names_the_file(project: ProvisionedProject, tmp_path: Path) -> None:
    kit = tmp_path / "site-3"
    shutil.copytree(project.sites[2], kit)
    config = kit / "startup" / "config.json"
    config.write_text(config.read_text().replace(str(project.fed_port), "1"))
    result = subprocess.run([str(kit / "startup" / "start.sh")], env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "config.json was changed after signing" in result.stdout + result.stderr + log_text(kit)
    assert not (kit / "daemon.pid").exists() or not _alive(int((kit / "daemon.pid").read_text()))


def test_session_refuses_a_kit_that_is_not_an_admin_kit(project: ProvisionedProject) -> None:
    with pytest.raises(KitError, match="needs an? admin kit"):
        Session(project.sites[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
