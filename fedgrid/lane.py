"""The data lane: a job worker's task and result streams over a plain mutual-TLS socket.

gRPC costs 1.2–1.7 times this lane's CPU per byte on the same machine (its HTTP/2 framing and the
copies between its buffers; `bench/transfer.py` measures both), and the models and updates are nearly
all of a round's bytes. So the one exchange that carries them, a worker asking for its next task and
answering it, may also travel over the server's data port. Everything else (sites, admins, job
packages, events, upload slots) stays on gRPC, and a worker whose lane fails goes on over gRPC.

The lane carries exactly the protobuf frames of the two gRPC methods it stands in for, `GetTask` and
`SubmitResult`, so both ends share their checks. Each message is one kind byte, a 4-byte big-endian
length and the body:

- `T`: a TaskRequest; the server answers with the task's frames, `F` each, up to the trailer.
- `R`: one ResultFrame; after the trailer the server answers `A` (an Ack) or `E`.
- `E`: a refusal: JSON with the status code name, the error class and the message.

Identity is the same as on the federation port: the TLS handshake requires a certificate that chains
to the project's root CA, and the server reads the site's name from that certificate.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from fedgrid import errors, wire
from fedgrid.grpc_errors import error_from_status, status_of
from fedgrid.kit import Kit
from fedgrid.transfer import MAX_MESSAGE_BYTES
from fedgrid.v1 import common_pb2
from fedgrid.v1 import federation_pb2 as fpb

TASK, FRAME, RESULT, ACK, ERROR = b"T", b"F", b"R", b"A", b"E"
KINDS = (TASK, FRAME, RESULT, ACK, ERROR)
PREFIX = struct.Struct(">cI")
ALPN = "fedgrid-lane/1"
CONNECT_TIMEOUT = 3.0
"""Seconds to reach the data port: a firewall that drops packets costs a worker this long, then it
goes on over gRPC."""
HANDSHAKE_TIMEOUT = 10.0
REPLY_TIMEOUT = 120.0
"""Seconds a worker waits for the server's next byte: above the server's 30 s long poll."""

parse_task_frame = wire.frame_parser(fpb.TaskFrame)
parse_result_frame = wire.frame_parser(fpb.ResultFrame)


class LaneError(errors.TransferError):
    """The lane broke or spoke out of turn; the caller goes on over gRPC."""


class Closed(LaneError):
    """The peer closed the connection between two messages: the normal end of a lane."""


def send(sock: ssl.SSLSocket, kind: bytes, body: bytes | Message) -> None:
    data = body if isinstance(body, bytes) else body.SerializeToString()
    if len(data) < 1 << 16:
        sock.sendall(PREFIX.pack(kind, len(data)) + data)  # one TLS record for a small message
    else:
        sock.sendall(PREFIX.pack(kind, len(data)))
        sock.sendall(data)


def _read_exactly(sock: ssl.SSLSocket, size: int, first: bool = False) -> memoryview:
    # Not a bytearray: every byte is overwritten, so zero-filling a megabyte first would be wasted.
    view, got = memoryview(np.empty(size, dtype=np.uint8)), 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if not n:
            if first and not got:
                raise Closed("the peer closed the data lane")
            raise LaneError(f"the connection closed after {got} of {size} bytes")
        got += n
    return view


def receive(sock: ssl.SSLSocket, limit: int = MAX_MESSAGE_BYTES) -> tuple[bytes, bytes | memoryview]:
    """The next message as (kind, body); a closed connection or a malformed prefix raises LaneError."""
    head = _read_exactly(sock, PREFIX.size, first=True)
    kind, size = PREFIX.unpack(bytes(head))
    if kind not in KINDS:
        raise LaneError(f"unknown message kind {kind!r} on the data lane")
    if size > limit:
        raise LaneError(f"data lane message of {size} bytes, above the limit of {limit}")
    return kind, _read_exactly(sock, size) if size else b""


def error_body(exc: BaseException, where: str) -> bytes:
    """An `E` message's body: a FedgridError keeps its class and message; anything else is INTERNAL."""
    if isinstance(exc, errors.FedgridError):
        code, name, message = status_of(exc), type(exc).__name__, str(exc)
    else:
        code, name, message = grpc.StatusCode.INTERNAL, "", f"{where}: internal error on the server; see the server log"
    return json.dumps({"code": code.name, "error": name, "message": message}).encode()


def error_from_body(body: bytes | memoryview, what: str) -> errors.FedgridError:
    try:
        data = json.loads(bytes(body))
        code = grpc.StatusCode[str(data["code"])]
        return error_from_status(code, f"{what}: {data['message']}", str(data.get("error", "")))
    except (ValueError, KeyError, TypeError):
        return LaneError(f"{what}: the server refused with an unreadable error")


def parse(parser: Any, body: bytes | memoryview, what: str) -> Any:
    try:
        # A data frame is read in place (a view of `body`); any other frame is a small protobuf message.
        return parser(body if body[:1] == wire.DATA_TAG else bytes(body))
    except (DecodeError, TypeError, ValueError) as exc:
        raise LaneError(f"{what}: not a valid frame ({exc})") from None


def client_context(kit: Kit) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=str(kit.root_ca_path))
    context.load_cert_chain(str(kit.cert_path), str(kit.key_path))
    context.set_alpn_protocols([ALPN])
    return context


class Lane:
    """A worker's connection to the server's data port."""

    def __init__(self, kit: Kit, port: int) -> None:
        raw = socket.create_connection((kit.server_host, port), timeout=CONNECT_TIMEOUT)
        try:
            raw.settimeout(HANDSHAKE_TIMEOUT)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = client_context(kit).wrap_socket(raw, server_hostname=kit.server_host)
        except BaseException:
            raw.close()
            raise
        self.sock.settimeout(REPLY_TIMEOUT)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def task(self, request: fpb.TaskRequest) -> Iterator[Any]:
        """GetTask over the lane: the task's frames as they arrive, up to the trailer."""
        send(self.sock, TASK, request)
        while True:
            kind, body = receive(self.sock)
            if kind == ERROR:
                raise error_from_body(body, "receive")
            if kind != FRAME:
                raise LaneError(f"expected a task frame, got message kind {kind!r}")
            frame = parse(parse_task_frame, body, "task frame")
            yield frame
            if frame.WhichOneof("kind") == "trailer":
                return

    def submit(self, frames: Iterable[Message | bytes | memoryview]) -> str:
        """SubmitResult over the lane: send every frame, then wait for the server's answer.

        A memoryview is a chunk of data (`transfer.frames(..., raw_data=True)`): its data frame's tag and
        length go out in front of it, and the chunk itself is never copied.
        """
        for frame in frames:
            if isinstance(frame, memoryview):
                head = wire.DATA_TAG + wire.varint(len(frame))
                self.sock.sendall(PREFIX.pack(RESULT, len(head) + len(frame)) + head)
                self.sock.sendall(frame)
            else:
                send(self.sock, RESULT, frame)
        kind, body = receive(self.sock)
        if kind == ERROR:
            raise error_from_body(body, "send")
        if kind != ACK:
            raise LaneError(f"expected the server's answer to a result, got message kind {kind!r}")
        return common_pb2.Ack.FromString(bytes(body)).message
