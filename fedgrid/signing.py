"""Signatures over bytes and over whole folders (signed manifests).

A startup kit carries `startup/signature.json`, a manifest of every other file in `startup/` with
its SHA-256, signed by the project's root CA key: a daemon refuses a kit in which anything was
changed, added or removed after provisioning. Job uploads reuse the same manifest, signed with the
submitting admin's key, so that neither the server nor anyone on the way can alter a job's code.

Keys are ECDSA (signed with ECDSA-SHA256) or RSA (signed with RSA-PSS-SHA256); the algorithm is
taken from the key, so callers never choose one by name.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from fedgrid.errors import ConfigError, TamperedError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

SIGNATURE_FILE = "signature.json"
ECDSA_SHA256 = "ecdsa-sha256"
RSA_PSS_SHA256 = "rsa-pss-sha256"

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# PSS with a salt as long as the digest: the common choice, and verifiable by any TLS library.
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a JSON value that is signed: sorted keys, no spaces, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def algorithm_of(key: PrivateKey | PublicKey) -> str:
    """The signature algorithm a key signs with."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return ECDSA_SHA256
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return RSA_PSS_SHA256
    raise TypeError(f"unsupported key type {type(key).__name__}; fedgrid uses ECDSA or RSA keys")


def sign_bytes(data: bytes, private_key: PrivateKey) -> bytes:
    """Sign `data` with ECDSA-SHA256 or RSA-PSS-SHA256, whichever fits the key."""
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return private_key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(private_key, rsa.RSAPrivateKey):
        return private_key.sign(data, _PSS, hashes.SHA256())
    raise TypeError(f"unsupported key type {type(private_key).__name__}; fedgrid uses ECDSA or RSA keys")


def verify_bytes(data: bytes, signature: bytes, public_key: PublicKey, what: str = "data") -> None:
    """Raise TamperedError ("<what>: signature does not verify") unless `signature` signs `data`."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, _PSS, hashes.SHA256())
        else:
            raise TamperedError(f"{what}: cannot verify with a {type(public_key).__name__}")
    except InvalidSignature:
        raise TamperedError(f"{what}: signature does not verify") from None


def _scan(
    folder: Path, exclude: Iterable[str], error: type[Exception], show: Callable[[str], str] = str
) -> dict[str, Path]:
    """Every regular file under `folder` by posix relative path; `error` for anything else found."""
    excluded = set(exclude)
    found: dict[str, Path] = {}

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = f"{prefix}{entry.name}"
                if rel in excluded:
                    continue
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    walk(Path(entry.path), f"{rel}/")
                elif stat.S_ISREG(mode):
                    found[rel] = Path(entry.path)
                else:
                    what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
                    raise error(f"{show(rel)} is {what}; a signed folder holds regular files only")

    if not folder.is_dir():
        raise error(f"{folder} is not a folder")
    walk(folder, "")
    return found


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def manifest_of(folder: Path, exclude: Iterable[str] = (SIGNATURE_FILE,)) -> dict[str, str]:
    """SHA-256 of every regular file under `folder`, keyed by posix path relative to it.

    Symbolic links and special files are refused (ConfigError): a link could point the signed name
    at content outside the folder, so a signature over it would promise nothing.
    """
    return {rel: _sha256(path) for rel, path in _scan(Path(folder), exclude, ConfigError).items()}


def _signed_part(signer: str, algorithm: str, files: dict[str, str]) -> bytes:
    return canonical_json({"algorithm": algorithm, "files": files, "signer": signer})


def sign_manifest(files: dict[str, str], private_key: PrivateKey, signer: str) -> dict[str, Any]:
    """A JSON-able signed manifest; the signer's name is signed too, so it cannot be swapped."""
    algorithm = algorithm_of(private_key)
    signature = sign_bytes(_signed_part(signer, algorithm, files), private_key)
    return {
        "signer": signer,
        "algorithm": algorithm,
        "files": dict(sorted(files.items())),
        "signature": base64.b64encode(signature).decode("ascii"),
    }


def _check_shape(signed: Any, where: str) -> tuple[str, str, dict[str, str], bytes]:
    if not isinstance(signed, dict) or set(signed) != {"signer", "algorithm", "files", "signature"}:
        raise TamperedError(f"{where}: malformed: expected the keys signer, algorithm, files, signature")
    signer, algorithm, files, signature = (signed[k] for k in ("signer", "algorithm", "files", "signature"))
    if not isinstance(signer, str) or not isinstance(algorithm, str) or not isinstance(signature, str):
        raise TamperedError(f"{where}: malformed: signer, algorithm and signature must be strings")
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _SHA256_HEX.match(v) for k, v in files.items()
    ):
        raise TamperedError(f"{where}: malformed: files must map paths to SHA-256 hex digests")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise TamperedError(f"{where}: malformed: the signature is not base64") from None
    return signer, algorithm, files, raw


def verify_manifest(
    folder: Path,
    signed: Any,
    public_key: PublicKey,
    exclude: Iterable[str] = (SIGNATURE_FILE,),
    label: str | None = None,
) -> str:
    """Check a signed manifest against the folder; return the signer's name.

    Raises TamperedError naming the first problem, with paths shown as `<label>/<relpath>` (label
    defaults to the folder's name): the signature itself, then each path in sorted order — missing,
    changed after signing, or not signed (added after signing).
    """
    folder = Path(folder)
    label = folder.name if label is None else label
    where = f"{label}/{SIGNATURE_FILE}" if label else SIGNATURE_FILE
    signer, algorithm, files, raw = _check_shape(signed, where)
    expected = algorithm_of(public_key)
    if algorithm != expected:
        raise TamperedError(f"{where}: signed with {algorithm}, but the signer's key signs with {expected}")
    verify_bytes(_signed_part(signer, algorithm, files), raw, public_key, what=where)

    def show(rel: str) -> str:
        return f"{label}/{rel}" if label else rel

    present = _scan(folder, exclude, TamperedError, show)
    for rel in sorted(set(files) | set(present)):
        if rel not in present:
            raise TamperedError(f"{show(rel)} is missing")
        if rel not in files:
            raise TamperedError(f"{show(rel)} is not signed (added after signing)")
        if _sha256(present[rel]) != files[rel]:
            raise TamperedError(f"{show(rel)} was changed after signing")
    return signer
