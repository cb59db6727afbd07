"""The simulator: the same job folder on virtual sites, run by the same server and site code.

What a user relies on: a job simulated gives the accuracy the same job gives on a real federation (same
seed, same split); the Ray pool gives the local pool's; stragglers make rounds close on their timeout with
the updates that came; a crash in one virtual site fails the job with that site's traceback; an encrypted
job runs on a generated context; 100 virtual sites with C = 0.1 run; bad input is refused before round 1.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import provision_project
from federation import running

from fedgrid import dp
from fedgrid.data import prepare
from fedgrid.errors import ConfigError, JobSpecError
from fedgrid.examples import FASHION_MNIST_TRAIN
from fedgrid.he.params import HEParams
from fedgrid.models import build_model
from fedgrid.recipe import FedAvgRecipe
from fedgrid.serde import JobInfo, RoundInfo
from fedgrid.sim import SimEnv

TINY = Path(__file__).parent / "scripts" / "train_tiny.py"
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
ROOT = Path(__file__).resolve().parent.parent
needs_fashion = pytest.mark.skipif(
    not FASHION.exists(), reason="Fashion-MNIST is not installed (dataset-fashion-mnist)"
)


def tiny(name: str, sites: int = 4, **options: object) -> FedAvgRecipe:
    torch.manual_seed(0)
    options.setdefault("num_rounds", 3)
    options.setdefault("min_clients", sites)
    return FedAvgRecipe(name=name, model=torch.nn.Linear(8, 1), train_script=TINY, **options)  # type: ignore[arg-type]


def fashion(name: str, data: Path) -> FedAvgRecipe:
    """The MLP on a few hundred Fashion-MNIST images per site: a real job, in seconds."""
    torch.manual_seed(42)
    args = ["--data_root", str(data), "--max_samples", "300", "--batch_size", "32", "--seed", "42"]
    return FedAvgRecipe(
        name=name, model=build_model("mlp"), train_script=FASHION_MNIST_TRAIN, train_args=args, num_rounds=2,
        min_clients=4, seed=42,
    )  # fmt: skip


def simulate(recipe: FedAvgRecipe, env: SimEnv) -> tuple[JobInfo, list[RoundInfo], Path]:
    rounds: list[RoundInfo] = []
    run = recipe.execute(env)
    info = run.wait(progress=rounds.append)
    return info, rounds, run.get_result()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not FASHION.exists():
        pytest.skip("Fashion-MNIST is not installed (dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("sim-data") / "fashion-4"
    prepare("fashion-mnist", 4, "iid", seed=42, out=root)
    return root


@needs_fashion
def test_the_same_job_folder_gives_the_same_accuracy_simulated_and_on_a_federation(data: Path, tmp_path: Path) -> None:
    folder = fashion("same-job", data).export(tmp_path / "job")
    project = provision_project(tmp_path / "project", n_sites=4)
    with running(project) as federation, federation.session() as session:
        job_id = session.submit_job(folder)
        deployed = [e for e in session.watch_job(job_id) if isinstance(e, RoundInfo)]
    info, simulated, result = simulate(fashion("same-job", data), SimEnv(num_clients=4, results=tmp_path / "sim"))

    assert info.status == "FINISHED:COMPLETED", info.error
    assert [r.round for r in simulated] == [r.round for r in deployed] == [1, 2]
    for sim, real in zip(simulated, deployed, strict=True):
        assert abs(sim.metrics["accuracy"] - real.metrics["accuracy"]) <= 0.001, (sim.metrics, real.metrics)
    assert simulated[-1].metrics["accuracy"] > 0.4  # it learned (10 classes: chance is 0.1)
    for name in ("metrics.json", "metrics.csv", "metrics.png", "result.json", "final_model.safetensors", "log.txt"):
        assert (result / name).is_file(), name
    assert "site-3: 300 training and 2500 validation samples" in (result / "sites" / "site-3" / "log.txt").read_text()


@needs_fashion
def test_the_ray_pool_gives_the_local_pools_accuracy(data: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'fedgrid[ray]')")
    try:
        info, on_ray, _ = simulate(fashion("on-ray", data), SimEnv(4, ray_address="local", results=tmp_path / "r"))
    except ConfigError as exc:
        if "cannot start Ray here" not in str(exc):
            raise
        pytest.skip(str(exc))
    _, local, _ = simulate(fashion("on-ray", data), SimEnv(4, results=tmp_path / "l"))

    assert info.status == "FINISHED:COMPLETED", info.error
    assert abs(on_ray[-1].metrics["accuracy"] - local[-1].metrics["accuracy"]) <= 0.001


def test_stragglers_do_not_answer_and_rounds_close_on_their_timeout(tmp_path: Path) -> None:
    recipe = tiny("stragglers", sites=8, round_timeout=2.0, min_responses=1, seed=7)
    info, rounds, result = simulate(recipe, SimEnv(8, stragglers=0.3, results=tmp_path))

    assert info.status == "FINISHED:COMPLETED", info.error
    sites = [f"site-{i}" for i in range(1, 9)]
    # Each chosen site straggles with the given chance, drawn from the job's seed, the round and its name.
    expected = [sum(random.Random(f"7/{r}/{s}").random() < 0.3 for s in sites) for r in (1, 2, 3)]
    assert sum(expected) > 0
    assert [(r.sites_asked, r.sites_answered) for r in rounds] == [(8, 8 - n) for n in expected]
    assert "did not answer within 2 s; their late updates will be dropped" in (result / "log.txt").read_text()


def test_virtual_sites_of_one_host_do_not_share_the_memory_of_a_model(tmp_path: Path) -> None:
    """A host receives each model once for all its sites: one site's script changing its tensors in place
    must not change what the next site gets."""
    recipe = tiny("scribbles", sites=4, num_rounds=2, train_args=["--scribble_training"])
    info, rounds, _ = simulate(recipe, SimEnv(4, workers=1, results=tmp_path))
    assert info.status == "FINISHED:COMPLETED", info.error
    assert [(r.sites_asked, r.sites_answered) for r in rounds] == [(4, 4), (4, 4)]


def test_a_crash_in_one_virtual_site_fails_the_job_with_its_traceback(tmp_path: Path) -> None:
    recipe = tiny("crash", train_args="--crash_site site-3 --crash_round 3")
    info, rounds, result = simulate(recipe, SimEnv(4, results=tmp_path))

    assert info.status == "FINISHED:EXECUTION_EXCEPTION"
    assert info.error == "site-3: RuntimeError: deliberate failure at site-3 in round 3"
    # Round 1 is recorded; round 2's record waits for its evaluations, which ride on round 3's training
    # results: the other sites' may or may not be in before site-3's failure ends the job.
    assert [r.round for r in rounds] in ([1], [1, 2])
    log = (result / "sites" / "site-3" / "log.txt").read_text()
    assert "Traceback (most recent call last)" in log and "deliberate failure at site-3 in round 3" in log
    assert json.loads((result / "result.json").read_text())["sites"]["site-3"].startswith("failed: RuntimeError")


def test_an_encrypted_job_runs_on_a_generated_context(tmp_path: Path) -> None:
    recipe = tiny("encrypted", sites=3, num_rounds=2, encryption=True)
    info, rounds, result = simulate(recipe, SimEnv(3, results=tmp_path, he_params=HEParams()))

    assert info.status == "FINISHED:COMPLETED", info.error
    # Round 1 is recorded; round 2's record waits for its evaluations, which ride on round 3's training
    # results: the other sites' may or may not be in before site-3's failure ends the job.
    assert [r.round for r in rounds] in ([1], [1, 2])
    assert json.loads((result / "result.json").read_text())["encrypted"] is True
    assert (result / "final_model.safetensors").is_file()
    assert "final model decrypted and uploaded by site-1" in (result / "log.txt").read_text()


def test_a_hundred_virtual_sites_with_a_tenth_training_each_round(tmp_path: Path) -> None:
    recipe = tiny("hundred", sites=100, min_clients=10, client_fraction=0.1)
    info, rounds, result = simulate(recipe, SimEnv(100, workers=2, results=tmp_path))

    assert info.status == "FINISHED:COMPLETED", info.error
    assert [(r.sites_asked, r.sites_answered) for r in rounds] == [(10, 10)] * 3
    states = json.loads((result / "result.json").read_text())["sites"]
    assert len(states) == 100 and set(states.values()) == {"finished"}
    assert rounds[-1].metrics["accuracy"] > rounds[0].metrics["accuracy"]


def sim_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedgrid.sim", *args], capture_output=True, text=True, timeout=120)


def scratch_folders() -> set[Path]:
    """The simulator's scratch folders (fedgrid/sim/link.py: in /dev/shm, else the temporary folder)."""
    return {p for where in ("/dev/shm", tempfile.gettempdir()) for p in Path(where).glob("fedgrid-sim-*")}


def test_a_private_job_simulates_with_epsilon_charged_every_round(tmp_path: Path) -> None:
    privacy = {"clip_norm": 1.0, "noise_multiplier": 1.5, "delta": 1e-5}
    before = scratch_folders()
    info, rounds, result = simulate(tiny("dp", privacy=privacy), SimEnv(4, results=tmp_path))
    assert scratch_folders() - before == set(), "the simulation's scratch folders are gone once wait() returns"

    assert info.status == "FINISHED:COMPLETED", info.error
    params = dp.DPParams(clip_norm=1.0, noise_multiplier=1.5, delta=1e-5)
    assert [r.metrics["epsilon"] for r in rounds] == pytest.approx([dp.epsilon_spent(params, n) for n in (1, 2, 3)])
    assert json.loads((result / "result.json").read_text())["privacy"]["epsilon"] == pytest.approx(
        dp.epsilon_spent(params, 3)
    )


def test_bad_input_is_refused_before_round_1(tmp_path: Path) -> None:
    beyond = FedAvgRecipe(
        name="beyond", model=torch.nn.Linear(8, 1), train_script=TINY, min_clients=2, sites=["site-1", "site-5"]
    ).export(tmp_path / "beyond")
    result = sim_cli(str(beyond), "-n", "4", "--results", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr == (
        "fedgrid-sim: error: meta.json: deploy_map names site-5, beyond the 4 simulated sites (site-1 .. site-4); "
        "raise -n or name sites within it\n"
    )

    data = tmp_path / "data"
    for site in ("site-1", "site-2"):
        (data / site).mkdir(parents=True)
    without = tiny("nodata", sites=2, train_args=["--data_root", str(data)]).export(tmp_path / "nodata")
    with pytest.raises(ConfigError, match=r"data folder .*/data/site-3 is missing \(1 of the 3 sites have none\)"):
        SimEnv(3, results=tmp_path / "out").submit(without)

    encrypted = tiny("he", sites=2, encryption=True).export(tmp_path / "he")
    result = sim_cli(str(encrypted), "-n", "2", "--results", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "the job is encrypted (encryption 'ckks') and no CKKS parameters were given; give them with --he FILE" in (
        result.stderr
    )
    with pytest.raises(JobSpecError, match="round_timeout is 0"):
        SimEnv(2, stragglers=0.2, results=tmp_path / "out").submit(tiny("s", sites=2).export(tmp_path / "s"))
    secure = tiny("secagg", sites=3, secure_aggregation="secagg+").export(tmp_path / "secagg")
    with pytest.raises(JobSpecError, match="secure_aggregation 'secagg\\+' signs each site's keys with its kit's"):
        SimEnv(3, results=tmp_path / "out").submit(secure)
    assert not (tmp_path / "out").exists(), "nothing is written for a refused job"


def test_without_ray_the_ray_option_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    folder = tiny("ray", sites=2).export(tmp_path / "job")
    with pytest.raises(ConfigError) as refused:
        SimEnv(2, ray_address="local", results=tmp_path / "out").submit(folder)
    assert str(refused.value) == (
        "--ray: the simulator's workers on Ray needs the ray package, which is not installed "
        "(pip install 'fedgrid[ray]')"
    )


def test_the_mcmahan_benchmark_runs_its_smoke(tmp_path: Path) -> None:
    if not FASHION.exists():
        pytest.skip("Fashion-MNIST is not installed (dataset-fashion-mnist)")
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "mcmahan.py"), "--smoke", "--splits", "shards", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| split | FedSGD rounds | FedAvg rounds | speed-up | paper (MNIST, 99%) |" in result.stdout
    assert (tmp_path / "mcmahan_fashion_mnist.png").stat().st_size > 10_000
