"""Settings a participant may change in its kit's `local/` folder.

`startup/` is signed by the project administrator and must not change; `local/` belongs to whoever
runs the kit (a hospital's IT team, say) and holds what they decide: how long a silent site stays
listed as alive, whether jobs may bring their own code, how many threads torch may use.
Provisioning writes the defaults below; the daemons read them once at start.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import Field, ValidationError, ValidationInfo, model_validator

from fedgrid.errors import ConfigError
from fedgrid.validation import Schema, accepts, drop_retired, one_line

log = logging.getLogger(__name__)

SERVER_SETTINGS_FILE = "server.json"
SITE_SETTINGS_FILE = "site.json"
ADMIN_SETTINGS_FILE = "admin.json"


class Settings(Schema):
    """A settings file: every key optional, unknown keys refused, `retired` keys accepted and ignored."""

    retired: ClassVar[dict[str, str]] = {}
    """Keys fedgrid no longer reads -> why, for the one line that says they are ignored."""

    @model_validator(mode="before")
    @classmethod
    def _drop_retired(cls, data: Any, info: ValidationInfo) -> Any:
        return drop_retired(data, info, *cls.retired)


_NO_LANE = "job workers use the federation port (fed_port) alone"


def _is_ip_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


MetricsPort = Annotated[int, Field(ge=0, le=65535)]
"""TCP port of a daemon's Prometheus endpoint (`/metrics`); 0 = no endpoint."""
BindAddress = Annotated[
    str, accepts(_is_ip_address, "an IP address of this machine (0.0.0.0 or :: for every interface)")
]


class ServerSettings(Settings):
    """The server operator's choices (`local/server.json` of the server kit)."""

    retired: ClassVar[dict[str, str]] = {"data_lane": _NO_LANE}

    heartbeat_timeout: float = Field(10.0, ge=0)
    """Seconds without a heartbeat after which a site is shown dead and no longer scheduled."""
    max_upload_mb: float = Field(100.0, ge=0)
    """Largest job upload accepted, in MB (the packed job folder)."""
    max_job_files: int = Field(1000, ge=0)
    max_concurrent_jobs: int = Field(4, ge=0)
    keep_uploads: bool = False
    """Audit: keep every update the server received (as it arrived) in the job folder's uploads/."""
    tracking_uri: str = ""
    """Default MLflow tracking URI for jobs that ask for MLflow without one; empty = SQLite store in the workspace."""
    tracking_uris: tuple[str, ...] = Field((), strict=False)
    """Tracking URIs a job may name; empty = none: jobs' metrics go to the server's own store (`tracking_uri`)."""
    stream_idle_timeout: float = Field(120.0, gt=0)
    """Seconds the server waits for the next message on a stream (a job worker's, a job upload) before it
    closes it; job workers ping well within it while they train."""
    max_streams_per_identity: int = Field(32, ge=1)
    """Long-lived streams (job workers, command streams, job watches) one participant may hold at once."""
    resume_jobs: bool = True
    """Jobs running when the server stopped (or crashed) resume from their last checkpoint when it starts
    again (a job may say `"resume": false`); false ends them instead, aborted or failed."""
    metrics_port: MetricsPort = 0
    """Port of the server's Prometheus endpoint (/metrics, fedserver/metrics.py); 0 = none."""
    metrics_address: BindAddress = "127.0.0.1"
    """Address the metrics endpoint listens on: loopback unless the operator opens it to a Prometheus elsewhere."""
    data_root: str = ""
    """The server operator's own data (a held-out set), for server-side evaluators a job names; never a job's."""


class SiteSettings(Settings):
    """A site operator's choices (`local/site.json` of a site kit)."""

    retired: ClassVar[dict[str, str]] = {"data_lane": _NO_LANE}

    allow_custom_code: bool = True
    """False refuses every job that brings its own code; only scripts installed at the site may run."""
    heartbeat_interval: float = Field(2.0, ge=0)
    torch_threads: int = Field(0, ge=0)
    """Threads per job worker; 0 = cores divided by the workers running on this machine."""
    max_concurrent_jobs: int = Field(2, ge=0)
    num_cpus: int = Field(0, ge=0)
    """CPUs this site offers to jobs, matched against their resource_spec; 0 = every core of the machine."""
    memory_gb: float = Field(0.0, ge=0)
    """Memory this site offers to jobs, in GB; 0 = all of the machine's memory."""
    prestart_worker: bool = True
    """Keep one job worker started ahead (torch imported), so that a job's first round starts sooner."""
    worker_nice: int = Field(5, ge=0, le=19)
    """Niceness of job workers (0-19): training yields the CPU to the site daemon, a server on the same
    machine and the machine's other work; 0 runs it at the daemon's priority."""
    share_job_logs: bool = True
    """Send each job's log to the server at the job's end, so it is in the job's result folder."""
    data_root: str = ""
    """Where this site's data lives; handed to training scripts as `fedclient.api.get_site_config()`."""
    metrics_port: MetricsPort = 0
    """Port of the site daemon's Prometheus endpoint (/metrics, fedclient/metrics.py); 0 = none."""
    metrics_address: BindAddress = "127.0.0.1"
    """Address the metrics endpoint listens on: loopback unless the operator opens it to a Prometheus elsewhere."""


class AdminSettings(Settings):
    """An admin's choices (`local/admin.json` of an admin kit)."""

    download_dir: str = "transfer"
    """Where `download_job` writes results, relative to the kit folder unless absolute."""


T = TypeVar("T", bound=Settings)


def settings_to_dict(settings: Settings) -> dict[str, Any]:
    """Plain dict for writing a settings file (JSON types: lists, not tuples)."""
    return settings.model_dump(mode="json")


def load_settings(cls: type[T], path: Path) -> T:
    """Read one settings file strictly: unknown keys and wrong types are errors naming the file.

    A missing file means "all defaults", so an operator may delete what they do not want to change.
    """
    if not path.exists():
        return cls()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    retired: list[str] = []
    try:
        settings = cls.model_validate_json(data, context={"retired": retired})
    except ValidationError as exc:
        raise ConfigError(f"{path}: {one_line(exc, cls)}; fix it or delete it to use the defaults") from None
    for key in dict.fromkeys(retired):
        log.warning("%s: setting %r is no longer used and is ignored (%s); delete it", path, key, cls.retired[key])
    return settings
