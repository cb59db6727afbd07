"""Attack campaign, malicious input: uploads that would fill the server's memory or disk, and a site that
speaks the real protocol (tests/rogue.py) but sends poisoned updates: NaN, wrong shapes, an absurd sample
count. The server refuses each with a line in the job's log, the round goes on with the other sites, and
the server's memory stays where it was.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ProvisionedProject, provision_project
from federation import Federation, running
from rogue import RogueSite

from fedgrid import tensors
from fedgrid.errors import JobSpecError, TransferError
from fedgrid.recipe import FedAvgRecipe
from fedgrid.session import Session
from fedgrid.transfer import CHUNK_SIZE, frames, split
from fedgrid.v1 import admin_pb2
from fedgrid.v1 import federation_pb2 as fpb

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
MB = 1 << 20
RSS_TOLERANCE_MB = 15
"""Growth of the server's resident memory allowed over three refused 110 MB uploads (each used to add ~100 MB)."""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    return provision_project(tmp_path_factory.mktemp("campaign-input"), n_sites=3)


@pytest.fixture(scope="module")
def federation(project: ProvisionedProject) -> Iterator[Federation]:
    with running(project, project.sites[:2]) as fed:
        yield fed


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def workspace_entries(project: ProvisionedProject) -> set[str]:
    """What the job store holds, staged uploads (.incoming-*) included."""
    return {p.name for p in (project.server / "workspace" / "jobs").iterdir()}


def raw_upload(session: Session, pieces: Iterator[bytes], size: int, signed: bytes = b"{}") -> str:
    header = admin_pb2.UploadHeader(signed_manifest=signed, size=size)
    stream = frames(admin_pb2.UploadFrame, header, pieces)
    return session._call(lambda: session.stub.SubmitJob(stream, timeout=300)).job_id


def test_three_refused_110_mb_uploads_leave_the_server_where_it_was(
    project: ProvisionedProject, federation: Federation
) -> None:
    block = os.urandom(CHUNK_SIZE)
    size = 110 * 1000 * 1000
    pid = federation.pid(project.server)
    before_entries = workspace_entries(project)
    samples = []
    with federation.session() as session:
        for attempt in range(4):
            with pytest.raises(TransferError, match="job upload: more than the allowed 100.0 MB; refused"):
                raw_upload(session, (block for _ in range(size // CHUNK_SIZE + 1)), size)
            samples.append(rss_mb(pid))
            assert workspace_entries(project) == before_entries, f"upload {attempt + 1} left something behind"
        assert session.list_jobs(all=True) == []
    warm, last = samples[0], samples[-1]
    print(f"server RSS after each refused 110 MB upload: {', '.join(f'{s:.0f} MB' for s in samples)}")
    assert last - warm < RSS_TOLERANCE_MB, f"the server grew from {warm:.0f} to {last:.0f} MB"


def test_a_zip_bomb_is_refused_while_unpacking_and_nothing_is_kept(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    buffer = io.BytesIO()
    zeros = bytes(MB)
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        info = zipfile.ZipInfo("app/custom/bomb.bin")
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as entry:
            for _ in range(420):
                entry.write(zeros)
    package = buffer.getvalue()
    assert len(package) < 2 * MB
    pid = federation.pid(project.server)
    before, entries = rss_mb(pid), workspace_entries(project)
    with (
        federation.session() as session,
        pytest.raises(JobSpecError, match="more than the allowed 400 MB once unpacked"),
    ):
        raw_upload(session, split(package), len(package))
    assert workspace_entries(project) == entries
    assert rss_mb(pid) - before < RSS_TOLERANCE_MB


def _poisoned(header: fpb.TaskHeader, payload: bytes) -> tuple[str, bytes]:
    """Round 1: NaN; round 2: a tensor of the wrong shape; round 3: a valid update (its sample count is the lie)."""
    model = tensors.decode(payload)
    if header.round == 1:
        model["weight"] = np.full_like(model["weight"], np.nan)
    elif header.round == 2:
        model["weight"] = np.zeros((2, 8), dtype=np.float32)
    return tensors.FORMAT, tensors.encode(model)


def test_poisoned_updates_are_refused_and_logged_and_the_rounds_go_on(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    rogue = RogueSite(project.sites[2], _poisoned, samples=lambda h: 1e308 if h.round == 3 else 50.0)
    rogue.start()
    try:
        federation.wait_alive(["site-1", "site-2", "site-3"])
        recipe = FedAvgRecipe(
            name="poisoned",
            model=torch.nn.Linear(8, 1),
            train_script=SCRIPT,
            num_rounds=3,
            min_clients=3,
            min_responses=2,
        )
        with federation.session() as session:
            job_id = session.submit_job(recipe.export(tmp_path / "job"))
            info = session.wait(job_id)
            assert info.status == "FINISHED:COMPLETED", info.error
            detail = session.show_job(job_id)
            log = session.job_log(job_id, "server", 0)
            result = session.download_job(job_id, tmp_path / "result")
    finally:
        rogue.close()
    assert {"round-1-train", "round-2-train", "round-3-train"} <= set(rogue.answered)
    assert [(r.sites_answered, r.sites_asked) for r in detail.rounds] == [(2, 3)] * 3
    refusals = [line for line in log.splitlines() if "update from site-3 refused" in line]
    assert len(refusals) == 3, log
    assert "NaN" in refusals[0]
    assert "shape" in refusals[1]
    assert "sample count" in refusals[2]
    final = tensors.load_file(result / "final_model.safetensors")
    assert all(np.isfinite(v).all() for v in final.values())
    assert final["weight"].shape == (1, 8)
