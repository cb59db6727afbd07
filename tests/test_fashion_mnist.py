"""Two FedAvg rounds of the example job on the real Fashion-MNIST (Debian's dataset-fashion-mnist), and the DP
example job as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ProvisionedProject, provision_project
from federation import Federation, running

from fedgrid.data import prepare
from fedgrid.examples import FASHION_MNIST_TRAIN
from fedgrid.models import build_model
from fedgrid.recipe import FedAvgRecipe
from fedgrid.serde import JobInfo, RoundInfo

SOURCE = Path("/usr/share/datasets/fashion-mnist")

pytestmark = pytest.mark.skipif(
    not (SOURCE / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist; scripts/test.sh does it as root)",
)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Federation, ProvisionedProject]]:
    project = provision_project(tmp_path_factory.mktemp("fmnist"), n_sites=2)
    with running(project) as fed:
        yield fed, project


def test_two_rounds_on_real_fashion_mnist(federation: tuple[Federation, ProvisionedProject], tmp_path: Path) -> None:
    fed, _project = federation
    data = tmp_path / "data"
    summary = prepare("fashion-mnist", 2, "iid", seed=42, out=data)
    assert summary["train_samples"] == 60000 and len(summary["sites"]) == 2
    recipe = FedAvgRecipe(
        name="fmnist",
        model=build_model("mlp"),
        train_script=FASHION_MNIST_TRAIN,
        train_args=["--data_root", str(data), "--epochs", "1"],
        num_rounds=2,
        min_clients=2,
    )
    with fed.session() as session:
        job_id = session.submit_job(recipe.export(tmp_path / "job"))
        events = list(session.watch_job(job_id))
    rounds = [e for e in events if isinstance(e, RoundInfo)]
    final = events[-1]
    assert isinstance(final, JobInfo) and final.status == "FINISHED:COMPLETED", final
    assert [r.round for r in rounds] == [1, 2]
    assert rounds[-1].metrics["accuracy"] > 0.80, rounds
    assert rounds[-1].metrics["loss"] < rounds[0].metrics["loss"] + 0.05


def test_the_dp_example_job_prints_epsilon_per_round_and_its_sites_run_dp_sgd(
    federation: tuple[Federation, ProvisionedProject], tmp_path: Path
) -> None:
    """jobs/dp_fashion_mnist as a user runs it: site-level ε from the server's accountant on every progress
    line, and each site's DP-SGD (Opacus) ε over its own samples in its log."""
    _fed, project = federation
    job = Path(__file__).resolve().parent.parent / "jobs" / "dp_fashion_mnist" / "job.py"
    command = [
        sys.executable, str(job), "--n_clients", "2", "--num_rounds", "2", "--max_samples", "128",
        "--startup_kit", str(project.admin_roles["project_admin"]), "--data_root", str(tmp_path / "data"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    progress = [line for line in result.stdout.splitlines() if line.startswith("round ")]
    assert [line.split()[1] for line in progress] == ["1/2", "2/2"]
    epsilons = [float(line.split("ε ")[1].split()[0]) for line in progress]
    assert 0 < epsilons[0] < epsilons[1]
    folder = Path(result.stdout.split("Result can be found in: ")[1].strip())
    site_log = (folder / "sites" / "site-1" / "log.txt").read_text()
    assert "round 2: DP-SGD over this site's samples so far ε = " in site_log
