"""Jobs end to end with real daemons over mutual TLS: submit, run, follow, abort, stragglers, crashes,
bad uploads, authorization, restarts. A tiny model keeps every job to a few seconds."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ProvisionedProject, provision_project
from federation import Federation, log_text, running, set_local, wait_until

from fedgrid import jobspec
from fedgrid.errors import AuthorizationError, JobSpecError, NotFoundError, StateError, TamperedError, TransferError
from fedgrid.recipe import FedAvgRecipe
from fedgrid.serde import JobInfo, RoundInfo
from fedgrid.session import Session
from fedgrid.transfer import frames, split
from fedgrid.v1 import admin_pb2

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
ADMINS = (
    ("boss@org-a.example", "org-a", "project_admin"),
    ("chief@org-b.example", "org-b", "org_admin"),
    ("lead@org-a.example", "org-a", "lead"),
    ("lead@org-b.example", "org-b", "lead"),
    ("member@org-a.example", "org-a", "member"),
)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    return provision_project(tmp_path_factory.mktemp("jobs"), n_sites=3, admins=ADMINS)


@pytest.fixture(scope="module")
def federation(project: ProvisionedProject) -> Iterator[Federation]:
    with running(project) as fed:
        yield fed


def admin(project: ProvisionedProject, name: str) -> Session:
    kit = next(k for k in project.admins if k.name == name)
    return Session(kit, timeout=20)


def recipe(
    name: str = "tiny", rounds: int = 2, min_clients: int = 3, args: str = "", **options: object
) -> FedAvgRecipe:
    return FedAvgRecipe(
        name=name,
        model=torch.nn.Linear(8, 1),
        train_script=SCRIPT,
        train_args=args,
        num_rounds=rounds,
        min_clients=min_clients,
        **options,  # type: ignore[arg-type]
    )


def submit(session: Session, r: FedAvgRecipe, tmp: Path) -> str:
    return session.submit_job(r.export(tmp / r.name))


def wait_job(session: Session, job_id: str) -> JobInfo:
    return session.wait(job_id)


def stored_jobs(project: ProvisionedProject) -> list[str]:
    return sorted(p.name for p in (project.server / "workspace" / "jobs").iterdir())


def test_job_runs_end_to_end_with_results_and_progress(federation: Federation, tmp_path: Path) -> None:
    with federation.session() as session:
        job_id = submit(session, recipe(rounds=3), tmp_path)
        events = list(session.watch_job(job_id))
        rounds = [e for e in events if isinstance(e, RoundInfo)]
        assert [r.round for r in rounds] == [1, 2, 3]
        assert all(r.sites_answered == r.sites_asked == 3 for r in rounds)
        assert all({"accuracy", "loss"} <= set(r.metrics) for r in rounds)
        final = events[-1]
        assert isinstance(final, JobInfo) and final.status == "FINISHED:COMPLETED"

        detail = session.show_job(job_id)
        assert detail.info.current_round == 3 and len(detail.rounds) == 3
        assert all(r.seconds > 0 and r.bytes_moved > 0 for r in detail.rounds)
        assert set(detail.site_states.values()) == {"finished"}

        result = session.download_job(job_id, tmp_path / "download")
        for name in (
            "final_model.safetensors",
            "best_model.safetensors",
            "metrics.json",
            "metrics.csv",
            "metrics.png",
            "log.txt",
            "result.json",
            "sites/site-1/log.txt",
            "sites/site-3/log.txt",
        ):
            assert (result / name).is_file(), name
        summary = json.loads((result / "result.json").read_text())
        assert summary["rounds_completed"] == 3 and summary["status"] == "FINISHED:COMPLETED"
        assert len(json.loads((result / "metrics.json").read_text())) == 3
        assert (result / "metrics.png").read_bytes()[:4] == b"\x89PNG"
        assert "round 3/3 done" in (result / "log.txt").read_text()
        assert any(j.job_id == job_id for j in session.list_jobs(all=True))
        assert not any(j.job_id == job_id for j in session.list_jobs())
        assert "workers ready" in session.job_log(job_id, "server", 0)
        assert "job over" in session.job_log(job_id, "site-2", 0)


def _workers_started_ahead(daemon_pid: int) -> list[int]:
    """PIDs of the daemon's children that wait for a job (`fedclient.worker --wait`)."""
    found = []
    for task in Path(f"/proc/{daemon_pid}/task").iterdir():  # a child belongs to the thread that started it
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                if b"--wait" in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"):
                    found.append(int(child))
    return sorted(found)


def _niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def test_a_job_runs_in_the_worker_started_ahead_and_the_next_one_is_started_after(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    site = project.sites[0]
    daemon = federation.pid(site)
    ahead = wait_until(lambda: _workers_started_ahead(daemon), what="a worker started ahead at site-1")
    wait_until(lambda: _niceness(ahead[0]) == 5, what="the worker's niceness set to worker_nice (5) as it starts")
    with federation.session() as session:
        job_id = submit(session, recipe("ahead", rounds=2), tmp_path)
        assert wait_job(session, job_id).status == "FINISHED:COMPLETED"
        assert "training script of site-1 ended" in session.job_log(job_id, "site-1", 0)
    assert f"job {job_id}: handed to the worker started ahead (pid {ahead[0]}," in log_text(site)
    fresh = wait_until(lambda: _workers_started_ahead(daemon), what="the next worker started ahead")
    assert fresh != ahead and len(fresh) == 1


def test_two_jobs_run_at_the_same_time_and_both_finish(federation: Federation, tmp_path: Path) -> None:
    with federation.session() as session:
        first = submit(session, recipe("first", rounds=3, args="--step_seconds 0.5"), tmp_path)
        second = submit(session, recipe("second", rounds=3, args="--step_seconds 0.5"), tmp_path)
        one, two = wait_job(session, first), wait_job(session, second)
    assert one.status == two.status == "FINISHED:COMPLETED"
    site_log = log_text(federation.project.sites[1])
    cold = [job for job in (first, second) if f"job {job}: worker started (pid" in site_log]
    assert len(cold) == 1, "one job takes the worker started ahead, the other gets a worker of its own"
    with federation.session() as session:
        for job in (first, second):
            assert "training script of site-2 running at niceness 5" in session.job_log(job, "site-2", 0)
    assert two.start_time < one.end_time and one.start_time < two.end_time, "the jobs did not overlap"


def test_an_evaluation_answered_by_a_script_that_then_ends_still_counts(federation: Federation, tmp_path: Path) -> None:
    """The answer to an evaluation waits to travel with the training result; if the script ends
    before it trains, the worker sends the answer on its own."""
    args = "--stop_site site-3 --stop_after_evaluating 1"
    with federation.session() as session:
        job_id = submit(session, recipe("stops", rounds=3, min_clients=2, args=args), tmp_path)
        assert wait_job(session, job_id).status == "FINISHED:COMPLETED"
        server_log = session.job_log(job_id, "server", 0)
    assert "round 1: global model evaluated by 3 sites" in server_log
    assert "round 2: global model evaluated by 2 sites" in server_log


def test_what_a_script_does_to_an_evaluations_tensors_does_not_reach_its_training_half(
    federation: Federation, tmp_path: Path
) -> None:
    with federation.session() as session:
        job_id = submit(session, recipe("scribble", rounds=3, args="--scribble"), tmp_path)
        info = wait_job(session, job_id)
        assert info.status == "FINISHED:COMPLETED", info.error


def test_abort_mid_round_stops_the_job_on_server_and_sites(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    with federation.session() as session:
        job_id = submit(session, recipe("stuck", rounds=3, args="--step_seconds 600"), tmp_path)
        wait_until(lambda: set(session.show_job(job_id).site_states.values()) == {"running"}, 60, "job running")
        wait_until(lambda: "round 1: model sent" in session.job_log(job_id), 30, "round 1 under way")
        message = session.abort_job(job_id)
        assert "aborted" in message
        info = session.show_job(job_id).info
        assert info.status == "FINISHED:ABORTED" and "aborted by boss@org-a.example" in info.error
    for site in project.sites:
        wait_until(
            lambda site=site: f"job {job_id}: worker ended (aborted" in log_text(site), 15, f"{site.name} aborted"
        )
    with pytest.raises(StateError, match="already FINISHED:ABORTED"), federation.session() as session:
        session.abort_job(job_id)


def test_straggler_update_is_dropped_after_the_round_timeout(federation: Federation, tmp_path: Path) -> None:
    r = recipe("straggler", rounds=2, round_timeout=4.0, min_responses=2, args="--slow_site site-3 --slow_seconds 6")
    with federation.session() as session:
        job_id = submit(session, r, tmp_path)
        info = wait_job(session, job_id)
        assert info.status == "FINISHED:COMPLETED", info.error
        detail = session.show_job(job_id)
        assert [(x.sites_answered, x.sites_asked) for x in detail.rounds] == [(2, 3), (2, 3)]
        log = session.job_log(job_id, "server", 0)
    assert "did not answer within 4 s" in log
    assert "site-3: result for round-1-train arrived after its round closed; dropped" in log


def test_crash_in_the_training_script_fails_the_job_with_its_traceback(federation: Federation, tmp_path: Path) -> None:
    with federation.session() as session:
        job_id = submit(session, recipe("crash", args="--crash_site site-2 --crash_round 1"), tmp_path)
        info = wait_job(session, job_id)
        assert info.status == "FINISHED:EXECUTION_EXCEPTION"
        assert "site-2: RuntimeError: deliberate failure at site-2 in round 1" in info.error
        assert "Traceback (most recent call last)" in session.job_log(job_id, "server", 0)
        assert "deliberate failure" in session.job_log(job_id, "site-2", 0)
        with federation.session() as other:
            assert federation.alive(other) == ["site-1", "site-2", "site-3"], "the daemons must go on serving"


def test_clone_download_delete(federation: Federation, tmp_path: Path) -> None:
    with federation.session() as session:
        job_id = submit(session, recipe("again", rounds=1), tmp_path)
        wait_job(session, job_id)
        clone = session.clone_job(job_id)
        info = wait_job(session, clone)
        assert info.status == "FINISHED:COMPLETED" and info.cloned_from == job_id
        assert session.delete_job(clone).endswith("deleted")
        with pytest.raises(NotFoundError):
            session.show_job(clone)
        running = submit(session, recipe("running", rounds=1, args="--step_seconds 600"), tmp_path)
        with pytest.raises(StateError, match="only finished jobs can be deleted"):
            session.delete_job(running)
        with pytest.raises(StateError, match="can be downloaded when it ends"):
            session.download_job(running)
        session.abort_job(running)


# ----------------------------------------------------------------------------- authorization


def test_roles_are_enforced_from_the_certificate(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    job_dir = recipe("authz", rounds=1, args="--step_seconds 600").export(tmp_path / "authz")
    with admin(project, "member@org-a.example") as member:
        with pytest.raises(AuthorizationError, match="submit_job needs role project_admin or org_admin or lead"):
            member.submit_job(job_dir)
        assert isinstance(member.list_jobs(all=True), list)
    with admin(project, "lead@org-a.example") as lead_a, admin(project, "lead@org-b.example") as lead_b:
        job_id = lead_a.submit_job(job_dir)
        with pytest.raises(AuthorizationError, match="lead who submitted the job; you are lead@org-b.example"):
            lead_b.abort_job(job_id)
        with (
            admin(project, "chief@org-b.example") as chief_b,
            pytest.raises(AuthorizationError, match="org_admin of the job's org"),
        ):
            chief_b.abort_job(job_id)
        assert "aborted" in lead_a.abort_job(job_id)
        other = lead_b.submit_job(job_dir)
        with admin(project, "chief@org-b.example") as chief_b:
            assert "aborted" in chief_b.abort_job(other)


# ----------------------------------------------------------------------------- bad jobs


def _job_folder(tmp_path: Path) -> Path:
    return recipe("bad", rounds=1).export(tmp_path / "job")


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


BAD_FOLDERS = {
    "unknown-key": (lambda d: _edit_json(d / "meta.json", colour="red"), "meta.json: unknown key 'colour'"),
    "bad-rounds": (lambda d: _edit_json(d / "app/config/server.json", num_rounds=0), "num_rounds must be an integer"),
    "missing-script": (lambda d: (d / "app/custom/train_tiny.py").unlink(), "is not a file in app/custom/"),
    "unknown-site": (
        lambda d: _edit_json(d / "meta.json", deploy_map={"app": ["server", "site-9"]}),
        "unknown site 'site-9'",
    ),
    "no-meta": (lambda d: (d / "meta.json").unlink(), "meta.json: missing"),
    "nested-json": (
        lambda d: (d / "app/config/server.json").write_text(
            '{"num_rounds": 1, "min_clients": 3, "tracking": ' + "[" * 100_000 + "]" * 100_000 + "}"
        ),
        r"app/config/server\.json: tracking\[0\]\[0\].*: not valid JSON \(recursion limit exceeded",
    ),
    "model-not-safetensors": (
        lambda d: torch.save(torch.nn.Linear(8, 1).state_dict(), d / "app/config/initial_model.safetensors"),
        r"app/config/initial_model\.safetensors: not a valid safetensors file .*; initial_model in app/config/server",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_job_folder_is_refused_and_nothing_is_stored(
    project: ProvisionedProject, federation: Federation, tmp_path: Path, case: str
) -> None:
    folder = _job_folder(tmp_path)
    damage, message = BAD_FOLDERS[case]
    damage(folder)
    before = stored_jobs(project)
    with federation.session() as session:
        package = jobspec.pack(folder)
        signed = jobspec.sign_job(folder, session.kit.private_key(), session.name)
        with pytest.raises(JobSpecError, match=message):
            _upload(session, package, signed)
    assert stored_jobs(project) == before


def _upload(session: Session, package: bytes, signed: bytes) -> str:
    header = admin_pb2.UploadHeader(signed_manifest=signed, size=len(package))
    return session._call(lambda: session.stub.SubmitJob(frames(admin_pb2.UploadFrame, header, split(package)))).job_id


def _zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for info, data in entries:
            archive.writestr(info, data)
    return buffer.getvalue()


def test_malicious_uploads_are_refused_and_nothing_is_stored(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    folder = _job_folder(tmp_path)
    before = stored_jobs(project)
    with federation.session() as session:
        signed = jobspec.sign_job(folder, session.kit.private_key(), session.name)
        good = [(p.relative_to(folder).as_posix(), p.read_bytes()) for p in jobspec.job_files(folder)]
        link = zipfile.ZipInfo("app/custom/evil")
        link.external_attr = (0o120777) << 16
        cases = {
            "escapes the job folder": good + [("../../evil.py", b"x")],
            "absolute": good + [("/etc/cron.d/evil", b"x")],
            "is a link or special file": good + [(link, b"/etc/passwd")],
        }
        for message, entries in cases.items():
            with pytest.raises(JobSpecError, match=message if message != "absolute" else "escapes the job folder"):
                _upload(session, _zip(entries), signed)
        with pytest.raises(TamperedError, match="job/app/custom/train_tiny.py was changed after signing"):
            changed = [(n, b"print('changed')" if n.endswith("train_tiny.py") else d) for n, d in good]
            _upload(session, _zip(changed), signed)
        with pytest.raises(TamperedError, match="is not signed"):
            _upload(session, _zip(good + [("app/custom/extra.py", b"x")]), signed)
        forged = json.loads(signed)
        forged["signer"] = "someone-else@org-a.example"
        with pytest.raises(TamperedError, match="not by the submitter"):
            _upload(session, _zip(good), json.dumps(forged).encode())
        with pytest.raises(JobSpecError, match="not a valid zip"):
            _upload(session, b"not a zip at all", signed)
    assert stored_jobs(project) == before


def test_oversized_upload_is_refused(project: ProvisionedProject, tmp_path: Path) -> None:
    small = provision_project(tmp_path / "small", n_sites=1)
    set_local(small.server, "server.json", max_upload_mb=1.0)
    with running(small) as fed:
        folder = _job_folder(tmp_path)
        (folder / "app" / "custom" / "big.bin").write_bytes(os.urandom(2 << 20))
        with fed.session() as session, pytest.raises(TransferError, match="more than the allowed 1.0 MB"):
            session.submit_job(folder)
        assert not list((small.server / "workspace" / "jobs").iterdir())


# ----------------------------------------------------------------------------- site policy and restarts


def test_site_that_forbids_custom_code_refuses_the_job(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    site = project.sites[2]
    federation.stop(site)
    set_local(site, "site.json", allow_custom_code=False)
    try:
        federation.start(site)
        federation.wait_alive(["site-1", "site-2", "site-3"])
        with federation.session() as session:
            job_id = submit(session, recipe("policy", rounds=1, min_clients=2), tmp_path)
            info = wait_job(session, job_id)
            assert info.status == "FINISHED:COMPLETED", info.error
            states = session.show_job(job_id).site_states
        assert states["site-3"].startswith("refused: ") and "forbids custom code" in states["site-3"]
        assert states["site-1"] == "finished"
    finally:
        federation.stop(site)
        set_local(site, "site.json", allow_custom_code=True)
        federation.start(site)
        federation.wait_alive(["site-1", "site-2", "site-3"])


def test_server_restart_keeps_finished_jobs_and_ends_the_running_ones_that_do_not_resume(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    with federation.session() as session:
        done = submit(session, recipe("before-restart", rounds=1), tmp_path)
        wait_job(session, done)
        stopped = submit(session, recipe("stopped", rounds=2, args="--step_seconds 600", resume=False), tmp_path)
        wait_until(lambda: set(session.show_job(stopped).site_states.values()) == {"running"}, 60, "workers running")
    federation.stop(project.server)
    federation.start(project.server)
    federation.wait_alive(["site-1", "site-2", "site-3"])
    with federation.session() as session:
        crashed = submit(session, recipe("crashed", rounds=2, args="--step_seconds 600", resume=False), tmp_path)
        wait_until(lambda: session.show_job(crashed).info.current_round == 1, 60, "round 1 under way")
    os.kill(federation.pid(project.server), signal.SIGKILL)
    federation.running.remove(project.server)
    federation.start(project.server)
    federation.wait_alive(["site-1", "site-2", "site-3"])
    with federation.session() as session:
        jobs = {j.job_id: j for j in session.list_jobs(all=True)}
    assert jobs[done].status == "FINISHED:COMPLETED"
    assert jobs[stopped].status == "FINISHED:ABORTED" and jobs[stopped].error == "the server is shutting down"
    assert jobs[crashed].status == "FINISHED:EXECUTION_EXCEPTION"
    assert 'the server stopped during round 1 and the job says "resume": false' in jobs[crashed].error
    for site in project.sites:
        for job_id in (stopped, crashed):
            wait_until(
                lambda site=site, job_id=job_id: f"job {job_id}: worker ended" in log_text(site),
                30,
                f"{site.name} worker of {job_id} ended",
            )


def test_job_waits_until_enough_sites_are_alive(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    with federation.session() as session:
        job_id = submit(session, recipe("too-big", rounds=1, min_clients=5), tmp_path)
        later = submit(session, recipe("after-too-big", rounds=1), tmp_path)
        # The scheduler starts queued jobs in order: once the later one ran, it passed over this one.
        wait_until(lambda: session.show_job(later).info.status.startswith("FINISHED"), 60, "the later job to end")
        assert session.show_job(later).info.status == "FINISHED:COMPLETED"
        detail = session.show_job(job_id)
        assert detail.info.status == "SUBMITTED"
        assert "waiting for 5 sites" in detail.result["waiting"]
        session.abort_job(job_id)
        assert session.show_job(job_id).info.status == "FINISHED:ABORTED"


def test_jobs_wait_for_the_resources_they_ask_for(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    small = project.sites[2]
    federation.stop(small)
    set_local(small, "site.json", num_cpus=1, memory_gb=2)
    federation.start(small)
    try:
        federation.wait_alive(["site-1", "site-2", "site-3"])
        one_cpu = {"@ALL": {"num_cpus": 1}}
        with federation.session() as session:
            first = submit(session, recipe("cpu-a", rounds=2, args="--step_seconds 2", resource_spec=one_cpu), tmp_path)
            wait_until(lambda: session.show_job(first).info.status == "RUNNING", 30, "the first job running")
            second = submit(session, recipe("cpu-b", rounds=1, resource_spec=one_cpu), tmp_path)
            waiting = wait_until(lambda: session.show_job(second).result.get("waiting"), 10, "a waiting reason")
            assert session.show_job(second).info.status == "SUBMITTED"
            assert "site-3 has 0 of 1 CPUs free, the job needs 1" in waiting
            big = submit(session, recipe("big", rounds=1, resource_spec={"site-3": {"memory_gb": 3}}), tmp_path)
            assert wait_job(session, first).status == "FINISHED:COMPLETED"
            assert wait_job(session, second).status == "FINISHED:COMPLETED", "the second job starts once the first ends"
            assert session.show_job(second).info.start_time >= session.show_job(first).info.end_time
            detail = session.show_job(big)
            assert detail.info.status == "SUBMITTED"
            assert "site-3 has 2 of 2 GB of memory free, the job needs 3" in detail.result["waiting"]
            session.abort_job(big)
    finally:
        federation.stop(small)
        set_local(small, "site.json", num_cpus=0, memory_gb=0)
        federation.start(small)
        federation.wait_alive(["site-1", "site-2", "site-3"])


def test_unknown_job_ids_get_a_clear_error(federation: Federation) -> None:
    with federation.session() as session, pytest.raises(NotFoundError, match="list_jobs -a shows every job"):
        session.show_job("no-such-job")


def test_encrypted_job_is_refused_by_a_federation_without_he(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    before = stored_jobs(project)
    with federation.session() as session, pytest.raises(JobSpecError, match="provisioned without HE"):
        submit(session, recipe("he-here", encryption=True), tmp_path)
    assert stored_jobs(project) == before


def test_a_watch_stream_outlives_minutes_of_silence(federation: Federation, tmp_path: Path) -> None:
    """Keepalive pings every 20 s on an idle stream must not get the connection closed by the server."""
    import threading

    with federation.session() as session:
        job_id = submit(session, recipe("quiet", rounds=1, min_clients=5), tmp_path)
        threading.Timer(50.0, session.abort_job, args=(job_id,)).start()
        events = list(session.watch_job(job_id))
    assert isinstance(events[-1], JobInfo) and events[-1].status == "FINISHED:ABORTED"
