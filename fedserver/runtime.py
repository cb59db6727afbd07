"""The server's job runtime: submission, the scheduler, running jobs, and what sites send about them.

Admin and federation servicers call into this object; it owns the job store, the running
`JobRun`s and their task boards. Everything runs on the server's event loop; file and CPU work
goes to threads so that hundreds of waiting sites cost nothing.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import shutil
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from fedgrid import jobspec
from fedgrid.certs import Identity
from fedgrid.errors import (
    FedgridError,
    JobSpecError,
    NotFoundError,
    StateError,
    TransferError,
)
from fedgrid.jobspec import JobSpec
from fedgrid.policy import Caller, JobOwner, Policy
from fedgrid.serde import JobDetail, JobInfo, RoundInfo
from fedgrid.settings import ServerSettings
from fedgrid.transfer import Assembler, Chunks, digest_checked, frames, receive_async, split
from fedgrid.v1 import admin_pb2 as apb
from fedgrid.v1 import federation_pb2 as fpb
from fedserver import jobstore
from fedserver.grid import Result, Task
from fedserver.jobrun import JobRun, RunContext
from fedserver.jobstore import JobRecord, JobStore
from fedserver.peers import PeerAuthority
from fedserver.registry import SiteRegistry
from fedserver.tracking.factory import check_installed
from fedserver.watchers import Watchers

log = logging.getLogger(__name__)

PACKAGE = "package.zip"
MANIFEST = "manifest.json"
SUBMITTER_CERT = "submitter.pem"
LONG_POLL = 30.0
"""Seconds a GetTask call waits for a task before answering "idle" (the worker asks again)."""


def to_info(record: JobRecord) -> JobInfo:
    return JobInfo(
        job_id=record.job_id,
        name=record.name,
        status=record.status,
        submitter=record.submitter,
        submitter_org=record.submitter_org,
        submit_time=record.submit_time,
        start_time=record.start_time,
        end_time=record.end_time,
        current_round=record.current_round,
        num_rounds=record.num_rounds,
        error=record.error,
        sites=tuple(record.sites),
        encrypted=record.encrypted,
        cloned_from=record.cloned_from,
    )


class JobRuntime:
    def __init__(
        self,
        *,
        store: JobStore,
        registry: SiteRegistry,
        peers: PeerAuthority,
        policy: Policy,
        settings: ServerSettings,
        ca_cert: x509.Certificate,
        he_context: bytes | None,
        tracking_factory: object | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.peers = peers
        self.policy = policy
        self.settings = settings
        self.ca_cert = ca_cert
        self.he_context = he_context
        self.watchers = Watchers()
        self.runs: dict[str, JobRun] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._late: dict[str, asyncio.Task[None]] = {}
        """Tracking deliveries still pending after their job ended (the tracking server was down)."""
        self._ctx = RunContext(
            store=store,
            registry=registry,
            watchers=self.watchers,
            he_context=he_context,
            tracking_factory=tracking_factory,
            keep_uploads=settings.keep_uploads,
        )  # type: ignore[arg-type]

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.store.sweep_incoming()
        for job_id in self.store.fail_interrupted():
            log.warning("job %s was running when the server stopped; marked %s", job_id, jobstore.FAILED)
        self._loop_task = asyncio.create_task(self._scheduler(), name="scheduler")
        for record in self.store.list(include_finished=True):
            if record.finished and record.result.get("tracking", {}).get("complete") is False:
                self._deliver_later(record.job_id)

    async def stop(self) -> None:
        for task in [self._loop_task, *self._late.values()]:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await asyncio.gather(
            *(run.abort("the server is shutting down") for run in list(self.runs.values())), return_exceptions=True
        )

    async def _scheduler(self) -> None:
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
        now = time.time()
        for run in self.runs.values():
            for site in run.board.active_sites():
                record = self.registry.get(site)
                if record is None or not self.registry.is_alive(record):
                    silence = now - record.last_heartbeat if record else 0.0
                    run.site_dead(site, silence)

    def _start_ready_jobs(self) -> None:
        for record in self.store.queued():
            if record.job_id in self.runs:
                continue
            if len(self.runs) >= self.settings.max_concurrent_jobs:
                return
            try:
                spec = self._spec(record.job_id)
            except FedgridError as exc:
                self.store.update(record.job_id, status=jobstore.FAILED, end_time=time.time(), error=str(exc))
                continue
            sites, _ = self._startable_sites(spec)
            if sites is None:
                continue
            run = JobRun(job_id=record.job_id, spec=spec, sites=sites, ctx=self._ctx)
            self.runs[record.job_id] = run
            task = run.start()
            task.add_done_callback(lambda _t, job_id=record.job_id: self._run_ended(job_id))

    def _run_ended(self, job_id: str) -> None:
        run = self.runs.pop(job_id, None)
        self._wake.set()
        if run is not None and run.tracking is not None and not run.tracking.report.complete:
            self._deliver_later(job_id)

    def _deliver_later(self, job_id: str) -> None:
        if job_id not in self._late and self._ctx.tracking_factory is not None:
            self._late[job_id] = asyncio.create_task(self._late_delivery(job_id), name=f"tracking-{job_id}")

    async def _late_delivery(self, job_id: str, first_delay: float = 15.0) -> None:
        """Retry the delivery of a finished job's pending tracking events until they are all delivered."""
        delay = first_delay
        try:
            while True:
                await asyncio.sleep(delay)
                try:
                    record = self.store.get(job_id)
                except NotFoundError:
                    return
                tracking = self._ctx.tracking_factory(  # type: ignore[misc]
                    job_id=job_id, spec=self._spec(job_id), job_dir=self.store.job_dir(job_id), sites=record.sites
                )
                status = {jobstore.COMPLETED: "FINISHED", jobstore.ABORTED: "KILLED"}.get(record.status, "FAILED")
                report = (await asyncio.to_thread(tracking.close, 30.0, status=status)).as_dict()
                self.store.update(job_id, result={**record.result, "tracking": report})
                result_file = self.store.job_dir(job_id) / "result" / "result.json"
                if result_file.exists():
                    summary = json.loads(result_file.read_text())
                    result_file.write_text(json.dumps({**summary, "tracking": report}, indent=2))
                if report.get("complete"):
                    log.info("job %s: the pending tracking events are delivered now", job_id)
                    return
                delay = min(delay * 2, 600.0)
        except FedgridError as exc:
            log.warning("job %s: tracking delivery given up: %s", job_id, exc)
        finally:
            self._late.pop(job_id, None)

    def _startable_sites(self, spec: JobSpec) -> tuple[list[str] | None, str]:
        """The sites to start the job on now (alive, and with the resources it asks for free), or None and
        why it waits."""
        alive = {s.name for s in self.registry.alive() if s.stream_open}
        targets = alive if spec.all_sites else spec.named_sites() & alive
        fitting, short = [], []
        for name in sorted(targets):
            lack = self._lack(name, spec.needs(name))
            if lack:
                short.append(f"{name} {lack}")
            else:
                fitting.append(name)
        if len(fitting) >= spec.min_clients:
            return fitting, ""
        reason = f"waiting for {spec.min_clients} sites; alive: {', '.join(sorted(alive)) or 'none'}"
        if short:
            reason += f"; short of resources: {'; '.join(short)}"
        return None, reason

    def _lack(self, site: str, needs: dict[str, float]) -> str:
        """What `site` lacks of `needs` beside the jobs running on it ("" when the job fits)."""
        record = self.registry.get(site)
        if record is None or not needs:
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

    def _spec(self, job_id: str) -> JobSpec:
        return jobspec.load_job(self.store.job_dir(job_id) / "job")

    def waiting_reason(self, record: JobRecord) -> str:
        if record.status != jobstore.SUBMITTED:
            return ""
        try:
            spec = self._spec(record.job_id)
        except FedgridError as exc:
            return str(exc)
        if len(self.runs) >= self.settings.max_concurrent_jobs:
            return f"waiting for a free slot: {len(self.runs)} jobs run, the server's max_concurrent_jobs"
        return self._startable_sites(spec)[1] or "starting"

    # ------------------------------------------------------------------ admin: jobs

    def _caller(self, identity: Identity) -> Caller:
        return Caller(name=identity.name, org=identity.org, role=identity.role or "")

    def _owned(self, identity: Identity, command: str, job_id: str) -> JobRecord:
        record = self.store.find(job_id)
        self.policy.check(self._caller(identity), command, JobOwner(record.submitter, record.submitter_org))
        return record

    async def submit(self, identity: Identity, cert_pem: bytes, frames_in: AsyncIterator[apb.UploadFrame]) -> JobRecord:
        """Receive, verify and store a signed job upload; nothing is kept if any check fails."""
        self.policy.check(self._caller(identity), "submit_job")
        limit = int(self.settings.max_upload_mb * 1e6)
        buffer = Chunks()
        header = await receive_async(frames_in, buffer, max_size=limit, what="job upload")
        job_id = self.store.new_id()
        staged = self.store.incoming_dir(job_id)
        try:
            spec = await asyncio.to_thread(
                self._check_upload, staged, buffer.getvalue(), header.signed_manifest, cert_pem, identity
            )
            record = self.store.add(
                job_id=job_id,
                staged=staged,
                name=spec.name,
                submitter=identity.name,
                submitter_org=identity.org,
                num_rounds=spec.server.num_rounds,
                meta=json.loads((staged / "job" / jobspec.META_FILE).read_text()),
                encrypted=spec.server.encryption != "none",
            )
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        log.info("job %s (%s) submitted by %s (%s)", job_id, spec.name, identity.name, identity.org)
        self._wake.set()
        return record

    def _check_upload(
        self, staged: Path, package: bytes, signed_manifest: bytes, cert_pem: bytes, identity: Identity
    ) -> JobSpec:
        job_dir = staged / "job"
        job_dir.mkdir()
        jobspec.safe_extract(
            package,
            job_dir,
            max_bytes=int(self.settings.max_upload_mb * 1e6) * 4,
            max_files=self.settings.max_job_files,
        )
        jobspec.verify_signature(job_dir, signed_manifest, x509.load_pem_x509_certificate(cert_pem), identity.name)
        spec = jobspec.load_job(job_dir, known_sites=self.known_sites())
        self._check_encryption(spec)
        check_installed(spec)
        (staged / PACKAGE).write_bytes(package)
        (staged / MANIFEST).write_bytes(signed_manifest)
        (staged / SUBMITTER_CERT).write_bytes(cert_pem)
        return spec

    def _check_encryption(self, spec: JobSpec) -> None:
        if spec.server.encryption == "none":
            return
        if self.he_context is None:
            raise JobSpecError(
                f"{spec.server_app}/config/server.json: encryption {spec.server.encryption!r} asked, but this "
                "federation was provisioned without HE; provision with `he: {enabled: true}` in project.yml"
            )

    def known_sites(self) -> set[str]:
        return {m.name for m in self.peers.roster.participants if m.type == "client"}

    def list_jobs(self, identity: Identity, *, include_finished: bool, name_prefix: str, limit: int) -> list[JobInfo]:
        self.policy.check(self._caller(identity), "list_jobs")
        records = self.store.list(include_finished=include_finished, name_prefix=name_prefix, limit=limit)
        return [to_info(r) for r in records]

    def show_job(self, identity: Identity, job_id: str) -> JobDetail:
        self.policy.check(self._caller(identity), "show_job")
        record = self.store.find(job_id)
        states = dict(self.store.site_states(record.job_id))
        result = dict(record.result)
        waiting = self.waiting_reason(record)
        if waiting:
            result["waiting"] = waiting
        rounds = tuple(
            RoundInfo(r.round, r.sites_answered, r.sites_asked, r.seconds, r.metrics, r.bytes_moved)
            for r in self.store.rounds(record.job_id)
        )
        return JobDetail(info=to_info(record), meta=record.meta, rounds=rounds, site_states=states, result=result)

    async def abort(self, identity: Identity, job_id: str) -> str:
        record = self._owned(identity, "abort_job", job_id)
        if record.finished:
            raise StateError(f"job {record.job_id} already {record.status}")
        run = self.runs.get(record.job_id)
        if run is None:
            self.store.update(
                record.job_id,
                status=jobstore.ABORTED,
                end_time=time.time(),
                error=f"aborted by {identity.name} before it started",
            )
            await self.watchers.finished(record.job_id)
        else:
            await run.abort(f"aborted by {identity.name}")
        log.info("job %s aborted by %s", record.job_id, identity.name)
        return f"job {record.job_id} aborted"

    def delete(self, identity: Identity, job_id: str) -> str:
        record = self._owned(identity, "delete_job", job_id)
        self.store.delete(record.job_id)
        log.info("job %s deleted by %s", record.job_id, identity.name)
        return f"job {record.job_id} deleted"

    async def clone(self, identity: Identity, job_id: str) -> JobRecord:
        self.policy.check(self._caller(identity), "clone_job")
        source = self.store.find(job_id)
        new_id = self.store.new_id()
        staged = self.store.incoming_dir(new_id)
        try:
            src_dir = self.store.job_dir(source.job_id)
            await asyncio.to_thread(shutil.copytree, src_dir / "job", staged / "job")
            for name in (PACKAGE, MANIFEST, SUBMITTER_CERT):
                shutil.copy2(src_dir / name, staged / name)
            record = self.store.add(
                job_id=new_id,
                staged=staged,
                name=source.name,
                submitter=identity.name,
                submitter_org=identity.org,
                num_rounds=source.num_rounds,
                meta=source.meta,
                encrypted=source.encrypted,
                cloned_from=source.job_id,
            )
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        self._wake.set()
        return record

    def download_frames(self, identity: Identity, job_id: str) -> list[apb.DownloadFrame]:
        record = self._owned(identity, "download_job", job_id)
        if not record.finished:
            raise StateError(f"job {record.job_id} is {record.status}; its result can be downloaded when it ends")
        data = zip_result(self.store.job_dir(record.job_id), record)
        header = apb.DownloadHeader(job_id=record.job_id, size=len(data))
        return list(frames(apb.DownloadFrame, header, split(data)))

    def job_log(self, identity: Identity, job_id: str, source: str, lines: int) -> tuple[str, str]:
        self.policy.check(self._caller(identity), "job_log")
        record = self.store.find(job_id)
        job_dir = self.store.job_dir(record.job_id)
        if not source or source == "server":
            path = job_dir / "log.txt"
        else:
            if source not in record.sites:
                raise NotFoundError(f"{source} is not a site of job {record.job_id} (sites: {', '.join(record.sites)})")
            path = job_dir / "result" / "sites" / source / "log.txt"
            if not path.exists():
                raise NotFoundError(
                    f"{source} has not sent its log of job {record.job_id} yet (sites send it when the job ends)"
                )
        if not path.exists():
            return "", str(path)
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:] if lines > 0 else text), str(path)

    async def watch(self, identity: Identity, job_id: str, from_round: int) -> AsyncIterator[apb.JobEvent]:
        from fedgrid.serde import job_info_to_proto, round_info_to_proto

        self.policy.check(self._caller(identity), "watch_job")
        record = self.store.find(job_id)
        queue = self.watchers.subscribe(record.job_id)
        try:
            sent = from_round - 1
            for r in self.store.rounds(record.job_id):
                if r.round > sent:
                    sent = r.round
                    yield apb.JobEvent(
                        round=round_info_to_proto(
                            RoundInfo(r.round, r.sites_answered, r.sites_asked, r.seconds, r.metrics, r.bytes_moved)
                        )
                    )
            while True:
                current = self.store.get(record.job_id)
                if current.finished:
                    yield apb.JobEvent(finished=job_info_to_proto(to_info(current)))
                    return
                kind, payload = await queue.get()
                if kind == "round" and payload is not None and payload.round > sent:
                    sent = payload.round
                    yield apb.JobEvent(
                        round=round_info_to_proto(
                            RoundInfo(
                                payload.round,
                                payload.sites_answered,
                                payload.sites_asked,
                                payload.seconds,
                                payload.metrics,
                                payload.bytes_moved,
                            )
                        )
                    )
                elif kind == "status":
                    yield apb.JobEvent(status=job_info_to_proto(to_info(self.store.get(record.job_id))))
        finally:
            self.watchers.unsubscribe(record.job_id, queue)

    # ------------------------------------------------------------------ federation: sites and workers

    def site_registered(self, site: str, running_jobs: list[str]) -> None:
        for job_id in running_jobs:
            run = self.runs.get(job_id)
            if run is None or site not in run.board.active_sites():
                self.registry.send(
                    site,
                    fpb.Command(
                        abort_job=fpb.AbortJob(job_id=job_id, reason="the server does not run this job (any more)")
                    ),
                )
        for run in self.runs.values():
            if (
                site in run.board.active_sites()
                and run.job_id not in running_jobs
                and run.site_states.get(site) == "running"
            ):
                run.site_restarted(site)
        self._wake.set()

    def _run_for(self, job_id: str, site: str) -> JobRun:
        run = self.runs.get(job_id)
        if run is None:
            record = self.store.get(job_id)
            raise StateError(f"job {job_id} is {record.status}, not running")
        if site not in run.sites:
            raise StateError(f"{site} is not a site of job {job_id}")
        return run

    def job_package_frames(self, job_id: str, site: str) -> list[fpb.JobFrame | bytes]:
        """The signed job package, chunked once per job and shared by every site that fetches it."""
        run = self._run_for(job_id, site)
        if run.package_frames is None:
            job_dir = self.store.job_dir(job_id)
            package = (job_dir / PACKAGE).read_bytes()
            header = fpb.JobHeader(
                job_id=job_id,
                signed_manifest=(job_dir / MANIFEST).read_bytes(),
                submitter_cert=(job_dir / SUBMITTER_CERT).read_bytes(),
                size=len(package),
            )
            run.package_frames = list(frames(fpb.JobFrame, header, (package,)))
        return run.package_frames

    async def site_report(self, site: str, report: fpb.JobReport) -> None:
        run = self.runs.get(report.job_id)
        if run is None:
            log.info("report from %s about job %s, which is not running: %s", site, report.job_id, report.state)
            return
        run.site_report(site, report.state, report.error, report.log[-(4 << 20) :])

    async def next_task(self, site: str, request: fpb.TaskRequest) -> list[fpb.TaskFrame]:
        run = self.runs.get(request.job_id)
        if run is None:
            record = self.store.get(request.job_id)
            header = fpb.TaskHeader(job_id=request.job_id, task_id="end", kind="end", reason=f"job is {record.status}")
            return list(frames(fpb.TaskFrame, header, ()))
        if site not in run.sites:
            raise StateError(f"{site} is not a site of job {request.job_id}")
        run.board.mark_ready(site)
        task = await run.board.next_task(site, request.last_task_id, LONG_POLL)
        if task is None:
            return list(frames(fpb.TaskFrame, fpb.TaskHeader(job_id=request.job_id, kind="idle"), ()))
        return task_frames(run, task, request.cached_sha256)

    async def receive_result(self, site: str, frames_in: AsyncIterator[fpb.ResultFrame]) -> str:
        first = await anext(aiter(frames_in), None)
        if first is None or first.WhichOneof("kind") != "header":
            raise TransferError("result stream does not start with a header")
        header = first.header
        run = self._run_for(header.job_id, site)
        if header.HasField("evaluation"):
            deliver_evaluation(run, site, header.evaluation)
        if not run.board.accepts(site, header.task_id):
            run.log.warning("%s: result for %s arrived after its round closed; dropped", site, header.task_id)
            raise StateError(f"task {header.task_id} is no longer open (late result dropped)")
        limit = max(64 << 20, 32 * run.model_bytes)
        spool = Spool(run.tmp_dir, prefix=f"{site}-", expected=run.model_bytes if header.payload_format else 0)
        assembler = Assembler(
            spool,
            max_size=limit,
            what=f"result of {header.task_id} from {site}",
            verify=lambda h: digest_checked(h.payload_format),
        )
        slotted = bool(run.slot_bytes) and bool(header.payload_format)
        try:
            assembler.feed(first)
            if slotted:
                # Large uploads take turns: the others wait at their sites instead of in the server's memory.
                if not run.upload_slots.holds(site):
                    await run.upload_slots.acquire(site, None)
                run.upload_slots.start(site)
            async for frame in frames_in:
                if frame.WhichOneof("kind") == "data" and (assembler.hashing or not spool.in_memory):
                    # Hashing and writing a chunk release the GIL: off the event loop, other sites go on.
                    await asyncio.to_thread(assembler.feed, frame)
                else:
                    assembler.feed(frame)  # (keeping a chunk in memory costs less than a thread hop)
            assembler.finish()
        except BaseException as exc:
            spool.discard()
            if isinstance(exc, FedgridError):
                run.log.warning("%s: result refused: %s", site, exc)
            raise
        finally:
            if slotted:
                await run.upload_slots.release(site)
        path, data, release = spool.payload()
        result = Result(
            site=site,
            task_id=header.task_id,
            num_samples=header.num_samples,
            metrics=dict(header.metrics),
            payload_format=header.payload_format,
            path=path,
            size=assembler.size,
            data=data,
            on_discard=release,
        )
        if not run.board.deliver(result):
            result.discard()
            run.log.warning("%s: result for %s arrived after its round closed; dropped", site, header.task_id)
            return "late: dropped"
        return "accepted"

    async def upload_slot(self, site: str, request: fpb.UploadSlotRequest) -> bool:
        """Grant `site` a turn to upload its result of `task_id`; False if none freed up in time."""
        run = self._run_for(request.job_id, site)
        if not run.board.accepts(site, request.task_id):
            raise StateError(f"task {request.task_id} is no longer open (late result dropped)")
        return await run.upload_slots.acquire(site, LONG_POLL)

    def receive_events(self, site: str, batch: fpb.EventBatch) -> str:
        run = self._run_for(batch.job_id, site)
        if run.tracking is None:
            return "no tracking configured for this job; events ignored"
        from fedserver.tracking import TrackingEvent

        events = [
            TrackingEvent(
                site=site,
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
        return run.tracking.site_events(site, events)


def deliver_evaluation(run: JobRun, site: str, evaluation: fpb.Evaluation) -> None:
    """Hand the controller the evaluation a site answered inside its training result."""
    result = Result(
        site=site,
        task_id=evaluation.task_id,
        num_samples=evaluation.num_samples,
        metrics=dict(evaluation.metrics),
        payload_format="",
        path=None,
    )
    if not run.board.deliver(result):
        run.log.warning("%s: evaluation %s arrived after its round closed; dropped", site, evaluation.task_id)


class Spool:
    """Where a received payload goes: memory while the server's in-memory budget lasts, else a file
    created when the first byte arrives. Metrics-only results (evaluations) never touch either.

    The budget is shared by every upload in flight, so the server's memory stays bounded however many
    sites upload at once; small models (the common case) skip the disk altogether.
    """

    budget = 64 << 20
    """Bytes of payloads kept in memory across all uploads in flight."""
    _in_memory = 0

    def __init__(self, folder: Path, prefix: str, expected: int) -> None:
        self.folder, self.prefix = folder, prefix
        self.path: Path | None = None
        self._file: Any = None
        self._memory: Chunks | None = None
        self._reserved = 0
        if 0 < expected and Spool._in_memory + expected <= Spool.budget:
            Spool._in_memory += expected
            self._reserved = expected
            self._memory = Chunks()

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    def write(self, data: bytes | memoryview) -> int:
        if self._memory is not None:
            if self._memory.tell() + len(data) <= self._reserved:
                return self._memory.write(data)
            self._to_file()
        if self._file is None:
            self._file = tempfile.NamedTemporaryFile(dir=self.folder, prefix=self.prefix, suffix=".part", delete=False)
            self.path = Path(self._file.name)
        return self._file.write(data)

    def _to_file(self) -> None:
        held = self._memory.getvalue() if self._memory is not None else b""
        self._release()
        self._file = tempfile.NamedTemporaryFile(dir=self.folder, prefix=self.prefix, suffix=".part", delete=False)
        self.path = Path(self._file.name)
        self._file.write(held)

    def _release(self) -> None:
        Spool._in_memory -= self._reserved
        self._reserved = 0
        self._memory = None

    def payload(self) -> tuple[Path | None, bytes | None, Callable[[], None] | None]:
        """(file, None, None) or (None, bytes, release) once complete. An in-memory payload keeps its
        share of the budget until `release` is called (by `Result.discard`, once it has been folded)."""
        if self._file is not None:
            self._file.close()
            return self.path, None, None
        if self._memory is None:
            return None, None, None
        data = self._memory.getvalue()
        self._memory = None
        return None, data or None, self._release

    def discard(self) -> None:
        self._release()
        if self._file is not None:
            self._file.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def task_frames(run: JobRun, task: Task, cached_sha256: bytes) -> list[fpb.TaskFrame]:
    """Frames of a task: just the header when the worker already holds the payload."""
    header = fpb.TaskHeader(
        job_id=run.job_id,
        task_id=task.task_id,
        kind=task.kind,
        round=task.round,
        total_rounds=task.total_rounds,
        payload_format=task.payload_format,
        payload_sha256=task.sha256,
        payload_size=len(task.payload),
        total_weight=task.total_weight,
        upload_slot=bool(run.slot_bytes) and task.kind in ("train", "release"),
        evaluate_task_id=task.evaluate_task_id,
        evaluate_round=task.evaluate_round,
    )
    if not task.payload:
        return list(frames(fpb.TaskFrame, header, ()))
    if cached_sha256 and cached_sha256 == task.sha256:
        header.payload_cached = True
        return list(frames(fpb.TaskFrame, header, ()))
    cache = run.task_frames
    if task.task_id not in cache:
        cache.clear()
        cache[task.task_id] = list(frames(fpb.TaskFrame, header, (task.payload,), sha256=task.sha256))
    return cache[task.task_id]


def zip_result(job_dir: Path, record: JobRecord) -> bytes:
    """The downloadable result: the result folder plus the job's meta and config."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted((job_dir / "result").rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(job_dir / "result").as_posix())
        meta = job_dir / "job" / jobspec.META_FILE
        if meta.exists():
            archive.write(meta, f"job/{jobspec.META_FILE}")
        archive.writestr(
            "job_info.json",
            json.dumps(
                {
                    "job_id": record.job_id,
                    "name": record.name,
                    "status": record.status,
                    "submitter": record.submitter,
                    "submit_time": record.submit_time,
                    "start_time": record.start_time,
                    "end_time": record.end_time,
                    "error": record.error,
                },
                indent=2,
            ),
        )
    return buffer.getvalue()
