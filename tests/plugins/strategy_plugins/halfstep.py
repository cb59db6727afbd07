"""An operator's strategy: FedAvg that moves the global model only `fraction` of the way to the mean."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedserver.model import Model
from fedserver.strategies import Aggregate, RoundContext, Strategy
from fedserver.strategies.base import build_model, read_tensor


class HalfStep(Strategy):
    name = "halfstep"
    needs_plaintext = True

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def aggregate_train(self, round_no: int, model: Model, aggregate: Aggregate, ctx: RoundContext) -> Model:
        current, mean = model.source("global model"), aggregate.model.source("mean")

        def tensor(name: str) -> np.ndarray:
            x = read_tensor(current, name).astype(np.float64)
            return (x + self.fraction * (read_tensor(mean, name) - x)).astype(current.layout[name].dtype)

        return build_model(current.layout, tensor, ctx.model_dir, f"round-{round_no}-half.safetensors")


def strategy(params: dict[str, Any]) -> Strategy:
    fraction = params.pop("fraction", 0.5)
    if params:
        raise ValueError(f"unknown parameters {sorted(params)}; halfstep takes fraction")
    if not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    return HalfStep(float(fraction))
