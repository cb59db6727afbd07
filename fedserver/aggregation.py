"""FedAvg arithmetic on plaintext updates: a running sample-weighted mean, clipping, weighted metrics.

Updates are folded in one at a time as they arrive, block by block, into one accumulator the size of
the model, so the server's memory stays O(model) however many sites answer and however large the model
is (an update that waits in a file is read a block at a time, never whole). Every update is checked
(names, shapes, dtypes, finite values, a positive bounded weight) in a first pass before it touches the
mean: a bad one is refused whole. The mean is kept as a running mean, m += w/W·(x − m), in float32 for
float16/float32 tensors (float64 for float64 and integer ones): it needs one accumulator where a weighted
sum would need one of a wider type, and it cannot overflow: the weights only enter as w/W ≤ 1, and values
are bounded by half the accumulator's range, so x − m stays finite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from fedgrid import tensors
from fedgrid.errors import LayoutError, NonFiniteError, PayloadError, SampleCountError
from fedgrid.tensor_file import TensorSource, write_tensor_file
from fedgrid.tensors import Arrays, Layout
from fedserver.grid import Result
from fedserver.model import MEMORY_LIMIT, Model

BLOCK = 1 << 15
"""Values folded at a time: a block and its temporaries stay in the CPU's cache between the steps."""
MAX_WEIGHT = float(1 << 40)
"""The largest sample count an update may carry (about 1.1e12): more is refused as implausible."""


class Aggregator(Protocol):
    """Folds the results of one round: `PlainAggregator` here, `EncryptedAggregator` for HE jobs."""

    payload_format: str
    count: int
    total_weight: float
    grace: float
    """Seconds a round waits beyond its round_timeout for the aggregator's own steps (SecAgg+'s)."""

    def add(self, result: Result) -> None: ...

    async def complete(self) -> None:
        """Fetch what the sum needs besides the updates, once they are in (SecAgg+'s unmasking shares)."""

    def finish(self, folder: Path, name: str) -> Model: ...


def accumulator_dtype(dtype: str) -> np.dtype:
    kind = np.dtype(dtype).kind
    return np.dtype(np.float32) if kind == "f" and np.dtype(dtype).itemsize <= 4 else np.dtype(np.float64)


def check_weight(weight: float, what: str) -> None:
    if not math.isfinite(weight) or weight <= 0 or weight > MAX_WEIGHT:
        raise SampleCountError(f"{what}: sample count must be a number in (0, {MAX_WEIGHT:.3g}], got {weight}")


def check_same_layout(got: Layout, expected: Layout, what: str) -> None:
    """Raise PayloadError unless `got` has exactly the expected names, dtypes and shapes."""
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        parts = [f"missing {', '.join(missing[:5])}"] if missing else []
        parts += [f"unexpected {', '.join(extra[:5])}"] if extra else []
        raise LayoutError(f"{what}: tensor names differ from the global model ({'; '.join(parts)})")
    for name, spec in expected.items():
        if got[name].shape != spec.shape:
            raise LayoutError(f"{what}: tensor {name!r} has shape {got[name].shape}, expected {spec.shape}")
        if got[name].dtype != spec.dtype:
            raise LayoutError(f"{what}: tensor {name!r} has dtype {got[name].dtype}, expected {spec.dtype}")


@dataclass(frozen=True)
class Clip:
    """Scale each update's difference to `reference` (the global model) down to L2 norm `max_norm`."""

    reference: TensorSource
    max_norm: float


class WeightedMean:
    """Sample-weighted mean of tensor sets that share one layout, folded one set at a time."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._mean = {
            name: np.zeros(math.prod(spec.shape), dtype=accumulator_dtype(spec.dtype)) for name, spec in layout.items()
        }
        self.total_weight = 0.0
        self.count = 0

    def add(self, source: TensorSource, weight: float, what: str, clip: Clip | None = None) -> None:
        """Fold one update in; raises PayloadError (and changes nothing) when it does not fit."""
        check_weight(weight, what)
        check_same_layout(source.layout, self.layout, what)
        scale = self._check_values(source, what, clip)
        total = self.total_weight + weight
        share = weight / total
        for name, mean in self._mean.items():
            reference = clip.reference.blocks(name, BLOCK) if clip is not None else None
            start = 0
            for block in source.blocks(name, BLOCK):
                stop = start + block.size
                values = block.astype(mean.dtype)
                if reference is not None and scale != 1.0 and block.dtype.kind == "f":
                    base = next(reference).astype(mean.dtype)
                    values -= base
                    values *= scale
                    values += base
                elif reference is not None:
                    next(reference)
                target = mean[start:stop]
                values -= target
                values *= share
                target += values
                start = stop
        self.total_weight = total
        self.count += 1

    def _check_values(self, source: TensorSource, what: str, clip: Clip | None) -> float:
        """First pass: every float value finite; with `clip`, the scale that bounds the update's norm."""
        squares = 0.0
        for name, spec in self.layout.items():
            if np.dtype(spec.dtype).kind != "f":
                continue
            reference = clip.reference.blocks(name, BLOCK) if clip is not None else None
            limit = np.finfo(accumulator_dtype(spec.dtype)).max / 2
            for block in source.blocks(name, BLOCK):
                if not (np.abs(block) <= limit).all():
                    raise NonFiniteError(
                        f"{what}: tensor {name!r} contains NaN, infinite or out-of-range values (beyond ±{limit:.3g})"
                    )
                if reference is not None:
                    difference = block.astype(np.float64) - next(reference)
                    squares += float(np.dot(difference, difference))
        if clip is None:
            return 1.0
        norm = math.sqrt(squares)
        return clip.max_norm / norm if norm > clip.max_norm else 1.0

    def blocks(self, name: str) -> Iterator[np.ndarray]:
        """The mean of tensor `name`, flat, in its own dtype, a block at a time."""
        if self.count == 0:
            raise PayloadError("no update to aggregate")
        dtype = np.dtype(self.layout[name].dtype)
        mean = self._mean[name]
        for start in range(0, mean.size, BLOCK):
            block = mean[start : start + BLOCK]
            yield (np.rint(block) if dtype.kind in "iub" else block).astype(dtype)

    def result(self) -> Arrays:
        """The mean, in each tensor's original dtype and shape."""
        return {
            name: np.concatenate(list(self.blocks(name)) or [np.zeros(0, spec.dtype)]).reshape(spec.shape)
            for name, spec in self.layout.items()
        }


class PlainAggregator:
    """The sample-weighted mean of safetensors updates, optionally clipping each update's difference to
    the global model to `clip_norm` first."""

    payload_format = tensors.FORMAT
    grace = 0.0

    def __init__(self, layout: Layout, global_model: Model | None = None, clip_norm: float = 0.0) -> None:
        self._mean = WeightedMean(layout)
        self._clip = None
        if clip_norm > 0 and global_model is not None:
            self._clip = Clip(global_model.source("global model"), clip_norm)

    @property
    def count(self) -> int:
        return self._mean.count

    @property
    def total_weight(self) -> float:
        return self._mean.total_weight

    def add(self, result: Result) -> None:
        what = f"update from {result.site}"
        if result.payload_format != tensors.FORMAT or not result.has_payload:
            raise PayloadError(f"{what}: expected a {tensors.FORMAT} payload, got {result.payload_format or 'none'}")
        self._mean.add(result.source(what), result.num_samples, what, self._clip)

    async def complete(self) -> None:
        """Nothing beyond the updates."""

    def finish(self, folder: Path, name: str) -> Model:
        """The new global model: bytes for a small model, else the file `folder/name` written block by block."""
        layout = self._mean.layout
        size = sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in layout.values())
        if size <= MEMORY_LIMIT:
            return Model.in_memory(tensors.FORMAT, tensors.encode(self._mean.result()))
        path = folder / name
        write_tensor_file(path, layout, self._mean.blocks)
        return Model.on_disk(tensors.FORMAT, path)


def weighted_metrics(results: Iterable[tuple[Mapping[str, float], float]]) -> dict[str, float]:
    """Per metric, the mean over sites weighted by each site's sample count.

    A metric only some sites report is averaged over those sites; non-finite values are skipped.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metrics, weight in results:
        for name, value in metrics.items():
            if not math.isfinite(value) or weight <= 0:
                continue
            sums[name] = sums.get(name, 0.0) + value * weight
            weights[name] = weights.get(name, 0.0) + weight
    return {name: sums[name] / weights[name] for name in sorted(sums)}
