"""The recipe API: build a job in Python, export it as a job folder, or run it on a federation.

```python
recipe = FedAvgRecipe(name="fedavg_fashion_mnist", model=MLP(), train_script="train.py",
                      train_args="--epochs 1", num_rounds=5, min_clients=4)
recipe.add_experiment_tracking("mlflow", tracking_uri="http://localhost:5000")
run = recipe.execute(ProdEnv(startup_kit_location="workspaces/example_project/prod_00/admin@nvidia.com"))
run.wait(progress=print)
print("Result can be found in:", run.get_result())
```

`recipe.execute(SimEnv(num_clients=100, workers=2))` runs the same job on virtual sites instead (fedgrid.sim).

Each strategy has its recipe, with the same options plus the strategy's parameters
(fedgrid/strategy_config.py): `FedProxRecipe(mu=0.01, ...)`, `FedOptRecipe(optimizer="adam", server_lr=0.01,
...)`, `ScaffoldRecipe(...)`; `FedAvgRecipe(strategy="module:acme.fedbuff")` names one the server's
operator installed, and `evaluator="module:..."` an evaluator at the server.

`export(folder)` writes exactly the job folder format of `fedgrid.jobspec` (meta.json, the app's
config, the initial model as safetensors, the training script as custom code), so a job built here
can also be submitted by hand with the console's `submit_job`.
"""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedgrid import jobspec, strategy_config, tensors
from fedgrid.errors import ConfigError
from fedgrid.jobspec import TargetMetric, Tracking
from fedgrid.serde import JobInfo, RoundInfo
from fedgrid.session import Session
from fedgrid.sim import SimEnv, SimRun

APP = "app"


def _state_arrays(model: Any) -> dict[str, Any]:
    """Initial weights as numpy arrays: from a torch module, a safetensors file, or a dict of arrays."""
    if isinstance(model, str | Path):
        return tensors.load_file(Path(model))
    if isinstance(model, dict):
        return {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in model.items()}
    if hasattr(model, "state_dict"):
        return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    raise ConfigError(
        f"model must be a torch module, a dict of tensors or a .safetensors path, not {type(model).__name__}"
    )


class FedAvgRecipe:
    """FedAvg: the global model goes to the sites each round, their updates are averaged by sample count."""

    def __init__(
        self,
        *,
        name: str,
        model: Any,
        train_script: str | Path,
        train_args: str | Sequence[str] = (),
        num_rounds: int = 5,
        min_clients: int = 2,
        sites: Sequence[str] | None = None,
        round_timeout: float = 0.0,
        min_responses: int = 0,
        client_fraction: float = 1.0,
        target_metric: TargetMetric | dict[str, Any] | None = None,
        key_metric: str = "accuracy",
        encryption: bool = False,
        release_site: str = "",
        seed: int = 0,
        custom_files: Sequence[str | Path] = (),
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        clip_norm: float = 0.0,
        resource_spec: Mapping[str, Mapping[str, float]] | None = None,
        strategy: str | Mapping[str, Any] = "fedavg",
        evaluator: str = "",
        resume: bool = True,
        privacy: Mapping[str, Any] | None = None,
        secure_aggregation: str = "none",
        secagg: Mapping[str, Any] | None = None,
        key_site: str = "",
    ) -> None:
        """`resource_spec` maps a site (or "@ALL") to what the job needs there, {"num_cpus", "memory_gb"}:
        the server starts the job on sites that have it free (`local/site.json` says what a site offers).
        `server_lr`/`server_momentum` other than 1.0/0.0 make it FedAvgM (FedOpt with optimizer "avgm").
        `resume=False` ends the job, rather than resume it from its checkpoint, if the server restarts under it.
        `privacy` ({"clip_norm", "noise_multiplier", "delta", "where", ...}), `secure_aggregation="secagg+"` with
        its `secagg` parameters, and `key_site` are described in fedgrid/privacy_config.py."""
        self.name = name
        self.resume = resume
        self.model = model
        self.train_script = Path(train_script)
        self.train_args = shlex.split(train_args) if isinstance(train_args, str) else list(train_args)
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.sites = list(sites) if sites else None
        self.round_timeout = round_timeout
        self.min_responses = min_responses
        self.client_fraction = client_fraction
        self.target_metric = TargetMetric(**target_metric) if isinstance(target_metric, dict) else target_metric
        self.key_metric = key_metric
        self.encryption = encryption
        self.release_site = release_site
        self.seed = seed
        self.custom_files = [Path(p) for p in custom_files]
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.clip_norm = clip_norm
        self.resource_spec = {site: dict(needs) for site, needs in (resource_spec or {}).items()}
        self.strategy: dict[str, Any] = {"name": strategy} if isinstance(strategy, str) else dict(strategy)
        legacy = strategy_config.legacy_fedavgm(server_lr, server_momentum)
        if legacy is not None:
            if self.strategy != {"name": "fedavg"}:
                raise ConfigError("server_lr/server_momentum make the job FedAvgM: give them or a strategy, not both")
            self.strategy = legacy.model_dump(exclude_none=True)
        self.evaluator = evaluator
        self.privacy = dict(privacy) if privacy else None
        self.secure_aggregation = secure_aggregation
        self.secagg = dict(secagg) if secagg else None
        self.key_site = key_site
        self.tracking: list[Tracking] = []

    def add_experiment_tracking(self, tracking_type: str, tracking_uri: str = "", experiment_name: str = "") -> None:
        """Stream the sites' SummaryWriter metrics, through the server, to "mlflow" or "tensorboard".

        Without a tracking URI, MLflow writes to the server's own store (SQLite in its workspace).
        """
        if tracking_type not in jobspec.TRACKERS:
            raise ConfigError(f"tracking type must be one of {', '.join(jobspec.TRACKERS)}, not {tracking_type!r}")
        self.tracking.append(Tracking(type=tracking_type, tracking_uri=tracking_uri, experiment_name=experiment_name))

    def server_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "strategy": self.strategy,
            "num_rounds": self.num_rounds,
            "min_clients": self.min_clients,
            "client_fraction": self.client_fraction,
            "min_responses": self.min_responses,
            "round_timeout": self.round_timeout,
            "key_metric": self.key_metric,
            "encryption": "ckks" if self.encryption else "none",
            "seed": self.seed,
            "initial_model": jobspec.INITIAL_MODEL,
            "tracking": [t.model_dump(exclude_defaults=True) for t in self.tracking],
        }
        if self.target_metric is not None:
            config["target_metric"] = self.target_metric.model_dump()
        if self.release_site:
            config["release_site"] = self.release_site
        if self.evaluator:
            config["evaluator"] = self.evaluator
        if self.clip_norm:
            config["clip_norm"] = self.clip_norm
        if not self.resume:
            config["resume"] = False
        if self.privacy:
            config["privacy"] = self.privacy
        if self.secure_aggregation != "none":
            config["secure_aggregation"] = self.secure_aggregation
        if self.secagg:
            config["secagg"] = self.secagg
        if self.key_site:
            config["key_site"] = self.key_site
        return config

    def export(self, folder: str | Path) -> Path:
        """Write the job folder (validated before returning); returns its path."""
        folder = Path(folder)
        if not self.train_script.is_file():
            raise ConfigError(f"training script {self.train_script} does not exist")
        if folder.exists():
            shutil.rmtree(folder)
        app = folder / APP
        (app / "config").mkdir(parents=True)
        (app / "custom").mkdir()
        meta = {
            "name": self.name,
            "min_clients": self.min_clients,
            "deploy_map": {APP: ["server", *self.sites] if self.sites else ["@ALL"]},
        }
        if self.resource_spec:
            meta["resource_spec"] = self.resource_spec
        (folder / jobspec.META_FILE).write_text(json.dumps(meta, indent=2))
        (app / jobspec.SERVER_CONFIG).write_text(json.dumps(self.server_config(), indent=2))
        client = {"script": self.train_script.name, "args": self.train_args}
        (app / jobspec.CLIENT_CONFIG).write_text(json.dumps(client, indent=2))
        tensors.save_file(_state_arrays(self.model), app / "config" / jobspec.INITIAL_MODEL)
        shutil.copy2(self.train_script, app / "custom" / self.train_script.name)
        for extra in self.custom_files:
            target = app / "custom" / extra.name
            if extra.is_dir():
                shutil.copytree(extra, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(extra, target)
        jobspec.load_job(folder)
        return folder

    def execute(self, env: ProdEnv | SimEnv) -> Run | SimRun:
        """Export to a temporary folder and run it there: submitted with a ProdEnv's admin kit, or simulated
        on a SimEnv's virtual sites (fedgrid.sim); either way the returned run is followed the same way."""
        with tempfile.TemporaryDirectory(prefix=f"{self.name}-") as tmp:
            folder = self.export(Path(tmp) / self.name)
            return env.submit(folder, self.num_rounds)


class FedProxRecipe(FedAvgRecipe):
    """FedProx: FedAvg, with mu sent to the sites, whose scripts add `fedclient.api.proximal_term`."""

    def __init__(self, *, mu: float = 0.01, **options: Any) -> None:
        super().__init__(strategy={"name": "fedprox", "mu": mu}, **options)


class FedOptRecipe(FedAvgRecipe):
    """FedOpt: FedAvgM, FedAdam, FedYogi or FedAdagrad at the server, on the averaged update (plaintext jobs)."""

    def __init__(
        self,
        *,
        optimizer: str = "adam",
        server_lr: float | None = None,
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 0.001,
        **options: Any,
    ) -> None:
        strategy = {"name": "fedopt", "optimizer": optimizer, "momentum": momentum, "beta1": beta1}
        strategy.update({"beta2": beta2, "tau": tau})
        if server_lr is not None:
            strategy["server_lr"] = server_lr
        super().__init__(strategy=strategy, **options)


class ScaffoldRecipe(FedAvgRecipe):
    """SCAFFOLD: control variates at the server and the sites, whose scripts call
    `fedclient.api.scaffold_correction` each step and `scaffold_update` before sending."""

    def __init__(self, *, server_lr: float = 1.0, **options: Any) -> None:
        super().__init__(strategy={"name": "scaffold", "server_lr": server_lr}, **options)


class ProdEnv:
    """A real federation, reached with an admin's startup kit."""

    def __init__(self, startup_kit_location: str | Path, timeout: float = 30.0) -> None:
        self.kit = Path(startup_kit_location)
        self.timeout = timeout
        self._session: Session | None = None

    def session(self) -> Session:
        if self._session is None:
            self._session = Session(self.kit, timeout=self.timeout)
        return self._session

    def submit(self, folder: Path, num_rounds: int = 0) -> Run:
        """Submit a job folder with this env's admin kit."""
        session = self.session()
        return Run(session, session.submit_job(folder), num_rounds)


class Run:
    """A submitted job: follow it, wait for it, fetch its result."""

    def __init__(self, session: Session, job_id: str, num_rounds: int = 0) -> None:
        self.session = session
        self.job_id = job_id
        self.num_rounds = num_rounds
        self.info: JobInfo | None = None

    def get_job_id(self) -> str:
        return self.job_id

    def get_status(self) -> str:
        return self.session.get_job_status(self.job_id)

    def wait(self, progress: Callable[[RoundInfo], None] | None = None) -> JobInfo:
        """Block until the job ends, calling `progress` with each finished round."""
        for event in self.session.watch_job(self.job_id):
            if isinstance(event, RoundInfo):
                if progress is not None:
                    progress(event)
            else:
                self.info = event
        assert self.info is not None
        return self.info

    def abort(self) -> str:
        return self.session.abort_job(self.job_id)

    def get_result(self, destination: str | Path | None = None) -> Path:
        """Download the finished job's result folder; returns its path."""
        return self.session.download_job(self.job_id, destination)
