"""CKKS homomorphic encryption for FedAvg: the server adds site updates it cannot read.

This is the only module that imports TenSEAL. A round with encryption goes

    site    u = n·x           its update x scaled by its sample count n, then encrypted (secret-key context)
    server  Σu, Σn            ciphertexts added with a context that holds no key at all; weights in plaintext
    site    Σu / Σn           decrypted and divided: the new global model

A sum needs no multiplication, and that decides the parameters (measured in bench/he_codec.py):

- **Two values per slot.** A CKKS slot holds a complex number and a sum adds real and imaginary parts
  apart, so values go in pairs, a + bi: N values per ciphertext where a real vector (TenSEAL's
  CKKSVector, FLARE) gets N/2. Half the ciphertexts: half the bytes, encryption, addition and
  decryption. TenSEAL's vectors take real numbers only, so this module drives SEAL through
  TenSEAL's `sealapi` bindings (encoder, encryptor, evaluator, decryptor).
- **One data prime.** Ciphertexts carry only the primes before the last of `coeff_mod_bit_sizes`;
  the last is SEAL's key-switching ("special") prime, which the keys carry and a sum never uses. With
  no rescaling there is no modulus chain to pay for: one 56-bit prime holds the weighted sum (8 bits
  for |values| ≤ 256, 20 for a total weight ≤ 2^20, 26 of scale, 2 of sign and margin) where FLARE's
  configuration carries 60+40 bits. With the pairs: 3.8x the float32 bytes, where FLARE's vectors take 14.6x.
- **56 bits, not 60.** SEAL zstd-compresses the residues, byte by byte: a 56-bit residue in a 64-bit
  word costs ~60.5 bits, 60 bits cost 64.
- **Symmetric encryption.** Sites hold the secret key anyway; encrypting with it has a tenth of the
  public-key noise (3.5 bits more precision) and takes half the time. (The bindings do not expose
  SEAL's seeded serialization, which would halve the bytes of a fresh symmetric ciphertext.)
- **One ciphertext per record**, N values each, so encryption, upload, server addition and decryption
  all stream; SEAL's calls here do not release the GIL, so threads buy nothing (measured).

Security: `coeff_mod_bit_sizes` must add up to at most the 128-bit bound of the HomomorphicEncryption.org
standard for the degree (ternary secret; SEAL enforces the same table), 218 bits for N=8192. The
server context holds the parameters only: no secret key, no public key, no evaluation keys.

Stream of an encrypted update or aggregate (any re-chunking of the bytes parses the same)::

    b"FGHE" + version (1 byte)
    record*   tag (1 byte) | body length (uint32 LE) | body
      H  header, JSON: context id, parameter fingerprint, weight (n, or Σn), count (updates in it),
         tensors [[name, dtype, shape], ...] in name order (values are flattened in that order)
      C  one SEAL ciphertext (SEAL's serialization): N values, as N/2 complex slots (value 2k the real
         part of slot k, value 2k+1 its imaginary part); the last one padded; ceil(values/N) of them
      E  SHA-256 of every byte before this record; nothing may follow

he_context.bin (the kits' startup/he_context.bin)::

    b"FGHECTX2" | uint32 LE length | JSON {context_id, params, secret_key} | uint32 LE length | body
    body: three sized parts (uint32 LE length, bytes): SEAL encryption parameters, secret key (empty in
    the server's file), public key (asymmetric encryption only)

Decryption adds noise before anything leaves a site. CKKS decryption is approximate: the exact
decrypted values of a ciphertext one holds give away the secret key (Li & Micciancio, Eurocrypt 2021),
and the server holds the aggregate whose decryption, the final model, sites release to it. Gaussian
noise of twice the size of a fresh ciphertext's own noise is added to every decrypted value, so a
released value is no better for an attacker than a fresh RLWE sample with twice SEAL's error. It is
derived from the secret context and the stream's digest: every site gets the same model from the same
aggregate, and decrypting again reveals nothing new. It costs about a third of a bit of precision.
This holds against a server that follows the protocol; one that asks a site to release the decryption
of a ciphertext of its choosing learns that plaintext whatever this module does.

The context id is random per `create_contexts` call, so an update made in another provisioning run is
refused by id even when the parameters are the same (its ciphertexts would load and add to garbage).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, BinaryIO

import numpy as np
import tenseal
import tenseal.sealapi as seal

from fedgrid.errors import EncryptionError, PayloadError, ProjectFileError
from fedgrid.tensors import ALLOWED_DTYPES, TensorSpec

# Largest total coefficient modulus (bits) at 128-bit classical security, ternary secret: the
# HomomorphicEncryption.org standard (2018), the table SEAL enforces. 2048 is left out: its 54 bits
# cannot hold a weighted sum at useful precision.
MAX_COEFF_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
PRIME_BITS = (30, 60)  # SEAL's largest prime is 60 bits; below 30 there are too few NTT primes for big N
MIN_PRECISION_BITS = 12  # bits after the point, per unit of total weight, that a mean must keep
INT_SHIFT_BITS = 12  # integer tensors (BatchNorm's num_batches_tracked, ...) are encrypted as x / 2^12
SEAL_NOISE_SIGMA = 3.2  # standard deviation of SEAL's encryption error per coefficient
FLOOD_FACTOR = 2.0  # decryption noise, per slot, relative to a fresh ciphertext's: SEAL_NOISE_SIGMA·sqrt(N/2)
ENCRYPTIONS = ("symmetric", "asymmetric")

TENSEAL_VERSION = tenseal.__version__
_CONTEXT_MAGIC = b"FGHECTX2"
_STREAM_MAGIC = b"FGHE\x02"
_RECORD = struct.Struct("<cI")
_U32 = struct.Struct("<I")
_MAX_CONTEXT_META = 1 << 20
_MAX_CONTEXT_BODY = 1 << 28
_MAX_HEADER = 1 << 24
_MAX_VALUES = 1 << 34
_READ_SIZE = 1 << 20

Source = Iterable[bytes] | BinaryIO | bytes
"""A stream: its pieces (bytes-like, cut anywhere), a binary file object, or all of it at once."""


# -- parameters ------------------------------------------------------------------------------------


def _noise_bits(degree: int, encryption: str) -> float:
    """Estimated log2 of the largest error of a decrypted slot (encryption and decryption noise), in units of the scale.

    Calibrated with bench/he_codec.py at N=8192: the largest error over 670K slots of a sum of 4 fresh
    ciphertexts was 2^11.0 (symmetric) and 2^14.6 (public key) before decryption noise, 2^11.4 with it;
    it grows with sqrt(N) and with the square root of the number of updates: the estimate is 4x the
    measured error for 4 updates, 2x for 32, and holds up to ~100.
    """
    return 0.5 * math.log2(degree) + (7.0 if encryption == "symmetric" else 10.0)


@dataclass(frozen=True)
class HEParams:
    """CKKS parameters of a project (the `he:` section of project.yml, minus `enabled`)."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (56, 56)
    """Prime sizes in bits: every ciphertext carries all but the last (the data primes)."""
    scale_bits: int = 26
    """CKKS scale 2^scale_bits: the sum's resolution is 2^-scale_bits times the encryption noise."""
    max_abs_value: float = 256.0
    """Largest |value| a site may send (integer tensors: this times 2^12); bigger ones are refused."""
    max_total_weight: float = float(1 << 20)
    """Largest sum of sample counts in one aggregate; the server refuses an update beyond it."""
    encryption: str = "symmetric"

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any], where: str = "he") -> HEParams:
        """Parse and validate; every problem is one ProjectFileError line naming the key."""
        if not isinstance(mapping, Mapping):
            raise ProjectFileError(f"{where}: expected a mapping like {{enabled: true}}, got {type(mapping).__name__}")
        names = [f.name for f in fields(cls)]
        for key in mapping:
            if key not in names and key != "enabled":
                raise ProjectFileError(f"{where}: unknown key {key!r}; allowed: enabled, {', '.join(names)}")
        if "enabled" in mapping and not isinstance(mapping["enabled"], bool):
            raise ProjectFileError(f"{where}: enabled must be true or false, got {mapping['enabled']!r}")
        default = cls()
        value = dict(mapping)

        degree = value.get("poly_modulus_degree", default.poly_modulus_degree)
        if not _is_int(degree) or degree not in MAX_COEFF_BITS:
            raise ProjectFileError(
                f"{where}: poly_modulus_degree must be one of {', '.join(map(str, MAX_COEFF_BITS))} "
                f"(a power of two SEAL supports), got {degree!r}"
            )

        bits = value.get("coeff_mod_bit_sizes", list(default.coeff_mod_bit_sizes))
        if not isinstance(bits, list | tuple) or len(bits) < 2:
            raise ProjectFileError(
                f"{where}: coeff_mod_bit_sizes must be a list of at least two prime sizes in bits, like "
                f"[56, 56] (the data primes every ciphertext carries, then SEAL's special prime), got {bits!r}"
            )
        for index, size in enumerate(bits):
            if not _is_int(size) or not PRIME_BITS[0] <= size <= PRIME_BITS[1]:
                raise ProjectFileError(
                    f"{where}: coeff_mod_bit_sizes[{index}] must be an integer from {PRIME_BITS[0]} to "
                    f"{PRIME_BITS[1]} (the bits of one prime), got {size!r}"
                )

        scale_bits = value.get("scale_bits", default.scale_bits)
        if not _is_int(scale_bits) or scale_bits < 1:
            raise ProjectFileError(f"{where}: scale_bits must be a positive integer, got {scale_bits!r}")

        numbers = {}
        for key in ("max_abs_value", "max_total_weight"):
            number = value.get(key, getattr(default, key))
            if isinstance(number, bool) or not isinstance(number, int | float) or not 0 < number < math.inf:
                raise ProjectFileError(f"{where}: {key} must be a positive number, got {number!r}")
            numbers[key] = float(number)

        encryption = value.get("encryption", default.encryption)
        if encryption not in ENCRYPTIONS:
            raise ProjectFileError(
                f"{where}: encryption must be 'symmetric' (sites encrypt with the secret key they hold: less "
                f"noise, faster) or 'asymmetric' (with a public key), got {encryption!r}"
            )

        params = cls(
            poly_modulus_degree=degree,
            coeff_mod_bit_sizes=tuple(bits),
            scale_bits=scale_bits,
            encryption=encryption,
            **numbers,
        )
        params.validate(where)
        return params

    def validate(self, where: str = "he") -> None:
        """The checks between keys: security bound, room for the weighted sum, precision."""
        degree, bits = self.poly_modulus_degree, self.coeff_mod_bit_sizes
        total, bound = sum(bits), MAX_COEFF_BITS.get(degree)
        if bound is None:
            raise ProjectFileError(f"{where}: poly_modulus_degree must be one of {', '.join(map(str, MAX_COEFF_BITS))}")
        if total > bound:
            raise ProjectFileError(
                f"{where}: coeff_mod_bit_sizes add up to {total} bits, above the {bound} bits that keep "
                f"poly_modulus_degree {degree} at 128-bit security (HomomorphicEncryption.org standard); "
                "use fewer or smaller primes, or a larger poly_modulus_degree"
            )
        data = self.data_bits
        if self.scale_bits > data - 3:
            raise ProjectFileError(
                f"{where}: scale_bits {self.scale_bits} is too large for the {data}-bit data primes "
                f"(coeff_mod_bit_sizes without its last prime): the scaled values would not fit; lower scale_bits"
            )
        need = _ceil_log2(self.max_abs_value) + _ceil_log2(self.max_total_weight)
        room = data - 2 - self.scale_bits
        if need > room:
            raise ProjectFileError(
                f"{where}: scale_bits {self.scale_bits} leaves {room} bits of headroom in the {data}-bit data "
                f"primes, but a weighted sum of values up to max_abs_value {_num(self.max_abs_value)} with a total "
                f"weight up to max_total_weight {_num(self.max_total_weight)} needs {need}; lower scale_bits, "
                "max_abs_value or max_total_weight, or use larger data primes"
            )
        precision = self.scale_bits - _noise_bits(degree, self.encryption)
        if precision < MIN_PRECISION_BITS:
            raise ProjectFileError(
                f"{where}: scale_bits {self.scale_bits} is too small: encryption noise (about "
                f"2^{_noise_bits(degree, self.encryption):.1f} at poly_modulus_degree {degree}, {self.encryption}) "
                f"leaves a mean {precision:.1f} bits per unit of total weight, fewer than {MIN_PRECISION_BITS}; "
                "raise scale_bits"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; `from_dict(to_dict())` gives the same parameters."""
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "max_abs_value": self.max_abs_value,
            "max_total_weight": self.max_total_weight,
            "encryption": self.encryption,
        }

    @property
    def slots(self) -> int:
        """CKKS slots per ciphertext: complex numbers, each carrying two values."""
        return self.poly_modulus_degree // 2

    @property
    def values_per_ciphertext(self) -> int:
        return 2 * self.slots

    @property
    def data_bits(self) -> int:
        """Bits of the modulus a ciphertext carries (all primes but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def fingerprint(self) -> str:
        """Short digest of the parameters, carried by every stream."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def error_bound(self, total_weight: float) -> float:
        """Estimated largest absolute error of a decrypted mean over `total_weight` samples."""
        return 2.0 ** (_noise_bits(self.poly_modulus_degree, self.encryption) - self.scale_bits) / total_weight

    def describe(self) -> str:
        primes = "+".join(map(str, self.coeff_mod_bit_sizes[:-1]))
        return (
            f"CKKS N={self.poly_modulus_degree} data primes {primes} bits (+{self.coeff_mod_bit_sizes[-1]} "
            f"special), scale 2^{self.scale_bits}, {self.encryption}, |values| <= {_num(self.max_abs_value)}, "
            f"total weight <= {_num(self.max_total_weight)}"
        )


def _num(value: float) -> str:
    """A number as people write it: 1048576, not 1.04858e+06."""
    return f"{value:.12g}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ceil_log2(value: float) -> int:
    return math.ceil(math.log2(value))


# -- contexts --------------------------------------------------------------------------------------


class _Files:
    """TenSEAL binds SEAL's save and load to file paths only: an anonymous in-memory file per thread
    (memfd, never on disk) stands in, so that keys and ciphertexts go to and from bytes."""

    _local = threading.local()

    @classmethod
    def _path(cls) -> tuple[int, str]:
        owner, fd = getattr(cls._local, "file", (0, -1))
        if owner != os.getpid():  # a forked child shares its parent's file: it needs one of its own
            fd = os.memfd_create("fedgrid-he", os.MFD_CLOEXEC)
            cls._local.file = (os.getpid(), fd)
        return fd, f"/proc/self/fd/{fd}"

    @classmethod
    def save(cls, obj: Any) -> bytes:
        """SEAL's own serialization of `obj` (zstd-compressed where SEAL was built with it)."""
        fd, path = cls._path()
        os.ftruncate(fd, 0)
        obj.save(path)
        return os.pread(fd, os.fstat(fd).st_size, 0)

    @classmethod
    def load(cls, obj: Any, data: bytes | memoryview, *context: Any) -> Any:
        """Fill `obj` from `data`; SEAL checks it against `context` (raises ValueError/RuntimeError if not valid)."""
        fd, path = cls._path()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        obj.load(*context, path)
        return obj


def _seal_context(params: HEParams) -> tuple[Any, Any]:
    """A SEAL CKKS context for `params`, and its encryption parameters."""
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes)))
    context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise EncryptionError(
            f"SEAL refused the HE parameters {params.describe()}: {context.parameters_error_message()}"
        )
    return context, parms


def create_contexts(params: HEParams) -> tuple[bytes, bytes]:
    """(context with the secret key, for every site kit; context without any key, for the server kit).

    Both carry the same fresh random context id. Only the keys encryption needs are kept: the
    secret key (plus the public key under asymmetric encryption); never relinearization or Galois keys.
    """
    params.validate("HEParams")
    try:
        context, encryption_parameters = _seal_context(params)
        parms = _Files.save(encryption_parameters)
        keys = seal.KeyGenerator(context)
        secret_key = _Files.save(keys.secret_key())
        public_key = b""
        if params.encryption == "asymmetric":
            key = seal.PublicKey()
            keys.create_public_key(key)
            public_key = _Files.save(key)
    except (ValueError, RuntimeError) as exc:
        raise EncryptionError(f"SEAL refused the HE parameters {params.describe()}: {exc}") from exc
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
    """A loaded he_context.bin: SEAL context and keys, context id and parameters. Build it with `load`."""

    def __init__(
        self,
        context_id: str,
        params: HEParams,
        context: Any,
        secret_key: Any = None,
        public_key: Any = None,
        flood_key: bytes = b"",
    ) -> None:
        self.context_id = context_id
        self.params = params
        self._seal = context
        self._encoder = seal.CKKSEncoder(context)
        self._evaluator = seal.Evaluator(context)
        self._decryptor = seal.Decryptor(context, secret_key) if secret_key is not None else None
        key = secret_key if params.encryption == "symmetric" else public_key
        self._encryptor = seal.Encryptor(context, key) if key is not None else None
        self._flood_key = flood_key  # secret: derived from the secret key, seeds decryption noise
        self._scale = 2.0**params.scale_bits
        self._parms_id = list(context.first_parms_id())
        data_primes = len(params.coeff_mod_bit_sizes) - 1
        raw = 2 * params.poly_modulus_degree * data_primes * 8  # two polynomials of 64-bit residues
        self._max_record = raw + raw // 64 + 4096  # room for headers and incompressible zstd blocks

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
        context, _ = _seal_context(params)
        try:
            parms = _Files.load(seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS), parms_raw)
            secret_key = _Files.load(seal.SecretKey(), secret_raw, context) if secret_raw else None
            public_key = _Files.load(seal.PublicKey(), public_raw, context) if public_raw else None
        except (ValueError, RuntimeError, TypeError) as exc:
            raise EncryptionError(f"{where}: the SEAL parameters or keys do not load ({exc})") from exc
        found = (parms.poly_modulus_degree(), [m.bit_count() for m in parms.coeff_modulus()])
        if found != (params.poly_modulus_degree, list(params.coeff_mod_bit_sizes)):
            raise EncryptionError(f"{where}: the SEAL parameters do not match the parameters recorded with it")
        if (secret_key is not None) != secret_flag:
            raise EncryptionError(f"{where}: the secret-key flag does not match the keys in the file")
        if secret_flag and params.encryption == "asymmetric" and public_key is None:
            raise EncryptionError(f"{where}: asymmetric encryption, but the file holds no public key")
        if expect_secret_key is not None and secret_flag != expect_secret_key:
            raise EncryptionError(
                f"{where}: holds a secret key, which the server must never have; use the server kit's context"
                if secret_flag
                else f"{where}: holds no secret key; a site needs the context from a site kit"
            )
        flood_key = hashlib.sha256(b"fedgrid he decryption noise\0" + secret_raw).digest() if secret_flag else b""
        return cls(context_id, params, context, secret_key, public_key, flood_key)

    @property
    def has_secret_key(self) -> bool:
        return self._decryptor is not None

    @property
    def can_encrypt(self) -> bool:
        return self._encryptor is not None

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


# -- layout ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def shift(self) -> float:
        """Factor applied before encryption: integer tensors are scaled down to fit max_abs_value."""
        return 1.0 if np.dtype(self.dtype).kind == "f" else 2.0**-INT_SHIFT_BITS


def _specs_from_layout(layout: Mapping[str, Any]) -> list[_Spec]:
    return [_Spec(name, str(layout[name].dtype), tuple(int(d) for d in layout[name].shape)) for name in sorted(layout)]


def _chunk_lengths(specs: list[_Spec], slots: int) -> list[int]:
    total = sum(spec.size for spec in specs)
    return [min(slots, total - start) for start in range(0, total, slots)]


def _compare_layout(got: list[_Spec], expected: list[_Spec], against: str, what: str) -> None:
    if got == expected:
        return
    names, expected_names = {s.name for s in got}, {s.name for s in expected}
    missing, extra = sorted(expected_names - names), sorted(names - expected_names)
    if missing or extra:
        parts = [
            f"{label} {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
            for label, items in (("missing", missing), ("unexpected", extra))
            if items
        ]
        raise PayloadError(f"{what}: tensor names differ from {against} ({'; '.join(parts)})")
    wanted = {s.name: s for s in expected}
    for spec in got:
        other = wanted[spec.name]
        if spec.shape != other.shape:
            raise PayloadError(f"{what}: tensor {spec.name!r} has shape {spec.shape}, {against} has {other.shape}")
        if spec.dtype != other.dtype:
            raise PayloadError(f"{what}: tensor {spec.name!r} has dtype {spec.dtype}, {against} has {other.dtype}")


def _flatten(arrays: Mapping[str, Any], params: HEParams, what: str) -> tuple[list[_Spec], np.ndarray]:
    """Checked float64 copy of all values in name order, integer tensors shifted, ready for weighting."""
    if not arrays:
        raise PayloadError(f"{what}: no tensors to encrypt")
    specs, values = [], []
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        if not isinstance(name, str) or str(array.dtype) not in ALLOWED_DTYPES:
            allowed = ", ".join(sorted(ALLOWED_DTYPES))
            raise PayloadError(f"{what}: tensor {name!r} has dtype {array.dtype}; allowed: {allowed}")
        specs.append(_Spec(name, str(array.dtype), tuple(array.shape)))
        values.append(array)
    flat = np.empty(sum(spec.size for spec in specs), dtype=np.float64)
    offset = 0
    for spec, array in zip(specs, values, strict=True):
        part = flat[offset : offset + spec.size]
        part[:] = array.reshape(-1)
        offset += spec.size
        if not spec.size:
            continue
        largest = max(float(part.max()), -float(part.min()))
        if not math.isfinite(largest):
            raise PayloadError(f"{what}: tensor {spec.name!r} contains NaN or infinite values")
        if largest * spec.shift > params.max_abs_value:
            limit = params.max_abs_value / spec.shift
            raise PayloadError(
                f"{what}: tensor {spec.name!r} holds values up to {largest:.6g} in magnitude, above the {_num(limit)} "
                "that he.max_abs_value allows for it; raise max_abs_value in project.yml (costs precision)"
            )
        if spec.shift != 1.0:
            part *= spec.shift
    return specs, flat


def _unflatten(specs: list[_Spec], flat: np.ndarray) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    offset = 0
    for spec in specs:
        part = flat[offset : offset + spec.size]
        offset += spec.size
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            out[spec.name] = part.astype(dtype).reshape(spec.shape)
            continue
        part = np.rint(part / spec.shift)
        if dtype.kind != "b":
            info = np.iinfo(dtype)
            part = np.clip(part, info.min, info.max)
        out[spec.name] = part.astype(dtype).reshape(spec.shape)
    return out


# -- stream framing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    weight: float
    count: int
    specs: list[_Spec]


class _Framer:
    """Writes records and keeps the running digest that the end record carries."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def _emit(self, data: bytes) -> bytes:
        self._digest.update(data)
        return data

    def start(self, ctx: HEContext, header: _Header) -> bytes:
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


class _Reader:
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

    def take(self, n: int, hashed: bool = True) -> bytes:
        if not self._fill(n):
            raise PayloadError(
                f"{self.what}: the stream ends early, after {self._consumed + len(self._chunk)} bytes "
                "(truncated upload?)"
            )
        data = bytes(self._chunk[self._pos : self._pos + n])
        self._pos += n
        self._consumed += n
        if hashed:
            self._digest.update(data)
        return data

    def record(self, tag: bytes, limit: int, name: str) -> bytes:
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


def _read_header(reader: _Reader, ctx: HEContext) -> _Header:
    what = reader.what
    if reader.take(len(_STREAM_MAGIC)) != _STREAM_MAGIC:
        raise PayloadError(f"{what}: not a fedgrid encrypted stream (bad magic or version)")
    try:
        head = json.loads(reader.record(b"H", _MAX_HEADER, "header"))
        context_id, fingerprint = head["context_id"], head["params"]
        weight, count, tensors = head["weight"], head["count"], head["tensors"]
    except (ValueError, KeyError, TypeError) as exc:
        raise PayloadError(f"{what}: unreadable header ({exc})") from exc
    if context_id != ctx.context_id:
        raise EncryptionError(
            f"{what}: encrypted with HE context {str(context_id)[:12]}..., not this federation's "
            f"{ctx.context_id[:12]}...; the site's kit comes from another provisioning run"
        )
    if fingerprint != ctx.params.fingerprint:
        raise EncryptionError(f"{what}: encrypted with other HE parameters than this context's")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= ctx.params.max_total_weight:
        raise PayloadError(f"{what}: weight {weight!r} is not a positive number up to he.max_total_weight")
    if not _is_int(count) or count < 1:
        raise PayloadError(f"{what}: update count {count!r} is not a positive integer")
    specs = _parse_specs(tensors, what)
    return _Header(float(weight), count, specs)


def _parse_specs(tensors: Any, what: str) -> list[_Spec]:
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
            and all(_is_int(d) and d >= 0 for d in entry[2])
        )
        if not ok:
            raise PayloadError(f"{what}: malformed tensor entry in the header: {str(entry)[:80]}")
        specs.append(_Spec(entry[0], entry[1], tuple(entry[2])))
    names = [s.name for s in specs]
    if names != sorted(set(names)):
        raise PayloadError(f"{what}: tensor names in the header are not unique and sorted")
    if sum(s.size for s in specs) > _MAX_VALUES:
        raise PayloadError(f"{what}: the header describes more than {_MAX_VALUES} values")
    return specs


def _read_ciphertext(reader: _Reader, ctx: HEContext, index: int) -> Any:
    """One ciphertext record, loaded and checked against the context before anyone uses it."""
    body = reader.record(b"C", ctx._max_record, f"ciphertext {index}")
    try:
        ciphertext = _Files.load(seal.Ciphertext(), body, ctx._seal)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise PayloadError(
            f"{reader.what}: ciphertext {index} is corrupt or not valid for this HE context ({exc})"
        ) from exc
    if (
        ciphertext.size() != 2
        or ciphertext.scale != ctx._scale
        or list(ciphertext.parms_id()) != ctx._parms_id
        or not ciphertext.is_ntt_form()
    ):
        raise PayloadError(
            f"{reader.what}: ciphertext {index} does not have the expected form "
            f"(scale 2^{ctx.params.scale_bits}, fresh size, top level)"
        )
    return ciphertext


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
            f"({_num(params.max_total_weight)}), got {weight!r}"
        )
    specs, flat = _flatten(arrays, params, what)
    flat *= float(weight)
    return _encrypt_stream(ctx, _Header(float(weight), 1, specs), flat, what)


def _encrypt_stream(ctx: HEContext, header: _Header, flat: np.ndarray, what: str) -> Iterator[bytes]:
    framer = _Framer()
    yield framer.start(ctx, header)
    per = ctx.params.values_per_ciphertext
    symmetric = ctx.params.encryption == "symmetric"
    encryptor = ctx._encryptor
    for start in range(0, flat.size, per):
        chunk = flat[start : start + per]
        if chunk.size % 2:
            chunk = np.append(chunk, 0.0)
        # Two values per slot: a slot holds a complex number, and sums add real and imaginary parts apart.
        slots = np.ascontiguousarray(chunk).view(np.complex128).tolist()
        try:
            plain, ciphertext = seal.Plaintext(), seal.Ciphertext()
            ctx._encoder.encode(slots, ctx._scale, plain)
            if symmetric:
                encryptor.encrypt_symmetric(plain, ciphertext)
            else:
                encryptor.encrypt(plain, ciphertext)
        except (ValueError, RuntimeError) as exc:
            raise EncryptionError(f"{what}: SEAL could not encrypt values {start}..: {exc}") from exc
        yield framer.record(_Files.save(ciphertext))
    yield framer.end()


# -- server: add -----------------------------------------------------------------------------------


class EncryptedSum:
    """The running encrypted sum of one round: memory O(model), one update folded in at a time.

    Works with a context without keys. `add` is all or nothing: ciphertexts are loaded, checked and
    added into new sums, which replace the running ones only once the whole stream has checked out.
    """

    def __init__(self, ctx: HEContext, layout: Mapping[str, Any] | None = None) -> None:
        self.ctx = ctx
        self._specs: list[_Spec] | None = _specs_from_layout(layout) if layout else None
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
        reader = _Reader(stream, what)
        header = _read_header(reader, self.ctx)
        if self._specs is not None:
            _compare_layout(header.specs, self._specs, self._against, what)
        total = self.total_weight + header.weight
        if total > self.ctx.params.max_total_weight:
            raise PayloadError(
                f"{what}: the round's total sample count would reach {_num(total)}, above he.max_total_weight "
                f"{_num(self.ctx.params.max_total_weight)}; raise it in project.yml and provision again"
            )
        staged = []
        for index in range(len(_chunk_lengths(header.specs, self.ctx.params.values_per_ciphertext))):
            ciphertext = _read_ciphertext(reader, self.ctx, index)
            if self._sums:
                # the new ciphertext becomes the sum; the running one is untouched
                self.ctx._evaluator.add_inplace(ciphertext, self._sums[index])
            staged.append(ciphertext)
        reader.finish()
        self._sums, self._specs = staged, header.specs
        self.total_weight, self.count = total, self.count + header.count

    def serialize(self) -> Iterator[bytes]:
        """The aggregate as a stream in the same format, for the sites to decrypt."""
        if not self.count or self._specs is None:
            raise PayloadError("no encrypted update to aggregate")
        return self._stream(_Header(self.total_weight, self.count, self._specs), list(self._sums))

    def _stream(self, header: _Header, sums: list[Any]) -> Iterator[bytes]:
        framer = _Framer()
        yield framer.start(self.ctx, header)
        for ciphertext in sums:
            yield framer.record(_Files.save(ciphertext))
        yield framer.end()


# -- site: decrypt ---------------------------------------------------------------------------------


def decrypt_update(
    ctx: HEContext,
    stream: Source,
    what: str = "encrypted model",
    *,
    layout: Mapping[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], float]:
    """(the weighted mean in its tensors' dtypes, the total weight) of an update or an aggregate.

    With `layout` (names to objects with .dtype and .shape, like fedgrid.tensors.Layout) a stream
    describing other tensors is refused before anything is decrypted. Memory grows with the
    ciphertexts actually received, not with what the header claims.
    """
    if not ctx.has_secret_key:
        raise EncryptionError(f"{what}: this HE context holds no secret key (a server's context) and cannot decrypt")
    reader = _Reader(stream, what)
    header = _read_header(reader, ctx)
    if layout is not None:
        _compare_layout(header.specs, _specs_from_layout(layout), "this site's model", what)
    parts = []
    for index, length in enumerate(_chunk_lengths(header.specs, ctx.params.values_per_ciphertext)):
        ciphertext = _read_ciphertext(reader, ctx, index)
        try:
            plain = seal.Plaintext()
            ctx._decryptor.decrypt(ciphertext, plain)  # type: ignore[union-attr]
            slots = np.array(ctx._encoder.decode_complex(plain), dtype=np.complex128)
        except (ValueError, RuntimeError) as exc:
            raise EncryptionError(f"{what}: ciphertext {index} does not decrypt ({exc})") from exc
        parts.append(slots.view(np.float64)[:length])
    digest = reader.finish()
    flat = np.concatenate(parts) if parts else np.zeros(0)
    flat += _decryption_noise(ctx, digest, flat.size)
    flat /= header.weight
    return _unflatten(header.specs, flat), header.weight


def _decryption_noise(ctx: HEContext, digest: bytes, size: int) -> np.ndarray:
    """Noise that makes released decryptions useless for key recovery (see the module docstring).

    Seeded by a key only secret-context holders have and by the stream, so every site adds the same
    noise to the same aggregate and the server can neither predict nor average it away.
    """
    params = ctx.params
    sigma = FLOOD_FACTOR * SEAL_NOISE_SIGMA * math.sqrt(params.slots) / 2.0**params.scale_bits
    seed = int.from_bytes(hmac.new(ctx._flood_key, digest, hashlib.sha256).digest(), "little")
    noise = np.random.default_rng(seed).standard_normal(size, dtype=np.float32)  # float32: half the time
    return noise * sigma


def decrypt_mean(
    ctx: HEContext,
    stream: Source,
    what: str = "encrypted model",
    *,
    layout: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """The new global model: the decrypted sum divided by the total weight, same names, shapes, dtypes."""
    return decrypt_update(ctx, stream, what, layout=layout)[0]
