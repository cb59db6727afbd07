"""Simulation: the same job folder on 100-1000 virtual sites, on this machine or on a Ray cluster.

```python
recipe = FedAvgRecipe(name="fedavg_fashion_mnist", model=MLP(), train_script="train.py", ...)
run = recipe.execute(SimEnv(num_clients=100, workers=2))        # or ray_address="ray://head:10001"
run.wait(progress=print)
print("Result can be found in:", run.get_result())
```

or, for an exported job folder, `fedgrid-sim <job folder> -n 100` (also `fedgrid simulate ...`).

What is shared with a deployed job is everything but the transport and the daemons: the server's `JobRun`,
round loop, strategies, aggregation, checkpoints, tracking and result folder run in the driver
(fedgrid/sim/driver.py); the unchanged training script runs in a worker host (fedgrid/sim/host.py) through
`fedclient.api` and its `JobSession`, which speak the same Work protocol messages over the host's link
(fedgrid/sim/link.py) instead of gRPC. The hosts are local processes or Ray actors (fedgrid/sim/pool.py);
what the simulator refuses before round 1 is in fedgrid/sim/checks.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedgrid.serde import JobInfo, RoundInfo
from fedgrid.sim.checks import SimOptions, load_he_params

__all__ = ["SimEnv", "SimOptions", "SimRun", "load_he_params", "simulate"]


class SimRun:
    """A simulated job, followed as a submitted one (`fedgrid.recipe.Run`): wait, abort, get the result."""

    def __init__(self, simulation: Any) -> None:
        self.simulation = simulation
        self.job_id: str = simulation.job_id
        self.num_rounds = simulation.plan.spec.server.num_rounds
        self.info: JobInfo | None = None

    def get_job_id(self) -> str:
        return self.job_id

    def get_status(self) -> str:
        return self.info.status if self.info is not None else "RUNNING"

    def wait(self, progress: Callable[[RoundInfo], None] | None = None) -> JobInfo:
        """Block until the job ends, calling `progress` with each finished round."""
        from fedgrid.sim.driver import wait_events

        if self.info is None:
            self.info = wait_events(self.simulation, progress)
        return self.info

    def abort(self, reason: str = "aborted by the user") -> str:
        self.simulation.abort(reason)
        return f"aborting job {self.job_id}"

    def get_result(self, destination: str | Path | None = None) -> Path:
        """The job's result folder (waiting for the job to end), or a copy of it in `destination`/<job id>."""
        self.wait()
        folder: Path = self.simulation.result_dir
        if destination is None:
            return folder
        target = Path(destination) / self.job_id
        shutil.copytree(folder, target, dirs_exist_ok=True)
        return target


class SimEnv:
    """Where `recipe.execute(...)` runs a job in simulation: `num_clients` virtual sites (site-1..site-N).

    `workers` host processes (default: one per core) each run many sites; `stragglers` is the chance that a
    site chosen to train does not answer its round; `ray_address` places the hosts as Ray actors ("local"
    starts Ray here); `data_root` is the folder with one data folder per site (default: the job's own
    --data_root argument); `results` is where result folders go; `he_params` are the CKKS parameters
    (fedgrid.he.HEParams, a dict like project.yml's he: section, or a path to such a file) an encrypted
    job's context is generated from.
    """

    def __init__(
        self,
        num_clients: int,
        workers: int = 0,
        stragglers: float = 0.0,
        ray_address: str = "",
        data_root: str | Path | None = None,
        results: str | Path = "sim_results",
        he_params: Any = None,
    ) -> None:
        self.options = SimOptions(
            num_clients=num_clients,
            workers=workers,
            stragglers=stragglers,
            ray_address=ray_address,
            data_root=Path(data_root) if data_root is not None else None,
            results=Path(results),
            he_params=_he_params(he_params),
        )

    def submit(self, folder: Path, num_rounds: int = 0) -> SimRun:
        """Check the job folder (refused before anything starts, with the reason) and start simulating it."""
        return simulate(folder, self.options)


def simulate(folder: str | Path, options: SimOptions) -> SimRun:
    """Start simulating the job folder; the job is checked first (ConfigError or JobSpecError say why not)."""
    from fedgrid.sim import checks
    from fedgrid.sim.driver import Simulation

    simulation = Simulation(checks.plan(Path(folder), options), options)
    simulation.start()
    return SimRun(simulation)


def _he_params(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str | Path):
        return load_he_params(Path(value))
    if isinstance(value, dict):
        from fedgrid.he.params import HEParams

        return HEParams.from_dict(value)
    return value
