"""The project's root CA and the participants' certificates.

The root CA signs every participant certificate, every kit's manifest and the roster. Its key stays
in the provisioning state folder (see workspace.py) and never enters a kit; kits carry only the CA
certificate, which is what the daemons trust.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedgrid.certs import Identity
from fedgrid.signing import PrivateKey

KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096")
DEFAULT_KEY_TYPE = "ecdsa-p256"
CA_VALIDITY_DAYS = 3650
# Certificates start a little in the past, so a machine whose clock runs a few minutes late accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)


def _project_attribute(project: str) -> x509.NameAttribute:
    # dnQualifier defaults to PrintableString, which has no '_' ("example_project"); UTF8String
    # carries any project name, and TLS libraries read the attribute either way. cryptography
    # offers no public way to choose the string type, hence the private _ASN1Type.
    return x509.NameAttribute(NameOID.DN_QUALIFIER, project, _type=_ASN1Type.UTF8String)


def generate_key(key_type: str = DEFAULT_KEY_TYPE) -> PrivateKey:
    """A new private key of one of KEY_TYPES."""
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type.startswith("rsa-") and key_type in KEY_TYPES:
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise ValueError(f"unknown key type {key_type!r}; one of {', '.join(KEY_TYPES)}")


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_private_key(path: Path, key: PrivateKey) -> None:
    """Write a key as PEM to a new file that is 0600 from its creation, never readable by others."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_key_pem(key))
    os.chmod(path, 0o600)  # os.open's mode passes through the umask; make sure it is exactly 0600


def create_root_ca(
    project: str,
    key_type: str = DEFAULT_KEY_TYPE,
    validity_days: int = CA_VALIDITY_DAYS,
    now: dt.datetime | None = None,
) -> tuple[PrivateKey, x509.Certificate]:
    """A new self-signed root CA for `project` (CN "<project> root CA")."""
    now = now or dt.datetime.now(dt.UTC)
    key = generate_key(key_type)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{project} root CA"),
            _project_attribute(project),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _subject(identity: Identity) -> x509.Name:
    attributes = [
        x509.NameAttribute(NameOID.COMMON_NAME, identity.name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.org),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.type),
    ]
    if identity.role is not None:
        attributes.append(x509.NameAttribute(NameOID.TITLE, identity.role))
    attributes.append(_project_attribute(identity.project))
    return x509.Name(attributes)


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_certificate(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    identity: Identity,
    *,
    key_type: str = DEFAULT_KEY_TYPE,
    validity_days: int = 365,
    host: str | None = None,
    not_before: dt.datetime | None = None,
) -> tuple[PrivateKey, x509.Certificate]:
    """A new key and a certificate for one participant, signed by the root CA.

    The server's certificate names `host` (DNS name or IP) and the server name in its
    SubjectAlternativeName, since clients check the address they dial against it. The validity never
    reaches past the CA's own: a certificate is worthless once its issuer has expired.
    """
    if not_before is None:
        now = dt.datetime.now(dt.UTC)
        start, end = now - CLOCK_SKEW, now + dt.timedelta(days=validity_days)
    else:
        start, end = not_before, not_before + dt.timedelta(days=validity_days)
    end = min(end, ca_cert.not_valid_after_utc)
    key = generate_key(key_type)
    public = key.public_key()
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if identity.type == "server":
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(identity))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(key, rsa.RSAPrivateKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if identity.type == "server":
        names = [_host_name(host or "localhost")]
        if identity.name != host:
            names.append(x509.DNSName(identity.name))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())
