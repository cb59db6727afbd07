"""Attack campaign, resources held: many idle TLS connections of one identity, uploads that trickle in a
byte at a time, one that trickles slower than the idle deadline, and a download whose reader stops
reading. Each holds at most its identity's quota of streams and is cut at its deadline, what it staged is
removed, and a real job of another admin runs to its end meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from conftest import ProvisionedProject, provision_project
from federation import Federation, log_text, running, set_local, wait_until

from fedgrid.kit import load_kit
from fedgrid.recipe import FedAvgRecipe
from fedgrid.session import Session
from fedgrid.tls import secure_channel
from fedgrid.v1 import admin_pb2, admin_pb2_grpc

SCRIPTS = Path(__file__).parent / "scripts"
IDLE = 3.0
"""The server's stream_idle_timeout in this module."""
QUOTA = 4
"""The server's max_streams_per_identity in this module."""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    project = provision_project(tmp_path_factory.mktemp("campaign-res"), n_sites=2, admins=("project_admin", "lead"))
    set_local(project.server, "server.json", stream_idle_timeout=IDLE, max_streams_per_identity=QUOTA)
    return project


@pytest.fixture(scope="module")
def federation(project: ProvisionedProject) -> Iterator[Federation]:
    with running(project) as fed:
        yield fed


def staged(project: ProvisionedProject) -> list[str]:
    return [p.name for p in (project.server / "workspace" / "jobs").glob(".incoming-*")]


class Trickle:
    """A job upload that sends one byte every `every` seconds until told to stop, on its own connection."""

    def __init__(self, kit: Path, every: float) -> None:
        self.kit = load_kit(kit)
        self.channel = secure_channel(self.kit, self.kit.admin_port)
        self.every = every
        self.stop = threading.Event()
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _frames(self) -> Iterator[admin_pb2.UploadFrame]:
        yield admin_pb2.UploadFrame(header=admin_pb2.UploadHeader(signed_manifest=b"{}", size=1 << 20))
        while not self.stop.wait(self.every):
            yield admin_pb2.UploadFrame(data=b"x")

    def _run(self) -> None:
        try:
            admin_pb2_grpc.AdminStub(self.channel).SubmitJob(self._frames(), timeout=120)
        except grpc.RpcError as exc:
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.channel.close()


def quota_full(kit: Path) -> bool:
    """Whether one more upload of `kit`'s admin is refused for its quota (it is a garbage upload otherwise)."""
    with Session(kit, timeout=20) as session:
        header = admin_pb2.UploadHeader(signed_manifest=b"{}", size=3)
        frame = admin_pb2.UploadFrame(header=header, data=b"abc")
        frame.trailer.size = 3
        try:
            session.stub.SubmitJob(iter([frame]), timeout=20)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_streams_per_identity" in exc.details()
    return False


def tiny_job(tmp: Path, name: str) -> Path:
    recipe = FedAvgRecipe(
        name=name, model=torch.nn.Linear(8, 1), train_script=SCRIPTS / "train_tiny.py", num_rounds=2, min_clients=2
    )
    return recipe.export(tmp / name)


def test_idle_connections_and_trickling_uploads_hold_one_quota_and_a_job_still_runs(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    lead = project.admin_roles["lead"]
    kit = load_kit(lead)
    idle = [secure_channel(kit, kit.admin_port) for _ in range(100)]
    trickles: list[Trickle] = []
    try:
        for ch in idle:
            admin_pb2_grpc.AdminStub(ch).Hello(admin_pb2.HelloRequest(roster=kit.roster_bytes), timeout=20)
        trickles = [Trickle(lead, every=IDLE / 3) for _ in range(QUOTA)]
        wait_until(lambda: len(staged(project)) == QUOTA, 60, "every trickling upload under way")
        assert quota_full(lead), "one more upload of the same admin was taken"
        with federation.session() as boss:
            info = boss.wait(boss.submit_job(tiny_job(tmp_path, "meanwhile")))
        assert info.status == "FINISHED:COMPLETED", info.error
        assert all(t.thread.is_alive() for t in trickles), "a trickle within the deadline was cut"
        assert len(staged(project)) == QUOTA
    finally:
        for trickle in trickles:
            trickle.close()
        for ch in idle:
            ch.close()
    assert all(t.error is not None and t.error.code() == grpc.StatusCode.DATA_LOSS for t in trickles), [
        t.error for t in trickles
    ]
    wait_until(lambda: not staged(project), 20, "staged uploads removed")
    assert "refused a SubmitJob stream of lead@org-a.example" in log_text(project.server)


def test_an_upload_slower_than_the_idle_deadline_is_cut_and_removed(
    project: ProvisionedProject, federation: Federation
) -> None:
    trickle = Trickle(project.admin_roles["lead"], every=IDLE * 2)
    try:
        trickle.thread.join(60)
    finally:
        trickle.close()
    assert trickle.error is not None and trickle.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"job upload: nothing received for {IDLE:g} s" in trickle.error.details()
    wait_until(lambda: not staged(project), 20, "the cut upload's folder removed")


def test_a_download_that_stops_reading_is_cut_and_the_next_one_completes(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    recipe = FedAvgRecipe(
        name="wide",
        model=torch.nn.Linear(2000, 2000),
        train_script=SCRIPTS / "train_fixed.py",
        num_rounds=1,
        min_clients=2,
    )
    lead = project.admin_roles["lead"]
    with Session(lead, timeout=20) as session:
        job_id = session.submit_job(recipe.export(tmp_path / "wide"))
        info = session.wait(job_id)
    assert info.status == "FINISHED:COMPLETED", info.error
    kit = load_kit(lead)
    with secure_channel(kit, kit.admin_port) as ch:
        stream = admin_pb2_grpc.AdminStub(ch).DownloadJob(admin_pb2.JobRequest(job_id=job_id), timeout=120)
        first = next(stream)
        assert first.header.size > 20 << 20, "the result must be larger than what the transport buffers"
        wait_until(
            lambda: f"result of job {job_id}: the peer read nothing for {IDLE:g} s" in log_text(project.server),
            60,
            "the stalled download cut",
        )
        stream.cancel()
    with Session(lead, timeout=20) as session:
        result = session.download_job(job_id, tmp_path / "result")
    assert (result / "final_model.safetensors").stat().st_size > 15 << 20
