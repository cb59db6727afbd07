"""SCAFFOLD (Karimireddy et al. 2020, option II): control variates correct each site's drift.

The server keeps c, each site i its own c_i (in its job folder, fedclient/strategy.py). A training task
carries c beside the model, as tensors named SCAFFOLD_PREFIX + <tensor>; a site trains with its gradients
corrected by c − c_i over K steps of learning rate η_l, then sets c_i⁺ = c_i − c + (x − y_i)/(K·η_l).

    x ← x + η_g·(mean of y_i − x)                (the sample-weighted mean, as FedAvg)
    c ← c + (|S|/N)·(1/k)·Σ (c_i⁺ − c_i)         |S| sites asked, k answered, N sites in the job

The update of c is a sum, so it runs on ciphertexts too: each site sends, beside its model,
u_i = (c + (|S|/N)·(c_i⁺ − c_i)) / n_i under the same prefix, so that the sample-weighted mean the
aggregator computes anyway (plaintext, or the encrypted sum Σ n_i·u_i over the total weight W) is
Σ u_i·n_i / W, and c⁺ = that·W / k. In plaintext the server does this step and sends c⁺ with the next
task; under encryption the next task carries the aggregate itself and each site finishes the step after
decrypting (with k from the task's settings), so the server never sees c. Under encryption η_g is 1.
"""

from __future__ import annotations

import numpy as np

from fedgrid import tensors
from fedgrid.strategy_config import SCAFFOLD_PREFIX, ScaffoldConfig
from fedgrid.transfer import CKKS_FORMAT
from fedserver.model import Model
from fedserver.strategies.base import (
    Aggregate,
    RoundContext,
    Strategy,
    StrategyState,
    TrainPlan,
    build_model,
    float_names,
    read_tensor,
    sample_sites,
    state_dtype,
)


def control_layout(layout: tensors.Layout) -> tensors.Layout:
    """The control variates' tensors: one per floating point tensor of the model, under SCAFFOLD_PREFIX."""
    return {SCAFFOLD_PREFIX + name: layout[name] for name in float_names(layout)}


class Scaffold(Strategy):
    name = "scaffold"

    def __init__(self, config: ScaffoldConfig) -> None:
        self.server_lr = config.server_lr
        self.c: dict[str, np.ndarray] = {}
        """The server control variate (plaintext jobs), by model tensor name."""
        self.updates = 0
        """Encrypted jobs: updates summed in the aggregate the next task carries (k above)."""

    def configure_train(self, round_no: int, active: list[str], model: Model, ctx: RoundContext) -> TrainPlan:
        sites = sample_sites(active, ctx)
        settings = {"scaffold_sites": float(len(ctx.sites)), "scaffold_chosen": float(len(sites))}
        if model.payload_format == CKKS_FORMAT:
            return TrainPlan(sites, model, {**settings, "scaffold_updates": float(self.updates)})
        source = model.source("global model")
        if not self.c:
            self.c = {
                name: np.zeros(source.layout[name].shape, state_dtype(source.layout[name].dtype))
                for name in float_names(source.layout)
            }
        layout = {**source.layout, **control_layout(source.layout)}

        def tensor(name: str) -> np.ndarray:
            if name.startswith(SCAFFOLD_PREFIX):
                return self.c[name.removeprefix(SCAFFOLD_PREFIX)].astype(layout[name].dtype, copy=False)
            return read_tensor(source, name)

        payload = build_model(layout, tensor, ctx.model_dir, f"round-{round_no}-task.safetensors")
        return TrainPlan(sites, payload, settings)

    def result_layout(self, layout: tensors.Layout) -> tensors.Layout:
        return {**layout, **control_layout(layout)}

    def aggregate_train(self, round_no: int, model: Model, aggregate: Aggregate, ctx: RoundContext) -> Model:
        if aggregate.model.payload_format == CKKS_FORMAT:
            self.updates = aggregate.count
            return aggregate.model
        current, mean = model.source("global model"), aggregate.model.source("averaged model")
        moving = set(float_names(current.layout))
        scale = aggregate.total_weight / aggregate.count
        c = {}
        for name in moving:
            keep = state_dtype(current.layout[name].dtype)
            c[name] = read_tensor(mean, SCAFFOLD_PREFIX + name).astype(keep, copy=False)
            c[name] *= scale
        self.c = c

        def tensor(name: str) -> np.ndarray:
            if name not in moving or self.server_lr == 1.0:
                return read_tensor(mean, name)
            spec = current.layout[name]
            x = read_tensor(current, name).astype(state_dtype(spec.dtype), copy=False)
            step = read_tensor(mean, name).astype(x.dtype, copy=False)
            step -= x
            step *= self.server_lr
            x += step
            return x.astype(spec.dtype, copy=False)

        return build_model(current.layout, tensor, ctx.model_dir, f"round-{round_no}-step.safetensors")

    def state(self) -> StrategyState:
        return StrategyState({"updates": self.updates}, dict(self.c))

    def restore(self, state: StrategyState) -> None:
        self.updates = int(state.values.get("updates", 0))
        self.c = dict(state.tensors)
