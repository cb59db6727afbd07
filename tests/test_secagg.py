"""fedgrid.secagg: SecAgg+ rounds in memory with real X25519, AES and Shamir sharing: the sum is exact within the
quantization error with and without dropouts, the server's view alone says nothing, and every refusal."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
import pytest
from scipy import stats

from fedgrid import secagg
from fedgrid.errors import ConfigError, PayloadError, PrivacyError

SITES = [f"site-{i}" for i in range(1, 9)]
SHAPES = {"fc1.weight": (64, 100), "fc1.bias": (64,), "fc2.weight": (10, 64), "fc2.bias": (10,)}  # 7,114 values
PARAMS = secagg.SecAggParams(threshold=5, bits=16, value_range=1.0, modulus_bits=32)


def updates(sites: list[str] = SITES, seed: int = 0) -> dict[str, np.ndarray]:
    """Each site's update as one vector, flattened from a tensor set the way a worker would."""
    rng = np.random.default_rng(seed)
    out = {}
    for site in sites:
        arrays = {name: rng.uniform(-1, 1, shape).astype(np.float32) for name, shape in SHAPES.items()}
        _, out[site] = secagg.flatten(arrays)
    return out


@dataclass
class Round:
    """A round driven step by step, as the server and the sites would, up to the unmasking answers."""

    setup: secagg.RoundSetup
    states: dict[str, secagg.SiteState]
    adverts: dict[str, secagg.Advertisement]
    commitments: dict[str, bytes]
    quantized: dict[str, np.ndarray]
    masked: dict[str, np.ndarray]
    inbox: dict[str, dict[str, bytes]]


def run_to_masking(vectors: dict[str, np.ndarray], params: secagg.SecAggParams = PARAMS, seed: int = 1) -> Round:
    setup = secagg.setup_round(b"job-1/round-3", list(vectors), params, graph_seed=seed)
    states, adverts = {}, {}
    for site in setup.sites:
        states[site], adverts[site] = secagg.advertise(setup, site)
    shared = {s: secagg.share_keys(states[s], {v: adverts[v] for v in states[s].neighbours}) for s in setup.sites}
    inbox: dict[str, dict[str, bytes]] = {s: {} for s in setup.sites}
    for message in shared.values():
        for recipient, blob in message.encrypted_shares.items():
            inbox[recipient][message.site] = blob
    rng = np.random.default_rng(seed)
    quantized = {s: secagg.quantize(vectors[s], params, rng) for s in setup.sites}
    masked = {s: secagg.mask(states[s], quantized[s], inbox[s]) for s in setup.sites}
    commitments = {s: m.commitment for s, m in shared.items()}
    return Round(setup, states, adverts, commitments, quantized, masked, inbox)


# -- the sum ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stochastic", [True, False], ids=["stochastic", "nearest"])
@pytest.mark.parametrize("dropped", [(), ("site-4",), ("site-2", "site-7")], ids=["none", "one", "two"])
def test_the_unmasked_sum_is_the_plain_sum_of_the_survivors(dropped: tuple[str, ...], stochastic: bool) -> None:
    vectors = updates()
    params = replace(PARAMS, stochastic_rounding=stochastic)
    total, count = secagg.aggregate_in_memory(vectors, params, dropped=dropped, rng=np.random.default_rng(5))
    plain = sum(v for site, v in vectors.items() if site not in dropped)
    assert count == 8 - len(dropped)
    # Per value, stochastic rounding is off by less than one step, rounding to the nearest by at most half.
    bound = count * params.step * (1.0 if stochastic else 0.5)
    error = np.abs(total - plain)
    assert error.max() <= bound
    assert error.mean() < bound / 4  # errors of different sites partly cancel; a stray mask would not


def test_a_sparse_graph_with_dropouts_and_a_silent_survivor_still_sums() -> None:
    sites = [f"s{i:02d}" for i in range(12)]
    vectors = updates(sites, seed=3)
    params = secagg.SecAggParams(threshold=4, bits=12, value_range=1.0, modulus_bits=32, degree=6)
    graph = secagg.neighbour_graph(sites, 6, seed=9)
    assert all(len(n) == 6 and site not in n for site, n in graph.items())
    assert all(site in graph[other] for site, n in graph.items() for other in n)  # symmetric
    total, count = secagg.aggregate_in_memory(
        vectors, params, graph_seed=9, dropped=("s03", "s10"), silent=("s05",), rng=np.random.default_rng(1)
    )
    plain = sum(v for site, v in vectors.items() if site not in ("s03", "s10"))
    assert count == 10
    assert np.abs(total - plain).max() <= count * params.step


def test_masked_vectors_travel_in_four_bytes_per_value_like_float32() -> None:
    r = run_to_masking(updates(SITES[:3]), secagg.SecAggParams(threshold=2))
    vector = r.masked["site-1"]
    data = secagg.encode_masked(vector, r.setup.params)
    assert len(data) == 4 * vector.size
    np.testing.assert_array_equal(secagg.decode_masked(data, r.setup.params, vector.size), vector)
    with pytest.raises(PayloadError, match="expected 7114 values of 4 bytes"):
        secagg.decode_masked(data[:-4], r.setup.params, vector.size)
    wide = secagg.SecAggParams(threshold=2, modulus_bits=40)
    with pytest.raises(PayloadError, match="a value above 2"):
        secagg.decode_masked(np.full(3, 1 << 41, np.uint64).tobytes(), wide, 3)


# -- what the server sees --------------------------------------------------------------------------


def test_a_masked_vector_alone_is_uniform_and_unrelated_to_the_update() -> None:
    vectors = updates()
    vectors["site-1"] = np.zeros_like(vectors["site-1"])  # the most regular update: one value repeated
    r = run_to_masking(vectors)
    masked, quantized = r.masked["site-1"], r.quantized["site-1"]
    assert len(np.unique(quantized)) <= 2  # zeros quantize to the middle level (or its neighbour)
    assert np.mean(masked == quantized) < 0.001
    # The top 4 bits of each masked value fall in 16 bins evenly: chi-square at p = 1e-6.
    counts = np.bincount((masked >> 28).astype(np.int64), minlength=16)
    chi2 = float(np.sum((counts - masked.size / 16) ** 2 / (masked.size / 16)))
    assert chi2 < stats.chi2.isf(1e-6, df=15)
    # And a masked vector carries no trace of a varied update either.
    other = r.masked["site-2"].astype(np.float64)
    assert abs(np.corrcoef(other, r.quantized["site-2"].astype(np.float64))[0, 1]) < 0.06


# -- refusals --------------------------------------------------------------------------------------


def test_fewer_than_threshold_shares_is_a_clear_error_not_a_sum() -> None:
    vectors = updates()
    # site-1 drops after masking; four survivors withhold their answers, so only 3 of the 5 shares needed come.
    with pytest.raises(PrivacyError, match="only 3 of the 5 shares needed to recover .* arrived"):
        secagg.aggregate_in_memory(vectors, PARAMS, dropped=("site-1",), silent=SITES[1:5])


def test_sites_refuse_to_unmask_when_fewer_than_threshold_survived() -> None:
    with pytest.raises(PrivacyError, match="only 4 sites survived, fewer than the threshold 5"):
        secagg.aggregate_in_memory(updates(), PARAMS, dropped=SITES[:4])


def pieces(sites: set[str], graph: dict[str, tuple[str, ...]]) -> int:
    """How many connected groups `sites` form in `graph` (edges between them only)."""
    left, count = set(sites), 0
    while left:
        count += 1
        todo = [left.pop()]
        while todo:
            for v in graph[todo.pop()]:
                if v in left:
                    left.remove(v)
                    todo.append(v)
    return count


def test_survivors_that_fall_apart_in_the_graph_are_not_unmasked() -> None:
    """With 4 neighbours each, 4 dropouts can cut the survivors in two groups; the server would get each
    group's sum, so the sites refuse step 4 (and the server refuses to unmask). One dropout cuts nothing."""
    sites = [f"s{i:02d}" for i in range(12)]
    params = secagg.SecAggParams(threshold=3, bits=12, degree=4)
    graph = secagg.neighbour_graph(sites, 4, seed=4)
    cut = next(c for c in itertools.combinations(sites, 4) if pieces(set(sites) - set(c), graph) > 1)
    vectors = updates(sites)
    with pytest.raises(PrivacyError, match="fall apart into separate groups"):
        secagg.aggregate_in_memory(vectors, params, graph_seed=4, dropped=cut)
    total, count = secagg.aggregate_in_memory(vectors, params, graph_seed=4, dropped=cut[:1])
    assert count == 11
    assert np.abs(total - sum(v for s, v in vectors.items() if s != cut[0])).max() <= 11 * params.step


def test_a_site_answers_the_unmasking_request_once_and_only_a_consistent_one() -> None:
    r = run_to_masking(updates())
    state = r.states["site-1"]
    others = [s for s in SITES if s != "site-1"]
    with pytest.raises(PrivacyError, match="site-3 both survived and dropped"):
        secagg.reveal(state, SITES, ["site-3"])
    with pytest.raises(PrivacyError, match="neither whether site-8 survived nor dropped"):
        secagg.reveal(state, SITES[:7], [])
    with pytest.raises(PrivacyError, match="site-1 is asked to unmask but is not on the survivor list"):
        secagg.reveal(state, others, ["site-1"])
    first = secagg.reveal(state, SITES[:6], SITES[6:])
    assert set(first.seed_shares) == set(SITES[1:6]) and set(first.key_shares) == {"site-7", "site-8"}
    # A second request, e.g. one saying site-7 survived after all, would hand out its seed share too.
    with pytest.raises(PrivacyError, match="already answered"):
        secagg.reveal(state, SITES[:7], SITES[7:])


def test_an_altered_share_is_refused_rather_than_giving_a_wrong_sum() -> None:
    r = run_to_masking(updates())
    survivors, dropped = SITES[:7], SITES[7:]
    masked = {s: r.masked[s] for s in survivors}

    def answers() -> list[secagg.Reveal]:
        return [secagg.reveal(replace(r.states[s], revealed=False), survivors, dropped) for s in survivors]

    reveals = answers()
    assert np.array_equal(
        secagg.unmask(r.setup, r.adverts, r.commitments, masked, reveals),
        sum(r.quantized[s].astype(np.uint64) for s in survivors).astype(np.uint32),
    )
    bad = reveals[0]
    share = bad.seed_shares["site-2"]
    forged = replace(bad, seed_shares={**bad.seed_shares, "site-2": replace(share, data=bytes(16))})
    with pytest.raises(PrivacyError, match="shares of site-2's self-mask seed do not match its commitment"):
        secagg.unmask(r.setup, r.adverts, r.commitments, masked, [forged, *answers()[1:]])
    share = bad.key_shares["site-8"]
    forged = replace(bad, key_shares={"site-8": replace(share, data=share.data[:31] + bytes([share.data[31] ^ 1]))})
    with pytest.raises(PrivacyError, match="shares of site-8's mask key do not give its advertised key"):
        secagg.unmask(r.setup, r.adverts, r.commitments, masked, [forged, *answers()[1:]])
    # A survivor cannot hand in a dropped site's seed share, nor shares of a site that is not its neighbour.
    leaked = replace(bad, seed_shares={**bad.seed_shares, "site-8": share})
    with pytest.raises(PrivacyError, match="site-1 sent a seed share of site-8, which it may not hold"):
        secagg.unmask(r.setup, r.adverts, r.commitments, masked, [leaked, *answers()[1:]])


def test_shares_encrypted_for_one_neighbour_do_not_open_at_another() -> None:
    r = run_to_masking(updates(SITES[:4]), secagg.SecAggParams(threshold=2))
    state = secagg.SiteState(
        r.setup, "site-1", r.states["site-1"].mask_private, r.states["site-1"].channel_private, seed=b"s" * 16
    )
    state.adverts = dict(r.states["site-1"].adverts)
    misrouted = {**r.inbox["site-1"], "site-2": r.inbox["site-3"]["site-2"]}  # site-2's shares meant for site-3
    with pytest.raises(PrivacyError, match="the shares site-2 sent to site-1 were altered or are not for it"):
        secagg.mask(state, r.quantized["site-1"], misrouted)


# -- parameters and quantization -------------------------------------------------------------------


def test_the_overflow_check_refuses_a_modulus_too_small_for_the_sum() -> None:
    # 8 sums of 16-bit values reach 8 * 65535 = 524280: 19 bits.
    secagg.check_no_overflow(8, 16, 19)
    with pytest.raises(ConfigError, match=r"8 updates quantized to bits=16 .* overflows modulus_bits=18") as err:
        secagg.check_no_overflow(8, 16, 18)
    assert "raise secagg.modulus_bits to 19, or lower secagg.bits to 15" in str(err.value)
    with pytest.raises(ConfigError, match="modulus_bits=18"):
        secagg.setup_round(b"r", SITES, replace(PARAMS, modulus_bits=18), graph_seed=0)
    # What the check prevents: the same round set up without it wraps around and unmasks a wrong sum.
    unchecked = replace(PARAMS, modulus_bits=18, stochastic_rounding=False)
    setup = secagg.RoundSetup(b"r", unchecked, secagg.neighbour_graph(SITES, None, 0))
    ones = {s: np.ones(100) for s in SITES}
    states, adverts = zip(*(secagg.advertise(setup, s) for s in SITES), strict=True)
    states_by, adverts_by = dict(zip(SITES, states, strict=True)), dict(zip(SITES, adverts, strict=True))
    shared = [secagg.share_keys(states_by[s], adverts_by) for s in SITES]
    inbox = {s: {m.site: m.encrypted_shares[s] for m in shared if s in m.encrypted_shares} for s in SITES}
    masked = {s: secagg.mask(states_by[s], secagg.quantize(ones[s], unchecked), inbox[s]) for s in SITES}
    reveals = [secagg.reveal(states_by[s], SITES, []) for s in SITES]
    total = secagg.unmask(setup, adverts_by, {m.site: m.commitment for m in shared}, masked, reveals)
    assert not np.allclose(secagg.dequantize_sum(total, 8, unchecked), 8.0)


@pytest.mark.parametrize(
    ("params", "n_sites", "message"),
    [
        (secagg.SecAggParams(threshold=3), 8, r"secagg.threshold must be an integer in 4..7 with 8 sites"),
        (secagg.SecAggParams(threshold=8), 8, r"secagg.threshold must be an integer in 4..7"),
        (secagg.SecAggParams(threshold=2, degree=4), 10, r"in 3..4 with 10 sites \(4 neighbours each\)"),
        (secagg.SecAggParams(threshold=3, degree=5), 10, "secagg.degree must be an even integer"),
        (secagg.SecAggParams(threshold=4, bits=32), 8, r"secagg.bits must be an integer in 1..31"),
        (secagg.SecAggParams(threshold=4, modulus_bits=65), 8, r"secagg.modulus_bits must be an integer in 2..64"),
        (secagg.SecAggParams(threshold=4, value_range=0.0), 8, "secagg.value_range must be a positive finite"),
        (secagg.SecAggParams(threshold=4, value_range=float("nan")), 8, "secagg.value_range must be a positive"),
        (secagg.SecAggParams(threshold=1), 1, "needs at least 2 sites"),
    ],
)
def test_bad_parameters_are_refused_naming_them(params: secagg.SecAggParams, n_sites: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        secagg.check_params(params, n_sites)


def test_quantization_refuses_values_out_of_range_unless_clipping() -> None:
    params = secagg.SecAggParams(threshold=2, bits=8, value_range=0.5, stochastic_rounding=False)
    with pytest.raises(PayloadError, match="values up to 0.7 in magnitude, outside secagg.value_range 0.5"):
        secagg.quantize(np.array([0.1, -0.7]), params)
    q = secagg.quantize(np.array([0.1, -0.7, 0.5, -0.5]), params, clip=True)
    assert q.tolist()[1:] == [0, 255, 0]
    with pytest.raises(PayloadError, match="NaN"):
        secagg.quantize(np.array([np.nan]), params)


def test_stochastic_rounding_is_unbiased() -> None:
    params = secagg.SecAggParams(threshold=2, bits=2, value_range=1.0)  # levels -1, -1/3, 1/3, 1
    values = np.full(200_000, 0.1)
    q = secagg.quantize(values, params, np.random.default_rng(3))
    # Each value becomes -1/3 or 1/3 (p = 0.65 for 1/3); the mean's standard error is 0.32/sqrt(200000).
    assert set(np.unique(q).tolist()) == {1, 2}
    mean = float(secagg.dequantize_sum(q, 1, params).mean())
    assert mean == pytest.approx(0.1, abs=6 * 0.32 / np.sqrt(values.size))


def test_flatten_and_unflatten_keep_names_shapes_and_dtypes() -> None:
    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([3, 4], dtype=np.int64)}
    layout, vector = secagg.flatten(arrays)
    assert list(layout) == ["a", "b"] and vector.tolist() == [3, 4, 0, 1, 2, 3, 4, 5]
    back = secagg.unflatten(layout, vector)
    assert back["b"].dtype == np.float32 and back["a"].dtype == np.int64
    np.testing.assert_array_equal(back["b"], arrays["b"])
    with pytest.raises(PayloadError, match="does not fill a layout of 8"):
        secagg.unflatten(layout, vector[:-1])
