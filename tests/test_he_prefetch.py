"""The server loads an encrypted update while it arrives (fedserver/he_aggregation.py `Prefetch`), with real
TenSEAL contexts and real spools: the aggregate is the one a fold of the whole stream makes, a stream cut
short or corrupted is refused with the fold's own error and leaves the sum as it was, and an upload that
outgrows its share of memory is folded from its file instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fedgrid import he, tensors
from fedgrid.errors import PayloadError
from fedserver.grid import Result
from fedserver.he_aggregation import EncryptedAggregator, Prefetch
from fedserver.spool import Spool
from fedserver.worker_io import UploadSink

SMALL = he.HEParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(56, 40))
SHAPES = {"fc.weight": (40, 200), "fc.bias": (40,)}  # 8,040 values: two ciphertexts
PIECE = 3001  # cuts records anywhere, as frames do


@pytest.fixture(scope="module")
def contexts() -> tuple[he.HEContext, he.HEContext]:
    secret, public = he.create_contexts(SMALL)
    return he.HEContext.load(secret, expect_secret_key=True), he.HEContext.load(public, expect_secret_key=False)


def update(ctx: he.HEContext, seed: int, weight: float) -> bytes:
    rng = np.random.default_rng(seed)
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
    return b"".join(he.encrypt_update(ctx, arrays, weight))


def pieces(stream: bytes) -> list[bytes]:
    return [stream[start : start + PIECE] for start in range(0, len(stream), PIECE)]


def prefetched(ctx: he.HEContext, stream: bytes, site: str = "site-1") -> Prefetch:
    prefetch = Prefetch(ctx, f"update from {site}")
    for piece in pieces(stream):
        prefetch.write(piece)
    prefetch.close()
    return prefetch


def result(site: str, **payload: object) -> Result:
    return Result(site=site, task_id="round-1-train", num_samples=1.0, metrics={}, payload_format="ckks", **payload)


def layout() -> tensors.Layout:
    return {name: tensors.TensorSpec("float32", shape) for name, shape in SHAPES.items()}


def aggregate(aggregator: EncryptedAggregator) -> bytes:
    return b"".join(aggregator._sum.serialize())


def test_updates_loaded_while_they_arrive_add_up_to_the_aggregate_of_whole_streams(
    contexts: tuple[he.HEContext, he.HEContext],
) -> None:
    site, server = contexts
    streams = [update(site, seed, weight) for seed, weight in enumerate([300.0, 120.0, 45.0])]
    whole, loaded = EncryptedAggregator(server, layout()), EncryptedAggregator(server, layout())
    for index, stream in enumerate(streams):
        whole.add(result(f"site-{index}", path=None, data=stream))
        prefetch = prefetched(server, stream, f"site-{index}")
        loaded.add(result(f"site-{index}", path=None, data=stream, loaded=prefetch.result))
    assert loaded.count == 3 and loaded.total_weight == 465.0
    assert aggregate(loaded) == aggregate(whole)


@pytest.mark.parametrize("damage", ["cut", "corrupted"])
def test_a_damaged_update_is_refused_by_the_fold_and_the_sum_stays(
    contexts: tuple[he.HEContext, he.HEContext], damage: str
) -> None:
    site, server = contexts
    good, stream = update(site, 1, 10.0), bytearray(update(site, 2, 20.0))
    if damage == "cut":
        stream = stream[: len(stream) // 2]
    else:
        stream[-1] ^= 0xFF  # the digest its end record carries
    aggregator = EncryptedAggregator(server, layout())
    aggregator.add(result("site-1", path=None, data=good, loaded=prefetched(server, good).result))
    before = aggregate(aggregator)
    bad = prefetched(server, bytes(stream), "site-2")
    expected = "the stream ends early" if damage == "cut" else "digest mismatch"
    with pytest.raises(PayloadError, match=f"update from site-2: {expected}"):
        aggregator.add(result("site-2", path=None, data=bytes(stream), loaded=bad.result))
    assert aggregator.count == 1 and aggregate(aggregator) == before


def test_loader_threads_close_their_in_memory_files(contexts: tuple[he.HEContext, he.HEContext]) -> None:
    site, server = contexts
    stream = update(site, 3, 5.0)
    prefetched(server, stream).result()  # the first may open files that stay (SEAL's own)
    open_files = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        prefetched(server, stream).result()
    assert len(os.listdir("/proc/self/fd")) == open_files


def test_an_upload_that_outgrows_its_memory_share_is_folded_from_its_file(
    tmp_path: Path, contexts: tuple[he.HEContext, he.HEContext]
) -> None:
    site, server = contexts
    stream = update(site, 4, 7.0)
    spool = Spool(tmp_path, "site-1-", expected=len(stream) // 4)  # a quarter fits in its share of memory
    assert spool.in_memory
    sink = UploadSink(spool, Prefetch(server, "update from site-1"))
    for piece in pieces(stream):
        sink.write(piece)
    sink.close()
    assert sink.prefetch is None and not spool.in_memory
    path, data, release = spool.payload()
    assert path is not None and data is None and path.read_bytes() == stream
    folded, whole = EncryptedAggregator(server, layout()), EncryptedAggregator(server, layout())
    folded.add(result("site-1", path=path, on_discard=release))
    whole.add(result("site-1", path=None, data=stream))
    assert aggregate(folded) == aggregate(whole)
    release()
