"""The privacy settings of a job (fedgrid/privacy_config.py) and the server's DP arithmetic (fedserver/privacy.py):
refusals with their reasons, the noise of the server's aggregate with a fixed seed, and the ledger."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import provision_project
from federation import running

from fedgrid import dp, jobspec, tensors
from fedgrid.errors import JobSpecError
from fedgrid.recipe import FedAvgRecipe
from fedserver.grid import Result
from fedserver.model import Model
from fedserver.privacy import DPAggregator, PrivacyLedger

WHERE = "app/config/server.json"
PRIVACY = {"clip_norm": 1.0, "noise_multiplier": 1.1, "delta": 1e-5}


def config(**extra: Any) -> dict[str, Any]:
    return {"num_rounds": 3, "min_clients": 3, **extra}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"privacy": {**PRIVACY, "noise_multiplier": 0}}, "privacy.noise_multiplier must be a positive finite number"),
        ({"privacy": {**PRIVACY, "clip_norm": -1}}, "privacy.clip_norm must be a positive finite number"),
        ({"privacy": {**PRIVACY, "clip_norm": "1"}}, "privacy.clip_norm must be a positive finite number"),
        ({"privacy": PRIVACY, "strategy": "scaffold"}, "privacy cannot be combined with SCAFFOLD: its control"),
        ({"privacy": PRIVACY, "strategy": "module:acme.fedbuff"}, "privacy cannot be combined with an installed"),
        ({"privacy": PRIVACY, "clip_norm": 2.0}, "clip_norm and privacy are both set"),
        ({"privacy": PRIVACY, "encryption": "ckks"}, 'privacy.where "server" needs the server to clip and noise'),
        (
            {"privacy": PRIVACY, "secure_aggregation": "secagg+"},
            'which secure_aggregation hides from it; use privacy.where "sites"',
        ),
        ({"privacy": {**PRIVACY, "target_epsilon": 0.01}}, "privacy.target_epsilon 0.01 is below the ε of a single"),
        ({"secure_aggregation": "secagg+", "encryption": "ckks"}, "secure_aggregation \"secagg+\" and encryption"),
        ({"secure_aggregation": "secagg+", "clip_norm": 1.0}, "clip_norm clips each update at the server"),
        ({"secagg": {"bits": 8}}, 'secagg parameters are set but secure_aggregation is not "secagg+"'),
        (
            {"secure_aggregation": "secagg+", "secagg": {"bits": 31, "modulus_bits": 32}},
            "overflows modulus_bits=32; raise secagg.modulus_bits to 33",
        ),
        ({"secure_aggregation": "secagg+", "secagg": {"threshold": 1}}, "secagg.threshold must be an integer in 2..2"),
        ({"secure_aggregation": "secagg+", "secagg": {"value_range": 0}}, "secagg.value_range must be greater than 0"),
        ({"secure_aggregation": "secagg+", "secagg": {"rounding": 1}}, "unknown key secagg.rounding"),
        (
            {"privacy": {**PRIVACY, "where": "sites"}, "secure_aggregation": "secagg+", "secagg": {"value_range": 0.5}},
            "secagg.value_range 0.5 is below privacy.clip_norm 1",
        ),
        ({"secure_aggregation": "secagg"}, "secure_aggregation"),
    ],
)
def test_a_setting_that_breaks_a_guarantee_is_refused_with_the_reason(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(JobSpecError) as refused:
        jobspec.parse_server_config(config(**extra), WHERE)
    assert str(refused.value).startswith(WHERE), str(refused.value)
    assert message in str(refused.value)


def test_accepted_settings_are_parsed_into_their_parameters() -> None:
    fedopt = {"name": "fedopt", "optimizer": "adam"}
    parsed = jobspec.parse_server_config(config(privacy=PRIVACY, strategy=fedopt, client_fraction=0.5), WHERE)
    assert parsed.privacy == dp.DPParams(clip_norm=1.0, noise_multiplier=1.1, delta=1e-5, sampling_rate=0.5)
    secure = jobspec.parse_server_config(
        config(privacy={**PRIVACY, "where": "sites"}, secure_aggregation="secagg+", strategy="fedprox"), WHERE
    )
    assert secure.secagg.params(3).threshold == 2 and secure.secagg.params(8).threshold == 4
    scaffold = jobspec.parse_server_config(config(secure_aggregation="secagg+", strategy="scaffold"), WHERE)
    assert scaffold.secagg.bits == 16 and scaffold.privacy is None


def _result(site: str, arrays: dict[str, np.ndarray]) -> Result:
    return Result(site=site, task_id="t", num_samples=10, metrics={}, payload_format=tensors.FORMAT, path=None,
                  data=tensors.encode(arrays))


def test_the_server_noise_on_known_updates_has_standard_deviation_z_times_c_with_a_fixed_seed(tmp_path: Path) -> None:
    g = {"w": np.zeros(20_000, np.float32), "n": np.array(7, np.int64)}
    params = dp.DPParams(clip_norm=2.0, noise_multiplier=1.5, delta=1e-5)
    aggregator = DPAggregator(tensors.layout_of(g), Model.in_memory(tensors.FORMAT, tensors.encode(g)), params,
                              expected=4, rng=np.random.default_rng(7))
    updates = [np.full(20_000, v, np.float32) for v in (0.001, -0.002, 5.0)]  # the last is clipped to norm 2
    for i, update in enumerate(updates):
        aggregator.add(_result(f"site-{i}", {"w": update, "n": np.array(99, np.int64)}))
    assert aggregator.clipped == 1 and aggregator.count == 3
    out = tensors.decode(aggregator.finish(tmp_path, "m").data)
    clipped = updates[2].astype(np.float64) * (2.0 / (5.0 * math.sqrt(20_000)))
    noiseless = (updates[0] + updates[1] + clipped) / 4  # a fixed denominator: the 4 sites asked
    noise = (out["w"].astype(np.float64) - noiseless) * 4
    assert noise.std() == pytest.approx(1.5 * 2.0, rel=0.02)
    assert abs(noise.mean()) < 0.05
    assert out["n"] == 7  # integer tensors are not released: the global model keeps them


def test_the_ledger_charges_dropouts_with_less_noise_and_survives_a_restart() -> None:
    params = dp.DPParams(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, where="sites", target_epsilon=5.0)
    ledger = PrivacyLedger(params)
    first = ledger.charge(4, 4)
    second = ledger.charge(4, 2)  # half the sites added their noise: z·√(1/2)
    assert 0 < first < second
    assert second == pytest.approx(dp.epsilon_of_rounds(params, [1.0, math.sqrt(0.5)]))
    again = PrivacyLedger(params)
    again.restore(ledger.state())
    assert again.spent == pytest.approx(second)
    rounds = dp.max_rounds(params)
    fresh = PrivacyLedger(params)
    for _ in range(rounds):
        assert fresh.stop_reason(len(fresh.charged) + 1) == ""
        fresh.charge(4, 4)
    assert "privacy budget" in fresh.stop_reason(rounds + 1)


def test_a_secagg_job_whose_sum_would_overflow_for_the_project_sites_is_refused_at_submit(tmp_path: Path) -> None:
    """The job names no sites, so the server checks its SecAgg+ parameters against the project's 3 sites."""
    project = provision_project(tmp_path / "project", n_sites=3)
    recipe = FedAvgRecipe(
        name="overflow",
        model={"w": np.zeros(4, np.float32)},
        train_script=Path(__file__).parent / "scripts" / "train_tiny.py",
        min_clients=2,
        secure_aggregation="secagg+",
        secagg={"bits": 32, "modulus_bits": 33},
    )
    with running(project, sites=[]) as federation, federation.session() as session:
        with pytest.raises(Exception, match=r"can reach .* overflows modulus_bits=33.*with 3 sites"):
            session.submit_job(recipe.export(tmp_path / "job"))
        assert session.list_jobs() == []

