"""A job worker's one gRPC stream to the server (`Federation.Work`), from the worker's side.

The worker opens it once and sends one request at a time on it: the next task (answered with the
task's frames), an upload slot, a result's frames, tracking events; each answer is read before the next
request goes out, so a round costs no new call. A background thread pings while the script trains, so
the server's idle deadline only closes streams whose worker went silent.

When the server goes away (it restarts under a running job), a request fails with UNAVAILABLE: the
stream is opened again and the request repeated, for up to `RETRY_FOR` seconds (fedgrid/retry.py).
A refusal the server answers in a reply (a late result, a job that ended) raises the fedgrid error it
names, and the stream stays usable.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import grpc

from fedgrid import errors, retry, transfer
from fedgrid.errors import FedgridError, TransferError
from fedgrid.grpc_errors import error_from_rpc
from fedgrid.kit import Kit
from fedgrid.tls import secure_channel
from fedgrid.v1 import federation_pb2 as fpb
from fedgrid.v1 import federation_pb2_grpc

log = logging.getLogger("fedclient.api")

RETRY_FOR = 3600.0
"""Seconds a request keeps being retried while the server is unreachable before the worker gives up: a
restarted server resumes the job and its workers carry on (one that drops the job has the site end them)."""
MAX_TASK_BYTES = 1 << 34
OUTBOX_MESSAGES = 4
"""Messages queued for gRPC to send: a result's frames are made as gRPC takes them, so a worker holds a few
frames of an upload, not all of it (and the frames' buffers are reused: bench/transfer.py)."""
RESULT_MESSAGE = transfer.enveloped(fpb.WorkerMessage, "result")
"""How a result's frames are built: in place, inside the message that carries them."""
T = TypeVar("T")


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


class WorkStream:
    """The stream of one job worker; `task`, `upload_slot`, `result` and `events` are its requests."""

    def __init__(self, kit: Kit, job_id: str) -> None:
        self.channel = secure_channel(kit, kit.fed_port)
        self.stub = federation_pb2_grpc.FederationStub(self.channel)
        self._setup(job_id)
        threading.Thread(target=self._pinger, name="work-stream-ping", daemon=True).start()

    def _setup(self, job_id: str) -> None:
        """The state of the stream itself, whatever carries it (the simulator's streams share it)."""
        self.job_id = job_id
        self._lock = threading.Lock()
        self._outbox: queue.Queue[fpb.WorkerMessage | None] | None = None
        self._answers: Iterator[fpb.ServerMessage] | None = None
        self._last_sent = time.monotonic()
        self._ping_every = 30.0
        self._closed = threading.Event()

    # ------------------------------------------------------------------ requests

    def task(self, request: fpb.TaskRequest) -> tuple[fpb.TaskHeader, bytes | memoryview]:
        """The next task and its payload (empty when it has none, or when the worker holds it already),
        received into one buffer of the size the server announced."""

        def ask() -> tuple[fpb.TaskHeader, bytes | memoryview]:
            self._send(fpb.WorkerMessage(next_task=request))
            frame = self._task_frame()
            announced = 0 if frame.header.payload_cached else frame.header.payload_size
            buffer = (
                transfer.Buffer(announced, "task") if 0 < announced <= MAX_TASK_BYTES else transfer.Chunks()
            )
            assembler = transfer.Assembler(
                buffer,  # type: ignore[arg-type]
                max_size=MAX_TASK_BYTES,
                what="task",
                verify=lambda h: transfer.digest_checked(h.payload_format),
            )
            assembler.feed(frame)
            while not assembler.done:
                assembler.feed(self._task_frame())
            header = assembler.finish()
            checked = assembler.sha256 is not None and header.payload_format and not header.payload_cached
            if checked and assembler.sha256 != header.payload_sha256:
                raise TransferError(f"task {header.task_id}: payload digest differs from the header")
            if header.acknowledge:
                self._send(fpb.WorkerMessage(received=fpb.TaskReceived(task_id=header.task_id)))
            return header, buffer.getvalue()

        return self._request("receive", ask)

    def _task_frame(self) -> fpb.TaskFrame:
        answer = self._answer()
        if answer.WhichOneof("kind") != "task":
            raise TransferError(f"task: the server answered with a {answer.WhichOneof('kind')}")
        return answer.task

    def upload_slot(self, task_id: str) -> None:
        """Wait for a turn to upload the result of `task_id` (the server grants a few at a time)."""
        slot = fpb.UploadSlotRequest(job_id=self.job_id, task_id=task_id)
        self._request("upload slot", lambda: self._reply_to(fpb.WorkerMessage(upload_slot=slot)))

    def result(self, header: fpb.ResultHeader, pieces: Callable[[], Iterable[bytes | memoryview]] = tuple) -> str:
        """Send a result: its header, then the payload `pieces()` makes (made again if the request is
        repeated), in frames of UPLOAD_CHUNK_SIZE, with a digest where the server checks one."""
        digest = transfer.digest_checked(header.payload_format)

        def send() -> str:
            for message in transfer.frames(
                RESULT_MESSAGE, header, pieces(), digest=digest, chunk_size=transfer.UPLOAD_CHUNK_SIZE
            ):
                self._send(message)
            self._result_sent()
            return self._reply().message

        return self._request("send", send)

    def _result_sent(self) -> None:
        """Called once a result's frames are all sent, before its reply is read (the simulator's stream frees
        its host's training slot here)."""

    def events(self, batch: fpb.EventBatch) -> str:
        return self._request("events", lambda: self._reply_to(fpb.WorkerMessage(events=batch)))

    def privacy(self, request: fpb.PrivacyRequest, what: str) -> fpb.PrivacyReply:
        """A step of a privacy protocol (job key, SecAgg+); answered once the server has what the step waits
        for. A refusal raises the fedgrid error the server names."""

        def exchange() -> fpb.PrivacyReply:
            self._send(fpb.WorkerMessage(privacy=request))
            answer = self._answer()
            if answer.WhichOneof("kind") == "reply":
                self._check(answer.reply)
            if answer.WhichOneof("kind") != "privacy":
                raise TransferError(f"{what}: the server answered with a {answer.WhichOneof('kind')}")
            return answer.privacy

        return self._request(what, exchange)

    def close(self) -> None:
        """End the stream (the server sees the worker leave) and the channel."""
        self._closed.set()
        with self._lock:
            self._drop()
        self.channel.close()

    # ------------------------------------------------------------------ the stream itself

    def _request(self, what: str, exchange: Callable[[], T]) -> T:
        """One request and its answer, on a stream opened again if the server went away meanwhile."""

        def attempt() -> T:
            with self._lock:
                if self._outbox is None:
                    self._open()
                try:
                    return exchange()
                except grpc.RpcError:
                    self._drop()
                    raise
                except TransferError:
                    self._drop()  # the stream may have stopped mid-message: start the next request afresh
                    raise

        try:
            return retry.call(attempt, what=what, retryable=_retryable, give_up_after=RETRY_FOR, log=log)
        except grpc.RpcError as exc:
            if _retryable(exc):
                raise TransferError(f"{what}: server unreachable for {RETRY_FOR:.0f} s ({exc.details()})") from None
            raise error_from_rpc(exc, f"{what}: ") from None

    def _open(self) -> None:
        outbox: queue.Queue[fpb.WorkerMessage | None] = queue.Queue(OUTBOX_MESSAGES)
        self._outbox = outbox
        self._answers = self.stub.Work(iter(outbox.get, None))
        hello = self._reply_to(fpb.WorkerMessage(hello=fpb.WorkerHello(job_id=self.job_id)))
        self._ping_every = max(0.5, hello.idle_timeout / 3) if hello.idle_timeout else 30.0

    def _drop(self) -> None:
        if self._outbox is not None:
            with contextlib.suppress(queue.Empty):
                while True:  # what gRPC will not take any more; then the end of the requests
                    self._outbox.get_nowait()
            self._outbox.put_nowait(None)
        if isinstance(self._answers, grpc.Call):
            self._answers.cancel()
        self._outbox, self._answers = None, None

    def _send(self, message: fpb.WorkerMessage) -> None:
        """Queue `message` for gRPC; while the queue is full, a stream that ended raises its error."""
        assert self._outbox is not None
        while True:
            try:
                self._outbox.put(message, timeout=0.5)
                break
            except queue.Full:
                call = self._answers
                if isinstance(call, grpc.Future) and call.done():
                    if call.code() == grpc.StatusCode.OK:
                        raise TransferError("the server closed the work stream") from None
                    raise call from None  # the call is the RpcError: its status code decides on a retry
        self._last_sent = time.monotonic()

    def _answer(self) -> fpb.ServerMessage:
        assert self._answers is not None
        try:
            return next(self._answers)
        except StopIteration:
            raise TransferError("the server closed the work stream") from None

    def _reply(self) -> fpb.Reply:
        answer = self._answer()
        if answer.WhichOneof("kind") != "reply":
            raise TransferError(f"expected a reply, the server sent a {answer.WhichOneof('kind')}")
        return self._check(answer.reply)

    def _check(self, reply: fpb.Reply) -> fpb.Reply:
        """The reply, or the fedgrid error it names raised."""
        if reply.error:
            cls = getattr(errors, reply.error, None)
            if not (isinstance(cls, type) and issubclass(cls, FedgridError)):
                cls = FedgridError
            raise cls(reply.message)
        return reply

    def _reply_to(self, message: fpb.WorkerMessage) -> fpb.Reply:
        self._send(message)
        return self._reply()

    def _pinger(self) -> None:
        """Ping while nothing else was sent for a while, so a long training step keeps the stream open."""
        while not self._closed.wait(0.5):
            outbox = self._outbox
            if outbox is not None and time.monotonic() - self._last_sent >= self._ping_every:
                with contextlib.suppress(queue.Full):  # a full outbox is sending anyway
                    outbox.put_nowait(fpb.WorkerMessage(ping=fpb.Ping()))
                self._last_sent = time.monotonic()
