"""Large tensor sets on disk, read and written a block at a time, so a process never holds one whole.

The server keeps models above a few MB (and the updates it receives for them) in safetensors files and
folds them block by block: its memory stays a small multiple of one model however large the model is
(bench/aggregation_memory.py). The safetensors library reads files through mmap, and every mapped page
it touches counts in the process's resident memory until the file is closed, so reading a 1 GB update
with it costs 1 GB of RSS; plain reads into one reused buffer cost a block. The header is checked as
strictly as the library does (fedgrid.tensors.parse_header: names, dtypes, shapes, offsets that tile the
data exactly, the file's size); every value is still checked for finiteness by whoever folds it.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from fedgrid.errors import PayloadError
from fedgrid.files import write_atomic
from fedgrid.tensors import SAFETENSORS_DTYPES, Layout, header_length, layout_of, parse_header

BLOCK_BYTES = 1 << 20
"""Bytes read or written at a time."""


class TensorSource(Protocol):
    """Named tensors readable block by block: a file (`TensorFile`) or arrays in memory (`ArraySource`)."""

    layout: Layout

    def blocks(self, name: str, values: int) -> Iterator[np.ndarray]: ...


class ArraySource:
    """Arrays in memory, read like a `TensorFile`."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.arrays = arrays
        self.layout = layout_of(arrays)

    def blocks(self, name: str, values: int) -> Iterator[np.ndarray]:
        flat = np.asarray(self.arrays[name]).reshape(-1)
        for start in range(0, flat.size, max(1, values)):
            yield flat[start : start + values]


class TensorFile:
    """A safetensors file, validated on opening and read tensor by tensor in blocks."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as stream:
                length = header_length(stream.read(8), size, what)
                text = stream.read(length)
        except OSError as exc:
            raise PayloadError(f"{what}: not a readable safetensors file ({str(exc)[:200]})") from None
        self._data_start = 8 + length
        self.layout, self._spans = parse_header(text, size - self._data_start, what)

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def blocks(self, name: str, values: int) -> Iterator[np.ndarray]:
        """The values of tensor `name`, flat, `values` at a time. Each block is a view of one reused
        buffer: use it (or copy it) before asking for the next."""
        spec = self.layout[name]
        dtype = np.dtype(spec.dtype).newbyteorder("<")
        begin, end = self._spans[name]
        step = max(1, values) * dtype.itemsize
        buffer = bytearray(min(step, max(end - begin, 1)))
        with open(self.path, "rb", buffering=0) as stream:
            stream.seek(self._data_start + begin)
            remaining = end - begin
            while remaining > 0:
                view = memoryview(buffer)[: min(step, remaining)]
                got = stream.readinto(view)
                if got != len(view):
                    raise PayloadError(f"{self.what}: the file ended inside tensor {name!r}")
                remaining -= got
                yield np.frombuffer(view, dtype=dtype)


def write_tensor_file(path: Path, layout: Layout, blocks: Callable[[str], Iterator[np.ndarray]]) -> None:
    """Write a safetensors file (whole or not at all) whose tensor `name` is the concatenation of
    `blocks(name)`, each block already in the tensor's dtype; in the order `fedgrid.tensors.encode` uses."""
    order = sorted(layout, key=lambda name: (-np.dtype(layout[name].dtype).itemsize, name))
    header: dict[str, dict[str, object]] = {}
    offset = 0
    for name in order:
        spec = layout[name]
        nbytes = math.prod(spec.shape) * np.dtype(spec.dtype).itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def chunks() -> Iterator[bytes | memoryview]:
        yield struct.pack("<Q", len(text)) + text
        for name in order:
            written, expected = 0, header[name]["data_offsets"]
            dtype = np.dtype(layout[name].dtype).newbyteorder("<")
            for block in blocks(name):
                data = np.ascontiguousarray(block, dtype=dtype).view(np.uint8).reshape(-1)
                written += data.size
                yield memoryview(data)
            if written != expected[1] - expected[0]:  # type: ignore[index,operator]
                raise PayloadError(f"{path.name}: tensor {name!r} got {written} bytes of data, not its size")

    write_atomic(path, chunks())


def copy_file(source: Path, target: Path) -> None:
    """Copy a file whole or not at all (for models that live on disk)."""

    def chunks() -> Iterator[bytes]:
        with open(source, "rb") as stream:
            while chunk := stream.read(BLOCK_BYTES):
                yield chunk

    write_atomic(target, chunks())
