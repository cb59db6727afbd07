"""FedAvg (McMahan et al. 2017): the new global model is the sample-weighted mean of the sites' models.

Every hook of `Strategy` is FedAvg's already; this class gives it its name in the registry.
"""

from __future__ import annotations

from fedserver.strategies.base import Strategy


class FedAvg(Strategy):
    name = "fedavg"
