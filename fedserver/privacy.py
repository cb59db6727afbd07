"""Differential privacy at the server: the noisy mean of clipped differences, and the job's privacy ledger.

`DPAggregator` folds a plaintext private job's updates (fedgrid/dp.py says what the mechanism guarantees):

    Δ_i = clip(x_i − g, C)                 central DP: the server clips each update itself, whatever the site did
    Δ_i = x_i − g                          distributed DP: the site clipped and added its noise; the server
                                           cannot tell noise from signal and leaves it
    g' = g + (Σ Δ_i + N(0, (z·C)²)) / n    the noise only in central DP; n = the sites asked in the round, a
                                           fixed denominator: each site counts once, whatever its sample count

Encrypted and SecAgg+ jobs fold as usual (fedserver/he_aggregation.py, fedserver/secure_rounds.py): there the
sites clip and add their noise before anything leaves them.

`PrivacyLedger` is the accountant of one job: it charges each aggregated round with the noise its sum really
carried (all of it in central DP; z·√(k/n) when k of the n sites asked added their share) and says, before a
round, whether that round would take ε beyond the job's target.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from fedgrid import dp, tensors
from fedgrid.errors import PayloadError
from fedgrid.tensors import Layout
from fedserver.aggregation import check_same_layout, check_weight
from fedserver.grid import Result
from fedserver.model import Model
from fedserver.strategies.base import build_model, read_tensor


class DPAggregator:
    """The noisy mean over a fixed number of sites of clipped differences to the global model (plaintext)."""

    payload_format = tensors.FORMAT
    grace = 0.0

    def __init__(
        self,
        layout: Layout,
        global_model: Model,
        params: dp.DPParams,
        expected: int,
        rng: np.random.Generator | None = None,
    ) -> None:
        if expected < 1:
            raise ValueError(f"a private round needs at least one site asked, got {expected}")
        self.layout = layout
        self.params = params
        self.expected = expected
        self.rng = rng
        self._global = global_model.source("global model")
        self._floats = [name for name, spec in layout.items() if np.dtype(spec.dtype).kind == "f"]
        self._sum = {name: np.zeros(layout[name].shape, np.float64) for name in self._floats}
        self.count = 0
        self.clipped = 0
        """Updates the server scaled down to the clip norm (central DP)."""

    @property
    def total_weight(self) -> float:
        return float(self.count)

    def add(self, result: Result) -> None:
        """Fold one site's difference in; PayloadError (and nothing changed) when it does not fit."""
        what = f"update from {result.site}"
        if result.payload_format != tensors.FORMAT or not result.has_payload:
            raise PayloadError(f"{what}: expected a {tensors.FORMAT} payload, got {result.payload_format or 'none'}")
        check_weight(result.num_samples, what)
        source = result.source(what)
        check_same_layout(source.layout, self.layout, what)
        differences = {}
        for name in self._floats:
            update = read_tensor(source, name).astype(np.float64)
            if not np.isfinite(update).all():
                raise PayloadError(f"{what}: tensor {name!r} contains NaN or infinite values")
            differences[name] = update - read_tensor(self._global, name)
        norm = math.sqrt(sum(float(np.vdot(d, d)) for d in differences.values()))
        scale = 1.0
        if self.params.where == "server" and norm > self.params.clip_norm:
            scale = self.params.clip_norm / norm
            self.clipped += 1
        for name, difference in differences.items():
            self._sum[name] += difference * scale
        self.count += 1

    async def complete(self) -> None:
        """Nothing beyond the updates."""

    def finish(self, folder: Path, name: str) -> Model:
        """g + (Σ Δ + noise) / n, in the model's dtypes; integer tensors keep the global model's values."""
        if self.count == 0:
            raise PayloadError("no update to aggregate")
        noisy = self._sum
        if self.params.where == "server":
            noisy = dp.add_noise(self._sum, dp.noise_std(self.params, self.expected), self.rng)

        def tensor(tensor_name: str) -> np.ndarray:
            current = read_tensor(self._global, tensor_name)
            if tensor_name not in noisy:
                return current
            return (current.astype(np.float64) + noisy[tensor_name] / self.expected).astype(current.dtype)

        return build_model(self.layout, tensor, folder, name)


class PrivacyLedger:
    """The ε a job has spent, round by round, at its δ (dp-accounting, fedgrid/dp.py)."""

    def __init__(self, params: dp.DPParams) -> None:
        self.params = params
        self.charged: list[float] = []
        """The noise multiplier each aggregated round's sum carried."""
        self.spent = 0.0
        """ε after the rounds charged."""

    def noise_multiplier(self, asked: int, contributed: int) -> float:
        """What a round's sum carried: z in central DP, z·√(k/n) when k of n sites added their share."""
        return dp.effective_noise_multiplier(self.params, asked, contributed)

    def epsilon(self, extra: float | None = None) -> float:
        """ε after the rounds charged (and one more with multiplier `extra`): equal multipliers composed as one
        self-composed event, so a long job costs the accountant a few events, not one per round."""
        rounds = Counter(self.charged + ([extra] if extra is not None else []))
        return dp.epsilon_of_counts(self.params, rounds)

    def charge(self, asked: int, contributed: int) -> float:
        """Record an aggregated round; returns ε after it."""
        self.charged.append(self.noise_multiplier(asked, contributed))
        self.spent = self.epsilon()
        return self.spent

    def stop_reason(self, round_no: int) -> str:
        """Why round `round_no` must not run (its ε, with every asked site adding noise, would exceed the
        target), or "" when it may."""
        target = self.params.target_epsilon
        if target is None:
            return ""
        after = self.epsilon(extra=self.params.noise_multiplier)
        if after <= target:
            return ""
        return (
            f"privacy budget: round {round_no} would take ε to {after:.4g}, above privacy.target_epsilon "
            f"{target:g} (δ {self.params.delta:g}); ε spent: {self.spent:.4g}"
        )

    def metrics(self) -> dict[str, float]:
        """What a round's record carries: ε so far (at the job's δ)."""
        return {"epsilon": self.spent}

    def state(self) -> list[float]:
        return list(self.charged)

    def restore(self, charged: list[float]) -> None:
        self.charged = [float(z) for z in charged]
        self.spent = self.epsilon()
