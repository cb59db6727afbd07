"""The privacy settings of a job's server.json, checked the same way by the admin tool, the server and every site.

```
"privacy": {"mechanism": "gaussian", "clip_norm": 1.0, "noise_multiplier": 1.1, "delta": 1e-5,
            "where": "server" | "sites", "target_epsilon": 8.0, "accountant": "rdp" | "pld"}
"secure_aggregation": "secagg+"
"secagg": {"bits": 16, "value_range": 1.0, "modulus_bits": 32, "degree": null, "threshold": null,
           "step_timeout": 60}
"key_site": "site-1"
```

`privacy` is differential privacy at the level of sites (fedgrid/dp.py says what it guarantees): each site's
difference to the global model is clipped to `clip_norm`, and Gaussian noise of `noise_multiplier`·clip_norm
is added to the sum by the server (`where: server`, central DP: the server sees the clipped updates) or
shared among the sites (`where: sites`, distributed DP: each adds its part before its update leaves it,
the only choice under encryption or SecAgg+, where the server never sees an update).

`secure_aggregation: secagg+` masks each site's quantized difference so that the server learns only the
sum (fedgrid/secagg.py); `secagg` holds its parameters. `key_site` names the site that makes a job's HE
key when the project's sites make them (`he.keys: sites`); the first site of the job otherwise.

Refused, each with its reason (`check_privacy`):
- SCAFFOLD with privacy: its control variates are a second function of each site's data, sent beside the
  update and left unclipped and unnoised by the mechanism; the guarantee would not cover them.
- An installed (`module:`) strategy with privacy: its extra result tensors would escape the clipping too.
- `where: server` under encryption or SecAgg+: the server cannot clip or noise updates it never sees.
- The top-level `clip_norm` (server clipping) with privacy or SecAgg+: privacy.clip_norm replaces it, and
  under SecAgg+ the server has no single update to clip.
- SecAgg+ with encryption: one way of hiding the updates per job.
- A `target_epsilon` that one round already exceeds; SecAgg+ parameters that overflow or cannot be
  unmasked for the job's number of sites; `secagg.value_range` below `privacy.clip_norm` (a clipped
  difference must fit the quantization range).

FedOpt's server optimizer is allowed with privacy: it transforms the noisy mean, which is post-processing.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedgrid import dp, secagg
from fedgrid.errors import ConfigError, JobSpecError
from fedgrid.strategy_config import ModuleConfig, ScaffoldConfig

SECURE_AGGREGATIONS = ("none", "secagg+")
SITES_SETTING = "privacy_sites"
"""A private job's training task says in this setting how many sites were asked (each adds its share of noise)."""


class SecAggConfig(BaseModel):
    """The `secagg` section: quantization and the sharing threshold of SecAgg+."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    bits: int = Field(16, ge=1, le=62)
    """Each value of a site's difference becomes an integer of this many bits."""
    value_range: float = Field(1.0, gt=0, le=1e9)
    """Differences are quantized over [-value_range, value_range]; a larger value is refused at the site."""
    modulus_bits: int = Field(32, ge=2, le=64)
    """Masked values and their sum are integers mod 2^modulus_bits (4 bytes per value up to 32, else 8)."""
    degree: int | None = Field(None, ge=2, le=100_000)
    """Neighbours each site shares its secrets with (even); unset: every other site of the round."""
    threshold: int | None = Field(None, ge=1, le=100_000)
    """Shares needed to recover a secret; unset: just over half the neighbours (the most dropouts survived)."""
    step_timeout: float = Field(60.0, gt=0, le=3600)
    """Seconds each step after the first waits for the sites (the first waits as long as the round)."""
    stochastic_rounding: bool = True

    def params(self, n_sites: int) -> secagg.SecAggParams:
        """The parameters of a round of `n_sites` sites, checked (ConfigError naming the setting)."""
        params = secagg.SecAggParams(
            threshold=1,
            bits=self.bits,
            value_range=float(self.value_range),
            modulus_bits=self.modulus_bits,
            degree=self.degree,
            stochastic_rounding=self.stochastic_rounding,
        )
        degree = secagg.effective_degree(params, n_sites)
        threshold = self.threshold if self.threshold is not None else degree // 2 + 1
        params = secagg.SecAggParams(
            threshold=threshold,
            bits=self.bits,
            value_range=float(self.value_range),
            modulus_bits=self.modulus_bits,
            degree=self.degree,
            stochastic_rounding=self.stochastic_rounding,
        )
        secagg.check_params(params, n_sites)
        return params


def parse_secagg(value: Any, where: str) -> SecAggConfig:
    if not isinstance(value, dict):
        raise JobSpecError(f"{where}: secagg must be an object like {{\"bits\": 16, \"value_range\": 1.0}}")
    try:
        return SecAggConfig.model_validate(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        place = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            known = ", ".join(SecAggConfig.model_fields)
            raise JobSpecError(f"{where}: unknown key secagg.{place}; allowed: {known}") from None
        rule = error["msg"].removeprefix("Input should be ")
        raise JobSpecError(f"{where}: secagg.{place} must be {rule}, got {error.get('input')!r}") from None


def parse_privacy(value: Any, sampling_rate: float, where: str) -> dp.DPParams:
    try:
        return dp.parse_privacy(value, sampling_rate, where)
    except ConfigError as exc:
        raise JobSpecError(str(exc)) from None


def check_privacy(
    *,
    privacy: dp.DPParams | None,
    secure: str,
    secagg_config: SecAggConfig | None,
    strategy: Any,
    encrypted: bool,
    clip_norm: float,
    min_clients: int,
    where: str,
) -> None:
    """Refuse (JobSpecError naming server.json and the reason) a combination that breaks a guarantee."""
    if privacy is not None:
        if isinstance(strategy, ScaffoldConfig):
            raise JobSpecError(
                f"{where}: privacy cannot be combined with SCAFFOLD: its control variates are a second function of "
                "each site's data, sent beside the update, that the clipping and the noise do not cover; use "
                "FedAvg, FedProx or FedOpt"
            )
        if isinstance(strategy, ModuleConfig):
            raise JobSpecError(
                f"{where}: privacy cannot be combined with an installed strategy ({strategy.name}): what it adds to "
                "the sites' results would escape the clipping and the noise; use FedAvg, FedProx or FedOpt"
            )
        if clip_norm:
            raise JobSpecError(
                f"{where}: clip_norm and privacy are both set; privacy.clip_norm is the clipping of a private job: "
                "remove clip_norm"
            )
        if privacy.where == "server" and (encrypted or secure != "none"):
            hidden = "encryption" if encrypted else "secure_aggregation"
            raise JobSpecError(
                f"{where}: privacy.where \"server\" needs the server to clip and noise each update, which "
                f"{hidden} hides from it; use privacy.where \"sites\" (each site adds its share of the noise)"
            )
        if privacy.target_epsilon is not None:
            first = dp.epsilon_spent(privacy, 1)
            if first > privacy.target_epsilon:
                raise JobSpecError(
                    f"{where}: privacy.target_epsilon {privacy.target_epsilon:g} is below the ε of a single round "
                    f"({first:.3g} with noise_multiplier {privacy.noise_multiplier:g} and client_fraction "
                    f"{privacy.sampling_rate:g}): no round could run; raise target_epsilon or noise_multiplier"
                )
    if secure == "none":
        if secagg_config is not None:
            raise JobSpecError(f'{where}: secagg parameters are set but secure_aggregation is not "secagg+"')
        return
    if encrypted:
        raise JobSpecError(
            f'{where}: secure_aggregation "secagg+" and encryption both hide the updates from the server; '
            "choose one"
        )
    if clip_norm:
        raise JobSpecError(
            f"{where}: clip_norm clips each update at the server, which under secure_aggregation sees only the "
            "sum; remove clip_norm (privacy.clip_norm clips at the sites)"
        )
    config = secagg_config or SecAggConfig()
    if privacy is not None and config.value_range < privacy.clip_norm:
        raise JobSpecError(
            f"{where}: secagg.value_range {config.value_range:g} is below privacy.clip_norm {privacy.clip_norm:g}: "
            "a clipped difference may hold values up to the clip norm; raise value_range"
        )
    check_sites(config, max(2, min_clients), where)


def check_sites(config: SecAggConfig, n_sites: int, where: str) -> None:
    """Refuse SecAgg+ parameters that cannot run a round of `n_sites` sites (overflow, threshold)."""
    try:
        config.params(n_sites)
    except ConfigError as exc:
        raise JobSpecError(f"{where}: {exc} (with {n_sites} sites in a round)") from None

