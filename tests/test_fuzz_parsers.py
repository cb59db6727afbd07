"""Fuzzing, with hypothesis, of every parser that reads bytes from outside: frame streams, job zips, job
configuration files, safetensors headers (in memory and on disk) and encrypted update streams.

Each parser, on arbitrary input and on mutations of valid input, must either succeed or raise one of our
own errors (a FedgridError subclass, which the servicers answer with a clear status); any other exception
would be answered INTERNAL, or worse. The number of examples is bounded so that CI stays fast.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedgrid import he, jobspec, tensors
from fedgrid.errors import FedgridError
from fedgrid.recipe import FedAvgRecipe
from fedgrid.tensor_file import TensorFile
from fedgrid.transfer import Assembler, Chunks
from fedgrid.v1 import common_pb2
from fedgrid.v1 import federation_pb2 as fpb

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
FEW = settings(FUZZ, max_examples=60)


def refused_or_fine(parse: Callable[[], object]) -> None:
    """Run `parse`; anything it raises must be one of ours."""
    try:
        parse()
    except FedgridError as exc:
        assert str(exc), "an error with no message"


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """`original` with a few bytes flipped, cut, inserted or duplicated: inputs close to valid ones."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(("flip", "cut", "insert", "truncate", "repeat")))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif action == "truncate":
            del data[at:]
        elif action == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 256))]
    return bytes(data)


# ----------------------------------------------------------------------------- frames


@st.composite
def frame_sequences(draw: st.DrawFn) -> list[fpb.ResultFrame]:
    sequence = []
    for _ in range(draw(st.integers(0, 6))):
        fields: dict[str, object] = {}
        if draw(st.booleans()):
            fields["header"] = fpb.ResultHeader(task_id=draw(st.text(max_size=8)), num_samples=draw(st.floats()))
        if draw(st.booleans()):
            fields["data"] = draw(st.binary(max_size=300))
        if draw(st.booleans()):
            size = draw(st.integers(0, 2**63 - 1))
            fields["trailer"] = common_pb2.Trailer(size=size, sha256=draw(st.binary(max_size=40)))
        sequence.append(fpb.ResultFrame(**fields))
    return sequence


@FUZZ
@given(frame_sequences(), st.integers(0, 1000), st.booleans())
def test_assembler_takes_any_frame_sequence(sequence: list[fpb.ResultFrame], limit: int, verify: bool) -> None:
    def run() -> None:
        assembler = Assembler(Chunks(), max_size=limit, what="fuzzed stream", verify=lambda _: verify)
        for frame in sequence:
            assembler.feed(frame)
        assembler.finish()

    refused_or_fine(run)


@FUZZ
@given(st.binary(max_size=600), st.integers(1, 3))
def test_a_valid_stream_cut_anywhere_is_taken_whole(data: bytes, pieces: int) -> None:
    """The positive side: well-formed streams, however their data is cut, arrive intact."""
    sink = Chunks()
    assembler = Assembler(sink, max_size=len(data), what="stream")
    step = max(1, len(data) // pieces)
    chunks = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
    for i, chunk in enumerate(chunks):
        fields: dict[str, object] = {"data": chunk}
        if i == 0:
            fields["header"] = fpb.ResultHeader(task_id="t")
        if i == len(chunks) - 1:
            fields["trailer"] = common_pb2.Trailer(size=len(data), sha256=hashlib.sha256(data).digest())
        assembler.feed(fpb.ResultFrame(**fields))
    assert assembler.finish().task_id == "t"
    assert sink.getvalue() == data


# ----------------------------------------------------------------------------- job uploads and configurations


@pytest.fixture(scope="module")
def job_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    recipe = FedAvgRecipe(name="fuzz", model=torch.nn.Linear(4, 1), train_script=SCRIPT, num_rounds=1, min_clients=2)
    return recipe.export(tmp_path_factory.mktemp("fuzz") / "job")


@pytest.fixture(scope="module")
def job_zip(job_folder: Path) -> bytes:
    return jobspec.pack(job_folder)


def _extract(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        jobspec.safe_extract(data, Path(folder), max_bytes=1 << 20, max_files=50)


@FUZZ
@given(st.binary(max_size=2000))
def test_safe_extract_takes_arbitrary_bytes(data: bytes) -> None:
    refused_or_fine(lambda: _extract(data))


@FUZZ
@given(st.data())
def test_safe_extract_takes_mutated_job_zips(job_zip: bytes, data: st.DataObject) -> None:
    refused_or_fine(lambda: _extract(data.draw(mutated(job_zip))))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
CONFIGS = ("meta.json", "app/config/server.json", "app/config/client.json")


def _load_with(job_folder: Path, relative: str, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "job"
        shutil.copytree(job_folder, copy)
        (copy / relative).write_bytes(content)
        jobspec.load_job(copy, known_sites={"site-1", "site-2"})


@FEW
@given(st.sampled_from(CONFIGS), st.data())
def test_load_job_takes_mutated_configuration_bytes(job_folder: Path, relative: str, data: st.DataObject) -> None:
    original = (job_folder / relative).read_bytes()
    refused_or_fine(lambda: _load_with(job_folder, relative, data.draw(mutated(original))))


@FEW
@given(st.sampled_from(CONFIGS), st.text(max_size=12), JSON_VALUES)
def test_load_job_takes_configurations_with_any_value_for_a_key(
    job_folder: Path, relative: str, key: str, value: object
) -> None:
    config = json.loads((job_folder / relative).read_text())
    keys = [*config, key]
    config[keys[len(key) % len(keys)]] = value
    refused_or_fine(lambda: _load_with(job_folder, relative, json.dumps(config).encode()))


# ----------------------------------------------------------------------------- safetensors headers

VALID_TENSORS = tensors.encode(
    {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, dtype=np.float16), "n": np.array(3)}
)


def _with_header(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _parse_both(blob: bytes) -> None:
    refused_or_fine(lambda: tensors.decode(blob, "fuzzed update"))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "update.safetensors"
        path.write_bytes(blob)

        def read_file() -> None:
            source = TensorFile(path, "fuzzed update")
            for name in source.layout:
                for _ in source.blocks(name, 4):
                    pass

        refused_or_fine(read_file)


@FUZZ
@given(st.binary(max_size=300))
def test_tensor_parsers_take_arbitrary_bytes(blob: bytes) -> None:
    _parse_both(blob)


@FUZZ
@given(st.data())
def test_tensor_parsers_take_mutated_files(data: st.DataObject) -> None:
    _parse_both(data.draw(mutated(VALID_TENSORS)))


@FUZZ
@given(
    st.dictionaries(
        st.text(max_size=6),
        st.fixed_dictionaries(
            {"dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "U8", "F8_E4M3", "X"]) | JSON_VALUES},
            optional={
                "shape": st.lists(st.integers(-2, 2**40), max_size=3) | JSON_VALUES,
                "data_offsets": st.lists(st.integers(-8, 2**40), max_size=3) | JSON_VALUES,
            },
        )
        | JSON_VALUES,
        max_size=3,
    ),
    st.binary(max_size=64),
)
def test_tensor_parsers_take_any_header(header: dict, data: bytes) -> None:
    _parse_both(_with_header(json.dumps(header).encode(), data))


@FEW
@given(st.integers(1, 6000), st.sampled_from([b"[", b'{"a":', b"9"]))
@example(5000, b"9")
@example(5000, b"[")
def test_tensor_parsers_take_deep_or_huge_json(depth: int, piece: bytes) -> None:
    _parse_both(_with_header(piece * depth))


# ----------------------------------------------------------------------------- encrypted update streams

SMALL = he.HEParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(56, 40))
HE_SHAPES = {"a": (3, 5), "b": (7,)}


@pytest.fixture(scope="module")
def he_pair() -> tuple[he.HEContext, he.HEContext, bytes]:
    secret, public = he.create_contexts(SMALL)
    site, server = he.HEContext.load(secret), he.HEContext.load(public)
    arrays = {name: np.full(shape, 0.25, dtype=np.float32) for name, shape in HE_SHAPES.items()}
    return site, server, b"".join(he.encrypt_update(site, arrays, 10.0))


def _he_records(stream: bytes) -> list[tuple[bytes, bytes]]:
    records, at = [], 5
    while at < len(stream):
        tag, length = struct.unpack_from("<cI", stream, at)
        records.append((tag, stream[at + 5 : at + 5 + length]))
        at += 5 + length
    return records


def _he_both(site: he.HEContext, server: he.HEContext, stream: bytes) -> None:
    refused_or_fine(lambda: he.EncryptedSum(server).add(stream, "fuzzed update"))
    refused_or_fine(lambda: he.decrypt_update(site, [stream[:100], stream[100:]], "fuzzed model"))


@FEW
@given(st.data())
def test_he_stream_reading_takes_mutated_streams(
    he_pair: tuple[he.HEContext, he.HEContext, bytes], data: st.DataObject
) -> None:
    site, server, stream = he_pair
    _he_both(site, server, data.draw(mutated(stream)))


@FEW
@given(st.text(max_size=4), JSON_VALUES, st.booleans())
def test_he_stream_reading_takes_any_header_value(
    he_pair: tuple[he.HEContext, he.HEContext, bytes], key: str, value: object, deep: bool
) -> None:
    """A stream whose H record says anything, re-framed with a matching digest so that only the header is wrong."""
    site, server, stream = he_pair
    records = _he_records(stream)
    header = json.loads(records[0][1])
    keys = [*header, key]
    header[keys[len(key) % len(keys)]] = value
    body = (b"[" * 5000 + b"]" * 5000) if deep else json.dumps(header).encode()
    out = b"FGHE\x02" + struct.pack("<cI", b"H", len(body)) + body
    for tag, record in records[1:-1]:
        out += struct.pack("<cI", tag, len(record)) + record
    out += struct.pack("<cI", b"E", 32) + hashlib.sha256(out).digest()
    _he_both(site, server, out)


def test_he_stream_unmutated_is_taken(he_pair: tuple[he.HEContext, he.HEContext, bytes]) -> None:
    """The fuzz cases start from a stream that is itself valid."""
    site, server, stream = he_pair
    total = he.EncryptedSum(server)
    total.add(stream)
    arrays, weight = he.decrypt_update(site, stream)
    assert weight == 10.0 and np.allclose(arrays["a"], 0.25, atol=1e-4)
