"""Does the server's memory stay O(model) while it aggregates N site updates of a 10M-parameter model?

    python bench/aggregation_memory.py [--sites 4 16 32] [--params 10000000] [--real 4]

For each N a fresh project is provisioned and a fresh server daemon is started from its kit's
start.sh (the real process, mutual TLS on loopback). One FedAvg job of one round runs on N sites:
the server sends the 40 MB global model to every site, receives N full 40 MB updates through its real
gRPC path (each site's Work stream, spooled to a file, folded block by block into the running mean), then sends
the new model out for evaluation and writes the result. Memory is read from /proc/<server pid>/status:

- baseline: VmRSS with the N sites connected, before the job is submitted;
- deploy peak: VmHWM while the job is stored and the N sites fetch its 40 MB package;
- round peak: VmHWM from the moment every site is ready (the peak is reset then by writing 5 to
  /proc/<pid>/clear_refs) until the job is FINISHED: dispatch, N uploads, folding, evaluation, end.

The table shows the round peak, its delta over the baseline and that delta in model sizes. Streaming
aggregation keeps the delta flat in N; a server that buffered the updates would grow by one model
per site. A sampler also records VmRSS every 10 ms to show in which phase the peak falls.

The sites. Real site daemons each start a job worker that imports torch (~350 MB resident each
plus a few copies of the 40 MB model), so 32 of them do not fit this 2-core machine beside other
work. By default each site is therefore played by a light driver thread in this process, with the
site's own startup kit and certificate: it does a site daemon's part with the generated stub (Register,
heartbeats, the Commands stream, FetchJob, ReportJob) and the job worker's part with fedclient's real
worker stream (`fedclient.work_stream.WorkStream`: the whole 40 MB model in, a full 40 MB safetensors
update out), numpy only, leaving out only the training. The N uploads
start together (a barrier), so the server receives them at the same time, which is the demanding
case for its memory; the time window and overlap of the uploads are printed. The server cannot tell
a driver from a daemon: what it receives, and how, is the same. `--real N ...` runs those N with real
site daemons and job workers instead (this file is then their training script), as a cross-check.

Diagnostics (the code under test is unchanged; they only start the server differently):
--malloc_stats separates memory the server holds from memory glibc keeps after it was freed;
--grpc_option KEY=VALUE adds gRPC options to the server (e.g. grpc.http2.bdp_probe=0);
--one_at_a_time makes the driver sites upload one after the other. Environment variables such as
MALLOC_ARENA_MAX pass through start.sh to the daemons.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = 1000
MAX_ROWS = 4000
"""The model is a stack of float32 matrices of 1000 columns and at most 4000 rows (16 MB each)."""


def model_arrays(params: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`params` float32 values as a few large matrices, like the layers of a 10M-parameter network."""
    rng = np.random.default_rng(seed)
    arrays, rows, index = {}, params // COLUMNS, 0
    while rows > 0:
        take = min(rows, MAX_ROWS)
        arrays[f"layer{index}.weight"] = rng.standard_normal((take, COLUMNS), dtype=np.float32)
        rows, index = rows - take, index + 1
    if params % COLUMNS:
        arrays["tail.bias"] = rng.standard_normal(params % COLUMNS, dtype=np.float32)
    return arrays


# ---------------------------------------------------------------------------------------------- /proc


def status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def reset_peak(pid: int) -> None:
    """Set VmHWM back to the current VmRSS (Linux >= 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


class RssSampler(threading.Thread):
    """VmRSS of a process every `every` seconds, as (wall time, kB)."""

    def __init__(self, pid: int, every: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.samples.append((time.time(), status(self.pid)["VmRSS"]))
            except (OSError, KeyError):
                return
            self.stopping.wait(self.every)

    def peak(self, start: float, end: float) -> int:
        return max((kb for t, kb in self.samples if start <= t <= end), default=0)


# ---------------------------------------------------------------------------------------------- driver sites


class Discard:
    """A sink that only counts what is written (the driver drains payloads it does not need)."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)


@dataclass
class Rendezvous:
    """What the driver threads and the main thread wait for."""

    started: threading.Barrier
    """Every site fetched the job and reported "started" (the main thread is a party)."""
    go: threading.Event = field(default_factory=threading.Event)
    """Set by the main thread once it reset the server's peak memory: the sites may ask for work."""
    upload: threading.Barrier | None = None
    """All sites start their upload together."""
    one_at_a_time: threading.Lock | None = None
    """With --one_at_a_time, a lock that lets only one upload be in flight (a diagnostic, not the default)."""
    uploads: list[tuple[float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class DriverSite(threading.Thread):
    """One site played in-process: the protocol of a site daemon and of its job worker, numpy only."""

    def __init__(self, kit: Path, update: bytes, meet: Rendezvous) -> None:
        super().__init__(daemon=True, name=f"driver-{kit.name}")
        from fedgrid.kit import load_kit
        from fedgrid.tls import secure_channel
        from fedgrid.v1 import federation_pb2 as fpb
        from fedgrid.v1 import federation_pb2_grpc

        self.fpb = fpb
        self.kit = load_kit(kit, expect_type="client")
        self.channel = secure_channel(self.kit, self.kit.fed_port)
        self.stub = federation_pb2_grpc.FederationStub(self.channel)
        self.update = update
        self.meet = meet
        self.session_id = ""
        self.stopping = threading.Event()
        self.registered = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            if not self.stopping.is_set():
                self.meet.errors.append(f"{self.kit.name}: {type(exc).__name__}: {exc}")
                self.meet.started.abort()

    def _run(self) -> None:
        fpb = self.fpb
        reply = self.stub.Register(
            fpb.RegisterRequest(
                version="bench",
                roster=self.kit.roster_bytes,
                cpu_count=os.cpu_count() or 1,
                hostname=f"{socket.gethostname()}-{self.kit.name}",
            ),
            timeout=30,
        )
        self.session_id = reply.session_id
        threading.Thread(target=self._heartbeat, args=(reply.heartbeat_interval or 2.0,), daemon=True).start()
        commands = self.stub.Commands(fpb.CommandsRequest(session_id=self.session_id))
        self.registered.set()
        for command in commands:
            if command.WhichOneof("kind") == "start_job":
                self._job(command.start_job.job_id)
                commands.cancel()
                return

    def _heartbeat(self, interval: float) -> None:
        while not self.stopping.wait(interval):
            try:
                self.stub.Heartbeat(self.fpb.HeartbeatRequest(session_id=self.session_id), timeout=10)
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next interval
                continue

    def _job(self, job_id: str) -> None:
        """The job worker's part, with the real worker stream of fedclient (only the training is left out)."""
        from fedclient.work_stream import WorkStream
        from fedgrid import tensors, transfer

        fpb = self.fpb
        transfer.receive(
            self.stub.FetchJob(fpb.FetchJobRequest(job_id=job_id)), Discard(), max_size=1 << 34, what="job package"
        )
        self.stub.ReportJob(fpb.JobReport(job_id=job_id, state="started"), timeout=30)
        self.meet.started.wait()
        self.meet.go.wait()
        stream = WorkStream(self.kit, job_id)
        last, cached = "", b""
        while True:
            header, _payload = stream.task(fpb.TaskRequest(job_id=job_id, cached_sha256=cached, last_task_id=last))
            if header.kind == "end":
                break
            last, cached = header.task_id, header.payload_sha256 or cached
            result = fpb.ResultHeader(job_id=job_id, task_id=header.task_id, num_samples=100.0)
            if header.kind == "train":
                result.payload_format = tensors.FORMAT
                if self.meet.upload is not None:
                    self.meet.upload.wait()
                with self.meet.one_at_a_time or contextlib.nullcontext():
                    started = time.time()
                    if header.upload_slot:  # what fedclient.api does: wait for a turn before sending
                        stream.upload_slot(header.task_id)
                    stream.result(result, lambda: [self.update])
                    self.meet.uploads.append((started, time.time()))
            else:
                result.metrics["accuracy"] = 0.5
                stream.result(result)
        stream.close()
        self.stub.ReportJob(fpb.JobReport(job_id=job_id, state="finished"), timeout=30)

    def stop(self) -> None:
        self.stopping.set()
        self.channel.close()


# ---------------------------------------------------------------------------------------------- real sites


def site_main() -> None:
    """The training script of --real runs: answer every train task with the model it received."""
    from fedclient import api

    api.init()
    while api.is_running():
        task = api.receive()
        if task is None:
            break
        if task.is_evaluate:
            api.send(metrics={"accuracy": 0.5}, num_samples=100)
        else:
            api.send(task.params, num_samples=100)


# ---------------------------------------------------------------------------------------------- server variants


@dataclass(frozen=True)
class Variant:
    """How the server and the driver sites run: the plain server from start.sh unless a diagnostic asks."""

    grpc_options: tuple[str, ...] = ()
    malloc_stats: bool = False
    one_at_a_time: bool = False

    @property
    def patched_server(self) -> bool:
        return bool(self.grpc_options) or self.malloc_stats


MALLOC_FILE = "mallinfo.txt"


def parse_option(text: str) -> tuple[str, int | str]:
    key, _, value = text.partition("=")
    return key, int(value) if value.lstrip("-").isdigit() else value


def sample_malloc(path: Path, every: float = 0.01) -> None:
    """Append glibc's view of the heap every `every` s: time, bytes in use, bytes free but kept, VmRSS kB."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    with open(path, "a", buffering=1) as out:
        while True:
            info = libc.mallinfo2()
            out.write(f"{time.time()} {info.uordblks + info.hblkhd} {info.fordblks} {status(os.getpid())['VmRSS']}\n")
            time.sleep(every)


def serve_patched(spec: str, argv: list[str]) -> None:
    """Run the server daemon with extra gRPC options and/or a malloc sampler (diagnostics; code unchanged).

    Started as `aggregation_memory.py --patched-server SPEC -m fedserver --kit KIT`, so that the kit's
    stop.sh still recognises (and stops) it. SPEC is comma-separated KEY=VALUE options, plus "malloc".
    """
    import runpy

    from fedserver import limits

    kit = Path(argv[argv.index("--kit") + 1])
    items = [item for item in spec.split(",") if item]
    limits.SERVER_OPTIONS.extend(parse_option(item) for item in items if item != "malloc")
    if "malloc" in items:
        threading.Thread(target=sample_malloc, args=(kit / MALLOC_FILE,), daemon=True).start()
    sys.argv = ["fedserver", *argv[argv.index("--kit") :]]
    runpy.run_module("fedserver", run_name="__main__", alter_sys=True)


def start_patched_server(fed: Any, kit: Path, variant: Variant) -> None:
    """Start the server of `kit` through `serve_patched` instead of start.sh."""
    import subprocess

    from federation import ENV

    spec = ",".join([*variant.grpc_options, *(["malloc"] if variant.malloc_stats else [])])
    ready = kit / "daemon.ready"
    ready.unlink(missing_ok=True)
    with open(kit / "log.txt", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, __file__, "--patched-server", spec, "-m", "fedserver", "--kit", str(kit)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=ENV,
        )
    (kit / "daemon.pid").write_text(str(process.pid))
    fed.running.append(kit)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the patched server did not start; see {kit / 'log.txt'}")
        time.sleep(0.05)


def malloc_peaks(path: Path, start: float, end: float) -> tuple[int, int, int] | None:
    """(bytes in use at `start`, peak bytes in use, peak bytes free-but-kept) within [start, end]."""
    if not path.exists():
        return None
    rows = [line.split() for line in path.read_text().splitlines() if len(line.split()) == 4]
    inside = [(float(t), int(used), int(free)) for t, used, free, _ in rows if start <= float(t) <= end]
    if not inside:
        return None
    return inside[0][1], max(r[1] for r in inside), max(r[2] for r in inside)


# ---------------------------------------------------------------------------------------------- one measurement


@dataclass
class Row:
    sites: int
    mode: str
    idle_kb: int
    baseline_kb: int
    deploy_peak_kb: int
    before_round_kb: int
    round_peak_kb: int
    after_kb: int
    phases: list[tuple[str, int]]
    upload_window: tuple[float, float] | None
    max_in_flight: int
    seconds: float
    heap: tuple[int, int, int] | None = None
    """With --malloc_stats: (bytes in use when the round starts, peak in use, peak free-but-kept by malloc)."""


def job_phases(log_text: str) -> dict[str, float]:
    """When the round's phases began, from the server's job log."""
    marks = {}
    for line in log_text.splitlines():
        if not line[:4].isdigit():
            continue
        t = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        text = line[24:]
        if "round 1: model sent" in text:
            marks.setdefault("sent", t)
        elif "folded in" in text:
            marks["last_fold"] = t
            marks.setdefault("first_fold", t)
        elif "global model evaluated" in text:
            marks["evaluated"] = t
        elif "job ended" in text:
            marks["ended"] = t
    return marks


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def allow_job_of(server_kit: Path, model_bytes: int) -> None:
    """Raise the server's job upload limit (local/server.json, max_upload_mb, 100 MB by default) to fit a
    job whose initial model is `model_bytes`, as an operator whose users train such models would."""
    import json

    from fedgrid.settings import SERVER_SETTINGS_FILE

    path = server_kit / "local" / SERVER_SETTINGS_FILE
    settings = json.loads(path.read_text()) if path.is_file() else {}
    settings["max_upload_mb"] = max(100, model_bytes * 1.1 / 1e6 + 10)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(settings))


def measure(n: int, arrays: dict[str, np.ndarray], update: bytes, real: bool, variant: Variant) -> Row:
    """Provision a project of `n` sites, start a fresh server, run one round, read the server's memory."""
    from conftest import provision_project
    from federation import Federation

    from fedgrid.recipe import FedAvgRecipe

    tmp = Path(tempfile.mkdtemp(prefix=f"fedgrid-aggmem-{n}-"))
    fed = None
    drivers: list[DriverSite] = []
    sampler = None
    try:
        project = provision_project(tmp / "project", n_sites=n)
        allow_job_of(project.server, sum(a.nbytes for a in arrays.values()))
        fed = Federation(project)
        if variant.patched_server:
            start_patched_server(fed, project.server, variant)
        else:
            fed.start(project.server)
        pid = fed.pid(project.server)
        idle = status(pid)["VmRSS"]
        meet = Rendezvous(
            started=threading.Barrier(n + 1),
            upload=None if real else threading.Barrier(n),
            one_at_a_time=threading.Lock() if variant.one_at_a_time else None,
        )
        if real:
            for site in project.sites:
                fed.start(site)
        else:
            drivers = [DriverSite(kit, update, meet) for kit in project.sites]
            for driver in drivers:
                driver.start()
            for driver in drivers:
                driver.registered.wait(60)
        fed.wait_alive([s.name for s in project.sites], timeout=120)
        recipe = FedAvgRecipe(
            name=f"aggregation_memory_{n}",
            model=arrays,
            train_script=Path(__file__),
            train_args=["--site"],
            num_rounds=1,
            min_clients=n,
        )
        folder = recipe.export(tmp / "job")
        baseline = status(pid)["VmRSS"]
        sampler = RssSampler(pid)
        sampler.start()
        started = time.time()
        with fed.session() as session:
            job_id = session.submit_job(folder)
            log_path = project.server / "workspace" / "jobs" / job_id / "log.txt"
            if real:
                # Real workers ask for work on their own; reset the peak when the job log says they all did.
                while "workers ready" not in (log_path.read_text() if log_path.exists() else ""):
                    time.sleep(0.005)
                deploy_peak = status(pid)["VmHWM"]
                reset_peak(pid)
            else:
                try:
                    meet.started.wait(timeout=600)
                except threading.BrokenBarrierError:
                    raise RuntimeError(f"N={n}: a driver site failed: {'; '.join(meet.errors)}") from None
                deploy_peak = status(pid)["VmHWM"]
                reset_peak(pid)
                meet.go.set()
            before_round, round_start = status(pid)["VmRSS"], time.time()
            info = session.wait(job_id)
        memory = status(pid)
        seconds = time.time() - started
        sampler.stopping.set()
        if info.status != "FINISHED:COMPLETED" or meet.errors:
            raise RuntimeError(f"N={n}: job {info.status} {info.error} {'; '.join(meet.errors)}")
        marks = job_phases(log_path.read_text())
        window = (min(a for a, _ in meet.uploads), max(b for _, b in meet.uploads)) if meet.uploads else None
        if window is not None:
            phases = [
                ("model to the sites", sampler.peak(marks["sent"], window[0])),
                ("uploads in flight", sampler.peak(window[0], window[1])),
                ("folding the rest", sampler.peak(window[1], marks["last_fold"])),
            ]
        else:
            phases = [("dispatch + uploads + folding", sampler.peak(marks["sent"], marks["last_fold"]))]
        phases += [
            ("new model + evaluation", sampler.peak(marks["last_fold"], marks["evaluated"])),
            ("end of job", sampler.peak(marks["evaluated"], marks["ended"] + 0.05)),
        ]
        heap = malloc_peaks(project.server / MALLOC_FILE, round_start, time.time())
        return Row(
            n,
            "real daemons" if real else "driver",
            idle,
            baseline,
            deploy_peak,
            before_round,
            memory["VmHWM"],
            memory["VmRSS"],
            phases,
            window,
            max_overlap(meet.uploads),
            seconds,
            heap,
        )
    finally:
        if sampler is not None:
            sampler.stopping.set()
        for driver in drivers:
            driver.stop()
        if fed is not None:
            fed.close()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- report


def mb(kb: int) -> str:
    return f"{kb / 1024:7.0f} MB"


def report(rows: list[Row], model_bytes: int, params: int) -> None:
    model_kb = model_bytes / 1024
    print()
    print(
        f"server memory while aggregating one round of a {params:,}-parameter model "
        f"({model_bytes / 1e6:.0f} MB float32 per update); delta = round peak - baseline"
    )
    print("   N  sites           baseline  before round  round peak       delta  delta/model    deploy peak")
    for r in rows:
        delta = r.round_peak_kb - r.baseline_kb
        print(
            f"  {r.sites:>2}  {r.mode:<13} {mb(r.baseline_kb)}    {mb(r.before_round_kb)}  {mb(r.round_peak_kb)} "
            f" {mb(delta)}  {delta / model_kb:10.2f}x    {mb(r.deploy_peak_kb)} "
            f"({(r.deploy_peak_kb - r.baseline_kb) / model_kb:.1f}x)"
        )
    if any(r.heap is not None for r in rows):
        print()
        print("glibc heap during the round (--malloc_stats): memory the server holds vs memory freed but kept")
        print("   N  in use at start  peak in use  in-use delta/model  peak free-but-kept")
        for r in rows:
            if r.heap is not None:
                start, peak, kept = r.heap
                print(
                    f"  {r.sites:>2}  {mb(start // 1024)}      {mb(peak // 1024)}  "
                    f"{(peak - start) / model_bytes:17.2f}x  {mb(kept // 1024)}"
                )
    print()
    print("where the round's peak falls (VmRSS sampled every 10 ms) and how the uploads overlapped:")
    for r in rows:
        phases = ", ".join(f"{name} {mb(kb).strip()}" for name, kb in r.phases)
        uploads = ""
        if r.upload_window is not None:
            uploads = (
                f"; {r.sites} uploads within {r.upload_window[1] - r.upload_window[0]:.1f} s, "
                f"up to {r.max_in_flight} in flight at once"
            )
        print(f"  N={r.sites:<2} ({r.mode}): {phases}{uploads}; job took {r.seconds:.1f} s")
    drivers = [r for r in rows if r.mode == "driver"]
    if len(drivers) >= 2:
        first, last = drivers[0], drivers[-1]
        grow = (last.round_peak_kb - last.baseline_kb) - (first.round_peak_kb - first.baseline_kb)
        per_site = grow / max(1, last.sites - first.sites) / model_kb
        print()
        print(
            f"from N={first.sites} to N={last.sites}: the delta changes by {grow / 1024:+.0f} MB, "
            f"{per_site:+.3f} model sizes per added site (flat: 0; buffering every update: +1)"
        )


def main() -> int:
    if sys.argv[1:2] == ["--patched-server"]:
        serve_patched(sys.argv[2], sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[4, 16, 32], help="values of N (default 4 16 32)")
    parser.add_argument("--params", type=int, default=10_000_000, help="model parameters (default 10,000,000)")
    parser.add_argument(
        "--real",
        type=int,
        nargs="*",
        default=[],
        metavar="N",
        help="also measure these N with real site daemons and job workers (heavy: ~0.5 GB each)",
    )
    parser.add_argument(
        "--one_at_a_time",
        action="store_true",
        help="diagnostic: the driver sites upload one after the other instead of all at once",
    )
    parser.add_argument(
        "--grpc_option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="diagnostic: start the server with this extra gRPC option (repeatable), e.g. grpc.http2.bdp_probe=0",
    )
    parser.add_argument(
        "--malloc_stats",
        action="store_true",
        help="diagnostic: the server samples glibc's mallinfo2 every 10 ms, to tell memory in use "
        "from memory freed but kept by the allocator",
    )
    parser.add_argument("--site", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.site:
        site_main()
        return 0
    sys.path.insert(0, str(ROOT / "tests"))
    from fedgrid import tensors

    arrays = model_arrays(args.params)
    update = tensors.encode(model_arrays(args.params, seed=1))
    one, five, _ = os.getloadavg()
    print(f"machine load before: {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores", flush=True)
    variant = Variant(tuple(args.grpc_option), args.malloc_stats, args.one_at_a_time)
    rows = []
    runs: list[tuple[int, bool]] = [(n, False) for n in args.sites] + [(n, True) for n in args.real]
    for n, real in runs:
        row = measure(n, arrays, update, real, variant)
        print(
            f"N={n:<2} ({row.mode}): baseline {mb(row.baseline_kb).strip()}, round peak "
            f"{mb(row.round_peak_kb).strip()}, {row.seconds:.1f} s",
            flush=True,
        )
        rows.append(row)
    one, five, _ = os.getloadavg()
    print(f"machine load after: {one:.2f} (1 min), {five:.2f} (5 min)")
    report(rows, len(update), args.params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
