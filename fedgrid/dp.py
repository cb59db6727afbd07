"""Differential privacy for federated rounds: clipping, Gaussian noise, and the accountant that says what ε a
job has spent.

The unit of privacy is one site: two federations are neighbours when one has a site the other lacks
(add-or-remove-one-site), so ε bounds what anyone who sees the released models can learn about whether a
site, and everything in its data, took part. A round with privacy goes

    site    Δ = clip(x − g, C)           the difference of its model x to the global model g, scaled down to an
                                         L2 norm of at most C (all float tensors together)
            Δ + N(0, (z·C)²/n)           where: sites: each of the n sites adds its share of the noise
    server  ΣΔ + N(0, (z·C)²)            where: server: the server adds all of it to the sum
            g' = g + (noisy ΣΔ) / n      the mean over the expected number of sites n, a fixed denominator

with z the noise multiplier. One site changes ΣΔ by at most C in L2 norm, so each round is the Gaussian
mechanism with noise multiplier z, applied to the sites picked with probability q (the client fraction);
`epsilon_spent` composes the rounds with Google's dp-accounting (RDP or PLD accountant, Poisson-subsampled
Gaussian, add-or-remove-one neighbouring).

Threat model and what the guarantee rests on:

- **where: server (central DP).** The server is trusted with each site's clipped update in the clear. DP
  protects what leaves it: every global model the sites receive, the final model, and whatever is
  computed from them, against the sites, admins and anyone the model is given to.
- **where: sites (distributed DP).** Each site adds N(0, (z·C)²/n), so the sum of n sites' noise has the
  required variance (z·C)². With secure aggregation (SecAgg+ or HE) the server sees only that sum, so an
  honest-but-curious server learns no more than the noisy sum. This rests on **at least n sites whose
  noise the adversary does not know contributing to the sum**: a site knows its own noise, so k sites
  colluding with the server leave only the noise of the others. With m of the n expected sites
  contributing honestly the sum carries noise z·√(m/n)·C: `effective_noise_multiplier` gives that
  multiplier, and the round must be charged to the accountant with it (a larger ε), or not released.
  Dropouts are the common case of this: a round that closes with fewer answers than expected is a
  round with less noise.
- **Weighting.** The guarantee covers the unweighted sum of clipped differences. Weighting by sample
  counts multiplies one site's contribution by its share of the samples and breaks the bound of C;
  dividing by the number of answers instead of a fixed n makes the denominator depend on who took part.
- **Sampling.** The accountant assumes each site takes part in a round independently with probability q
  (Poisson sampling). Picking a fixed number of sites at random is close to that but not the same; the
  reported ε is for the Poisson scheme, as in TensorFlow Privacy and Opacus.
- **Not covered:** integer and boolean tensors (a BatchNorm batch counter, ...) are not released: their
  difference is zero, so the global model keeps its values; anything a site sends besides its update
  (sample counts, metrics) is outside the guarantee; the noise comes from numpy's generator seeded from
  the operating system, not a cryptographic source, and floating-point Gaussian samples are not exactly
  Gaussian in their lowest bits. Under SecAgg+ each site's noisy difference is quantized before the sum;
  the accountant treats the noise as continuous, which holds only up to that rounding (Kairouz, Liu and
  Steinke, ICML 2021, account for it exactly with the distributed discrete Gaussian).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedgrid.errors import ConfigError
from fedgrid.tensors import Arrays, check_finite, check_layout, layout_of

if TYPE_CHECKING:
    import dp_accounting

MECHANISMS = ("gaussian",)
PLACES = ("server", "sites")
ACCOUNTANTS = ("rdp", "pld")
MAX_ROUNDS = 1_000_000
"""Where `max_rounds` stops searching: a budget that lasts longer is reported as this many rounds."""
PLD_DISCRETIZATION = 1e-3
"""The PLD accountant's grid of privacy-loss values. Its default, 1e-4, took 1.2-4.4 s per ε for 1-1000 rounds
(q=0.5, z=1); 1e-3 takes 0.1-0.3 s and gives the same ε to 4 digits. Discretization is pessimistic: ε stays
an upper bound."""
_UNCONVERGED_ORDER = "_compute_log_a_frac failed to converge"


class _QuietUnconvergedOrders(logging.Filter):
    """dp-accounting logs a warning for each fractional RDP order whose series does not converge (common
    below order 2 with a client fraction of 0.3 or more) and leaves that order out: ε stays a valid upper
    bound, from the other orders. Ten such lines per ε, every round, would bury the server's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _UNCONVERGED_ORDER not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietUnconvergedOrders())

PRIVACY_KEYS = ("mechanism", "clip_norm", "noise_multiplier", "delta", "where", "target_epsilon", "accountant")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive(value: Any, field: str) -> float:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"privacy.{field} must be a positive finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DPParams:
    """A job's differential privacy, checked on construction (ConfigError naming the field)."""

    clip_norm: float
    """L2 norm every site's update difference is clipped to (all float tensors together)."""
    noise_multiplier: float
    """z: the noise on the sum has standard deviation z·clip_norm."""
    delta: float
    """The δ at which ε is reported; below 1/(number of sites) for a meaningful guarantee."""
    sampling_rate: float = 1.0
    """q: the probability that a site takes part in a round (the job's client fraction)."""
    where: str = "server"
    """"server": the server adds the noise to the sum; "sites": each site adds its share."""
    mechanism: str = "gaussian"
    accountant: str = "rdp"
    """"rdp" (Rényi DP, the usual choice and fast) or "pld" (privacy loss distributions: tighter, slower)."""
    target_epsilon: float | None = None
    """Stop the job before a round that would take ε above this; None: no limit."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip_norm", _positive(self.clip_norm, "clip_norm"))
        object.__setattr__(self, "noise_multiplier", _positive(self.noise_multiplier, "noise_multiplier"))
        if not _is_number(self.delta) or not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta must be a number in (0, 1), e.g. 1e-5, got {self.delta!r}")
        if not _is_number(self.sampling_rate) or not 0 < self.sampling_rate <= 1:
            raise ConfigError(
                f"the sampling rate (client_fraction) must be a number in (0, 1] for privacy accounting, "
                f"got {self.sampling_rate!r}"
            )
        for field, value, allowed in (
            ("where", self.where, PLACES),
            ("mechanism", self.mechanism, MECHANISMS),
            ("accountant", self.accountant, ACCOUNTANTS),
        ):
            if value not in allowed:
                raise ConfigError(f"privacy.{field} must be one of {', '.join(allowed)}, got {value!r}")
        if self.target_epsilon is not None:
            object.__setattr__(self, "target_epsilon", _positive(self.target_epsilon, "target_epsilon"))


def parse_privacy(data: Any, sampling_rate: float, where: str) -> DPParams:
    """The `privacy` section of a job's configuration as DPParams; ConfigError "<where>: privacy.<field> ..."."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: privacy must be a mapping with {', '.join(PRIVACY_KEYS)}")
    unknown = sorted(set(data) - set(PRIVACY_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key privacy.{unknown[0]}; allowed: {', '.join(PRIVACY_KEYS)}")
    for required in ("clip_norm", "noise_multiplier", "delta"):
        if required not in data:
            raise ConfigError(f"{where}: privacy.{required} is missing")
    try:
        return DPParams(sampling_rate=sampling_rate, **data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


# -- clipping and noise ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Clipped:
    """A site's update difference after clipping."""

    delta: Arrays
    """update − reference for float tensors, scaled to L2 norm ≤ clip_norm; zeros for other tensors."""
    norm: float
    """The L2 norm of the float differences before clipping."""
    clip_norm: float

    @property
    def was_clipped(self) -> bool:
        return self.norm > self.clip_norm


def _is_float(array: np.ndarray) -> bool:
    return array.dtype.kind == "f"


def clip_update(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], clip_norm: float, what: str = "update"
) -> Clipped:
    """Clip `update − reference` to L2 norm `clip_norm`, over all float tensors together.

    Raises PayloadError when the update's names, shapes or dtypes differ from the reference's or a value is
    not finite. The norm of the result, rounded to each tensor's dtype, is at most `clip_norm`: the scale
    keeps a margin of the dtype's rounding error.
    """
    clip_norm = _positive(clip_norm, "clip_norm")
    check_layout(update, layout_of(reference), what)
    check_finite(update, what)
    diffs = {
        name: np.asarray(update[name], dtype=np.float64) - np.asarray(reference[name], dtype=np.float64)
        for name in sorted(reference)
        if _is_float(np.asarray(reference[name]))
    }
    norm = math.sqrt(sum(float(np.dot(d.reshape(-1), d.reshape(-1))) for d in diffs.values()))
    margin = max((float(np.finfo(np.asarray(reference[name]).dtype).eps) for name in diffs), default=0.0)
    limit = clip_norm * (1.0 - margin)
    scale = limit / norm if norm > limit else 1.0
    delta: Arrays = {}
    for name, value in reference.items():
        dtype = np.asarray(value).dtype
        delta[name] = (diffs[name] * scale).astype(dtype) if name in diffs else np.zeros(np.shape(value), dtype)
    return Clipped(delta=delta, norm=norm, clip_norm=clip_norm)


def noise_std(params: DPParams, n_sites: int) -> float:
    """Standard deviation of the noise one party adds per value: z·C on the sum at the server, z·C/√n at
    each of the `n_sites` sites expected to contribute to the sum (where: sites)."""
    if params.where == "server":
        return params.noise_multiplier * params.clip_norm
    if not isinstance(n_sites, int) or n_sites < 1:
        raise ConfigError(f"distributed DP needs the number of sites expected in the sum (>= 1), got {n_sites!r}")
    return params.noise_multiplier * params.clip_norm / math.sqrt(n_sites)


def effective_noise_multiplier(params: DPParams, n_expected: int, n_contributed: int) -> float:
    """The noise multiplier a round's sum really carries when `n_contributed` of `n_expected` sites added
    their share (where: sites); the round must be charged to the accountant with this value."""
    if params.where == "server":
        return params.noise_multiplier
    if n_expected < 1 or n_contributed < 0:
        raise ValueError(f"expected >= 1 sites and >= 0 contributions, got {n_expected} and {n_contributed}")
    return params.noise_multiplier * math.sqrt(n_contributed / n_expected)


def add_noise(arrays: Mapping[str, np.ndarray], std: float, rng: np.random.Generator | None = None) -> Arrays:
    """A copy of `arrays` with N(0, std²) added to every value of every float tensor (others unchanged).

    `rng` defaults to a generator seeded from the operating system's entropy; tests pass a seeded one.
    """
    if not _is_number(std) or not math.isfinite(std) or std < 0:
        raise ValueError(f"noise standard deviation must be a finite number >= 0, got {std!r}")
    rng = np.random.default_rng() if rng is None else rng
    noisy: Arrays = {}
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        if not _is_float(array):
            noisy[name] = array.copy()
            continue
        noise = rng.standard_normal(array.shape, dtype=np.float64) * std
        noisy[name] = (array.astype(np.float64) + noise).astype(array.dtype)
    return noisy


# -- accounting ------------------------------------------------------------------------------------


def _library() -> Any:
    """dp-accounting, imported when an ε is first computed: it brings scipy (0.9 s here), which every process
    that reads a job's settings (a site daemon at start-up) would otherwise pay for."""
    import dp_accounting

    return dp_accounting


def _round_event(noise_multiplier: float, sampling_rate: float) -> dp_accounting.DpEvent:
    lib = _library()
    return lib.PoissonSampledDpEvent(sampling_rate, lib.GaussianDpEvent(noise_multiplier))


def _epsilon(event: dp_accounting.DpEvent, params: DPParams) -> float:
    from dp_accounting import pld, rdp

    if params.accountant == "rdp":
        accountant: dp_accounting.PrivacyAccountant = rdp.RdpAccountant()
    else:
        accountant = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    accountant.compose(event)
    return float(accountant.get_epsilon(params.delta))


def epsilon_spent(params: DPParams, rounds: int) -> float:
    """ε at `params.delta` after `rounds` rounds, each with the configured noise multiplier (0 for no round)."""
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    if rounds == 0:
        return 0.0
    event = _library().SelfComposedDpEvent(_round_event(params.noise_multiplier, params.sampling_rate), rounds)
    return _epsilon(event, params)


def epsilon_of_rounds(params: DPParams, noise_multipliers: Sequence[float]) -> float:
    """ε at `params.delta` after rounds that each carried its own noise multiplier (see
    `effective_noise_multiplier`); a round with multiplier 0 released its sum without noise: ε is infinite."""
    if not noise_multipliers:
        return 0.0
    if any(not _is_number(z) or not math.isfinite(z) or z < 0 for z in noise_multipliers):
        raise ValueError(f"noise multipliers must be finite numbers >= 0, got {list(noise_multipliers)!r}")
    if any(z == 0 for z in noise_multipliers):
        return math.inf
    event = _library().ComposedDpEvent([_round_event(z, params.sampling_rate) for z in noise_multipliers])
    return _epsilon(event, params)


def epsilon_of_counts(params: DPParams, rounds: Mapping[float, int]) -> float:
    """ε at `params.delta` after `rounds[z]` rounds with noise multiplier z, for each z: the same as
    `epsilon_of_rounds` over those rounds in any order, with each multiplier's rounds composed as one event."""
    counts = {float(z): int(n) for z, n in rounds.items() if n}
    if not counts:
        return 0.0
    if any(not math.isfinite(z) or z < 0 for z in counts) or any(n < 0 for n in counts.values()):
        raise ValueError(f"noise multipliers must be finite numbers >= 0 with counts >= 0, got {dict(rounds)!r}")
    if 0.0 in counts:
        return math.inf
    lib = _library()
    events = [lib.SelfComposedDpEvent(_round_event(z, params.sampling_rate), n) for z, n in sorted(counts.items())]
    return _epsilon(lib.ComposedDpEvent(events), params)


def max_rounds(params: DPParams, target_epsilon: float | None = None, limit: int = MAX_ROUNDS) -> int:
    """The most rounds whose ε stays within `target_epsilon` (default: the job's); 0 when one round exceeds it.

    ε grows with every round, so an exponential search brackets the answer and a bisection finds it, about
    2·log2(rounds) evaluations of the accountant.
    """
    target = params.target_epsilon if target_epsilon is None else _positive(target_epsilon, "target_epsilon")
    if target is None:
        raise ConfigError("privacy.target_epsilon is not set: there is no budget to count rounds against")
    if epsilon_spent(params, 1) > target:
        return 0
    low, high = 1, 2
    while high <= limit and epsilon_spent(params, high) <= target:
        low, high = high, high * 2
    if high > limit:
        if epsilon_spent(params, limit) <= target:
            return limit
        high = limit
    while high - low > 1:  # epsilon(low) <= target < epsilon(high)
        middle = (low + high) // 2
        if epsilon_spent(params, middle) <= target:
            low = middle
        else:
            high = middle
    return low
