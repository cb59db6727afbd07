"""Tensors to one flat run of float64 values and back, in name order: what a stream's ciphertexts hold.

Shared by the stream header (which lists the tensors) and by encryption and decryption (which
flatten, check and restore them); no SEAL here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedgrid.errors import LayoutError, NonFiniteError, PayloadError
from fedgrid.he.params import HEParams, num
from fedgrid.tensors import ALLOWED_DTYPES

INT_SHIFT_BITS = 12  # integer tensors (BatchNorm's num_batches_tracked, ...) are encrypted as x / 2^12


@dataclass(frozen=True)
class Spec:
    """One tensor of a stream: name, dtype and shape."""

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


def specs_from_layout(layout: Mapping[str, Any]) -> list[Spec]:
    """Specs in name order from names to objects with .dtype and .shape (like fedgrid.tensors.Layout)."""
    return [Spec(name, str(layout[name].dtype), tuple(int(d) for d in layout[name].shape)) for name in sorted(layout)]


def chunk_lengths(specs: list[Spec], slots: int) -> list[int]:
    """How many values each ciphertext holds, `slots` at most."""
    total = sum(spec.size for spec in specs)
    return [min(slots, total - start) for start in range(0, total, slots)]


def compare_layout(got: list[Spec], expected: list[Spec], against: str, what: str) -> None:
    """LayoutError naming the first difference between two layouts."""
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
        raise LayoutError(f"{what}: tensor names differ from {against} ({'; '.join(parts)})")
    wanted = {s.name: s for s in expected}
    for spec in got:
        other = wanted[spec.name]
        if spec.shape != other.shape:
            raise LayoutError(f"{what}: tensor {spec.name!r} has shape {spec.shape}, {against} has {other.shape}")
        if spec.dtype != other.dtype:
            raise LayoutError(f"{what}: tensor {spec.name!r} has dtype {spec.dtype}, {against} has {other.dtype}")


def flatten(arrays: Mapping[str, Any], params: HEParams, what: str) -> tuple[list[Spec], np.ndarray]:
    """Checked float64 copy of all values in name order, integer tensors shifted, ready for weighting."""
    if not arrays:
        raise PayloadError(f"{what}: no tensors to encrypt")
    specs, values = [], []
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        if not isinstance(name, str) or str(array.dtype) not in ALLOWED_DTYPES:
            allowed = ", ".join(sorted(ALLOWED_DTYPES))
            raise PayloadError(f"{what}: tensor {name!r} has dtype {array.dtype}; allowed: {allowed}")
        specs.append(Spec(name, str(array.dtype), tuple(array.shape)))
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
            raise NonFiniteError(f"{what}: tensor {spec.name!r} contains NaN or infinite values")
        if largest * spec.shift > params.max_abs_value:
            limit = params.max_abs_value / spec.shift
            raise PayloadError(
                f"{what}: tensor {spec.name!r} holds values up to {largest:.6g} in magnitude, above the {num(limit)} "
                "that he.max_abs_value allows for it; raise max_abs_value in project.yml (costs precision)"
            )
        if spec.shift != 1.0:
            part *= spec.shift
    return specs, flat


def unflatten(specs: list[Spec], flat: np.ndarray) -> dict[str, np.ndarray]:
    """The tensors back in their dtypes: integers unshifted, rounded and clipped to their range."""
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
