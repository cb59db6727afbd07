"""FedProx (Li et al. 2020): FedAvg at the server; each site adds the proximal term mu/2·||w − w_global||²
to its local loss (`fedclient.api.proximal_term`), which keeps heterogeneous sites near the global model.

The server's part is to send mu with every training task (TaskHeader.settings["mu"]).
"""

from __future__ import annotations

from fedgrid.strategy_config import FedProxConfig
from fedserver.model import Model
from fedserver.strategies.base import RoundContext, Strategy, TrainPlan, sample_sites


class FedProx(Strategy):
    name = "fedprox"

    def __init__(self, config: FedProxConfig) -> None:
        self.mu = config.mu

    def configure_train(self, round_no: int, active: list[str], model: Model, ctx: RoundContext) -> TrainPlan:
        return TrainPlan(sites=sample_sites(active, ctx), payload=model, settings={"mu": self.mu})
