"""Two FedAvg rounds of the example job on the real Fashion-MNIST (Debian's dataset-fashion-mnist)."""

from __future__ import annotations

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
