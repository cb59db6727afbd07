"""The job folder: what a researcher submits, validated the same way by the admin tool, the server and
every site.

```
<job>/
  meta.json                 {"name", "min_clients", "deploy_map": {<app>: ["@ALL"] | ["server", "site-1", ...]},
                             "resource_spec": {<site or "@ALL">: {"num_cpus": number, "memory_gb": number}}}
  <app>/config/server.json  the server's rounds and strategy (fedgrid/strategy_config.py; in the app deployed to
                            "server")
  <app>/config/client.json  {"script": "train.py" | "module:pkg.mod", "args": [...]} (in apps deployed to sites)
  <app>/config/initial_model.safetensors   the starting global model (server app)
  <app>/custom/...          the job's own code, run at the sites (never imported by the server)
```

Each JSON file is a pydantic model (fedgrid.validation); every file a configuration names must be a
regular file inside its app's folder, reached without links, and the initial model must be a
safetensors file fedgrid can use, so that a job is refused when it is submitted, not when it runs.

A job travels as a zip of that folder plus a manifest of every file's SHA-256, signed with the
submitting admin's private key. The server and each site check that signature against the admin's
certificate (issued by the project's root CA) and every file against the manifest before they store
or run anything, so nobody on the way, the server included, can change a job's code unnoticed.

One module, over 400 lines, because this is the one contract the admin tool, the server and every site
read a job by: its schema, the checks on its files, and how it is packed and signed.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import stat
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, BinaryIO, Literal, TypeVar

from pydantic import Field, ValidationError, model_validator

from fedgrid import tensors
from fedgrid.errors import JobSpecError, PayloadError
from fedgrid.privacy_config import SECURE_AGGREGATIONS, SecAggConfig, check_privacy, parse_privacy, parse_secagg
from fedgrid.strategy_config import FedAvgConfig, from_server_json
from fedgrid.validation import Schema, accepts, one_line

META_FILE = "meta.json"
SERVER_CONFIG = "config/server.json"
CLIENT_CONFIG = "config/client.json"
INITIAL_MODEL = "initial_model.safetensors"
ALL = "@ALL"
SERVER = "server"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MODULE_RE = re.compile(r"module:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
WORKFLOWS = ("fedavg",)
AGGREGATIONS = ("weighted_mean",)
ENCRYPTIONS = ("none", "ckks")
TRACKERS = ("mlflow", "tensorboard")

Name = Annotated[
    str, accepts(NAME_RE.fullmatch, "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
]


class TargetMetric(Schema):
    """Stop early once the global `name` reaches `value` ("max": at least, "min": at most)."""

    name: str
    value: float = Field(ge=-1e12, le=1e12)
    mode: Literal["max", "min"] = "max"

    def reached(self, metrics: dict[str, float]) -> bool:
        if self.name not in metrics:
            return False
        got = metrics[self.name]
        return got >= self.value if self.mode == "max" else got <= self.value


class Tracking(Schema):
    type: Literal[TRACKERS]  # type: ignore[valid-type]
    tracking_uri: str = ""
    experiment_name: str = ""


class ServerConfig(Schema):
    """<app>/config/server.json."""

    num_rounds: int = Field(ge=1, le=100_000)
    min_clients: int = Field(ge=1, le=100_000)
    workflow: Literal[WORKFLOWS] = "fedavg"  # type: ignore[valid-type]
    aggregation: Literal[AGGREGATIONS] = "weighted_mean"  # type: ignore[valid-type]
    client_fraction: float = Field(1.0, gt=0, le=1)
    min_responses: int = Field(0, ge=0, le=100_000)
    """Updates needed to close a round after `round_timeout`; 0 means every site asked."""
    round_timeout: float = Field(0.0, ge=0, le=7 * 86400)
    """Seconds to wait for updates before aggregating what came; 0 waits for every site asked."""
    target_metric: TargetMetric | None = None
    key_metric: str = "accuracy"
    key_metric_mode: Literal["max", "min"] = "max"
    encryption: Literal[ENCRYPTIONS] = "none"  # type: ignore[valid-type]
    seed: int = Field(0, ge=0, le=2**31 - 1)
    resume: bool = True
    """Resume from the last checkpoint when the server restarts under the job (unless the server's operator
    turned that off); false ends the job instead."""
    initial_model: str = INITIAL_MODEL
    """A safetensors file in <app>/config/."""
    tracking: tuple[Tracking, ...] = Field((), strict=False)
    release_site: str = ""
    """HE: the site that uploads the decrypted final model (default: the first site of the job)."""
    server_lr: float = Field(1.0, gt=0, le=100)
    """Older job folders' FedAvgM (read into `strategy`): global += server_lr * velocity."""
    server_momentum: float = Field(0.0, ge=0, le=0.999)
    clip_norm: float = Field(0.0, ge=0, le=1e9)
    """Clip each site's update (its difference to the global model) to this L2 norm on the server; 0 = off."""
    strategy: Any = Field(default_factory=FedAvgConfig)
    """What varies per algorithm: FedAvg, FedProx, FedOpt, SCAFFOLD or an installed module: a
    `StrategyConfig` once `parse_server_config` has checked it (fedgrid/strategy_config.py)."""
    evaluator: str = ""
    """module:<installed module> evaluating each new global model at the server; "" = none."""
    privacy: Any = None
    """Differential privacy: a `fedgrid.dp.DPParams` once parsed (fedgrid/privacy_config.py); None = off."""
    secure_aggregation: Literal[SECURE_AGGREGATIONS] = "none"  # type: ignore[valid-type]
    """"secagg+": the sites mask their updates and the server learns only their sum."""
    secagg: Any = None
    """SecAgg+ parameters: a `fedgrid.privacy_config.SecAggConfig` once parsed (its defaults when left out)."""
    key_site: str = ""
    """HE with keys made at the sites: the site that makes the job's key (default: the first site of the job)."""

    @model_validator(mode="after")
    def _consistent(self) -> ServerConfig:
        if self.min_responses > self.min_clients:
            raise ValueError(f"min_responses ({self.min_responses}) is above min_clients ({self.min_clients})")
        return self

    @property
    def needs_plaintext(self) -> list[str]:
        """The settings that make the server compute on the updates' values (impossible under HE)."""
        found = []
        if getattr(self.strategy, "needs_plaintext", ""):
            found.append(self.strategy.needs_plaintext)
        if self.clip_norm > 0:
            found.append(f"clipping on the server (clip_norm {self.clip_norm})")
        if self.aggregation != "weighted_mean":
            found.append(f"aggregation {self.aggregation!r}")
        return found


def _script_form(script: str) -> bool:
    return bool(script) and (not script.startswith("module:") or MODULE_RE.fullmatch(script) is not None)


class ClientConfig(Schema):
    """<app>/config/client.json."""

    script: Annotated[str, accepts(_script_form, "a file in custom/ or module:<python module>")]
    args: tuple[str, ...] = Field((), strict=False)

    @property
    def is_module(self) -> bool:
        return self.script.startswith("module:")


class Resources(Schema):
    num_cpus: float = Field(0.0, ge=0, le=1e6)
    memory_gb: float = Field(0.0, ge=0, le=1e6)


class JobMeta(Schema):
    """meta.json."""

    name: Name
    min_clients: int | None = Field(None, ge=1, le=100_000)
    """The server config's min_clients when left out."""
    deploy_map: dict[Name, Annotated[tuple[str, ...], Field(min_length=1)]] = Field(min_length=1)
    resource_spec: dict[str, Resources] = Field(default_factory=dict)


@dataclass(frozen=True)
class JobSpec:
    name: str
    min_clients: int
    deploy_map: dict[str, tuple[str, ...]]
    server_app: str
    server: ServerConfig
    clients: dict[str, ClientConfig]
    """Client config of each app deployed to sites."""
    resource_spec: dict[str, dict[str, float]] = field(default_factory=dict)
    """What the job asks of each site (or "@ALL"): only the keys meta.json gives."""

    def app_for_site(self, site: str) -> str | None:
        for app, targets in self.deploy_map.items():
            if app in self.clients and (site in targets or ALL in targets):
                return app
        return None

    def needs(self, site: str) -> dict[str, float]:
        """What the job asks of `site`: its own resource_spec entry over the one for @ALL."""
        return {**self.resource_spec.get(ALL, {}), **self.resource_spec.get(site, {})}

    def named_sites(self) -> set[str]:
        return {t for targets in self.deploy_map.values() for t in targets if t not in (ALL, SERVER)}

    @property
    def all_sites(self) -> bool:
        return any(ALL in targets for app, targets in self.deploy_map.items() if app in self.clients)

    @property
    def has_custom_code(self) -> bool:
        return any(not c.is_module for c in self.clients.values())


S = TypeVar("S", bound=Schema)


def _job_file(folder: Path, base: str, name: str, setting: str | None = None) -> Path:
    """The regular file `base/name` of the job, reached through real folders with no link on the way.

    `setting` is what names the file ("app/config/client.json: script"): it is then a path the job's
    author wrote, which must stay inside `base`. Errors name the setting, or the file itself.
    """
    rel = PurePosixPath(name)
    if setting is not None and (not name or "\\" in name or rel.is_absolute() or ".." in rel.parts):
        raise JobSpecError(f"{setting} must be a relative path inside {base}/ without '..', got {name!r}")
    said = f"{setting} {name!r}: " if setting is not None else ""
    parts = (*PurePosixPath(base).parts, *rel.parts)
    path = folder
    for index, part in enumerate(parts):
        path = path / part
        here = "/".join(parts[: index + 1])
        if path.is_symlink():
            raise JobSpecError(f"{said}{here} is a link; a job folder holds only regular files and folders")
        if index < len(parts) - 1 and path.exists() and not path.is_dir():
            raise JobSpecError(f"{said}{here} is a file, where the job layout needs a folder")
    if path.is_file():
        return path
    if setting is not None:
        raise JobSpecError(f"{setting} {name!r} is not a file in {base}/")
    if path.exists():
        raise JobSpecError(f"{here}: is a folder, where the job layout needs a file")
    raise JobSpecError(f"{here}: missing from the job folder")


def _read(folder: Path, rel: str, model: type[S]) -> S:
    """Read and validate one JSON file of the job; JobSpecError names the file and the field."""
    base, _, name = rel.rpartition("/")
    path = _job_file(folder, base, name)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise JobSpecError(f"{rel}: cannot read it ({exc.strerror or exc})") from None
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise JobSpecError(f"{rel}: {one_line(exc, model)}") from None


def _validated(model: type[S], data: Any, where: str) -> S:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise JobSpecError(f"{where}: {one_line(exc, model)}") from None


def parse_server_config(data: dict[str, Any], where: str) -> ServerConfig:
    """Validate a server config given as a dict (as read from JSON); JobSpecError names `where`."""
    return _with_strategy(_validated(ServerConfig, data, where), data, where)


def _with_strategy(config: ServerConfig, data: dict[str, Any], where: str) -> ServerConfig:
    """`config` with its strategy and evaluator checked (fedgrid/strategy_config.py), and the settings
    that need plaintext refused under encryption."""
    strategy, evaluator = from_server_json(data, where)
    privacy = parse_privacy(data["privacy"], config.client_fraction, where) if data.get("privacy") is not None else None
    secure = config.secure_aggregation
    secagg_config = parse_secagg(data["secagg"], where) if data.get("secagg") is not None else None
    check_privacy(
        privacy=privacy,
        secure=secure,
        secagg_config=secagg_config,
        strategy=strategy,
        encrypted=config.encryption != "none",
        clip_norm=config.clip_norm,
        min_clients=config.min_clients,
        where=where,
    )
    if secure != "none" and secagg_config is None:
        secagg_config = SecAggConfig()
    config = config.model_copy(
        update={"strategy": strategy, "evaluator": evaluator, "privacy": privacy, "secagg": secagg_config}
    )
    if config.encryption != "none" and config.needs_plaintext:
        needs = " and ".join(config.needs_plaintext)
        raise JobSpecError(
            f"{where}: encryption {config.encryption!r} cannot be combined with {needs}: the server only adds "
            "ciphertexts and never sees the values; remove those settings or the encryption"
        )
    return config


def parse_client_config(data: dict[str, Any], where: str) -> ClientConfig:
    """Validate a client config given as a dict (as read from JSON); JobSpecError names `where`."""
    return _validated(ClientConfig, data, where)


def _check_initial_model(folder: Path, app: str, server: ServerConfig) -> None:
    rel = f"{app}/{SERVER_CONFIG}"
    path = _job_file(folder, f"{app}/config", server.initial_model, f"{rel}: initial_model")
    try:
        tensors.check_file(path, f"{app}/config/{server.initial_model}")
    except PayloadError as exc:
        raise JobSpecError(f"{exc}; initial_model in {rel} must name a safetensors file of the model") from None


def load_job(folder: Path, *, known_sites: set[str] | None = None) -> JobSpec:
    """Read and validate a job folder; JobSpecError names the file and field at fault.

    `known_sites`, when given, are the sites of the project: a deploy map naming another is refused.
    The initial model is checked tensor by tensor (fedgrid.tensors.check_file).
    """
    if not folder.is_dir():
        raise JobSpecError(f"{folder}: not a folder")
    meta = _read(folder, META_FILE, JobMeta)
    for app, targets in meta.deploy_map.items():
        if (folder / app).is_symlink() or not (folder / app).is_dir():
            raise JobSpecError(f"{META_FILE}: deploy_map names app {app!r}, which is not a folder of the job")
        for target in targets:
            if target in (ALL, SERVER):
                continue
            if known_sites is not None and target not in known_sites:
                raise JobSpecError(
                    f"{META_FILE}: deploy_map[{app!r}] names unknown site {target!r}; "
                    f"known sites: {', '.join(sorted(known_sites)) or 'none'}"
                )
    deploy_map = dict(meta.deploy_map)
    server_apps = [app for app, targets in deploy_map.items() if SERVER in targets or ALL in targets]
    if len(server_apps) != 1:
        raise JobSpecError(f'{META_FILE}: deploy_map must send exactly one app to the server ("server" or "@ALL")')
    server_app = server_apps[0]
    rel = f"{server_app}/{SERVER_CONFIG}"
    server = _read(folder, rel, ServerConfig)
    raw = json.loads(_job_file(folder, f"{server_app}/config", "server.json").read_bytes())
    server = _with_strategy(server, raw, rel)
    _check_initial_model(folder, server_app, server)
    clients: dict[str, ClientConfig] = {}
    for app, targets in deploy_map.items():
        if targets == (SERVER,):
            continue
        rel = f"{app}/{CLIENT_CONFIG}"
        client = _read(folder, rel, ClientConfig)
        if not client.is_module:
            _job_file(folder, f"{app}/custom", client.script, f"{rel}: script")
        clients[app] = client
    if not clients:
        raise JobSpecError(f"{META_FILE}: deploy_map sends no app to any site")
    min_clients = meta.min_clients if meta.min_clients is not None else server.min_clients
    spec = JobSpec(
        name=meta.name,
        min_clients=min_clients,
        deploy_map=deploy_map,
        server_app=server_app,
        server=server,
        clients=clients,
        resource_spec={target: needs.model_dump(exclude_unset=True) for target, needs in meta.resource_spec.items()},
    )
    named = spec.named_sites()
    if not spec.all_sites and len(named) < min_clients:
        raise JobSpecError(
            f"{META_FILE}: min_clients is {min_clients} but the deploy map names only {len(named)} sites"
        )
    return spec


def job_files(folder: Path) -> list[Path]:
    """Every file of a job folder, refusing links and anything that is not a regular file."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise JobSpecError(f"{rel}: links are not allowed in a job folder")
        if path.is_dir():
            continue
        if not path.is_file():
            raise JobSpecError(f"{rel}: not a regular file")
        if "__pycache__" in path.parts:
            continue
        files.append(path)
    return files


def pack(folder: Path) -> bytes:
    """Zip a job folder (sorted, fixed timestamps) for upload."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in job_files(folder):
            info = zipfile.ZipInfo(path.relative_to(folder).as_posix(), date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


def safe_extract(data: bytes | Path | BinaryIO, dest: Path, *, max_bytes: int, max_files: int) -> None:
    """Unpack an uploaded job zip (its bytes, a file holding it, or an open binary file) into `dest`,
    refusing anything that could escape or explode.

    Refused: absolute paths, '..', links or device entries, duplicate names, a name that is both a
    file and a folder ("a" and "a/b"), more than `max_files` entries, more than `max_bytes` once
    unpacked (checked while unpacking, not trusted from headers).
    """
    source = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as exc:
        raise JobSpecError(f"job upload: not a valid zip archive ({exc})") from exc
    except OSError as exc:
        raise JobSpecError(f"job upload: cannot read it ({exc.strerror or exc})") from exc
    with archive:
        members = archive.infolist()
        if len(members) > max_files:
            raise JobSpecError(f"job upload: {len(members)} files, more than the allowed {max_files}")
        seen: set[str] = set()
        folders: set[str] = set()
        files: set[str] = set()
        for info in members:
            name = info.filename
            path = PurePosixPath(name)
            if name.startswith("/") or "\\" in name or path.is_absolute() or ".." in path.parts or not path.parts:
                raise JobSpecError(f"job upload: path {name!r} escapes the job folder")
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise JobSpecError(f"job upload: {name!r} is a link or special file; only regular files are allowed")
            key = path.as_posix()
            if key in seen:
                raise JobSpecError(f"job upload: {name!r} appears twice")
            seen.add(key)
            (folders if info.is_dir() else files).add(key)
            folders.update(parent.as_posix() for parent in path.parents if parent.parts)
        both = sorted(files & folders)
        if both:
            raise JobSpecError(f"job upload: {both[0]!r} is both a file and a folder")
        total = 0
        for info in members:
            path = PurePosixPath(info.filename)
            if info.is_dir():
                continue
            target = dest / path
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        total += len(chunk)
                        if total > max_bytes:
                            raise JobSpecError(
                                f"job upload: more than the allowed {max_bytes / 1e6:.0f} MB once unpacked"
                            )
                        out.write(chunk)
            except OSError as exc:
                raise JobSpecError(f"job upload: cannot unpack {info.filename!r} ({exc.strerror or exc})") from None
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
                # a corrupt, truncated, encrypted or exotically compressed entry, or offsets outside the file
                raise JobSpecError(f"job upload: cannot unpack {info.filename!r} ({exc})") from None


def sign_job(folder: Path, private_key: Any, signer: str) -> bytes:
    """The signed manifest of exactly the files `pack` puts in the upload."""
    from fedgrid import signing

    files = {}
    for path in job_files(folder):
        with path.open("rb") as fh:
            files[path.relative_to(folder).as_posix()] = hashlib.file_digest(fh, "sha256").hexdigest()
    return signing.canonical_json(signing.sign_manifest(files, private_key, signer))


def verify_signature(job_dir: Path, signed_manifest: bytes, cert: Any, signer: str) -> None:
    """Check the submitter's signature over every file of an unpacked job.

    TamperedError names the file that differs; the caller checks separately that `cert` was issued
    by the project's root CA (the server knows it from TLS, a site checks it itself).
    """
    from fedgrid import signing
    from fedgrid.certs import public_key_of
    from fedgrid.errors import TamperedError

    try:
        signed = json.loads(signed_manifest)
    except json.JSONDecodeError as exc:
        raise TamperedError(f"job signature: not valid JSON ({exc})") from exc
    actual = signed.get("signer") if isinstance(signed, dict) else None
    if actual != signer:
        raise TamperedError(f"job signature: signed by {actual!r}, not by the submitter {signer!r}")
    signing.verify_manifest(job_dir, signed, public_key_of(cert), exclude=(), label="job")
