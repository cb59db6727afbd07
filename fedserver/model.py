"""A global model as the server holds it: serialized once per round, in memory or in a file.

Small models (up to `MEMORY_LIMIT`, the 2.7 MB MLP of the examples) stay in memory as the bytes every
worker is sent. Larger ones live in a file of the job's folder and are streamed from it, a chunk at a
time, to each worker: with the aggregate folded block by block (fedserver/aggregation.py), the server's
memory stays within a few models above its baseline for any model size.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fedgrid import tensors
from fedgrid.files import write_atomic
from fedgrid.tensor_file import BLOCK_BYTES, ArraySource, TensorFile, TensorSource, copy_file
from fedgrid.transfer import CKKS_FORMAT

MEMORY_LIMIT = 8 << 20
"""Models (and payloads received) up to this size stay in memory; larger ones go to files."""
CKKS_EXPANSION = 2
"""Bytes of a site's encrypted update per byte of its float32 model, with the default CKKS parameters
(1.9: one 56-bit prime, two values per slot, seeded ciphertexts; fedgrid/he/params.py); the aggregate
sent back is twice that. Sizes a job's spools, upload turns and where its aggregate lives: other
parameters only move the point where payloads go to files."""
CKKS_CIPHERTEXT_BYTES = 66 << 10
"""Bytes of one seeded ciphertext with the default CKKS parameters: an encrypted update is a whole number of
them, so a small model's is up to one of them larger than CKKS_EXPANSION says (a 9-value model's is one)."""


@dataclass(frozen=True)
class Model:
    """A serialized global model: `data` in memory, or `path` on disk; the same bytes for every site."""

    payload_format: str
    data: bytes | None = None
    path: Path | None = None
    size: int = 0
    total_weight: float = 0.0
    """HE: the sum of the weights folded into the ciphertexts; sites divide by it."""
    sha256: bytes = b""
    """The digest that names the model: the SHA-256 of its bytes (an encrypted model's: see CKKS_FORMAT)."""

    @classmethod
    def in_memory(cls, payload_format: str, data: bytes, total_weight: float = 0.0) -> Model:
        """A model held as bytes, with its digest computed once here (call off the event loop)."""
        digest = data[-32:] if payload_format == CKKS_FORMAT else hashlib.sha256(data).digest()
        return cls(payload_format, data, None, len(data), total_weight, digest)

    @classmethod
    def on_disk(cls, payload_format: str, path: Path, total_weight: float = 0.0) -> Model:
        """A model held as a file (that nobody changes any more), digested once here."""
        with open(path, "rb") as stream:
            if payload_format == CKKS_FORMAT:
                stream.seek(-32, io.SEEK_END)
                return cls(payload_format, None, path, path.stat().st_size, total_weight, stream.read(32))
            digest = hashlib.sha256()
            while chunk := stream.read(BLOCK_BYTES):
                digest.update(chunk)
        return cls(payload_format, None, path, path.stat().st_size, total_weight, digest.digest())

    def open(self) -> BinaryIO:
        return io.BytesIO(self.data) if self.data is not None else open(self.path, "rb")  # type: ignore[arg-type]

    def chunks(self, size: int) -> Iterator[bytes]:
        """The serialized model, `size` bytes at a time (the bytes themselves when held in memory)."""
        if self.data is not None:
            yield self.data
            return
        with self.open() as stream:
            while chunk := stream.read(size):
                yield chunk

    def source(self, what: str) -> TensorSource:
        """The tensors of a plaintext model, readable block by block wherever the model is."""
        if self.data is not None:
            return ArraySource(tensors.decode(self.data, what=what))
        assert self.path is not None
        return TensorFile(self.path, what)

    def save(self, target: Path) -> None:
        """Write the model to `target`, whole or not at all."""
        if self.data is not None:
            write_atomic(target, self.data)
        elif self.path != target:
            copy_file(self.path, target)  # type: ignore[arg-type]
