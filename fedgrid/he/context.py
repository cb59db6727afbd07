"""The HE context file (the kits' startup/he_context.bin): made by provisioning, loaded by sites and server.

One file format, read back with every check before any key is used::

    b"FGHECTX2" | uint32 LE length | JSON {context_id, params, secret_key} | uint32 LE length | body
    body: three sized parts (uint32 LE length, bytes): SEAL encryption parameters, secret key (empty in
    the server's file), public key (asymmetric encryption only)

The server context holds the parameters only: no secret key, no public key, no evaluation keys. The
context id is random per `create_contexts` call, so an update made in another provisioning run is
refused by id even when the parameters are the same (its ciphertexts would load and add to garbage).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import struct

from fedgrid.errors import EncryptionError, ProjectFileError
from fedgrid.he.ckks import Engine, new_keys
from fedgrid.he.params import HEParams

_CONTEXT_MAGIC = b"FGHECTX2"
_U32 = struct.Struct("<I")
_MAX_CONTEXT_META = 1 << 20
_MAX_CONTEXT_BODY = 1 << 28


def create_contexts(params: HEParams) -> tuple[bytes, bytes]:
    """(context with the secret key, for every site kit; context without any key, for the server kit).

    Both carry the same fresh random context id. Only the keys encryption needs are kept: the
    secret key (plus the public key under asymmetric encryption); never relinearization or Galois keys.
    """
    params.validate("HEParams")
    parms, secret_key, public_key = new_keys(params)
    context_id = secrets.token_hex(16)
    secret = _pack_context(context_id, params, True, _sized(parms, secret_key, public_key))
    public = _pack_context(context_id, params, False, _sized(parms, b"", b""))
    return secret, public


def _sized(*parts: bytes) -> bytes:
    return b"".join(_U32.pack(len(part)) + part for part in parts)


def _pack_context(context_id: str, params: HEParams, secret_key: bool, body: bytes) -> bytes:
    meta = json.dumps({"context_id": context_id, "params": params.to_dict(), "secret_key": secret_key}).encode()
    return b"".join((_CONTEXT_MAGIC, _U32.pack(len(meta)), meta, _U32.pack(len(body)), body))


class HEContext:
    """A loaded he_context.bin: context id, parameters, and SEAL's objects (`engine`). Build it with `load`."""

    def __init__(self, context_id: str, params: HEParams, engine: Engine, flood_key: bytes = b"") -> None:
        self.context_id = context_id
        self.params = params
        self.engine = engine
        self.flood_key = flood_key  # secret: derived from the secret key, seeds decryption noise

    @classmethod
    def load(cls, data: bytes, *, expect_secret_key: bool | None = None, where: str = "he_context.bin") -> HEContext:
        """Parse and check a context file; `expect_secret_key=False` is how a server refuses a site's file."""
        view = memoryview(data)
        if bytes(view[: len(_CONTEXT_MAGIC)]) != _CONTEXT_MAGIC:
            raise EncryptionError(
                f"{where}: not a fedgrid HE context of this version (bad magic); provision the project again"
            )
        offset = len(_CONTEXT_MAGIC)
        meta_raw, offset = _take_sized(view, offset, _MAX_CONTEXT_META, where, "metadata")
        body, offset = _take_sized(view, offset, _MAX_CONTEXT_BODY, where, "SEAL parameters and keys")
        if offset != len(view):
            raise EncryptionError(f"{where}: {len(view) - offset} unexpected bytes after the context")
        try:
            meta = json.loads(bytes(meta_raw))
            context_id, raw_params, secret_flag = meta["context_id"], meta["params"], meta["secret_key"]
        except (ValueError, KeyError, TypeError) as exc:
            raise EncryptionError(f"{where}: unreadable metadata ({exc})") from exc
        if not isinstance(context_id, str) or len(context_id) != 32 or not isinstance(secret_flag, bool):
            raise EncryptionError(f"{where}: malformed context id or secret-key flag")
        try:
            params = HEParams.from_dict(raw_params, where=f"{where}: params")
        except ProjectFileError as exc:
            raise EncryptionError(str(exc)) from exc
        parts, inner = [], 0
        for name in ("parameters", "secret key", "public key"):
            part, inner = _take_sized(body, inner, _MAX_CONTEXT_BODY, where, f"SEAL {name}")
            parts.append(bytes(part))
        if inner != len(body):
            raise EncryptionError(f"{where}: unexpected bytes after the SEAL keys")
        parms_raw, secret_raw, public_raw = parts
        engine = Engine.load(params, parms_raw, secret_raw, public_raw, where)
        if (engine.decryptor is not None) != secret_flag:
            raise EncryptionError(f"{where}: the secret-key flag does not match the keys in the file")
        if secret_flag and params.encryption == "asymmetric" and engine.encryptor is None:
            raise EncryptionError(f"{where}: asymmetric encryption, but the file holds no public key")
        if expect_secret_key is not None and secret_flag != expect_secret_key:
            raise EncryptionError(
                f"{where}: holds a secret key, which the server must never have; use the server kit's context"
                if secret_flag
                else f"{where}: holds no secret key; a site needs the context from a site kit"
            )
        flood_key = hashlib.sha256(b"fedgrid he decryption noise\0" + secret_raw).digest() if secret_flag else b""
        return cls(context_id, params, engine, flood_key)

    @property
    def has_secret_key(self) -> bool:
        return self.engine.decryptor is not None

    @property
    def can_encrypt(self) -> bool:
        return self.engine.encryptor is not None

    def __repr__(self) -> str:
        return (
            f"HEContext(id={self.context_id[:12]}, {'secret' if self.has_secret_key else 'public'}, "
            f"{self.params.describe()})"
        )


def _take_sized(view: memoryview, offset: int, limit: int, where: str, what: str) -> tuple[memoryview, int]:
    if offset + 4 > len(view):
        raise EncryptionError(f"{where}: truncated before the {what}")
    (length,) = _U32.unpack_from(view, offset)
    offset += 4
    if length > limit or offset + length > len(view):
        raise EncryptionError(f"{where}: the {what} length {length} is out of bounds (file truncated or corrupt)")
    return view[offset : offset + length], offset + length
