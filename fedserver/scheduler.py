"""Which jobs run where: the queue, the sites' resources, the running `JobRun`s, and what sites report.

The scheduler starts a queued job as soon as enough of its sites are alive and have the resources its
`resource_spec` asks for free (what a site offers less what its running jobs hold), notices sites that
fell silent, and tells each running job when one of its sites restarted, reported, or went away.
Everything runs on the server's event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fedgrid import jobspec
from fedgrid.errors import FedgridError, NotFoundError, StateError
from fedgrid.files import write_json_atomic
from fedgrid.jobspec import JobSpec
from fedgrid.retry import Backoff
from fedgrid.settings import ServerSettings
from fedgrid.transfer import frames
from fedgrid.v1 import federation_pb2 as fpb
from fedserver import jobstore, memory
from fedserver.job_io import TASK_MESSAGE
from fedserver.jobrun import JobRun, RunContext
from fedserver.jobstore import JobRecord, JobStore
from fedserver.registry import SiteRegistry

log = logging.getLogger(__name__)

LATE_DELIVERY_FIRST = 15.0
"""Seconds before a finished job's pending tracking events are tried again (doubling up to ten minutes)."""


class Scheduler:
    def __init__(self, *, store: JobStore, registry: SiteRegistry, settings: ServerSettings, ctx: RunContext) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        self.ctx = ctx
        self.runs: dict[str, JobRun] = {}
        self._wake = asyncio.Event()
        self._started = asyncio.Event()
        """Set (and replaced) whenever a job starts running: what workers of a resuming job wait for."""
        self._loop_task: asyncio.Task[None] | None = None
        self._late: dict[str, asyncio.Task[None]] = {}
        """Tracking deliveries still pending after their job ended (the tracking server was down)."""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.store.sweep_incoming()
        for record in self.store.interrupted():
            self._take_back(record)
        self._loop_task = asyncio.create_task(self._loop(), name="scheduler")
        for record in self.store.list(include_finished=True):
            if record.finished and record.result.get("tracking", {}).get("complete") is False:
                self._deliver_later(record.job_id)

    async def stop(self) -> None:
        """Stop scheduling; running jobs are left to resume at the next start (or aborted, when the operator
        or the job turned resuming off)."""
        for task in [self._loop_task, *self._late.values()]:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        runs = list(self.runs.values())
        resumable = [run for run in runs if self.settings.resume_jobs and run.spec.server.resume]
        ending = [run.abort("the server is shutting down") for run in runs if run not in resumable]
        await asyncio.gather(*(run.interrupt() for run in resumable), *ending, return_exceptions=True)

    def _take_back(self, record: JobRecord) -> None:
        """A job that was running when the server stopped: back in the queue to resume from its checkpoint,
        or ended with the reason it does not resume."""
        if not self.settings.resume_jobs:
            self.store.fail_interrupted(record.job_id, "the server's resume_jobs setting is off")
        else:
            try:
                resume = self.spec(record.job_id).server.resume
            except FedgridError as exc:
                self.store.fail_interrupted(record.job_id, f"the job no longer loads ({exc})")
                return
            if not resume:
                self.store.fail_interrupted(record.job_id, 'the job says "resume": false')
                return
            attempt = record.result.get("resume", {}).get("attempt", 0) + 1
            state = self.store.job_dir(record.job_id) / "checkpoint" / "state.json"
            done = json.loads(state.read_text())["round"] if state.exists() else 0
            self.store.requeue(record.job_id, attempt, done + 1)
            log.warning("job %s was running when the server stopped; it resumes from round %d", record.job_id, done + 1)
            return
        log.warning("job %s was running when the server stopped; marked %s", record.job_id, jobstore.FAILED)

    async def run_when_started(self, job_id: str) -> JobRun | None:
        """The run of `job_id`, waiting for it while the job is queued to resume; None once it is not."""
        while True:
            run = self.runs.get(job_id)
            if run is not None or not self.resuming(job_id):
                return run
            started = self._started
            try:
                await asyncio.wait_for(started.wait(), 5.0)
            except TimeoutError:
                pass

    def resuming(self, job_id: str) -> bool:
        """Whether `job_id` waits in the queue to resume (its sites' workers should wait for it)."""
        try:
            record = self.store.get(job_id)
        except NotFoundError:
            return False
        return record.status == jobstore.SUBMITTED and "resume" in record.result

    def wake(self) -> None:
        """Look at the queue again now (a job was submitted, a site came or went)."""
        self._wake.set()

    async def _loop(self) -> None:
        """Start queued jobs when their sites are alive; notice sites that fell silent."""
        while True:
            try:
                self._check_liveness()
                self._start_ready_jobs()
            except Exception:  # noqa: BLE001 - the scheduler must outlive any one bad job
                log.exception("scheduler pass failed")
            self._wake.clear()
            self.registry.changed.clear()
            waits = [asyncio.create_task(self._wake.wait()), asyncio.create_task(self.registry.changed.wait())]
            await asyncio.wait(waits, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waits:
                waiter.cancel()

    def _check_liveness(self) -> None:
        """Sites of running jobs that fell silent leave them; those heard from again rejoin (JobRun.readmit)."""
        now = time.time()
        for run in self.runs.values():
            for site in run.active_sites():
                record = self.registry.get(site)
                if record is None or not self.registry.is_alive(record):
                    silence = now - record.last_heartbeat if record else 0.0
                    run.site_dead(site, silence)
            run.readmit()

    def _start_ready_jobs(self) -> None:
        for record in self.store.queued():
            if record.job_id in self.runs:
                continue
            if len(self.runs) >= self.settings.max_concurrent_jobs:
                return
            try:
                spec = self.spec(record.job_id)
            except FedgridError as exc:
                self.store.update(record.job_id, status=jobstore.FAILED, end_time=time.time(), error=str(exc))
                continue
            resuming = "resume" in record.result
            sites, _ = self._startable_sites(spec, list(record.sites) if resuming else None)
            if sites is None:
                continue
            attempt = record.result.get("resume", {}).get("attempt", 0)
            run = JobRun(job_id=record.job_id, spec=spec, sites=sites, ctx=self.ctx, attempt=attempt)
            self.runs[record.job_id] = run
            self._started.set()
            self._started = asyncio.Event()
            task = run.start()
            task.add_done_callback(lambda _t, job_id=record.job_id: self._run_ended(job_id))

    def _run_ended(self, job_id: str) -> None:
        run = self.runs.pop(job_id, None)
        self._wake.set()
        if run is not None and run.tracking_pending():
            self._deliver_later(job_id)
        del run
        memory.trim()  # what the job held is free now: an idle server keeps what it uses, not its peak

    # ------------------------------------------------------------------ resources

    def _startable_sites(self, spec: JobSpec, every: list[str] | None = None) -> tuple[list[str] | None, str]:
        """The sites to start the job on now (alive, and with the resources it asks for free), or None and
        why it waits. A resumed job starts on `every` one of the sites it ran on, once they are all back, so
        its rounds go on as they would have."""
        alive = {s.name for s in self.registry.alive() if s.stream_open}
        if every is not None:
            missing = sorted(set(every) - alive)
            if missing:
                return None, f"waiting for the sites it ran on: {', '.join(missing)} not back yet"
            alive = set(every)
        targets = alive if spec.all_sites or every is not None else spec.named_sites() & alive
        fitting, short = [], []
        for name in sorted(targets):
            lack = self._lack(name, spec.needs(name))
            if lack:
                short.append(f"{name} {lack}")
            else:
                fitting.append(name)
        if len(fitting) >= (len(every) if every is not None else spec.min_clients):
            return fitting, ""
        reason = f"waiting for {spec.min_clients} sites; alive: {', '.join(sorted(alive)) or 'none'}"
        if short:
            reason += f"; short of resources: {'; '.join(short)}"
        return None, reason

    def _lack(self, site: str, needs: dict[str, float]) -> str:
        """What `site` lacks of `needs` beside the jobs running on it, or of job slots ("" when the job fits)."""
        record = self.registry.get(site)
        if record is None:
            return ""
        running = sum(1 for run in self.runs.values() if site in run.sites)
        if record.max_jobs and running >= record.max_jobs:
            return f"runs {running} jobs, its max_concurrent_jobs"
        if not needs:
            return ""
        offered = {"num_cpus": float(record.cpu_count), "memory_gb": record.memory_gb}
        units = {"num_cpus": "CPUs", "memory_gb": "GB of memory"}
        for key, amount in needs.items():
            if not offered.get(key):
                continue  # not reported by the site: no limit
            held = sum(run.spec.needs(site).get(key, 0.0) for run in self.runs.values() if site in run.sites)
            free = offered[key] - held
            if amount > free:
                return f"has {max(free, 0):g} of {offered[key]:g} {units[key]} free, the job needs {amount:g}"
        return ""

    def spec(self, job_id: str) -> JobSpec:
        return jobspec.load_job(self.store.job_dir(job_id) / "job")

    def waiting_reason(self, record: JobRecord) -> str:
        """Why a submitted job has not started yet ("" once it runs or ended)."""
        if record.status != jobstore.SUBMITTED:
            return ""
        try:
            spec = self.spec(record.job_id)
        except FedgridError as exc:
            return str(exc)
        resume = record.result.get("resume")
        prefix = f"resumes from round {resume['from_round']} once it can start; " if resume else ""
        if len(self.runs) >= self.settings.max_concurrent_jobs:
            return f"{prefix}waiting for a free slot: {len(self.runs)} jobs run, the server's max_concurrent_jobs"
        every = list(record.sites) if resume else None
        return prefix + (self._startable_sites(spec, every)[1] or "starting")

    # ------------------------------------------------------------------ sites

    def run_for(self, job_id: str, site: str) -> JobRun:
        """The running job `job_id`, of which `site` must be a site; StateError otherwise."""
        run = self.runs.get(job_id)
        if run is None:
            record = self.store.get(job_id)
            raise StateError(f"job {job_id} is {record.status}, not running")
        if site not in run.sites:
            raise StateError(f"{site} is not a site of job {job_id}")
        return run

    def end_messages(self, job_id: str) -> list[fpb.ServerMessage]:
        """The task that tells a worker of a job that does not run (any more) to end."""
        try:
            reason = f"job is {self.store.get(job_id).status}"
        except NotFoundError:
            reason = "no such job"
        header = fpb.TaskHeader(job_id=job_id, task_id="end", kind="end", reason=reason)
        return list(frames(TASK_MESSAGE, header, ()))

    def site_registered(self, site: str, running_jobs: list[str]) -> None:
        """A site (re)connected: stop what it runs that we do not, and note a site that restarted."""
        for job_id in running_jobs:
            run = self.runs.get(job_id)
            if run is None and self.resuming(job_id):
                continue  # its worker waits for the job to resume
            if run is None or (site not in run.active_sites() and not run.may_rejoin(site)):
                self.registry.send(
                    site,
                    fpb.Command(
                        abort_job=fpb.AbortJob(job_id=job_id, reason="the server does not run this job (any more)")
                    ),
                )
        for run in self.runs.values():
            if site in run.active_sites() and run.job_id not in running_jobs and run.is_running_at(site):
                run.site_restarted(site)
        self._wake.set()

    def site_report(self, site: str, report: fpb.JobReport) -> None:
        run = self.runs.get(report.job_id)
        if run is None:
            log.info("report from %s about job %s, which is not running: %s", site, report.job_id, report.state)
            return
        run.site_report(site, report.state, report.error, report.log[-(4 << 20) :])

    # ------------------------------------------------------------------ tracking after the job

    def late_deliveries(self) -> list[str]:
        """Ended jobs whose pending tracking records are being delivered again (fedserver/metrics.py)."""
        return list(self._late)

    def _deliver_later(self, job_id: str) -> None:
        if job_id not in self._late and self.ctx.tracking_factory is not None:
            self._late[job_id] = asyncio.create_task(self._late_delivery(job_id), name=f"tracking-{job_id}")

    async def _late_delivery(self, job_id: str) -> None:
        """Retry the delivery of a finished job's pending tracking events until they are all delivered."""
        backoff = Backoff(first=LATE_DELIVERY_FIRST, cap=600.0)
        try:
            while True:
                await asyncio.sleep(backoff.next())
                try:
                    record = self.store.get(job_id)
                except NotFoundError:
                    return
                tracking = self.ctx.tracking_factory(  # type: ignore[misc]
                    job_id=job_id, spec=self.spec(job_id), job_dir=self.store.job_dir(job_id), sites=record.sites
                )
                status = {jobstore.COMPLETED: "FINISHED", jobstore.ABORTED: "KILLED"}.get(record.status, "FAILED")
                report = (await asyncio.to_thread(tracking.close, 30.0, status=status)).as_dict()
                self.store.update(job_id, result={**record.result, "tracking": report})
                result_file = self.store.job_dir(job_id) / "result" / "result.json"
                if result_file.exists():
                    summary = json.loads(result_file.read_text())
                    write_json_atomic(result_file, {**summary, "tracking": report})
                if report.get("complete"):
                    log.info("job %s: the pending tracking events are delivered now", job_id)
                    return
        except FedgridError as exc:
            log.warning("job %s: tracking delivery given up: %s", job_id, exc)
        finally:
            self._late.pop(job_id, None)
