"""How fast models and updates move over the real server path, and at what CPU cost.

    python bench/transfer.py [--mb 100] [--repeat 3]

Provisions a throw-away project and starts the real server daemon from its kit's start.sh (mutual TLS on
loopback). This process plays site-1: the site daemon's part with the generated stub (Register, the
Commands stream, FetchJob, ReportJob) and the job worker's part with fedclient's own worker stream
(`fedclient.work_stream.WorkStream`), as a job worker does, leaving out only the training. Each repeat
submits a one-round job whose initial model is --mb MB of float32, and times:
- down: the round's task, the global model, from the worker's request to its last byte (the server
  streams a model of this size from its file, a chunk at a time);
- up: the site's update of the same size, from its first byte to the server's reply (by then the server
  has checked it and spooled it to a file).
The limit is a plain TCP socket copy of the same bytes between two processes on this machine (no TLS, no
framing, no checks). Printed: MB/s, the ratio to the limit (best of --repeat runs), and the CPU both
processes spent per MB moved (median): on a round's 2 cores, CPU is what a round waits for.
"""

from __future__ import annotations

import argparse
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _procstat import cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def sink_socket(port_file: str, size: int) -> None:
    """The receiving end of the plain TCP copy (run in its own process)."""
    listener = socket.create_server(("127.0.0.1", 0))
    Path(port_file).write_text(str(listener.getsockname()[1]))
    conn, _ = listener.accept()
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = conn.recv_into(view[got:], min(size - got, 4 << 20))
        if not n:
            break
        got += n
    conn.sendall(b"k")
    conn.close()


def plain_copy(payload: bytes) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        proc = subprocess.Popen([sys.executable, __file__, "--sink", str(port_file), "--size", str(len(payload))])
        try:
            while not port_file.exists() or not port_file.read_text():
                time.sleep(0.01)
            with socket.create_connection(("127.0.0.1", int(port_file.read_text()))) as conn:
                start = time.perf_counter()
                conn.sendall(payload)
                conn.recv(1)
                return time.perf_counter() - start
        finally:
            proc.wait(30)


class Site:
    """site-1 played in this process: a site daemon's calls, and a job worker's real stream."""

    def __init__(self, kit_path: Path) -> None:
        from fedgrid.kit import load_kit
        from fedgrid.tls import secure_channel
        from fedgrid.v1 import federation_pb2 as fpb
        from fedgrid.v1 import federation_pb2_grpc

        self.fpb = fpb
        self.kit = load_kit(kit_path, expect_type="client")
        self.channel = secure_channel(self.kit, self.kit.fed_port)
        self.stub = federation_pb2_grpc.FederationStub(self.channel)
        reply = self.stub.Register(
            fpb.RegisterRequest(roster=self.kit.roster_bytes, hostname="bench", cpu_count=1), timeout=30
        )
        self.session = reply.session_id
        self.jobs: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.stopping = threading.Event()
        threading.Thread(target=self._heartbeat, daemon=True).start()
        threading.Thread(target=self._commands, daemon=True).start()

    def _heartbeat(self) -> None:
        while not self.stopping.wait(1.0):
            try:
                self.stub.Heartbeat(self.fpb.HeartbeatRequest(session_id=self.session), timeout=10)
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next interval
                continue

    def _commands(self) -> None:
        try:
            for command in self.stub.Commands(self.fpb.CommandsRequest(session_id=self.session)):
                if command.WhichOneof("kind") == "start_job":
                    self.jobs.put(command.start_job.job_id)
        except Exception:  # noqa: BLE001 - the stream ends when the bench stops
            return

    def run_job(self, server_pid: int) -> tuple[tuple[float, float], tuple[float, float]]:
        """Take the next job: ((down seconds, down CPU s), (up seconds, up CPU s)) of its one round."""
        from fedclient.work_stream import WorkStream
        from fedgrid import tensors, transfer

        fpb = self.fpb
        job_id = self.jobs.get(timeout=120)
        transfer.receive(
            self.stub.FetchJob(fpb.FetchJobRequest(job_id=job_id)), transfer.Chunks(), max_size=1 << 34, what="job"
        )
        self.stub.ReportJob(fpb.JobReport(job_id=job_id, state="started"), timeout=30)
        stream = WorkStream(self.kit, job_id)
        try:
            cpu, start = cpu_seconds(server_pid) + time.process_time(), time.perf_counter()
            header, payload = stream.task(fpb.TaskRequest(job_id=job_id))
            down = (time.perf_counter() - start, cpu_seconds(server_pid) + time.process_time() - cpu)
            assert header.kind == "train", header
            result = fpb.ResultHeader(
                job_id=job_id, task_id=header.task_id, payload_format=tensors.FORMAT, num_samples=1.0
            )
            if header.upload_slot:
                stream.upload_slot(header.task_id)
            cpu, start = cpu_seconds(server_pid) + time.process_time(), time.perf_counter()
            update = [payload]
            stream.result(result, lambda: update)
            up = (time.perf_counter() - start, cpu_seconds(server_pid) + time.process_time() - cpu)
            while True:
                header, _ = stream.task(fpb.TaskRequest(job_id=job_id, last_task_id=header.task_id))
                if header.kind == "end":
                    break
                done = fpb.ResultHeader(job_id=job_id, task_id=header.task_id, num_samples=1.0, metrics={"a": 1.0})
                stream.result(done)
        finally:
            stream.close()
        self.stub.ReportJob(fpb.JobReport(job_id=job_id, state="finished"), timeout=30)
        return down, up

    def close(self) -> None:
        self.stopping.set()
        self.channel.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100, help="model size in MB (default 100)")
    parser.add_argument("--repeat", type=int, default=3, help="jobs to run; the best is shown (default 3)")
    parser.add_argument("--sink", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        sink_socket(args.sink, args.size)
        return 0

    from conftest import provision_project
    from federation import Federation

    from fedgrid import allocator
    from fedgrid.recipe import FedAvgRecipe
    from fedgrid.session import Session

    allocator.tune()  # as fedclient.worker does: this process plays the site's job worker
    model = {"w": np.random.default_rng(0).standard_normal((args.mb << 18,), dtype=np.float32)}
    size = model["w"].nbytes
    limit = min(plain_copy(model["w"].tobytes()) for _ in range(args.repeat))
    print(f"plain TCP copy of {size / 1e6:.0f} MB between two processes: {size / 1e6 / limit:.0f} MB/s")
    with tempfile.TemporaryDirectory() as tmp:
        project = provision_project(Path(tmp), n_sites=1)
        federation = Federation(project)
        federation.start(project.server)
        site = Site(project.sites[0])
        downs, ups = [], []
        try:
            pid = federation.pid(project.server)
            with Session(project.admin_roles["project_admin"], timeout=60) as session:
                for index in range(args.repeat):
                    recipe = FedAvgRecipe(
                        name=f"transfer-{index}", model=model, train_script=__file__, num_rounds=1, min_clients=1
                    )
                    job_id = session.submit_job(recipe.export(Path(tmp) / f"job{index}"))
                    down, up = site.run_job(pid)
                    info = session.wait(job_id)
                    assert info.status == "FINISHED:COMPLETED", info.error
                    downs.append(down)
                    ups.append(up)
                    print(f"  run {index + 1}: down {size / 1e6 / down[0]:.0f} MB/s, up {size / 1e6 / up[0]:.0f} MB/s")
        finally:
            site.close()
            federation.close()
    print()
    print(f"{'':28} {'MB/s':>8} {'of TCP copy':>12} {'CPU ms per MB (both ends)':>26}")
    print(f"{'plain TCP copy':28} {size / 1e6 / limit:8.0f} {1.0:12.2f} {'':>26}")
    for name, runs in (("down: global model to a site", downs), ("up: update to the server", ups)):
        best = min(seconds for seconds, _ in runs)
        cpu = statistics.median(cpu for _, cpu in runs) / (size / 1e6) * 1000
        print(f"{name:28} {size / 1e6 / best:8.0f} {limit / best:12.2f} {cpu:26.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
