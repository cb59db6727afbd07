"""A worker host of the simulator: one process (or Ray actor) running many virtual sites' training scripts.

Each virtual site's script runs in a thread of its own with its own `fedclient.api` session (`JobSession`,
bound to the thread) and its own Work stream: `LinkStream`, the deployed worker's `WorkStream` with the link
to the driver in place of gRPC, so the site speaks the same Work protocol messages as a deployed worker.
A site keeps its state between rounds as a deployed worker does: its script runs for the whole job.

What the host shares among its sites:
- the global models it received, by digest (`ModelCache`): the driver sends a model to a host once and
  answers its other sites' tasks with the header alone (the protocol's cached model), the host fills in
  the bytes;
- one compute slot: one site at a time trains or evaluates (from receiving a task to sending its answer),
  with the host's share of the cores as torch threads, so that many sites on few cores do not thrash;
- the process: the job's code is unpacked once, its custom/ folder is the working folder and on sys.path,
  and sys.argv holds the app's arguments (every site of a job runs the same app, fedgrid/sim/checks.py).
  What a script prints goes to its site's log (`SiteOutput` routes by thread).

One module, over 400 lines, because the host, its sites' streams and the shared cache and compute slot
are one process's state, read and changed by the same threads.

A site chosen to train may straggle (`--stragglers`): with that probability, drawn from the job's seed, the
site's round and its name, it never answers that round's task, as an unreachable site would not.
"""

from __future__ import annotations

import base64
import collections
import importlib.util
import io
import logging
import os
import queue
import random
import runpy
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fedclient.work_stream import WorkStream
from fedgrid import jobspec
from fedgrid.errors import TransferError
from fedgrid.logs import FORMAT
from fedgrid.sim.link import HOST_END, Envelope, Link, scratch_folder
from fedgrid.v1 import federation_pb2 as fpb

log = logging.getLogger("fedgrid.sim")

MODELS_KEPT = 4
"""Global models a host keeps by digest; the driver remembers as many per host (a round needs one or two)."""
MODEL_WAIT = 120.0
"""Seconds a site waits for a model another site of its host is receiving."""
LOG_LIMIT = 1 << 20
"""Bytes of a site's log kept (the end of it), as much as a deployed site shares."""
JOB_LIMIT = 2 << 30
T = TypeVar("T")


@dataclass(frozen=True)
class HostJob:
    """The job as a host runs it (the "sites" envelope)."""

    job_id: str
    app: str
    sites: list[str]
    data_root: str
    he_context: bytes | None
    stragglers: float
    seed: int
    threads: int

    def envelope(self, package: bytes) -> Envelope:
        fields = {
            "job_id": self.job_id,
            "app": self.app,
            "sites": self.sites,
            "data_root": self.data_root,
            "he_context": base64.b64encode(self.he_context).decode() if self.he_context else "",
            "stragglers": self.stragglers,
            "seed": self.seed,
            "threads": self.threads,
        }
        return Envelope("sites", fields=fields, payload=package)

    @classmethod
    def from_envelope(cls, envelope: Envelope) -> HostJob:
        f = envelope.fields
        context = base64.b64decode(f["he_context"]) if f["he_context"] else None
        return cls(f["job_id"], f["app"], f["sites"], f["data_root"], context, f["stragglers"], f["seed"], f["threads"])


class ModelCache:
    """Global models this host received, by SHA-256: the last MODELS_KEPT."""

    def __init__(self) -> None:
        self._models: collections.OrderedDict[bytes, bytes | memoryview] = collections.OrderedDict()
        self._changed = threading.Condition()

    def put(self, sha256: bytes, data: bytes | memoryview) -> None:
        with self._changed:
            self._models[sha256] = data
            self._models.move_to_end(sha256)
            while len(self._models) > MODELS_KEPT:
                self._models.popitem(last=False)
            self._changed.notify_all()

    def get(self, sha256: bytes, what: str) -> bytes | memoryview:
        """The model with this digest, waiting while another site of the host is still receiving it."""
        with self._changed:
            if not self._changed.wait_for(lambda: sha256 in self._models, MODEL_WAIT):
                raise TransferError(f"{what}: the model {sha256.hex()[:12]} never reached this worker host")
            return self._models[sha256]


class SiteLog:
    """What one site's script printed and logged: the last LOG_LIMIT bytes."""

    def __init__(self) -> None:
        self._parts: collections.deque[str] = collections.deque()
        self._size = 0
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            self._parts.append(text)
            self._size += len(text)
            while self._size > LOG_LIMIT and len(self._parts) > 1:
                self._size -= len(self._parts.popleft())

    def data(self) -> bytes:
        with self._lock:
            return "".join(self._parts).encode("utf-8", errors="replace")[-LOG_LIMIT:]


class SiteOutput(io.TextIOBase):
    """sys.stdout and sys.stderr of a host: a site's thread writes to its site's log, others to `fallback`."""

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback
        self.local = threading.local()

    def write(self, text: str) -> int:
        site_log = getattr(self.local, "log", None)
        if site_log is not None:
            site_log.write(text)
        else:
            self.fallback.write(text)
        return len(text)

    def flush(self) -> None:
        self.fallback.flush()


class LinkStream(WorkStream):
    """A virtual site's Work stream: `WorkStream`'s requests and answers, over the host's link to the driver.

    No gRPC channel and no pinger (the driver's streams have no idle deadline). A task whose model another
    site of the host received already comes as the header alone, and the bytes from the host's cache.
    """

    def __init__(self, host: SiteHost, site: str, job_id: str) -> None:
        self._setup(job_id)
        self.host = host
        self.site = site
        self.number = 0
        self.answers: queue.SimpleQueue[fpb.ServerMessage | str] | None = None
        self.since: float | None = None
        """When the site took the host's compute slot (None: it does not hold it)."""
        self.task_round = 0

    def task(self, request: fpb.TaskRequest) -> tuple[fpb.TaskHeader, bytes | memoryview]:
        self._release()
        own = request.cached_sha256
        while True:
            header, payload = super().task(request)
            if header.payload_cached and header.payload_sha256 != own:
                payload = self.host.models.get(header.payload_sha256, f"task {header.task_id} of {self.site}")
                header.payload_cached = False
            elif payload and header.payload_format:
                # The host's sites share these bytes: read-only, each site decodes its own copy of the model.
                payload = memoryview(payload).toreadonly()
                self.host.models.put(header.payload_sha256, payload)
            if header.kind == "train" and self.host.straggles(self.site, header.round):
                log.info("%s straggles in round %d: it does not answer %s", self.site, header.round, header.task_id)
                request = fpb.TaskRequest(job_id=request.job_id, cached_sha256=own, last_task_id=header.task_id)
                continue
            if header.kind != "end":
                self.host.gate.acquire()
                self.since = time.monotonic()
                # An evaluation alone belongs to the round whose training it rides beside.
                self.task_round = header.round if header.kind == "train" else header.round + 1
            return header, payload

    def _result_sent(self) -> None:
        self._release()

    def close(self) -> None:
        self._release()
        with self._lock:
            self._drop()

    def _release(self) -> None:
        if self.since is not None:
            busy = {"t": time.monotonic() - self.since, "r": self.task_round}
            self.host.send(Envelope("busy", self.site, fields=busy))
            self.since = None
            self.host.gate.release()

    def _request(self, what: str, exchange: Callable[[], T]) -> T:
        with self._lock:
            if self.answers is None:
                self._open()
            try:
                return exchange()
            except TransferError:
                self._drop()
                raise

    def _open(self) -> None:
        self.number += 1
        self.answers = queue.SimpleQueue()
        self.host.open_stream(self)
        self._reply_to(fpb.WorkerMessage(hello=fpb.WorkerHello(job_id=self.job_id)))

    def _drop(self) -> None:
        if self.answers is not None:
            self.host.send(Envelope("close", self.site, self.number))
            self.answers = None

    def _send(self, message: fpb.WorkerMessage) -> None:
        self.host.send(Envelope("msg", self.site, self.number, payload=message.SerializeToString()))

    def _answer(self) -> fpb.ServerMessage:
        assert self.answers is not None
        item = self.answers.get()
        if isinstance(item, str):
            raise TransferError(f"the server closed the work stream: {item}")
        return item


class SiteHost:
    """The virtual sites of one worker process; `serve` runs until the driver says stop or goes away."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self._send_lock = threading.Lock()
        self.models = ModelCache()
        self.gate = threading.Semaphore(1)
        self.job: HostJob | None = None
        self.workdir: Path | None = None
        self.streams: dict[str, LinkStream] = {}
        self.aborted: dict[str, str] = {}
        self.threads: list[threading.Thread] = []
        self.output = SiteOutput(sys.__stderr__)

    def send(self, envelope: Envelope) -> None:
        with self._send_lock:
            self.link.send(envelope.encode())

    def serve(self) -> None:
        """Take envelopes from the driver until it says stop (or is gone); the sites' threads do the rest."""
        sys.stdout = sys.stderr = self.output
        handler = logging.StreamHandler(self.output)
        handler.setFormatter(logging.Formatter(FORMAT))
        logging.getLogger().handlers[:] = [handler]
        logging.getLogger().setLevel(logging.INFO)
        import torch
        import torch._dynamo  # noqa: F401 - imported by the first optimizer otherwise, ~1.6 s inside round 1

        self.send(Envelope("ready", fields={"pid": os.getpid(), "torch": torch.__version__}))
        try:
            while True:
                try:
                    envelope = Envelope.decode(self.link.recv())
                except EOFError:
                    break
                if envelope.kind == "stop":
                    break
                self._take(envelope)
        finally:
            # A site still waiting for an answer (its job ended while it asked) gets the stream's end, so that
            # its thread ends and the folders can go.
            for stream in list(self.streams.values()):
                if stream.answers is not None:
                    stream.answers.put("the simulation ended")
            deadline = time.monotonic() + HOST_END
            for thread in self.threads:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _take(self, envelope: Envelope) -> None:
        kind = envelope.kind
        if kind == "msg":
            stream = self.streams.get(envelope.site)
            if stream is not None and stream.number == envelope.stream and stream.answers is not None:
                stream.answers.put(fpb.ServerMessage.FromString(envelope.payload))
        elif kind == "end":
            stream = self.streams.get(envelope.site)
            if stream is not None and stream.number == envelope.stream and stream.answers is not None:
                stream.answers.put(envelope.fields.get("why", "closed"))
        elif kind == "sites":
            job = HostJob.from_envelope(envelope)
            try:
                self._start(job, envelope.payload)
            except Exception:  # noqa: BLE001 - the job cannot start here: each site reports why, as a worker would
                error = traceback.format_exc()
                for site in job.sites:
                    self.send(Envelope("ended", site, fields={"state": "failed", "error": error}))
        elif kind == "abort":
            for site in envelope.fields["sites"]:
                self.aborted[site] = envelope.fields["reason"]
                stream = self.streams.get(site)
                if stream is not None and stream.answers is not None:
                    stream.answers.put(f"the job was aborted ({envelope.fields['reason']})")

    def open_stream(self, stream: LinkStream) -> None:
        """Register a site's new Work stream (numbered, so that answers meant for an old one are dropped)."""
        self.streams[stream.site] = stream
        self.send(Envelope("open", stream.site, stream.number))

    def straggles(self, site: str, round_no: int) -> bool:
        """Whether `site` does not answer its training task of `round_no` (drawn from the job's seed)."""
        assert self.job is not None
        share = self.job.stragglers
        return share > 0 and random.Random(f"{self.job.seed}/{round_no}/{site}").random() < share

    # ------------------------------------------------------------------ the job's sites

    def _start(self, job: HostJob, package: bytes) -> None:
        import torch

        self.job = job
        self.workdir = scratch_folder("fedgrid-sim-host-")
        jobspec.safe_extract(package, self.workdir / "job", max_bytes=JOB_LIMIT, max_files=100_000)
        spec = jobspec.load_job(self.workdir / "job")
        client = spec.clients[job.app]
        torch.set_num_threads(max(1, job.threads))
        custom = self.workdir / "job" / job.app / "custom"
        if client.is_module:
            sys.argv = [client.script.removeprefix("module:"), *client.args]
            run = lambda: runpy.run_module(client.script.removeprefix("module:"), run_name="__main__")  # noqa: E731
        else:
            script = custom / client.script
            sys.path.insert(0, str(custom))
            os.chdir(custom)
            sys.argv = [str(script), *client.args]
            run = lambda: _run_script(script)  # noqa: E731
        for site in job.sites:
            site_dir = self.workdir / "sites" / site
            site_dir.mkdir(parents=True)
            (site_dir / "job").symlink_to(self.workdir / "job", target_is_directory=True)
            if job.data_root:
                (site_dir / "data").mkdir()
                (site_dir / "data" / site).symlink_to(Path(job.data_root) / site, target_is_directory=True)
            thread = threading.Thread(target=self._run_site, args=(site, site_dir, run), name=site, daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run_site(self, site: str, site_dir: Path, run: Callable[[], Any]) -> None:
        from fedclient import api
        from fedclient.job_session import JobSession
        from fedgrid.settings import SiteSettings

        assert self.job is not None
        site_log = SiteLog()
        self.output.local.log = site_log
        self.send(Envelope("started", site))
        state, error, session = "finished", "", None
        try:
            session = JobSession(
                site=site,
                job_id=self.job.job_id,
                job_dir=site_dir,
                settings=SiteSettings(data_root=str(site_dir / "data") if self.job.data_root else ""),
                stream=LinkStream(self, site, self.job.job_id),
                he_context=self.job.he_context,
            )
            api.bind_thread_session(session)
            try:
                run()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if code:
                    state, error = "failed", f"the training script exited with status {exc.code}"
            session.close()
        except BaseException:  # noqa: BLE001 - a crash in one site's script ends that site, as in deployment
            error = traceback.format_exc()
            site_log.write(error)
            state = "failed"
        finally:
            api.bind_thread_session(None)
            stream = session.stream if session is not None else None
            if stream is not None:
                stream.close()
            if site in self.aborted:
                state, error = "aborted", self.aborted[site]
            self.output.local.log = None
            self.send(Envelope("ended", site, fields={"state": state, "error": error}, payload=site_log.data()))


def _run_script(script: Path) -> None:
    """Run a job's script file as `__main__`, in a module of its own (runpy.run_path would swap the
    process's sys.modules["__main__"] and sys.argv[0], which the host's other sites share)."""
    spec = importlib.util.spec_from_file_location("__main__", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def main(fd: int) -> None:
    """A host process of the local pool, `python -m fedgrid.sim.host FD`: serve the socket `fd` (to the
    driver), then leave at once."""
    from multiprocessing.connection import Connection

    from fedgrid import allocator
    from fedgrid.sim.link import ConnectionLink

    allocator.tune()
    try:
        SiteHost(ConnectionLink(Connection(fd))).serve()
    finally:
        sys.__stderr__.flush()
        # The job is over and reported: skip the interpreter's teardown of torch and the sites' threads.
        os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]))
