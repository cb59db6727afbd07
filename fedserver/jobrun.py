"""One running job on the server: deploy to the sites, run the workflow, collect results, clean up.

The lifecycle is a single coroutine (`JobRun.run`) so that abort is a plain cancellation and every
way out (completed, aborted, failed) passes through the same `finally`: sites are told to stop,
their logs are collected, and the result folder is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedgrid import tensors
from fedgrid.errors import FedgridError, StateError
from fedgrid.files import write_atomic, write_json_atomic
from fedgrid.jobspec import JobSpec
from fedgrid.serde import RoundInfo
from fedgrid.tensor_file import BLOCK_BYTES, TensorFile
from fedgrid.transfer import frames
from fedgrid.v1 import federation_pb2 as fpb
from fedserver import jobstore, memory, results, strategies
from fedserver.aggregation import Aggregator, PlainAggregator
from fedserver.grid import Result, Task, TaskBoard, UploadSlots
from fedserver.jobstore import JobStore
from fedserver.model import MEMORY_LIMIT, Model
from fedserver.registry import SiteRegistry
from fedserver.rounds import Outcome, RoundLoop
from fedserver.server_evaluation import ServerEvaluator
from fedserver.spool import Spool
from fedserver.watchers import Watchers

START_TIMEOUT = 120.0
"""Seconds a site may take to fetch the job, verify it and start its worker."""
END_TIMEOUT = 20.0
"""Seconds to wait for the sites' final reports (and logs) after the job ended."""
UPLOAD_SLOTS = 2
"""Large uploads a job takes at the same time; more sites wait their turn (bench/aggregation_memory.py)."""
SENDING = 2
"""Workers a large model (or job package) read from disk is streamed to at once, per job."""
SLOT_MIN_BYTES = 8 << 20
"""Updates from this size on need an upload slot; smaller ones are cheaper to take than to schedule."""
ABORT_TIMEOUT = 6.0
"""Seconds to wait for the sites to confirm an abort (the whole abort stays under 10 s)."""
PACKAGE = "package.zip"
MANIFEST = "manifest.json"
SUBMITTER_CERT = "submitter.pem"
"""The signed job package as submitted, kept beside the unpacked job folder (see fedserver/admin_ops.py)."""


@dataclass(frozen=True)
class RunContext:
    """What a job run needs from the server around it."""

    store: JobStore
    registry: SiteRegistry
    watchers: Watchers
    he_context: bytes | None
    tracking_factory: Callable[..., object] | None = None
    keep_uploads: bool = False
    data_root: Path | None = None
    """The server operator's data (local/server.json), for a job's server-side evaluator."""


def job_logger(job_id: str, path: Path) -> logging.Logger:
    """A logger writing to the job's own log file (and, through the root logger, to the server log)."""
    logger = logging.getLogger(f"fedserver.job.{job_id[:8]}")
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    return logger


class JobRun:
    def __init__(self, *, job_id: str, spec: JobSpec, sites: list[str], ctx: RunContext) -> None:
        self.job_id = job_id
        self.spec = spec
        self.ctx = ctx
        self.job_dir = ctx.store.job_dir(job_id)
        self.result_dir = self.job_dir / "result"
        self.result_dir.mkdir(exist_ok=True)
        self._tmp_dir = self.job_dir / "tmp"
        self._tmp_dir.mkdir(exist_ok=True)
        self.log = job_logger(job_id, self.job_dir / "log.txt")
        self.sites = sorted(sites)
        self.board = TaskBoard(job_id, self.sites)
        self._site_states: dict[str, str] = {}
        self._started: dict[str, asyncio.Future[str]] = {}
        self._ended: dict[str, asyncio.Future[str]] = {}
        self._fatal: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None
        self.abort_reason = ""
        self.tracking = None
        self.layout: tensors.Layout = {}
        self.model_bytes = 0
        self._package: Model | None = None
        """The signed job package as submitted (a zip in the job folder), with its digest."""
        self._task_messages: dict[str, list[fpb.ServerMessage]] = {}
        """The current task's messages, built once and sent to every worker."""
        self._upload_slots = UploadSlots(UPLOAD_SLOTS)
        self._sending = asyncio.Semaphore(SENDING)
        self._slot_bytes = 0
        """Expected size of an update from which sites must ask for an upload slot first."""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"job-{self.job_id}")
        return self._task

    async def abort(self, reason: str) -> None:
        """Cancel the run; returns when the job is recorded as aborted and the sites were told."""
        if self._task is None or self._task.done():
            return
        self.abort_reason = reason
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def run(self) -> None:
        store = self.ctx.store
        status, error = jobstore.COMPLETED, ""
        outcome = Outcome()
        try:
            store.update(self.job_id, status=jobstore.RUNNING, start_time=time.time(), sites=self.sites)
            await self.ctx.watchers.status(self.job_id)
            self.log.info("job %s (%s) starting on %s", self.job_id, self.spec.name, ", ".join(self.sites))
            initial = await asyncio.to_thread(self._initial_model)
            self._start_tracking()
            workflow = asyncio.create_task(self._workflow(initial))
            await asyncio.wait({workflow, self._fatal}, return_when=asyncio.FIRST_COMPLETED)
            if self._fatal.done():
                # A site's crash is the cause, whatever the workflow made of that site leaving.
                workflow.cancel()
                await asyncio.gather(workflow, return_exceptions=True)
                raise StateError(self._fatal.result())
            outcome = workflow.result()
        except asyncio.CancelledError:
            status, error = jobstore.ABORTED, self.abort_reason or "aborted"
            self.log.warning("job aborted: %s", error)
        except FedgridError as exc:
            status, error = jobstore.FAILED, str(exc)
            self.log.error("job failed: %s", exc)
        except Exception as exc:  # noqa: BLE001 - a bug in one job must not take the server down
            status, error = jobstore.FAILED, f"internal error: {type(exc).__name__}: {exc}"
            self.log.error("job failed with an internal error:\n%s", traceback.format_exc())
        finally:
            await self._shutdown(status)
            await asyncio.to_thread(self._write_result, status, error, outcome)
            store.update(
                self.job_id,
                status=status,
                end_time=time.time(),
                error=error,
                result=self._summary(status, error, outcome),
            )
            await self.ctx.watchers.finished(self.job_id)
            self.log.info("job ended: %s%s", status, f" ({error})" if error else "")
            for handler in list(self.log.handlers):
                handler.close()
                self.log.removeHandler(handler)

    def _initial_model(self) -> Model:
        """The job's initial model: re-serialized in memory when small, used in place from the job folder
        (checked, never loaded whole) when large."""
        cfg = self.spec.server
        path = self.job_dir / "job" / self.spec.server_app / "config" / cfg.initial_model
        what = f"initial model {cfg.initial_model}"
        if path.stat().st_size <= MEMORY_LIMIT:
            arrays = tensors.load_file(path, what=what)
            self.layout = tensors.layout_of(arrays)
            model = Model.in_memory(tensors.FORMAT, tensors.encode(arrays))
        else:
            self.layout = TensorFile(path, what).layout
            model = Model.on_disk(tensors.FORMAT, path)
        self.model_bytes = model.size
        expected = self.model_bytes * (8 if self.spec.server.encryption != "none" else 1)
        self._slot_bytes = SLOT_MIN_BYTES if expected >= SLOT_MIN_BYTES else 0
        self.log.info("initial model: %d tensors, %.2f MB", len(self.layout), model.size / 1e6)
        return model

    async def _deploy(self) -> None:
        """Ask every site to start the job; fail unless at least min_clients did."""
        loop = asyncio.get_running_loop()
        hosts: dict[str, int] = {}
        for site in self.sites:
            record = self.ctx.registry.get(site)
            host = record.hostname if record else site
            hosts[host] = hosts.get(host, 0) + 1
        for site in self.sites:
            self._started[site] = loop.create_future()
            self._ended[site] = loop.create_future()
            record = self.ctx.registry.get(site)
            hint = hosts.get(record.hostname if record else site, 1)
            app = self.spec.app_for_site(site) or ""
            self.ctx.registry.send(
                site, fpb.Command(start_job=fpb.StartJob(job_id=self.job_id, app=app, workers_hint=hint))
            )
            self._set_state(site, "deploying")
        done, pending = await asyncio.wait(self._started.values(), timeout=START_TIMEOUT)
        failures = []
        for site, future in self._started.items():
            if future in pending:
                self._site_left(site, f"did not start the job within {START_TIMEOUT:.0f} s")
                failures.append(f"{site}: did not start within {START_TIMEOUT:.0f} s")
            elif future.result() != "started":
                failures.append(f"{site}: {future.result()}")
        started = len(self.sites) - len(failures)
        if started < self.spec.min_clients:
            raise StateError(
                f"only {started} of {len(self.sites)} sites started the job (min_clients {self.spec.min_clients}): "
                + "; ".join(failures)
            )
        if failures:
            self.log.warning("continuing without: %s", "; ".join(failures))

    async def _wait_ready(self) -> None:
        """Start round 1 once every worker is up, so that round times measure rounds, not start-up."""
        started = time.monotonic()
        missing = await self.board.wait_ready(START_TIMEOUT)
        for site in missing:
            self._site_left(site, f"its worker did not ask for work within {START_TIMEOUT:.0f} s")
        if len(self.board.active_sites()) < self.spec.min_clients:
            raise StateError(
                f"only {len(self.board.active_sites())} workers came up (min_clients {self.spec.min_clients})"
            )
        self.log.info(
            "workers ready on %d sites after %.1f s", len(self.board.active_sites()), time.monotonic() - started
        )

    async def _workflow(self, initial: Model) -> Outcome:
        await self._deploy()
        await self._wait_ready()
        if self._slot_bytes:
            memory.trim()  # large models: what deploying the package freed goes back before round 1
        where = f"{self.spec.server_app}/config/server.json"
        forbidden = self.ctx.store.root
        evaluator = None
        if self.spec.server.evaluator:
            name = self.spec.server.evaluator.removeprefix("module:")
            evaluate = strategies.installed_evaluator(name, where, forbidden)
            evaluator = ServerEvaluator(name, evaluate, self.ctx.data_root, self.log)
        workflow = RoundLoop(
            config=self.spec.server,
            board=self.board,
            strategy=strategies.build(self.spec.server, where, forbidden),
            layout=self.layout,
            aggregator=self._aggregator,
            result_dir=self.result_dir,
            checkpoint_dir=self.job_dir / "checkpoint",
            model_dir=self._tmp_dir,
            log=self.log,
            on_round=self._on_round,
            release_model=self._release_model,
            keep_dir=self.job_dir / "uploads" if self.ctx.keep_uploads else None,
            evaluator=evaluator,
        )
        self.log.info("strategy %s", self.spec.server.strategy.describe())
        return await workflow.run(initial)

    def _aggregator(self, model: Model | None, layout: tensors.Layout) -> Aggregator:
        """Folds one round's results, whose tensors are `layout` (the model's and the strategy's own)."""
        if self.spec.server.encryption == "ckks":
            from fedserver.he_aggregation import EncryptedAggregator

            assert self.ctx.he_context is not None  # checked at submit
            return EncryptedAggregator(self.ctx.he_context, layout)
        return PlainAggregator(layout, model, self.spec.server.clip_norm)

    async def _on_round(self, record: RoundInfo) -> None:
        if self._slot_bytes:
            memory.trim()  # large models: hand the round's freed payload buffers back to the system
        # Off the event loop: the commit waits for the disk (fsync), and rounds and uploads go on meanwhile.
        await asyncio.to_thread(self.ctx.store.add_round, self.job_id, record)
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in record.metrics.items())
        self.log.info(
            "round %d/%d done in %.2f s: %d/%d sites answered, %s",
            record.round,
            self.spec.server.num_rounds,
            record.seconds,
            record.sites_answered,
            record.sites_asked,
            metrics or "no metrics",
        )
        if self.tracking is not None:
            self.tracking.global_metrics(
                record.round,
                {
                    **record.metrics,
                    "sites_answered": record.sites_answered,
                    "round_seconds": record.seconds,
                    "bytes_moved": record.bytes_moved,
                },
            )
        await self.ctx.watchers.round(self.job_id, record)

    async def _release_model(self, model: Model, which: str) -> Path:
        """HE: one site decrypts `model` and uploads the plaintext, by the job's release policy."""
        site = self.spec.server.release_site or (self.board.active_sites() or [""])[0]
        if site not in self.board.active_sites():
            raise StateError(
                f"release site {site or '(none)'} is not in the job any more; the {which} model stays encrypted"
            )
        task = Task(
            task_id=f"release-{which}",
            kind="release",
            round=0,
            total_rounds=self.spec.server.num_rounds,
            model=model,
        )
        await self.board.ask(task, [site])
        async for item in self.board.results(task, [site], 120.0):
            if isinstance(item, Result) and item.has_payload:
                data = item.read()
                item.discard()
                arrays = tensors.decode(data, what=f"{which} model released by {site}")
                tensors.check_layout(arrays, self.layout, f"{which} model released by {site}")
                target = self.result_dir / f"{which}_model.safetensors"
                await asyncio.to_thread(write_atomic, target, data)
                self.log.info("%s model decrypted and uploaded by %s", which, site)
                return target
        raise StateError(f"{site} did not upload the decrypted {which} model")

    async def _shutdown(self, status: str) -> None:
        """Tell the sites the job is over (normally, or by abort) and wait briefly for their logs."""
        end = Task(task_id="end", kind="end", round=0, total_rounds=self.spec.server.num_rounds)
        active = self.board.active_sites()
        if status == jobstore.COMPLETED:
            await self.board.ask(end, active)
            timeout = END_TIMEOUT
        else:
            for site in active:
                try:
                    self.ctx.registry.send(site, fpb.Command(abort_job=fpb.AbortJob(job_id=self.job_id, reason=status)))
                except StateError:
                    pass
            timeout = ABORT_TIMEOUT
        await self.board.close()
        waiting = [f for s, f in self._ended.items() if not f.done() and s in active]
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)
        for site in active:
            if not self._ended[site].done():
                self._set_state(site, "no final report")

    # ------------------------------------------------------------------ what sites and workers ask

    def is_running_at(self, site: str) -> bool:
        """True when `site` reported its worker started and it has not ended or left."""
        return self._site_states.get(site) == "running"

    def active_sites(self) -> list[str]:
        return self.board.active_sites()

    def tracking_pending(self) -> bool:
        """True when tracking events of this job still wait for a tracker that was down."""
        return self.tracking is not None and not self.tracking.report.complete

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
            yield fpb.ServerMessage(task=next(frames(fpb.TaskFrame, header, ())))
            return
        if model.data is not None:
            cache = self._task_messages
            if task.task_id not in cache:
                cache.clear()
                cache[task.task_id] = [
                    fpb.ServerMessage(task=frame)
                    for frame in frames(fpb.TaskFrame, header, (model.data,), sha256=model.sha256)
                ]
            yield from cache[task.task_id]
            return
        header.acknowledge = True
        for frame in frames(fpb.TaskFrame, header, model.chunks(BLOCK_BYTES), sha256=model.sha256):
            yield fpb.ServerMessage(task=frame)

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
        return Spool(self._tmp_dir, prefix=f"{site}-", expected=self.model_bytes if payload_format else 0)

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

    def receive_events(self, site: str, events: Sequence[object]) -> str:
        if self.tracking is None:
            return "no tracking configured for this job; events ignored"
        return self.tracking.site_events(site, events)

    # ------------------------------------------------------------------ site events

    def site_report(self, site: str, state: str, error: str, log_text: bytes) -> None:
        if site not in self.sites:
            return
        if log_text:
            path = self.result_dir / "sites" / site / "log.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(log_text)
        if state == "started":
            self._set_state(site, "running")
            _resolve(self._started.get(site), "started")
            return
        if state in ("failed", "refused"):
            reason = error.strip().splitlines()[-1] if error.strip() else f"worker {state}"
            self._set_state(site, f"{state}: {reason}")
            _resolve(self._started.get(site), f"{state}: {reason}")
            _resolve(self._ended.get(site), state)
            if state == "failed":
                # A crash in the training script fails the job: the traceback goes to the job's log.
                self.log.error("%s: the job's worker failed:\n%s", site, error.strip() or "(no detail)")
                _resolve(self._fatal, f"{site}: {reason}")
            else:
                self.log.warning("%s refused the job: %s", site, reason)
            self.board.site_gone(site, f"{state}: {reason}")
            return
        self._set_state(site, state)
        _resolve(self._started.get(site), state)
        _resolve(self._ended.get(site), state)
        if not self.board.closed:
            self._site_left(site, f"its worker {state} before the job ended")

    def site_restarted(self, site: str) -> None:
        if site in self.sites and not self.board.closed and site not in self.board.gone:
            self._site_left(site, "the site daemon restarted")

    def site_dead(self, site: str, silence: float) -> None:
        if site in self.board.active_sites() and not self.board.closed:
            self._site_left(site, f"no heartbeat for {silence:.0f} s")

    def _site_left(self, site: str, reason: str) -> None:
        self._set_state(site, f"left: {reason}")
        self.log.warning("%s left the job: %s", site, reason)
        self.board.site_gone(site, reason)
        _resolve(self._ended.get(site), "left")

    def _set_state(self, site: str, state: str) -> None:
        self._site_states[site] = state
        self.ctx.store.set_site_state(self.job_id, site, state)

    # ------------------------------------------------------------------ tracking and results

    def _start_tracking(self) -> None:
        if self.ctx.tracking_factory is None or not self.spec.server.tracking:
            return
        self.tracking = self.ctx.tracking_factory(
            job_id=self.job_id, spec=self.spec, job_dir=self.job_dir, sites=self.sites
        )
        self.tracking.start()

    def _close_tracking(self, status: str = jobstore.COMPLETED) -> None:
        for name in ("final_model.safetensors", "metrics.json", "metrics.csv"):
            path = self.result_dir / name
            if path.exists():
                self.tracking.add_artifact(path)
        mlflow_status = {jobstore.COMPLETED: "FINISHED", jobstore.ABORTED: "KILLED"}.get(status, "FAILED")
        report = self.tracking.close(timeout=10.0, status=mlflow_status)
        self.log.info("tracking: %s", report.as_dict())

    def _write_result(self, status: str, error: str, outcome: Outcome) -> None:
        """Metrics files and plot, then tracking (they are its artifacts), then the summary and the log."""
        rounds = self.ctx.store.rounds(self.job_id)
        results.write_metrics(self.result_dir, rounds)
        results.plot_metrics(self.result_dir, rounds, title=f"{self.spec.name} ({self.job_id[:8]})")
        if self.tracking is not None:
            self._close_tracking(status)
        write_json_atomic(self.result_dir / "result.json", self._summary(status, error, outcome))
        for handler in self.log.handlers:
            handler.flush()
        log_file = self.job_dir / "log.txt"
        if log_file.exists():
            (self.result_dir / "log.txt").write_bytes(log_file.read_bytes())

    def _summary(self, status: str, error: str, outcome: Outcome) -> dict[str, object]:
        summary: dict[str, object] = {
            "job_id": self.job_id,
            "name": self.spec.name,
            "status": status,
            "error": error,
            "encrypted": self.spec.server.encryption != "none",
            "rounds_completed": len(outcome.rounds),
            "num_rounds": self.spec.server.num_rounds,
            "stopped_early": outcome.stopped_early,
            "final_metrics": outcome.final_metrics,
            "best_round": outcome.best_round,
            "best_value": outcome.best_value,
            "key_metric": self.spec.server.key_metric,
            "model_bytes": self.model_bytes,
            "sites": self._site_states,
        }
        if self.tracking is not None:
            summary["tracking"] = self.tracking.report.as_dict()
        return summary


def _resolve(future: asyncio.Future[str] | None, value: str) -> None:
    if future is not None and not future.done():
        future.set_result(value)
