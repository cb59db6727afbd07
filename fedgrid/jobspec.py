"""The job folder: what a researcher submits, validated the same way by the admin tool, the server and
every site.

```
<job>/
  meta.json                 {"name", "min_clients", "deploy_map": {<app>: ["@ALL"] | ["server", "site-1", ...]},
                             "resource_spec": {<site or "@ALL">: {"num_cpus": int, "memory_gb": number}}}
  <app>/config/server.json  the server's rounds and strategy (fedgrid/strategy_config.py; in the app deployed to
                            "server")
  <app>/config/client.json  {"script": "train.py" | "module:pkg.mod", "args": [...]} (in apps deployed to sites)
  <app>/config/initial_model.safetensors   the starting global model (server app)
  <app>/custom/...          the job's own code, run at the sites (never imported by the server)
```

A job travels as a zip of that folder plus a manifest of every file's SHA-256, signed with the
submitting admin's private key. The server and each site check that signature against the admin's
certificate (issued by the project's root CA) and every file against the manifest before they store
or run anything, so nobody on the way, the server included, can change a job's code unnoticed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from fedgrid.errors import JobSpecError
from fedgrid.strategy_config import FedAvgConfig, StrategyConfig, from_server_json

META_FILE = "meta.json"
SERVER_CONFIG = "config/server.json"
CLIENT_CONFIG = "config/client.json"
INITIAL_MODEL = "initial_model.safetensors"
ALL = "@ALL"
SERVER = "server"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
WORKFLOWS = ("fedavg",)
"""`workflow` is the round loop, the only one: older job folders name it; what varies is the `strategy`."""
AGGREGATIONS = ("weighted_mean",)
ENCRYPTIONS = ("none", "ckks")
TRACKERS = ("mlflow", "tensorboard")


@dataclass(frozen=True)
class TargetMetric:
    """Stop early once the global `name` reaches `value` ("max": at least, "min": at most)."""

    name: str
    value: float
    mode: str = "max"

    def reached(self, metrics: dict[str, float]) -> bool:
        if self.name not in metrics:
            return False
        got = metrics[self.name]
        return got >= self.value if self.mode == "max" else got <= self.value


@dataclass(frozen=True)
class Tracking:
    type: str
    tracking_uri: str = ""
    experiment_name: str = ""


@dataclass(frozen=True)
class ServerConfig:
    num_rounds: int
    min_clients: int
    workflow: str = "fedavg"
    aggregation: str = "weighted_mean"
    client_fraction: float = 1.0
    min_responses: int = 0
    """Updates needed to close a round after `round_timeout`; 0 means every site asked."""
    round_timeout: float = 0.0
    """Seconds to wait for updates before aggregating what came; 0 waits for every site asked."""
    target_metric: TargetMetric | None = None
    key_metric: str = "accuracy"
    key_metric_mode: str = "max"
    encryption: str = "none"
    seed: int = 0
    initial_model: str = INITIAL_MODEL
    tracking: tuple[Tracking, ...] = ()
    release_site: str = ""
    """HE: the site that uploads the decrypted final model (default: the first site of the job)."""
    server_lr: float = 1.0
    """Older job folders' FedAvgM (read into `strategy`): global += server_lr * velocity."""
    server_momentum: float = 0.0
    clip_norm: float = 0.0
    """Clip each site's update (its difference to the global model) to this L2 norm on the server; 0 = off."""
    strategy: StrategyConfig = FedAvgConfig()
    """What varies per algorithm: FedAvg, FedProx, FedOpt, SCAFFOLD or an installed module."""
    evaluator: str = ""
    """module:<installed module> evaluating each new global model at the server; "" = none."""

    @property
    def needs_plaintext(self) -> list[str]:
        """The settings that make the server compute on the updates' values (impossible under HE)."""
        found = []
        if self.strategy.needs_plaintext:
            found.append(self.strategy.needs_plaintext)
        if self.clip_norm > 0:
            found.append(f"clipping on the server (clip_norm {self.clip_norm})")
        if self.aggregation != "weighted_mean":
            found.append(f"aggregation {self.aggregation!r}")
        return found


@dataclass(frozen=True)
class ClientConfig:
    script: str
    args: tuple[str, ...] = ()

    @property
    def is_module(self) -> bool:
        return self.script.startswith("module:")


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


def _read_json(folder: Path, rel: str) -> dict[str, Any]:
    path = folder / rel
    if not path.is_file():
        raise JobSpecError(f"{rel}: missing from the job folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JobSpecError(f"{rel}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise JobSpecError(f"{rel}: expected a JSON object")
    return data


def _check_keys(data: dict[str, Any], where: str, required: set[str], optional: set[str]) -> None:
    unknown = sorted(set(data) - required - optional)
    if unknown:
        raise JobSpecError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(required | optional))}")
    missing = sorted(required - set(data))
    if missing:
        raise JobSpecError(f"{where}: missing key {missing[0]!r}")


def _int(data: dict[str, Any], key: str, where: str, low: int, high: int, default: int | None = None) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise JobSpecError(f"{where}: {key} must be an integer in {low}..{high}, got {value!r}")
    return value


def _float(data: dict[str, Any], key: str, where: str, low: float, high: float, default: float) -> float:
    value = data.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise JobSpecError(f"{where}: {key} must be a number in {low}..{high}, got {value!r}")
    return float(value)


def _str(data: dict[str, Any], key: str, where: str, default: str, choices: tuple[str, ...] | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise JobSpecError(f"{where}: {key} must be a string, got {value!r}")
    if choices is not None and value not in choices:
        raise JobSpecError(f"{where}: {key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def parse_server_config(data: dict[str, Any], where: str) -> ServerConfig:
    _check_keys(
        data,
        where,
        {"num_rounds", "min_clients"},
        {
            "workflow",
            "aggregation",
            "client_fraction",
            "min_responses",
            "round_timeout",
            "target_metric",
            "key_metric",
            "key_metric_mode",
            "encryption",
            "seed",
            "initial_model",
            "tracking",
            "release_site",
            "server_lr",
            "server_momentum",
            "clip_norm",
            "strategy",
            "evaluator",
        },
    )
    min_clients = _int(data, "min_clients", where, 1, 100_000)
    target = data.get("target_metric")
    target_metric = None
    if target is not None:
        if not isinstance(target, dict):
            raise JobSpecError(f"{where}: target_metric must be an object {{name, value, mode}}")
        _check_keys(target, f"{where}: target_metric", {"name", "value"}, {"mode"})
        target_metric = TargetMetric(
            name=_str(target, "name", f"{where}: target_metric", ""),
            value=_float(target, "value", f"{where}: target_metric", -1e12, 1e12, 0.0),
            mode=_str(target, "mode", f"{where}: target_metric", "max", ("max", "min")),
        )
    trackers = []
    raw_tracking = data.get("tracking", [])
    if not isinstance(raw_tracking, list):
        raise JobSpecError(f"{where}: tracking must be a list of {{type, tracking_uri, experiment_name}}")
    for i, item in enumerate(raw_tracking):
        w = f"{where}: tracking[{i}]"
        if not isinstance(item, dict):
            raise JobSpecError(f"{w}: expected an object")
        _check_keys(item, w, {"type"}, {"tracking_uri", "experiment_name"})
        trackers.append(
            Tracking(
                type=_str(item, "type", w, "", TRACKERS),
                tracking_uri=_str(item, "tracking_uri", w, ""),
                experiment_name=_str(item, "experiment_name", w, ""),
            )
        )
    config = ServerConfig(
        num_rounds=_int(data, "num_rounds", where, 1, 100_000),
        min_clients=min_clients,
        workflow=_str(data, "workflow", where, "fedavg", WORKFLOWS),
        aggregation=_str(data, "aggregation", where, "weighted_mean", AGGREGATIONS),
        client_fraction=_float(data, "client_fraction", where, 0.0, 1.0, 1.0),
        min_responses=_int(data, "min_responses", where, 0, 100_000, 0),
        round_timeout=_float(data, "round_timeout", where, 0.0, 7 * 86400.0, 0.0),
        target_metric=target_metric,
        key_metric=_str(data, "key_metric", where, "accuracy"),
        key_metric_mode=_str(data, "key_metric_mode", where, "max", ("max", "min")),
        encryption=_str(data, "encryption", where, "none", ENCRYPTIONS),
        seed=_int(data, "seed", where, 0, 2**31 - 1, 0),
        initial_model=_str(data, "initial_model", where, INITIAL_MODEL),
        tracking=tuple(trackers),
        release_site=_str(data, "release_site", where, ""),
        server_lr=_float(data, "server_lr", where, 0.0, 100.0, 1.0),
        server_momentum=_float(data, "server_momentum", where, 0.0, 0.999, 0.0),
        clip_norm=_float(data, "clip_norm", where, 0.0, 1e9, 0.0),
    )
    if config.server_lr <= 0:
        raise JobSpecError(f"{where}: server_lr must be above 0")
    strategy, evaluator = from_server_json(data, where)
    config = dataclasses.replace(config, strategy=strategy, evaluator=evaluator)
    if config.client_fraction <= 0:
        raise JobSpecError(f"{where}: client_fraction must be above 0")
    if config.encryption != "none" and config.needs_plaintext:
        needs = " and ".join(config.needs_plaintext)
        raise JobSpecError(
            f"{where}: encryption {config.encryption!r} cannot be combined with {needs}: the server only adds "
            "ciphertexts and never sees the values; remove those settings or the encryption"
        )
    if config.min_responses > config.min_clients:
        raise JobSpecError(f"{where}: min_responses ({config.min_responses}) is above min_clients ({min_clients})")
    return config


def parse_client_config(data: dict[str, Any], where: str) -> ClientConfig:
    _check_keys(data, where, {"script"}, {"args"})
    script = _str(data, "script", where, "")
    args = data.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise JobSpecError(f"{where}: args must be a list of strings")
    if not script:
        raise JobSpecError(f"{where}: script must name a file in custom/ or module:<python module>")
    return ClientConfig(script=script, args=tuple(args))


def load_job(folder: Path, *, known_sites: set[str] | None = None) -> JobSpec:
    """Read and validate a job folder; JobSpecError names the file and field at fault.

    `known_sites`, when given, are the sites of the project: a deploy map naming another is refused.
    """
    if not folder.is_dir():
        raise JobSpecError(f"{folder}: not a folder")
    meta = _read_json(folder, META_FILE)
    _check_keys(meta, META_FILE, {"name", "deploy_map"}, {"min_clients", "resource_spec"})
    name = _str(meta, "name", META_FILE, "")
    if not NAME_RE.match(name):
        raise JobSpecError(f"{META_FILE}: name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    deploy = meta["deploy_map"]
    if not isinstance(deploy, dict) or not deploy:
        raise JobSpecError(f"{META_FILE}: deploy_map must map app folders to lists of targets")
    deploy_map: dict[str, tuple[str, ...]] = {}
    for app, targets in deploy.items():
        if not isinstance(app, str) or not NAME_RE.match(app) or not (folder / app).is_dir():
            raise JobSpecError(f"{META_FILE}: deploy_map names app {app!r}, which is not a folder of the job")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise JobSpecError(f"{META_FILE}: deploy_map[{app!r}] must be a non-empty list of names")
        for target in targets:
            if target in (ALL, SERVER):
                continue
            if known_sites is not None and target not in known_sites:
                raise JobSpecError(
                    f"{META_FILE}: deploy_map[{app!r}] names unknown site {target!r}; "
                    f"known sites: {', '.join(sorted(known_sites)) or 'none'}"
                )
        deploy_map[app] = tuple(targets)
    server_apps = [app for app, targets in deploy_map.items() if SERVER in targets or ALL in targets]
    if len(server_apps) != 1:
        raise JobSpecError(f'{META_FILE}: deploy_map must send exactly one app to the server ("server" or "@ALL")')
    server_app = server_apps[0]
    server = parse_server_config(_read_json(folder, f"{server_app}/{SERVER_CONFIG}"), f"{server_app}/{SERVER_CONFIG}")
    model = folder / server_app / "config" / server.initial_model
    if not model.is_file():
        raise JobSpecError(f"{server_app}/config/{server.initial_model}: the initial model is missing")
    clients: dict[str, ClientConfig] = {}
    for app, targets in deploy_map.items():
        if targets == (SERVER,):
            continue
        rel = f"{app}/{CLIENT_CONFIG}"
        client = parse_client_config(_read_json(folder, rel), rel)
        if not client.is_module:
            script = PurePosixPath(client.script)
            if script.is_absolute() or ".." in script.parts or not (folder / app / "custom" / script).is_file():
                raise JobSpecError(f"{rel}: script {client.script!r} is not a file in {app}/custom/")
        clients[app] = client
    if not clients:
        raise JobSpecError(f"{META_FILE}: deploy_map sends no app to any site")
    min_clients = _int(meta, "min_clients", META_FILE, 1, 100_000, server.min_clients)
    resources = meta.get("resource_spec", {})
    if not isinstance(resources, dict) or not all(isinstance(v, dict) for v in resources.values()):
        raise JobSpecError(f"{META_FILE}: resource_spec must map sites to {{num_cpus, memory_gb}}")
    for target, spec in resources.items():
        _check_keys(spec, f"{META_FILE}: resource_spec[{target!r}]", set(), {"num_cpus", "memory_gb"})
        for key in spec:
            _float(spec, key, f"{META_FILE}: resource_spec[{target!r}]", 0, 1e6, 0)
    spec = JobSpec(
        name=name,
        min_clients=min_clients,
        deploy_map=deploy_map,
        server_app=server_app,
        server=server,
        clients=clients,
        resource_spec=resources,
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


def safe_extract(data: bytes, dest: Path, *, max_bytes: int, max_files: int) -> None:
    """Unpack an uploaded job zip into `dest`, refusing anything that could escape or explode.

    Refused: absolute paths, '..', links or device entries, duplicate names, more than `max_files`
    entries, more than `max_bytes` once unpacked (checked while unpacking, not trusted from headers).
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise JobSpecError(f"job upload: not a valid zip archive ({exc})") from exc
    with archive:
        members = archive.infolist()
        if len(members) > max_files:
            raise JobSpecError(f"job upload: {len(members)} files, more than the allowed {max_files}")
        seen: set[str] = set()
        total = 0
        for info in members:
            name = info.filename
            path = PurePosixPath(name)
            if name.startswith("/") or "\\" in name or path.is_absolute() or ".." in path.parts or not name:
                raise JobSpecError(f"job upload: path {name!r} escapes the job folder")
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise JobSpecError(f"job upload: {name!r} is a link or special file; only regular files are allowed")
            if name in seen:
                raise JobSpecError(f"job upload: {name!r} appears twice")
            seen.add(name)
            if info.is_dir():
                continue
            target = dest / path
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    total += len(chunk)
                    if total > max_bytes:
                        raise JobSpecError(f"job upload: more than the allowed {max_bytes / 1e6:.0f} MB once unpacked")
                    out.write(chunk)


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
