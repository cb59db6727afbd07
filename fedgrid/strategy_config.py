"""The `strategy` and `evaluator` settings of a job's server.json, validated the same way everywhere.

```
"strategy": "fedavg"                                         (the default; a name alone takes the defaults)
"strategy": {"name": "fedprox", "mu": 0.01}
"strategy": {"name": "fedopt", "optimizer": "adam", "server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 0.001}
"strategy": {"name": "scaffold", "server_lr": 1.0}
"strategy": {"name": "module:acme.fedbuff", ...}              (installed on the server by its operator)
"evaluator": "module:acme.holdout"                            (optional: evaluates each new global model
                                                               at the server, on the operator's data_root)
```

The built-in strategies' parameters are checked here, by the admin tool, the server and every site. A
`module:` strategy's other keys go to the module, which only the server can import; it checks them when
the job is submitted (fedserver/strategies/installed.py). The server code of every strategy lives in
fedserver/strategies/; this module only describes and checks what a job asks for.

The top-level `server_lr` and `server_momentum` of older job folders mean FedAvgM and are read as
`{"name": "fedopt", "optimizer": "avgm", "server_lr": ..., "momentum": ...}` (see `legacy_fedavgm`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from fedgrid.errors import JobSpecError

MODULE_RE = re.compile(r"module:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
RESERVED_PREFIX = "fedgrid:"
"""Tensor names that start with this carry a strategy's own values beside the model's (never a model's)."""
SCAFFOLD_PREFIX = RESERVED_PREFIX + "scaffold:"
"""SCAFFOLD's control variates travel as tensors named SCAFFOLD_PREFIX + <model tensor name>."""
OPTIMIZERS = ("avgm", "adam", "yogi", "adagrad")
ADAPTIVE_LR = 0.01
"""FedOpt's default server learning rate for adam, yogi and adagrad (avgm's is 1.0)."""


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    def describe(self) -> str:
        """One line for logs and tracking params: the name and every parameter."""
        params = ", ".join(f"{k}={v}" for k, v in self.model_dump().items() if k != "name")
        return f"{self.name}({params})" if params else str(self.name)  # type: ignore[attr-defined]

    @property
    def needs_plaintext(self) -> str:
        """Why the server must see the updates' values under this strategy ("" when sums are enough)."""
        return ""


class FedAvgConfig(_Config):
    """McMahan et al. 2017: the new global model is the sample-weighted mean of the sites' models."""

    name: Literal["fedavg"] = "fedavg"


class FedProxConfig(_Config):
    """Li et al. 2020: FedAvg, and each site adds mu/2·||w − w_global||² to its loss."""

    name: Literal["fedprox"] = "fedprox"
    mu: float = Field(0.01, ge=0.0, le=1000.0)


class FedOptConfig(_Config):
    """Reddi et al. 2021: a server optimizer applied to the averaged update Δ = mean − global."""

    name: Literal["fedopt"] = "fedopt"
    optimizer: Literal["avgm", "adam", "yogi", "adagrad"] = "adam"
    server_lr: float | None = Field(None, gt=0.0, le=100.0)
    """η; default 1.0 for avgm, ADAPTIVE_LR for the adaptive ones."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """avgm only: velocity = momentum·velocity + Δ."""
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    tau: float = Field(0.001, gt=0.0, le=1.0)
    """Adaptivity: the step is η·m / (sqrt(v) + tau)."""

    @property
    def lr(self) -> float:
        if self.server_lr is not None:
            return self.server_lr
        return 1.0 if self.optimizer == "avgm" else ADAPTIVE_LR

    @property
    def needs_plaintext(self) -> str:
        return (
            f"a server optimizer (FedOpt {self.optimizer}, server_lr {self.lr}), which needs the plaintext mean "
            "of the updates"
        )


class ScaffoldConfig(_Config):
    """Karimireddy et al. 2020: control variates at the server and at each site correct the sites' drift."""

    name: Literal["scaffold"] = "scaffold"
    server_lr: float = Field(1.0, gt=0.0, le=100.0)
    """η_g: global model += server_lr·(mean − global); only 1.0 under encryption."""


class ModuleConfig(BaseModel):
    """A strategy the server's operator installed as a Python module; its other keys are its parameters."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: Annotated[str, Field(pattern=MODULE_RE.pattern)]

    @property
    def module(self) -> str:
        return self.name.removeprefix("module:")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def describe(self) -> str:
        return self.name

    @property
    def needs_plaintext(self) -> str:
        return ""


BuiltIn = Annotated[FedAvgConfig | FedProxConfig | FedOptConfig | ScaffoldConfig, Field(discriminator="name")]
StrategyConfig = FedAvgConfig | FedProxConfig | FedOptConfig | ScaffoldConfig | ModuleConfig
BUILT_IN = ("fedavg", "fedprox", "fedopt", "scaffold")
_BUILT_IN: TypeAdapter[Any] = TypeAdapter(BuiltIn)


def parse_strategy(value: Any, where: str) -> StrategyConfig:
    """The `strategy` setting of server.json; JobSpecError names the field and what it accepts."""
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise JobSpecError(
            f"{where}: strategy must be a name ({', '.join(BUILT_IN)} or module:<installed module>) "
            f'or an object {{"name": ..., parameters}}, got {value!r}'
        )
    name = value["name"]
    if name.startswith("module:"):
        if not MODULE_RE.fullmatch(name):
            raise JobSpecError(f"{where}: strategy name {name!r} must be module:<a dotted Python module name>")
        return ModuleConfig(**value)
    if name not in BUILT_IN:
        raise JobSpecError(
            f"{where}: unknown strategy {name!r}; built in: {', '.join(BUILT_IN)}, "
            "or module:<module> for one the server's operator installed"
        )
    try:
        return _BUILT_IN.validate_python(value)
    except ValidationError as exc:
        raise JobSpecError(f"{where}: {_one_line(exc)}") from None


def parse_evaluator(value: Any, where: str) -> str:
    """The `evaluator` setting: "" (none) or module:<module installed on the server>."""
    if value == "":
        return ""
    if not isinstance(value, str) or not MODULE_RE.fullmatch(value):
        raise JobSpecError(
            f"{where}: evaluator must be module:<a Python module installed on the server>, got {value!r}"
        )
    return value


def legacy_fedavgm(server_lr: float, server_momentum: float) -> FedOptConfig | None:
    """The top-level server_lr/server_momentum of older job folders as FedAvgM (None when they are off)."""
    if server_lr == 1.0 and server_momentum == 0.0:
        return None
    return FedOptConfig(optimizer="avgm", server_lr=server_lr, momentum=server_momentum)


def from_server_json(data: dict[str, Any], where: str) -> tuple[StrategyConfig, str]:
    """(strategy, evaluator) of a server.json's `data`, checked against its other settings.

    The checks that need the server (an installed module, its parameters) happen at submit there.
    """
    legacy = legacy_fedavgm(float(data.get("server_lr", 1.0)), float(data.get("server_momentum", 0.0)))
    if "strategy" in data and legacy is not None:
        raise JobSpecError(
            f"{where}: server_lr/server_momentum (FedAvgM) and strategy are both set; "
            'use "strategy": {"name": "fedopt", "optimizer": "avgm", "server_lr": ..., "momentum": ...} alone'
        )
    strategy = parse_strategy(data.get("strategy", "fedavg"), where) if legacy is None else legacy
    evaluator = parse_evaluator(data.get("evaluator", ""), where)
    encrypted = data.get("encryption", "none") != "none"
    if encrypted and evaluator:
        raise JobSpecError(
            f"{where}: evaluator {evaluator!r} cannot run on an encrypted job: the server never sees the "
            "global model; remove the evaluator or the encryption"
        )
    if isinstance(strategy, ScaffoldConfig):
        if encrypted and strategy.server_lr != 1.0:
            raise JobSpecError(
                f"{where}: strategy.server_lr must be 1.0 for SCAFFOLD under encryption (the server only adds "
                f"ciphertexts), got {strategy.server_lr}"
            )
        if data.get("clip_norm", 0):
            raise JobSpecError(
                f"{where}: clip_norm cannot be combined with SCAFFOLD: the control variates travel in the same "
                "update and would be clipped with it; remove clip_norm"
            )
    return strategy, evaluator


_CLASSES = {"fedavg": FedAvgConfig, "fedprox": FedProxConfig, "fedopt": FedOptConfig, "scaffold": ScaffoldConfig}


def _one_line(exc: ValidationError) -> str:
    error = exc.errors()[0]
    name = str(error["loc"][0])
    place = ".".join(str(p) for p in error["loc"][1:])
    if error["type"] == "extra_forbidden":
        known = [field for field in _CLASSES[name].model_fields if field != "name"]
        return f"strategy {name} has no parameter {place!r}; its parameters: {', '.join(known) or 'none'}"
    rule = error["msg"].removeprefix("Input should be ").removeprefix("input should be ")
    return f"strategy.{place} must be {rule}, got {error.get('input')!r}"
