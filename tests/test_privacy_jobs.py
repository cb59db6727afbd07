"""Differential privacy and SecAgg+ end to end: real daemons over mTLS, the sites' updates known in advance
(tests/scripts/train_fixed.py), every global model recomputed with numpy (tests/replay.py).

The guarantees: the server's noise has the configured standard deviation, and so has the noise the sites
add under distributed DP; ε is in every round's record, grows with every round, matches the accountant, and
a target ε stops the job before the round that would exceed it; the sum SecAgg+ unmasks equals the plain sum
within the quantization error, also when a site drops out after sharing its keys, for FedAvg and SCAFFOLD;
a site that withholds its unmasking shares makes the round fail, without a sum.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import ProvisionedProject, provision_project
from federation import Federation, running
from replay import SCRIPT, Scaffold, Site, replay, train_args, trained
from rogue import RogueSite

from fedclient.secure_aggregation import FORMAT, SecureRound
from fedgrid import dp, tensors
from fedgrid.privacy_config import SecAggConfig
from fedgrid.recipe import FedAvgRecipe, ScaffoldRecipe
from fedgrid.v1 import federation_pb2 as fpb

REAL = [Site("site-1", 0.1, 20), Site("site-2", 0.2, 20), Site("site-3", 0.3, 20)]
ROGUE = Site("site-4", 0.4, 20)
WIDE = {"w": np.zeros((100, 100), np.float32), "b": np.zeros(10, np.float32)}
"""10,010 values: enough for the noise's standard deviation to be measured within 1%."""
SMALL = {
    "w": np.array([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]], np.float32),
    "b": np.array([0.1, -0.2], np.float32),
}
SECAGG = {"bits": 16, "value_range": 8.0, "step_timeout": 3.0}
STEP = 2 * 8.0 / (2**16 - 1)
"""One quantization level: each site's difference is within it, so each mean within it too."""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    return provision_project(tmp_path_factory.mktemp("privacy"), n_sites=4)


@pytest.fixture(scope="module")
def federation(project: ProvisionedProject) -> Iterator[Federation]:
    with running(project, project.sites[:3]) as fed:
        yield fed


def job(name: str, initial: dict[str, np.ndarray], sites: list[Site], rounds: int = 1, **options: object):  # noqa: ANN201
    recipe = ScaffoldRecipe if options.pop("scaffold", False) else FedAvgRecipe
    return recipe(
        name=name,
        model=initial,
        train_script=SCRIPT,
        train_args=train_args(sites),
        num_rounds=rounds,
        min_clients=len(sites),
        sites=[s.name for s in sites],
        **options,
    )


def run_job(federation: Federation, recipe: object, folder: Path) -> tuple[object, Path]:
    with federation.session() as session:
        job_id = session.submit_job(recipe.export(folder / "job"))  # type: ignore[attr-defined]
        info = session.wait(job_id)
        result = session.download_job(job_id, folder / "result") if info.status == "FINISHED:COMPLETED" else folder
        return info, result


def noise_of(final: dict[str, np.ndarray], expected: dict[str, np.ndarray], n: int) -> np.ndarray:
    """The noise on the sum, from the released mean: (released − noiseless mean) · n, every value."""
    return np.concatenate([(final[k].astype(np.float64) - expected[k]).ravel() * n for k in expected])


def clipped_mean(initial: dict[str, np.ndarray], sites: list[Site], clip_norm: float) -> dict[str, np.ndarray]:
    """g + the mean of the sites' round-1 differences clipped to `clip_norm` (each site counted once)."""
    g = {k: v.astype(np.float64) for k, v in initial.items()}
    total = {k: np.zeros_like(v) for k, v in g.items()}
    for site in sites:
        update = trained(g, site.shift, 1)
        delta = {k: update[k] - g[k] for k in g}
        norm = float(np.sqrt(sum(np.sum(d**2) for d in delta.values())))
        scale = min(1.0, clip_norm / norm)
        for k in g:
            total[k] += delta[k] * scale
    return {k: g[k] + total[k] / len(sites) for k in g}


def test_central_noise_has_the_configured_standard_deviation_and_epsilon_is_recorded(
    federation: Federation, tmp_path: Path
) -> None:
    privacy = {"clip_norm": 1.0, "noise_multiplier": 2.0, "delta": 1e-5, "where": "server"}
    info, result = run_job(federation, job("dp-central", WIDE, REAL, privacy=privacy), tmp_path)
    assert info.status == "FINISHED:COMPLETED", info.error
    final = tensors.load_file(result / "final_model.safetensors")
    noise = noise_of(final, clipped_mean(WIDE, REAL, 1.0), len(REAL))
    assert noise.std() == pytest.approx(2.0 * 1.0, rel=0.03)  # z·C, on 10,010 values
    assert abs(noise.mean()) < 0.1
    summary = json.loads((result / "result.json").read_text())
    expected = dp.epsilon_spent(dp.DPParams(clip_norm=1.0, noise_multiplier=2.0, delta=1e-5), 1)
    assert summary["privacy"]["epsilon"] == pytest.approx(expected)
    assert summary["final_metrics"]["epsilon"] == pytest.approx(expected)


def test_epsilon_grows_every_round_and_the_target_stops_the_job_before_it_is_exceeded(
    federation: Federation, tmp_path: Path
) -> None:
    params = dp.DPParams(clip_norm=1.0, noise_multiplier=1.5, delta=1e-5)
    epsilons = [dp.epsilon_spent(params, r) for r in (1, 2, 3)]
    target = (epsilons[1] + epsilons[2]) / 2
    privacy = {"clip_norm": 1.0, "noise_multiplier": 1.5, "delta": 1e-5, "target_epsilon": target}
    info, result = run_job(federation, job("dp-budget", SMALL, REAL, rounds=5, privacy=privacy), tmp_path)
    assert info.status == "FINISHED:COMPLETED", info.error
    summary = json.loads((result / "result.json").read_text())
    assert summary["rounds_completed"] == 2
    assert "privacy budget: round 3 would take ε to" in summary["stopped_early"]
    with open(result / "metrics.csv", newline="") as fh:
        recorded = [float(row["epsilon"]) for row in csv.DictReader(fh)]
    assert recorded == pytest.approx(epsilons[:2])
    assert recorded[0] < recorded[1] <= target
    assert summary["privacy"]["epsilon"] == pytest.approx(epsilons[1])
    assert (result / "metrics.png").stat().st_size > 0


def test_distributed_noise_under_secagg_sums_to_the_configured_standard_deviation(
    federation: Federation, tmp_path: Path
) -> None:
    privacy = {"clip_norm": 1.0, "noise_multiplier": 2.0, "delta": 1e-5, "where": "sites"}
    recipe = job("dp-secagg", WIDE, REAL, privacy=privacy, secure_aggregation="secagg+", secagg=SECAGG)
    info, result = run_job(federation, recipe, tmp_path)
    assert info.status == "FINISHED:COMPLETED", info.error
    final = tensors.load_file(result / "final_model.safetensors")
    noise = noise_of(final, clipped_mean(WIDE, REAL, 1.0), len(REAL))
    assert noise.std() == pytest.approx(2.0 * 1.0, rel=0.03)
    assert "secagg: 3 masked updates in the sum" in (result / "log.txt").read_text()


def test_the_unmasked_sum_is_the_plain_sum_within_the_quantization_error(
    federation: Federation, tmp_path: Path
) -> None:
    info, result = run_job(
        federation, job("secagg", SMALL, REAL, rounds=2, secure_aggregation="secagg+", secagg=SECAGG), tmp_path
    )
    assert info.status == "FINISHED:COMPLETED", info.error
    expected = replay([REAL, REAL], initial=SMALL)[-1]
    final = tensors.load_file(result / "final_model.safetensors")
    for name, value in expected.items():
        np.testing.assert_allclose(final[name], value, atol=2 * STEP)


def test_scaffold_under_secagg_matches_its_plaintext_replay(federation: Federation, tmp_path: Path) -> None:
    recipe = job("secagg-scaffold", SMALL, REAL, rounds=2, scaffold=True, secure_aggregation="secagg+", secagg=SECAGG)
    info, result = run_job(federation, recipe, tmp_path)
    assert info.status == "FINISHED:COMPLETED", info.error
    expected = Scaffold(n_sites=3).run([REAL, REAL], initial=SMALL)[-1]
    final = tensors.load_file(result / "final_model.safetensors")
    for name, value in expected.items():
        np.testing.assert_allclose(final[name], value, atol=20 * STEP)


def _secagg_rogue(project: ProvisionedProject, stop_after: str) -> RogueSite:
    """site-4 played by the test with the real site code of SecAgg+: it shares its keys, then drops out
    before its masked update ("shares"), or sends it and withholds its unmasking shares ("masked")."""
    config = SecAggConfig(**SECAGG)

    def train(stream: object, header: fpb.TaskHeader, payload: bytes) -> bool:
        model = tensors.decode(payload)
        update = trained({k: v.astype(np.float64) for k, v in model.items()}, ROGUE.shift, header.round)
        update = {k: v.astype(model[k].dtype) for k, v in update.items()}
        steps = SecureRound(stream, rogue.kit, header.job_id, header.task_id, config)
        if stop_after == "shares":
            original = stream.privacy  # type: ignore[attr-defined]

            def privacy(request: fpb.PrivacyRequest, what: str) -> fpb.PrivacyReply:
                answer = original(request, what)
                if request.WhichOneof("kind") == "shares":
                    raise _Dropped
                return answer

            stream.privacy = privacy  # type: ignore[attr-defined]
            try:
                steps.masked(update, model, None, {})
            except _Dropped:
                return False
            finally:
                stream.privacy = original  # type: ignore[attr-defined]
        masked = steps.masked(update, model, None, {})
        result = fpb.ResultHeader(job_id=header.job_id, task_id=header.task_id, payload_format=FORMAT, num_samples=1)
        stream.result(result, lambda: [masked])  # type: ignore[attr-defined]
        return True  # and no step 4

    rogue = RogueSite(project.sites[3], train=train, samples=20)
    return rogue


class _Dropped(Exception):
    """The rogue's way out of the protocol right after its shares went."""


def test_a_site_dropping_after_sharing_its_keys_leaves_the_others_sum_exact(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    rogue = _secagg_rogue(project, "shares")
    rogue.start()
    try:
        federation.wait_alive(["site-1", "site-2", "site-3", "site-4"])
        sites = [*REAL, ROGUE]
        recipe = job("secagg-drop", SMALL, sites, min_responses=3, secure_aggregation="secagg+", secagg=SECAGG)
        info, result = run_job(federation, recipe, tmp_path)
        assert info.status == "FINISHED:COMPLETED", info.error
        expected = replay([REAL], initial=SMALL)[-1]  # the three survivors only
        final = tensors.load_file(result / "final_model.safetensors")
        for name, value in expected.items():
            np.testing.assert_allclose(final[name], value, atol=2 * STEP)
        log = (result / "log.txt").read_text()
        assert "3 masked updates in the sum, 1 dropped after sharing keys (site-4)" in log
    finally:
        rogue.close()


def test_a_site_withholding_its_unmasking_shares_fails_the_round_without_a_sum(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    rogue = _secagg_rogue(project, "masked")
    rogue.start()
    try:
        federation.wait_alive(["site-1", "site-2", "site-4"])
        sites = [REAL[0], REAL[1], ROGUE]
        recipe = job("secagg-withhold", SMALL, sites, secure_aggregation="secagg+", secagg=SECAGG)
        info, _ = run_job(federation, recipe, tmp_path)
        assert info.status == "FINISHED:EXECUTION_EXCEPTION"
        assert "cannot unmask: only 1 of the 2 shares needed" in info.error, info.error
        with federation.session() as session:
            detail = session.show_job(info.job_id)  # type: ignore[attr-defined]
        assert detail.rounds == ()
    finally:
        rogue.close()

