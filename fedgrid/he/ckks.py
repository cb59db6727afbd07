"""CKKS through SEAL's bindings in TenSEAL: the one module of fedgrid that imports TenSEAL.

TenSEAL is the heavy, optional piece; everything else in fedgrid.he deals in bytes, numpy arrays and
the ciphertext objects handed out here, and learns of SEAL's refusals as `SealError`.

- **Two values per slot.** A CKKS slot holds a complex number and a sum adds real and imaginary parts
  apart, so values go in pairs, a + bi: N values per ciphertext where a real vector (TenSEAL's
  CKKSVector, FLARE) gets N/2. Half the ciphertexts: half the bytes, encryption, addition and
  decryption. TenSEAL's vectors take real numbers only, so this module drives SEAL through TenSEAL's
  `sealapi` bindings (encoder, encryptor, evaluator, decryptor).
- SEAL's calls here do not release the GIL, so threads buy nothing (measured): streams go one
  ciphertext at a time instead.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import tenseal
import tenseal.sealapi as seal

from fedgrid.errors import EncryptionError
from fedgrid.he.params import HEParams

TENSEAL_VERSION = tenseal.__version__


class SealError(Exception):
    """SEAL refused an input; the message is SEAL's own, the caller says what and where."""


class SealFiles:
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
        # Written over and then cut, not emptied first: the file keeps its pages from one load to the next.
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
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


def new_keys(params: HEParams) -> tuple[bytes, bytes, bytes]:
    """SEAL's bytes of (encryption parameters, a fresh secret key, a public key under asymmetric encryption or b"").

    Only the keys encryption needs: never relinearization or Galois keys.
    """
    try:
        context, encryption_parameters = _seal_context(params)
        parms = SealFiles.save(encryption_parameters)
        keys = seal.KeyGenerator(context)
        secret_key = SealFiles.save(keys.secret_key())
        public_key = b""
        if params.encryption == "asymmetric":
            key = seal.PublicKey()
            keys.create_public_key(key)
            public_key = SealFiles.save(key)
    except (ValueError, RuntimeError) as exc:
        raise EncryptionError(f"SEAL refused the HE parameters {params.describe()}: {exc}") from exc
    return parms, secret_key, public_key


class Engine:
    """SEAL's objects for one HE context: encoder and evaluator, and the encryptor and decryptor its keys allow.

    Build it with `load`.
    """

    def __init__(self, params: HEParams, context: Any, secret_key: Any = None, public_key: Any = None) -> None:
        self.context = context
        self.encoder = seal.CKKSEncoder(context)
        self.evaluator = seal.Evaluator(context)
        self.decryptor = seal.Decryptor(context, secret_key) if secret_key is not None else None
        self.symmetric = params.encryption == "symmetric"
        key = secret_key if self.symmetric else public_key
        self.encryptor = seal.Encryptor(context, key) if key is not None else None
        self.scale = 2.0**params.scale_bits
        self.parms_id = list(context.first_parms_id())

    @classmethod
    def load(cls, params: HEParams, parms_raw: bytes, secret_raw: bytes, public_raw: bytes, where: str) -> Engine:
        """From SEAL's bytes (an empty key: none), checked against `params`; EncryptionError names `where`."""
        context, _ = _seal_context(params)
        try:
            parms = SealFiles.load(seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS), parms_raw)
            secret_key = SealFiles.load(seal.SecretKey(), secret_raw, context) if secret_raw else None
            public_key = SealFiles.load(seal.PublicKey(), public_raw, context) if public_raw else None
        except (ValueError, RuntimeError, TypeError) as exc:
            raise EncryptionError(f"{where}: the SEAL parameters or keys do not load ({exc})") from exc
        found = (parms.poly_modulus_degree(), [m.bit_count() for m in parms.coeff_modulus()])
        if found != (params.poly_modulus_degree, list(params.coeff_mod_bit_sizes)):
            raise EncryptionError(f"{where}: the SEAL parameters do not match the parameters recorded with it")
        return cls(params, context, secret_key, public_key)

    def encrypt(self, values: np.ndarray) -> bytes:
        """SEAL's bytes of one fresh ciphertext of float64 `values` (at most 2 per slot; an odd count is padded)."""
        if values.size % 2:
            values = np.append(values, 0.0)
        # Two values per slot: a slot holds a complex number, and sums add real and imaginary parts apart.
        slots = np.ascontiguousarray(values).view(np.complex128).tolist()
        try:
            plain = seal.Plaintext()
            self.encoder.encode(slots, self.scale, plain)
            if self.symmetric:
                # SEAL's serializable form: the random half of the ciphertext goes as the seed it came
                # from, and loading expands it again. Half the bytes of a full ciphertext.
                ciphertext = self.encryptor.encrypt_symmetric(plain)  # type: ignore[union-attr]
            else:
                ciphertext = seal.Ciphertext()
                self.encryptor.encrypt(plain, ciphertext)  # type: ignore[union-attr]
        except (ValueError, RuntimeError) as exc:
            raise SealError(str(exc)) from exc
        return SealFiles.save(ciphertext)

    def load_ciphertext(self, data: bytes | memoryview) -> Any:
        """A ciphertext from SEAL's bytes, which SEAL checks against this context (SealError if they do not load)."""
        try:
            return SealFiles.load(seal.Ciphertext(), data, self.context)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise SealError(str(exc)) from exc

    def is_fresh(self, ciphertext: Any) -> bool:
        """As encryption leaves it: two polynomials, this context's scale, top level, NTT form."""
        return (
            ciphertext.size() == 2
            and ciphertext.scale == self.scale
            and list(ciphertext.parms_id()) == self.parms_id
            and ciphertext.is_ntt_form()
        )

    def add_into(self, ciphertext: Any, other: Any) -> None:
        """ciphertext += other."""
        self.evaluator.add_inplace(ciphertext, other)

    @staticmethod
    def save(ciphertext: Any) -> bytes:
        return SealFiles.save(ciphertext)

    def decrypt(self, ciphertext: Any) -> np.ndarray:
        """The float64 values of a ciphertext, two per slot (SealError if SEAL cannot decrypt it)."""
        try:
            plain = seal.Plaintext()
            self.decryptor.decrypt(ciphertext, plain)  # type: ignore[union-attr]
            decoded = self.encoder.decode_complex(plain)  # a list: TenSEAL's binding returns no array
            slots = np.fromiter(decoded, dtype=np.complex128, count=len(decoded))
        except (ValueError, RuntimeError) as exc:
            raise SealError(str(exc)) from exc
        return slots.view(np.float64)
