"""Every strategy on real daemons over mTLS: sites train with tests/scripts/train_fixed.py through the real
fedclient.api and its strategy helpers, and each round is replayed with the paper's formulas in numpy
(tests/replay.py): the server's global models, its checkpointed state, and the sites' control variates
must equal them. Also an operator's installed strategy and server-side evaluator, and the refusals at submit.

One federation of three sites serves the whole module; its server has tests/plugins on its PYTHONPATH
(the operator "installed" strategy_plugins there) and a data_root of its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import ProvisionedProject, provision_project
from federation import Federation, running, set_local
from replay import (
    INITIAL,
    SCRIPT,
    FedOpt,
    Scaffold,
    Site,
    assert_model,
    distance,
    model_mean,
    replay,
    train_args,
)

from fedgrid import jobspec, tensors
from fedgrid.errors import JobSpecError
from fedgrid.kit import workspace_dir
from fedgrid.recipe import FedAvgRecipe, FedOptRecipe, FedProxRecipe, ScaffoldRecipe
from fedgrid.serde import JobDetail
from fedgrid.strategy_config import SCAFFOLD_PREFIX

ONE = Site("site-1", shift=1.0, samples=100)
TWO = Site("site-2", shift=4.0, samples=300)
THREE = Site("site-3", shift=-2.0, samples=50)
SITES = [ONE, TWO, THREE]
PLUGINS = Path(__file__).parent / "plugins"
OFFSET = 2.5


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    folder = tmp_path_factory.mktemp("strategies")
    project = provision_project(folder, n_sites=3)
    holdout = folder / "server-data"
    holdout.mkdir()
    (holdout / "holdout.json").write_text(json.dumps({"offset": OFFSET}))
    set_local(project.server, "server.json", data_root=str(holdout))
    return project


@pytest.fixture(scope="module")
def federation(project: ProvisionedProject) -> Iterator[Federation]:
    with running(project, env={"PYTHONPATH": str(PLUGINS)}) as fed:
        yield fed


def run(federation: Federation, tmp_path: Path, recipe: FedAvgRecipe) -> tuple[str, JobDetail, Path]:
    with federation.session() as session:
        job_id = session.submit_job(recipe.export(tmp_path / "job"))
        session.wait(job_id)
        detail = session.show_job(job_id)
        result = session.download_job(job_id, tmp_path / "download")
    assert detail.info.status == "FINISHED:COMPLETED", detail.info.error
    return job_id, detail, result


def options(rounds: int = 3, **more: object) -> dict[str, object]:
    defaults = dict(
        name="strategy",
        model=INITIAL,
        train_script=SCRIPT,
        train_args=train_args(SITES),
        num_rounds=rounds,
        min_clients=3,
    )
    return {**defaults, **more}


def final(result: Path) -> tensors.Arrays:
    return tensors.load_file(result / "final_model.safetensors")


def test_fedprox_sends_mu_with_the_task_and_each_site_adds_the_proximal_term(
    federation: Federation, tmp_path: Path
) -> None:
    _, _, result = run(federation, tmp_path, FedProxRecipe(mu=0.4, **options()))
    expected = replay([SITES] * 3, mu=0.4)
    assert distance(expected[2], replay([SITES] * 3)[2]) > 1, "FedProx and FedAvg must differ here"
    assert_model(final(result), expected[2], "final model")


@pytest.mark.parametrize("optimizer", ["adam", "yogi", "adagrad"])
def test_fedopt_applies_the_server_optimizer_of_the_paper_to_the_averaged_update(
    federation: Federation, tmp_path: Path, project: ProvisionedProject, optimizer: str
) -> None:
    recipe = FedOptRecipe(optimizer=optimizer, server_lr=0.3, beta1=0.8, beta2=0.9, tau=0.05, **options())
    job_id, _, result = run(federation, tmp_path, recipe)
    step = FedOpt(optimizer, lr=0.3, beta1=0.8, beta2=0.9, tau=0.05)
    expected = replay([SITES] * 3, step=step)
    assert_model(final(result), expected[2], "final model")
    checkpoint = project.server / "workspace" / "jobs" / job_id / "checkpoint"
    state = tensors.load_file(checkpoint / "strategy.safetensors")
    for name in INITIAL:
        np.testing.assert_allclose(state[f"m/{name}"], step.m[name], rtol=1e-5, atol=1e-6, err_msg=f"m of {name}")
        np.testing.assert_allclose(state[f"v/{name}"], step.v[name], rtol=1e-5, atol=1e-7, err_msg=f"v of {name}")
    assert json.loads((checkpoint / "state.json").read_text())["strategy"] == {"name": "fedopt", "optimizer": optimizer}


def test_scaffold_control_variates_and_models_follow_the_paper_with_a_client_fraction(
    federation: Federation, tmp_path: Path, project: ProvisionedProject
) -> None:
    """Two of the three sites train each round (client_fraction): |S|/N = 2/3 scales c's update, and a site
    left out keeps its c_i for its next round."""
    recipe = ScaffoldRecipe(server_lr=0.8, **options(rounds=4, client_fraction=0.67, min_clients=2, seed=3))
    job_id, detail, result = run(federation, tmp_path, recipe)
    with federation.session() as session:
        log = session.job_log(job_id, "server", 0)
    by_name = {s.name: s for s in SITES}
    chosen = [
        [by_name[n] for n in re.search(rf"round {r}: model sent to (.*)", log)[1].split(", ")] for r in range(1, 5)
    ]
    assert [len(c) for c in chosen] == [2] * 4 and len({tuple(c) for c in chosen}) > 1, chosen
    scaffold = Scaffold(n_sites=3, server_lr=0.8)
    expected = scaffold.run(chosen)
    assert_model(final(result), expected[3], "final model")
    assert distance(expected[3], replay(chosen)[3]) > 1, "SCAFFOLD and FedAvg must differ here"

    checkpoint = project.server / "workspace" / "jobs" / job_id / "checkpoint"
    server_c = tensors.load_file(checkpoint / "strategy.safetensors")
    for name in INITIAL:
        np.testing.assert_allclose(server_c[name], scaffold.c[name], rtol=1e-5, atol=1e-5, err_msg=f"server c {name}")
    for kit in project.sites:
        site_c = tensors.load_file(workspace_dir(kit) / "jobs" / job_id / "scaffold_control.safetensors")
        for name in INITIAL:
            np.testing.assert_allclose(
                site_c[name], scaffold.c_site[kit.name][name], rtol=1e-5, atol=1e-5, err_msg=f"{kit.name} c_i"
            )
    assert not any(name.startswith(SCAFFOLD_PREFIX) for name in final(result)), "the result holds the model only"


def test_scaffold_leaves_a_stragglers_late_update_out_of_the_model_and_of_every_control_variate(
    federation: Federation, tmp_path: Path, project: ProvisionedProject
) -> None:
    """site-2 answers round 1 after the timeout: round 1 folds site-1 alone (k = 1 of |S| = 2), and site-2,
    whose late update was dropped, keeps its c_i = 0 for round 2."""
    sites = [ONE, TWO]
    more = dict(train_args=train_args(sites, slow=[("site-2", 1, 5.0)]), sites=["site-1", "site-2"], min_clients=2)
    recipe = ScaffoldRecipe(**options(rounds=2, round_timeout=3.0, min_responses=1, **more))
    job_id, detail, result = run(federation, tmp_path, recipe)
    assert [(r.sites_asked, r.sites_answered) for r in detail.rounds] == [(2, 1), (2, 2)]
    scaffold = Scaffold(n_sites=2)
    expected = scaffold.run([[ONE], sites], asked=[2, 2])
    assert_model(final(result), expected[1], "final model")
    server_c = tensors.load_file(project.server / "workspace" / "jobs" / job_id / "checkpoint" / "strategy.safetensors")
    for name in INITIAL:
        np.testing.assert_allclose(server_c[name], scaffold.c[name], rtol=1e-5, atol=1e-5, err_msg=f"server c {name}")
    site_2 = tensors.load_file(workspace_dir(project.sites[1]) / "jobs" / job_id / "scaffold_control.safetensors")
    for name in INITIAL:
        np.testing.assert_allclose(site_2[name], scaffold.c_site["site-2"][name], rtol=1e-5, atol=1e-5)


def test_an_installed_strategy_and_a_server_evaluator_join_the_round_records(
    federation: Federation, tmp_path: Path
) -> None:
    recipe = FedAvgRecipe(
        strategy={"name": "module:strategy_plugins.halfstep", "fraction": 0.25},
        evaluator="module:strategy_plugins.holdout",
        **options(),
    )
    _, detail, result = run(federation, tmp_path, recipe)
    expected = replay([SITES] * 3, step=lambda model, mean: {n: model[n] + 0.25 * (mean[n] - model[n]) for n in model})
    assert_model(final(result), expected[2], "final model")
    for record, model in zip(detail.rounds, expected, strict=True):
        assert record.metrics["server_mean"] == pytest.approx(model_mean(model), rel=1e-5), f"round {record.round}"
        assert record.metrics["server_offset"] == OFFSET, "the evaluator reads the server operator's data_root"
        assert record.metrics["mean"] == pytest.approx(record.metrics["server_mean"], rel=1e-5)
    header = (result / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"mean", "server_mean", "server_offset"} <= set(header)


def _submit_edited(federation: Federation, folder: Path, **changes: object) -> None:
    """Submit `folder` with its server.json changed (past the admin tool's own checks, to the server's)."""
    config = folder / "app" / jobspec.SERVER_CONFIG
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))
    with federation.session() as session:
        session.submit_job(folder)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strategy": "fedsgd"}, "unknown strategy 'fedsgd'; built in: fedavg, fedprox, fedopt, scaffold"),
        ({"strategy": {"name": "fedprox", "mu": -1}}, "strategy.mu must be greater than or equal to 0, got -1"),
        ({"strategy": {"name": "fedopt", "beta2": 1.5}}, "strategy.beta2 must be less than 1, got 1.5"),
        (
            {"strategy": {"name": "fedopt"}, "encryption": "ckks"},
            "cannot be combined with a server optimizer (FedOpt adam, server_lr 0.01), which needs the plaintext",
        ),
        ({"strategy": "module:acme_absent.strategy"}, "strategy module:acme_absent.strategy is not installed"),
        (
            {"strategy": "module:strategy_plugins.notastrategy"},
            "module:strategy_plugins.notastrategy is not a strategy",
        ),
        (
            {"strategy": {"name": "module:strategy_plugins.halfstep", "fraction": 2}},
            "refused its parameters: fraction must be a number in (0, 1], got 2",
        ),
        ({"evaluator": "module:acme_absent.eval"}, "evaluator module:acme_absent.eval is not installed on the server"),
    ],
)
def test_the_server_refuses_a_strategy_it_cannot_run_at_submit(
    federation: Federation, tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    folder = FedAvgRecipe(**options()).export(tmp_path / "job")  # type: ignore[arg-type]
    with pytest.raises(JobSpecError) as refused:
        _submit_edited(federation, folder, **changes)
    assert "app/config/server.json" in str(refused.value) and message in str(refused.value), str(refused.value)
    with federation.session() as session:
        assert not [j for j in session.list_jobs() if j.status == "SUBMITTED"], "nothing is kept of a refused job"
