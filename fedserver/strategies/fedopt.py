"""FedOpt (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2): a server optimizer on the
averaged update Δ = mean of the sites' models − global model.

    FedAvgM    v ← momentum·v + Δ                         x ← x + η·v
    FedAdagrad m ← β1·m + (1−β1)·Δ   v ← v + Δ²             x ← x + η·m / (√v + τ)
    FedYogi    m ← β1·m + (1−β1)·Δ   v ← v − (1−β2)·Δ²·sign(v − Δ²)
    FedAdam    m ← β1·m + (1−β1)·Δ   v ← β2·v + (1−β2)·Δ²

with m starting at 0 and v at τ² (the paper's v₋₁ ≥ τ²), and no bias correction, as in the paper. The mean
is sample-weighted as in FedAvg. Only floating point tensors move; integer ones (BatchNorm's counters)
take the mean. The server needs the plaintext mean: encrypted jobs refuse FedOpt at submit.
"""

from __future__ import annotations

import numpy as np

from fedgrid.strategy_config import FedOptConfig
from fedserver.model import Model
from fedserver.strategies.base import (
    Aggregate,
    RoundContext,
    Strategy,
    StrategyState,
    build_model,
    float_names,
    read_tensor,
    state_dtype,
)


def step(
    config: FedOptConfig, x: np.ndarray, delta: np.ndarray, m: np.ndarray | None, v: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """One server step of one tensor: (new x, new m, new v), in the dtype of x; m and v are None in the
    first round. x and delta are overwritten (they are the caller's fresh copies); m and v are left as they
    are, because the checkpoint of the last round may still be writing them."""
    lr, tau = config.lr, config.tau
    if config.optimizer == "avgm":
        velocity = delta if v is None else np.add(config.momentum * v, delta, out=delta)
        x += lr * velocity
        return x, None, velocity
    new_m = delta * (1.0 - config.beta1)
    if m is not None:
        new_m += config.beta1 * m
    square = np.square(delta, out=delta)
    v = v if v is not None else np.full_like(delta, tau * tau)
    if config.optimizer == "adagrad":
        new_v = v + square
    elif config.optimizer == "yogi":
        new_v = v - (1.0 - config.beta2) * square * np.sign(v - square)
    else:
        new_v = config.beta2 * v
        new_v += (1.0 - config.beta2) * square
    denominator = np.sqrt(new_v)
    denominator += tau
    step_size = new_m * lr
    step_size /= denominator
    x += step_size
    return x, new_m, new_v


class FedOpt(Strategy):
    name = "fedopt"
    needs_plaintext = True

    def __init__(self, config: FedOptConfig) -> None:
        self.config = config
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def aggregate_train(self, round_no: int, model: Model, aggregate: Aggregate, ctx: RoundContext) -> Model:
        current, mean = model.source("global model"), aggregate.model.source("averaged model")
        moving = set(float_names(current.layout))
        m, v = dict(self.m), dict(self.v)  # new dicts: the checkpoint of the last round may still be writing

        def tensor(name: str) -> np.ndarray:
            spec = current.layout[name]
            if name not in moving:
                return read_tensor(mean, name)
            keep = state_dtype(spec.dtype)
            x = read_tensor(current, name).astype(keep, copy=False)
            delta = read_tensor(mean, name).astype(keep, copy=False)
            delta -= x
            new_x, new_m, new_v = step(self.config, x, delta, m.get(name), v.get(name))
            if new_m is not None:
                m[name] = new_m
            v[name] = new_v
            return new_x.astype(spec.dtype, copy=False)

        new = build_model(current.layout, tensor, ctx.model_dir, f"round-{round_no}-step.safetensors")
        self.m, self.v = m, v
        return new

    def state(self) -> StrategyState:
        arrays = {f"m/{name}": value for name, value in self.m.items()}
        arrays.update({f"v/{name}": value for name, value in self.v.items()})
        return StrategyState({"optimizer": self.config.optimizer}, arrays)

    def restore(self, state: StrategyState) -> None:
        self.m = {k.removeprefix("m/"): v for k, v in state.tensors.items() if k.startswith("m/")}
        self.v = {k.removeprefix("v/"): v for k, v in state.tensors.items() if k.startswith("v/")}
