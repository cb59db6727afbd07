"""Attack campaign, authorization and identity: real daemons from real kits, real gRPC over mutual TLS.

Who may see a job (its configuration, logs, metrics, models, code) is the ownership rule of the role's
`manage` scope for every command that reveals it; where a job's metrics go is the server operator's
choice; and the CA-signed roster, not the certificate alone, says who is who: a certificate whose role
or org differs from it is refused, and a newer roster that demotes an admin or drops a site takes effect
from the next call. Each refusal leaves nothing behind and the daemons go on serving.
"""

from __future__ import annotations

import datetime as dt
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from conftest import ProvisionedProject, provision_project
from cryptography.hazmat.primitives import serialization
from federation import Federation, log_text, running, wait_until
from test_foundation import channel, forged, pem

from fedgrid.certs import Identity
from fedgrid.errors import AuthorizationError, JobSpecError
from fedgrid.recipe import FedAvgRecipe
from fedgrid.session import Session
from fedgrid.v1 import admin_pb2, admin_pb2_grpc, federation_pb2, federation_pb2_grpc
from provision.ca import create_root_ca, issue_certificate

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
ADMINS = (
    ("boss@org-a.example", "org-a", "project_admin"),
    ("chief@org-a.example", "org-a", "org_admin"),
    ("chief@org-b.example", "org-b", "org_admin"),
    ("lead@org-a.example", "org-a", "lead"),
    ("lead@org-b.example", "org-b", "lead"),
    ("member@org-a.example", "org-a", "member"),
)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    return provision_project(tmp_path_factory.mktemp("campaign-access"), n_sites=3, admins=ADMINS)


@pytest.fixture(scope="module")
def federation(project: ProvisionedProject) -> Iterator[Federation]:
    with running(project, project.sites[:2]) as fed:
        yield fed


def admin(project: ProvisionedProject, name: str) -> Session:
    return Session(next(k for k in project.admins if k.name == name), timeout=20)


def tiny(name: str, **options: object) -> FedAvgRecipe:
    return FedAvgRecipe(
        name=name, model=torch.nn.Linear(8, 1), train_script=SCRIPT, num_rounds=1, min_clients=2, **options
    )


def stored_jobs(project: ProvisionedProject) -> set[str]:
    return {p.name for p in (project.server / "workspace" / "jobs").iterdir()}


@pytest.fixture(scope="module")
def lead_a_job(project: ProvisionedProject, federation: Federation, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A finished job of lead@org-a.example."""
    with admin(project, "lead@org-a.example") as lead:
        job_id = lead.submit_job(tiny("lead-a-secret").export(tmp_path_factory.mktemp("lead-a") / "job"))
        info = lead.wait(job_id)
    assert info.status == "FINISHED:COMPLETED", info.error
    return job_id


def reveal_everything(session: Session, job_id: str, tmp: Path) -> dict[str, object]:
    """Every command that shows a job's content; each answer, or the error it raised."""
    commands = {
        "show_job": lambda: session.show_job(job_id),
        "job_log": lambda: session.job_log(job_id, "server", 0),
        "site_log": lambda: session.job_log(job_id, "site-1", 0),
        "watch_job": lambda: list(session.watch_job(job_id)),
        "download_job": lambda: session.download_job(job_id, tmp / session.name),
        "clone_job": lambda: session.clone_job(job_id),
    }
    answers: dict[str, object] = {}
    for name, command in commands.items():
        try:
            answers[name] = command()
        except AuthorizationError as exc:
            answers[name] = exc
    return answers


def test_a_lead_can_neither_see_nor_clone_another_leads_job(
    project: ProvisionedProject, federation: Federation, lead_a_job: str, tmp_path: Path
) -> None:
    before = stored_jobs(project)
    with admin(project, "lead@org-b.example") as lead_b:
        listed = {j.job_id: j for j in lead_b.list_jobs(all=True)}
        answers = reveal_everything(lead_b, lead_a_job, tmp_path)
    assert listed[lead_a_job].name == "lead-a-secret" and listed[lead_a_job].status == "FINISHED:COMPLETED"
    for command, answer in answers.items():
        assert isinstance(answer, AuthorizationError), f"{command} answered {answer!r}"
        assert "needs role project_admin or org_admin of the job's org or lead who submitted the job" in str(answer)
        assert "you are lead@org-b.example" in str(answer)
    assert stored_jobs(project) == before, "a refused clone left a job behind"
    assert not (tmp_path / "lead@org-b.example").exists()
    wait_until(
        lambda: "CloneJob refused: clone_job on job submitted by lead@org-a.example" in log_text(project.server),
        10,
        "the refusal in the server log",
    )


def test_an_org_admin_sees_the_jobs_of_their_org_only_and_a_member_sees_names_and_states(
    project: ProvisionedProject, federation: Federation, lead_a_job: str, tmp_path: Path
) -> None:
    with admin(project, "chief@org-b.example") as chief_b:
        assert all(isinstance(a, AuthorizationError) for a in reveal_everything(chief_b, lead_a_job, tmp_path).values())
    with admin(project, "member@org-a.example") as member:
        assert lead_a_job in {j.job_id for j in member.list_jobs(all=True)}
        answers = reveal_everything(member, lead_a_job, tmp_path)
    for command, answer in answers.items():
        assert isinstance(answer, AuthorizationError), f"a member's {command} answered {answer!r}"
    assert "role member" in str(answers["show_job"])
    for name in ("chief@org-a.example", "lead@org-a.example", "boss@org-a.example"):
        with admin(project, name) as allowed:
            answers = reveal_everything(allowed, lead_a_job, tmp_path)
            refused = {c: a for c, a in answers.items() if isinstance(a, AuthorizationError)}
            assert not refused, f"{name}: {refused}"
            assert (tmp_path / name / lead_a_job / "job_info.json").exists()
            assert "round 1" in str(answers["job_log"])
            clone = next(j for j in allowed.list_jobs(all=True) if j.job_id == answers["clone_job"])
            assert (clone.cloned_from, clone.submitter) == (lead_a_job, name)
            allowed.abort_job(clone.job_id)


class Listener:
    """A TCP port that counts who connects: where a forged tracking URI would send the server."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


def test_a_job_cannot_choose_where_the_server_sends_its_metrics(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    listener = Listener()
    outside = tmp_path / "outside"
    uris = [
        f"http://127.0.0.1:{listener.port}",
        f"sqlite:///{outside / 'stolen.db'}",
        f"file://{outside / 'mlruns'}",
    ]
    before = stored_jobs(project)
    try:
        with admin(project, "lead@org-a.example") as lead:
            for i, uri in enumerate(uris):
                recipe = tiny(f"ssrf-{i}")
                recipe.add_experiment_tracking("mlflow", tracking_uri=uri)
                with pytest.raises(JobSpecError) as err:
                    lead.submit_job(recipe.export(tmp_path / f"job-{i}"))
                assert f"names tracking_uri {uri!r}, which this server does not allow" in str(err.value)
                assert "leave it empty for the server's own store" in str(err.value)
                assert "tracking_uris" in str(err.value)
            job_id = lead.submit_job(_tracked(tmp_path / "own-store"))
            info = lead.wait(job_id)
        assert info.status == "FINISHED:COMPLETED", info.error
    finally:
        listener.close()
    assert listener.connections == 0, "the server connected to a URI a job chose"
    assert not outside.exists(), "the server wrote outside its workspace"
    assert stored_jobs(project) - before == {job_id}


def _tracked(folder: Path) -> Path:
    recipe = tiny("own-store")
    recipe.add_experiment_tracking("mlflow")
    return recipe.export(folder)


def test_certificates_the_roster_does_not_vouch_for_are_refused(
    project: ProvisionedProject, federation: Federation
) -> None:
    cases = {
        "role": (Identity("lead@org-a.example", "org-a", "admin", "project_admin", project.name), "UNAUTHENTICATED"),
        "org": (Identity("lead@org-a.example", "org-b", "admin", "lead", project.name), "UNAUTHENTICATED"),
    }
    for what, (identity, code) in cases.items():
        key, cert = forged(project, identity)
        with channel(project, project.admin_port, key, cert) as ch, pytest.raises(grpc.RpcError) as err:
            admin_pb2_grpc.AdminStub(ch).ListJobs(admin_pb2.ListJobsRequest(), timeout=10)
        assert err.value.code().name == code, what
        assert "where the roster says" in err.value.details() and "ask the project admin for a new kit" in (
            err.value.details()
        ), what
    assert "role 'project_admin' where the roster says 'lead'" in log_text(project.server)
    expired_key, expired_cert = forged(
        project,
        Identity("boss@org-a.example", "org-a", "admin", "project_admin", project.name),
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=30),
        validity_days=10,
    )
    other_key, other_ca = create_root_ca("intruders")
    foreign_key, foreign_cert = issue_certificate(
        other_key, other_ca, Identity("boss@org-a.example", "org-a", "admin", "project_admin", project.name)
    )
    foreign = (pem(foreign_key), foreign_cert.public_bytes(serialization.Encoding.PEM))
    for key, cert in ((expired_key, expired_cert), foreign):
        with channel(project, project.admin_port, key, cert) as ch, pytest.raises(grpc.RpcError) as err:
            admin_pb2_grpc.AdminStub(ch).ListJobs(admin_pb2.ListJobsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with admin(project, "member@org-a.example") as member:
        assert member.role == "member" and len(member.check_status("client")) == 3  # type: ignore[arg-type]


def test_a_newer_roster_demotes_an_admin_and_drops_a_site_from_the_next_call(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    """Last in this module: it provisions the project again, and the server adopts that roster."""
    old_lead = admin(project, "lead@org-a.example")
    assert old_lead.role == "lead"
    demoted = tuple((n, o, "member" if n == "lead@org-a.example" else r) for n, o, r in ADMINS)
    later = provision_project(
        project.project_file.parent,
        n_sites=2,
        admins=demoted,
        fed_port=project.fed_port,
        admin_port=project.admin_port,
    )
    assert later.prod_dir.name == "prod_01"
    # Any participant with a kit of the new run presents its roster on its first call.
    with Session(later.prod_dir / "boss@org-a.example", timeout=20) as boss:
        assert boss.role == "project_admin"
    wait_until(lambda: "adopted roster version 2" in log_text(project.server), 10, "roster v2 adopted")
    with old_lead, pytest.raises(Exception) as err:
        old_lead.list_jobs()
    assert "role 'lead' where the roster says 'member'" in str(err.value)
    assert "ask the project admin for a new kit" in str(err.value)
    with Session(later.prod_dir / "lead@org-a.example", timeout=20) as new_kit:
        assert new_kit.role == "member"
        with pytest.raises(AuthorizationError, match="submit_job needs role"):
            new_kit.submit_job(tiny("demoted").export(tmp_path / "demoted"))
    site_3 = project.sites[2]
    with (
        channel(
            project,
            project.fed_port,
            (site_3 / "startup" / "key.pem").read_bytes(),
            (site_3 / "startup" / "cert.pem").read_bytes(),
        ) as ch,
        pytest.raises(grpc.RpcError) as err,
    ):
        federation_pb2_grpc.FederationStub(ch).Register(federation_pb2.RegisterRequest(hostname="gone"), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not a participant" in err.value.details()
    federation.wait_alive(["site-1", "site-2"])
