"""Metric streaming end to end: a training script's SummaryWriter at real sites, through the real server,
into a real `mlflow server` and into TensorBoard files, including MLflow going down mid-job."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ProvisionedProject, provision_project
from federation import Federation, running, set_local, wait_until
from test_tracking import MlflowServer, client_for

from fedgrid.recipe import FedAvgRecipe

TINY = Path(__file__).parent / "scripts" / "train_tiny.py"
ROUNDS = 3
STEPS_PER_ROUND = 5


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, mlflow: MlflowServer) -> ProvisionedProject:
    project = provision_project(tmp_path_factory.mktemp("tracking"), n_sites=2)
    set_local(project.server, "server.json", tracking_uris=[mlflow.uri])
    return project


@pytest.fixture(scope="module")
def federation(project: ProvisionedProject) -> Iterator[Federation]:
    with running(project) as fed:
        yield fed


def tracked(name: str, tracking_uri: str = "", step_seconds: float = 0.0, tensorboard: bool = False) -> FedAvgRecipe:
    recipe = FedAvgRecipe(
        name=name,
        model=torch.nn.Linear(8, 1),
        train_script=TINY,
        num_rounds=ROUNDS,
        min_clients=2,
        train_args=["--tracking", "--step_seconds", str(step_seconds)],
    )
    recipe.add_experiment_tracking("mlflow", tracking_uri=tracking_uri)
    if tensorboard:
        recipe.add_experiment_tracking("tensorboard")
    return recipe


def runs_of(uri: str, job_id: str) -> dict[str, object]:
    client = client_for(uri)
    runs = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], filter_string=f"tags.job_id = '{job_id}'"):
            runs[run.data.tags.get("site", "job")] = run
    return runs


def assert_every_point_once(uri: str, job_id: str) -> None:
    client = client_for(uri)
    runs = runs_of(uri, job_id)
    assert set(runs) == {"job", "site-1", "site-2"}
    parent = runs["job"]
    assert parent.info.run_name == job_id
    accuracy = client.get_metric_history(parent.info.run_id, "accuracy")
    assert sorted(m.step for m in accuracy) == list(range(1, ROUNDS + 1))
    for name in ("sites_answered", "round_seconds", "bytes_moved", "loss"):
        assert len(client.get_metric_history(parent.info.run_id, name)) == ROUNDS, name
    assert parent.data.params["num_rounds"] == str(ROUNDS)
    for site in ("site-1", "site-2"):
        run = runs[site]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["site"] == site
        val = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert sorted(m.step for m in val) == list(range(1, ROUNDS + 1)), site
        train = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in train) == list(range(ROUNDS * STEPS_PER_ROUND)), site


def test_site_metrics_reach_mlflow_nested_under_the_job(
    mlflow: MlflowServer, federation: Federation, tmp_path: Path
) -> None:
    with federation.session() as session:
        job_id = session.submit_job(tracked("tracked", mlflow.uri, tensorboard=True).export(tmp_path / "job"))
        info = session.wait(job_id)
        assert info.status == "FINISHED:COMPLETED", info.error
        result = session.download_job(job_id, tmp_path / "result")
    assert_every_point_once(mlflow.uri, job_id)
    parent = runs_of(mlflow.uri, job_id)["job"]
    artifacts = {a.path for a in client_for(mlflow.uri).list_artifacts(parent.info.run_id)}
    assert {"final_model.safetensors", "metrics.json", "metrics.csv"} <= artifacts
    summary = json.loads((result / "result.json").read_text())
    assert summary["tracking"]["complete"] is True
    assert {t["tracker"]: t["pending"] for t in summary["tracking"]["trackers"]} == {"mlflow": 0, "tensorboard": 0}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for site in ("site-1", "site-2"):
        events = EventAccumulator(str(result / "tensorboard" / site))
        events.Reload()
        assert [e.step for e in events.Scalars("val_accuracy")] == list(range(1, ROUNDS + 1))
        assert len(events.Scalars("train_loss")) == ROUNDS * STEPS_PER_ROUND


def test_mlflow_down_mid_job_then_back_delivers_every_point_once(
    mlflow: MlflowServer, federation: Federation, project: ProvisionedProject, tmp_path: Path
) -> None:
    with federation.session() as session:
        job_id = session.submit_job(tracked("outage", mlflow.uri, step_seconds=1.0).export(tmp_path / "job"))
        wait_until(lambda: session.show_job(job_id).info.current_round >= 1, 90, "round 1 done")
        mlflow.kill()
        try:
            info = session.wait(job_id)
            assert info.status == "FINISHED:COMPLETED", info.error
            summary = session.show_job(job_id).result["tracking"]
            assert summary["complete"] is False
            assert next(t for t in summary["trackers"] if t["tracker"] == "mlflow")["pending"] > 0
        finally:
            mlflow.start()
        wait_until(lambda: session.show_job(job_id).result["tracking"]["complete"], 120, "late delivery", every=1.0)
    assert_every_point_once(mlflow.uri, job_id)
    log = (project.server / "log.txt").read_text()
    assert log.count(f"job {job_id} tracking") >= 1


def test_without_a_uri_the_server_keeps_its_own_mlflow_store(
    federation: Federation, project: ProvisionedProject, tmp_path: Path
) -> None:
    with federation.session() as session:
        job_id = session.submit_job(tracked("embedded").export(tmp_path / "job"))
        assert session.wait(job_id).status == "FINISHED:COMPLETED"
        # The job may end before its points are all in (tracking gets 10 s at the end); the rest follow.
        wait_until(lambda: session.show_job(job_id).result["tracking"]["complete"], 120, "late delivery", every=1.0)
    store = project.server / "workspace" / "mlflow.db"
    assert store.exists()
    assert_every_point_once(f"sqlite:///{store}", job_id)
