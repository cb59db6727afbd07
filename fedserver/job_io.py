"""A running job's traffic with its sites' workers: the job package, tasks out, results in.

`JobRun` owns one `JobIO`; the Work streams (fedserver/worker_io.py) and FetchJob call it. It keeps what
that traffic needs and nobody else touches: the frames of the current task (built once, the same
messages for every worker), the turns for streaming a large model from disk, the upload slots, and the
spools results land in. A model in memory is sent from memory; a model on disk is read a chunk at a time
for a few workers at once, each acknowledging it, so that memory stays O(model) however many sites there
are and however slowly they read (bench/aggregation_memory.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from fedgrid.errors import StateError
from fedgrid.tensor_file import BLOCK_BYTES
from fedgrid.transfer import enveloped, frames
from fedgrid.v1 import federation_pb2 as fpb
from fedserver import memory
from fedserver.grid import Result, Task, TaskBoard, UploadSlots
from fedserver.model import CKKS_CIPHERTEXT_BYTES, CKKS_EXPANSION, Model
from fedserver.spool import Spool

TASK_MESSAGE = enveloped(fpb.ServerMessage, "task")
"""How a task's frames are built: in place, inside the message that carries them."""
UPLOAD_SLOTS = 2
"""Large uploads a job takes at the same time; more sites wait their turn (bench/aggregation_memory.py)."""
SENDING = 2
"""Workers a large model (or job package) read from disk is streamed to at once, per job."""
SLOT_MIN_BYTES = 8 << 20
"""Updates from this size on need an upload slot; smaller ones are cheaper to take than to schedule."""
PACKAGE = "package.zip"
MANIFEST = "manifest.json"
SUBMITTER_CERT = "submitter.pem"
"""The signed job package as submitted, kept beside the unpacked job folder (see fedserver/admin_ops.py)."""


class JobIO:
    def __init__(
        self, *, job_id: str, job_dir: Path, board: TaskBoard, log: logging.Logger, on_ask: Callable[[str], None]
    ) -> None:
        self.job_id = job_id
        self.on_ask = on_ask
        """Called with a site whose worker asks for work (a site that had gone silent may rejoin then)."""
        self.job_dir = job_dir
        self.board = board
        self.log = log
        self._tmp_dir = job_dir / "tmp"
        self._tmp_dir.mkdir(exist_ok=True)
        self._package: Model | None = None
        """The signed job package as submitted (a zip in the job folder), with its digest."""
        self._task_messages: dict[str, list[fpb.ServerMessage]] = {}
        """The current task's messages, built once and sent to every worker."""
        self._sending = asyncio.Semaphore(SENDING)
        self._upload_slots = UploadSlots(UPLOAD_SLOTS)
        self.model_bytes = 0
        self.update_bytes = 0
        """The size of an update a site sends: the model's, or its ciphertexts'."""
        self._slot_bytes = 0
        """Expected size of an update from which sites must ask for an upload slot first."""

    @property
    def tmp_dir(self) -> Path:
        """Where spooled results and large global models live while the job runs."""
        return self._tmp_dir

    def expect_models_of(self, model_bytes: int, encrypted: bool) -> None:
        """Size the job's traffic for models of `model_bytes` (an encrypted update is larger)."""
        self.model_bytes = model_bytes
        self.update_bytes = model_bytes * CKKS_EXPANSION + CKKS_CIPHERTEXT_BYTES if encrypted else model_bytes
        self._slot_bytes = SLOT_MIN_BYTES if self.update_bytes >= SLOT_MIN_BYTES else 0

    @property
    def large(self) -> bool:
        """Whether updates are large enough to take turns (and the server trims its memory after them)."""
        return bool(self._slot_bytes)

    async def package_frames(self) -> AsyncIterator[fpb.JobFrame]:
        """The signed job package, read from the job folder a chunk at a time for each site that fetches it
        (its digest is computed once), so a large package is never held whole."""
        if self._package is None:
            self._package = await asyncio.to_thread(Model.on_disk, "zip", self.job_dir / PACKAGE)
        header = fpb.JobHeader(
            job_id=self.job_id,
            signed_manifest=(self.job_dir / MANIFEST).read_bytes(),
            submitter_cert=(self.job_dir / SUBMITTER_CERT).read_bytes(),
            size=self._package.size,
        )
        async with self._sending:
            for frame in frames(fpb.JobFrame, header, self._package.chunks(BLOCK_BYTES), sha256=self._package.sha256):
                yield frame

    async def next_task(self, site: str, last_task_id: str) -> Task:
        """The site's next task, as soon as there is one (the END task once the job is over)."""
        self.board.mark_ready(site)
        self.on_ask(site)
        task = await self.board.next_task(site, last_task_id, None)
        assert task is not None  # no timeout given
        return task

    def task_messages(self, task: Task, cached_sha256: bytes) -> Iterator[fpb.ServerMessage]:
        """The messages of a task; just its header when the worker already holds the payload.

        A model in memory is framed once per task and the same messages go to every worker. A model on
        disk is read a chunk at a time for each worker, during that worker's `sending_turn`, and the
        worker acknowledges it (`TaskHeader.acknowledge`), so that many workers fetching a large model
        cost a few chunks in flight, not a copy each, however slowly they read.
        """
        model = task.model
        header = fpb.TaskHeader(
            job_id=self.job_id,
            task_id=task.task_id,
            kind=task.kind,
            round=task.round,
            total_rounds=task.total_rounds,
            payload_format=model.payload_format if model else "",
            payload_sha256=model.sha256 if model else b"",
            payload_size=model.size if model else 0,
            total_weight=model.total_weight if model else 0.0,
            upload_slot=bool(self._slot_bytes) and task.kind in ("train", "release"),
            evaluate_task_id=task.evaluate_task_id,
            evaluate_round=task.evaluate_round,
            settings=task.settings,
        )
        if model is None or (cached_sha256 and cached_sha256 == model.sha256):
            header.payload_cached = model is not None
            yield from frames(TASK_MESSAGE, header, ())
            return
        if model.data is not None:
            cache = self._task_messages
            if task.task_id not in cache:
                cache.clear()
                cache[task.task_id] = list(frames(TASK_MESSAGE, header, (model.data,), sha256=model.sha256))
            yield from cache[task.task_id]
            return
        header.acknowledge = True
        yield from frames(TASK_MESSAGE, header, model.chunks(BLOCK_BYTES), sha256=model.sha256)

    @contextlib.asynccontextmanager
    async def sending_turn(self, task: Task) -> AsyncIterator[None]:
        """Hold one of the job's `SENDING` turns while a model from disk streams to a worker (and until
        the worker acknowledges it); free for models in memory."""
        if task.model is None or task.model.data is not None:
            yield
            return
        async with self._sending:
            yield

    def accepts(self, site: str, task_id: str) -> bool:
        """True when `site` was asked for `task_id` and has not answered it yet."""
        return self.board.accepts(site, task_id)

    def deliver(self, result: Result) -> bool:
        """Hand the controller a result; False (the caller drops it) when its round closed."""
        return self.board.deliver(result)

    def deliver_evaluation(self, site: str, evaluation: fpb.Evaluation) -> None:
        """Hand the controller the evaluation a site answered inside its training result."""
        result = Result(
            site=site,
            task_id=evaluation.task_id,
            num_samples=evaluation.num_samples,
            metrics=dict(evaluation.metrics),
            payload_format="",
            path=None,
        )
        if not self.board.deliver(result):
            self.log.warning("%s: evaluation %s arrived after its round closed; dropped", site, evaluation.task_id)

    @property
    def upload_limit(self) -> int:
        """The largest result payload a site may send (a ciphertext is several times the model)."""
        return max(64 << 20, 32 * self.model_bytes)

    def new_spool(self, site: str, payload_format: str) -> Spool:
        return Spool(self._tmp_dir, prefix=f"{site}-", expected=self.update_bytes if payload_format else 0)

    def needs_upload_slot(self, payload_format: str) -> bool:
        return bool(self._slot_bytes) and bool(payload_format)

    async def upload_slot(self, site: str, task_id: str) -> None:
        """Wait until `site` may upload its result of `task_id` (a few large uploads at a time)."""
        if not self.board.accepts(site, task_id):
            raise StateError(f"task {task_id} is no longer open (late result dropped)")
        await self._upload_slots.acquire(site, None)

    @contextlib.asynccontextmanager
    async def uploading(self, site: str, payload_format: str) -> AsyncIterator[None]:
        """Hold `site`'s upload slot while its large result streams in (taking one if it has none)."""
        if not self.needs_upload_slot(payload_format):
            yield
            return
        if not self._upload_slots.holds(site):
            await self._upload_slots.acquire(site, None)
        self._upload_slots.start(site)
        try:
            yield
        finally:
            await self._upload_slots.release(site)
            memory.trim()  # a large upload's freed network buffers go back to the system now, not at round end
