"""Startup kits: the folder provisioning gives each participant, loaded and verified in one call.

```
<kit>/
  startup/     signed by the project's root CA; a daemon refuses the kit if anything here changed
    rootCA.pem cert.pem key.pem config.json roster.json [he_context.bin] <scripts> signature.json
  local/       the operator's settings (fedgrid.settings), free to edit
  readme.txt
  workspace/   created by the daemons; log.txt, daemon.pid, daemon.ready beside it
```

`load_kit` checks, in this order, everything a daemon needs to trust before it opens a socket:
the root CA is a valid self-signed CA; `signature.json` verifies with it and every file of
`startup/` matches; the kit's certificate was issued by that CA and has not expired; the identity in
the certificate is the one in `config.json` and in the roster; `key.pem` belongs to `cert.pem`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from cryptography import x509
from pydantic import ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from fedgrid.certs import (
    PARTICIPANT_TYPES,
    Identity,
    identity_from_cert,
    key_matches_cert,
    load_cert_pem,
    load_private_key_pem,
    public_key_of,
    verify_issued_by,
    verify_root_ca,
)
from fedgrid.errors import FedgridError, IdentityError, KitError, TamperedError
from fedgrid.roster import ROSTER_FILE, Roster, load_roster
from fedgrid.signing import SIGNATURE_FILE, PrivateKey, verify_manifest
from fedgrid.validation import Schema, drop_retired, one_line

log = logging.getLogger(__name__)

STARTUP_DIR = "startup"
LOCAL_DIR = "local"
WORKSPACE_DIR = "workspace"
ROOT_CA_FILE = "rootCA.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CONFIG_FILE = "config.json"
HE_CONTEXT_FILE = "he_context.bin"
START_SCRIPT = "start.sh"
STOP_SCRIPT = "stop.sh"
ADMIN_SCRIPT = "fl_admin.sh"
README_FILE = "readme.txt"
LOG_FILE = "log.txt"
PID_FILE = "daemon.pid"
READY_FILE = "daemon.ready"
RETIRED_SERVER_KEYS = ("data_port",)
"""Keys of config.json's `server` that fedgrid no longer reads: kits provisioned with them still load."""

_KIND_WORDS = {"server": "server", "client": "site", "admin": "admin"}


def local_dir(kit_path: Path) -> Path:
    """The operator's settings folder (`<kit>/local`)."""
    return Path(kit_path) / LOCAL_DIR


def workspace_dir(kit_path: Path) -> Path:
    """Where a daemon keeps its state and job folders (`<kit>/workspace`, created by the daemon)."""
    return Path(kit_path) / WORKSPACE_DIR


def log_path(kit_path: Path) -> Path:
    """The daemon's log file, appended to by start.sh."""
    return Path(kit_path) / LOG_FILE


def pid_path(kit_path: Path) -> Path:
    return Path(kit_path) / PID_FILE


def ready_path(kit_path: Path) -> Path:
    """The file a daemon creates once it serves (server) or is registered (site), and removes on exit."""
    return Path(kit_path) / READY_FILE


@dataclass(frozen=True)
class HEConfig:
    """Homomorphic encryption as provisioned: on or off, its parameters, and this kit's context file."""

    enabled: bool
    params: Mapping[str, Any]
    """Everything config.json's "he" holds besides enabled and context (fedgrid.he reads it)."""
    context_path: Path | None
    """startup/he_context.bin: public in the server kit, with the secret key in site kits; None for admins,
    and for every kit when the sites make each job's key."""

    @property
    def keys(self) -> str:
        """"sites" (each encrypted job's key is made at one of its sites) or "provisioned" (in the kits);
        kits provisioned before the choice existed hold their keys."""
        return str(self.params.get("keys", "provisioned"))


@dataclass(frozen=True)
class Kit:
    """A verified startup kit. Build it with `load_kit`, never by hand."""

    path: Path
    name: str
    type: str
    org: str
    role: str | None
    project: str
    server_name: str
    server_host: str
    fed_port: int
    admin_port: int
    root_ca_path: Path
    cert_path: Path
    key_path: Path
    he: HEConfig
    roster: Roster
    ca_cert: x509.Certificate = field(repr=False)
    cert: x509.Certificate = field(repr=False)
    roster_bytes: bytes = field(repr=False)
    """The signed roster as provisioned: sites and admins present it to the server on their first call."""
    root_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)

    @property
    def identity(self) -> Identity:
        return Identity(name=self.name, org=self.org, type=self.type, role=self.role, project=self.project)

    @property
    def local_dir(self) -> Path:
        return local_dir(self.path)

    @property
    def workspace_dir(self) -> Path:
        return workspace_dir(self.path)

    @property
    def log_path(self) -> Path:
        return log_path(self.path)

    @property
    def pid_path(self) -> Path:
        return pid_path(self.path)

    @property
    def ready_path(self) -> Path:
        return ready_path(self.path)

    def private_key(self) -> PrivateKey:
        """This participant's private key (an admin signs job uploads with it)."""
        return load_private_key_pem(self.key_pem, str(self.key_path))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TamperedError(f"{what} is missing; re-provision this kit") from None
    except OSError as exc:
        raise KitError(f"{path}: cannot read it ({exc.strerror})") from None


def _json(data: bytes, what: str, error: type[KitError] = KitError) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{what}: not valid JSON ({exc}); re-provision this kit") from None


class ServerAddress(Schema):
    """Where the server is: `server` in config.json."""

    name: str
    host: str = Field(min_length=1)
    fed_port: int = Field(ge=1, le=65535)
    admin_port: int = Field(ge=1, le=65535)

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any, info: ValidationInfo) -> Any:
        return drop_retired(data, info, *RETIRED_SERVER_KEYS)


class HESection(Schema):
    """`he` in config.json: on or off, this kit's context file, and the parameters fedgrid.he reads."""

    model_config = ConfigDict(extra="allow")
    enabled: bool
    context: Literal[HE_CONTEXT_FILE] | None = None


class KitConfig(Schema):
    """startup/config.json: who this participant is and where the server is (written by provisioning)."""

    project: str
    name: str
    type: Literal[PARTICIPANT_TYPES]  # type: ignore[valid-type]
    org: str
    role: str | None
    server: ServerAddress
    he: HESection


def _read_config(data: bytes, what: str) -> KitConfig:
    retired: list[str] = []
    try:
        config = KitConfig.model_validate_json(data, context={"retired": retired})
    except ValidationError as exc:
        raise KitError(f"{what}: {one_line(exc, KitConfig)}; re-provision this kit") from None
    for key in dict.fromkeys(retired):
        log.warning(
            "%s: server.%s is no longer used and is ignored: job workers reach the server on fed_port %d",
            what,
            key,
            config.server.fed_port,
        )
    return config


def _warn_if_open(path: Path) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        log.warning("%s is accessible to other users (mode %03o): run chmod 600 on it", path, mode)


def load_kit(path: Path, expect_type: str | None = None, *, now: dt.datetime | None = None) -> Kit:
    """Load and verify the startup kit in `path`, optionally of one type ("server", "client", "admin").

    Raises TamperedError when a signed file changed, KitError for anything else wrong with the kit,
    each naming the file and what to do.
    """
    path = Path(path).resolve()
    startup = path / STARTUP_DIR
    if not startup.is_dir():
        raise KitError(
            f"{path} is not a startup kit (it has no {STARTUP_DIR}/ folder); "
            "pass the folder of a kit written by `provision`, e.g. workspaces/<project>/prod_00/<name>"
        )
    root_ca_path, cert_path, key_path = startup / ROOT_CA_FILE, startup / CERT_FILE, startup / KEY_FILE

    # The trust anchor first: every other check leans on it.
    root_pem = _read(root_ca_path, f"{STARTUP_DIR}/{ROOT_CA_FILE}")
    ca_cert = load_cert_pem(root_pem, str(root_ca_path))
    try:
        verify_root_ca(ca_cert, now)
        ca_public_key = public_key_of(ca_cert)
    except IdentityError as exc:
        raise KitError(f"{root_ca_path}: {exc}; re-provision this kit") from None

    # Then the signature over startup/, so no file is parsed before we know it is the one signed.
    signature_data = _read(startup / SIGNATURE_FILE, f"{STARTUP_DIR}/{SIGNATURE_FILE}")
    signed = _json(signature_data, f"{STARTUP_DIR}/{SIGNATURE_FILE}", TamperedError)
    verify_manifest(startup, signed, ca_public_key, label=STARTUP_DIR)
    for required in (CERT_FILE, KEY_FILE, CONFIG_FILE, ROSTER_FILE):
        if required not in signed["files"]:
            raise KitError(f"{startup / required}: not part of the signed kit; re-provision this kit")

    config_what = f"{startup / CONFIG_FILE}"
    config = _read_config(_read(startup / CONFIG_FILE, config_what), config_what)
    kind = config.type
    if expect_type is not None and kind != expect_type:
        raise KitError(
            f"{path} is the {_KIND_WORDS[kind]} kit of {config.name!r}; "
            f"this command needs a {_KIND_WORDS.get(expect_type, expect_type)} kit"
        )

    cert_pem = _read(cert_path, f"{STARTUP_DIR}/{CERT_FILE}")
    cert = load_cert_pem(cert_pem, str(cert_path))
    try:
        verify_issued_by(cert, ca_cert, now)
        identity = identity_from_cert(cert)
    except IdentityError as exc:
        raise KitError(f"{cert_path}: {exc}: re-provision this kit") from None
    expected = Identity(name=config.name, org=config.org, type=kind, role=config.role, project=config.project)
    if identity != expected:
        raise KitError(
            f"{cert_path}: the certificate names {identity}, but {CONFIG_FILE} says {expected}; re-provision this kit"
        )

    key_pem = _read(key_path, f"{STARTUP_DIR}/{KEY_FILE}")
    key = load_private_key_pem(key_pem, str(key_path))
    if not key_matches_cert(key, cert):
        raise KitError(f"{key_path}: this key does not belong to {CERT_FILE}; re-provision this kit")
    _warn_if_open(key_path)

    roster_bytes = _read(startup / ROSTER_FILE, f"{STARTUP_DIR}/{ROSTER_FILE}")
    try:
        roster = load_roster(roster_bytes, ca_cert)
    except FedgridError as exc:
        raise KitError(f"{startup / ROSTER_FILE}: {exc}; re-provision this kit") from None
    member = roster.find(identity.name)
    if (
        roster.project != identity.project
        or member is None
        or (member.type, member.org, member.role) != (identity.type, identity.org, identity.role)
    ):
        raise KitError(f"{startup / ROSTER_FILE}: does not list {identity.name} as in its certificate")

    he = config.he
    context_path: Path | None = None
    if he.enabled and kind != "admin" and (he.model_extra or {}).get("keys", "provisioned") == "provisioned":
        if he.context != HE_CONTEXT_FILE or HE_CONTEXT_FILE not in signed["files"]:
            raise KitError(f"{config_what}: HE is enabled but the kit has no signed {HE_CONTEXT_FILE}")
        context_path = startup / HE_CONTEXT_FILE
        if kind == "client":
            _warn_if_open(context_path)
    server = config.server
    return Kit(
        path=path,
        name=identity.name,
        type=identity.type,
        org=identity.org,
        role=identity.role,
        project=identity.project,
        server_name=server.name,
        server_host=server.host,
        fed_port=server.fed_port,
        admin_port=server.admin_port,
        root_ca_path=root_ca_path,
        cert_path=cert_path,
        key_path=key_path,
        he=HEConfig(enabled=he.enabled, params=MappingProxyType(dict(he.model_extra or {})), context_path=context_path),
        roster=roster,
        ca_cert=ca_cert,
        cert=cert,
        roster_bytes=roster_bytes,
        root_pem=root_pem,
        cert_pem=cert_pem,
        key_pem=key_pem,
    )
