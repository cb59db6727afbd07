"""The simulator's options, and what it refuses before round 1: every problem one line that says what to change.

A job is refused when its deploy map names sites beyond the simulated ones (site-1 .. site-N, the names
`fedgrid data` gives), when a site has no data folder, when it is encrypted and no CKKS parameters were
given, when it asks for SecAgg+ (its keys are signed with the sites' certificates), when stragglers could
never let a round close, or when its sites run apps with different scripts
(a worker host runs one app for all its sites).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedgrid.errors import ConfigError, JobSpecError, ProjectFileError
from fedgrid.jobspec import META_FILE, SERVER_CONFIG, JobSpec, load_job, pack

DATA_ROOT_ARG = "--data_root"


@dataclass(frozen=True)
class SimOptions:
    """How to simulate a job: `num_clients` virtual sites in `workers` host processes (0: one per core)."""

    num_clients: int
    workers: int = 0
    stragglers: float = 0.0
    """The chance that a site chosen to train does not answer that round (drawn from the job's seed)."""
    ray_address: str = ""
    """"" runs the hosts as local processes; "local" starts Ray here; else a Ray cluster's address."""
    data_root: Path | None = None
    """The folder with one data folder per site (default: the job's own --data_root argument, if any)."""
    results: Path = Path("sim_results")
    """Where each simulated job's result folder is written (and MLflow's store for jobs that track)."""
    he_params: Any = None
    """CKKS parameters (fedgrid.he.HEParams) for encrypted jobs: a context is generated from them."""

    def __post_init__(self) -> None:
        if not isinstance(self.num_clients, int) or self.num_clients < 1:
            raise ConfigError(f"-n/num_clients must be at least 1, got {self.num_clients!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ConfigError(f"--workers must be 0 (one per core) or more, got {self.workers!r}")
        if not 0.0 <= self.stragglers < 1.0:
            raise ConfigError(
                f"--stragglers is the chance a chosen site does not answer, from 0 to below 1, got {self.stragglers}"
            )


@dataclass(frozen=True)
class SimPlan:
    """A job the simulator can run, and how."""

    folder: Path
    package: bytes
    """The job folder as a zip (fedgrid.jobspec.pack), as it was when checked: what the sites unpack."""
    spec: JobSpec
    sites: list[str]
    app: str
    data_root: Path | None
    workers: int
    threads: int
    """torch threads per host: the host's share of this machine's cores."""


def site_names(n: int) -> list[str]:
    return [f"site-{i}" for i in range(1, n + 1)]


def plan(folder: Path, options: SimOptions) -> SimPlan:
    """Check the job folder against the options; ConfigError or JobSpecError saying what to change."""
    spec = load_job(folder)
    n = options.num_clients
    names = site_names(n)
    beyond = sorted(spec.named_sites() - set(names), key=_natural)
    if beyond:
        raise JobSpecError(
            f"{META_FILE}: deploy_map names {', '.join(beyond)}, beyond the {n} simulated sites "
            f"(site-1 .. site-{n}); raise -n or name sites within it"
        )
    sites = names if spec.all_sites else sorted(spec.named_sites(), key=_natural)
    if len(sites) < spec.min_clients:
        raise JobSpecError(
            f"{META_FILE}: min_clients is {spec.min_clients} but the simulation has {len(sites)} sites for the job; "
            f"raise -n to at least {spec.min_clients} or lower min_clients"
        )
    apps = {spec.app_for_site(site) or "" for site in sites}
    forms = {(spec.clients[app].script, spec.clients[app].args) for app in apps}
    if len(forms) > 1:
        raise JobSpecError(
            f"{META_FILE}: the job sends apps with different scripts or arguments to its sites "
            f"({', '.join(sorted(apps))}); the simulator runs one app for every site: give the sites one app"
        )
    data_root = options.data_root or _data_root_arg(spec, sorted(apps)[0])
    if data_root is not None:
        missing = [site for site in sites if not (data_root / site).is_dir()]
        if missing:
            raise ConfigError(
                f"data folder {data_root / missing[0]} is missing ({len(missing)} of the {len(sites)} sites have "
                f"none); prepare the data for {n} sites (fedgrid data -n {n} --out {data_root}) "
                "or point --data_root at the folder that has them"
            )
    _check_server(spec, sites, options)
    if options.ray_address:
        from fedgrid.sim.pool import check_ray

        check_ray()
    cores = os.cpu_count() or 1
    workers = min(options.workers or cores, len(sites))
    package = pack(folder)
    return SimPlan(folder, package, spec, sites, sorted(apps)[0], data_root, workers, max(1, cores // workers))


def _check_server(spec: JobSpec, sites: list[str], options: SimOptions) -> None:
    server = spec.server
    where = f"{spec.server_app}/{SERVER_CONFIG}"
    if server.secure_aggregation != "none":
        raise JobSpecError(
            f"{where}: secure_aggregation {server.secure_aggregation!r} signs each site's keys with its kit's "
            "certificate, which virtual sites do not have; simulate the job without it (differential privacy "
            "and encryption do simulate) and run SecAgg+ on a provisioned federation"
        )
    if server.encryption != "none" and options.he_params is None:
        raise ConfigError(
            f"{where}: the job is encrypted (encryption {server.encryption!r}) and no CKKS parameters were given; "
            "give them with --he FILE (a project.yml, or a file holding its he: section) or SimEnv(he_params=...)"
        )
    if server.encryption != "none" and server.release_site and server.release_site not in sites:
        raise JobSpecError(f"{where}: release_site {server.release_site!r} is not one of the job's simulated sites")
    if options.stragglers > 0:
        if server.round_timeout <= 0:
            raise JobSpecError(
                f"{where}: round_timeout is 0 (wait for every site), so a straggler would hold its round forever; "
                "set round_timeout (seconds) to simulate stragglers"
            )
        chosen = min(len(sites), max(server.min_clients, round(server.client_fraction * len(sites))))
        need = min(server.min_responses or server.min_clients, chosen)
        if need >= chosen:
            raise JobSpecError(
                f"{where}: a round closes only once {need} of its {chosen} chosen sites answered "
                f"(min_responses {server.min_responses or 'unset: min_clients'}), so one straggler fails it; "
                f"set min_responses below {chosen}"
            )


def _data_root_arg(spec: JobSpec, app: str) -> Path | None:
    """The job's own --data_root argument (fedgrid's example scripts take one), if it has one."""
    args = list(spec.clients[app].args)
    for index, arg in enumerate(args):
        if arg == DATA_ROOT_ARG and index + 1 < len(args):
            return Path(args[index + 1])
        if arg.startswith(DATA_ROOT_ARG + "="):
            return Path(arg.split("=", 1)[1])
    return None


def load_he_params(path: Path) -> Any:
    """CKKS parameters from a project.yml (its he: section) or from a YAML/JSON file of that section alone."""
    from fedgrid.he.params import HEParams

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--he {path}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--he {path}: not YAML ({exc})") from None
    section = data.get("he", data) if isinstance(data, dict) else data
    if isinstance(section, dict):
        # Who makes the keys (he.keys) is a deployment's choice: the simulator generates one context per job.
        section = {key: value for key, value in section.items() if key != "keys"}
    try:
        return HEParams.from_dict(section or {}, where=f"{path}: he")
    except ProjectFileError as exc:
        raise ConfigError(str(exc)) from None


def _natural(name: str) -> tuple[str, int]:
    match = re.fullmatch(r"(.*?)(\d+)", name)
    return (match.group(1), int(match.group(2))) if match else (name, -1)
