"""FedAvg arithmetic (the weighted mean, weighted metrics), the safetensors codec and the server
settings that need plaintext: pure functions, no daemons. The round loop runs on real daemons in
tests/test_rounds.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedgrid import tensors
from fedgrid.errors import PayloadError
from fedgrid.tensor_file import ArraySource
from fedserver.aggregation import MAX_WEIGHT, WeightedMean, weighted_metrics

LAYOUT_ARRAYS = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}


def test_weighted_mean_weights_by_sample_count() -> None:
    mean = WeightedMean(tensors.layout_of(LAYOUT_ARRAYS))
    mean.add(ArraySource({"w": np.full((3, 2), 1.0, np.float32), "b": np.ones(2, np.float32)}), 1.0, "a")
    mean.add(ArraySource({"w": np.full((3, 2), 4.0, np.float32), "b": np.full(2, 4.0, np.float32)}), 3.0, "b")
    result = mean.result()
    assert result["w"].dtype == np.float32
    np.testing.assert_allclose(result["w"], 3.25)
    assert mean.total_weight == 4.0 and mean.count == 2


def test_half_precision_updates_are_averaged_in_float32_and_do_not_overflow() -> None:
    layout = {"h": np.zeros(3, np.float16)}
    mean = WeightedMean(tensors.layout_of(layout))
    mean.add(ArraySource({"h": np.full(3, 60000.0, np.float16)}), 1000.0, "a")
    mean.add(ArraySource({"h": np.full(3, 59968.0, np.float16)}), 3000.0, "b")
    result = mean.result()["h"]
    assert result.dtype == np.float16
    np.testing.assert_array_equal(result, np.float16(59976.0))


@pytest.mark.parametrize(
    ("update", "weight", "message"),
    [
        ({"w": np.zeros((3, 2), np.float32)}, 1.0, "missing b"),
        ({"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}, 1.0, "shape"),
        ({"w": np.zeros((3, 2), np.float64), "b": np.zeros(2, np.float32)}, 1.0, "dtype"),
        ({"w": np.full((3, 2), np.nan, np.float32), "b": np.zeros(2, np.float32)}, 1.0, "NaN"),
        ({"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}, 0.0, "sample count"),
        ({"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}, 1e308, "sample count"),
        ({"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}, float("inf"), "sample count"),
    ],
)
def test_a_bad_update_is_refused_and_changes_nothing(update: dict, weight: float, message: str) -> None:
    mean = WeightedMean(tensors.layout_of(LAYOUT_ARRAYS))
    mean.add(ArraySource({"w": np.full((3, 2), 2.0, np.float32), "b": np.ones(2, np.float32)}), 2.0, "good")
    with pytest.raises(PayloadError, match=message):
        mean.add(ArraySource(update), weight, "bad")
    assert mean.count == 1
    np.testing.assert_allclose(mean.result()["w"], 2.0)


def test_huge_sample_counts_within_the_bound_cannot_overflow_the_mean() -> None:
    mean = WeightedMean(tensors.layout_of(LAYOUT_ARRAYS))
    for sign in (1, -1, 1):
        big = {"w": np.full((3, 2), sign * 1.7e38, np.float32), "b": np.full(2, -sign * 1.7e38, np.float32)}
        mean.add(ArraySource(big), MAX_WEIGHT, "big")
    result = mean.result()
    assert np.isfinite(result["w"]).all() and np.isfinite(result["b"]).all()
    np.testing.assert_allclose(result["w"], 1.7e38 / 3, rtol=1e-5)
    with pytest.raises(PayloadError, match="out-of-range"):
        mean.add(ArraySource({"w": np.full((3, 2), 3e38, np.float32), "b": np.zeros(2, np.float32)}), 1.0, "huge")


def test_weighted_metrics_skip_missing_and_non_finite() -> None:
    got = weighted_metrics([({"accuracy": 0.5, "loss": 1.0}, 100), ({"accuracy": 1.0, "loss": float("nan")}, 300)])
    assert got == {"accuracy": pytest.approx(0.875), "loss": pytest.approx(1.0)}


def test_safetensors_round_trip_refuses_garbage() -> None:
    data = tensors.encode(LAYOUT_ARRAYS)
    assert set(tensors.decode(data)) == {"w", "b"}
    with pytest.raises(PayloadError, match="not a valid safetensors"):
        tensors.decode(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")


def test_decoding_reads_the_librarys_bytes_views_a_received_buffer_and_copies_immutable_bytes() -> None:
    from safetensors.numpy import save as st_save

    rng = np.random.default_rng(1)
    arrays = {"a": rng.standard_normal((4, 3)).astype(np.float32), "b": np.arange(5, dtype=np.int64)}
    data = st_save(arrays)
    received = bytearray(data)
    for source in (data, received):
        decoded = tensors.decode(source)
        assert decoded.keys() == arrays.keys()
        for name, array in arrays.items():
            np.testing.assert_array_equal(decoded[name], array)
            assert decoded[name].flags.writeable and decoded[name].flags.aligned
            assert np.shares_memory(decoded[name], np.frombuffer(received, np.uint8)) == (source is received)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "describes 8 bytes of data, the payload holds"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "'a': data_offsets do not match"),
        ({"a": {"dtype": "C64", "shape": [3], "data_offsets": [0, 12]}}, "'a' has unsupported dtype 'C64'"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            "overlaps or leaves a gap at byte 4",
        ),
        ([1, 2], "header is not a JSON object"),
    ],
)
def test_a_malformed_safetensors_header_is_refused_naming_the_problem(header: object, message: str) -> None:
    import json
    import struct

    text = json.dumps(header).encode()
    with pytest.raises(PayloadError, match=message):
        tensors.decode(struct.pack("<Q", len(text)) + text + bytes(12), what="update from site-1")


def test_our_safetensors_writer_is_read_back_exactly_by_the_safetensors_library(tmp_path: Path) -> None:
    from safetensors.numpy import load_file as st_load_file
    from safetensors.torch import load as torch_load

    rng = np.random.default_rng(0)
    arrays = {
        "f16": rng.standard_normal((3, 5)).astype(np.float16),
        "f32": rng.standard_normal((7, 4)).astype(np.float32),
        "f64.big_endian": rng.standard_normal(6).astype(">f8"),
        "i8": rng.integers(-100, 100, 9).astype(np.int8),
        "i16": rng.integers(-100, 100, (2, 2)).astype(np.int16),
        "i32": np.array(7, np.int32),
        "i64.empty": np.zeros((0, 3), np.int64),
        "u8": rng.integers(0, 255, 5).astype(np.uint8),
        "bool": rng.random(11) > 0.5,
        "f32.transposed": rng.standard_normal((4, 3)).astype(np.float32).T,
    }
    for decoded in (tensors.decode(tensors.encode(arrays)), _saved_and_loaded(arrays, tmp_path, st_load_file)):
        assert set(decoded) == set(arrays)
        for name, array in arrays.items():
            assert decoded[name].shape == array.shape and decoded[name].dtype == array.dtype.newbyteorder("=")
            np.testing.assert_array_equal(decoded[name], array)
    assert torch_load(tensors.encode({"w": np.arange(6, dtype=np.float32)}))["w"].tolist() == list(range(6))
    with pytest.raises(PayloadError, match="'c'.*complex64"):
        tensors.encode({"c": np.zeros(2, np.complex64)})


def _saved_and_loaded(arrays: dict, tmp_path: Path, load_file: object) -> dict:
    tensors.save_file(arrays, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors.tmp").exists()
    return load_file(str(tmp_path / "model.safetensors"))  # type: ignore[operator]


def test_settings_that_need_plaintext_are_refused_with_encryption() -> None:
    from fedgrid.errors import JobSpecError
    from fedgrid.jobspec import parse_server_config

    base = {"num_rounds": 1, "min_clients": 1, "encryption": "ckks"}
    for extra, message in (({"server_lr": 0.5}, "server optimizer"), ({"clip_norm": 1.0}, "clipping on the server")):
        with pytest.raises(JobSpecError, match=f"cannot be combined with .*{message}"):
            parse_server_config({**base, **extra}, "app/config/server.json")
    assert parse_server_config(base, "x").encryption == "ckks"
