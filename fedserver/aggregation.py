"""FedAvg arithmetic: pure functions and a running weighted mean, no I/O and no gRPC.

Updates are folded in one at a time as they arrive, into float64 sums the size of the model, so the
server's memory stays O(model) however many sites answer. Every update is checked (names, shapes,
dtypes, finite values, a positive weight) before it touches the sums: a bad one is refused whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from fedgrid.errors import PayloadError
from fedgrid.tensors import Arrays, Layout, check_finite, check_layout

BLOCK = 1 << 15
"""Values folded at a time: weight·update of one block (256 KB of float64) stays in the CPU's cache
between the multiply and the add; folding the 2.7 MB MLP took 2.0 ms instead of 2.6 ms."""


class WeightedMean:
    """Sample-weighted mean of tensor sets that share one layout."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._sums = {name: np.zeros(spec.shape, dtype=np.float64) for name, spec in layout.items()}
        largest = max((int(np.prod(spec.shape)) for spec in layout.values()), default=0)
        self._scratch = np.empty(min(largest, BLOCK), dtype=np.float64)
        """Reused for weight·update, so that folding allocates nothing (no page faults per update)."""
        self.total_weight = 0.0
        self.count = 0

    def add(self, arrays: Mapping[str, np.ndarray], weight: float, what: str) -> None:
        """Fold one update in; raises PayloadError (and changes nothing) when it does not fit."""
        if not math.isfinite(weight) or weight <= 0:
            raise PayloadError(f"{what}: sample count must be a positive number, got {weight}")
        check_layout(arrays, self.layout, what)
        check_finite(arrays, what)
        for name, array in arrays.items():
            total, values = self._sums[name].reshape(-1), array.reshape(-1)
            for start in range(0, values.size, BLOCK):
                stop = min(start + BLOCK, values.size)
                scaled = self._scratch[: stop - start]
                np.multiply(values[start:stop], weight, out=scaled, dtype=np.float64)
                total[start:stop] += scaled
        self.total_weight += weight
        self.count += 1

    def result(self) -> Arrays:
        """The mean, in each tensor's original dtype."""
        if self.count == 0:
            raise PayloadError("no update to aggregate")
        out: Arrays = {}
        for name, total in self._sums.items():
            mean = total / self.total_weight
            dtype = np.dtype(self.layout[name].dtype)
            if dtype.kind in "iub":
                mean = np.rint(mean)
            out[name] = mean.astype(dtype)
        return out


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
