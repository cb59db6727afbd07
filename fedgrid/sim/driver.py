"""The simulator's driver: the server side of a simulated job, run by the server's own code.

A simulated job is stored in a `JobStore` (a workspace of its own) and run by `JobRun`: the same round
loop, strategies, aggregation, checkpoints, tracking and result folder as on a server. What differs is the
run's `Deployment` (`SimDeployment`: the job's sites are virtual, started in the worker hosts of
fedgrid/sim/pool.py) and how its workers reach it: each virtual site's Work stream is served by the
server's `WorkerStream` (fedserver/worker_io.py), reading and writing through a `SimContext` on the host's
link instead of a gRPC call. No certificates, no daemons, no gRPC.

`SimWorkerStream` adds one thing: a host that already holds a task's model (another of its sites was sent
it) has it named as its worker's cached model, so that a model crosses to each host once per round.

Everything here runs on one asyncio loop in a thread of its own (`Simulation.start`); the caller follows
the job through `wait` (`fedgrid.sim.SimRun`).

One module, over 400 lines, because its parts are the two ends of one loop: the simulation's lifecycle
(hosts up, job run, teardown), the deployment that starts virtual sites on those hosts, and the streams
that carry their messages all share the hosts' links and the run's state.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fedgrid import jobspec
from fedgrid.errors import FedgridError, StateError
from fedgrid.files import write_json_atomic
from fedgrid.jobspec import JobSpec
from fedgrid.serde import JobInfo, RoundInfo
from fedgrid.sim import pool
from fedgrid.sim.checks import SimOptions, SimPlan
from fedgrid.sim.host import MODELS_KEPT, HostJob
from fedgrid.sim.link import Envelope, scratch_folder
from fedgrid.transfer import frames
from fedgrid.v1 import federation_pb2 as fpb
from fedserver import results
from fedserver.grid import Task
from fedserver.job_io import TASK_MESSAGE
from fedserver.jobrun import JobRun, RunContext
from fedserver.jobstore import JobStore
from fedserver.watchers import Watchers
from fedserver.worker_io import WorkerStream

log = logging.getLogger("fedgrid.sim")

IDLE_TIMEOUT = None
"""A virtual site's stream has no idle deadline: its host is ours, and ends with the job."""
HOST_READY = 300.0
"""Seconds a worker host may take to start (import torch; on Ray, to be placed)."""
SUBMITTER = "simulator"
TRACKING_WAIT = 300.0
"""Seconds the simulator waits at the end for the job's trackers to take what they have not yet."""


class HostLink:
    """The driver's side of one worker host: a writer thread (sends never block the loop), a reader
    thread handing each envelope to the loop, the host's sites and open streams, and the models it holds."""

    def __init__(self, host: pool.Host, loop: asyncio.AbstractEventLoop, deliver: Any) -> None:
        self.host = host
        self.loop = loop
        self.sites: list[str] = []
        self.ended: set[str] = set()
        """Sites whose script ended (and was reported)."""
        self.contexts: dict[str, SimContext] = {}
        self.held: collections.deque[bytes] = collections.deque(maxlen=MODELS_KEPT)
        """Digests of the models sent whole to this host (it keeps as many, fedgrid/sim/host.py)."""
        self.ready: asyncio.Future[int] = loop.create_future()
        self.stopping = False
        self._outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        threading.Thread(target=self._writer, name=f"sim-send-{host.index}", daemon=True).start()
        threading.Thread(target=self._reader, args=(deliver,), name=f"sim-recv-{host.index}", daemon=True).start()

    def send(self, envelope: Envelope) -> None:
        self._outgoing.put(envelope.encode())

    def claim(self, sha256: bytes) -> bool:
        """True when this host does not hold the model yet: the stream asking for it sends it whole."""
        if sha256 in self.held:
            return False
        self.held.append(sha256)
        return True

    def close(self) -> None:
        self._outgoing.put(None)

    def _writer(self) -> None:
        while (data := self._outgoing.get()) is not None:
            try:
                self.host.link.send(data)
            except (OSError, EOFError):
                return

    def _reader(self, deliver: Any) -> None:
        while True:
            try:
                envelope = Envelope.decode(self.host.link.recv())
            except EOFError:
                envelope = Envelope("gone")
            try:
                self.loop.call_soon_threadsafe(deliver, self, envelope)
            except RuntimeError:
                return  # the loop is closed: the simulation is over
            if envelope.kind == "gone":
                return


class SimContext:
    """A virtual site's Work stream as `WorkerStream` reads and writes it (in place of a gRPC context)."""

    def __init__(self, link: HostLink, site: str, number: int) -> None:
        self.link = link
        self.site = site
        self.number = number
        self.inbox: asyncio.Queue[fpb.WorkerMessage | None] = asyncio.Queue()

    async def read(self) -> fpb.WorkerMessage | None:
        return await self.inbox.get()

    async def write(self, message: fpb.ServerMessage) -> None:
        self.link.send(Envelope("msg", self.site, self.number, payload=message.SerializeToString()))


class SimWorkerStream(WorkerStream):
    def __init__(self, jobs: SimJobs, context: SimContext) -> None:
        super().__init__(jobs, context.site, context, IDLE_TIMEOUT)
        self.link = context.link

    def cached_sha256(self, request: fpb.TaskRequest, task: Task) -> bytes:
        """The model the worker's host holds: the first of its sites asking for a model is sent it whole."""
        if request.cached_sha256 or task.model is None:
            return request.cached_sha256
        return b"" if self.link.claim(task.model.sha256) else task.model.sha256


class SimJobs:
    """The one running job, as `WorkerStream` looks jobs up (the server's `Scheduler` has many)."""

    def __init__(self) -> None:
        self.runs: dict[str, JobRun] = {}

    def run_for(self, job_id: str, site: str) -> JobRun:
        run = self.runs.get(job_id)
        if run is None:
            raise StateError(f"job {job_id} is not running")
        if site not in run.sites:
            raise StateError(f"{site} is not a site of job {job_id}")
        return run

    async def run_when_started(self, job_id: str) -> JobRun | None:
        return self.runs.get(job_id)

    def end_messages(self, job_id: str) -> list[fpb.ServerMessage]:
        header = fpb.TaskHeader(job_id=job_id, task_id="end", kind="end", reason="the job is over")
        return list(frames(TASK_MESSAGE, header, ()))


class SimDeployment:
    """A job's sites are virtual: spread over the worker hosts, started and stopped through their links."""

    def __init__(self, plan: SimPlan, options: SimOptions, links: list[HostLink], he_secret: bytes | None) -> None:
        self.plan = plan
        self.options = options
        self.links = links
        self.he_secret = he_secret
        self.host_of: dict[str, HostLink] = {}
        for index, site in enumerate(plan.sites):
            link = links[index % len(links)]
            link.sites.append(site)
            self.host_of[site] = link

    def start_job(self, job_id: str, spec: JobSpec, sites: list[str]) -> None:
        for link in self.links:
            job = HostJob(
                job_id=job_id,
                app=self.plan.app,
                sites=[site for site in link.sites if site in sites],
                data_root=str(self.plan.data_root.resolve()) if self.plan.data_root else "",
                he_context=self.he_secret,
                stragglers=self.options.stragglers,
                seed=spec.server.seed,
                threads=self.plan.threads,
            )
            link.send(job.envelope(self.plan.package))

    def abort_job(self, job_id: str, sites: list[str], reason: str) -> None:
        for link in self.links:
            mine = [site for site in sites if self.host_of.get(site) is link]
            if mine:
                link.send(Envelope("abort", fields={"sites": mine, "reason": reason}))

    def is_alive(self, site: str) -> bool:
        return True


@dataclass
class Stats:
    """What the bench reads: per round, the seconds each host spent in its sites' scripts."""

    busy: dict[int, dict[int, float]] = field(default_factory=lambda: collections.defaultdict(dict))
    host_pids: list[int] = field(default_factory=list)

    def add(self, round_no: int, host: int, seconds: float) -> None:
        self.busy[round_no][host] = self.busy[round_no].get(host, 0.0) + seconds


class Simulation:
    """One simulated job, run on a loop in a thread of its own; `events` gets its rounds, then its end."""

    def __init__(self, plan: SimPlan, options: SimOptions) -> None:
        self.plan = plan
        self.options = options
        self.events: queue.SimpleQueue[RoundInfo | JobInfo | BaseException] = queue.SimpleQueue()
        self.job_id = JobStore.new_id()
        self.result_dir = (options.results / self.job_id).resolve()
        self.stats = Stats()
        self.jobs = SimJobs()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._run: JobRun | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="simulation", daemon=True)
        self._thread.start()

    def abort(self, reason: str) -> None:
        """Abort the job (from any thread): it ends as a deployed job does, ABORTED with its result folder."""
        loop, run = self._loop, self._run
        if loop is not None and run is not None:
            asyncio.run_coroutine_threadsafe(run.abort(reason), loop)

    def _main(self) -> None:
        try:
            asyncio.run(self._simulate())
        except BaseException as exc:  # noqa: BLE001 - the caller's wait() raises it
            self.events.put(exc)

    async def _simulate(self) -> None:
        self._loop = asyncio.get_running_loop()
        workspace = scratch_folder("fedgrid-sim-")
        hosts: list[pool.Host] = []
        links: list[HostLink] = []
        ray_started = False
        store = JobStore(workspace, durable=False)
        try:
            he_secret, he_public = await asyncio.to_thread(self._he_contexts)
            if self.options.ray_address:
                hosts, ray_started = await asyncio.to_thread(
                    pool.start_ray, self.plan.workers, self.options.ray_address, 1
                )
            else:
                hosts = pool.start_local(self.plan.workers)
            links = [HostLink(host, self._loop, self._deliver) for host in hosts]
            self._submit(store)
            await self._hosts_ready(links)
            deployment = SimDeployment(self.plan, self.options, links, he_secret)
            watchers = Watchers()
            ctx = RunContext(
                store=store,
                deployment=deployment,
                watchers=watchers,
                he_context=he_public,
                tracking_factory=self._tracking_factory(),
            )
            self._run = run = JobRun(job_id=self.job_id, spec=self.plan.spec, sites=self.plan.sites, ctx=ctx)
            self.jobs.runs[self.job_id] = run
            rounds = watchers.subscribe(self.job_id)
            following = asyncio.create_task(self._follow(rounds))
            await run.start()
            following.cancel()
            while not rounds.empty():
                event, record = rounds.get_nowait()
                if event == "round" and record is not None:
                    self.events.put(record)
            if run.tracking_pending():
                await asyncio.to_thread(self._deliver_tracking, store, ctx.tracking_factory)
            await asyncio.to_thread(self._write_result, store)
            final = store.get(self.job_id)
        finally:
            for link in links:
                link.stopping = True
                link.send(Envelope("stop"))
                link.close()
            await asyncio.to_thread(_close_hosts, hosts, ray_started)
            store.close()
            shutil.rmtree(workspace, ignore_errors=True)
        # The job's record goes out once the hosts have ended and the workspace is gone: a caller that
        # leaves right after wait() leaves nothing behind.
        self.events.put(final)

    def _he_contexts(self) -> tuple[bytes | None, bytes | None]:
        """(the sites' context, the server's): generated for this run, as provisioning makes them."""
        if self.plan.spec.server.encryption == "none":
            return None, None
        from fedgrid import he

        return he.create_contexts(self.options.he_params)

    def _submit(self, store: JobStore) -> None:
        staged = store.incoming_dir(self.job_id)
        jobspec.safe_extract(self.plan.package, staged / "job", max_bytes=1 << 40, max_files=1_000_000)
        meta = json.loads((staged / "job" / jobspec.META_FILE).read_text())
        store.add(
            job_id=self.job_id,
            staged=staged,
            name=self.plan.spec.name,
            submitter=SUBMITTER,
            submitter_org="",
            num_rounds=self.plan.spec.server.num_rounds,
            meta=meta,
            encrypted=self.plan.spec.server.encryption != "none",
        )

    def _tracking_factory(self) -> Any:
        """MLflow and TensorBoard as the server has them; MLflow's default store is results/mlflow.db, and the
        job's own tracking URIs are allowed (the researcher's machine, the researcher's choice)."""
        if not self.plan.spec.server.tracking:
            return None
        from fedserver.tracking.factory import check_installed, make_factory

        check_installed(self.plan.spec)
        self.options.results.mkdir(parents=True, exist_ok=True)
        uris = [t.tracking_uri for t in self.plan.spec.server.tracking if t.tracking_uri]
        default = f"sqlite:///{(self.options.results / 'mlflow.db').resolve()}"
        return make_factory(default_mlflow_uri=default, allowed_uris=uris)

    def _deliver_tracking(self, store: JobStore, factory: Any) -> None:
        """What the job's trackers had not taken by its end (a first MLflow store takes a while to create): a
        server delivers it later (fedserver/scheduler.py); the simulator waits for it before it leaves."""
        record = store.get(self.job_id)
        tracking = factory(
            job_id=self.job_id, spec=self.plan.spec, job_dir=store.job_dir(self.job_id), sites=record.sites
        )
        status = {"FINISHED:COMPLETED": "FINISHED", "FINISHED:ABORTED": "KILLED"}.get(record.status, "FAILED")
        report = tracking.close(TRACKING_WAIT, status=status).as_dict()
        store.update(self.job_id, result={**record.result, "tracking": report})
        result_file = store.job_dir(self.job_id) / "result" / "result.json"
        summary = json.loads(result_file.read_text())
        write_json_atomic(result_file, {**summary, "tracking": report})

    async def _hosts_ready(self, links: list[HostLink]) -> None:
        done, pending = await asyncio.wait([link.ready for link in links], timeout=HOST_READY)
        for future in done:
            future.result()
        if pending:
            raise StateError(f"{len(pending)} of {len(links)} worker hosts did not start within {HOST_READY:.0f} s")
        self.stats.host_pids = [link.host.pid for link in links]

    async def _follow(self, rounds: asyncio.Queue[tuple[str, RoundInfo | None]]) -> None:
        while True:
            event, record = await rounds.get()
            if event == "round" and record is not None:
                self.events.put(record)

    def _write_result(self, store: JobStore) -> None:
        """The result folder as a deployed job's download unpacks: the zip the server serves, unpacked."""
        with tempfile.TemporaryFile() as archive:
            results.zip_result(store.job_dir(self.job_id), store.get(self.job_id), archive)
            archive.seek(0)
            partial = self.result_dir.with_name(f".{self.result_dir.name}.part")
            shutil.rmtree(partial, ignore_errors=True)
            partial.parent.mkdir(parents=True, exist_ok=True)
            jobspec.safe_extract(archive, partial, max_bytes=1 << 40, max_files=1_000_000)
            shutil.rmtree(self.result_dir, ignore_errors=True)
            partial.rename(self.result_dir)

    # ------------------------------------------------------------------ what the hosts say

    def _deliver(self, link: HostLink, envelope: Envelope) -> None:
        run, kind, site = self._run, envelope.kind, envelope.site
        if kind == "msg":
            context = link.contexts.get(site)
            if context is not None and context.number == envelope.stream:
                context.inbox.put_nowait(fpb.WorkerMessage.FromString(envelope.payload))
        elif kind == "open":
            previous = link.contexts.get(site)
            if previous is not None:
                previous.inbox.put_nowait(None)
            context = link.contexts[site] = SimContext(link, site, envelope.stream)
            asyncio.ensure_future(self._serve(context))
        elif kind == "close":
            context = link.contexts.get(site)
            if context is not None and context.number == envelope.stream:
                context.inbox.put_nowait(None)
        elif kind == "busy":
            self.stats.add(envelope.fields["r"], link.host.index, envelope.fields["t"])
        elif kind == "started" and run is not None:
            run.site_report(site, "started", "", b"")
        elif kind == "ended" and run is not None:
            link.ended.add(site)
            fields = envelope.fields
            run.site_report(site, fields["state"], fields["error"], envelope.payload)
        elif kind == "ready":
            link.host.pid = envelope.fields["pid"]
            if not link.ready.done():
                link.ready.set_result(link.host.pid)
        elif kind == "gone":
            self._host_gone(link)

    async def _serve(self, context: SimContext) -> None:
        try:
            await SimWorkerStream(self.jobs, context).serve()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the stream ends, as a gRPC call would with a status
            reason = str(exc) if isinstance(exc, FedgridError) else f"{type(exc).__name__}: {exc}"
            log.warning("work stream of %s closed: %s", context.site, reason)
            context.link.send(Envelope("end", context.site, context.number, fields={"why": reason}))

    def _host_gone(self, link: HostLink) -> None:
        """A host that ended before it was told to stop takes its sites' workers with it, as a crashed one."""
        if not link.ready.done():
            link.ready.set_exception(StateError(f"worker host {link.host.index} ended before it was ready"))
            return
        if link.stopping or self._run is None:
            return
        status = link.host.exit_status()
        for site in link.sites:
            if site in link.ended:
                continue
            self._run.site_report(
                site, "failed", f"the simulator's worker host {link.host.index} ended ({status or 'gone'})", b""
            )


def _close_hosts(hosts: list[pool.Host], ray_started: bool) -> None:
    for host in hosts:
        try:
            host.close()
        except Exception:  # noqa: BLE001 - tearing down: the others must still end
            log.exception("ending worker host %d", host.index)
    if ray_started:
        import ray

        ray.shutdown()


def wait_events(simulation: Simulation, progress: Any = None, timeout: float | None = None) -> JobInfo:
    """Follow a started simulation to its end: `progress` gets each round; returns the job's record."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        event = simulation.events.get(timeout=remaining)
        if isinstance(event, BaseException):
            raise event
        if isinstance(event, RoundInfo):
            if progress is not None:
                progress(event)
            continue
        return event
