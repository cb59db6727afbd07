"""A job resumes from its checkpoint when the server restarts under it, on real daemons: after a crash
(SIGKILL) in the middle of a round whose predecessor's record still waits for its evaluation, and after a
graceful restart. The resumed job's final model equals that of the same job run without the restart:
the round that was under way is done again, once; the strategy's state (FedAdam's m and v) and the
random state that samples the sites come back from the checkpoint. A job that says `"resume": false`
ends with the reason instead."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import ProvisionedProject, provision_project
from federation import Federation, running, wait_until
from replay import INITIAL, SCRIPT, FedOpt, Site, assert_model, replay, train_args

from fedgrid import tensors
from fedgrid.recipe import FedAvgRecipe, FedOptRecipe
from fedgrid.session import Session

SITES = [Site("site-1", 1.0, 100), Site("site-2", 4.0, 300), Site("site-3", -2.0, 50)]
ROUNDS = 5


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    return provision_project(tmp_path_factory.mktemp("resume"), n_sites=3)


@pytest.fixture(scope="module")
def federation(project: ProvisionedProject) -> Iterator[Federation]:
    with running(project) as fed:
        yield fed


def fedadam(name: str, gates: Path | None = None, **more: object) -> FedOptRecipe:
    args = train_args(SITES) + (f" --gate {gates}" if gates else "")
    return FedOptRecipe(
        name=name,
        optimizer="adam",
        server_lr=0.3,
        model=INITIAL,
        train_script=SCRIPT,
        train_args=args,
        num_rounds=ROUNDS,
        min_clients=2,
        client_fraction=0.67,
        seed=7,
        **more,  # type: ignore[arg-type]
    )


def open_gates(gates: Path, rounds: range) -> None:
    for site in SITES:
        for round_no in rounds:
            (gates / f"{site.name}-{round_no}").touch()


def job_folder(project: ProvisionedProject, job_id: str) -> Path:
    return project.server / "workspace" / "jobs" / job_id


def chosen(project: ProvisionedProject, job_id: str) -> list[list[Site]]:
    """The sites each round asked, from the server's job log (a round done again counts as it was last)."""
    by_round: dict[int, list[Site]] = {}
    log = (job_folder(project, job_id) / "log.txt").read_text()
    for match in re.finditer(r"round (\d+): model sent to (.+)", log):
        names = match.group(2).split(", ")
        by_round[int(match.group(1))] = [s for s in SITES if s.name in names]
    return [by_round[r] for r in sorted(by_round)]


def kill_server(federation: Federation, project: ProvisionedProject) -> None:
    os.kill(federation.pid(project.server), signal.SIGKILL)
    federation.running.remove(project.server)


def test_a_job_resumes_after_the_server_crashes_and_ends_with_the_model_of_an_uninterrupted_run(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    plain = tmp_path / "plain-gates"
    plain.mkdir()
    open_gates(plain, range(1, ROUNDS + 1))
    with federation.session() as session:
        reference = session.submit_job(fedadam("uninterrupted", plain).export(tmp_path / "reference"))
        assert session.wait(reference).status == "FINISHED:COMPLETED"
        expected_final = tensors.load_file(
            session.download_job(reference, tmp_path / "ref") / "final_model.safetensors"
        )

    gates = tmp_path / "gates"
    gates.mkdir()
    open_gates(gates, range(1, 3))
    with federation.session() as session:
        job_id = session.submit_job(fedadam("crashed", gates).export(tmp_path / "job"))
        state = job_folder(project, job_id) / "checkpoint" / "state.json"
        wait_until(lambda: state.exists() and '"round": 2' in state.read_text(), 90, "round 2 checkpointed")
        wait_until(lambda: len(list(gates.glob("*-3.waiting"))) >= 2, 90, "round 3's sites at their gate")
        assert len(session.show_job(job_id).rounds) == 1, "round 2's record waits for its evaluation"
    kill_server(federation, project)
    federation.start(project.server)
    with federation.session() as session:
        wait_until(
            lambda: "resume" in session.show_job(job_id).result or session.show_job(job_id).info.status == "RUNNING",
            60,
            "the job taken back to resume",
        )
        open_gates(gates, range(3, ROUNDS + 1))
        info = session.wait(job_id)
        detail = session.show_job(job_id)
        result = session.download_job(job_id, tmp_path / "download")
    assert info.status == "FINISHED:COMPLETED", info.error
    assert [r.round for r in detail.rounds] == list(range(1, ROUNDS + 1)), "every round recorded once"
    log = (job_folder(project, job_id) / "log.txt").read_text()
    assert "resuming after round 2 from its checkpoint" in log
    final = tensors.load_file(result / "final_model.safetensors")
    for name, value in expected_final.items():
        np.testing.assert_allclose(final[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert chosen(project, job_id) == chosen(project, reference), "the same sites sampled in every round"
    expected = replay(chosen(project, job_id), step=FedOpt("adam", lr=0.3))
    assert_model(final, expected[-1], "final model of the resumed job")


def test_a_graceful_restart_resumes_the_job_too(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    gates = tmp_path / "gates"
    gates.mkdir()
    open_gates(gates, range(1, 2))
    recipe = FedAvgRecipe(
        name="graceful",
        model=INITIAL,
        train_script=SCRIPT,
        train_args=train_args(SITES) + f" --gate {gates}",
        num_rounds=3,
        min_clients=3,
    )
    with federation.session() as session:
        job_id = session.submit_job(recipe.export(tmp_path / "job"))
        wait_until(lambda: len(list(gates.glob("*-2.waiting"))) == 3, 90, "round 2's sites at their gate")
    federation.stop(project.server)
    federation.start(project.server)
    open_gates(gates, range(2, 4))
    with federation.session() as session:
        info = session.wait(job_id)
    assert info.status == "FINISHED:COMPLETED", info.error
    final = tensors.load_file(job_folder(project, job_id) / "result" / "final_model.safetensors")
    assert_model(final, replay([SITES] * 3)[-1], "final model of the restarted job")


def test_a_job_that_says_resume_false_ends_with_the_reason(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    recipe = FedAvgRecipe(
        name="no-resume",
        model=INITIAL,
        train_script=SCRIPT,
        train_args=train_args(SITES, slow=[("site-1", 1, 600)]),
        num_rounds=2,
        min_clients=3,
        resume=False,
    )
    with federation.session() as session:
        job_id = session.submit_job(recipe.export(tmp_path / "job"))
        wait_until(lambda: session.show_job(job_id).info.current_round == 1, 60, "round 1 under way")
    kill_server(federation, project)
    federation.start(project.server)
    with Session(project.admin_roles["project_admin"], timeout=20) as session:
        info = session.show_job(job_id).info
    assert info.status == "FINISHED:EXECUTION_EXCEPTION"
    assert 'the server stopped during round 1 and the job says "resume": false' in info.error
