"""The server's end of the data lane (the protocol is in `fedgrid/lane.py`).

Blocking TLS sockets, one thread per connected job worker: this is what makes the lane cheaper than
gRPC (asyncio's TLS costs as much per byte as gRPC does). The threads only move bytes; every task
and result is handled by the same `JobRuntime` methods as on gRPC, on the event loop, so the checks,
the folding and the bookkeeping are the ones the federation port uses.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError

from fedgrid import lane
from fedgrid.errors import ConfigError, FedgridError
from fedgrid.kit import Kit
from fedgrid.v1 import common_pb2
from fedgrid.v1 import federation_pb2 as fpb
from fedserver.peers import PeerAuthority

if TYPE_CHECKING:
    from fedserver.runtime import JobRuntime

log = logging.getLogger(__name__)

BATCH_BYTES = 8 << 20
"""Result frames are handed to the event loop in batches of about this many bytes (one thread hop
each), at most two batches ahead of the runtime: the lane's memory per upload in flight."""


def server_context(kit: Kit) -> ssl.SSLContext:
    """The server's certificate, and a client certificate chaining to the root CA required from every caller."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(kit.cert_path), str(kit.key_path))
    context.load_verify_locations(cafile=str(kit.root_ca_path))
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols([lane.ALPN])
    return context


def keepalive(sock: socket.socket) -> None:
    """Probe an idle connection after a minute, so that a worker that vanished is noticed in about two."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 20), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


async def _frames(queue: asyncio.Queue) -> AsyncIterator[Any]:
    while True:
        for frame in await queue.get():
            if frame is None:
                return
            yield frame


class DataLane:
    """Listens on the data port; serves `GetTask` and `SubmitResult` for job workers."""

    def __init__(self, kit: Kit, peers: PeerAuthority, runtime: JobRuntime, loop: asyncio.AbstractEventLoop) -> None:
        self.kit = kit
        self.peers = peers
        self.runtime = runtime
        self.loop = loop
        self.context = server_context(kit)
        self.listener: socket.socket | None = None
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.stopping = False

    def start(self, port: int) -> None:
        try:
            family = socket.getaddrinfo(self.kit.server_host, port, type=socket.SOCK_STREAM)[0][0]
            self.listener = socket.create_server((self.kit.server_host, port), family=family, backlog=128)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.kit.server_host}:{port} (data port): {exc.strerror or exc}; is another "
                "server running there? Stop it, or change data_port in project.yml and provision again"
            ) from None
        threading.Thread(target=self._accept, name="data-lane", daemon=True).start()

    def stop(self) -> None:
        self.stopping = True
        if self.listener is not None:
            self.listener.close()
        with self.lock:
            connections = list(self.connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self) -> None:
        assert self.listener is not None
        while not self.stopping:
            try:
                raw, address = self.listener.accept()
            except OSError as exc:
                if self.stopping:
                    return
                log.warning("data lane: accept failed: %s", exc)
                threading.Event().wait(0.5)
                continue
            threading.Thread(target=self._serve, args=(raw, address), name="data-lane-conn", daemon=True).start()

    def _serve(self, raw: socket.socket, address: tuple[Any, ...]) -> None:
        where = f"{address[0]}:{address[1]}"
        try:
            raw.settimeout(lane.HANDSHAKE_TIMEOUT)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keepalive(raw)
            sock = self.context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.warning("data lane: TLS handshake with %s failed: %s", where, exc)
            raw.close()
            return
        with self.lock:
            self.connections.add(sock)
        try:
            self._converse(sock, where)
        finally:
            with self.lock:
                self.connections.discard(sock)
            sock.close()

    def _converse(self, sock: ssl.SSLSocket, where: str) -> None:
        der = sock.getpeercert(binary_form=True)
        pem = ssl.DER_cert_to_PEM_cert(der).encode() if der else b""
        try:
            site = self.peers.identify_certificate(pem, where, "federation", "DataLane").name
        except FedgridError as exc:
            lane.send(sock, lane.ERROR, lane.error_body(exc, "DataLane"))
            return
        log.info("data lane: %s connected from %s", site, where)
        sock.settimeout(None)  # a worker may train for hours between two messages; keepalive finds the dead
        try:
            while not self.stopping:
                kind, body = lane.receive(sock)
                if kind == lane.TASK:
                    self._task(sock, site, body)
                elif kind == lane.RESULT:
                    self._result(sock, site, body)
                else:
                    raise lane.LaneError(f"a worker may send a task request or a result, not message kind {kind!r}")
        except lane.Closed:
            log.debug("data lane: %s (%s) closed", site, where)
        except lane.LaneError as exc:
            log.warning("data lane: %s (%s): %s; closing the connection", site, where, exc)
            try:
                lane.send(sock, lane.ERROR, lane.error_body(exc, "DataLane"))
            except OSError:
                pass
        except OSError as exc:
            if not self.stopping:
                log.info("data lane: %s (%s) dropped: %s", site, where, exc)
        except concurrent.futures.CancelledError:
            log.debug("data lane: %s (%s) ended with the server", site, where)
        except Exception:  # noqa: BLE001 - one connection's failure never ends the lane
            log.exception("data lane: %s (%s) failed; closing the connection", site, where)

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def _refuse(self, sock: ssl.SSLSocket, method: str, site: str, exc: BaseException) -> None:
        if isinstance(exc, FedgridError):
            log.info("%s (data lane) from %s refused: %s", method, site, exc)
        else:
            log.error("%s (data lane) from %s failed", method, site, exc_info=exc)
        lane.send(sock, lane.ERROR, lane.error_body(exc, method))

    def _task(self, sock: ssl.SSLSocket, site: str, body: bytes | memoryview) -> None:
        try:
            request = fpb.TaskRequest.FromString(bytes(body))
        except DecodeError as exc:
            raise lane.LaneError(f"not a valid task request ({exc})") from None
        try:
            frames = self._run(self.runtime.next_task(site, request)).result()
        except concurrent.futures.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is answered, none ends the lane
            self._refuse(sock, "GetTask", site, exc)
            return
        for frame in frames:
            lane.send(sock, lane.FRAME, frame)

    def _result(self, sock: ssl.SSLSocket, site: str, body: bytes | memoryview) -> None:
        queue: asyncio.Queue = asyncio.Queue(maxsize=2)
        outcome = self._run(self.runtime.receive_result(site, _frames(queue)))
        try:
            batch: list[Any] = []
            size = 0
            while True:
                frame = lane.parse(lane.parse_result_frame, body, "result frame")
                batch.append(frame)
                size += len(body)
                if frame.WhichOneof("kind") == "trailer":
                    break
                if size >= BATCH_BYTES:
                    self._put(queue, batch, outcome)
                    batch, size = [], 0
                kind, body = lane.receive(sock)
                if kind != lane.RESULT:
                    raise lane.LaneError(f"a result ended before its trailer (message kind {kind!r})")
            self._put(queue, [*batch, None], outcome)
        except BaseException:
            outcome.cancel()  # the runtime discards what it spooled of this result
            raise
        try:
            message = outcome.result()
        except concurrent.futures.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is answered, none ends the lane
            self._refuse(sock, "SubmitResult", site, exc)
            return
        lane.send(sock, lane.ACK, common_pb2.Ack(message=message))

    def _put(self, queue: asyncio.Queue, batch: list[Any], outcome: concurrent.futures.Future) -> None:
        """Hand frames to the runtime; once it has answered (refused early), read on without it."""
        if outcome.done():
            return
        put = self._run(queue.put(batch))
        while True:
            try:
                put.result(timeout=1.0)
                return
            except concurrent.futures.TimeoutError:
                if outcome.done():
                    put.cancel()
                    return
