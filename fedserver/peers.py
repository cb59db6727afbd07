"""Who is calling: identity from the verified client certificate, and the roster of participants.

gRPC has already checked that the caller's certificate chains to the project's root CA and is within
its validity period (the TLS handshake fails otherwise, and gRPC logs why). Here the server reads
name, org, type and role from that certificate and checks them against the port and the roster:
site certificates only on the federation port, admin certificates only on the admin port, and only
names the CA-signed roster lists with the same type, org and role: the roster is the authority, so a
newer roster that changes a role or removes a participant refuses the old certificate from the next
call on. Every refusal is logged with who and why.

The roster can grow while the server runs: a participant provisioned later carries a newer roster
signed by the same root CA, presents it on its first call (Register or Hello), and the server adopts
it, so a new site joins without restarting or reissuing anything.
"""

from __future__ import annotations

import logging
import urllib.parse
from pathlib import Path
from typing import NoReturn

import grpc
from cryptography import x509

from fedgrid.certs import Identity, identity_from_cert
from fedgrid.errors import FedgridError, IdentityError
from fedgrid.files import write_atomic
from fedgrid.roster import Roster, load_roster

log = logging.getLogger(__name__)

PORT_TYPES = {"federation": "client", "admin": "admin"}


def peer_address(context: grpc.aio.ServicerContext) -> str:
    """The caller's address as gRPC reports it ("ipv4:127.0.0.1:53412")."""
    try:
        return urllib.parse.unquote(context.peer() or "unknown")
    except Exception:  # noqa: BLE001 - the address is only for log lines
        return "unknown"


class PeerAuthority:
    """Identifies callers and keeps the newest roster the root CA has signed."""

    def __init__(self, *, project: str, ca_cert: x509.Certificate, roster: Roster, state_file: Path) -> None:
        self.project = project
        self._ca_cert = ca_cert
        self._state_file = state_file
        self._cache: dict[bytes, Identity] = {}
        self.roster = roster
        if state_file.exists():
            try:
                newer = load_roster(state_file.read_bytes(), ca_cert)
                if newer.project == project and newer.version > roster.version:
                    self.roster = newer
            except FedgridError as exc:
                log.warning("ignoring the saved roster %s: %s", state_file, exc)
        log.info("roster version %d: %d participants", self.roster.version, len(self.roster.participants))

    def adopt(self, data: bytes, presented_by: str) -> None:
        """Adopt a roster presented by a caller if it is valid, of this project, and newer."""
        if not data:
            return
        try:
            roster = load_roster(data, self._ca_cert)
        except FedgridError as exc:
            log.warning("roster presented by %s refused: %s", presented_by, exc)
            return
        if roster.project != self.project or roster.version <= self.roster.version:
            return
        added = sorted({m.name for m in roster.participants} - {m.name for m in self.roster.participants})
        removed = sorted({m.name for m in self.roster.participants} - {m.name for m in roster.participants})
        self.roster = roster
        write_atomic(self._state_file, data)
        log.info(
            "adopted roster version %d presented by %s (added: %s; removed: %s)",
            roster.version,
            presented_by,
            ", ".join(added) or "none",
            ", ".join(removed) or "none",
        )

    def site_names(self) -> set[str]:
        """The sites the roster lists."""
        return {m.name for m in self.roster.participants if m.type == "client"}

    def identify(self, context: grpc.aio.ServicerContext, port: str, method: str) -> Identity:
        """The caller's identity, or IdentityError (logged) when it does not belong on `port`."""
        auth = context.auth_context()
        pems = auth.get("x509_pem_cert") or []
        return self.identify_certificate(pems[0] if pems else b"", peer_address(context), port, method)

    def identify_certificate(self, pem: bytes, address: str, port: str, method: str) -> Identity:
        """The identity in `pem`, a certificate the TLS handshake has verified; IdentityError (logged)
        when it does not belong on `port`."""
        if not pem:
            self._refuse(address, method, "?", "no client certificate")
        identity = self._cache.get(pem)
        if identity is None:
            try:
                identity = identity_from_cert(x509.load_pem_x509_certificate(pem))
            except (FedgridError, ValueError) as exc:
                self._refuse(address, method, "?", f"not a fedgrid participant certificate ({exc})")
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[pem] = identity
        expected = PORT_TYPES[port]
        if identity.project != self.project:
            self._refuse(
                address, method, identity.name, f"certificate of project {identity.project!r}, not {self.project!r}"
            )
        if identity.type != expected:
            what = (
                "a site"
                if identity.type == "client"
                else f"an {identity.type}"
                if identity.type == "admin"
                else f"a {identity.type}"
            )
            self._refuse(
                address,
                method,
                identity.name,
                f"{what} certificate on the {port} port, which accepts only {expected} certificates",
            )
        member = self.roster.find(identity.name)
        if member is None:
            self._refuse(
                address,
                method,
                identity.name,
                f"not a participant of project {self.project} (roster version {self.roster.version})",
            )
        differs = [
            f"{what} {mine or 'none'!r} where the roster says {listed or 'none'!r}"
            for what, mine, listed in (
                ("type", identity.type, member.type),
                ("org", identity.org, member.org),
                ("role", identity.role, member.role),
            )
            if mine != listed
        ]
        if differs:
            self._refuse(
                address,
                method,
                identity.name,
                f"the certificate's {'; '.join(differs)} (roster version {self.roster.version}); "
                "ask the project admin for a new kit",
            )
        return identity

    def _refuse(self, address: str, method: str, name: str, reason: str) -> NoReturn:
        log.warning("refused %s from %s calling %s: %s", name, address, method, reason)
        raise IdentityError(f"refused {name}: {reason}")
