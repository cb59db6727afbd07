"""Tensor sets on the wire and on disk: safetensors bytes, never pickle.

A model travels as a dict of named numpy arrays serialized with safetensors (a JSON header of names,
dtypes, shapes and offsets, then raw little-endian data). Parsing is done by the safetensors
library, which validates offsets and sizes; on top of that every received set is checked against the
layout the receiver expects before a single value is used.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load as st_load
from safetensors.numpy import load_file as st_load_file

from fedgrid.errors import LayoutError, NonFiniteError, PayloadError
from fedgrid.files import write_atomic

FORMAT = "safetensors"
ALLOWED_DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"})

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]


Layout = dict[str, TensorSpec]


def layout_of(arrays: Mapping[str, np.ndarray]) -> Layout:
    return {name: TensorSpec(str(a.dtype), tuple(a.shape)) for name, a in arrays.items()}


SAFETENSORS_DTYPES = {
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint8": "U8",
    "bool": "BOOL",
}
"""numpy dtype name -> safetensors dtype code, for the dtypes in ALLOWED_DTYPES."""


def encode(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialize named arrays to safetensors bytes, with one copy of the data.

    The format is an 8-byte little-endian header length, a JSON header padded with spaces to a
    multiple of 8, and the tensors' bytes back to back (largest item size first, then by name, so each
    tensor stays aligned). The safetensors library's own writer makes two copies and took 8x longer for
    a 2.7 MB model, on the path of every update and every global model; decoding still goes through it.
    """
    header: dict[str, dict[str, object]] = {}
    parts: list[np.ndarray] = []
    offset = 0
    ordered = sorted(arrays.items(), key=lambda item: (-np.asarray(item[1]).dtype.itemsize, item[0]))
    for name, value in ordered:
        shape = list(np.shape(value))
        array = np.ascontiguousarray(value)  # (makes a 0-d array 1-d: the header keeps `shape`)
        code = SAFETENSORS_DTYPES.get(array.dtype.name)
        if code is None:
            raise PayloadError(f"tensor {name!r} has dtype {array.dtype}, which fedgrid does not send")
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        header[str(name)] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + array.nbytes]}
        parts.append(array.reshape(-1).view(np.uint8))
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([struct.pack("<Q", len(text)), text, *parts])


def decode(data: bytes, what: str = "tensor set") -> Arrays:
    """Parse safetensors bytes; anything malformed raises PayloadError naming `what`."""
    try:
        arrays = st_load(data)
    except (SafetensorError, ValueError, TypeError, OSError) as exc:
        raise PayloadError(f"{what}: not a valid safetensors payload ({exc})") from exc
    _check_dtypes(arrays, what)
    return arrays


def save_file(arrays: Mapping[str, np.ndarray], path: Path) -> None:
    """Write named arrays to a .safetensors file, whole or not at all."""
    write_atomic(path, encode(arrays))


def load_file(path: Path, what: str | None = None) -> Arrays:
    what = what or str(path)
    try:
        arrays = st_load_file(str(path))
    except (SafetensorError, ValueError, TypeError, OSError) as exc:
        raise PayloadError(f"{what}: not a valid safetensors file ({exc})") from exc
    _check_dtypes(arrays, what)
    return arrays


def check_file(path: Path, what: str | None = None) -> None:
    """Check a .safetensors file without loading it whole: it parses, holds at least one tensor, every
    dtype is one fedgrid uses, and every floating-point value is finite (read one tensor at a time)."""
    what = what or str(path)
    codes = {code: name for name, code in SAFETENSORS_DTYPES.items()}
    try:
        with safe_open(str(path), framework="numpy") as file:
            names = list(file.keys())
            if not names:
                raise PayloadError(f"{what}: holds no tensors")
            for name in names:
                code = file.get_slice(name).get_dtype()
                if code not in codes:
                    raise PayloadError(
                        f"{what}: tensor {name!r} has dtype {code}, which fedgrid does not use "
                        f"(use one of {', '.join(sorted(codes))})"
                    )
            for name in names:
                if codes[file.get_slice(name).get_dtype()].startswith("float"):
                    check_finite({name: file.get_tensor(name)}, what)
    except (SafetensorError, ValueError, TypeError, OSError) as exc:
        raise PayloadError(f"{what}: not a valid safetensors file ({exc})") from exc


def _check_dtypes(arrays: Mapping[str, np.ndarray], what: str) -> None:
    for name, array in arrays.items():
        if str(array.dtype) not in ALLOWED_DTYPES:
            raise PayloadError(f"{what}: tensor {name!r} has unsupported dtype {array.dtype}")


def check_layout(arrays: Mapping[str, np.ndarray], expected: Layout, what: str) -> None:
    """Raise PayloadError unless `arrays` has exactly the expected names, dtypes and shapes."""
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        raise LayoutError(f"{what}: tensor names differ from the global model ({'; '.join(parts)})")
    for name, spec in expected.items():
        array = arrays[name]
        if tuple(array.shape) != spec.shape:
            raise LayoutError(f"{what}: tensor {name!r} has shape {tuple(array.shape)}, expected {spec.shape}")
        if str(array.dtype) != spec.dtype:
            raise LayoutError(f"{what}: tensor {name!r} has dtype {array.dtype}, expected {spec.dtype}")


def check_finite(arrays: Mapping[str, np.ndarray], what: str) -> None:
    """Refuse NaN or infinite values: one bad update would poison the global model."""
    for name, array in arrays.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise NonFiniteError(f"{what}: tensor {name!r} contains NaN or infinite values")
