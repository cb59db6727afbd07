"""A job's HE secret context, wrapped by the site that made it for one other site, relayed by the server.

When sites generate the HE keys, one site of the job (the key site) makes a fresh secret context and wraps
it for every other site of the job with that site's certificate key, the key its kit already holds:

- an EC certificate key (ecdsa-p256, ecdsa-p384): ephemeral-static ECDH on the recipient's curve, HKDF-SHA256
  to a 256-bit key, AES-256-GCM;
- an RSA certificate key (rsa-2048/3072/4096): a random 256-bit AES-GCM key, encrypted with RSA-OAEP-SHA256.

The AEAD's associated data is the whole header: job id, sender, recipient, the fingerprint of the
recipient's certificate key, the scheme, the key material and the sender's certificate. The sender signs the
blob with its certificate key (ECDSA-SHA256 or RSA-PSS-SHA256, fedgrid.signing), and the recipient checks that
signature against the sender's certificate after checking that the project's root CA issued it.

Threat model: the server relays the blobs and may read, drop, replay, reorder or alter them, and hand any blob
to any site. It cannot read the secret: only the recipient's private key opens it (ECDH or OAEP), and neither
the server nor the provisioner holds it. A recipient refuses (PrivacyError naming the reason) a blob that
is not for it, not for this job, not from the job's key site, not signed by the key of that site's certificate
from this project's CA, wrapped for an older key of the recipient, or altered in any byte. A replayed blob
of the same job gives the same context, which is harmless; another job's blob is refused by its job id, so
one job's key opens nothing of another.

What it rests on: the sites' private keys stay in their kits; the root CA (the provisioner) does not issue a
second certificate under a site's name; the job id is unique. Each certificate key both signs (TLS, this
blob) and decrypts here, so that the kits need no second key. One RSA key for OAEP and PSS is proven sound
(Haber and Pinkas, CCS 2001); for ECDH with ECDSA on one EC key there are joint-security results for close
variants (Degabriele et al., CT-RSA 2012) but not for exactly this pair, and the EC certificates' KeyUsage
says digitalSignature only (it is not checked here). A dedicated encryption key in each kit is the stricter
alternative.

Blob layout::

    b"FGKW1\\n" | header length (uint32 LE) | header: canonical JSON | ciphertext length (uint32 LE) | ciphertext
                | signature length (uint32 LE) | signature over every byte before it
    header: {"job", "sender", "recipient", "recipient_key": SHA-256 hex of its SubjectPublicKeyInfo,
             "scheme", "key": base64 (ephemeral public point, or the OAEP-encrypted AES key),
             "nonce": base64, "sender_cert": PEM}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import struct
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedgrid.certs import (
    Identity,
    identity_from_cert,
    key_matches_cert,
    load_cert_pem,
    public_key_of,
    verify_issued_by,
)
from fedgrid.errors import FedgridError, PrivacyError
from fedgrid.signing import PrivateKey, canonical_json, sign_bytes, verify_bytes

MAGIC = b"FGKW1\n"
ECDH_SCHEME = "ecdh-es+hkdf-sha256+aes-256-gcm"
RSA_SCHEME = "rsa-oaep-sha256+aes-256-gcm"
MAX_HEADER = 1 << 16
MAX_SECRET = 1 << 28  # an HE secret context is a few MB at most
HEADER_KEYS = frozenset({"job", "sender", "recipient", "recipient_key", "scheme", "key", "nonce", "sender_cert"})
_U32 = struct.Struct("<I")
_HKDF_INFO = b"fedgrid keywrap v1"
_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def key_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 hex of the certificate's SubjectPublicKeyInfo: which key a blob was wrapped for."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def _site_identity(cert: x509.Certificate, ca_cert: x509.Certificate, whose: str) -> Identity:
    """The identity of a site certificate issued by this project's root CA; PrivacyError otherwise."""
    try:
        verify_issued_by(cert, ca_cert)
        identity = identity_from_cert(cert)
    except FedgridError as exc:
        raise PrivacyError(f"{whose}: {exc}") from None
    if identity.type != "client":
        raise PrivacyError(f"{whose}: {identity.name} is a {identity.type}, not a site")
    return identity


def _ecdh_key(shared: bytes, header: dict[str, Any]) -> bytes:
    info = _HKDF_INFO + canonical_json({k: header[k] for k in ("job", "sender", "recipient", "recipient_key", "key")})
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def wrap_secret(
    secret: bytes,
    *,
    job_id: str,
    sender_key: PrivateKey,
    sender_cert: x509.Certificate,
    recipient_cert: x509.Certificate,
    ca_cert: x509.Certificate,
) -> bytes:
    """Encrypt `secret` for the site of `recipient_cert` and sign it as the site of `sender_cert`.

    The recipient's certificate comes through the server, so it is checked first: issued by this project's
    root CA, a site's, of the sender's project and not the sender itself (PrivacyError otherwise).
    """
    if not job_id:
        raise ValueError("a wrapped key needs the job id")
    if len(secret) > MAX_SECRET:
        raise ValueError(f"a secret of {len(secret)} bytes; at most {MAX_SECRET} can be wrapped")
    if not key_matches_cert(sender_key, sender_cert):
        raise PrivacyError("the sender's private key does not belong to its certificate")
    sender = _site_identity(sender_cert, ca_cert, "sender's certificate")
    recipient = _site_identity(recipient_cert, ca_cert, "recipient's certificate")
    if recipient.project != sender.project:
        raise PrivacyError(f"recipient {recipient.name} belongs to project {recipient.project}, not {sender.project}")
    if recipient.name == sender.name:
        raise PrivacyError(f"{sender.name} would wrap the key for itself")
    header: dict[str, Any] = {
        "job": job_id,
        "sender": sender.name,
        "recipient": recipient.name,
        "recipient_key": key_fingerprint(recipient_cert),
        "nonce": _b64(os.urandom(12)),
        "sender_cert": sender_cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
    }
    public = recipient_cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        ephemeral = ec.generate_private_key(public.curve)
        point = ephemeral.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        header.update(scheme=ECDH_SCHEME, key=_b64(point))
        aes_key = _ecdh_key(ephemeral.exchange(ec.ECDH(), public), header)
    elif isinstance(public, rsa.RSAPublicKey):
        aes_key = AESGCM.generate_key(bit_length=256)
        header.update(scheme=RSA_SCHEME, key=_b64(public.encrypt(aes_key, _OAEP)))
    else:
        raise PrivacyError(f"recipient {recipient.name} has a {type(public).__name__}; fedgrid wraps for EC or RSA")
    header_bytes = canonical_json(header)
    ciphertext = AESGCM(aes_key).encrypt(base64.b64decode(header["nonce"]), secret, header_bytes)
    body = MAGIC + _U32.pack(len(header_bytes)) + header_bytes + _U32.pack(len(ciphertext)) + ciphertext
    signature = sign_bytes(body, sender_key)
    return body + _U32.pack(len(signature)) + signature


@dataclass(frozen=True)
class _Parsed:
    header: dict[str, Any]
    header_bytes: bytes
    ciphertext: bytes
    body: bytes
    signature: bytes


def _take(blob: bytes, offset: int, limit: int, what: str) -> tuple[bytes, int]:
    if offset + _U32.size > len(blob):
        raise PrivacyError(f"not a wrapped key: truncated before the {what}")
    (size,) = _U32.unpack_from(blob, offset)
    offset += _U32.size
    if size > limit or offset + size > len(blob):
        raise PrivacyError(f"not a wrapped key: the {what} length {size} is beyond the blob")
    return blob[offset : offset + size], offset + size


def _parse(blob: bytes) -> _Parsed:
    if not isinstance(blob, bytes | bytearray) or not blob.startswith(MAGIC):
        raise PrivacyError("not a wrapped key: it does not start with the keywrap magic bytes")
    blob = bytes(blob)
    header_bytes, offset = _take(blob, len(MAGIC), MAX_HEADER, "header")
    ciphertext, offset = _take(blob, offset, MAX_SECRET + 16, "ciphertext")
    body = blob[:offset]
    signature, offset = _take(blob, offset, 4096, "signature")
    if offset != len(blob):
        raise PrivacyError("not a wrapped key: bytes follow the signature")
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PrivacyError("not a wrapped key: the header is not JSON") from None
    if (
        not isinstance(header, dict)
        or set(header) != HEADER_KEYS
        or not all(isinstance(v, str) for v in header.values())
    ):
        raise PrivacyError(
            f"not a wrapped key: the header must hold exactly {', '.join(sorted(HEADER_KEYS))} as strings"
        )
    if canonical_json(header) != header_bytes:
        raise PrivacyError("not a wrapped key: the header is not in canonical form")
    return _Parsed(header, header_bytes, ciphertext, body, signature)


def addressing(blob: bytes) -> tuple[str, str, str]:
    """(job id, sender, recipient) as the blob claims them, unverified: what the server routes by."""
    header = _parse(blob).header
    return header["job"], header["sender"], header["recipient"]


def _decode(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PrivacyError(f"wrapped key: the {what} is not base64") from None


def unwrap_secret(
    blob: bytes,
    *,
    job_id: str,
    senders: Collection[str],
    recipient_key: PrivateKey,
    recipient_cert: x509.Certificate,
    ca_cert: x509.Certificate,
) -> bytes:
    """The secret in `blob`, after every check; PrivacyError naming the first that fails.

    `senders` are the sites this job accepts a key from (its key site). The checks, in order: the blob is
    for this site and this job, from an accepted sender, whose certificate this project's root CA issued
    and whose key signed the blob; it was wrapped for this site's current key; and it decrypts.
    """
    parsed = _parse(blob)
    header = parsed.header
    me = identity_from_cert(recipient_cert).name
    if header["recipient"] != me:
        raise PrivacyError(f"wrapped key for {header['recipient']}, not for {me}")
    if header["job"] != job_id:
        raise PrivacyError(f"wrapped key for job {header['job']}, not for this job {job_id}")
    if header["sender"] not in senders:
        accepted = ", ".join(sorted(senders)) or "none"
        raise PrivacyError(f"wrapped key from {header['sender']}, which is not this job's key site ({accepted})")
    try:
        sender_cert = load_cert_pem(header["sender_cert"].encode("ascii"), "sender's certificate")
    except (FedgridError, UnicodeEncodeError) as exc:
        raise PrivacyError(f"wrapped key from {header['sender']}: {exc}") from None
    sender = _site_identity(sender_cert, ca_cert, f"wrapped key from {header['sender']}: sender's certificate")
    if sender.name != header["sender"]:
        raise PrivacyError(f"wrapped key claims to be from {header['sender']} but carries {sender.name}'s certificate")
    try:
        verify_bytes(parsed.body, parsed.signature, public_key_of(sender_cert), what="wrapped key")
    except FedgridError:
        raise PrivacyError(
            f"wrapped key is not signed by {sender.name}'s certificate key: forged, or altered on the way"
        ) from None
    if header["recipient_key"] != key_fingerprint(recipient_cert):
        raise PrivacyError(f"wrapped key for another key of {me} (was {me} provisioned again?); wrap it again")
    key_material = _decode(header["key"], "key")
    nonce = _decode(header["nonce"], "nonce")
    try:
        if header["scheme"] == ECDH_SCHEME and isinstance(recipient_key, ec.EllipticCurvePrivateKey):
            point = ec.EllipticCurvePublicKey.from_encoded_point(recipient_key.curve, key_material)
            aes_key = _ecdh_key(recipient_key.exchange(ec.ECDH(), point), header)
        elif header["scheme"] == RSA_SCHEME and isinstance(recipient_key, rsa.RSAPrivateKey):
            aes_key = recipient_key.decrypt(key_material, _OAEP)
        else:
            raise PrivacyError(f"wrapped key uses {header['scheme']}, which {me}'s key cannot open")
        return AESGCM(aes_key).decrypt(nonce, parsed.ciphertext, parsed.header_bytes)
    except (InvalidTag, ValueError):
        raise PrivacyError(f"wrapped key from {sender.name} does not decrypt: altered after encryption") from None
