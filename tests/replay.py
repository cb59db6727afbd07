"""Every round's global model recomputed with plain numpy, for jobs trained by tests/scripts/train_fixed.py.

That script's update is a pure function of the global model a site receives, the site and the round
(`trained`, loaded from the script itself), so the rounds of a job can be replayed here from the same
inputs and compared with what the job produced: its final and best models, its checkpoint, its round
records. The server's steps are written out as their textbook formulas, independent of fedserver's code.
A new strategy adds its server step here (a function or object like `fedavg` or `Momentum`) and its
tests call `replay` with it.
"""

from __future__ import annotations

import math
import runpy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Arrays = dict[str, np.ndarray]
ServerStep = Callable[[Arrays, Arrays], Arrays]
"""(global model of the round, sample-weighted mean of the updates) -> next global model."""

SCRIPT = Path(__file__).parent / "scripts" / "train_fixed.py"
_script = runpy.run_path(str(SCRIPT))
trained: Callable[[Arrays, float, int], Arrays] = _script["trained"]
STEP: float = _script["STEP"]
"""train_fixed.py's one strategy-helper gradient step after `trained`."""

INITIAL: Arrays = {
    "w": np.array([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]], np.float32),
    "b": np.array([0.1, -0.2], np.float32),
}
"""A small model with distinct values, the starting point of every replayed job."""


@dataclass(frozen=True)
class Site:
    """How a site trains in train_fixed.py: its shift and its sample count (the weight of its update)."""

    name: str
    shift: float
    samples: int


def train_args(
    sites: Iterable[Site], accuracy: Sequence[float] = (), slow: Iterable[tuple[str, int, float]] = ()
) -> str:
    """train_fixed.py's arguments: the sites, the accuracy curve, and (site, round, seconds) sleeps."""
    args = [f"--site {s.name}:{s.shift}:{s.samples}" for s in sites]
    if accuracy:
        args.append("--accuracy " + ",".join(str(a) for a in accuracy))
    args += [f"--slow {name}:{round_no}:{seconds}" for name, round_no, seconds in slow]
    return " ".join(args)


def weighted_mean(updates: Sequence[tuple[Arrays, float]]) -> Arrays:
    """FedAvg's average: each update weighted by its sample count."""
    total = sum(weight for _, weight in updates)
    return {
        name: sum(update[name].astype(np.float64) * weight for update, weight in updates) / total
        for name in updates[0][0]
    }


def clipped(update: Arrays, model: Arrays, max_norm: float) -> Arrays:
    """The update with its difference to `model` scaled down to L2 norm `max_norm` (over all tensors)."""
    delta = {name: update[name].astype(np.float64) - model[name] for name in update}
    norm = math.sqrt(sum(float(np.sum(d**2)) for d in delta.values()))
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {name: model[name] + d * scale for name, d in delta.items()}


def fedavg(model: Arrays, mean: Arrays) -> Arrays:
    """Plain FedAvg: the mean of the updates is the next global model."""
    return mean


@dataclass
class Momentum:
    """FedAvgM: velocity = momentum * velocity + (mean - model); next model = model + lr * velocity."""

    lr: float
    momentum: float
    velocity: Arrays = field(default_factory=dict)

    def __call__(self, model: Arrays, mean: Arrays) -> Arrays:
        for name in model:
            self.velocity[name] = self.momentum * self.velocity.get(name, 0.0) + (mean[name] - model[name])
        return {name: model[name] + self.lr * self.velocity[name] for name in model}


@dataclass
class FedOpt:
    """Reddi et al. 2021, Algorithm 2: Δ = mean − model; m = β1·m + (1−β1)·Δ; v by the optimizer from
    v₋₁ = τ² (adagrad: v + Δ², yogi: v − (1−β2)·Δ²·sign(v − Δ²), adam: β2·v + (1−β2)·Δ²);
    next model = model + lr·m / (√v + τ)."""

    optimizer: str
    lr: float
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 0.001
    m: Arrays = field(default_factory=dict)
    v: Arrays = field(default_factory=dict)

    def __call__(self, model: Arrays, mean: Arrays) -> Arrays:
        out = {}
        for name in model:
            delta = mean[name] - model[name]
            self.m[name] = self.beta1 * self.m.get(name, 0.0) + (1 - self.beta1) * delta
            v = self.v.get(name, np.full_like(delta, self.tau**2))
            if self.optimizer == "adagrad":
                v = v + delta**2
            elif self.optimizer == "yogi":
                v = v - (1 - self.beta2) * delta**2 * np.sign(v - delta**2)
            else:
                v = self.beta2 * v + (1 - self.beta2) * delta**2
            self.v[name] = v
            out[name] = model[name] + self.lr * self.m[name] / (np.sqrt(v) + self.tau)
        return out


def proximal_step(update: Arrays, model: Arrays, mu: float) -> Arrays:
    """FedProx in train_fixed.py: one step of size STEP down the gradient of mu/2·||w − model||², mu·(w − model)."""
    return {name: update[name] - STEP * mu * (update[name] - model[name]) for name in update}


def replay(
    rounds: Sequence[Sequence[Site]],
    *,
    initial: Arrays = INITIAL,
    step: ServerStep = fedavg,
    clip_norm: float = 0.0,
    mu: float = 0.0,
) -> list[Arrays]:
    """The global model after each round, when round r's updates come from the sites in rounds[r-1]."""
    model = {name: value.astype(np.float64) for name, value in initial.items()}
    models = []
    for round_no, sites in enumerate(rounds, start=1):
        updates = [(trained(model, site.shift, round_no), float(site.samples)) for site in sites]
        if mu:
            updates = [(proximal_step(update, model, mu), weight) for update, weight in updates]
        if clip_norm > 0:
            updates = [(clipped(update, model, clip_norm), weight) for update, weight in updates]
        model = step(model, weighted_mean(updates))
        models.append(model)
    return models


@dataclass
class Scaffold:
    """SCAFFOLD (Karimireddy et al. 2020, option II) with train_fixed.py's sites, each round: a site i of
    the chosen S starts from t = trained(x), takes one step y = t − STEP·(c − c_i) (K = 1, η_l = STEP),
    and sets c_i⁺ = c_i − c + (x − y)/(K·η_l). Then x ← x + server_lr·(sample-weighted mean of y − x) and
    c ← c + (|S|/N)·(1/k)·Σ (c_i⁺ − c_i), k the sites that answered (here all of S), N the job's sites."""

    n_sites: int
    server_lr: float = 1.0
    c: Arrays = field(default_factory=dict)
    c_site: dict[str, Arrays] = field(default_factory=dict)

    def run(
        self, rounds: Sequence[Sequence[Site]], initial: Arrays = INITIAL, asked: Sequence[int] = ()
    ) -> list[Arrays]:
        """Round r's updates come from the sites in rounds[r-1], of asked[r-1] sites asked (default: all
        of them answered); a site that did not answer keeps its c_i."""
        x = {name: value.astype(np.float64) for name, value in initial.items()}
        self.c = {name: np.zeros_like(value) for name, value in x.items()}
        models = []
        for round_no, sites in enumerate(rounds, start=1):
            updates, deltas = [], []
            for site in sites:
                c_i = self.c_site.get(site.name, {name: np.zeros_like(v) for name, v in x.items()})
                t = trained(x, site.shift, round_no)
                y = {name: t[name] - STEP * (self.c[name] - c_i[name]) for name in x}
                new_c_i = {name: c_i[name] - self.c[name] + (x[name] - y[name]) / STEP for name in x}
                deltas.append({name: new_c_i[name] - c_i[name] for name in x})
                self.c_site[site.name] = new_c_i
                updates.append((y, float(site.samples)))
            mean = weighted_mean(updates)
            share = (asked[round_no - 1] if asked else len(sites)) / self.n_sites
            self.c = {name: self.c[name] + share * sum(d[name] for d in deltas) / len(deltas) for name in x}
            x = {name: x[name] + self.server_lr * (mean[name] - x[name]) for name in x}
            models.append(x)
        return models


def model_mean(model: Arrays) -> float:
    """The mean of every value of a model: what train_fixed.py reports as the "mean" metric."""
    return float(np.mean(np.concatenate([v.ravel() for v in model.values()])))


def distance(a: Arrays, b: Arrays) -> float:
    """L2 distance between two models over all their tensors."""
    return math.sqrt(sum(float(np.sum((a[n].astype(np.float64) - b[n]) ** 2)) for n in a))


def assert_model(actual: Mapping[str, np.ndarray], expected: Arrays, what: str) -> None:
    """`actual` (as the job stored it, float32) equals the replayed `expected` within float tolerance."""
    assert set(actual) == set(expected), f"{what}: tensors {sorted(actual)}, expected {sorted(expected)}"
    for name, value in expected.items():
        assert actual[name].dtype == INITIAL[name].dtype, f"{what}: {name} is {actual[name].dtype}"
        np.testing.assert_allclose(actual[name], value, rtol=1e-5, atol=1e-5, err_msg=f"{what}: tensor {name}")
