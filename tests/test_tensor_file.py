"""Large models on disk: our block-wise safetensors reader and writer agree with the safetensors library,
refuse malformed files, and folding an update from a file gives the same mean as from memory."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file as st_load_file

from fedgrid import tensors
from fedgrid.errors import PayloadError
from fedgrid.tensor_file import ArraySource, TensorFile, write_tensor_file
from fedserver.aggregation import Clip, WeightedMean

RNG = np.random.default_rng(7)
ARRAYS = {
    "conv.weight": RNG.standard_normal((8, 3, 5, 5)).astype(np.float32),
    "fc.bias": RNG.standard_normal(70_001).astype(np.float32),
    "half": RNG.standard_normal(1000).astype(np.float16),
    "steps": np.array(7, dtype=np.int64),
    "mask": np.array([True, False, True]),
}


def test_a_file_written_in_blocks_is_read_back_exactly_by_the_safetensors_library(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    source = ArraySource(ARRAYS)
    write_tensor_file(path, source.layout, lambda name: source.blocks(name, 1000))
    loaded = st_load_file(str(path))
    assert set(loaded) == set(ARRAYS)
    for name, array in ARRAYS.items():
        np.testing.assert_array_equal(loaded[name], array)
        assert loaded[name].shape == array.shape and loaded[name].dtype == array.dtype
    assert path.read_bytes() == tensors.encode(ARRAYS), "the same bytes as the in-memory writer"


def test_a_file_is_read_in_blocks_of_the_size_asked(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    tensors.save_file(ARRAYS, path)
    opened = TensorFile(path, "model")
    assert opened.layout == tensors.layout_of(ARRAYS)
    blocks = [block.copy() for block in opened.blocks("fc.bias", 30_000)]
    assert [b.size for b in blocks] == [30_000, 30_000, 10_001]
    np.testing.assert_array_equal(np.concatenate(blocks), ARRAYS["fc.bias"])


def _raw(header: object, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x02", "shorter than its header length"),
        (struct.pack("<Q", 1 << 40) + b"{}", "header length"),
        (_raw(["not", "an", "object"], b""), "not a JSON object"),
        (_raw({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8), "unsupported dtype"),
        (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "do not match"),
        (
            _raw(
                {
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
                },
                b"\0" * 12,
            ),
            "gap",
        ),
        (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9), "holds 9"),
        (_raw({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "bad shape"),
    ],
    ids=["short", "huge-header", "not-object", "dtype", "size", "gap", "trailing", "shape"],
)
def test_malformed_files_are_refused_with_the_reason(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(PayloadError, match=message):
        TensorFile(path, "update from site-1")


def test_folding_from_a_file_equals_folding_from_memory_also_with_clipping(tmp_path: Path) -> None:
    floats = {name: a for name, a in ARRAYS.items() if a.dtype.kind == "f"}
    updates = [{n: (a + i).astype(a.dtype) for n, a in floats.items()} for i in range(3)]
    reference = ArraySource(floats)
    for clip in (None, 5.0):
        from_memory, from_files = WeightedMean(reference.layout), WeightedMean(reference.layout)
        for i, update in enumerate(updates):
            path = tmp_path / f"u{i}.safetensors"
            tensors.save_file(update, path)
            bound = Clip(reference, clip) if clip else None
            from_memory.add(ArraySource(update), 10.0 + i, f"u{i}", bound)
            from_files.add(TensorFile(path, f"u{i}"), 10.0 + i, f"u{i}", bound)
        for name in floats:
            np.testing.assert_array_equal(from_memory.result()[name], from_files.result()[name])
