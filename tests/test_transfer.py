"""The transfer layer over real gRPC and mutual TLS with provisioned kits: 100 MB each way, and every
way a stream can be wrong (digest, truncation, size, order) refused with a clear message."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from conftest import ProvisionedProject

from fedgrid import transfer
from fedgrid.errors import TransferError
from fedgrid.kit import load_kit
from fedgrid.tls import secure_channel, server_credentials
from fedgrid.v1 import admin_pb2, common_pb2

MB = 1 << 20


class Harness:
    """A gRPC server on the project's admin port with one upload and one download method."""

    def __init__(self, project: ProvisionedProject) -> None:
        self.server_kit = load_kit(project.server)
        self.admin_kit = load_kit(project.admin_roles["project_admin"])
        self.payload = os.urandom(100 * MB)
        self.received: dict[str, object] = {}
        handlers = {
            "Up": grpc.stream_unary_rpc_method_handler(
                self.up,
                request_deserializer=admin_pb2.UploadFrame.FromString,
                response_serializer=common_pb2.Ack.SerializeToString,
            ),
            "UpUnverified": grpc.stream_unary_rpc_method_handler(
                self.up_unverified,
                request_deserializer=admin_pb2.UploadFrame.FromString,
                response_serializer=common_pb2.Ack.SerializeToString,
            ),
            "Down": grpc.unary_stream_rpc_method_handler(
                self.down,
                request_deserializer=admin_pb2.JobRequest.FromString,
                response_serializer=admin_pb2.DownloadFrame.SerializeToString,
            ),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(4), options=transfer.GRPC_OPTIONS)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Transfer", handlers),))
        port = self.server.add_secure_port(f"{project.host}:{project.admin_port}", server_credentials(self.server_kit))
        assert port == project.admin_port
        self.server.start()
        self.channel = secure_channel(self.admin_kit, project.admin_port)

    def up(self, frames: Iterator[admin_pb2.UploadFrame], context: grpc.ServicerContext) -> common_pb2.Ack:
        sink = io.BytesIO()
        try:
            transfer.receive(frames, sink, max_size=101 * MB, what="upload")
        except TransferError as exc:
            context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        self.received["sha256"] = hashlib.sha256(sink.getvalue()).hexdigest()
        return common_pb2.Ack(message=str(len(sink.getvalue())))

    def up_unverified(self, frames: Iterator[admin_pb2.UploadFrame], context: grpc.ServicerContext) -> common_pb2.Ack:
        """Like `up`, for streams whose receiver does not check a digest (plaintext models and updates)."""
        sink = io.BytesIO()
        try:
            transfer.receive(frames, sink, max_size=101 * MB, what="upload", verify=lambda header: False)
        except TransferError as exc:
            context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        self.received["sha256"] = hashlib.sha256(sink.getvalue()).hexdigest()
        return common_pb2.Ack(message=str(len(sink.getvalue())))

    def down(self, request: admin_pb2.JobRequest, context: grpc.ServicerContext) -> Iterator[admin_pb2.DownloadFrame]:
        yield from transfer.frames(
            admin_pb2.DownloadFrame, admin_pb2.DownloadHeader(size=len(self.payload)), transfer.split(self.payload)
        )

    def upload(self, frames: Iterator[admin_pb2.UploadFrame], method: str = "Up") -> common_pb2.Ack:
        call = self.channel.stream_unary(
            f"/test.Transfer/{method}",
            request_serializer=admin_pb2.UploadFrame.SerializeToString,
            response_deserializer=common_pb2.Ack.FromString,
        )
        return call(frames, timeout=120)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)


@pytest.fixture(scope="module")
def harness(provisioned_project: ProvisionedProject) -> Iterator[Harness]:
    h = Harness(provisioned_project)
    yield h
    h.close()


def test_100_mb_upload_arrives_whole(harness: Harness) -> None:
    frames = transfer.frames(
        admin_pb2.UploadFrame, admin_pb2.UploadHeader(size=100 * MB), transfer.split(harness.payload)
    )
    ack = harness.upload(frames)
    assert int(ack.message) == 100 * MB
    assert harness.received["sha256"] == hashlib.sha256(harness.payload).hexdigest()


def test_100_mb_download_arrives_whole(harness: Harness) -> None:
    call = harness.channel.unary_stream(
        "/test.Transfer/Down",
        request_serializer=admin_pb2.JobRequest.SerializeToString,
        response_deserializer=admin_pb2.DownloadFrame.FromString,
    )
    sink = io.BytesIO()
    header = transfer.receive(call(admin_pb2.JobRequest(), timeout=120), sink, max_size=100 * MB, what="download")
    assert header.size == 100 * MB
    assert sink.getvalue() == harness.payload


def _stream(data: bytes, trailer: common_pb2.Trailer | None) -> Iterator[admin_pb2.UploadFrame]:
    yield admin_pb2.UploadFrame(header=admin_pb2.UploadHeader(size=len(data)))
    for chunk in transfer.split(data):
        yield admin_pb2.UploadFrame(data=bytes(chunk))
    if trailer is not None:
        yield admin_pb2.UploadFrame(trailer=trailer)


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (
            lambda d: _stream(d, common_pb2.Trailer(size=len(d), sha256=hashlib.sha256(b"other").digest())),
            "digest does not match",
        ),
        (lambda d: _stream(d, None), "ended before its trailer"),
        (lambda d: _stream(d, common_pb2.Trailer(size=len(d) + 1, sha256=hashlib.sha256(d).digest())), "announces"),
        (lambda d: iter([admin_pb2.UploadFrame(data=d)]), "does not start with a header"),
        (lambda d: _stream(os.urandom(102 * MB), None), "more than the allowed"),
    ],
    ids=["bad-digest", "truncated", "wrong-size", "no-header", "oversized"],
)
def test_bad_streams_are_refused_with_a_clear_message(harness: Harness, frames: object, message: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        harness.upload(frames(os.urandom(3 * MB)))  # type: ignore[operator]
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert message in err.value.details()
    assert (
        harness.upload(transfer.frames(admin_pb2.UploadFrame, admin_pb2.UploadHeader(), [b"still serving"])).message
        == "13"
    )


def test_a_stream_without_digest_is_taken_only_by_a_receiver_that_does_not_check_one(harness: Harness) -> None:
    data = os.urandom(3 * MB + 5)

    def frames(size: int | None = None) -> Iterator[admin_pb2.UploadFrame]:
        sent = transfer.frames(admin_pb2.UploadFrame, admin_pb2.UploadHeader(), [data], digest=False)
        if size is None:
            return sent
        *body, last = list(sent)
        assert last.HasField("trailer") and not last.trailer.sha256
        last.trailer.size = size
        return iter([*body, last])

    assert harness.upload(frames(), "UpUnverified").message == str(len(data))
    assert harness.received["sha256"] == hashlib.sha256(data).hexdigest()
    with pytest.raises(grpc.RpcError) as err:
        harness.upload(frames(), "Up")
    assert "digest does not match" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        harness.upload(frames(len(data) - 1), "UpUnverified")
    assert "announces" in err.value.details()


def test_a_payload_of_one_chunk_is_one_message_and_a_larger_one_is_cut_in_chunks() -> None:
    small = list(transfer.frames(admin_pb2.UploadFrame, admin_pb2.UploadHeader(size=3), [b"abc"]))
    assert len(small) == 1
    assert small[0].HasField("header") and small[0].data == b"abc" and small[0].trailer.size == 3
    empty = list(transfer.frames(admin_pb2.UploadFrame, admin_pb2.UploadHeader(), []))
    assert len(empty) == 1 and empty[0].HasField("header") and empty[0].HasField("trailer")
    data = os.urandom(transfer.CHUNK_SIZE + 1)
    large = list(transfer.frames(admin_pb2.UploadFrame, admin_pb2.UploadHeader(), [data]))
    assert [len(f.data) for f in large] == [transfer.CHUNK_SIZE, 1]
    assert large[0].HasField("header") and not large[0].HasField("trailer")
    assert large[1].HasField("trailer") and not large[1].HasField("header")
    sink = io.BytesIO()
    transfer.receive(iter(large), sink, max_size=len(data), what="test")
    assert sink.getvalue() == data


@pytest.mark.parametrize("mb", [1, 20], ids=["from-the-heap", "own-mapping"])  # below and above MMAP_THRESHOLD
def test_a_model_received_into_a_buffer_decodes_in_place_and_outlives_the_buffer(mb: int) -> None:
    import gc

    import numpy as np

    from fedgrid import tensors

    arrays = {"w": np.arange(mb * MB // 4, dtype=np.float32)}
    data = tensors.encode(arrays)
    buffer = transfer.Buffer(len(data), "task")
    for chunk in transfer.split(data):
        buffer.write(chunk)
    with pytest.raises(TransferError, match="more than the"):
        buffer.write(b"x")
    payload = buffer.getvalue()
    decoded = tensors.decode(payload)
    assert decoded["w"].flags.writeable and np.shares_memory(decoded["w"], np.frombuffer(payload, np.uint8))
    del buffer, payload
    gc.collect()
    np.testing.assert_array_equal(decoded["w"], arrays["w"])
    partial = transfer.Buffer(len(data), "task")
    partial.write(data[:100])
    assert bytes(partial.getvalue()) == data[:100]
