"""Settings a participant may change in its kit's `local/` folder.

`startup/` is signed by the project administrator and must not change; `local/` belongs to whoever
runs the kit (a hospital's IT team, say) and holds what they decide: how long a silent site stays
listed as alive, whether jobs may bring their own code, how many threads torch may use.
Provisioning writes the defaults below; the daemons read them once at start.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fedgrid.errors import ConfigError

T = TypeVar("T")

SERVER_SETTINGS_FILE = "server.json"
SITE_SETTINGS_FILE = "site.json"
ADMIN_SETTINGS_FILE = "admin.json"


@dataclass(frozen=True)
class ServerSettings:
    """The server operator's choices (`local/server.json` of the server kit)."""

    heartbeat_timeout: float = 10.0
    """Seconds without a heartbeat after which a site is shown dead and no longer scheduled."""
    max_upload_mb: float = 100.0
    """Largest job upload accepted, in MB (the packed job folder)."""
    max_job_files: int = 1000
    max_concurrent_jobs: int = 4
    keep_uploads: bool = False
    """Audit: keep every update the server received (as it arrived) in the job folder's uploads/."""
    tracking_uri: str = ""
    """Default MLflow tracking URI for jobs that ask for MLflow without one; empty = SQLite store in the workspace."""
    data_lane: bool = True
    """Listen on the kit's data port for job workers' models and updates (fedgrid/lane.py); false
    leaves the port closed and every worker on gRPC."""
    stream_idle_timeout: float = 120.0
    """Seconds the server waits for the next message on a stream (a job worker's, a job upload) before it
    closes it; job workers ping well within it while they train."""
    max_streams_per_identity: int = 32
    """Long-lived streams (job workers, command streams, job watches) one participant may hold at once."""
    data_root: str = ""
    """The server operator's own data (a held-out set), for server-side evaluators a job names; never a job's."""


@dataclass(frozen=True)
class SiteSettings:
    """A site operator's choices (`local/site.json` of a site kit)."""

    allow_custom_code: bool = True
    """False refuses every job that brings its own code; only scripts installed at the site may run."""
    heartbeat_interval: float = 2.0
    torch_threads: int = 0
    """Threads per job worker; 0 = cores divided by the workers running on this machine."""
    max_concurrent_jobs: int = 2
    num_cpus: int = 0
    """CPUs this site offers to jobs, matched against their resource_spec; 0 = every core of the machine."""
    memory_gb: float = 0.0
    """Memory this site offers to jobs, in GB; 0 = all of the machine's memory."""
    prestart_worker: bool = True
    """Keep one job worker started ahead (torch imported), so that a job's first round starts sooner."""
    worker_nice: int = dataclasses.field(default=5, metadata={"max": 19})
    """Niceness of job workers (0-19): training yields the CPU to the site daemon, a server on the same
    machine and the machine's other work; 0 runs it at the daemon's priority."""
    share_job_logs: bool = True
    """Send each job's log to the server at the job's end, so it is in the job's result folder."""
    data_root: str = ""
    """Where this site's data lives; handed to training scripts as `fedclient.api.get_site_config()`."""
    data_lane: bool = True
    """Fetch models and send updates over the server's data port (fedgrid/lane.py); false keeps this
    site's workers on the federation port alone (gRPC), e.g. when a firewall lets only that port out."""


@dataclass(frozen=True)
class AdminSettings:
    """An admin's choices (`local/admin.json` of an admin kit)."""

    download_dir: str = "transfer"
    """Where `download_job` writes results, relative to the kit folder unless absolute."""


def settings_to_dict(settings: Any) -> dict[str, Any]:
    """Plain dict for writing a settings file."""
    return dataclasses.asdict(settings)


def load_settings(cls: type[T], path: Path) -> T:
    """Read one settings file strictly: unknown keys and wrong types are errors naming the file.

    A missing file means "all defaults", so an operator may delete what they do not want to change.
    """
    if not path.exists():
        return cls()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); fix it or delete it to use the defaults") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of settings")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(fields))}")
        default = fields[key].default
        expected = type(default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            raise ConfigError(f"{path}: setting {key!r} must be {expected.__name__}, got {value!r}")
        if expected in (int, float) and value < 0:
            raise ConfigError(f"{path}: setting {key!r} must not be negative, got {value!r}")
        if "max" in fields[key].metadata and value > fields[key].metadata["max"]:
            raise ConfigError(f"{path}: setting {key!r} must be at most {fields[key].metadata['max']}, got {value!r}")
        values[key] = value
    return cls(**values)
