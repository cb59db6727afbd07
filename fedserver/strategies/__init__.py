"""Strategies: what varies per federated algorithm, behind the hooks of `Strategy` (base.py).

    fedavg    FedAvg (the default)              fedopt    FedAvgM, FedAdam, FedYogi, FedAdagrad
    fedprox   FedProx (mu sent to the sites)    scaffold  SCAFFOLD (control variates)
    module:<m>  one the server's operator installed (installed.py)

A job picks one in its server.json (fedgrid/strategy_config.py); `build` makes it for a run, `check` runs
at submit the checks only the server can make (an installed module exists, is a strategy, takes the
job's parameters).
"""

from __future__ import annotations

from pathlib import Path

from fedgrid.errors import JobSpecError
from fedgrid.jobspec import JobSpec, ServerConfig
from fedgrid.strategy_config import FedOptConfig, FedProxConfig, ModuleConfig, ScaffoldConfig
from fedserver.strategies.base import Aggregate, RoundContext, Strategy, StrategyState, TrainPlan
from fedserver.strategies.fedavg import FedAvg
from fedserver.strategies.fedopt import FedOpt
from fedserver.strategies.fedprox import FedProx
from fedserver.strategies.installed import installed_evaluator, installed_strategy
from fedserver.strategies.scaffold import Scaffold

__all__ = [
    "Aggregate",
    "FedAvg",
    "FedOpt",
    "FedProx",
    "RoundContext",
    "Scaffold",
    "Strategy",
    "StrategyState",
    "TrainPlan",
    "build",
    "check",
]


def build(config: ServerConfig, where: str, forbidden: Path | None = None) -> Strategy:
    """The strategy a job's server config names, ready for its first round."""
    strategy = config.strategy
    if isinstance(strategy, FedProxConfig):
        return FedProx(strategy)
    if isinstance(strategy, FedOptConfig):
        return FedOpt(strategy)
    if isinstance(strategy, ScaffoldConfig):
        return Scaffold(strategy)
    if isinstance(strategy, ModuleConfig):
        return installed_strategy(strategy.module, strategy.params, where, forbidden)
    return FedAvg()


def check(spec: JobSpec, forbidden: Path | None) -> None:
    """At submit: refuse (JobSpecError naming server.json) a strategy or evaluator this server cannot run."""
    where = f"{spec.server_app}/config/server.json"
    strategy = build(spec.server, where, forbidden)
    if strategy.needs_plaintext and spec.server.encryption != "none":
        raise JobSpecError(
            f"{where}: strategy {spec.server.strategy.describe()} computes on the plaintext aggregate and cannot "
            "run on an encrypted job (the server only adds ciphertexts); remove the encryption or pick another"
        )
    if spec.server.evaluator:
        installed_evaluator(spec.server.evaluator.removeprefix("module:"), where, forbidden)
