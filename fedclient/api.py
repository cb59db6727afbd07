"""The only module a training script imports: receive the global model, train, send the update.

```python
from fedclient import api

api.init()
while api.is_running():
    task = api.receive()                 # blocks until the server has work; None once the job is over
    if task is None:
        break
    model.load_state_dict(task.params)
    if task.is_evaluate:                 # score the new global model on this site's validation data
        loss, accuracy = evaluate(model)
        api.send(metrics={"accuracy": accuracy, "loss": loss}, num_samples=len(val_set))
        continue
    train(model)
    api.send(model.state_dict(), num_samples=len(train_set), metrics={"train_loss": loss})
```

The same script runs plain and encrypted jobs: with encryption on, `receive` decrypts and `send`
encrypts with the site's CKKS context, scaled by `num_samples` so that the server can only add.
Tensors leave the process as safetensors (or ciphertexts), never as pickle.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from fedgrid import tensors, transfer, wire
from fedgrid.errors import FedgridError, StateError, TransferError
from fedgrid.jobspec import SERVER_CONFIG, load_job
from fedgrid.kit import Kit, load_kit
from fedgrid.lane import Lane, LaneError
from fedgrid.settings import SITE_SETTINGS_FILE, SiteSettings, load_settings, settings_to_dict
from fedgrid.tls import secure_channel
from fedgrid.v1 import federation_pb2 as fpb

log = logging.getLogger("fedclient.api")

ENV_KIT = "FEDGRID_KIT"
ENV_JOB_ID = "FEDGRID_JOB_ID"
ENV_JOB_DIR = "FEDGRID_JOB_DIR"
RETRY_FOR = 120.0
"""Seconds the worker keeps retrying while the server is unreachable before it gives up."""
LANE_RETRY = 60.0
"""Seconds a worker whose data lane failed stays on gRPC before it tries the lane again (doubling
with every failure in a row, up to an hour)."""


@dataclass
class FLModel:
    """A task from the server: the global model's tensors and where the job stands."""

    params: dict[str, torch.Tensor]
    current_round: int
    total_rounds: int
    kind: str
    job_id: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_train(self) -> bool:
        return self.kind == "train"

    @property
    def is_evaluate(self) -> bool:
        return self.kind == "evaluate"


@dataclass(frozen=True)
class Pending:
    """The task the script holds: what its send() answers."""

    task_id: str
    kind: str
    upload_slot: bool = False


class _Worker:
    """The connection of one job worker to the server, made once by `init()`."""

    def __init__(self, kit: Kit, job_id: str, job_dir: Path) -> None:
        self.kit = kit
        self.job_id = job_id
        self.job_dir = job_dir
        self.channel = secure_channel(kit, kit.fed_port)
        self.stub = wire.stub(self.channel, fpb.DESCRIPTOR.services_by_name["Federation"])
        self.settings = load_settings(SiteSettings, kit.local_dir / SITE_SETTINGS_FILE)
        spec = load_job(job_dir / "job")
        self.encrypted = spec.server.encryption == "ckks"
        self.he = None
        if self.encrypted:
            from fedgrid import he

            if not kit.he.enabled or kit.he.context_path is None:
                raise StateError("this job is encrypted but this site's kit has no HE context; re-provision with HE")
            self.he = he.HEContext.load(kit.he.context_path.read_bytes(), expect_secret_key=True)
        self.running = True
        self.task: Pending | None = None
        self.next_train: fpb.TaskHeader | None = None
        self.last_task_id = ""
        self.cached_sha256 = b""
        self.cached_arrays: dict[str, np.ndarray] = {}
        self.decrypted: set[bytes] = set()
        """Digests of the global models this worker decrypted as tasks: the only ones it may release."""
        self.held: fpb.Evaluation | None = None
        """The answer to an evaluation that rides on a training task: it goes with the training result."""
        self.seq = 0
        self.pending_events: list[fpb.Event] = []
        self.lane: Lane | None = None
        self.lane_retry_at = 0.0
        self.lane_failures = 0

    # -- the data lane (fedgrid/lane.py): tasks and results over a TLS socket when the kit names a data port
    def _lane(self) -> Lane | None:
        if not self.settings.data_lane or self.kit.data_port is None or time.monotonic() < self.lane_retry_at:
            return None
        if self.lane is None:
            try:
                self.lane = Lane(self.kit, self.kit.data_port)
            except (OSError, ssl.SSLError) as exc:
                self._lane_failed(f"cannot connect to {self.kit.server_host}:{self.kit.data_port} ({exc})")
        return self.lane

    def _drop_lane(self) -> None:
        """Close the lane after an error that is not the lane's: it may have stopped mid-message, so the
        next call connects afresh."""
        if self.lane is not None:
            self.lane.close()
            self.lane = None

    def _lane_failed(self, problem: object) -> None:
        wait = min(LANE_RETRY * 2**self.lane_failures, 3600.0)
        self.lane_failures += 1
        log.warning("data lane: %s; going on over gRPC, trying the lane again in %.0f s", problem, wait)
        self._drop_lane()
        self.lane_retry_at = time.monotonic() + wait

    # -- calls with retry: the server may restart under a running job
    def _retry(self, what: str, call: Any) -> Any:
        deadline = time.monotonic() + RETRY_FOR
        delay = 0.5
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise _translate(exc, what) from None
                if time.monotonic() > deadline:
                    raise TransferError(f"{what}: server unreachable for {RETRY_FOR:.0f} s ({exc.details()})") from None
                log.warning("%s: server unreachable (%s); retrying in %.1f s", what, exc.details(), delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def receive(self) -> FLModel | None:
        if self.task is not None:
            # The script moved on without answering: answer for it, so the server does not wait.
            log.warning("the training script did not answer %s; answering it with no result", self.task.task_id)
            self._answer(self.task, {}, 0.0, {})
        if self.next_train is not None:
            # Second half of a training task that brought an evaluation first: same model, no network.
            header, self.next_train = self.next_train, None
            return self._hand_out(header, header.task_id, header.kind, header.round)
        while self.running:
            header, payload = self._retry("receive", self._get_task)
            if header.kind == "idle":
                continue
            if header.kind == "end":
                self.running = False
                log.info("job over: %s", header.reason or "the server ended it")
                return None
            if header.kind == "release" and header.payload_sha256 not in self.decrypted:
                self.last_task_id = header.task_id
                log.warning("refusing to release %s: it is not a global model this site decrypted", header.task_id)
                continue
            arrays = self._decode(header, payload)
            self.last_task_id = header.task_id
            if header.kind == "release":
                log.info("releasing the decrypted %s model to the server (the job's release policy)", header.task_id)
                self._send(header, arrays, num_samples=0.0, metrics={}, plaintext=True)
                continue
            if header.payload_format == "ckks":
                self.decrypted.add(header.payload_sha256)
            if header.kind == "train" and header.evaluate_task_id:
                self.next_train = header
                return self._hand_out(header, header.evaluate_task_id, "evaluate", header.evaluate_round)
            return self._hand_out(header, header.task_id, header.kind, header.round)
        return None

    def _hand_out(self, header: fpb.TaskHeader, task_id: str, kind: str, round_no: int) -> FLModel:
        """The current model as the script's task.

        An evaluation whose training half follows gets a copy, so that the training half gets the model
        as received whatever the script did to the first. The last hand-out of a model gets the arrays
        themselves, and the worker forgets them: a server that sends the same model again sends it whole.
        """
        self.task = Pending(task_id=task_id, kind=kind, upload_slot=header.upload_slot and kind != "evaluate")
        arrays = self.cached_arrays
        if kind == "evaluate" and self.next_train is not None:
            params = {name: torch.from_numpy(array.copy()) for name, array in arrays.items()}
        else:
            self.cached_sha256, self.cached_arrays = b"", {}
            params = {
                name: torch.from_numpy(array if array.flags.writeable else array.copy())
                for name, array in arrays.items()
            }
        return FLModel(
            params=params,
            current_round=round_no,
            total_rounds=header.total_rounds,
            kind=kind,
            job_id=self.job_id,
        )

    def _get_task(self) -> tuple[fpb.TaskHeader, bytes]:
        request = fpb.TaskRequest(job_id=self.job_id, cached_sha256=self.cached_sha256, last_task_id=self.last_task_id)
        lane = self._lane()
        if lane is not None:
            try:
                task = self._assemble(lane.task(request))
                self.lane_failures = 0
                return task
            except (LaneError, OSError, ssl.SSLError) as exc:
                self._lane_failed(exc)
            except BaseException:
                self._drop_lane()
                raise
        return self._assemble(self.stub.GetTask(request))

    def _assemble(self, frames: Iterator[Any]) -> tuple[fpb.TaskHeader, bytes]:
        buffer = transfer.Chunks()
        assembler = transfer.Assembler(
            buffer, max_size=1 << 34, what="task", verify=lambda h: transfer.digest_checked(h.payload_format)
        )
        for frame in frames:
            assembler.feed(frame)
        header = assembler.finish()
        checked = assembler.sha256 is not None and header.payload_format and not header.payload_cached
        if checked and assembler.sha256 != header.payload_sha256:
            raise TransferError(f"task {header.task_id}: payload digest differs from the header")
        return header, buffer.getvalue()

    def _decode(self, header: fpb.TaskHeader, payload: bytes) -> dict[str, np.ndarray]:
        if not header.payload_format:
            return {}
        if header.payload_cached:
            if header.payload_sha256 != self.cached_sha256:
                raise TransferError("the server referred to a cached model this worker does not hold")
            return self.cached_arrays
        if header.payload_format == tensors.FORMAT:
            arrays = tensors.decode(payload, what=f"global model of {header.task_id}")
        elif header.payload_format == "ckks":
            if self.he is None:
                raise StateError("received an encrypted model but this job is not encrypted at this site")
            from fedgrid import he

            started = time.perf_counter()
            arrays = he.decrypt_mean(self.he, payload, what=f"global model of {header.task_id}")
            log.info(
                "decrypted the global model of %s (%.1f MB) in %.3f s",
                header.task_id,
                len(payload) / 1e6,
                time.perf_counter() - started,
            )
        else:
            raise TransferError(f"task {header.task_id}: unknown payload format {header.payload_format!r}")
        tensors.check_finite(arrays, f"global model of {header.task_id}")
        self.cached_sha256, self.cached_arrays = header.payload_sha256, arrays
        return arrays

    def send(self, params: Mapping[str, Any] | None, num_samples: float, metrics: Mapping[str, float]) -> None:
        if self.task is None:
            raise StateError("send() without a task: call receive() first")
        if self.task.kind == "evaluate" and self.next_train is not None:
            # The training half of the same task follows: its result carries this answer, one call less.
            self.held = fpb.Evaluation(task_id=self.task.task_id, num_samples=num_samples, metrics=_clean(metrics))
            self.task = None
            return
        arrays = _to_numpy(params) if params is not None else {}
        self._answer(self.task, arrays, num_samples, metrics)

    def flush_evaluation(self) -> None:
        """Send a held evaluation answer on its own (the script ended before it trained)."""
        if self.held is not None:
            held, self.held = self.held, None
            try:
                self._send(Pending(held.task_id, "evaluate"), {}, held.num_samples, dict(held.metrics), True)
            except FedgridError as exc:
                log.warning("the answer to %s was not delivered: %s", held.task_id, exc)

    def _answer(
        self, task: Pending, arrays: dict[str, np.ndarray], num_samples: float, metrics: Mapping[str, float]
    ) -> None:
        self.task = None
        self._send(task, arrays, num_samples, metrics, plaintext=False)

    def _send(
        self,
        task: Pending | fpb.TaskHeader,
        arrays: dict[str, np.ndarray],
        num_samples: float,
        metrics: Mapping[str, float],
        plaintext: bool,
    ) -> None:
        self.flush_events()
        clean = _clean(metrics)
        if arrays and self.encrypted and not plaintext:
            from fedgrid import he

            payload_format = "ckks"

            def pieces() -> Iterator[bytes]:
                # A generator, so that each ciphertext goes on the wire while the next is encrypted.
                started, size = time.perf_counter(), 0
                for piece in he.encrypt_update(self.he, arrays, weight=num_samples):
                    size += len(piece)
                    yield piece
                log.info(
                    "encrypted and sent the update of %s (%.1f MB) in %.3f s",
                    task.task_id,
                    size / 1e6,
                    time.perf_counter() - started,
                )
        elif arrays:
            payload_format = tensors.FORMAT
            encoded = tensors.encode(arrays)

            def pieces() -> Iterator[bytes]:
                yield encoded
        else:
            payload_format = ""

            def pieces() -> Iterator[bytes]:
                return iter(())

        header = fpb.ResultHeader(
            job_id=self.job_id,
            task_id=task.task_id,
            payload_format=payload_format,
            num_samples=num_samples,
            metrics=clean,
            evaluation=self.held,
        )
        self.held = None
        try:
            if task.upload_slot and payload_format:
                slot = fpb.UploadSlotRequest(job_id=self.job_id, task_id=task.task_id)
                while not self._retry("upload slot", lambda: self.stub.UploadSlot(slot)).granted:
                    log.info("waiting for an upload slot for %s", task.task_id)
            digest = transfer.digest_checked(payload_format)
            stream = lambda raw=False: transfer.frames(  # noqa: E731
                fpb.ResultFrame, header, pieces(), digest=digest, raw_data=raw
            )
            lane = self._lane()
            if lane is not None:
                try:
                    lane.submit(stream(True))
                    return
                except (LaneError, OSError, ssl.SSLError) as exc:
                    self._lane_failed(exc)
                except BaseException:
                    self._drop_lane()
                    raise
            self._retry("send", lambda: self.stub.SubmitResult(stream()))
        except StateError as exc:
            log.warning("the server did not take the result of %s: %s", task.task_id, exc)

    # -- tracking events (SummaryWriter)
    def add_event(self, event: fpb.Event) -> None:
        self.seq += 1
        event.seq = self.seq
        self.pending_events.append(event)
        if len(self.pending_events) >= 200:
            self.flush_events()

    def flush_events(self) -> None:
        while self.pending_events:
            batch, rest = self.pending_events[:500], self.pending_events[500:]
            try:
                request = fpb.EventBatch(job_id=self.job_id, events=batch)
                self._retry("events", lambda request=request: self.stub.SendEvents(request))
            except FedgridError as exc:
                log.warning("tracking events not delivered: %s", exc)
            self.pending_events = rest


def _translate(exc: grpc.RpcError, what: str) -> FedgridError:
    from fedgrid.grpc_errors import error_from_rpc

    return error_from_rpc(exc, f"{what}: ")


def _clean(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """The metrics that are numbers, as floats; the others are left out with a warning."""
    clean = {}
    for key, value in (metrics or {}).items():
        try:
            clean[str(key)] = float(value)
        except (TypeError, ValueError):
            log.warning("metric %r is not a number (%r); not sent", key, value)
    return clean


def _to_numpy(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state dict (torch tensors or numpy arrays) as contiguous numpy arrays on the CPU."""
    if isinstance(params, FLModel):
        params = params.params
    out = {}
    for name, value in params.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        out[str(name)] = np.ascontiguousarray(value)
    return out


_worker: _Worker | None = None


def init() -> None:
    """Connect this job worker to the server; call once, at the top of the training script."""
    global _worker
    if _worker is not None:
        return
    kit_path, job_id, job_dir = os.environ.get(ENV_KIT), os.environ.get(ENV_JOB_ID), os.environ.get(ENV_JOB_DIR)
    if not kit_path or not job_id or not job_dir:
        raise StateError(
            "fedclient.api.init(): not running inside a fedgrid job worker "
            f"({ENV_KIT}, {ENV_JOB_ID} and {ENV_JOB_DIR} are unset); submit the script as part of a job"
        )
    _worker = _Worker(load_kit(Path(kit_path), expect_type="client"), job_id, Path(job_dir))


def _current() -> _Worker:
    if _worker is None:
        raise StateError("call fedclient.api.init() first")
    return _worker


def is_running() -> bool:
    """True until the server has ended the job."""
    return _current().running


def receive() -> FLModel | None:
    """The next task's global model; blocks until the server has one; None once the job is over."""
    return _current().receive()


def send(
    model: Mapping[str, Any] | None = None, num_samples: float = 1.0, metrics: Mapping[str, float] | None = None
) -> None:
    """Answer the current task: the trained weights (a state dict) with the number of samples they
    were trained on (the weight in the average), and metrics; for an evaluation, metrics only."""
    _current().send(model, num_samples, metrics or {})


def get_site_name() -> str:
    return _current().kit.name


def get_job_id() -> str:
    return _current().job_id


def get_site_config() -> dict[str, Any]:
    """This site's local settings (`local/site.json`), e.g. `data_root`."""
    return settings_to_dict(_current().settings)


def get_job_config() -> dict[str, Any]:
    """The job's server configuration (rounds, encryption, ...), as submitted."""
    worker = _current()
    for app in sorted((worker.job_dir / "job").iterdir()):
        path = app / SERVER_CONFIG
        if path.is_file():
            return json.loads(path.read_text())
    return {}


class SummaryWriter:
    """Record metrics at the site; they travel to the server in batches and on to MLflow/TensorBoard.

    The site never connects to the tracking system itself.
    """

    def __init__(self) -> None:
        self._worker = _current()

    def add_scalar(self, tag: str, scalar_value: float, global_step: int = 0) -> None:
        self._worker.add_event(
            fpb.Event(
                kind="scalar", tag=str(tag), value=float(scalar_value), step=int(global_step), wall_time=time.time()
            )
        )

    def add_scalars(self, main_tag: str, tag_scalar_dict: Mapping[str, float], global_step: int = 0) -> None:
        for tag, value in tag_scalar_dict.items():
            self.add_scalar(f"{main_tag}/{tag}", value, global_step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._worker.add_event(
            fpb.Event(kind="params", params={str(k): str(v) for k, v in params.items()}, wall_time=time.time())
        )

    def log_text(self, text: str, tag: str = "text", global_step: int = 0) -> None:
        self._worker.add_event(
            fpb.Event(kind="text", tag=str(tag), text=str(text), step=int(global_step), wall_time=time.time())
        )

    def flush(self) -> None:
        self._worker.flush_events()


def _shutdown() -> None:
    """Called by the worker after the script returns: deliver the last tracking events."""
    if _worker is not None:
        _worker.flush_evaluation()
        _worker.flush_events()
        _worker._drop_lane()
        _worker.channel.close()


__all__ = [
    "FLModel",
    "SummaryWriter",
    "get_job_config",
    "get_job_id",
    "get_site_config",
    "get_site_name",
    "init",
    "is_running",
    "receive",
    "send",
]
