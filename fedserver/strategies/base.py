"""What varies per algorithm, as a few hooks the round loop (fedserver/rounds.py) calls in order:

    configure_train    which sites train this round, with which settings, on which payload
    result_layout      the tensors a training result holds (the model's, and any the strategy adds)
    aggregate_train    the new global model from the round's aggregate (the server step)
    aggregate_evaluate the global metrics from the sites' evaluations
    state / restore    what the strategy keeps between rounds: plain JSON plus tensors, for the checkpoint

The defaults are FedAvg: every hook a strategy leaves alone behaves as FedAvg does. A strategy never sees
the transport, the aggregator's arithmetic nor the encryption: it is handed models (`fedserver.model.Model`)
and returns models, so an operator can write one (fedserver/strategies/installed.py) without knowing the rest.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedgrid import tensors
from fedgrid.tensor_file import TensorSource, write_tensor_file
from fedserver.aggregation import weighted_metrics
from fedserver.model import MEMORY_LIMIT, Model


@dataclass(frozen=True)
class RoundContext:
    """What a strategy may know about the job around it: fixed for the whole job."""

    sites: tuple[str, ...]
    """Every site the job started with (SCAFFOLD's N)."""
    client_fraction: float
    min_clients: int
    rng: random.Random
    """The job's seeded random source (site sampling), so a job with the same seed samples the same sites."""
    model_dir: Path
    """Where models too large for memory are written (files named round-*, pruned by the loop)."""


@dataclass(frozen=True)
class TrainPlan:
    """One round's training: who trains, with which settings, on which payload."""

    sites: list[str]
    payload: Model
    """What the training task carries: the global model, and any tensors the strategy adds to it."""
    settings: Mapping[str, float] = field(default_factory=dict)
    """Travels with the task (TaskHeader.settings), e.g. FedProx's mu; the site's script reads task.settings."""


@dataclass(frozen=True)
class Aggregate:
    """The folded results of a round, as the aggregator left them."""

    model: Model
    """The sample-weighted mean (plaintext), or the encrypted sum with its total weight (HE)."""
    count: int
    """Updates folded in."""
    total_weight: float
    """Their summed sample counts."""


@dataclass(frozen=True)
class StrategyState:
    """What a strategy keeps between rounds: JSON-able values and named tensors (checkpoint/strategy.*)."""

    values: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict)


class Strategy:
    """FedAvg, and the base of every other strategy: override the hooks that differ."""

    name = "fedavg"
    needs_plaintext = False
    """True when aggregate_train reads the aggregate's values: such a strategy is refused for encrypted jobs
    (under encryption the aggregate is a sum of ciphertexts with its total weight)."""

    def configure_train(self, round_no: int, active: list[str], model: Model, ctx: RoundContext) -> TrainPlan:
        """Sample a fraction of the active sites (at least min_clients), all with the global model."""
        return TrainPlan(sites=sample_sites(active, ctx), payload=model)

    def result_layout(self, layout: tensors.Layout) -> tensors.Layout:
        """The tensors every training result must hold; `layout` is the model's."""
        return layout

    def aggregate_train(self, round_no: int, model: Model, aggregate: Aggregate, ctx: RoundContext) -> Model:
        """The next global model from the round's aggregate; `model` is the one the round started from."""
        return aggregate.model

    def aggregate_evaluate(self, round_no: int, scores: list[tuple[dict[str, float], float]]) -> dict[str, float]:
        """Global metrics from (metrics, sample count) per site: the sample-weighted mean of each metric."""
        return weighted_metrics(scores)

    def state(self) -> StrategyState:
        """A snapshot the strategy will not change afterwards (it is written while the next round runs)."""
        return StrategyState()

    def restore(self, state: StrategyState) -> None:
        """Continue from a checkpoint's `state`."""


def sample_sites(active: list[str], ctx: RoundContext) -> list[str]:
    """client_fraction of `active` (at least min_clients, at most all), drawn with the job's seeded rng."""
    count = max(ctx.min_clients, round(ctx.client_fraction * len(active)))
    return sorted(ctx.rng.sample(active, min(count, len(active))))


def read_tensor(source: TensorSource, name: str) -> np.ndarray:
    """One tensor of `source` whole, in its dtype and shape: a new array, the caller's to change in place."""
    spec = source.layout[name]
    whole = np.empty(math.prod(spec.shape), spec.dtype)
    filled = 0
    for block in source.blocks(name, 1 << 20):
        whole[filled : filled + block.size] = block
        filled += block.size
    return whole.reshape(spec.shape)


def build_model(layout: tensors.Layout, tensor: Callable[[str], np.ndarray], folder: Path, name: str) -> Model:
    """A plaintext model whose tensor `n` is `tensor(n)`, computed one tensor at a time: in memory when
    small, else written to `folder/name` without holding more than one tensor."""
    size = sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in layout.values())
    if size <= MEMORY_LIMIT:
        return Model.in_memory(tensors.FORMAT, tensors.encode({n: tensor(n) for n in layout}))
    write_tensor_file(folder / name, layout, lambda n: iter([np.ascontiguousarray(tensor(n)).reshape(-1)]))
    return Model.on_disk(tensors.FORMAT, folder / name)


def float_names(layout: tensors.Layout) -> Iterable[str]:
    """The tensors a server optimizer moves: floating point ones (integer buffers take the mean)."""
    return [name for name, spec in layout.items() if np.dtype(spec.dtype).kind == "f"]


def state_dtype(dtype: str) -> np.dtype:
    """The dtype a strategy keeps per-tensor state in: float32 for float16/32 tensors, float64 else."""
    return np.dtype(np.float32) if np.dtype(dtype).itemsize <= 4 else np.dtype(np.float64)
