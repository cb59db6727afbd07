"""project.yml: the project file, validated strictly and parsed once into frozen dataclasses.

```yaml
api_version: 1
name: example_project
description: optional text
certificate: {validity_days: 365, key_type: ecdsa-p256}      # optional
he: {enabled: false}                                          # optional; other keys go to fedgrid.he
participants:
  - {name: server1, type: server, org: nvidia, host: localhost, fed_port: 8002, admin_port: 8003, data_port: 8004}
  - {name: site-1, type: client, org: hospital-a}
  - {name: admin@nvidia.com, type: admin, org: nvidia, role: project_admin}
```

Every mistake is reported as one line naming the file, the participant and the field, because the
person reading it is about to hand out certificates: a typo must stop provisioning, not be ignored.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

import yaml

from fedgrid.certs import NAME_RE, valid_name
from fedgrid.errors import FedgridError, ProjectFileError
from fedgrid.policy import ROLES
from provision.ca import DEFAULT_KEY_TYPE, KEY_TYPES

API_VERSION = 1
MAX_VALIDITY_DAYS = 3650
DEFAULT_VALIDITY_DAYS = 365

TOP_KEYS = ("api_version", "name", "description", "certificate", "he", "participants")
REQUIRED_TOP_KEYS = ("api_version", "name", "participants")
CERTIFICATE_KEYS = ("validity_days", "key_type")
PARTICIPANT_KEYS: dict[str, tuple[str, ...]] = {
    "server": ("name", "type", "org", "host", "fed_port", "admin_port", "data_port"),
    "client": ("name", "type", "org"),
    "admin": ("name", "type", "org", "role"),
}
OPTIONAL_KEYS = ("data_port",)
_ONLY_FOR = {
    "host": "the server",
    "fed_port": "the server",
    "admin_port": "the server",
    "data_port": "the server",
    "role": "admins",
}
_HOST_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 63 characters"


@dataclass(frozen=True)
class Participant:
    name: str
    type: str
    """"server", "client" (a site) or "admin"."""
    org: str
    role: str | None = None
    host: str | None = None
    fed_port: int | None = None
    admin_port: int | None = None
    data_port: int | None = None
    """The data lane (fedgrid/lane.py); admin_port + 1 when the project file leaves it out."""


@dataclass(frozen=True)
class CertificateSpec:
    validity_days: int = DEFAULT_VALIDITY_DAYS
    key_type: str = DEFAULT_KEY_TYPE


@dataclass(frozen=True)
class HESpec:
    enabled: bool = False
    params: Any = None
    """fedgrid.he.HEParams when enabled, else None."""
    config: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    """The parameters as written into each kit's config.json (without enabled and context)."""


@dataclass(frozen=True)
class Project:
    name: str
    description: str
    certificate: CertificateSpec
    he: HESpec
    participants: tuple[Participant, ...]
    api_version: int = API_VERSION

    @property
    def server(self) -> Participant:
        return next(p for p in self.participants if p.type == "server")

    @property
    def clients(self) -> tuple[Participant, ...]:
        return tuple(p for p in self.participants if p.type == "client")

    @property
    def admins(self) -> tuple[Participant, ...]:
        return tuple(p for p in self.participants if p.type == "admin")


def _fail(where: str, message: str) -> NoReturn:
    raise ProjectFileError(f"{where}: {message}")


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "empty"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_keys(data: dict[Any, Any], allowed: tuple[str, ...], required: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            _fail(where, f"unknown key {key!r}; allowed: {', '.join(allowed)}")
    for key in required:
        if key not in data:
            _fail(where, f"missing key {key!r}")


def valid_host(host: str) -> bool:
    """A DNS name or an IP address, as the server's certificate will carry it."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return len(host) <= 253 and all(_HOST_LABEL.match(label) for label in host.split("."))


def _parse_certificate(value: Any, where: str) -> CertificateSpec:
    if value is None:
        return CertificateSpec()
    if not isinstance(value, dict):
        _fail(where, f"certificate must be a mapping like {{validity_days: 365}}, got {_type_name(value)}")
    _check_keys(value, CERTIFICATE_KEYS, (), f"{where}: certificate")
    days = value.get("validity_days", DEFAULT_VALIDITY_DAYS)
    if not _is_int(days) or not 1 <= days <= MAX_VALIDITY_DAYS:
        _fail(where, f"certificate.validity_days must be an integer from 1 to {MAX_VALIDITY_DAYS}, got {days!r}")
    key_type = value.get("key_type", DEFAULT_KEY_TYPE)
    if key_type not in KEY_TYPES:
        _fail(where, f"certificate.key_type must be one of {', '.join(KEY_TYPES)}, got {key_type!r}")
    return CertificateSpec(validity_days=days, key_type=key_type)


def _he_config(params: Any, raw: dict[str, Any]) -> dict[str, Any]:
    """The HE parameters as plain JSON values, in the form fedgrid.he gives them."""
    if hasattr(params, "to_dict"):
        config = dict(params.to_dict())
    elif dataclasses.is_dataclass(params) and not isinstance(params, type):
        config = dataclasses.asdict(params)
    else:
        config = dict(raw)
    for key in ("enabled", "context"):
        config.pop(key, None)
    return config


def _parse_he(value: Any, where: str) -> HESpec:
    if value is None:
        return HESpec()
    if not isinstance(value, dict):
        _fail(where, f"he must be a mapping like {{enabled: false}}, got {_type_name(value)}")
    if "enabled" not in value:
        _fail(where, "he: missing key 'enabled' (true or false)")
    if not isinstance(value["enabled"], bool):
        _fail(where, f"he.enabled must be true or false, got {value['enabled']!r}")
    if not value["enabled"]:
        # Parameters of a disabled section are kept in the file for later, not checked now.
        return HESpec()
    try:
        from fedgrid.he import HEParams  # heavy (TenSEAL): imported only for projects that use HE
    except ImportError as exc:
        _fail(where, f"he.enabled is true, but HE support is not installed ({exc}); set he.enabled: false")
    try:
        params = HEParams.from_dict(dict(value), where=f"{where}: he")
    except FedgridError as exc:
        raise ProjectFileError(str(exc)) from None
    except (TypeError, ValueError) as exc:
        _fail(where, f"he: {exc}")
    return HESpec(enabled=True, params=params, config=MappingProxyType(_he_config(params, value)))


def _parse_participant(entry: Any, index: int, where: str) -> Participant:
    if not isinstance(entry, dict):
        _fail(
            where,
            f"participant #{index}: expected a mapping like "
            f"{{name: site-1, type: client, org: ...}}, got {_type_name(entry)}",
        )
    name = entry.get("name")
    if "name" not in entry:
        _fail(where, f"participant #{index}: missing key 'name'")
    if not isinstance(name, str):
        _fail(where, f"participant #{index}: name must be a string, got {name!r}")
    at = f"{where}: participant {name!r} (#{index})"
    kind = entry.get("type")
    if "type" not in entry:
        _fail(at, f"missing key 'type'; one of {', '.join(PARTICIPANT_KEYS)}")
    if kind not in PARTICIPANT_KEYS:
        _fail(at, f"type must be one of {', '.join(PARTICIPANT_KEYS)}, got {kind!r}")
    allowed = PARTICIPANT_KEYS[kind]
    for key in entry:
        if key not in allowed:
            if key in _ONLY_FOR:
                _fail(at, f"key {key!r} is only for {_ONLY_FOR[key]}; allowed for a {kind}: {', '.join(allowed)}")
            _fail(at, f"unknown key {key!r}; allowed: {', '.join(allowed)}")
    for key in allowed:
        if key not in entry and key not in OPTIONAL_KEYS:
            _fail(at, f"missing key {key!r}")
    if not valid_name(name, kind):
        if kind == "admin":
            _fail(
                at,
                "invalid name: an admin is named by an e-mail address such as admin@nvidia.com (at most 64 characters)",
            )
        _fail(at, f"invalid name: use {_NAME_RULE}")
    org = entry["org"]
    if not isinstance(org, str) or not NAME_RE.match(org):
        _fail(at, f"invalid org {org!r}: use {_NAME_RULE}")
    role = entry.get("role")
    if kind == "admin" and role not in ROLES:
        _fail(at, f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if kind != "server":
        return Participant(name=name, type=kind, org=org, role=role)
    host = entry["host"]
    if not isinstance(host, str) or not valid_host(host):
        _fail(at, f"host must be a DNS name or an IP address, got {host!r}")
    ports = {"fed_port": entry["fed_port"], "admin_port": entry["admin_port"]}
    ports["data_port"] = entry.get("data_port", ports["admin_port"] + 1 if _is_int(ports["admin_port"]) else None)
    if "data_port" not in entry and ports["data_port"] == 65536:
        _fail(at, "data_port is admin_port + 1 when left out, and 65536 is not a port: set data_port")
    for key, port in ports.items():
        if not _is_int(port) or not 1 <= port <= 65535:
            _fail(at, f"{key} must be an integer from 1 to 65535, got {port!r}")
    for first, second in (("fed_port", "admin_port"), ("fed_port", "data_port"), ("admin_port", "data_port")):
        if ports[first] == ports[second]:
            _fail(at, f"{first} and {second} must differ, both are {ports[first]}")
    return Participant(name=name, type=kind, org=org, host=host, **ports)


def parse_project(data: Any, where: str = "project.yml") -> Project:
    """Validate the loaded YAML document and build the Project; ProjectFileError on the first problem."""
    if not isinstance(data, dict):
        what = "empty" if data is None else _type_name(data)
        _fail(where, f"expected a mapping with {', '.join(REQUIRED_TOP_KEYS)} at the top level, got {what}")
    _check_keys(data, TOP_KEYS, REQUIRED_TOP_KEYS, where)
    version = data["api_version"]
    if not _is_int(version) or version != API_VERSION:
        _fail(where, f"api_version {version!r} is not supported; this provision reads api_version {API_VERSION}")
    name = data["name"]
    if not isinstance(name, str) or not NAME_RE.match(name):
        _fail(where, f"name {name!r} is not a valid project name: use {_NAME_RULE}")
    description = data.get("description", "")
    if description is None:
        description = ""
    if not isinstance(description, str):
        _fail(where, f"description must be text, got {_type_name(description)}")
    certificate = _parse_certificate(data.get("certificate"), where)
    entries = data["participants"]
    if not isinstance(entries, list) or not entries:
        _fail(where, f"participants must be a non-empty list, got {_type_name(entries)}")
    participants: list[Participant] = []
    seen: dict[str, int] = {}
    server_at: int | None = None
    for index, entry in enumerate(entries, 1):
        participant = _parse_participant(entry, index, where)
        at = f"{where}: participant {participant.name!r} (#{index})"
        folded = participant.name.lower()
        if folded in seen:
            other = seen[folded]
            _fail(
                at,
                f"duplicate name: participant #{other} is {entries[other - 1]['name']!r} "
                "(names must differ in more than letter case)",
            )
        seen[folded] = index
        if participant.type == "server":
            if server_at is not None:
                _fail(
                    at,
                    f"a second server: participant #{server_at} is the server already, and a project has exactly one",
                )
            server_at = index
        participants.append(participant)
    if server_at is None:
        _fail(where, "participants: no server; add one participant with type: server")
    he = _parse_he(data.get("he"), where)
    return Project(name=name, description=description, certificate=certificate, he=he, participants=tuple(participants))


def _duplicate_key(node: yaml.Node, seen: set[int]) -> tuple[str, yaml.Mark] | None:
    """The first mapping key that appears twice in the same mapping (safe_load keeps the last silently)."""
    if id(node) in seen:
        return None
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set[tuple[str, str]] = set()
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = (key_node.tag, key_node.value)
                if key in keys and key_node.value != "<<":
                    return key_node.value, key_node.start_mark
                keys.add(key)
            found = _duplicate_key(value_node, seen)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _duplicate_key(item, seen)
            if found:
                return found
    return None


def load_project(path: Path) -> Project:
    """Read and validate a project file."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        _fail(where, "no such file")
    except IsADirectoryError:
        _fail(where, "is a folder; pass the project file, e.g. workspaces/project.yml")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(where, f"cannot read it ({exc})")
    try:
        data = yaml.safe_load(text)
        found = None
        if data is not None:
            found = _duplicate_key(yaml.compose(text, Loader=yaml.SafeLoader), set())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        place = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        _fail(where, f"{place}YAML syntax error: {problem}")
    except yaml.YAMLError as exc:
        _fail(where, f"YAML syntax error: {' '.join(str(exc).split())}")
    if found:
        key, mark = found
        _fail(where, f"line {mark.line + 1}: duplicate key {key!r}")
    return parse_project(data, where)
