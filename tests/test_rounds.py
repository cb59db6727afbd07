"""The FedAvg round loop on real daemons: sites train with tests/scripts/train_fixed.py through the real
fedclient.api, and every round's global model is replayed with numpy (tests/replay.py) and compared
with what the job produced: its final and best models, its checkpoint and its round records.

One federation serves the whole module; each test runs one short job on it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ProvisionedProject, provision_project
from federation import Federation, running
from replay import (
    INITIAL,
    SCRIPT,
    Momentum,
    Site,
    assert_model,
    distance,
    model_mean,
    replay,
    train_args,
)

from fedgrid import tensors
from fedgrid.recipe import FedAvgRecipe
from fedgrid.serde import JobDetail

ONE = Site("site-1", shift=1.0, samples=100)
TWO = Site("site-2", shift=4.0, samples=300)
THREE = Site("site-3", shift=-2.0, samples=50)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    return provision_project(tmp_path_factory.mktemp("rounds"), n_sites=3)


@pytest.fixture(scope="module")
def federation(project: ProvisionedProject) -> Iterator[Federation]:
    with running(project) as fed:
        yield fed


@dataclass(frozen=True)
class Job:
    """A job that ended: what the admin sees of it, its downloaded result, and its folder on the server."""

    job_id: str
    detail: JobDetail
    result: Path
    server_dir: Path

    def model(self, name: str) -> tensors.Arrays:
        return tensors.load_file(self.result / f"{name}_model.safetensors")

    def log(self, federation: Federation, source: str = "server") -> str:
        with federation.session() as session:
            return session.job_log(self.job_id, source, 0)


def weighted_shift(sites: Sequence[Site]) -> float:
    """The "shift" metric of a round: every site's shift weighted by its sample count."""
    return sum(s.shift * s.samples for s in sites) / sum(s.samples for s in sites)


def run_job(
    federation: Federation,
    tmp_path: Path,
    sites: Sequence[Site],
    *,
    rounds: int,
    accuracy: Sequence[float] = (),
    slow: Sequence[tuple[str, int, float]] = (),
    min_clients: int = 0,
    **options: object,
) -> Job:
    """Run a FedAvg job of train_fixed.py on `sites` (min_clients: all of them unless given) to its end."""
    recipe = FedAvgRecipe(
        name="fixed",
        model=INITIAL,
        train_script=SCRIPT,
        train_args=train_args(sites, accuracy, slow),
        num_rounds=rounds,
        min_clients=min_clients or len(sites),
        sites=[s.name for s in sites],
        **options,  # type: ignore[arg-type]
    )
    with federation.session() as session:
        job_id = session.submit_job(recipe.export(tmp_path / "job"))
        session.wait(job_id)
        detail = session.show_job(job_id)
        result = session.download_job(job_id, tmp_path / "download")
    return Job(job_id, detail, result, federation.project.server / "workspace" / "jobs" / job_id)


def test_fedavg_weighs_updates_by_sample_count_and_keeps_final_best_and_checkpoint(
    federation: Federation, tmp_path: Path
) -> None:
    sites = [ONE, TWO, THREE]
    curve = [0.3, 0.8, 0.6]
    job = run_job(federation, tmp_path, sites, rounds=3, accuracy=curve)
    assert job.detail.info.status == "FINISHED:COMPLETED", job.detail.info.error
    expected = replay([sites] * 3)

    assert [(r.round, r.sites_asked, r.sites_answered) for r in job.detail.rounds] == [(1, 3, 3), (2, 3, 3), (3, 3, 3)]
    for record, model, accuracy in zip(job.detail.rounds, expected, curve, strict=True):
        assert record.metrics["accuracy"] == pytest.approx(accuracy)
        assert record.metrics["mean"] == pytest.approx(model_mean(model), rel=1e-5), f"round {record.round}"
        assert record.metrics["shift"] == pytest.approx(weighted_shift(sites)), "evaluations weigh by sample count"

    assert_model(job.model("final"), expected[2], "final model")
    assert_model(job.model("best"), expected[1], "best model (round 2 has the best accuracy)")
    checkpoint = job.server_dir / "checkpoint"
    assert_model(tensors.load_file(checkpoint / "global_model.safetensors"), expected[2], "checkpoint")
    state = json.loads((checkpoint / "state.json").read_text())
    assert (state["round"], state["best_round"]) == (3, 2)
    summary = job.detail.result
    assert (summary["rounds_completed"], summary["best_round"], summary["best_value"]) == (3, 2, pytest.approx(0.8))


def test_a_straggler_is_left_out_after_the_round_timeout_and_its_late_update_dropped(
    federation: Federation, tmp_path: Path
) -> None:
    """site-2 sleeps past round 1's timeout, sends its round-1 update while round 2 runs, then trains
    round 2 in time: round 1 averages site-1 alone, round 2 both sites' round-2 updates and nothing else."""
    one, two = ONE, Site("site-2", shift=9.0, samples=100)
    job = run_job(
        federation,
        tmp_path,
        [one, two],
        rounds=2,
        round_timeout=4.0,
        min_responses=1,
        slow=[("site-2", 1, 5.0)],
    )
    assert job.detail.info.status == "FINISHED:COMPLETED", job.detail.info.error
    assert [(r.sites_asked, r.sites_answered) for r in job.detail.rounds] == [(2, 1), (2, 2)]
    assert_model(job.model("final"), replay([[one], [one, two]])[1], "final model")
    log = job.log(federation)
    assert "round 1: 1 of 2 sites did not answer within 4 s" in log
    assert "site-2: result for round-1-train arrived after its round closed; dropped" in log
    assert not list((job.server_dir / "tmp").iterdir()), "no received update may stay on the server's disk"
    models = sorted(p.relative_to(job.server_dir).as_posix() for p in job.server_dir.rglob("*.safetensors"))
    assert models == [
        "checkpoint/global_model.safetensors",
        "job/app/config/initial_model.safetensors",
        "result/best_model.safetensors",
        "result/final_model.safetensors",
    ]


def test_a_round_with_fewer_updates_than_min_responses_fails_the_job(federation: Federation, tmp_path: Path) -> None:
    job = run_job(
        federation,
        tmp_path,
        [ONE, TWO],
        rounds=2,
        round_timeout=3.0,
        min_responses=2,
        slow=[("site-2", 1, 4.0)],
    )
    info = job.detail.info
    assert info.status == "FINISHED:EXECUTION_EXCEPTION"
    assert "round 1: 1 of 2 sites sent a usable update, at least 2 needed" in info.error
    assert job.detail.rounds == ()
    assert not (job.result / "final_model.safetensors").exists()


def test_reaching_the_target_metric_stops_the_job_early(federation: Federation, tmp_path: Path) -> None:
    sites = [ONE, TWO]
    target = {"name": "accuracy", "value": 0.5}
    job = run_job(federation, tmp_path, sites, rounds=5, accuracy=[0.2, 0.6, 0.9], target_metric=target)
    assert job.detail.info.status == "FINISHED:COMPLETED", job.detail.info.error
    assert [r.round for r in job.detail.rounds] == [1, 2]
    assert job.detail.result["stopped_early"] == "accuracy reached 0.6000 (target max 0.5) in round 2"
    assert_model(job.model("final"), replay([sites] * 2)[1], "final model (round 3's training is dropped)")


def test_client_fraction_chooses_at_least_min_clients_each_round(federation: Federation, tmp_path: Path) -> None:
    sites = [ONE, TWO, THREE]
    job = run_job(federation, tmp_path, sites, rounds=3, min_clients=2, client_fraction=0.25, seed=7)
    assert job.detail.info.status == "FINISHED:COMPLETED", job.detail.info.error
    assert [(r.sites_asked, r.sites_answered) for r in job.detail.rounds] == [(2, 2)] * 3
    log = job.log(federation)
    by_name = {s.name: s for s in sites}
    chosen = [[by_name[n] for n in re.search(rf"round {r}: model sent to (.*)", log)[1].split(", ")] for r in (1, 2, 3)]
    assert all(len(c) == 2 for c in chosen), chosen
    assert_model(job.model("final"), replay(chosen)[2], "final model")
    shifts = [r.metrics["shift"] for r in job.detail.rounds]
    assert shifts == [pytest.approx(weighted_shift(sites))] * 3, "the sites left out of training still evaluate"


def test_clip_norm_bounds_each_update_before_averaging(federation: Federation, tmp_path: Path) -> None:
    """site-1's update moves less than clip_norm and passes whole; site-2's is scaled down to it."""
    sites = [Site("site-1", shift=0.0, samples=100), Site("site-2", shift=10.0, samples=100)]
    job = run_job(federation, tmp_path, sites, rounds=2, clip_norm=3.0)
    assert job.detail.info.status == "FINISHED:COMPLETED", job.detail.info.error
    expected = replay([sites] * 2, clip_norm=3.0)
    assert distance(expected[1], replay([sites] * 2)[1]) > 10, "the clipped and unclipped results must differ"
    assert_model(job.model("final"), expected[1], "final model")


def test_server_momentum_moves_further_than_plain_fedavg(federation: Federation, tmp_path: Path) -> None:
    sites = [ONE, TWO]
    job = run_job(federation, tmp_path, sites, rounds=3, server_lr=1.5, server_momentum=0.5)
    assert job.detail.info.status == "FINISHED:COMPLETED", job.detail.info.error
    final = job.model("final")
    assert_model(final, replay([sites] * 3, step=Momentum(lr=1.5, momentum=0.5))[2], "final model")
    assert distance(final, INITIAL) > distance(replay([sites] * 3)[2], INITIAL)


def test_a_rounds_seconds_end_at_its_aggregate_not_at_its_evaluation(federation: Federation, tmp_path: Path) -> None:
    """Round 1's evaluation rides on round 2's task and comes back with round 2's slow training.

    The script's clock (the monotonic clock, the server's too) brackets the rounds: round 1 began after
    the script started and ended before the script received round 2's task, so it is shorter than that
    span and the slow training after it is not in it; round 2 is at least as long as that training."""
    job = run_job(federation, tmp_path, [ONE], rounds=2, slow=[("site-1", 2, 1.5)])
    assert job.detail.info.status == "FINISHED:COMPLETED", job.detail.info.error
    clock = job.log(federation, "site-1")
    start = float(re.search(r"clock start (\S+)", clock)[1])
    round_2_task = float(re.search(r"clock received evaluate 1 (\S+)", clock)[1])
    slept_from, slept_to = map(float, re.search(r"clock slept 2 (\S+) (\S+)", clock).groups())
    first, second = job.detail.rounds
    assert first.seconds < round_2_task - start, "round 1 counts round 2's training"
    assert second.seconds >= slept_to - slept_from
