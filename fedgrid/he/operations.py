"""The three steps of an encrypted round: a site encrypts, the server adds, a site decrypts.

    site    u = n·x           its update x scaled by its sample count n, then encrypted (secret-key context)
    server  Σu, Σn            ciphertexts added with a context that holds no key at all; weights in plaintext
    site    Σu / Σn           decrypted and divided: the new global model

Decryption adds noise before anything leaves a site. CKKS decryption is approximate: the exact
decrypted values of a ciphertext one holds give away the secret key (Li & Micciancio, Eurocrypt 2021),
and the server holds the aggregate whose decryption, the final model, sites release to it. Gaussian
noise of twice the size of a fresh ciphertext's own noise is added to every decrypted value, so a
released value is no better for an attacker than a fresh RLWE sample with twice SEAL's error. It is
derived from the secret context and the stream's digest: every site gets the same model from the same
aggregate, and decrypting again reveals nothing new. It costs about a third of a bit of precision.
This holds against a server that follows the protocol; one that asks a site to release the decryption
of a ciphertext of its choosing learns that plaintext whatever this module does.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from fedgrid.errors import EncryptionError, PayloadError
from fedgrid.he.ckks import SealError
from fedgrid.he.context import HEContext
from fedgrid.he.layout import Spec, chunk_lengths, compare_layout, flatten, specs_from_layout, unflatten
from fedgrid.he.params import num
from fedgrid.he.stream import Framer, Header, Reader, Source, read_ciphertext, read_header
from fedgrid.tensors import TensorSpec

SEAL_NOISE_SIGMA = 3.2  # standard deviation of SEAL's encryption error per coefficient
FLOOD_FACTOR = 2.0  # decryption noise, per slot, relative to a fresh ciphertext's: SEAL_NOISE_SIGMA·sqrt(N/2)


# -- site: encrypt ---------------------------------------------------------------------------------


def encrypt_update(
    ctx: HEContext,
    arrays: Mapping[str, Any],
    weight: float,
    *,
    what: str = "encrypted update",
) -> Iterator[bytes]:
    """Check `arrays` now, then yield the stream in pieces as each ciphertext is ready.

    The site encrypts weight·x so that the server's sum is the numerator of the weighted mean.
    Pieces: the header first, then one per ciphertext (~125 KB at the defaults), then the end record.
    """
    if not ctx.can_encrypt:
        raise EncryptionError(f"{what}: this HE context cannot encrypt (it holds no key: a server's context)")
    params = ctx.params
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= params.max_total_weight:
        raise PayloadError(
            f"{what}: the sample count must be a positive number up to he.max_total_weight "
            f"({num(params.max_total_weight)}), got {weight!r}"
        )
    specs, flat = flatten(arrays, params, what)
    flat *= float(weight)
    return _encrypt_stream(ctx, Header(float(weight), 1, specs), flat, what)


def _encrypt_stream(ctx: HEContext, header: Header, flat: np.ndarray, what: str) -> Iterator[bytes]:
    framer = Framer()
    yield framer.start(ctx, header)
    per = ctx.params.values_per_ciphertext
    for start in range(0, flat.size, per):
        try:
            ciphertext = ctx.engine.encrypt(flat[start : start + per])
        except SealError as exc:
            raise EncryptionError(f"{what}: SEAL could not encrypt values {start}..: {exc}") from exc
        yield framer.record(ciphertext)
    yield framer.end()


# -- server: add -----------------------------------------------------------------------------------


class EncryptedSum:
    """The running encrypted sum of one round: memory O(model), one update folded in at a time.

    Works with a context without keys. `add` is all or nothing: ciphertexts are loaded, checked and
    added into new sums, which replace the running ones only once the whole stream has checked out.
    """

    def __init__(self, ctx: HEContext, layout: Mapping[str, Any] | None = None) -> None:
        self.ctx = ctx
        self._specs: list[Spec] | None = specs_from_layout(layout) if layout else None
        self._against = "the global model" if layout else "the first update"
        self._sums: list[Any] = []
        self.total_weight = 0.0
        self.count = 0

    @property
    def layout(self) -> dict[str, TensorSpec] | None:
        """Names, dtypes and shapes every update must have (None until known)."""
        if self._specs is None:
            return None
        return {s.name: TensorSpec(s.dtype, s.shape) for s in self._specs}

    def add(self, stream: Source, what: str = "encrypted update") -> None:
        """Fold in one update (or an aggregate); EncryptionError/PayloadError leave the sum unchanged."""
        reader = Reader(stream, what)
        header = read_header(reader, self.ctx)
        if self._specs is not None:
            compare_layout(header.specs, self._specs, self._against, what)
        total = self.total_weight + header.weight
        if total > self.ctx.params.max_total_weight:
            raise PayloadError(
                f"{what}: the round's total sample count would reach {num(total)}, above he.max_total_weight "
                f"{num(self.ctx.params.max_total_weight)}; raise it in project.yml and provision again"
            )
        staged = []
        for index in range(len(chunk_lengths(header.specs, self.ctx.params.values_per_ciphertext))):
            ciphertext = read_ciphertext(reader, self.ctx, index)
            if self._sums:
                # the new ciphertext becomes the sum; the running one is untouched
                self.ctx.engine.add_into(ciphertext, self._sums[index])
            staged.append(ciphertext)
        reader.finish()
        self._sums, self._specs = staged, header.specs
        self.total_weight, self.count = total, self.count + header.count

    def serialize(self) -> Iterator[bytes]:
        """The aggregate as a stream in the same format, for the sites to decrypt."""
        if not self.count or self._specs is None:
            raise PayloadError("no encrypted update to aggregate")
        return self._stream(Header(self.total_weight, self.count, self._specs), list(self._sums))

    def _stream(self, header: Header, sums: list[Any]) -> Iterator[bytes]:
        framer = Framer()
        yield framer.start(self.ctx, header)
        for ciphertext in sums:
            yield framer.record(self.ctx.engine.save(ciphertext))
        yield framer.end()


# -- site: decrypt ---------------------------------------------------------------------------------


def decrypt_update(
    ctx: HEContext,
    stream: Source,
    what: str = "encrypted model",
    *,
    layout: Mapping[str, Any] | None = None,
    digest: bytes | None = None,
) -> tuple[dict[str, np.ndarray], float]:
    """(the weighted mean in its tensors' dtypes, the total weight) of an update or an aggregate.

    With `layout` (names to objects with .dtype and .shape, like fedgrid.tensors.Layout) a stream
    describing other tensors is refused before anything is decrypted. With `digest` (the name the
    sender gave the stream) a stream that does not end with it is refused, and nothing is returned.
    Memory grows with the ciphertexts actually received, not with what the header claims.
    """
    if not ctx.has_secret_key:
        raise EncryptionError(f"{what}: this HE context holds no secret key (a server's context) and cannot decrypt")
    reader = Reader(stream, what)
    header = read_header(reader, ctx)
    if layout is not None:
        compare_layout(header.specs, specs_from_layout(layout), "this site's model", what)
    parts = []
    for index, length in enumerate(chunk_lengths(header.specs, ctx.params.values_per_ciphertext)):
        ciphertext = read_ciphertext(reader, ctx, index)
        try:
            values = ctx.engine.decrypt(ciphertext)
        except SealError as exc:
            raise EncryptionError(f"{what}: ciphertext {index} does not decrypt ({exc})") from exc
        parts.append(values[:length])
    found = reader.finish()
    if digest is not None and found != digest:
        raise PayloadError(f"{what}: the stream is not the one its sender named (its digest differs)")
    flat = np.concatenate(parts) if parts else np.zeros(0)
    flat += _decryption_noise(ctx, found, flat.size)
    flat /= header.weight
    return unflatten(header.specs, flat), header.weight


def _decryption_noise(ctx: HEContext, digest: bytes, size: int) -> np.ndarray:
    """Noise that makes released decryptions useless for key recovery (see the module docstring).

    Seeded by a key only secret-context holders have and by the stream, so every site adds the same
    noise to the same aggregate and the server can neither predict nor average it away.
    """
    params = ctx.params
    sigma = FLOOD_FACTOR * SEAL_NOISE_SIGMA * math.sqrt(params.slots) / 2.0**params.scale_bits
    seed = int.from_bytes(hmac.new(ctx.flood_key, digest, hashlib.sha256).digest(), "little")
    noise = np.random.default_rng(seed).standard_normal(size, dtype=np.float32)  # float32: half the time
    noise *= sigma
    return noise


def decrypt_mean(
    ctx: HEContext,
    stream: Source,
    what: str = "encrypted model",
    *,
    layout: Mapping[str, Any] | None = None,
    digest: bytes | None = None,
) -> dict[str, np.ndarray]:
    """The new global model: the decrypted sum divided by the total weight, same names, shapes, dtypes."""
    return decrypt_update(ctx, stream, what, layout=layout, digest=digest)[0]
