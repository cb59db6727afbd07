"""CKKS parameters of a project (the `he:` section of project.yml) and every check on them.

Kept apart from SEAL so that a parameter problem is explained in project.yml's terms before any key
exists. A sum needs no multiplication, and that decides the defaults (measured in bench/he_codec.py):

- **One data prime.** Ciphertexts carry only the primes before the last of `coeff_mod_bit_sizes`;
  the last is SEAL's key-switching ("special") prime, which the keys carry and a sum never uses. With
  no rescaling there is no modulus chain to pay for: one 56-bit prime holds the weighted sum (8 bits
  for |values| ≤ 256, 20 for a total weight ≤ 2^20, 26 of scale, 2 of sign and margin) where FLARE's
  configuration carries 60+40 bits. With two values per slot: an update is 1.9x its float32 bytes
  (an aggregate, no longer seeded, 3.8x), where FLARE's vectors take 14.6x.
- **56 bits, not 60.** SEAL zstd-compresses the residues, byte by byte: a 56-bit residue in a 64-bit
  word costs ~60.5 bits, 60 bits cost 64.
- **Symmetric encryption.** Sites hold the secret key anyway; encrypting with it has a tenth of the
  public-key noise (3.5 bits more precision) and takes half the time, and a fresh symmetric ciphertext
  travels in SEAL's seeded form: its random polynomial as the seed it came from, half the bytes.

Security: `coeff_mod_bit_sizes` must add up to at most the 128-bit bound of the HomomorphicEncryption.org
standard for the degree (ternary secret; SEAL enforces the same table), 218 bits for N=8192.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedgrid.errors import ProjectFileError

# Largest total coefficient modulus (bits) at 128-bit classical security, ternary secret: the
# HomomorphicEncryption.org standard (2018), the table SEAL enforces. 2048 is left out: its 54 bits
# cannot hold a weighted sum at useful precision.
MAX_COEFF_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
PRIME_BITS = (30, 60)  # SEAL's largest prime is 60 bits; below 30 there are too few NTT primes for big N
MIN_PRECISION_BITS = 12  # bits after the point, per unit of total weight, that a mean must keep
ENCRYPTIONS = ("symmetric", "asymmetric")


def noise_bits(degree: int, encryption: str) -> float:
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
        if not is_int(degree) or degree not in MAX_COEFF_BITS:
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
            if not is_int(size) or not PRIME_BITS[0] <= size <= PRIME_BITS[1]:
                raise ProjectFileError(
                    f"{where}: coeff_mod_bit_sizes[{index}] must be an integer from {PRIME_BITS[0]} to "
                    f"{PRIME_BITS[1]} (the bits of one prime), got {size!r}"
                )

        scale_bits = value.get("scale_bits", default.scale_bits)
        if not is_int(scale_bits) or scale_bits < 1:
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
                f"primes, but a weighted sum of values up to max_abs_value {num(self.max_abs_value)} with a total "
                f"weight up to max_total_weight {num(self.max_total_weight)} needs {need}; lower scale_bits, "
                "max_abs_value or max_total_weight, or use larger data primes"
            )
        precision = self.scale_bits - noise_bits(degree, self.encryption)
        if precision < MIN_PRECISION_BITS:
            raise ProjectFileError(
                f"{where}: scale_bits {self.scale_bits} is too small: encryption noise (about "
                f"2^{noise_bits(degree, self.encryption):.1f} at poly_modulus_degree {degree}, {self.encryption}) "
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
        return 2.0 ** (noise_bits(self.poly_modulus_degree, self.encryption) - self.scale_bits) / total_weight

    def describe(self) -> str:
        primes = "+".join(map(str, self.coeff_mod_bit_sizes[:-1]))
        return (
            f"CKKS N={self.poly_modulus_degree} data primes {primes} bits (+{self.coeff_mod_bit_sizes[-1]} "
            f"special), scale 2^{self.scale_bits}, {self.encryption}, |values| <= {num(self.max_abs_value)}, "
            f"total weight <= {num(self.max_total_weight)}"
        )


def num(value: float) -> str:
    """A number as people write it: 1048576, not 1.04858e+06."""
    return f"{value:.12g}"


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON and YAML give both)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _ceil_log2(value: float) -> int:
    return math.ceil(math.log2(value))
