"""What makes fedgrid installable anywhere: optional extras the server checks for at submit, and example
jobs that find their training script in the package and their kits and data in the current folder.

The installed wheel itself, in a fresh environment outside the checkout, is checked end to end by
scripts/check_wheel.py (run by scripts/test.sh).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import provision_project

from fedgrid import extras, jobcli, jobspec
from fedgrid.errors import FedgridError, JobSpecError
from fedgrid.examples import FASHION_MNIST_TRAIN
from fedgrid.recipe import FedAvgRecipe
from fedserver.tracking.factory import check_installed

ROOT = Path(__file__).resolve().parent.parent
TINY = Path(__file__).parent / "scripts" / "train_tiny.py"


def tracked_job(tmp_path: Path, *trackers: str) -> jobspec.JobSpec:
    recipe = FedAvgRecipe(name="tracked", model=torch.nn.Linear(8, 1), train_script=TINY, num_rounds=1)
    for tracker in trackers:
        recipe.add_experiment_tracking(tracker)
    return jobspec.load_job(recipe.export(tmp_path / "job"))


OPTIONAL_TRACKERS = [t for t in jobspec.TRACKERS if t in extras.EXTRAS]
"""Trackers that come with an extra; MLflow is a core dependency, the server's default store."""


def test_every_tracker_is_a_core_dependency_or_an_extra_of_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {dependency.split(">")[0].split("=")[0] for dependency in project["dependencies"]}
    for tracker in jobspec.TRACKERS:
        assert tracker in core or (tracker in extras.EXTRAS and tracker in project["optional-dependencies"]), tracker
    assert set(extras.EXTRAS) <= set(project["optional-dependencies"])
    assert OPTIONAL_TRACKERS == ["tensorboard"]


@pytest.mark.parametrize("tracker", OPTIONAL_TRACKERS)
def test_server_refuses_a_job_whose_tracker_is_not_installed(
    tracker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tracked_job(tmp_path, tracker)
    check_installed(spec)  # installed here (the test extra has both)
    monkeypatch.setitem(sys.modules, extras.EXTRAS[tracker].module, None)
    with pytest.raises(JobSpecError) as refused:
        check_installed(spec)
    assert str(refused.value).startswith(f"app/config/server.json: tracking {tracker!r} cannot run on this server: ")
    assert f"pip install 'fedgrid[{tracker}]'" in str(refused.value)
    check_installed(tracked_job(tmp_path, *(t for t in jobspec.TRACKERS if t != tracker)))


def test_example_job_finds_kits_and_data_in_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    jobcli.add_common_args(parser)
    args = parser.parse_args(["--n_clients", "2", "--max_samples", "64"])
    with pytest.raises(FedgridError, match="no admin kit under workspaces: provision a project there first"):
        jobcli.newest_admin_kit(args.workspaces)
    project = provision_project(tmp_path / "workspaces", n_sites=2)
    assert jobcli.newest_admin_kit(args.workspaces).resolve() == project.admins[0]

    data = tmp_path / "data" / "fashion-mnist-iid-2"
    data.mkdir(parents=True)
    (data / "summary.json").write_text("{}")
    folder = jobcli.fashion_mnist_recipe("fmnist", args).export(tmp_path / "job")
    client = json.loads((folder / "app" / jobspec.CLIENT_CONFIG).read_text())
    assert client["script"] == FASHION_MNIST_TRAIN.name
    assert client["args"][:2] == ["--data_root", str(data)] and client["args"][-2:] == ["--max_samples", "64"]
    assert (folder / "app" / "custom" / FASHION_MNIST_TRAIN.name).read_bytes() == FASHION_MNIST_TRAIN.read_bytes()
    assert FASHION_MNIST_TRAIN.parent.parent == Path(jobcli.__file__).parent
