"""What a job worker holds for its job: the stream to the server, the task in hand, the model it received.

`fedclient.api` is the training script's view; this is the machinery behind it:
- a training task that brings an evaluation is handed out twice, first as the evaluation (a copy of
  the model, so the script may change it), then as the training (the arrays as received);
- the evaluation's answer is held and rides on the training result, one request less per round;
- with encryption on, a received model is decrypted and an update is encrypted (scaled by its sample
  count) while it streams out; only global models this worker decrypted itself may be released; when
  the project's sites make the HE keys, the job's key is made or received when the worker starts
  (fedclient/job_key.py);
- with differential privacy, an update is clipped (and under distributed DP noised) before it leaves
  (fedclient/privacy.py); under SecAgg+ it leaves masked, within the protocol's steps
  (fedclient/secure_aggregation.py); both count each site once (weight 1);
- tracking events are batched and travel on the same stream;
- a strategy's own tensors in a task (SCAFFOLD's control variate) are split from the model's, and what a
  strategy staged for the result (fedclient/strategy.py) goes with the update.

One module, over 400 lines, because each of these acts on the same task in hand and the model it brought:
the pieces (HE, DP, SecAgg+, strategies, the stream) already live in modules of their own, and what stays
here is the sequence that ties them to one task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fedclient import job_key
from fedclient.privacy import private_update
from fedclient.secure_aggregation import FORMAT as MASKED
from fedclient.secure_aggregation import SecureRound
from fedclient.strategy import ScaffoldRound, server_control, split_reserved
from fedgrid import tensors
from fedgrid.errors import FedgridError, PrivacyError, StateError, TransferError
from fedgrid.jobspec import load_job
from fedgrid.kit import Kit
from fedgrid.settings import SITE_SETTINGS_FILE, SiteSettings, load_settings
from fedgrid.strategy_config import SCAFFOLD_PREFIX
from fedgrid.transfer import CKKS_FORMAT
from fedgrid.v1 import federation_pb2 as fpb

log = logging.getLogger("fedclient.api")

EVENT_BATCH = 200
"""Tracking events buffered before they are sent (they also go with every result)."""


@dataclass
class FLModel:
    """A task from the server: the global model's tensors and where the job stands."""

    params: dict[str, torch.Tensor]
    current_round: int
    total_rounds: int
    kind: str
    job_id: str
    meta: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, float] = field(default_factory=dict)
    """The strategy's settings for this task, e.g. FedProx's "mu"."""
    reference: dict[str, torch.Tensor] | None = None
    """Training under FedProx or SCAFFOLD: a copy of the global model as received (for the proximal term)."""
    scaffold: ScaffoldRound | None = None
    """Training under SCAFFOLD: the control variates of this task (api.scaffold_correction / scaffold_update)."""

    @property
    def is_train(self) -> bool:
        return self.kind == "train"

    @property
    def is_evaluate(self) -> bool:
        return self.kind == "evaluate"


class Stream(Protocol):
    """A job worker's requests to the server: `fedclient.work_stream.WorkStream` over gRPC in deployment, the
    simulator's stream (fedgrid/sim/host.py) over its in-process link; the same Work messages either way."""

    def task(self, request: fpb.TaskRequest) -> tuple[fpb.TaskHeader, bytes | memoryview]: ...

    def upload_slot(self, task_id: str) -> None: ...

    def result(self, header: fpb.ResultHeader, pieces: Callable[[], Iterable[bytes | memoryview]] = tuple) -> str: ...

    def events(self, batch: fpb.EventBatch) -> str: ...

    def privacy(self, request: fpb.PrivacyRequest, what: str) -> fpb.PrivacyReply: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Pending:
    """The task the script holds: what its send() answers."""

    task_id: str
    kind: str
    upload_slot: bool = False


class JobSession:
    """The connection of one job worker to the server: made once by `fedclient.api.init()` from the site's kit
    (`from_kit`), or by the simulator for each virtual site with its own stream."""

    def __init__(
        self,
        *,
        site: str,
        job_id: str,
        job_dir: Path,
        settings: SiteSettings,
        stream: Stream,
        he_context: bytes | None,
        kit: Kit | None = None,
    ) -> None:
        """`job_dir` holds the job folder (job_dir/job) and what the site keeps for the job (SCAFFOLD's
        variate); `he_context` is a CKKS context with its secret key (a provisioned one, or the simulator's),
        else an encrypted job's key is made or received at its start through `kit` (he.keys: sites); `kit` is
        the deployed site's (None for a virtual site), whose certificate signs its SecAgg+ keys."""
        self.site = site
        self.job_id = job_id
        self.job_dir = job_dir
        self.settings = settings
        spec = load_job(job_dir / "job")
        self.encrypted = spec.server.encryption == "ckks"
        self.strategy = spec.server.strategy.name
        self.stream = stream
        self.kit = kit
        self.he = None
        if self.encrypted:
            from fedgrid import he

            if he_context is not None:
                self.he = he.HEContext.load(he_context, expect_secret_key=True)
            elif kit is not None and kit.he.enabled:
                self.he = job_key.obtain(self.stream, kit, job_id, spec)
            else:
                raise StateError("this job is encrypted but this site's kit has no HE; re-provision with HE")
        self.privacy = spec.server.privacy
        self.secagg = spec.server.secagg if spec.server.secure_aggregation != "none" else None
        if self.secagg is not None and kit is None:
            raise StateError(
                "SecAgg+ signs each site's keys with its certificate; a site without a kit cannot take part"
            )
        self.reference: dict[str, np.ndarray] | None = None
        """Private or SecAgg+ jobs: the tensors the training task in hand brought, which the update is
        measured against."""
        self.task_settings: dict[str, float] = {}
        self.running = True
        self.task: Pending | None = None
        self.next_train: fpb.TaskHeader | None = None
        self.last_task_id = ""
        self.cached_sha256 = b""
        self.cached_arrays: dict[str, np.ndarray] = {}
        self.cached_extra: dict[str, np.ndarray] = {}
        """A strategy's tensors that came with the cached model (SCAFFOLD's), by model tensor name."""
        self.scaffold: ScaffoldRound | None = None
        """The SCAFFOLD state of the training task in hand."""
        self.decrypted: set[bytes] = set()
        """Digests of the global models this worker decrypted as tasks: the only ones it may release."""
        self.held: fpb.Evaluation | None = None
        """The answer to an evaluation that rides on a training task: it goes with the training result."""
        self.seq = 0
        self.pending_events: list[fpb.Event] = []

    @classmethod
    def from_kit(cls, kit: Kit, job_id: str, job_dir: Path) -> JobSession:
        """A deployed job worker's session: the site's settings and HE context (a provisioned one, or none
        when the job's key is made at the sites) from its kit, a gRPC Work stream."""
        from fedclient.work_stream import WorkStream

        context = kit.he.context_path if kit.he.enabled else None
        stream = WorkStream(kit, job_id)
        try:
            return cls(
                site=kit.name,
                job_id=job_id,
                job_dir=job_dir,
                settings=load_settings(SiteSettings, kit.local_dir / SITE_SETTINGS_FILE),
                stream=stream,
                he_context=context.read_bytes() if context is not None else None,
                kit=kit,
            )
        except BaseException:
            stream.close()
            raise

    # ------------------------------------------------------------------ tasks

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
            request = fpb.TaskRequest(
                job_id=self.job_id, cached_sha256=self.cached_sha256, last_task_id=self.last_task_id
            )
            header, payload = self.stream.task(request)
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
                self._send(Pending(header.task_id, "release", header.upload_slot), arrays, 0.0, {}, plaintext=True)
                continue
            if header.payload_format == CKKS_FORMAT:
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
        arrays, extra = self.cached_arrays, self.cached_extra
        if kind == "evaluate" and self.next_train is not None:
            params = {name: torch.from_numpy(array.copy()) for name, array in arrays.items()}
        else:
            self.cached_sha256, self.cached_arrays, self.cached_extra = b"", {}, {}
            params = {
                name: torch.from_numpy(array if array.flags.writeable else array.copy())
                for name, array in arrays.items()
            }
        task = FLModel(
            params=params,
            current_round=round_no,
            total_rounds=header.total_rounds,
            kind=kind,
            job_id=self.job_id,
            settings=dict(header.settings) if kind == "train" else {},
        )
        self.scaffold = None
        if kind == "train" and (self.privacy is not None or self.secagg is not None):
            self.reference = {name: array.copy() for name, array in arrays.items()}
            self.reference.update({SCAFFOLD_PREFIX + name: array.copy() for name, array in extra.items()})
            self.task_settings = dict(header.settings)
        if kind == "train" and self.strategy in ("fedprox", "scaffold"):
            task.reference = {name: torch.from_numpy(array.copy()) for name, array in arrays.items()}
        if kind == "train" and self.strategy == "scaffold":
            control = server_control(extra, header.payload_format, header.total_weight, task.settings)
            reference = {name: arrays[name] for name in control}
            task.scaffold = self.scaffold = ScaffoldRound(self.job_dir, control, reference, task.settings)
        return task

    def _decode(self, header: fpb.TaskHeader, payload: bytes | memoryview) -> dict[str, np.ndarray]:
        if not header.payload_format:
            return {}
        if header.payload_cached:
            if header.payload_sha256 != self.cached_sha256:
                raise TransferError("the server referred to a cached model this worker does not hold")
            return self.cached_arrays
        if header.payload_format == tensors.FORMAT:
            arrays = tensors.decode(payload, what=f"global model of {header.task_id}")
        elif header.payload_format == CKKS_FORMAT:
            if self.he is None:
                raise StateError("received an encrypted model but this job is not encrypted at this site")
            from fedgrid import he

            started = time.perf_counter()
            what = f"global model of {header.task_id}"
            arrays = he.decrypt_mean(self.he, payload, what=what, digest=header.payload_sha256)
            log.info(
                "decrypted the global model of %s (%.1f MB) in %.3f s",
                header.task_id,
                len(payload) / 1e6,
                time.perf_counter() - started,
            )
        else:
            raise TransferError(f"task {header.task_id}: unknown payload format {header.payload_format!r}")
        tensors.check_finite(arrays, f"global model of {header.task_id}")
        arrays, extra = split_reserved(arrays)
        self.cached_sha256, self.cached_arrays, self.cached_extra = header.payload_sha256, arrays, extra
        return arrays

    # ------------------------------------------------------------------ results

    def send(self, params: Mapping[str, Any] | None, num_samples: float, metrics: Mapping[str, float]) -> None:
        if self.task is None:
            raise StateError("send() without a task: call receive() first")
        if self.task.kind == "evaluate" and self.next_train is not None:
            # The training half of the same task follows: its result carries this answer, one request less.
            self.held = fpb.Evaluation(task_id=self.task.task_id, num_samples=num_samples, metrics=_clean(metrics))
            self.task = None
            return
        arrays = to_numpy(params) if params is not None else {}
        scaffold, self.scaffold = self.scaffold, None
        weight = num_samples
        if arrays and self.task.kind == "train" and self.reference is not None:
            weight = 1.0  # a private or SecAgg+ mean counts each site once
        if scaffold is not None and arrays:
            arrays.update(scaffold.result_tensors(weight))
        if arrays and self.task.kind == "train" and self.privacy is not None and self.secagg is None:
            assert self.reference is not None
            arrays = private_update(arrays, self.reference, self.privacy, self.task_settings)
        if self._answer(self.task, arrays, weight, metrics) and scaffold is not None:
            scaffold.commit()

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
    ) -> bool:
        self.task = None
        return self._send(task, arrays, num_samples, metrics, plaintext=False)

    def _send(
        self,
        task: Pending,
        arrays: dict[str, np.ndarray],
        num_samples: float,
        metrics: Mapping[str, float],
        plaintext: bool,
    ) -> bool:
        """True when the server took the result into its round (not a late one it dropped)."""
        self.flush_events()
        secure = None
        if arrays and self.secagg is not None and not plaintext and task.kind == "train":
            secure = SecureRound(self.stream, self.kit, self.job_id, task.task_id, self.secagg)
            try:
                assert self.reference is not None
                masked = secure.masked(arrays, self.reference, self.privacy, self.task_settings)
            except (PrivacyError, StateError) as exc:
                log.warning("secagg: %s: this site's update is left out of the round: %s", task.task_id, exc)
                secure, arrays = None, {}
        if secure is not None:
            payload_format = MASKED
            pieces = lambda: (masked,)  # noqa: E731
        elif arrays and self.encrypted and not plaintext:
            payload_format = CKKS_FORMAT
            pieces = lambda: self._encrypted(task.task_id, arrays, num_samples)  # noqa: E731
        elif arrays:
            payload_format = tensors.FORMAT
            encoded = tensors.encode(arrays)
            pieces = lambda: (encoded,)  # noqa: E731
        else:
            payload_format = ""
            pieces = lambda: ()  # noqa: E731
        header = fpb.ResultHeader(
            job_id=self.job_id,
            task_id=task.task_id,
            payload_format=payload_format,
            num_samples=num_samples,
            metrics=_clean(metrics),
            evaluation=self.held,
        )
        self.held = None
        try:
            if task.upload_slot and payload_format:
                self.stream.upload_slot(task.task_id)
            reply = self.stream.result(header, pieces)
        except StateError as exc:
            log.warning("the server did not take the result of %s: %s", task.task_id, exc)
            return False
        if reply != "accepted":
            log.warning("the server did not take the result of %s: %s", task.task_id, reply)
        elif secure is not None:
            try:
                secure.unmask()
            except (PrivacyError, StateError) as exc:
                log.warning("secagg: %s: no unmasking shares sent: %s", task.task_id, exc)
        return reply == "accepted"

    def _encrypted(self, task_id: str, arrays: dict[str, np.ndarray], weight: float) -> Iterator[bytes]:
        """The encrypted update, piece by piece, so that each ciphertext goes out while the next is made."""
        from fedgrid import he

        started, size = time.perf_counter(), 0
        for piece in he.encrypt_update(self.he, arrays, weight=weight):
            size += len(piece)
            yield piece
        log.info(
            "encrypted and sent the update of %s (%.1f MB) in %.3f s",
            task_id,
            size / 1e6,
            time.perf_counter() - started,
        )

    # ------------------------------------------------------------------ tracking events

    def add_event(self, event: fpb.Event) -> None:
        self.seq += 1
        event.seq = self.seq
        self.pending_events.append(event)
        if len(self.pending_events) >= EVENT_BATCH:
            self.flush_events()

    def flush_events(self) -> None:
        while self.pending_events:
            batch, rest = self.pending_events[:500], self.pending_events[500:]
            try:
                self.stream.events(fpb.EventBatch(job_id=self.job_id, events=batch))
            except FedgridError as exc:
                log.warning("tracking events not delivered: %s", exc)
            self.pending_events = rest

    def close(self) -> None:
        """At the script's end: deliver what is held, then end the stream."""
        self.flush_evaluation()
        self.flush_events()
        self.stream.close()


def _clean(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """The metrics that are numbers, as floats; the others are left out with a warning."""
    clean = {}
    for key, value in (metrics or {}).items():
        try:
            clean[str(key)] = float(value)
        except (TypeError, ValueError):
            log.warning("metric %r is not a number (%r); not sent", key, value)
    return clean


def to_numpy(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state dict (torch tensors or numpy arrays) as contiguous numpy arrays on the CPU."""
    if isinstance(params, FLModel):
        params = params.params
    out = {}
    for name, value in params.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        out[str(name)] = np.ascontiguousarray(value)
    return out
