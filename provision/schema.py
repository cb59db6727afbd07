"""project.yml: the project file, validated strictly and parsed once into frozen pydantic models.

```yaml
api_version: 1
name: example_project
description: optional text
certificate: {validity_days: 365, key_type: ecdsa-p256}      # optional
he: {enabled: false}                                          # optional; other keys go to fedgrid.he
participants:
  - {name: server1, type: server, org: nvidia, host: localhost, fed_port: 8002, admin_port: 8003}
  - {name: site-1, type: client, org: hospital-a}
  - {name: admin@nvidia.com, type: admin, org: nvidia, role: project_admin}
```

Every mistake is reported as one line naming the file, the participant and the field, because the
person reading it is about to hand out certificates: a typo must stop provisioning, not be ignored.
The one exception is a key fedgrid no longer reads (the server's `data_port`): it is accepted and
ignored, with a notice, so that project files written for earlier versions still provision.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import yaml
from pydantic import BeforeValidator, Field, ValidationError, ValidationInfo, model_validator

from fedgrid.certs import NAME_RE, valid_name
from fedgrid.errors import FedgridError, ProjectFileError
from fedgrid.policy import ROLES
from fedgrid.validation import Schema, accepts, drop_retired, one_line
from provision.ca import DEFAULT_KEY_TYPE, KEY_TYPES

API_VERSION = 1
MAX_VALIDITY_DAYS = 3650
DEFAULT_VALIDITY_DAYS = 365

PARTICIPANT_KEYS: dict[str, tuple[str, ...]] = {
    "server": ("name", "type", "org", "host", "fed_port", "admin_port"),
    "client": ("name", "type", "org"),
    "admin": ("name", "type", "org", "role"),
}
_A_TYPE = {"server": "the server", "client": "a site", "admin": "an admin"}
_ONLY_FOR = {"host": "the server", "fed_port": "the server", "admin_port": "the server", "role": "admins"}
RETIRED_SERVER_KEYS = ("data_port",)
"""Keys of the server entry that fedgrid no longer reads: accepted, ignored, and reported once."""
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 63 characters"


def valid_host(host: str) -> bool:
    """A DNS name or an IP address, as the server's certificate will carry it."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in host.split("."))


Name = Annotated[str, accepts(NAME_RE.fullmatch, _NAME_RULE)]
Host = Annotated[str, accepts(valid_host, "a DNS name or an IP address")]
Port = Annotated[int, Field(ge=1, le=65535)]


class Participant(Schema):
    """One entry of `participants`: the server, a site (type client) or an admin."""

    name: str
    type: Literal["server", "client", "admin"]
    org: Name
    role: Literal[ROLES] | None = None  # type: ignore[valid-type]
    host: Host | None = None
    fed_port: Port | None = None
    admin_port: Port | None = None

    @model_validator(mode="before")
    @classmethod
    def _keys_of_its_type(cls, data: Any, info: ValidationInfo) -> Any:
        """Each type has its own keys: a port on a site is a mistake worth naming, not just "unknown"."""
        if not isinstance(data, dict) or data.get("type") not in PARTICIPANT_KEYS:
            return data
        kind = data["type"]
        if kind == "server":
            data = drop_retired(data, info, *RETIRED_SERVER_KEYS)
        allowed = PARTICIPANT_KEYS[kind]
        for key in data:
            if key in allowed:
                continue
            if key in _ONLY_FOR:
                raise ValueError(
                    f"key {key!r} is only for {_ONLY_FOR[key]}; allowed for {_A_TYPE[kind]}: {', '.join(allowed)}"
                )
            raise ValueError(f"unknown key {key!r}; allowed: {', '.join(allowed)}")
        for key in allowed:
            if key not in data:
                raise ValueError(f"missing key {key!r}")
        return data

    @model_validator(mode="after")
    def _name_and_ports(self) -> Participant:
        if not valid_name(self.name, self.type) or "\n" in self.name:  # (a regex's $ matches before "\n")
            if self.type == "admin":
                raise ValueError(
                    "invalid name: an admin is named by an e-mail address such as admin@nvidia.com "
                    "(at most 64 characters)"
                )
            raise ValueError(f"invalid name: use {_NAME_RULE}")
        if self.type == "server" and self.fed_port == self.admin_port:
            raise ValueError(f"fed_port and admin_port must differ, both are {self.fed_port}")
        return self


class CertificateSpec(Schema):
    validity_days: int = Field(DEFAULT_VALIDITY_DAYS, ge=1, le=MAX_VALIDITY_DAYS)
    key_type: Literal[KEY_TYPES] = DEFAULT_KEY_TYPE  # type: ignore[valid-type]


HE_KEY_MODES = ("sites", "provisioned")


class HESpec(Schema):
    """The `he` section: `enabled`, `keys`, and when it is enabled the CKKS parameters, validated by fedgrid.he.

    `keys: sites` (the default): provisioning writes only the parameters, and for each encrypted job one of its
    sites makes a fresh key and wraps it for the others (fedclient/job_key.py): nobody who provisions, and
    not the server, ever holds a secret key. `keys: provisioned`: provisioning makes one key for the project,
    writes it into every site kit and keeps it in the state folder for kits made later.
    """

    enabled: bool = False
    keys: Literal[HE_KEY_MODES] = "sites"  # type: ignore[valid-type]
    params: Any = None
    """fedgrid.he.HEParams when enabled, else None."""
    config: dict[str, Any] = Field(default_factory=dict)
    """The parameters as written into each kit's config.json (without enabled and context), with `keys`."""

    @model_validator(mode="before")
    @classmethod
    def _parameters(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        if "enabled" not in data:
            raise ValueError("missing key 'enabled' (true or false)")
        if data["enabled"] is not True:
            # Parameters of a disabled section are kept in the file for later, not checked now.
            return {"enabled": data["enabled"]}
        where = (info.context or {}).get("where", "project.yml")
        keys = data.get("keys", "sites")
        if keys not in HE_KEY_MODES:
            _fail(
                where,
                f"he.keys must be 'sites' (the default: each encrypted job's key is made at one of its sites, and "
                f"no kit, state folder or server holds a secret key) or 'provisioned' (one key for the project, "
                f"in every site kit and the state folder), got {keys!r}",
            )
        data = {k: v for k, v in data.items() if k != "keys"}
        try:
            from fedgrid.he import HEParams  # heavy (TenSEAL): imported only for projects that use HE
        except ImportError as exc:
            _fail(where, f"he.enabled is true, but HE support is not installed ({exc}); set he.enabled: false")
        try:
            params = HEParams.from_dict(data, where=f"{where}: he")
        except FedgridError as exc:
            raise ProjectFileError(str(exc)) from None
        except (TypeError, ValueError) as exc:
            _fail(where, f"he: {exc}")
        config = {k: v for k, v in params.to_dict().items() if k not in ("enabled", "context")}
        return {"enabled": True, "keys": keys, "params": params, "config": {**config, "keys": keys}}


def _none_is(default: Any) -> BeforeValidator:
    """An empty YAML value (`description:`) means the default."""
    return BeforeValidator(lambda value: default if value is None else value)


class Project(Schema):
    api_version: Literal[API_VERSION]  # type: ignore[valid-type]
    name: Name
    description: Annotated[str, _none_is("")] = ""
    certificate: Annotated[CertificateSpec, _none_is({})] = CertificateSpec()
    he: Annotated[HESpec, _none_is({"enabled": False})] = HESpec(enabled=False)
    participants: tuple[Participant, ...] = Field(strict=False, min_length=1)

    @model_validator(mode="after")
    def _one_server_and_distinct_names(self) -> Project:
        seen: dict[str, int] = {}
        server_at = None
        for index, participant in enumerate(self.participants, 1):
            at = f"participant {participant.name!r} (#{index})"
            folded = participant.name.lower()
            if folded in seen:
                other = seen[folded]
                raise ValueError(
                    f"{at}: duplicate name: participant #{other} is {self.participants[other - 1].name!r} "
                    "(names must differ in more than letter case)"
                )
            seen[folded] = index
            if participant.type == "server":
                if server_at is not None:
                    raise ValueError(
                        f"{at}: a second server: participant #{server_at} is the server already, "
                        "and a project has exactly one"
                    )
                server_at = index
        if server_at is None:
            raise ValueError("participants: no server; add one participant with type: server")
        return self

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


def _labels(data: Any) -> Any:
    """Participants named as the reader knows them: "participant 'site-2' (#3)", or "#3" alone."""

    def label(loc: tuple[int | str, ...]) -> str | None:
        if len(loc) != 2 or loc[0] != "participants" or not isinstance(loc[1], int):
            return None
        entries = data.get("participants") if isinstance(data, dict) else None
        entry = entries[loc[1]] if isinstance(entries, list) and loc[1] < len(entries) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        return f"participant {name!r} (#{loc[1] + 1})" if isinstance(name, str) else f"participant #{loc[1] + 1}"

    return label


def parse_project(data: Any, where: str = "project.yml", notices: list[str] | None = None) -> Project:
    """Validate the loaded YAML document; ProjectFileError names the file, the participant and the field.

    Keys that are accepted but ignored add a line for the reader to `notices`.
    """
    if not isinstance(data, dict):
        what = {type(None): "empty", list: "a list", str: "a string"}.get(type(data), f"a {type(data).__name__}")
        _fail(where, f"expected a mapping with api_version, name, participants at the top level, got {what}")
    retired: list[str] = []
    try:
        project = Project.model_validate(data, context={"retired": retired, "where": where})
    except ValidationError as exc:
        _fail(where, one_line(exc, Project, labels=_labels(data), mapping="a mapping"))
    if notices is not None:
        server = project.participants.index(project.server) + 1
        notices += [
            f"{where}: participant {project.server.name!r} (#{server}): {key} is no longer used and is ignored "
            "(sites and their job workers reach the server on fed_port); delete it"
            for key in dict.fromkeys(retired)
        ]
    return project


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


def load_project(path: Path, notices: list[str] | None = None) -> Project:
    """Read and validate a project file; lines about keys accepted but ignored go to `notices`."""
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
    except RecursionError:
        _fail(where, "nested too deeply to read; a project file is a few levels of mappings and lists")
    except ValueError:  # a number with more digits than Python converts (4300)
        _fail(where, "holds a number with thousands of digits, which no setting takes; shorten it")
    if found:
        key, mark = found
        _fail(where, f"line {mark.line + 1}: duplicate key {key!r}")
    return parse_project(data, where, notices)
