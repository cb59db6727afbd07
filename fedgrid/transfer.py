"""Streaming large payloads over gRPC: a header, data chunks, and a trailer with size and SHA-256.

Models, encrypted updates, job packages and results can be far larger than gRPC's default 4 MB
message limit, so they never travel as one message. Every streamed message type in `proto/` has the
same shape (`oneof kind { header; data; trailer }`); the helpers here work for all of them.
The receiver checks the running size against a limit while the bytes arrive (a peer cannot make the
server buffer more than it allows) and checks size and digest at the end before anything is used.

TLS already authenticates every byte on the wire, so the digest is not what stops an attacker in
transit; it names a payload. Streams whose digest nobody relies on (plaintext models and updates, the
bulk of every round) may go without: the sender passes `digest=False`, the receiver decides from the
header with `verify`, and the trailer's size is checked either way.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, BinaryIO, TypeVar

from fedgrid import tensors
from fedgrid.errors import TransferError
from fedgrid.v1 import common_pb2
from fedgrid.wire import encode_data

CHUNK_SIZE = 1 << 20
"""Bytes per data frame: what one stream holds in flight at each end (bench/aggregation_memory.py)."""

MAX_MESSAGE_BYTES = 8 << 20
"""gRPC message limit set on every channel and server: comfortably above one chunk plus headers."""

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Detect a dead peer on idle long-poll streams without application pings.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

SERVER_OPTIONS = [
    *GRPC_OPTIONS,
    # Let clients keep idle long polls and watch streams alive with the pings above (gRPC's default
    # policy answers a ping more often than every 5 minutes with GOAWAY "too_many_pings").
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]

F = TypeVar("F")


def digest_checked(payload_format: str) -> bool:
    """Whether a model or update stream in `payload_format` carries a SHA-256 its receiver checks.

    Ciphertexts do: a site decrypts and releases only global models it can name by their digest.
    Plaintext tensors do not: the server sees them anyway, TLS authenticates them in transit, and
    hashing them cost about a tenth of a round's CPU (bench/round_overhead.py).
    """
    return payload_format != tensors.FORMAT


def split(data: bytes | memoryview, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
    """Cut a buffer into chunk-sized views (no copies)."""
    view = memoryview(data)
    for start in range(0, len(view), chunk_size):
        yield view[start : start + chunk_size]


def frames(
    frame_cls: type[F],
    header: Any,
    pieces: Iterable[bytes | memoryview],
    sha256: bytes | None = None,
    digest: bool = True,
    raw_data: bool = False,
) -> Iterator[F | bytes | memoryview]:
    """Header frame, one data frame per CHUNK_SIZE of the pieces, then the trailer.

    Data frames come out already serialized (see `fedgrid.wire`); send them with the stubs and
    handlers of `fedgrid.wire`. `pieces` may be a generator that produces bytes while earlier frames
    are already on the wire (encryption overlapping upload). Pass `sha256` when the digest of the
    payload is already known, to skip hashing it again, or `digest=False` for a stream whose receiver
    does not verify one (its trailer then carries the size only). `raw_data=True` yields each chunk
    as it is, for a sender that writes the data frame's few header bytes itself (the data lane).
    """
    yield frame_cls(header=header)  # type: ignore[call-arg]
    hasher = None if sha256 or not digest else hashlib.sha256()
    size = 0
    for piece in pieces:
        for chunk in split(piece):
            if not chunk:
                continue
            if hasher is not None:
                hasher.update(chunk)
            size += len(chunk)
            yield chunk if raw_data else encode_data(chunk)
    final = (sha256 or b"") if hasher is None else hasher.digest()
    yield frame_cls(trailer=common_pb2.Trailer(size=size, sha256=final))  # type: ignore[call-arg]


class Chunks:
    """An in-memory sink that keeps the received chunks as they are and joins them once at the end:
    one copy of the payload instead of a growing buffer's several."""

    def __init__(self) -> None:
        self._parts: list[bytes | memoryview] = []
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self._parts.append(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def getvalue(self) -> bytes:
        value = b"".join(self._parts)
        self._parts = [value]
        return value


class Assembler:
    """Checks a stream of frames and writes the data to a sink.

    Feed it every frame in order, then call `finish()`. Any deviation (no header first, a second
    header, data after the trailer, too many bytes, a wrong size or digest) raises TransferError
    naming `what` was being received. `verify(header)` says whether this stream's digest is hashed
    and checked (default: always).
    """

    def __init__(
        self, sink: BinaryIO, *, max_size: int, what: str, verify: Callable[[Any], bool] | None = None
    ) -> None:
        self.sink = sink
        self.max_size = max_size
        self.what = what
        self.verify = verify
        self.header: Any = None
        self.size = 0
        self._digest: Any = None
        self._trailer: common_pb2.Trailer | None = None

    def feed(self, frame: Any) -> None:
        kind = frame.WhichOneof("kind")
        if self._trailer is not None:
            raise TransferError(f"{self.what}: frame after the trailer")
        if kind == "header":
            if self.header is not None:
                raise TransferError(f"{self.what}: second header in one stream")
            self.header = frame.header
            if self.verify is None or self.verify(self.header):
                self._digest = hashlib.sha256()
            return
        if self.header is None:
            raise TransferError(f"{self.what}: stream does not start with a header")
        if kind == "data":
            self.size += len(frame.data)
            if self.size > self.max_size:
                raise TransferError(f"{self.what}: more than the allowed {self.max_size / 1e6:.1f} MB; refused")
            if self._digest is not None:
                self._digest.update(frame.data)
            self.sink.write(frame.data)
        elif kind == "trailer":
            self._trailer = frame.trailer
        else:
            raise TransferError(f"{self.what}: empty frame")

    def finish(self) -> Any:
        """Return the header once the trailer matched what arrived."""
        if self.header is None:
            raise TransferError(f"{self.what}: empty stream")
        if self._trailer is None:
            raise TransferError(f"{self.what}: stream ended before its trailer ({self.size} bytes received)")
        if self._trailer.size != self.size:
            raise TransferError(f"{self.what}: trailer announces {self._trailer.size} bytes, {self.size} arrived")
        if self._digest is not None and self._trailer.sha256 != self._digest.digest():
            raise TransferError(f"{self.what}: SHA-256 digest does not match the data received")
        return self.header

    @property
    def hashing(self) -> bool:
        """Whether this stream's data is being hashed (known once the header arrived)."""
        return self._digest is not None

    @property
    def sha256(self) -> bytes | None:
        """The digest of what arrived, or None for a stream received without verifying one."""
        return None if self._digest is None else self._digest.digest()


def receive(
    frames_in: Iterable[Any], sink: BinaryIO, *, max_size: int, what: str, verify: Callable[[Any], bool] | None = None
) -> Any:
    """Consume a synchronous stream of frames into `sink`; returns the header."""
    assembler = Assembler(sink, max_size=max_size, what=what, verify=verify)
    for frame in frames_in:
        assembler.feed(frame)
    return assembler.finish()


async def receive_async(frames_in: AsyncIterator[Any], sink: BinaryIO, *, max_size: int, what: str) -> Any:
    """Consume an asynchronous stream of frames into `sink`; returns the header."""
    assembler = Assembler(sink, max_size=max_size, what=what)
    async for frame in frames_in:
        assembler.feed(frame)
    return assembler.finish()
