"""Encrypted FedAvg end to end: real TenSEAL contexts from real provisioning, real daemons over mTLS.

The guarantees: the server holds no secret key and only ever receives ciphertexts; an update made with
another context, or corrupted, is refused with a clear log line while the round goes on; and the
encrypted run reaches the plain run's accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ProvisionedProject, provision_project
from federation import Federation, running, set_local, wait_until
from replay import INITIAL, SCRIPT, Scaffold, Site, replay, train_args
from rogue import RogueSite

from fedgrid import he, jobspec, tensors
from fedgrid.errors import EncryptionError, JobSpecError
from fedgrid.examples import FASHION_MNIST_TRAIN
from fedgrid.kit import workspace_dir
from fedgrid.recipe import FedAvgRecipe, FedProxRecipe, ScaffoldRecipe
from fedgrid.session import Session
from fedgrid.v1 import federation_pb2 as fpb

TINY = Path(__file__).parent / "scripts" / "train_tiny.py"
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    project = provision_project(
        tmp_path_factory.mktemp("he"), n_sites=3, he=True, he_params={"keys": "provisioned"}
    )
    set_local(project.server, "server.json", keep_uploads=True)
    return project


@pytest.fixture(scope="module")
def federation(project: ProvisionedProject) -> Iterator[Federation]:
    plugins = Path(__file__).parent / "plugins"  # strategy_plugins, "installed" on the server
    with running(project, project.sites[:2], env={"PYTHONPATH": str(plugins)}) as fed:
        yield fed


def context(kit: Path, secret: bool) -> he.HEContext:
    return he.HEContext.load((kit / "startup" / "he_context.bin").read_bytes(), expect_secret_key=secret)


def tiny(name: str, min_clients: int = 2, **options: object) -> FedAvgRecipe:
    torch.manual_seed(0)
    return FedAvgRecipe(
        name=name,
        model=torch.nn.Linear(8, 1),
        train_script=TINY,
        num_rounds=2,
        min_clients=min_clients,
        encryption=True,
        **options,
    )  # type: ignore[arg-type]


def test_only_sites_hold_the_secret_key(project: ProvisionedProject) -> None:
    server = context(project.server, secret=False)
    assert not server.has_secret_key
    site = context(project.sites[0], secret=True)
    assert site.has_secret_key and site.context_id == server.context_id
    for admin in project.admins:
        assert not (admin / "startup" / "he_context.bin").exists()
    update = b"".join(he.encrypt_update(site, {"w": np.ones((4, 4), np.float32)}, weight=3.0))
    with pytest.raises(EncryptionError, match="no secret key"):
        he.decrypt_mean(server, update)
    with pytest.raises(EncryptionError):
        context(project.sites[0], secret=False)  # the server refuses a context file that holds a secret key


def test_encrypted_job_completes_and_the_server_only_sees_ciphertexts(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    with federation.session() as session:
        job_id = session.submit_job(tiny("he-tiny").export(tmp_path / "job"))
        info = session.wait(job_id)
        assert info.status == "FINISHED:COMPLETED", info.error
        assert info.encrypted
        result = session.download_job(job_id, tmp_path / "result")
    summary = json.loads((result / "result.json").read_text())
    assert summary["encrypted"] is True and summary["rounds_completed"] == 2
    final = tensors.load_file(result / "final_model.safetensors")
    assert set(final) == {"weight", "bias"} and np.isfinite(final["weight"]).all()
    assert "final model decrypted and uploaded by site-1" in (result / "log.txt").read_text()
    # A 9-value model's encrypted update is one whole ciphertext (62 KB): expected at that size, it waited in
    # memory, and no spool file was ever used (the pool keeps every file used since the server started).
    assert not list((project.server / "workspace" / "spool").iterdir())

    uploads = sorted((project.server / "workspace" / "jobs" / job_id / "uploads").glob("round-*-train-*.ckks"))
    assert len(uploads) == 4, uploads
    site_ctx = context(project.sites[0], secret=True)
    for path in uploads:
        data = path.read_bytes()
        assert data.startswith(b"FGHE")
        arrays, weight = he.decrypt_update(site_ctx, data)
        assert weight == 50.0
        plain = (arrays["weight"] * weight).astype(np.float32).tobytes()
        assert plain not in data and arrays["weight"].astype(np.float32).tobytes() not in data


def _rogue_answer(project: ProvisionedProject, tmp_path: Path) -> RogueSite:
    """site-3 played by the test: round 1 encrypted with a foreign context, round 2 corrupted."""
    foreign_secret, _ = he.create_contexts(context(project.server, secret=False).params)
    foreign = he.HEContext.load(foreign_secret)
    own = context(project.sites[2], secret=True)

    def answer(header: fpb.TaskHeader, payload: bytes) -> tuple[str, bytes]:
        update = {"bias": np.zeros(1, np.float32), "weight": np.zeros((1, 8), np.float32)}
        if header.round == 1:
            return "ckks", b"".join(he.encrypt_update(foreign, update, weight=50.0))
        good = bytearray(b"".join(he.encrypt_update(own, update, weight=50.0)))
        middle = len(good) // 2
        good[middle : middle + 64] = bytes(64)
        return "ckks", bytes(good)

    return RogueSite(project.sites[2], answer)


def test_foreign_context_and_corrupted_updates_are_refused_and_the_round_goes_on(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    rogue = _rogue_answer(project, tmp_path)
    rogue.start()
    try:
        federation.wait_alive(["site-1", "site-2", "site-3"])
        with federation.session() as session:
            job_id = session.submit_job(tiny("he-rogue", min_clients=3, min_responses=2).export(tmp_path / "job"))
            info = session.wait(job_id)
            assert info.status == "FINISHED:COMPLETED", info.error
            detail = session.show_job(job_id)
            log = session.job_log(job_id, "server", 0)
        assert [(r.sites_answered, r.sites_asked) for r in detail.rounds] == [(2, 3), (2, 3)]
        assert "round-1-train" in rogue.answered and "round-2-train" in rogue.answered
        refusals = [line for line in log.splitlines() if "update from site-3 refused" in line]
        assert len(refusals) == 2, log
        assert "context" in refusals[0]
        assert "corrupt" in refusals[1].lower() or "digest" in refusals[1].lower() or "load" in refusals[1].lower()
    finally:
        rogue.close()
    with Session(project.admin_roles["project_admin"]) as session:
        wait_until(
            lambda: "site-3" not in [s.name for s in session.check_status("client") if s.state == "alive"],
            30,
            "rogue site-3 gone",
        )


def test_settings_that_need_plaintext_are_refused_at_submit(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    with pytest.raises(JobSpecError, match="cannot be combined with a server optimizer"):
        tiny("he-fedopt", server_lr=0.5).export(tmp_path / "a")
    folder = tiny("he-clip").export(tmp_path / "b")
    config = folder / "app" / jobspec.SERVER_CONFIG
    config.write_text(json.dumps({**json.loads(config.read_text()), "clip_norm": 1.0}))
    with federation.session() as session, pytest.raises(JobSpecError, match="clipping on the server"):
        session.submit_job(folder)
    installed = tiny("he-installed", strategy="module:strategy_plugins.halfstep").export(tmp_path / "c")
    with federation.session() as session, pytest.raises(JobSpecError, match="computes on the plaintext aggregate"):
        session.submit_job(installed)
    with pytest.raises(JobSpecError, match="cannot be combined with a server optimizer"):
        tiny("he-fedadam", strategy={"name": "fedopt", "optimizer": "adam"}).export(tmp_path / "d")
    with pytest.raises(JobSpecError, match="evaluator 'module:strategy_plugins.holdout' cannot run on an encrypted"):
        tiny("he-evaluator", evaluator="module:strategy_plugins.holdout").export(tmp_path / "e")


@pytest.mark.parametrize("strategy", ["fedprox", "scaffold"])
def test_fedprox_and_scaffold_run_on_ciphertexts_and_match_their_plaintext_replay(
    project: ProvisionedProject, federation: Federation, tmp_path: Path, strategy: str
) -> None:
    """SCAFFOLD's control variates ride in the encrypted update and aggregate: the server only adds them,
    the sites finish c's step after decrypting; the models and every site's c_i match the plaintext replay
    within CKKS's precision."""
    sites = [Site("site-1", shift=1.0, samples=100), Site("site-2", shift=4.0, samples=300)]
    common = dict(name=f"he-{strategy}", model=INITIAL, train_script=SCRIPT, train_args=train_args(sites), num_rounds=3)
    if strategy == "fedprox":
        recipe: FedAvgRecipe = FedProxRecipe(mu=0.4, min_clients=2, encryption=True, **common)
    else:
        recipe = ScaffoldRecipe(min_clients=2, encryption=True, **common)
    with federation.session() as session:
        job_id = session.submit_job(recipe.export(tmp_path / "job"))
        info = session.wait(job_id)
        assert info.status == "FINISHED:COMPLETED", info.error
        result = session.download_job(job_id, tmp_path / "result")
    final = tensors.load_file(result / "final_model.safetensors")
    scaffold = Scaffold(n_sites=2)
    expected = replay([sites] * 3, mu=0.4)[2] if strategy == "fedprox" else scaffold.run([sites] * 3)[2]
    assert set(final) == set(INITIAL)
    for name in INITIAL:
        np.testing.assert_allclose(final[name], expected[name], atol=1e-3, err_msg=f"final model {name}")
    if strategy == "scaffold":
        for kit in project.sites[:2]:
            site_c = tensors.load_file(workspace_dir(kit) / "jobs" / job_id / "scaffold_control.safetensors")
            for name in INITIAL:
                np.testing.assert_allclose(site_c[name], scaffold.c_site[kit.name][name], atol=1e-3)


def test_a_model_too_large_to_keep_in_memory_runs_encrypted_from_files(
    federation: Federation, project: ProvisionedProject, tmp_path: Path
) -> None:
    """9 MB of float32 (above the server's in-memory limit): the updates take upload turns and spool to
    files, which the server keeps in its pool once folded and overwrites in the next round; the 35 MB
    aggregate is written to a file and streamed from it to each site in turn, and the final model is still
    FedAvg's within CKKS's precision."""
    rng = np.random.default_rng(3)
    initial = {"w": rng.standard_normal((1500, 1500)).astype(np.float32), "b": np.zeros(7, np.float32)}
    sites = [Site("site-1", shift=1.0, samples=100), Site("site-2", shift=-2.0, samples=300)]
    recipe = FedAvgRecipe(
        name="he-large",
        model=initial,
        train_script=SCRIPT,
        train_args=train_args(sites),
        num_rounds=2,
        min_clients=2,
        encryption=True,
    )
    pool_dir = project.server / "workspace" / "spool"
    before = len(list(pool_dir.iterdir()))
    with federation.session() as session:
        job_id = session.submit_job(recipe.export(tmp_path / "job"))
        info = session.wait(job_id)
        assert info.status == "FINISHED:COMPLETED", info.error
        result = session.download_job(job_id, tmp_path / "result")
    log = (result / "log.txt").read_text()
    assert "round 1: aggregate of 2 updates serialized in" in log and "round-1.ckks)" in log, log
    pool = sorted(p.name for p in pool_dir.iterdir())
    # Two updates a round, two rounds: round 2 overwrote the two files of round 1 (four, had it made new ones),
    # and round 1 used what the pool held already.
    assert len(pool) == max(before, 2) and all(name.startswith("free-") for name in pool), (before, pool)
    assert not list((project.server / "workspace" / "jobs" / job_id).rglob("*.part"))
    final = tensors.load_file(result / "final_model.safetensors")
    expected = replay([sites] * 2, initial=initial)[1]
    for name in initial:
        np.testing.assert_allclose(final[name], expected[name], atol=1e-3, err_msg=f"final model {name}")


@pytest.mark.skipif(
    not FASHION.exists(), reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)"
)
def test_encrypted_accuracy_matches_plain_on_fashion_mnist(federation: Federation, tmp_path: Path) -> None:
    from fedgrid.data import prepare
    from fedgrid.models import build_model

    data = tmp_path / "data"
    prepare("fashion-mnist", 2, "iid", seed=7, out=data)
    torch.manual_seed(0)
    initial = {k: v.numpy() for k, v in build_model("mlp").state_dict().items()}
    accuracy = {}
    for encrypted in (False, True):
        recipe = FedAvgRecipe(
            name=f"fmnist-{'he' if encrypted else 'plain'}",
            model=initial,
            train_script=FASHION_MNIST_TRAIN,
            train_args=["--data_root", str(data), "--max_samples", "3000", "--seed", "7"],
            num_rounds=2,
            min_clients=2,
            encryption=encrypted,
        )
        with federation.session() as session:
            job_id = session.submit_job(recipe.export(tmp_path / recipe.name))
            info = session.wait(job_id)
            assert info.status == "FINISHED:COMPLETED", info.error
            accuracy[encrypted] = session.show_job(job_id).rounds[-1].metrics["accuracy"]
    assert accuracy[True] > 0.7
    assert abs(accuracy[True] - accuracy[False]) <= 0.002, accuracy
