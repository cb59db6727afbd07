"""The site daemon: stays connected to the server and runs the jobs it is given.

It registers with the server, heartbeats, and listens on a command stream the server pushes to. When
the server goes away it waits for it with gRPC's own reconnection (a connection attempt at most every
2 s, so it registers again within about 2 s of the server being back, without hammering it while it is
down); when the server says it does not know this session (it restarted), it registers again. For each
job it fetches the signed package, checks the submitter's signature chain to the root CA and its own
local policy, and starts one worker process; it reports how the worker ended, with its log if the site
shares logs. The connection, the jobs' workers and the worker started ahead share one lock and one stop
event, hence one module.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509

from fedclient import metrics
from fedgrid import __version__, jobspec, retry
from fedgrid.certs import identity_from_cert, verify_issued_by
from fedgrid.errors import FedgridError, IdentityError, StateError
from fedgrid.grpc_errors import error_from_rpc
from fedgrid.kit import Kit
from fedgrid.settings import SiteSettings
from fedgrid.tls import secure_channel
from fedgrid.transfer import Chunks, receive
from fedgrid.v1 import federation_pb2 as fpb
from fedgrid.v1 import federation_pb2_grpc

log = logging.getLogger("fedclient")

MAX_JOB_PACKAGE = 512 << 20
LOG_SHARE_LIMIT = 1 << 20
ABORT_GRACE = 3.0
SLOT_WAIT = 30.0
"""Seconds a job started while this site is at its max_concurrent_jobs waits for a slot before it is refused."""
SESSION_WAIT = 20.0
"""Seconds a daemon keeps registering while the server says another session of this site is connected: a
session of its own that a partition cut gives way once its heartbeats are overdue (heartbeat_timeout)."""
REGISTER_WAIT = 5.0
"""Seconds one registration attempt waits for the server to be reachable before the daemon tries again."""
REPORT_RETRY_FOR = 120.0
"""Seconds a job report keeps being retried while the server is unreachable."""
WARM_DELAY = 2.0
"""Seconds after a job's worker ends before the next one is started ahead: the job's last steps (reports,
results, the other sites' workers ending) come first."""


class FatalError(FedgridError):
    """The daemon cannot go on (refused identity, another daemon of this site is connected)."""


@dataclass
class JobProcess:
    job_id: str
    job_dir: Path
    process: subprocess.Popen[bytes] | None = None
    aborted: str = ""
    done: threading.Event = field(default_factory=threading.Event)


class SiteDaemon:
    def __init__(self, kit: Kit, settings: SiteSettings) -> None:
        self.kit = kit
        self.settings = settings
        self.workspace = kit.workspace_dir
        (self.workspace / "jobs").mkdir(parents=True, exist_ok=True)
        self.channel = secure_channel(kit, kit.fed_port)
        self.stub = federation_pb2_grpc.FederationStub(self.channel)
        self.jobs: dict[str, JobProcess] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.session_id = ""
        self._stream: grpc.Future | None = None
        self._warm: subprocess.Popen[bytes] | None = None
        """A worker started ahead of the next job, waiting on its stdin (`local/site.json` prestart_worker)."""
        self._warm_wanted = threading.Event()
        self.heartbeat_interval = settings.heartbeat_interval

    # ------------------------------------------------------------------ connection

    def running_jobs(self) -> list[str]:
        with self.lock:
            return sorted(j.job_id for j in self.jobs.values() if not j.done.is_set())

    @property
    def connected(self) -> bool:
        """Registered with the server and listening on the command stream."""
        return bool(self.session_id) and self._stream is not None

    def worker_pids(self) -> list[int]:
        """The job workers running now, the one started ahead included."""
        with self.lock:
            processes = [job.process for job in self.jobs.values() if job.process is not None]
            if self._warm is not None:
                processes.append(self._warm)
        return [process.pid for process in processes if process.poll() is None]

    def run(self, ready_file: Path | None) -> None:
        threading.Thread(target=self._warmer, name="warmer", daemon=True).start()
        reachable = True
        refused_since: float | None = None
        while not self.stopping.is_set():
            try:
                # wait_for_ready: while the server is down, gRPC keeps trying to connect (every 2 s at most,
                # fedgrid.transfer.GRPC_OPTIONS) and sends the call the moment it is back.
                reply = self.stub.Register(
                    fpb.RegisterRequest(
                        version=__version__,
                        roster=self.kit.roster_bytes,
                        running_jobs=self.running_jobs(),
                        cpu_count=self.settings.num_cpus or os.cpu_count() or 1,
                        memory_gb=self.settings.memory_gb or _machine_memory_gb(),
                        hostname=socket.gethostname(),
                        max_jobs=self.settings.max_concurrent_jobs,
                    ),
                    timeout=REGISTER_WAIT,
                    wait_for_ready=True,
                )
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise FatalError(f"the server refused this site: {exc.details()}") from None
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    # Another session of this site: its own (the server has not noticed a broken connection
                    # yet, and gives way once its heartbeats are overdue), or a second daemon of this kit.
                    if refused_since is None:
                        refused_since = time.monotonic()
                    if time.monotonic() - refused_since > SESSION_WAIT:
                        raise FatalError(exc.details()) from None
                    log.warning("%s; trying again", exc.details())
                    self.stopping.wait(2.0)
                    continue
                if reachable:
                    log.warning(
                        "server %s:%d unreachable (%s); waiting for it",
                        self.kit.server_host,
                        self.kit.fed_port,
                        exc.details(),
                    )
                    reachable = False
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.stopping.wait(1.0)
                continue
            reachable, refused_since = True, None
            self.session_id = reply.session_id
            self.heartbeat_interval = reply.heartbeat_interval or self.settings.heartbeat_interval
            log.info("registered with %s (project %s), session %s", reply.server_name, reply.project, reply.session_id)
            beat = threading.Thread(target=self._heartbeat, args=(reply.session_id,), name="heartbeat", daemon=True)
            beat.start()
            if ready_file is not None:
                ready_file.write_text(str(time.time()))
            self._start_warm()
            self._listen()
            if not self.stopping.is_set():
                log.warning("lost the connection to the server; reconnecting")

    def _listen(self) -> None:
        """Consume the command stream until it ends (server gone, or a newer session replaced it)."""
        stream = self.stub.Commands(fpb.CommandsRequest(session_id=self.session_id))
        self._stream = stream
        try:
            for command in stream:
                kind = command.WhichOneof("kind")
                if kind == "start_job":
                    threading.Thread(
                        target=self._run_job,
                        args=(command.start_job,),
                        daemon=True,
                        name=f"job-{command.start_job.job_id[:8]}",
                    ).start()
                elif kind == "abort_job":
                    self._abort_job(command.abort_job.job_id, command.abort_job.reason)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                log.info("command stream ended: %s", exc.details())
        finally:
            self._stream = None

    def _heartbeat(self, session_id: str) -> None:
        while not self.stopping.wait(self.heartbeat_interval) and self.session_id == session_id:
            try:
                reply = self.stub.Heartbeat(
                    fpb.HeartbeatRequest(session_id=session_id, running_jobs=self.running_jobs()), timeout=10
                )
            except grpc.RpcError:
                continue
            if not reply.known:
                log.warning("the server does not know this session (it restarted?); registering again")
                self.session_id = ""
                if self._stream is not None:
                    self._stream.cancel()
                return

    def request_stop(self) -> None:
        """Signal-safe: ask the main loop to end (SIGTERM, Ctrl-C)."""
        self.stopping.set()
        self._warm_wanted.set()  # wakes the warmer thread, which then sees `stopping` and ends
        if self._stream is not None:
            self._stream.cancel()

    def stop(self) -> None:
        """End every job worker this daemon started, then close the channel."""
        self.request_stop()
        with self.lock:
            warm, self._warm = self._warm, None
        if warm is not None and warm.stdin is not None:
            warm.stdin.close()  # a warm worker without a job ends by itself
            try:
                warm.wait(5)
            except subprocess.TimeoutExpired:
                warm.kill()
        with self.lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            self._terminate(job, "the site daemon is stopping")
        for job in jobs:
            job.done.wait(ABORT_GRACE + 2)
        self.channel.close()

    # ------------------------------------------------------------------ jobs

    def _run_job(self, command: fpb.StartJob) -> None:
        job_id = command.job_id
        job_dir = self.workspace / "jobs" / job_id
        with self.lock:
            running = job_id in self.jobs and not self.jobs[job_id].done.is_set()
            if not running:
                job = self.jobs[job_id] = JobProcess(job_id, job_dir)
        if running:
            # The server restarted and resumes the job: its worker here is still at it, and reconnects.
            log.info("job %s: started again by the server; its worker is still running", job_id)
            self._report(job_id, "started", "")
            return
        busy = self._wait_for_slot(job)
        if busy >= self.settings.max_concurrent_jobs:
            reason = (
                f"this site already runs {busy} jobs, its limit (max_concurrent_jobs in local/site.json); "
                "try again when one has finished"
            )
            log.warning("job %s refused: %s", job_id, reason)
            self._report(job_id, "refused", reason)
            job.done.set()
            return
        try:
            try:
                threads = self._prepare(job, command)
            except FedgridError as exc:
                log.warning("job %s refused: %s", job_id, exc)
                self._report(job_id, "refused", str(exc))
                return
            except grpc.RpcError as exc:
                log.warning("job %s: could not fetch it from the server: %s", job_id, exc.details())
                self._report(job_id, "refused", f"could not fetch the job from the server ({exc.details()})")
                return
            with self.lock:
                if job.aborted:
                    self._report(job_id, "aborted", job.aborted)
                    return
                job.process, warm = self._worker_for(job_id, job_dir, command.app, threads)
            how = "handed to the worker started ahead" if warm else "worker started"
            log.info("job %s: %s (pid %d, %d torch threads)", job_id, how, job.process.pid, threads)
            self._report(job_id, "started", "")
            code = job.process.wait()
            text = (job_dir / "log.txt").read_bytes()
            if job.aborted:
                state, error = "aborted", job.aborted
            elif code == 0:
                state, error = "finished", ""
            else:
                state, error = "failed", _worker_failure(text, code)
            log.info("job %s: worker ended (%s, exit %d)", job_id, state, code)
            job.done.set()  # the slot is free before the server hears the job ended here
            self._report(job_id, state, error, text[-LOG_SHARE_LIMIT:] if self.settings.share_job_logs else b"")
        except Exception as exc:  # noqa: BLE001 - a broken job must not take the daemon down
            log.exception("job %s: internal error", job_id)
            self._report(job_id, "failed", f"site daemon error: {type(exc).__name__}: {exc}")
        finally:
            job.done.set()
            self._warm_wanted.set()

    def _wait_for_slot(self, job: JobProcess) -> int:
        """Jobs running here besides `job`, once fewer than the limit or after SLOT_WAIT seconds: a job the
        server starts the moment another ends may arrive while that one's worker is still exiting."""
        deadline = time.monotonic() + SLOT_WAIT
        while True:
            with self.lock:
                busy = sum(1 for j in self.jobs.values() if j is not job and not j.done.is_set())
            if busy < self.settings.max_concurrent_jobs or time.monotonic() > deadline:
                return busy
            if self.stopping.wait(0.2):
                return busy

    def _worker_for(self, job_id: str, job_dir: Path, app: str, threads: int) -> tuple[subprocess.Popen[bytes], bool]:
        """A worker process for the job, and whether it was started ahead: the warm one if there is one (it
        has imported torch, or is at it), else a new one. The next warm one starts when this job's worker
        ends, not beside it."""
        job_args = {
            "kit": str(self.kit.path),
            "job_id": job_id,
            "job_dir": str(job_dir),
            "app": app,
            "threads": threads,
            "log": str(job_dir / "log.txt"),
        }
        (job_dir / "log.txt").touch()  # the job's log exists even if its worker ends before writing to it
        warm, self._warm = self._warm, None
        if warm is not None and warm.poll() is None and warm.stdin is not None:
            try:
                warm.stdin.write((json.dumps(job_args) + "\n").encode())
                warm.stdin.close()
                return warm, True
            except OSError:
                warm.kill()
        command = [sys.executable, "-m", "fedclient.worker", "--kit", str(self.kit.path), "--job-id", job_id]
        command += ["--job-dir", str(job_dir), "--app", app, "--threads", str(threads)]
        command += ["--nice", str(self.settings.worker_nice)]
        with open(job_dir / "log.txt", "ab") as log_file:
            process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=job_dir
            )
        metrics.worker_started("on_demand")
        return process, False

    def _warmer(self) -> None:
        """Start the next warm worker WARM_DELAY seconds after a job ended. A thread that lives as long as
        the daemon: Linux ends a worker (PR_SET_PDEATHSIG) when the thread that started it exits."""
        while True:
            self._warm_wanted.wait()
            self._warm_wanted.clear()
            if self.stopping.wait(WARM_DELAY):
                return
            self._start_warm()

    def _start_warm(self) -> None:
        """Start the next job's worker now, so that it has imported torch when the job comes. Only while the
        site runs no job: a worker importing torch beside a running job would slow it down."""
        with self.lock:
            if not self.settings.prestart_worker or self.stopping.is_set() or self._warm is not None:
                return
            if any(not job.done.is_set() for job in self.jobs.values()):
                return
            with open(self.workspace / "warm_worker.log", "ab") as log_file:
                self._warm = subprocess.Popen(
                    [sys.executable, "-m", "fedclient.worker", "--wait", "--nice", str(self.settings.worker_nice)],
                    stdin=subprocess.PIPE,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    cwd=self.workspace,
                )
            metrics.worker_started("ahead")

    def _prepare(self, job: JobProcess, command: fpb.StartJob) -> int:
        """Fetch, verify and unpack the job; returns the worker's torch thread count."""
        buffer = Chunks()
        header = receive(
            self.stub.FetchJob(fpb.FetchJobRequest(job_id=job.job_id)),
            buffer,
            max_size=MAX_JOB_PACKAGE,
            what=f"job {job.job_id}",
        )
        cert = x509.load_pem_x509_certificate(header.submitter_cert)
        verify_issued_by(cert, self.kit.ca_cert)
        submitter = identity_from_cert(cert)
        if submitter.type != "admin" or submitter.project != self.kit.project:
            raise IdentityError(f"job {job.job_id} was not signed by an admin of project {self.kit.project}")
        if job.job_dir.exists():
            import shutil

            shutil.rmtree(job.job_dir)
        (job.job_dir / "job").mkdir(parents=True)
        jobspec.safe_extract(buffer.getvalue(), job.job_dir / "job", max_bytes=4 * MAX_JOB_PACKAGE, max_files=10_000)
        jobspec.verify_signature(job.job_dir / "job", header.signed_manifest, cert, submitter.name)
        spec = jobspec.load_job(job.job_dir / "job")
        client = spec.clients.get(command.app)
        if client is None:
            raise StateError(f"job {job.job_id} sends app {command.app!r} to this site but has no client config for it")
        if not client.is_module and not self.settings.allow_custom_code:
            raise StateError(
                f"job {spec.name} brings its own code ({command.app}/custom/{client.script}) and this site's "
                "local policy forbids custom code (allow_custom_code is false in local/site.json)"
            )
        if spec.server.encryption != "none" and not self.kit.he.enabled:
            raise StateError("job is encrypted but this site was provisioned without an HE context")
        log.info("job %s (%s) verified: signed by %s", job.job_id, spec.name, submitter.name)
        if self.settings.torch_threads:
            return self.settings.torch_threads
        return max(1, (os.cpu_count() or 1) // max(1, command.workers_hint))

    def _abort_job(self, job_id: str, reason: str) -> None:
        with self.lock:
            job = self.jobs.get(job_id)
        if job is None or job.done.is_set():
            self._report(job_id, "aborted", reason)
            return
        log.info("job %s: aborting (%s)", job_id, reason)
        threading.Thread(target=self._terminate, args=(job, reason), daemon=True).start()

    def _terminate(self, job: JobProcess, reason: str) -> None:
        with self.lock:
            job.aborted = job.aborted or reason
            process = job.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(ABORT_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()

    def _report(self, job_id: str, state: str, error: str, log_text: bytes = b"") -> None:
        """Tell the server how the job went here; retried while the server is unreachable."""
        report = fpb.JobReport(job_id=job_id, state=state, error=error, log=log_text)
        metrics.job_report(state)
        try:
            retry.call(
                lambda: self.stub.ReportJob(report, timeout=10),
                what=f"report of job {job_id}",
                retryable=_unreachable,
                give_up_after=REPORT_RETRY_FOR,
                log=log,
                stop_event=self.stopping,
            )
        except grpc.RpcError as exc:
            if _unreachable(exc):
                log.warning("could not report job %s (%s) to the server", job_id, state)
            else:
                log.warning("report of job %s refused: %s", job_id, error_from_rpc(exc))


def _unreachable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


def _machine_memory_gb() -> float:
    """This machine's physical memory, in GB (0 where the platform does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        return 0.0


def _worker_failure(log_text: bytes, code: int) -> str:
    """Why a worker failed, for the job's error: killed by a signal (said first), else the last traceback
    in its log, or its last lines."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the job's worker was killed by {name} (signal {-code}) before the job ended"
    text = log_text.decode("utf-8", errors="replace")
    start = text.rfind("Traceback (most recent call last)")
    tail = text[start:] if start >= 0 else "\n".join(text.splitlines()[-20:])
    return (tail.strip() or f"worker exited with status {code}")[-8000:]
