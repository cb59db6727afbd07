"""A job worker's one stream to the server (`Work`): tasks out, results and tracking events in.

A worker opens the stream once for its whole job and sends one request at a time: `hello` (which job),
`next_task` (answered with the task's frames the moment the controller has a task for this site),
`upload_slot` (answered when one of the job's upload slots is free), a result's frames (answered once
its trailer arrived), `events`; `ping`s keep a stream alive while its worker trains. A large model is
acknowledged once read (`received`), which gives the next worker its turn to be sent it. A request the
server refuses for a reason that leaves the stream in step (a late result, a job that ended) is answered
with a reply naming the error, and the stream goes on. A stream that breaks the protocol (an unknown or
unparsable message, a result over its size limit or cut short, silence past the idle deadline) is closed
with a status that says why; what it had sent of a result is discarded; nothing else is affected.

The stream is read and written through `context` (a grpc.aio servicer context, or the simulator's link
with the same `read`/`write`), and finds its job through `jobs` (the `Scheduler`, or the simulator's one
job): the simulator serves its virtual sites with this same class (fedgrid/sim/driver.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Protocol

from fedgrid.errors import FedgridError, FrameError, StateError, TransferError
from fedgrid.transfer import Assembler, digest_checked
from fedgrid.v1 import federation_pb2 as fpb
from fedserver import limits, metrics, privacy_io
from fedserver.grid import Result
from fedserver.tracking.events import TrackingEvent

if TYPE_CHECKING:
    from fedserver.grid import Task
    from fedserver.jobrun import JobRun

log = logging.getLogger(__name__)


class Jobs(Protocol):
    """What a worker stream needs of the server's running jobs (fedserver/scheduler.py has them all)."""

    runs: dict[str, JobRun]

    def run_for(self, job_id: str, site: str) -> JobRun: ...

    async def run_when_started(self, job_id: str) -> JobRun | None: ...

    def end_messages(self, job_id: str) -> list[fpb.ServerMessage]: ...


class WorkerStream:
    """Serves one worker's Work stream on behalf of `site`, until the worker closes it."""

    def __init__(self, scheduler: Jobs, site: str, context: Any, idle_timeout: float | None) -> None:
        """`idle_timeout`: seconds the stream may stay silent (None: no deadline, the simulator's links)."""
        self.scheduler = scheduler
        self.site = site
        self.context = context
        self.idle_timeout = idle_timeout
        self.job_id = ""

    async def serve(self) -> None:
        hello = await self._read("hello")
        if hello is None:
            return
        metrics.work_request(hello.WhichOneof("kind"))
        if hello.WhichOneof("kind") != "hello":
            raise FrameError(f"Work stream of {self.site}: the first message must be a hello")
        self.job_id = hello.hello.job_id
        await self._reply(fpb.Reply(idle_timeout=self.idle_timeout or 0.0))
        while (message := await self._read("request")) is not None:
            kind = message.WhichOneof("kind")
            metrics.work_request(kind)
            if kind == "ping":
                continue
            try:
                if kind == "next_task":
                    await self._task(message.next_task)
                elif kind == "upload_slot":
                    await self._run().io.upload_slot(self.site, message.upload_slot.task_id)
                    await self._reply(fpb.Reply(message="granted"))
                elif kind == "result":
                    await self._reply(fpb.Reply(message=await self._result(message.result)))
                elif kind == "events":
                    await self._reply(fpb.Reply(message=self._events(message.events)))
                elif kind == "privacy":
                    answer = await privacy_io.answer(self._run(), self.site, message.privacy)
                    await self._write(fpb.ServerMessage(privacy=answer))
                else:
                    raise FrameError(f"Work stream of {self.site}: unexpected message {kind or '(empty)'!r}")
            except (TransferError, asyncio.CancelledError):
                raise
            except FedgridError as exc:
                # Refused, but the stream is still in step: say why and go on.
                await self._reply(fpb.Reply(error=type(exc).__name__, message=str(exc)))

    async def _read(self, what: str) -> fpb.WorkerMessage | None:
        return await limits.read(self.context, self.idle_timeout, f"Work stream of {self.site}, {what}")

    async def _reply(self, reply: fpb.Reply) -> None:
        await self._write(fpb.ServerMessage(reply=reply))

    async def _write(self, message: fpb.ServerMessage) -> None:
        await limits.write(self.context, message, self.idle_timeout, f"Work stream of {self.site}")

    def _run(self) -> JobRun:
        return self.scheduler.run_for(self.job_id, self.site)

    async def _task(self, request: fpb.TaskRequest) -> None:
        run = await self.scheduler.run_when_started(self.job_id)
        if run is None:
            for message in self.scheduler.end_messages(self.job_id):
                await self._write(message)
            return
        if self.site not in run.sites:
            raise StateError(f"{self.site} is not a site of job {self.job_id}")
        task = await run.io.next_task(self.site, request.last_task_id)
        async with run.io.sending_turn(task):
            acknowledge = False
            for message in run.io.task_messages(task, self.cached_sha256(request, task)):
                acknowledge = acknowledge or message.task.header.acknowledge
                await self._write(message)
            header = message.task.header
            metrics.sent("task", 0 if header.payload_cached else header.payload_size)
            if acknowledge:
                await self._receipt(task.task_id)

    def cached_sha256(self, request: fpb.TaskRequest, task: Task) -> bytes:
        """The digest of the model the worker holds when its task is answered: the one its request named."""
        return request.cached_sha256

    async def _receipt(self, task_id: str) -> None:
        """Wait for the worker to say it read a large task whole (pings may come first)."""
        while True:
            message = await self._read(f"receipt of {task_id}")
            if message is None:
                raise TransferError(f"Work stream of {self.site}: closed before the receipt of {task_id}")
            kind = message.WhichOneof("kind")
            if kind == "received" and message.received.task_id == task_id:
                return
            if kind != "ping":
                raise FrameError(
                    f"Work stream of {self.site}: a {kind or 'empty'} message instead of the receipt of {task_id}"
                )

    async def _result(self, first: fpb.ResultFrame) -> str:
        """Receive a result whose first frame is `first`; read its other frames from the stream."""
        if not first.HasField("header"):
            raise FrameError(f"result from {self.site} does not start with a header")
        header = first.header
        run = self.scheduler.runs.get(self.job_id)
        if run is None or self.site not in run.sites:
            await self._skip_result(first, header.task_id)
            self._run()  # raises the reason: the job does not run (any more), or not at this site
        assert run is not None
        if header.HasField("evaluation"):
            run.io.deliver_evaluation(self.site, header.evaluation)
        open_task = run.io.accepts(self.site, header.task_id)
        spool = run.io.new_spool(self.site, header.payload_format) if open_task else _Discard()
        assembler = Assembler(
            spool,  # type: ignore[arg-type]
            max_size=run.io.upload_limit,
            what=f"result of {header.task_id} from {self.site}",
            verify=lambda h: digest_checked(h.payload_format),
        )
        try:
            async with run.io.uploading(self.site, header.payload_format if open_task else ""):
                frame = first
                while True:
                    if assembler.hashing:
                        # Hashing releases the GIL: off the event loop, other sites go on.
                        await asyncio.to_thread(assembler.feed, frame)
                    else:
                        assembler.feed(frame)
                    if spool.flush_due:
                        await asyncio.to_thread(spool.flush)
                    if assembler.done:
                        break
                    frame = await self._next_result_frame(header.task_id)
            assembler.finish()
            if not spool.in_memory:
                await asyncio.to_thread(spool.flush)
        except BaseException as exc:
            metrics.received("result", assembler.size)
            spool.discard()
            if isinstance(exc, FedgridError):
                run.log.warning("%s: result refused: %s", self.site, exc)
                metrics.update_refused(exc)
            raise
        metrics.received("result", assembler.size)
        if not open_task:
            metrics.update_refused("late")
            run.log.warning("%s: result for %s arrived after its round closed; dropped", self.site, header.task_id)
            raise StateError(f"task {header.task_id} is no longer open (late result dropped)")
        path, data, release = spool.payload()
        result = Result(
            site=self.site,
            task_id=header.task_id,
            num_samples=header.num_samples,
            metrics=dict(header.metrics),
            payload_format=header.payload_format,
            path=path,
            size=assembler.size,
            data=data,
            on_discard=release,
        )
        if not run.io.deliver(result):
            result.discard()
            metrics.update_refused("late")
            run.log.warning("%s: result for %s arrived after its round closed; dropped", self.site, header.task_id)
            return "late: dropped"
        return "accepted"

    async def _skip_result(self, frame: fpb.ResultFrame, task_id: str) -> None:
        """Read the rest of a result nobody takes, so the stream stays in step for the reply."""
        while not frame.HasField("trailer"):
            frame = await self._next_result_frame(task_id)

    async def _next_result_frame(self, task_id: str) -> fpb.ResultFrame:
        message = await self._read(f"result of {task_id}")
        if message is None:
            raise TransferError(f"result of {task_id} from {self.site}: the stream ended before its trailer")
        if message.WhichOneof("kind") == "ping":
            return fpb.ResultFrame()
        if message.WhichOneof("kind") != "result":
            raise FrameError(
                f"result of {task_id} from {self.site}: a {message.WhichOneof('kind') or 'empty'} message "
                "arrived before the result's trailer"
            )
        if message.result.HasField("header"):
            raise TransferError(f"result of {task_id} from {self.site}: second header in one stream")
        return message.result

    def _events(self, batch: fpb.EventBatch) -> str:
        if batch.job_id and batch.job_id != self.job_id:
            raise StateError(f"events for job {batch.job_id} on the stream of job {self.job_id}")
        events = [
            TrackingEvent(
                site=self.site,
                seq=e.seq,
                kind=e.kind,
                tag=e.tag,
                value=e.value,
                step=e.step,
                wall_time=e.wall_time,
                text=e.text,
                params=dict(e.params),
            )
            for e in batch.events
        ]
        return self._run().receive_events(self.site, events)


class _Discard:
    """The sink of a late result: its bytes are read (to keep the stream in step) and dropped."""

    in_memory = True
    flush_due = False

    def write(self, data: bytes | memoryview) -> int:
        return len(data)

    def flush(self) -> None:
        pass

    def discard(self) -> None:
        pass
