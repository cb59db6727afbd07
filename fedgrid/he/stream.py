"""The stream format of an encrypted update or aggregate: records that frame ciphertexts on the wire.

One ciphertext per record, N values each, so encryption, upload, server addition and decryption all
stream; any re-chunking of the bytes parses the same::

    b"FGHE" + version (1 byte)
    record*   tag (1 byte) | body length (uint32 LE) | body
      H  header, JSON: context id, parameter fingerprint, weight (n, or Σn), count (updates in it),
         tensors [[name, dtype, shape], ...] in name order (values are flattened in that order)
      C  one SEAL ciphertext (SEAL's serialization): N values, as N/2 complex slots (value 2k the real
         part of slot k, value 2k+1 its imaginary part); the last one padded; ceil(values/N) of them
      E  SHA-256 of every byte before this record; nothing may follow

Every length is bounded before anything is allocated, and every ciphertext is checked against the
context before anyone uses it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from fedgrid.errors import EncryptionError, PayloadError
from fedgrid.he.ckks import SealError
from fedgrid.he.context import HEContext
from fedgrid.he.layout import Spec
from fedgrid.he.params import HEParams, is_int
from fedgrid.tensors import ALLOWED_DTYPES

_STREAM_MAGIC = b"FGHE\x02"
_RECORD = struct.Struct("<cI")
_MAX_HEADER = 1 << 24
_MAX_VALUES = 1 << 34
_READ_SIZE = 1 << 20

Source = Iterable[bytes] | BinaryIO | bytes
"""A stream: its pieces (bytes-like, cut anywhere), a binary file object, or all of it at once."""


@dataclass(frozen=True)
class Header:
    """What the H record says: total weight, number of updates summed, tensors."""

    weight: float
    count: int
    specs: list[Spec]


class Framer:
    """Writes records and keeps the running digest that the end record carries."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def _emit(self, data: bytes) -> bytes:
        self._digest.update(data)
        return data

    def start(self, ctx: HEContext, header: Header) -> bytes:
        body = json.dumps(
            {
                "context_id": ctx.context_id,
                "params": ctx.params.fingerprint,
                "weight": header.weight,
                "count": header.count,
                "tensors": [[s.name, s.dtype, list(s.shape)] for s in header.specs],
            },
            separators=(",", ":"),
        ).encode()
        return self._emit(_STREAM_MAGIC + _RECORD.pack(b"H", len(body)) + body)

    def record(self, body: bytes) -> bytes:
        return self._emit(_RECORD.pack(b"C", len(body)) + body)

    def end(self) -> bytes:
        return _RECORD.pack(b"E", 32) + self._digest.digest()


class Reader:
    """Pulls bytes from pieces of any size (or a file) and parses records with bounded lengths.

    A record that lies inside one piece is sliced out of it, so a whole stream handed over as one
    piece is never copied as a whole; only records that straddle pieces are joined.
    """

    def __init__(self, source: Source, what: str) -> None:
        read = getattr(source, "read", None)
        if isinstance(source, bytes | bytearray | memoryview):
            self._pieces: Iterator[Any] = iter([source])
        elif callable(read):
            self._pieces = iter(lambda: read(_READ_SIZE), b"")
        else:
            self._pieces = iter(source)
        self._chunk = memoryview(b"")
        self._pos = 0
        self._consumed = 0
        self._digest = hashlib.sha256()
        self.what = what

    def _fill(self, n: int) -> bool:
        """Make n bytes available at self._pos; False when the stream ends first."""
        have = len(self._chunk) - self._pos
        if have >= n:
            return True
        parts = [self._chunk[self._pos :]] if have else []
        while have < n:
            piece = next(self._pieces, None)
            if piece is None:
                self._chunk, self._pos = memoryview(b"".join(parts)), 0
                return False
            view = memoryview(piece).cast("B")
            parts.append(view)
            have += len(view)
        self._chunk = parts[0] if len(parts) == 1 else memoryview(b"".join(parts))
        self._pos = 0
        return True

    def take(self, n: int, hashed: bool = True) -> memoryview:
        """The next n bytes, a view into the piece that holds them (valid until the next call)."""
        if not self._fill(n):
            raise PayloadError(
                f"{self.what}: the stream ends early, after {self._consumed + len(self._chunk)} bytes "
                "(truncated upload?)"
            )
        data = self._chunk[self._pos : self._pos + n]
        self._pos += n
        self._consumed += n
        if hashed:
            self._digest.update(data)
        return data

    def record(self, tag: bytes, limit: int, name: str) -> memoryview:
        found, length = _RECORD.unpack(self.take(_RECORD.size))
        if found != tag:
            raise PayloadError(f"{self.what}: expected the {name} record, found record type {found!r}")
        if length > limit:
            raise PayloadError(f"{self.what}: the {name} record claims {length} bytes, above the limit of {limit}")
        return self.take(length)

    def finish(self) -> bytes:
        """Check the end record and that nothing follows; the stream's digest."""
        expected = self._digest.digest()
        found, length = _RECORD.unpack(self.take(_RECORD.size, hashed=False))
        if found != b"E" or length != 32:
            raise PayloadError(f"{self.what}: expected the end record, found record type {found!r}")
        if self.take(32, hashed=False) != expected:
            raise PayloadError(f"{self.what}: digest mismatch: the stream was changed or corrupted")
        if self._fill(1):
            raise PayloadError(f"{self.what}: unexpected bytes after the end record")
        return expected


def read_header(reader: Reader, ctx: HEContext) -> Header:
    """The magic and the H record, checked against `ctx` (context id, parameters, weight bound)."""
    what = reader.what
    if reader.take(len(_STREAM_MAGIC)) != _STREAM_MAGIC:
        raise PayloadError(f"{what}: not a fedgrid encrypted stream (bad magic or version)")
    try:
        head = json.loads(bytes(reader.record(b"H", _MAX_HEADER, "header")))
        context_id, fingerprint = head["context_id"], head["params"]
        weight, count, tensors = head["weight"], head["count"], head["tensors"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise PayloadError(f"{what}: unreadable header ({str(exc)[:200]})") from None
    if context_id != ctx.context_id:
        raise EncryptionError(
            f"{what}: encrypted with HE context {str(context_id)[:12]}..., not this federation's "
            f"{ctx.context_id[:12]}...; the site's kit comes from another provisioning run"
        )
    if fingerprint != ctx.params.fingerprint:
        raise EncryptionError(f"{what}: encrypted with other HE parameters than this context's")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= ctx.params.max_total_weight:
        raise PayloadError(f"{what}: weight {weight!r} is not a positive number up to he.max_total_weight")
    if not is_int(count) or count < 1:
        raise PayloadError(f"{what}: update count {count!r} is not a positive integer")
    specs = _parse_specs(tensors, what)
    return Header(float(weight), count, specs)


def _parse_specs(tensors: Any, what: str) -> list[Spec]:
    if not isinstance(tensors, list) or not tensors:
        raise PayloadError(f"{what}: the header lists no tensors")
    specs = []
    for entry in tensors:
        ok = (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and entry[1] in ALLOWED_DTYPES
            and isinstance(entry[2], list)
            and all(is_int(d) and d >= 0 for d in entry[2])
        )
        if not ok:
            raise PayloadError(f"{what}: malformed tensor entry in the header: {str(entry)[:80]}")
        specs.append(Spec(entry[0], entry[1], tuple(entry[2])))
    names = [s.name for s in specs]
    if names != sorted(set(names)):
        raise PayloadError(f"{what}: tensor names in the header are not unique and sorted")
    if sum(s.size for s in specs) > _MAX_VALUES:
        raise PayloadError(f"{what}: the header describes more than {_MAX_VALUES} values")
    return specs


def _max_ciphertext_bytes(params: HEParams) -> int:
    """Bound on a C record: two polynomials of 64-bit residues, plus headers and incompressible zstd blocks."""
    raw = 2 * params.poly_modulus_degree * (len(params.coeff_mod_bit_sizes) - 1) * 8
    return raw + raw // 64 + 4096


def read_ciphertext(reader: Reader, ctx: HEContext, index: int) -> Any:
    """One ciphertext record, loaded and checked against the context before anyone uses it."""
    body = reader.record(b"C", _max_ciphertext_bytes(ctx.params), f"ciphertext {index}")
    try:
        ciphertext = ctx.engine.load_ciphertext(body)
    except SealError as exc:
        raise PayloadError(
            f"{reader.what}: ciphertext {index} is corrupt or not valid for this HE context ({exc})"
        ) from exc
    if not ctx.engine.is_fresh(ciphertext):
        raise PayloadError(
            f"{reader.what}: ciphertext {index} does not have the expected form "
            f"(scale 2^{ctx.params.scale_bits}, fresh size, top level)"
        )
    return ciphertext
