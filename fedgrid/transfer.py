"""Streaming large payloads over gRPC: frames that carry a header, data and a trailer with size and SHA-256.

Models, encrypted updates, job packages and results can be far larger than one gRPC message, so they
travel as a sequence of frames. Every frame type in `proto/` has the same three fields (`header`,
`data`, `trailer`): the first frame carries the header, the last one the trailer, and data may ride
on any of them, so a payload of one chunk (the 2.7 MB MLP) is a single message.
The receiver checks the running size against a limit while the bytes arrive (a peer cannot make the
other end buffer more than it allows) and checks size and digest at the end before anything is used.

TLS already authenticates every byte on the wire, so the digest is not what stops an attacker in
transit; it names a payload. Streams whose digest nobody relies on (plaintext models and updates, the
bulk of every round) may go without: the sender passes `digest=False`, the receiver decides from the
header with `verify`, and the trailer's size is checked either way.
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, BinaryIO, TypeVar

from fedgrid import tensors
from fedgrid.allocator import MMAP_THRESHOLD
from fedgrid.errors import TransferError
from fedgrid.v1 import common_pb2

CHUNK_SIZE = 2 << 20
"""Bytes of data per frame the server sends (models, job packages, downloads): a 2.7 MB model is two
messages, and a stream in flight holds a few MB at each end however large the model (bench/transfer.py)."""
UPLOAD_CHUNK_SIZE = 512 << 10
"""Bytes of data per frame sent to the server (updates, job uploads). gRPC keeps buffers for about one
received message per TLS connection once a large payload has crossed it: with 2 MB frames the server
held 4.3 models above its baseline while 32 sites uploaded a 40 MB update each, with 512 KB frames 2.4
(bench/aggregation_memory.py). The server writes what it spools in 2 MB writes (fedserver/spool.py), so
the smaller frames cost uploads no speed (bench/transfer.py)."""

MAX_MESSAGE_BYTES = 8 << 20
"""gRPC message limit set on every channel and server: comfortably above one chunk plus a header."""

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A fixed flow-control window of 4 MB per stream: a sender is at most that far ahead of what the
    # receiver's application has read. gRPC's bandwidth probe would grow it to ~16 MB on a fast link, and
    # a server receiving large updates or sending large models holds that much per stream
    # (bench/aggregation_memory.py); 4 MB still fills a 50 ms link at 80 MB/s per stream.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 4 << 20),
    # Detect a dead peer on idle long-lived streams without application pings.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A restarted server is found again within 2 s of being back, with gRPC's own reconnect backoff.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]

F = TypeVar("F")

CKKS_FORMAT = "ckks"
"""The payload format of an encrypted model or update: the stream of fedgrid/he/stream.py. An encrypted model
is named by the SHA-256 its stream ends with (of every byte before its end record), which each site checks as
it decrypts: hashing the whole stream once more to name it cost the server and every site 5-6 ms a round at
the quickstart's size."""


def digest_checked(payload_format: str) -> bool:
    """Whether a model or update stream in `payload_format` carries a SHA-256 its receiver checks here.

    Encrypted streams do not: each ends with the SHA-256 of all of it (fedgrid/he/stream.py), which its
    receiver checks as it parses it, and an encrypted global model is named by that digest (a site decrypts
    and releases only global models it can name). Plaintext tensors do not: the server sees them anyway,
    TLS authenticates them in transit, and hashing them cost about a tenth of a round's CPU
    (bench/round_overhead.py). Other payloads (job packages) do.
    """
    return payload_format not in (CKKS_FORMAT, tensors.FORMAT)


def split(data: bytes | memoryview, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes | memoryview]:
    """Cut a buffer into chunk-sized views (no copies; a buffer of one chunk comes back as it is)."""
    if len(data) <= chunk_size:
        yield data
        return
    view = memoryview(data)
    for start in range(0, len(view), chunk_size):
        yield view[start : start + chunk_size]


def frames(
    frame_cls: Callable[..., F],
    header: Any,
    pieces: Iterable[bytes | memoryview],
    sha256: bytes | None = None,
    digest: bool = True,
    chunk_size: int = CHUNK_SIZE,
) -> Iterator[F]:
    """The frames of a payload: the header rides on the first, the trailer on the last, each carries
    at most `chunk_size` bytes of data (UPLOAD_CHUNK_SIZE for what goes to the server). `frame_cls` is a
    frame message class, or `enveloped(...)` to build each frame inside the message that carries it.

    `pieces` may be a generator that produces bytes while earlier frames are already on the wire
    (encryption overlapping upload). Pass `sha256` when the digest of the payload is already known, to
    skip hashing it again, or `digest=False` for a stream whose receiver does not verify one (its
    trailer then carries the size only).
    """
    hasher = None if sha256 or not digest else hashlib.sha256()
    size = 0
    waiting: bytes | memoryview | None = None
    """A chunk held back until the next one shows it is not the last (the last carries the trailer)."""
    first = True
    for piece in pieces:
        for chunk in split(piece, chunk_size):
            if not chunk:
                continue
            if hasher is not None:
                hasher.update(chunk)
            size += len(chunk)
            if waiting is not None:
                yield _frame(frame_cls, header if first else None, waiting, None)
                first = False
            waiting = chunk
    final = (sha256 or b"") if hasher is None else hasher.digest()
    trailer = common_pb2.Trailer(size=size, sha256=final)
    yield _frame(frame_cls, header if first else None, waiting, trailer)


def enveloped(envelope_cls: type[F], field: str) -> Callable[..., F]:
    """A `frame_cls` for `frames` that builds each frame in place inside an `envelope_cls` message's
    `field` (a stream's oneof): the frame's data is copied into the message once. Building the frame
    first and wrapping it copies it again (2 MB: 50 µs in place, 220 µs built then wrapped)."""

    def build(header: Any = None, data: bytes | None = None, trailer: Any = None) -> F:
        message = envelope_cls()
        frame = getattr(message, field)
        frame.SetInParent()
        if header is not None:
            frame.header.CopyFrom(header)
        if data is not None:
            frame.data = data
        if trailer is not None:
            frame.trailer.CopyFrom(trailer)
        return message

    return build


def _frame(frame_cls: Callable[..., F], header: Any, data: bytes | memoryview | None, trailer: Any) -> F:
    fields: dict[str, Any] = {}
    if header is not None:
        fields["header"] = header
    if data is not None:
        fields["data"] = data if isinstance(data, bytes) else bytes(data)
    if trailer is not None:
        fields["trailer"] = trailer
    return frame_cls(**fields)


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


class Buffer:
    """An in-memory sink for a payload whose size the sender announced: each chunk is copied into place as
    it arrives, so nothing is joined at the end, and the result is a writable buffer that
    fedgrid.tensors.decode reads without a copy. More bytes than announced are refused.

    A payload of MMAP_THRESHOLD or more gets a mapping of its own whose pages the kernel provides as the
    chunks land: a bytearray would zero all of them before the first chunk is copied, time the sender
    spends waiting (downloads of 100 MB: 0.55-0.57 of a TCP copy with a bytearray, 0.60-0.71 with the
    mapping; bench/transfer.py). Smaller ones come from the heap, which keeps them from one task to the next.
    """

    def __init__(self, size: int, what: str) -> None:
        self._data = _private_mapping(size) if size >= MMAP_THRESHOLD else bytearray(size)
        self._view = memoryview(self._data)
        self.what = what
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        end = self.size + len(data)
        if end > len(self._data):
            raise TransferError(f"{self.what}: more than the {len(self._data)} bytes announced")
        self._view[self.size : end] = data
        self.size = end
        return len(data)

    def tell(self) -> int:
        return self.size

    def getvalue(self) -> memoryview:
        """The payload (writable): the whole buffer, or what arrived when that was less than announced."""
        return self._view[: self.size]


def _private_mapping(size: int) -> mmap.mmap:
    """Anonymous memory of `size` bytes for one payload.

    Private, not Python's default shared mapping: shared anonymous memory is shmem, whose pages cost more
    to fault in. Filling 100 MB chunk by chunk, 3 s apart: 62-82 ms shared, 45-60 ms private. Huge pages
    (MADV_HUGEPAGE) took 26-33 ms in some runs and 115-120 ms in others, while this VM's host backed them
    again, so they are not asked for.
    """
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


class Assembler:
    """Checks a stream of frames and writes the data to a sink.

    Feed it every frame in order until `done`, then call `finish()`. Any deviation (no header first, a
    second header, data after the trailer, too many bytes, a wrong size or digest) raises TransferError
    naming `what` was being received. `verify(header)` says whether this stream's digest is hashed and
    checked (default: always).
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

    @property
    def done(self) -> bool:
        """True once the trailer arrived: the stream's payload is complete."""
        return self._trailer is not None

    def feed(self, frame: Any) -> None:
        if self._trailer is not None:
            raise TransferError(f"{self.what}: frame after the trailer")
        if frame.HasField("header"):
            if self.header is not None:
                raise TransferError(f"{self.what}: second header in one stream")
            self.header = frame.header
            if self.verify is None or self.verify(self.header):
                self._digest = hashlib.sha256()
        elif self.header is None:
            raise TransferError(f"{self.what}: stream does not start with a header")
        data = frame.data
        if data:
            self.size += len(data)
            if self.size > self.max_size:
                raise TransferError(f"{self.what}: more than the allowed {self.max_size / 1e6:.1f} MB; refused")
            if self._digest is not None:
                self._digest.update(data)
            self.sink.write(data)
        if frame.HasField("trailer"):
            self._trailer = frame.trailer

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
