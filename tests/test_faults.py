"""Faults and lifecycle races against real daemons: aborts that race, many jobs at once, a worker killed by
a signal, a crash at one site, a script that hangs past its job, and a job folder whose disk fills up or
turns read-only. Each case checks what a user sees: the job's state and error, its record against its
folder, and that the daemons go on serving."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ProvisionedProject, provision_project
from federation import Federation, log_text, running, set_local, wait_until

from fedgrid import tensors
from fedgrid.recipe import FedAvgRecipe
from fedgrid.session import Session

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    project = provision_project(tmp_path_factory.mktemp("faults"), n_sites=3)
    for site in project.sites:
        set_local(site, "site.json", max_concurrent_jobs=2)
    return project


@pytest.fixture(scope="module")
def federation(project: ProvisionedProject) -> Iterator[Federation]:
    with running(project) as fed:
        yield fed


def recipe(name: str, rounds: int = 2, args: str = "", **options: object) -> FedAvgRecipe:
    return FedAvgRecipe(
        name=name,
        model=torch.nn.Linear(8, 1),
        train_script=SCRIPT,
        train_args=args,
        num_rounds=rounds,
        min_clients=options.pop("min_clients", 3),  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )


def submit(session: Session, r: FedAvgRecipe, tmp: Path) -> str:
    return session.submit_job(r.export(tmp / r.name))


def server_log(project: ProvisionedProject, job_id: str) -> str:
    path = project.server / "workspace" / "jobs" / job_id / "log.txt"
    return path.read_text(errors="replace") if path.exists() else ""


def rounds_dispatched(project: ProvisionedProject, job_id: str) -> int:
    return len(re.findall(r"round \d+: model sent", server_log(project, job_id)))


def test_two_aborts_at_once_both_end_the_job_and_no_round_starts_after(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    with federation.session() as session:
        job_id = submit(session, recipe("double-abort", rounds=5, args="--step_seconds 600"), tmp_path)
        wait_until(lambda: rounds_dispatched(project, job_id) == 1, 60, "round 1 under way")
    answers: list[str] = []

    def abort() -> None:
        with federation.session() as session:
            answers.append(session.abort_job(job_id))

    threads = [threading.Thread(target=abort) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(answers) == 2 and all("aborted" in a for a in answers), answers
    with federation.session() as session:
        info = session.show_job(job_id).info
    assert info.status == "FINISHED:ABORTED", "the job must be ended when abort_job answers"
    assert rounds_dispatched(project, job_id) == 1, "no round may start after the abort"
    assert "job ended: FINISHED:ABORTED" in server_log(project, job_id)


def test_more_jobs_than_may_run_at_once_wait_for_free_sites_and_all_complete(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    with federation.session() as session:
        jobs = [submit(session, recipe(f"many-{i}", rounds=1), tmp_path) for i in range(7)]
        waiting = [session.show_job(job_id).result.get("waiting", "") for job_id in jobs]
        assert any("max_concurrent_jobs" in reason or "free slot" in reason for reason in waiting), waiting
        finished = [session.wait(job_id) for job_id in jobs]
    assert [info.status for info in finished] == ["FINISHED:COMPLETED"] * 7, [info.error for info in finished]


def test_a_worker_killed_by_a_signal_fails_the_job_with_that_reason_and_no_round_follows(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    with federation.session() as session:
        job_id = submit(session, recipe("killed", rounds=5, args="--step_seconds 600"), tmp_path)
        wait_until(lambda: rounds_dispatched(project, job_id) == 1, 60, "round 1 under way")
        match = re.search(rf"job {job_id}: .*\(pid (\d+)", log_text(project.sites[1]))
        assert match, "the site daemon logs its worker's pid"
        os.kill(int(match.group(1)), signal.SIGKILL)
        info = session.wait(job_id)
    assert info.status == "FINISHED:EXECUTION_EXCEPTION"
    assert "site-2" in info.error and "killed by SIGKILL" in info.error, info.error
    assert rounds_dispatched(project, job_id) == 1, "no round may start after the failure"


def test_a_crash_at_one_site_with_a_round_timeout_ends_the_job_and_its_record_matches_its_folder(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    r = recipe(
        "crash-timeout", rounds=4, round_timeout=30.0, min_responses=2, args="--crash_site site-3 --crash_round 2"
    )
    with federation.session() as session:
        job_id = submit(session, r, tmp_path)
        info = session.wait(job_id)
        detail = session.show_job(job_id)
        result = session.download_job(job_id, tmp_path / "download")
    assert info.status == "FINISHED:EXECUTION_EXCEPTION" and "deliberate failure at site-3" in info.error
    assert rounds_dispatched(project, job_id) == 2, "the job ends in the round the site crashed in"
    summary = json.loads((result / "result.json").read_text())
    metrics = json.loads((result / "metrics.json").read_text())
    assert summary["rounds_completed"] == len(metrics) == len(detail.rounds)
    assert summary["status"] == "FINISHED:EXECUTION_EXCEPTION"


def test_a_script_hung_past_its_job_is_ended_and_frees_the_sites_job_slot(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    r = recipe(
        "hung",
        rounds=1,
        round_timeout=5.0,
        min_responses=2,
        args="--slow_site site-1 --slow_seconds 3600",
    )
    with federation.session() as session:
        job_id = submit(session, r, tmp_path)
        info = session.wait(job_id)
        assert info.status == "FINISHED:COMPLETED", info.error
        wait_until(
            lambda: f"job {job_id}: worker ended (aborted" in log_text(project.sites[0]),
            90,
            "site-1's hung worker ended",
        )
        wait_until(
            lambda: not session.check_status("client", ["site-1"])[0].running_jobs,  # type: ignore[union-attr]
            30,
            "site-1 reports no running job",
        )


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProvisionedProject]:
    """A federation whose server keeps its job folders on a 24 MB tmpfs (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system for the job folders needs root")
    project = provision_project(tmp_path_factory.mktemp("disk"), n_sites=2)
    jobs = project.server / "workspace" / "jobs"
    jobs.mkdir(parents=True)
    try:
        _mount("-t", "tmpfs", "-o", "size=24m", "tmpfs", str(jobs))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc.stderr.decode().strip()}")
    try:
        yield project
    finally:
        subprocess.run(["umount", "-l", str(jobs)], capture_output=True)


def test_a_full_disk_ends_the_job_with_the_path_and_the_cause_and_the_server_goes_on(
    small_disk: ProvisionedProject, tmp_path: Path
) -> None:
    project = small_disk
    jobs = project.server / "workspace" / "jobs"
    with running(project) as federation, federation.session() as session:
        job_id = submit(session, recipe("full", rounds=30, min_clients=2, args="--step_seconds 0.5"), tmp_path)
        wait_until(lambda: session.show_job(job_id).rounds, 60, "round 1 recorded")
        filler = jobs / "filler"
        with open(filler, "wb") as out:
            try:
                while True:
                    out.write(b"\0" * (1 << 20))
            except OSError:
                pass
        info = session.wait(job_id)
        assert info.status == "FINISHED:EXECUTION_EXCEPTION"
        assert "No space left on device" in info.error and str(jobs / job_id) in info.error, info.error
        checkpoint = jobs / job_id / "checkpoint" / "global_model.safetensors"
        assert set(tensors.load_file(checkpoint)) == {"weight", "bias"}, "the checkpoint is whole"
        filler.unlink()
        later = session.wait(submit(session, recipe("after-full", rounds=1, min_clients=2), tmp_path))
        assert later.status == "FINISHED:COMPLETED", "the server goes on serving once there is space"


def test_a_job_folder_that_turns_read_only_ends_the_job_with_the_path_and_the_cause(
    small_disk: ProvisionedProject, tmp_path: Path
) -> None:
    project = small_disk
    with running(project) as federation, federation.session() as session:
        job_id = submit(session, recipe("read-only", rounds=30, min_clients=2, args="--step_seconds 0.5"), tmp_path)
        wait_until(lambda: session.show_job(job_id).rounds, 60, "round 1 recorded")
        folder = project.server / "workspace" / "jobs" / job_id
        _mount("--bind", str(folder), str(folder))
        try:
            _mount("-o", "remount,ro,bind", str(folder))
            info = session.wait(job_id)
        finally:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        assert info.status == "FINISHED:EXECUTION_EXCEPTION"
        assert "Read-only file system" in info.error and str(folder) in info.error, info.error
        later = session.wait(submit(session, recipe("after-ro", rounds=1, min_clients=2), tmp_path))
        assert later.status == "FINISHED:COMPLETED"
