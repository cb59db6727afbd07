"""fedgrid.dp: clipping, the noise's size, the accountant (dp-accounting) against published numbers, and the
refusal of bad parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedgrid import dp
from fedgrid.errors import ConfigError, PayloadError

SHAPES = {"conv.weight": (16, 3, 5, 5), "conv.bias": (16,), "fc.weight": (10, 400)}


def model(seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {name: (rng.standard_normal(shape) * scale).astype(np.float32) for name, shape in SHAPES.items()}
    arrays["bn.num_batches_tracked"] = np.array(100 + seed, dtype=np.int64)
    return arrays


def l2(arrays: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays.values() if a.dtype.kind == "f"))


# -- clipping --------------------------------------------------------------------------------------


def test_a_large_update_is_clipped_to_the_norm_over_all_float_tensors_and_keeps_its_direction() -> None:
    reference, update = model(0), model(1)
    plain = {n: update[n].astype(np.float64) - reference[n] for n in SHAPES}
    clipped = dp.clip_update(update, reference, clip_norm=0.5)
    assert clipped.was_clipped and clipped.norm == pytest.approx(l2(plain), rel=1e-9)
    assert clipped.norm > 5  # far above the clip norm: the test exercises real clipping
    assert l2(clipped.delta) <= 0.5  # after rounding to float32, never above
    assert l2(clipped.delta) == pytest.approx(0.5, rel=1e-6)
    for name in SHAPES:
        assert clipped.delta[name].dtype == np.float32
        np.testing.assert_allclose(clipped.delta[name], plain[name] * 0.5 / clipped.norm, rtol=1e-5, atol=1e-9)
    # The integer counter is a site's own: its difference is not released.
    assert clipped.delta["bn.num_batches_tracked"] == 0
    assert clipped.delta["bn.num_batches_tracked"].dtype == np.int64


def test_a_small_update_passes_unchanged() -> None:
    reference = model(0)
    update = {n: a.copy() for n, a in reference.items()}
    update["conv.bias"] = update["conv.bias"] + np.float32(0.01)
    clipped = dp.clip_update(update, reference, clip_norm=1.0)
    assert not clipped.was_clipped
    np.testing.assert_array_equal(clipped.delta["conv.bias"], update["conv.bias"] - reference["conv.bias"])
    assert not clipped.delta["fc.weight"].any()


def test_clipping_refuses_an_update_of_another_layout_or_with_nan() -> None:
    reference = model(0)
    wrong = dict(reference, **{"fc.weight": np.zeros((10, 401), np.float32)})
    with pytest.raises(PayloadError, match="fc.weight"):
        dp.clip_update(wrong, reference, clip_norm=1.0)
    bad = dict(reference, **{"conv.bias": np.full(16, np.nan, np.float32)})
    with pytest.raises(PayloadError, match="conv.bias"):
        dp.clip_update(bad, reference, clip_norm=1.0)


# -- noise -----------------------------------------------------------------------------------------

# The sample standard deviation of N independent normal values has a relative standard error of 1/sqrt(2N);
# the tolerances below are 7 of those (a false failure has probability ~1e-12, and the seed is fixed anyway),
# tight enough that noise of the wrong size (z·C instead of z·C/sqrt(n), or a missing site) fails.
N = 1_000_000


def test_central_noise_on_the_sum_has_standard_deviation_z_times_c() -> None:
    params = dp.DPParams(clip_norm=0.8, noise_multiplier=1.1, delta=1e-5, where="server")
    std = dp.noise_std(params, n_sites=8)
    assert std == pytest.approx(0.88)
    total = {"w": np.zeros(N, np.float64), "steps": np.array(5, np.int64)}
    noisy = dp.add_noise(total, std, np.random.default_rng(20240601))
    tolerance = 7 / math.sqrt(2 * N)
    assert np.std(noisy["w"]) == pytest.approx(0.88, rel=tolerance)
    assert abs(np.mean(noisy["w"])) < 7 * 0.88 / math.sqrt(N)
    assert noisy["steps"] == 5  # integer tensors get no noise
    assert not total["w"].any()  # the input is not changed in place


def test_distributed_noise_of_n_sites_sums_to_the_central_noise_and_dropouts_leave_less() -> None:
    params = dp.DPParams(clip_norm=1.5, noise_multiplier=0.9, delta=1e-5, where="sites")
    n_sites, size = 8, N // 4
    per_site = dp.noise_std(params, n_sites)
    assert per_site == pytest.approx(0.9 * 1.5 / math.sqrt(8))
    rng = np.random.default_rng(7)
    shares = [dp.add_noise({"w": np.zeros(size, np.float32)}, per_site, rng)["w"] for _ in range(n_sites)]
    tolerance = 7 / math.sqrt(2 * size)
    assert np.std(np.sum(shares, axis=0, dtype=np.float64)) == pytest.approx(0.9 * 1.5, rel=tolerance)
    # Two sites drop out: the sum carries the noise of six, and the accountant must be told so.
    z_eff = dp.effective_noise_multiplier(params, n_expected=8, n_contributed=6)
    assert z_eff == pytest.approx(0.9 * math.sqrt(6 / 8))
    assert np.std(np.sum(shares[:6], axis=0, dtype=np.float64)) == pytest.approx(z_eff * 1.5, rel=tolerance)
    assert dp.epsilon_of_rounds(params, [0.9, z_eff]) > dp.epsilon_spent(params, 2)


# -- the accountant --------------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", dp.ACCOUNTANTS)
def test_epsilon_grows_with_every_round(accountant: str) -> None:
    params = dp.DPParams(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, sampling_rate=0.5, accountant=accountant)
    epsilons = [dp.epsilon_spent(params, r) for r in range(0, 21)]
    assert epsilons[0] == 0
    assert all(b > a for a, b in zip(epsilons, epsilons[1:], strict=False))
    assert dp.epsilon_of_rounds(params, [1.0] * 20) == pytest.approx(epsilons[20], rel=1e-9)


def test_the_accountant_reproduces_tensorflow_privacy_published_epsilons() -> None:
    """TensorFlow Privacy's compute_dp_sgd_privacy, which composes Poisson-subsampled Gaussian events with
    dp-accounting's RDP accountant, is tested against these values (tensorflow/privacy,
    tensorflow_privacy/privacy/analysis/compute_dp_sgd_privacy_test.py):

        ('Test0', n=60000, batch_size=150, noise_multiplier=1.3, epochs=15, delta=1e-5) -> eps 0.7242234026109595
        ('Test1', n=100000, batch_size=100, noise_multiplier=1.0, epochs=30, delta=1e-7) -> eps 1.4154988495444845

    with q = batch_size / n and steps = ceil(epochs · n / batch_size). A site taking part with probability q
    in each of `steps` rounds is the same mechanism, so ε must match to the digits (their orders differ from
    the accountant's defaults, with the same optimal order, 19 and 13)."""
    mnist = dp.DPParams(clip_norm=1.0, noise_multiplier=1.3, delta=1e-5, sampling_rate=150 / 60000)
    assert dp.epsilon_spent(mnist, math.ceil(15 * 60000 / 150)) == pytest.approx(0.7242234026109595, rel=1e-9)
    other = dp.DPParams(clip_norm=1.0, noise_multiplier=1.0, delta=1e-7, sampling_rate=100 / 100000)
    assert dp.epsilon_spent(other, math.ceil(30 * 100000 / 100)) == pytest.approx(1.4154988495444845, rel=1e-9)


def test_the_mnist_tutorial_setting_stays_below_its_published_bound_and_pld_is_tighter() -> None:
    """The TensorFlow Privacy MNIST tutorial (tensorflow/privacy, tutorials/README.md) reports ε = 2.92 at
    δ = 1e-5 for noise 1.12, batch 256 of 60000, 60 epochs, from the RDP bound of 2018; dp-accounting converts
    RDP to (ε, δ) with a tighter bound since, and the PLD accountant is tighter still."""
    steps = 60 * (60000 // 256)
    rdp_params = dp.DPParams(clip_norm=1.0, noise_multiplier=1.12, delta=1e-5, sampling_rate=256 / 60000)
    pld_params = dp.DPParams(**{**rdp_params.__dict__, "accountant": "pld"})
    rdp_eps, pld_eps = dp.epsilon_spent(rdp_params, steps), dp.epsilon_spent(pld_params, steps)
    assert 2.0 < pld_eps < rdp_eps < 2.92


@pytest.mark.parametrize("accountant", dp.ACCOUNTANTS)
def test_max_rounds_is_the_last_round_within_the_target(accountant: str) -> None:
    params = dp.DPParams(
        clip_norm=1.0, noise_multiplier=1.2, delta=1e-5, sampling_rate=0.3, accountant=accountant, target_epsilon=8.0
    )
    rounds = dp.max_rounds(params)
    assert rounds > 5
    assert dp.epsilon_spent(params, rounds) <= 8.0 < dp.epsilon_spent(params, rounds + 1)
    assert dp.max_rounds(params, target_epsilon=0.01) == 0
    assert dp.max_rounds(params, target_epsilon=1e9, limit=50) == 50


def test_max_rounds_needs_a_target() -> None:
    params = dp.DPParams(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5)
    with pytest.raises(ConfigError, match="target_epsilon is not set"):
        dp.max_rounds(params)


# -- parameters ------------------------------------------------------------------------------------

GOOD = {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("noise_multiplier", 0, "privacy.noise_multiplier must be a positive finite number, got 0"),
        ("noise_multiplier", -1.0, "privacy.noise_multiplier must be a positive finite number"),
        ("noise_multiplier", math.nan, "privacy.noise_multiplier must be a positive finite number"),
        ("noise_multiplier", math.inf, "privacy.noise_multiplier must be a positive finite number"),
        ("noise_multiplier", "1.0", "privacy.noise_multiplier must be a positive finite number, got '1.0'"),
        ("noise_multiplier", True, "privacy.noise_multiplier must be a positive finite number, got True"),
        ("clip_norm", 0.0, "privacy.clip_norm must be a positive finite number"),
        ("clip_norm", math.inf, "privacy.clip_norm must be a positive finite number"),
        ("delta", 0, r"privacy.delta must be a number in \(0, 1\)"),
        ("delta", 1, r"privacy.delta must be a number in \(0, 1\)"),
        ("delta", 1e-5j, r"privacy.delta must be a number in \(0, 1\)"),
        ("sampling_rate", 0.0, r"client_fraction\) must be a number in \(0, 1\]"),
        ("sampling_rate", 1.5, r"client_fraction\) must be a number in \(0, 1\]"),
        ("where", "clients", "privacy.where must be one of server, sites, got 'clients'"),
        ("mechanism", "laplace", "privacy.mechanism must be one of gaussian"),
        ("accountant", "moments", "privacy.accountant must be one of rdp, pld"),
        ("target_epsilon", -3, "privacy.target_epsilon must be a positive finite number"),
    ],
)
def test_bad_parameters_are_refused_naming_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dp.DPParams(**{**GOOD, field: value})


def test_the_privacy_section_of_a_job_is_parsed_with_its_location_in_errors() -> None:
    params = dp.parse_privacy({**GOOD, "where": "sites", "target_epsilon": 8}, 0.5, "app/config/server.json")
    assert (params.where, params.sampling_rate, params.target_epsilon) == ("sites", 0.5, 8.0)
    with pytest.raises(ConfigError, match=r"^app/config/server.json: privacy.noise_multiplier must be a positive"):
        dp.parse_privacy({**GOOD, "noise_multiplier": -1}, 1.0, "app/config/server.json")
    with pytest.raises(ConfigError, match="unknown key privacy.sigma"):
        dp.parse_privacy({**GOOD, "sigma": 1}, 1.0, "server.json")
    with pytest.raises(ConfigError, match="privacy.delta is missing"):
        dp.parse_privacy({"clip_norm": 1.0, "noise_multiplier": 1.0}, 1.0, "server.json")
    with pytest.raises(ConfigError, match="privacy must be a mapping"):
        dp.parse_privacy([1, 2], 1.0, "server.json")
