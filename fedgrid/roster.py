"""The participant roster: who belongs to the project, signed by the project's root CA.

Every kit carries the roster of the provisioning run that wrote it. Its version grows with each run,
so a site provisioned after the server carries a newer roster; the server adopts a newer roster
whose signature verifies with the root CA, and so learns about the new site without a restart.

    {"payload": {"project": str, "version": int, "issued": iso8601,
                 "participants": [{"name", "type", "org", "role"}, ...]},
     "signature": base64 over the canonical JSON of payload}
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from fedgrid.certs import NAME_RE, PARTICIPANT_TYPES, valid_name
from fedgrid.errors import IdentityError, TamperedError
from fedgrid.policy import ROLES
from fedgrid.signing import PrivateKey, PublicKey, canonical_json, sign_bytes, verify_bytes

ROSTER_FILE = "roster.json"


@dataclass(frozen=True)
class Member:
    """One participant as the roster lists it."""

    name: str
    type: str
    org: str
    role: str | None


@dataclass(frozen=True)
class Roster:
    project: str
    version: int
    issued: dt.datetime
    participants: tuple[Member, ...]

    def find(self, name: str) -> Member | None:
        """The member called `name`, or None if the roster does not list it."""
        for member in self.participants:
            if member.name == name:
                return member
        return None

    @property
    def sites(self) -> tuple[str, ...]:
        """Names of the client participants, in roster order."""
        return tuple(m.name for m in self.participants if m.type == "client")


def _parse_payload(payload: Any) -> Roster:
    """Validate a roster payload; IdentityError saying what is wrong."""
    if not isinstance(payload, dict) or set(payload) != {"project", "version", "issued", "participants"}:
        raise IdentityError("roster: payload must have exactly project, version, issued, participants")
    project, version, issued, members = (payload[k] for k in ("project", "version", "issued", "participants"))
    if not isinstance(project, str) or not NAME_RE.match(project):
        raise IdentityError(f"roster: invalid project name {project!r}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise IdentityError(f"roster: version must be a positive integer, got {version!r}")
    try:
        issued_at = dt.datetime.fromisoformat(issued) if isinstance(issued, str) else None
    except ValueError:
        issued_at = None
    if issued_at is None or issued_at.tzinfo is None:
        raise IdentityError(f"roster: issued must be an ISO 8601 time with a time zone, got {issued!r}")
    if not isinstance(members, list):
        raise IdentityError("roster: participants must be a list")
    parsed: list[Member] = []
    seen: set[str] = set()
    for i, entry in enumerate(members, 1):
        if not isinstance(entry, dict) or set(entry) != {"name", "type", "org", "role"}:
            raise IdentityError(f"roster: participant #{i} must have exactly name, type, org, role")
        name, kind, org, role = (entry[k] for k in ("name", "type", "org", "role"))
        if kind not in PARTICIPANT_TYPES or not isinstance(name, str) or not valid_name(name, kind):
            raise IdentityError(f"roster: participant #{i}: invalid name {name!r} or type {kind!r}")
        if not isinstance(org, str) or not NAME_RE.match(org):
            raise IdentityError(f"roster: participant {name!r}: invalid org {org!r}")
        if (kind == "admin") != (role is not None) or (role is not None and role not in ROLES):
            raise IdentityError(f"roster: participant {name!r}: invalid role {role!r} for a {kind}")
        if name in seen:
            raise IdentityError(f"roster: participant {name!r} is listed twice")
        seen.add(name)
        parsed.append(Member(name=name, type=kind, org=org, role=role))
    return Roster(project=project, version=version, issued=issued_at, participants=tuple(parsed))


def sign_roster(payload: dict[str, Any], ca_key: PrivateKey) -> bytes:
    """The roster file's bytes: `payload` (validated first) and the root CA's signature over it."""
    _parse_payload(payload)
    signature = sign_bytes(canonical_json(payload), ca_key)
    document = {"payload": payload, "signature": base64.b64encode(signature).decode("ascii")}
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")


def load_roster(data: bytes, ca_cert: x509.Certificate) -> Roster:
    """Parse a roster and check that the root CA `ca_cert` signed it.

    Raises TamperedError when the signature does not verify (changed, or signed by another
    project's CA) and IdentityError when the content is malformed.
    """
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IdentityError(f"roster: not valid JSON ({exc})") from None
    if not isinstance(document, dict) or set(document) != {"payload", "signature"}:
        raise IdentityError("roster: expected exactly the keys payload and signature")
    signature = document["signature"]
    try:
        raw = base64.b64decode(signature, validate=True) if isinstance(signature, str) else None
    except (binascii.Error, ValueError):
        raw = None
    if raw is None:
        raise IdentityError("roster: signature must be a base64 string")
    public_key = ca_cert.public_key()
    if not isinstance(public_key, PublicKey):
        raise IdentityError("roster: the root CA's key is neither ECDSA nor RSA")
    try:
        verify_bytes(canonical_json(document["payload"]), raw, public_key, what="roster")
    except TamperedError:
        raise TamperedError(
            "roster: signature does not verify with this project's root CA "
            "(changed after signing, or signed by another project's CA)"
        ) from None
    return _parse_payload(document["payload"])
