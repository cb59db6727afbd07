"""A misbehaving site for tests: it speaks the real protocol over mutual TLS with a real site kit,
but answers training tasks with whatever payload the test chooses (another context's ciphertexts,
corrupted bytes, ...), so that the server's refusals can be watched end to end. It plays the site
daemon (register, heartbeat, commands, job reports) with the generated stub, and the job worker with
the real worker stream of `fedclient.work_stream`, choosing only what it sends.

`on_start(stream, job_id)` runs when its worker starts (a job key made wrongly, ...); `train(stream, header,
payload)` takes over a training task whole (the steps of SecAgg+ run with the real site code, then one
withheld, ...) and returns whether it answered."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import grpc

from fedclient.work_stream import WorkStream
from fedgrid.errors import FedgridError
from fedgrid.kit import load_kit
from fedgrid.tls import secure_channel
from fedgrid.v1 import federation_pb2 as fpb
from fedgrid.v1 import federation_pb2_grpc

Answer = Callable[[fpb.TaskHeader, bytes], tuple[str, bytes]]
"""(task header, task payload) -> (payload format, payload bytes) for a training task."""
Samples = float | Callable[[fpb.TaskHeader], float]
"""The sample count every result claims, or the one for each task."""
OnStart = Callable[[WorkStream, str], None]
Train = Callable[[WorkStream, fpb.TaskHeader, bytes], bool]


class RogueSite:
    def __init__(
        self,
        kit_path: Path,
        answer: Answer | None = None,
        samples: Samples = 50.0,
        on_start: OnStart | None = None,
        train: Train | None = None,
    ) -> None:
        self.kit = load_kit(kit_path, expect_type="client")
        self.answer = answer
        self.samples = samples
        self.on_start = on_start
        self.train = train
        self.errors: list[str] = []
        self.channel = secure_channel(self.kit, self.kit.fed_port)
        self.stub = federation_pb2_grpc.FederationStub(self.channel)
        self.stop = threading.Event()
        self.answered: list[str] = []
        self._commands: grpc.Future | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        reply = self.stub.Register(fpb.RegisterRequest(roster=self.kit.roster_bytes, hostname="rogue", cpu_count=1))
        self.session = reply.session_id
        for target in (self._heartbeat, self._listen):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        self.stop.set()
        if self._commands is not None:
            self._commands.cancel()
        self.channel.close()

    def _heartbeat(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.stub.Heartbeat(fpb.HeartbeatRequest(session_id=self.session), timeout=5)
            except grpc.RpcError:
                pass

    def _listen(self) -> None:
        self._commands = self.stub.Commands(fpb.CommandsRequest(session_id=self.session))
        try:
            for command in self._commands:
                if command.WhichOneof("kind") == "start_job":
                    job_id = command.start_job.job_id
                    self.stub.ReportJob(fpb.JobReport(job_id=job_id, state="started"))
                    threading.Thread(target=self._work, args=(job_id,), daemon=True).start()
        except grpc.RpcError:
            pass

    def _work(self, job_id: str) -> None:
        stream = WorkStream(self.kit, job_id)
        last = ""
        try:
            if self.on_start is not None:
                self.on_start(stream, job_id)
            while not self.stop.is_set():
                header, payload = stream.task(fpb.TaskRequest(job_id=job_id, last_task_id=last))
                if header.kind == "end":
                    self.stub.ReportJob(fpb.JobReport(job_id=job_id, state="finished"))
                    return
                last = header.task_id
                samples = self.samples(header) if callable(self.samples) else self.samples
                if header.evaluate_task_id:
                    scored = fpb.ResultHeader(
                        job_id=job_id,
                        task_id=header.evaluate_task_id,
                        num_samples=samples,
                        metrics={"accuracy": 0.5},
                    )
                    stream.result(scored)
                if header.kind == "train" and self.train is not None:
                    if self.train(stream, header, payload):
                        self.answered.append(header.task_id)
                    continue
                if header.kind == "train":
                    assert self.answer is not None
                    fmt, data = self.answer(header, payload)
                    result = fpb.ResultHeader(
                        job_id=job_id, task_id=header.task_id, payload_format=fmt, num_samples=samples
                    )
                    pieces = [data]
                else:
                    result = fpb.ResultHeader(
                        job_id=job_id, task_id=header.task_id, num_samples=samples, metrics={"accuracy": 0.5}
                    )
                    pieces = []
                try:
                    stream.result(result, lambda pieces=pieces: pieces)
                    self.answered.append(header.task_id)
                except FedgridError:
                    pass
        except (FedgridError, grpc.RpcError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
            return
        finally:
            stream.close()
