"""One running job on the server: deploy to the sites, run the workflow, collect results, clean up.

The lifecycle is a single coroutine (`JobRun.run`) so that abort is a plain cancellation and every
way out (completed, aborted, failed) passes through the same `finally`: sites are told to stop,
their logs are collected, and the result folder is written. That is why deploying, the sites' events,
tracking and the result folder stay in this one module: each is a step of that coroutine or an event
it waits on. The job's traffic with the workers is `JobIO` (fedserver/job_io.py); how its sites are
started and stopped is the run's `Deployment` (fedserver/deployment.py): the site daemons, or the
simulator's virtual sites, the only difference between a deployed and a simulated job.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedgrid import retry, tensors
from fedgrid.errors import FedgridError, StateError
from fedgrid.files import write_atomic, write_json_atomic
from fedgrid.jobspec import JobSpec
from fedgrid.serde import RoundInfo
from fedgrid.tensor_file import TensorFile
from fedserver import checkpoint, jobstore, memory, metrics, results, strategies
from fedserver.aggregation import Aggregator, PlainAggregator
from fedserver.deployment import Deployment
from fedserver.grid import Result, Task, TaskBoard
from fedserver.job_io import JobIO
from fedserver.job_keys import JobKeys
from fedserver.jobstore import JobStore
from fedserver.model import MEMORY_LIMIT, Model
from fedserver.privacy import DPAggregator, PrivacyLedger
from fedserver.rounds import Outcome, RoundLoop
from fedserver.secure_rounds import SecureRounds
from fedserver.server_evaluation import ServerEvaluator
from fedserver.watchers import Watchers

if TYPE_CHECKING:
    from fedgrid.he import HEContext  # imports TenSEAL: only encrypted jobs load it

START_TIMEOUT = 120.0
"""Seconds a site may take to fetch the job, verify it and start its worker."""
END_TIMEOUT = 20.0
"""Seconds to wait for the sites' final reports (and logs) after the job ended."""
ABORT_TIMEOUT = 6.0
"""Seconds to wait for the sites to confirm an abort (the whole abort stays under 10 s)."""


@dataclass(frozen=True)
class RunContext:
    """What a job run needs from the server around it."""

    store: JobStore
    deployment: Deployment
    """How the job's sites are started and stopped: the site daemons, or the simulator's virtual sites."""
    watchers: Watchers
    he_context: bytes | None
    """The provisioned keyless HE context (`he.keys: provisioned`); None when the sites make each job's key."""
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
    def __init__(
        self, *, job_id: str, spec: JobSpec, sites: list[str], ctx: RunContext, attempt: int = 0
    ) -> None:
        self.job_id = job_id
        self.spec = spec
        self.ctx = ctx
        self.attempt = attempt
        """0 for a job's first run; n for its n-th resumption after the server restarted."""
        self._interrupted = False
        """Set when the server stops gracefully: the job is left RUNNING, to resume when it starts again."""
        self.job_dir = ctx.store.job_dir(job_id)
        self.result_dir = self.job_dir / "result"
        self.result_dir.mkdir(exist_ok=True)
        self.log = job_logger(job_id, self.job_dir / "log.txt")
        self.sites = sorted(sites)
        self.board = TaskBoard(job_id, self.sites)
        self.io = JobIO(
            job_id=job_id,
            job_dir=self.job_dir,
            board=self.board,
            log=self.log,
            on_ask=lambda site: self._readmit(site, asking=True),
        )
        """The job's traffic with its workers (package, tasks, results): what worker streams call."""
        self._site_states: dict[str, str] = {}
        self._silent: dict[str, str] = {}
        """Sites that left because they went silent (why), and may rejoin when they are heard from again."""
        self._rejoined: dict[str, str] = {}
        """Sites that rejoined the job, with the departure they came back from (shown in their state)."""
        self._started: dict[str, asyncio.Future[str]] = {}
        self._ended: dict[str, asyncio.Future[str]] = {}
        self._fatal: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None
        self.abort_reason = ""
        self.tracking = None
        self.layout: tensors.Layout = {}
        self.he_context = ctx.he_context
        """The keyless context this job's ciphertexts are added with (provisioned, or from the key site)."""
        self._he: HEContext | None = None
        """`he_context` loaded, before round 1."""
        self.privacy = PrivacyLedger(spec.server.privacy) if spec.server.privacy is not None else None
        """Private jobs: the accountant of the job's privacy budget."""
        self.keys: JobKeys | None = None
        """Encrypted jobs of a federation whose sites make the HE keys: the relay of this job's key."""
        if spec.server.encryption == "ckks" and ctx.he_context is None:
            key_site = spec.server.key_site or self.sites[0]
            self.keys = JobKeys(job_id=job_id, key_site=key_site, board=self.board, job_dir=self.job_dir, log=self.log)
        self.secure: SecureRounds | None = None
        """SecAgg+ jobs: the round in progress, which the sites' steps reach."""
        if spec.server.secure_aggregation != "none":
            self.secure = SecureRounds(job_id, spec.server.secagg, spec.server.privacy, self.board)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"job-{self.job_id}")
        return self._task

    async def interrupt(self) -> None:
        """The server stops: end the run here without ending the job, which stays RUNNING and resumes from its
        checkpoint when the server starts again; the sites' workers wait for it meanwhile."""
        if self._task is None or self._task.done() or self.abort_reason:
            return
        self._interrupted = True
        self._task.cancel()
        await asyncio.wait({self._task})

    async def _leave_for_restart(self, workflow: asyncio.Task[Outcome] | None) -> None:
        if workflow is not None and not workflow.done():
            workflow.cancel()
            await asyncio.gather(workflow, return_exceptions=True)
        self.log.warning("the server is stopping; the job resumes from its checkpoint when it starts again")
        for handler in list(self.log.handlers):
            handler.close()
            self.log.removeHandler(handler)

    async def abort(self, reason: str) -> None:
        """Cancel the run; returns when the job is recorded as aborted and the sites were told.

        Any number of callers may abort at once: the first cancels, and every caller waits for the same
        end (a second cancellation would interrupt the clean-up that records the job's end).
        """
        if self._task is None:
            return
        if not self._task.done() and not self.abort_reason:
            self.abort_reason = reason
            self._task.cancel()
        await asyncio.wait({self._task})

    async def run(self) -> None:
        store = self.ctx.store
        status, error = jobstore.COMPLETED, ""
        outcome = Outcome()
        workflow: asyncio.Task[Outcome] | None = None
        try:
            if self.attempt:
                store.update(self.job_id, status=jobstore.RUNNING, sites=self.sites, error="")
                self.log.info("job %s (%s) resuming on %s", self.job_id, self.spec.name, ", ".join(self.sites))
            else:
                store.update(self.job_id, status=jobstore.RUNNING, start_time=time.time(), sites=self.sites)
                self.log.info("job %s (%s) starting on %s", self.job_id, self.spec.name, ", ".join(self.sites))
            await self.ctx.watchers.status(self.job_id)
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
            if self._interrupted:
                await self._leave_for_restart(workflow)
                return
            status, error = jobstore.ABORTED, self.abort_reason or "aborted"
            self.log.warning("job aborted: %s", error)
            if workflow is not None and not workflow.done():
                workflow.cancel()  # no further round starts once the job is aborted
                await asyncio.gather(workflow, return_exceptions=True)
        except FedgridError as exc:
            status, error = jobstore.FAILED, str(exc)
            self.log.error("job failed: %s", exc)
        except OSError as exc:
            status, error = jobstore.FAILED, f"{exc.filename or 'the job folder'}: {exc.strerror or exc}"
            self.log.error("job failed writing its folder: %s", error)
        except Exception as exc:  # noqa: BLE001 - a bug in one job must not take the server down
            status, error = jobstore.FAILED, f"internal error: {type(exc).__name__}: {exc}"
            self.log.error("job failed with an internal error:\n%s", traceback.format_exc())
        finally:
            if not self._interrupted:
                await self._end(status, error, outcome)

    async def _end(self, status: str, error: str, outcome: Outcome) -> None:
        """Tell the sites, write the result folder, record the end. A step that fails (a full disk, a folder
        that became unwritable) fails the job with the path and the cause, and the steps after it still run:
        a job never stays RUNNING because its clean-up could not write."""
        try:
            await self._shutdown(status)
        except Exception:  # noqa: BLE001 - the sites are told best-effort; the record must still be written
            self.log.exception("telling the sites the job ended failed")
        try:
            await asyncio.to_thread(self._write_result, status, error, outcome)
        except OSError as exc:
            problem = f"writing the result folder failed: {exc.strerror or exc} ({exc.filename or self.result_dir})"
            self.log.error("%s", problem)
            if status == jobstore.COMPLETED:
                status, error = jobstore.FAILED, problem
        summary = self._summary(status, error, outcome)
        # A full disk may refuse even the job store's write: keep trying until there is space again.
        await retry.acall(
            lambda: asyncio.to_thread(
                self.ctx.store.update, self.job_id, status=status, end_time=time.time(), error=error, result=summary
            ),
            what=f"recording the end of job {self.job_id}",
            retryable=lambda exc: isinstance(exc, sqlite3.OperationalError),
            give_up_after=None,
            log=self.log,
            first=1.0,
            cap=30.0,
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
        self.io.expect_models_of(model.size, encrypted=self.spec.server.encryption != "none")
        self.log.info("initial model: %d tensors, %.2f MB", len(self.layout), model.size / 1e6)
        return model

    async def _deploy(self) -> None:
        """Ask every site to start the job; fail unless at least min_clients did."""
        loop = asyncio.get_running_loop()
        for site in self.sites:
            self._started[site] = loop.create_future()
            self._ended[site] = loop.create_future()
            self._set_state(site, "deploying")
        self.ctx.deployment.start_job(self.job_id, self.spec, self.sites)
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
        if self.keys is not None:
            started = time.monotonic()
            self.he_context = await self.keys.context()
            self.log.info("job key made by %s, ready %.2f s after the workers", self.keys.key_site,
                          time.monotonic() - started)
        if self.spec.server.encryption == "ckks":
            from fedserver.he_aggregation import load_context

            assert self.he_context is not None  # checked at submit, or made by the key site just above
            self._he = await asyncio.to_thread(load_context, self.he_context)
        if self.io.large:
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
            model_dir=self.io.tmp_dir,
            log=self.log,
            on_round=self._on_round,
            on_round_start=self._round_started,
            release_model=self._release_model,
            keep_dir=self.job_dir / "uploads" if self.ctx.keep_uploads else None,
            evaluator=evaluator,
            resume=self._checkpoint(),
            attempt=self.attempt,
            recorded=self.ctx.store.rounds(self.job_id) if self.attempt else [],
            privacy=self.privacy,
        )
        self.log.info("strategy %s", self.spec.server.strategy.describe())
        return await workflow.run(initial)

    def _checkpoint(self) -> checkpoint.Checkpoint | None:
        """A resumed job's last checkpoint (None for a first run, or when no round had finished)."""
        if not self.attempt:
            return None
        point = checkpoint.read(self.job_dir / "checkpoint", self.io.tmp_dir)
        if point is None:
            self.log.info("no round had finished before the server stopped: the job starts again from round 1")
        return point

    def _aggregator(self, model: Model, layout: tensors.Layout, task: Task, sites: list[str]) -> Aggregator:
        """Folds the results of `task` from `sites`, whose tensors are `layout` (the model's and the strategy's)."""
        if self.spec.server.encryption == "ckks":
            from fedserver.he_aggregation import EncryptedAggregator

            assert self._he is not None  # loaded before round 1
            return EncryptedAggregator(self._he, layout)
        if self.secure is not None:
            return self.secure.new_round(task, sites, layout, self.spec.server.round_timeout, self.log)
        if self.spec.server.privacy is not None:
            return DPAggregator(layout, model, self.spec.server.privacy, expected=len(sites))
        return PlainAggregator(layout, model, self.spec.server.clip_norm)

    async def _round_started(self, round_no: int) -> None:
        """The round in progress is the job's current round (what list_jobs shows, and where a crash stopped it)."""
        await asyncio.to_thread(self.ctx.store.update, self.job_id, current_round=round_no)

    async def _on_round(self, record: RoundInfo) -> None:
        if self.io.large:
            memory.trim()  # large models: hand the round's freed payload buffers back to the system
        # Off the event loop: the commit waits for the disk (fsync), and rounds and uploads go on meanwhile.
        await asyncio.to_thread(self.ctx.store.add_round, self.job_id, record)
        metrics.round_completed(record.seconds)
        values = ", ".join(f"{k} {v:.4f}" for k, v in record.metrics.items())
        self.log.info(
            "round %d/%d done in %.2f s: %d/%d sites answered, %s",
            record.round,
            self.spec.server.num_rounds,
            record.seconds,
            record.sites_answered,
            record.sites_asked,
            values or "no metrics",
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
            self._abort_at(active, status)
            timeout = ABORT_TIMEOUT
        await self.board.close()
        waiting = [f for s, f in self._ended.items() if not f.done() and s in active]
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)
        late = [site for site in active if site in self._ended and not self._ended[site].done()]
        for site in late:
            self._set_state(site, "no final report")
        if late and status == jobstore.COMPLETED:
            # A script still busy (hung in training) would hold its worker, and the site's job slot, forever.
            self._abort_at(late, "the job ended and its worker did not finish")

    def _abort_at(self, sites: list[str], reason: str) -> None:
        """Tell `sites` to end their worker of this job."""
        self.ctx.deployment.abort_job(self.job_id, sites, reason)

    # ------------------------------------------------------------------ what sites and workers ask

    def is_running_at(self, site: str) -> bool:
        """True when `site` reported its worker started and it has not ended or left."""
        return self._site_states.get(site, "").split(" (", 1)[0] == "running"

    def active_sites(self) -> list[str]:
        return self.board.active_sites()

    def tracking_pending(self) -> bool:
        """True when tracking events of this job still wait for a tracker that was down."""
        return self.tracking is not None and not self.tracking.report.complete

    def receive_events(self, site: str, events: Sequence[object]) -> str:
        if self.tracking is None:
            return "no tracking configured for this job; events ignored"
        return self.tracking.site_events(site, events)

    # ------------------------------------------------------------------ site events

    def site_report(self, site: str, state: str, error: str, log_text: bytes) -> None:
        if site not in self.sites:
            return
        if state != "started":
            self._silent.pop(site, None)  # its worker ended: nothing is left to rejoin with
        if log_text:
            write_atomic(self.result_dir / "sites" / site / "log.txt", log_text)
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
            reason = f"no heartbeat for {silence:.0f} s"
            self._site_left(site, reason)
            self._silent[site] = reason

    def may_rejoin(self, site: str) -> bool:
        """True when `site` left only because it went silent: its worker may still be at work."""
        return site in self._silent and not self.board.closed

    def readmit(self) -> None:
        """Take back the sites that went silent, are alive again and whose worker waits for work."""
        for site in list(self._silent):
            self._readmit(site, asking=False)

    def _readmit(self, site: str, *, asking: bool) -> None:
        """`site` rejoins the job when it left because it went silent, its heartbeats arrive again and its
        worker asks for work (`asking`, or a request of its is waiting). The round that runs does not wait
        for it; the next round asks it again."""
        if not self.may_rejoin(site) or not (asking or self.board.polling(site)):
            return
        if not self.ctx.deployment.is_alive(site):
            return
        reason = self._silent.pop(site)
        self.board.rejoin(site)
        self._ended[site] = asyncio.get_running_loop().create_future()
        self._rejoined[site] = f"rejoined after it left: {reason}"
        self._set_state(site, "running")
        self.log.info("%s rejoined the job (it had left: %s); it takes part from the next round on", site, reason)

    def _site_left(self, site: str, reason: str) -> None:
        self._silent.pop(site, None)
        self._set_state(site, f"left: {reason}")
        self.log.warning("%s left the job: %s", site, reason)
        self.board.site_gone(site, reason)
        _resolve(self._ended.get(site), "left")

    def _set_state(self, site: str, state: str) -> None:
        if site in self._rejoined and not state.startswith("left"):
            state = f"{state} ({self._rejoined[site]})"
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
            write_atomic(self.result_dir / "log.txt", log_file.read_bytes())

    def _summary(self, status: str, error: str, outcome: Outcome) -> dict[str, object]:
        """result.json: what the job's records say (its rounds are those in the job store, whatever way it
        ended, so the summary never contradicts the metrics files and the models beside it)."""
        rounds = self.ctx.store.rounds(self.job_id)
        summary: dict[str, object] = {
            "job_id": self.job_id,
            "name": self.spec.name,
            "status": status,
            "error": error,
            "encrypted": self.spec.server.encryption != "none",
            "rounds_completed": len(rounds),
            "num_rounds": self.spec.server.num_rounds,
            "stopped_early": outcome.stopped_early,
            "final_metrics": outcome.final_metrics or (rounds[-1].metrics if rounds else {}),
            "best_round": outcome.best_round,
            "best_value": outcome.best_value,
            "key_metric": self.spec.server.key_metric,
            "model_bytes": self.io.model_bytes,
            "sites": self._site_states,
        }
        if self.privacy is not None:
            params = self.privacy.params
            summary["privacy"] = {
                "epsilon": self.privacy.spent,
                "delta": params.delta,
                "rounds_charged": len(self.privacy.charged),
                "noise_multiplier": params.noise_multiplier,
                "clip_norm": params.clip_norm,
                "where": params.where,
                "accountant": params.accountant,
                "sampling_rate": params.sampling_rate,
                "target_epsilon": params.target_epsilon,
            }
        if self.tracking is not None:
            summary["tracking"] = self.tracking.report.as_dict()
        return summary


def _resolve(future: asyncio.Future[str] | None, value: str) -> None:
    if future is not None and not future.done():
        future.set_result(value)
