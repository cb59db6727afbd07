"""Tensor sets on the wire and on disk: safetensors bytes, never pickle.

A model travels as a dict of named numpy arrays serialized with safetensors (a JSON header of names,
dtypes, shapes and offsets, then raw little-endian data). Received bytes are parsed here
(`parse_header` checks the header as strictly as the safetensors library does: names, dtypes, shapes,
offsets that tile the data exactly); on top of that every received set is checked against the layout
the receiver expects before a single value is used. Files on disk are read with the library.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
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


MAX_HEADER_BYTES = 100 << 20
DTYPE_OF_CODE = {code: name for name, code in SAFETENSORS_DTYPES.items()}


def header_length(prefix: bytes | memoryview, size: int, what: str) -> int:
    """The length of the JSON header that a safetensors payload of `size` bytes announces in `prefix`, its
    first 8 bytes, checked against the payload's size."""
    if len(prefix) < 8:
        raise PayloadError(f"{what}: not a valid safetensors payload (shorter than its header length)")
    (length,) = struct.unpack_from("<Q", prefix)
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise PayloadError(f"{what}: not a valid safetensors payload (header length {length} is impossible)")
    return length


def parse_header(text: bytes, data_size: int, what: str) -> tuple[Layout, dict[str, tuple[int, int]]]:
    """The layout and the byte span in the data of every tensor of a safetensors header (its JSON `text`),
    checked: known dtypes, shapes, offsets that match them and tile the `data_size` bytes exactly."""
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: bad UTF-8 or JSON, a huge number
        raise PayloadError(f"{what}: not a valid safetensors payload ({str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise PayloadError(f"{what}: the safetensors header is not a JSON object")
    layout: Layout = {}
    spans: dict[str, tuple[int, int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise PayloadError(f"{what}: tensor {name!r}: expected dtype, shape and data_offsets")
        dtype = DTYPE_OF_CODE.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        shape, offsets = entry["shape"], entry["data_offsets"]
        if dtype is None:
            raise PayloadError(f"{what}: tensor {name!r} has unsupported dtype {entry['dtype']!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise PayloadError(f"{what}: tensor {name!r} has a bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise PayloadError(f"{what}: tensor {name!r} has bad data_offsets {offsets!r}")
        begin, end = offsets
        if end - begin != math.prod(shape) * np.dtype(dtype).itemsize or begin < 0:
            raise PayloadError(f"{what}: tensor {name!r}: data_offsets do not match its shape and dtype")
        layout[name] = TensorSpec(dtype, tuple(shape))
        spans[name] = (begin, end)
    position = 0
    for begin, end in sorted(spans.values()):
        if begin != position:
            raise PayloadError(f"{what}: tensor data overlaps or leaves a gap at byte {begin}")
        position = end
    if position != data_size:
        raise PayloadError(f"{what}: the header describes {position} bytes of data, the payload holds {data_size}")
    return layout, spans


def decode(data: bytes | bytearray | memoryview, what: str = "tensor set") -> Arrays:
    """Parse safetensors bytes into writable arrays; anything malformed raises PayloadError naming `what`.

    Arrays decoded from a writable buffer (a job worker receives its task into one: fedgrid.transfer.Buffer)
    are views of it: no copy. From immutable bytes each array is copied, as the safetensors library's loader does.
    That loader takes only `bytes` and copies every tensor: for a 100 MB model, a copy (44 ms here) on
    each task a site receives (bench/transfer.py).
    """
    view = memoryview(data).cast("B")
    start = 8 + header_length(view[:8], len(view), what)
    layout, spans = parse_header(bytes(view[8:start]), len(view) - start, what)
    arrays: Arrays = {}
    for name, spec in layout.items():
        dtype = np.dtype(spec.dtype).newbyteorder("<")
        begin, end = spans[name]
        array = np.frombuffer(view, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin)
        if view.readonly or not array.flags.aligned:
            array = array.copy()
        arrays[name] = array.reshape(spec.shape)
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
