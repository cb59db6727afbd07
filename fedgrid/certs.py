"""Certificates and keys: loading PEM files, reading who a certificate names, checking who issued it.

A participant's certificate is its identity everywhere in fedgrid. Provisioning writes it as

    CN = participant name    O = organisation    OU = type (server, client, admin)
    TITLE = role (admins only)    DN_QUALIFIER = project name

and the server trusts only these fields of a verified certificate, never a name sent in a request.
The name rules live here, beside the code that reads them back, so the provisioning schema and the
server check the same thing.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from fedgrid.errors import IdentityError, KitError
from fedgrid.policy import ROLES
from fedgrid.signing import PrivateKey, PublicKey

PARTICIPANT_TYPES = ("server", "client", "admin")
# Server, site, organisation and project names: safe as folder names and in a certificate's CN (<= 64).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# Admins are people, named by an e-mail address (at most 64 characters, the CN limit).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
ADMIN_NAME_RE = re.compile(rf"^(?=.{{3,64}}$)[A-Za-z0-9][A-Za-z0-9._%+-]*@{_LABEL}(?:\.{_LABEL})*$")


def valid_name(name: str, participant_type: str) -> bool:
    """Whether `name` is allowed for a participant of this type."""
    pattern = ADMIN_NAME_RE if participant_type == "admin" else NAME_RE
    return bool(pattern.match(name))


@dataclass(frozen=True)
class Identity:
    """Who a verified certificate names."""

    name: str
    org: str
    type: str
    role: str | None
    project: str


def load_cert_pem(data: bytes, where: str) -> x509.Certificate:
    """Parse one PEM certificate; KitError naming `where` if it is not one."""
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise KitError(f"{where}: not a PEM certificate ({exc})") from None


def load_cert(path: Path) -> x509.Certificate:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KitError(f"{path}: cannot read the certificate ({exc.strerror})") from None
    return load_cert_pem(data, str(path))


def load_private_key_pem(data: bytes, where: str) -> PrivateKey:
    """Parse an unencrypted PEM private key (ECDSA or RSA); KitError naming `where` otherwise."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KitError(f"{where}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, PrivateKey):
        raise KitError(f"{where}: a {type(key).__name__}; fedgrid uses ECDSA or RSA keys")
    return key


def load_private_key(path: Path) -> PrivateKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KitError(f"{path}: cannot read the private key ({exc.strerror})") from None
    return load_private_key_pem(data, str(path))


def public_key_of(cert: x509.Certificate) -> PublicKey:
    key = cert.public_key()
    if not isinstance(key, PublicKey):
        raise IdentityError(f"certificate of {common_name(cert)}: a {type(key).__name__}, not ECDSA or RSA")
    return key


def key_matches_cert(key: PrivateKey, cert: x509.Certificate) -> bool:
    """Whether `key` is the private half of the certificate's public key."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def common_name(cert: x509.Certificate) -> str:
    """The subject CN for messages ("?" when there is none)."""
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else "?"


def _attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier, label: str, required: bool) -> str | None:
    values = cert.subject.get_attributes_for_oid(oid)
    if len(values) > 1:
        raise IdentityError(f"certificate of {common_name(cert)}: more than one {label} in the subject")
    if not values:
        if required:
            raise IdentityError(f"certificate of {common_name(cert)}: no {label} in the subject")
        return None
    return str(values[0].value)


def identity_from_cert(cert: x509.Certificate) -> Identity:
    """Read name, org, type, role and project from a participant certificate.

    Raises IdentityError when a field is missing, repeated or not a valid value: a certificate that
    does not follow fedgrid's layout identifies nobody.
    """
    name = _attribute(cert, NameOID.COMMON_NAME, "CN (participant name)", True)
    org = _attribute(cert, NameOID.ORGANIZATION_NAME, "O (organisation)", True)
    kind = _attribute(cert, NameOID.ORGANIZATIONAL_UNIT_NAME, "OU (participant type)", True)
    project = _attribute(cert, NameOID.DN_QUALIFIER, "DN_QUALIFIER (project)", True)
    role = _attribute(cert, NameOID.TITLE, "TITLE (admin role)", kind == "admin")
    assert name is not None and org is not None and kind is not None and project is not None
    if kind not in PARTICIPANT_TYPES:
        known = ", ".join(PARTICIPANT_TYPES)
        raise IdentityError(f"certificate of {name}: type {kind!r} is not one of {known}")
    if not valid_name(name, kind):
        raise IdentityError(f"certificate of {name!r}: not a valid {kind} name")
    if not NAME_RE.match(org):
        raise IdentityError(f"certificate of {name}: not a valid organisation {org!r}")
    if not NAME_RE.match(project):
        raise IdentityError(f"certificate of {name}: not a valid project name {project!r}")
    if kind == "admin" and role not in ROLES:
        raise IdentityError(f"certificate of {name}: role {role!r} is not one of {', '.join(ROLES)}")
    if kind != "admin" and role is not None:
        raise IdentityError(f"certificate of {name}: a {kind} certificate must not carry a role")
    return Identity(name=name, org=org, type=kind, role=role, project=project)


def _check_validity(cert: x509.Certificate, now: dt.datetime | None, what: str) -> None:
    now = now or dt.datetime.now(dt.UTC)
    if now < cert.not_valid_before_utc:
        raise IdentityError(f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if now > cert.not_valid_after_utc:
        raise IdentityError(f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def verify_root_ca(ca_cert: x509.Certificate, now: dt.datetime | None = None) -> None:
    """Check a root CA certificate: a CA, self-signed (signature checked), within its validity."""
    what = f"root CA certificate {common_name(ca_cert)!r}"
    if not _is_ca(ca_cert):
        raise IdentityError(f"{what} is not a CA certificate")
    try:
        ca_cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise IdentityError(f"{what} is not validly self-signed") from None
    _check_validity(ca_cert, now, what)


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate, now: dt.datetime | None = None) -> None:
    """Check that `ca_cert` signed `cert` and that `cert` is within its validity window at `now`.

    Raises IdentityError naming the certificate's CN and the reason, e.g. "certificate of site-1
    expired on 2025-01-31 12:00 UTC" or "... not issued by this project's root CA".
    """
    what = f"certificate of {common_name(cert)}"
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise IdentityError(f"{what} was not issued by this project's root CA") from None
    if _is_ca(cert):
        raise IdentityError(f"{what} is a CA certificate, not a participant's")
    _check_validity(cert, now, what)
