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

Strategies that need the site's help (the job's server.json names the strategy) take one line each:

```python
loss = loss_fn(model(x), y) + api.proximal_term(model, task)     # FedProx (zero under other strategies)
loss.backward(); api.scaffold_correction(model, task); optimizer.step()      # SCAFFOLD, every step
api.scaffold_update(model, task, lr=args.lr)                      # SCAFFOLD, after training, before send()
```
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedclient import strategy
from fedclient.job_session import FLModel, JobSession
from fedgrid.errors import StateError
from fedgrid.jobspec import SERVER_CONFIG
from fedgrid.kit import load_kit
from fedgrid.settings import settings_to_dict
from fedgrid.v1 import federation_pb2 as fpb

ENV_KIT = "FEDGRID_KIT"
ENV_JOB_ID = "FEDGRID_JOB_ID"
ENV_JOB_DIR = "FEDGRID_JOB_DIR"


_worker: JobSession | None = None
"""The session of this process: a deployed job worker runs one training script, one site."""
_thread = threading.local()
"""A session bound to the calling thread: the simulator runs many virtual sites in one process, each
site's script in a thread of its own (fedgrid/sim/host.py)."""


def bind_thread_session(session: JobSession | None) -> None:
    """Make `session` the current session of the calling thread (None unbinds it); for the simulator."""
    _thread.session = session


def init() -> None:
    """Connect this job worker to the server; call once, at the top of the training script."""
    global _worker
    if _worker is not None or getattr(_thread, "session", None) is not None:
        return
    kit_path, job_id, job_dir = os.environ.get(ENV_KIT), os.environ.get(ENV_JOB_ID), os.environ.get(ENV_JOB_DIR)
    if not kit_path or not job_id or not job_dir:
        raise StateError(
            "fedclient.api.init(): not running inside a fedgrid job worker "
            f"({ENV_KIT}, {ENV_JOB_ID} and {ENV_JOB_DIR} are unset); submit the script as part of a job"
        )
    _worker = JobSession.from_kit(load_kit(Path(kit_path), expect_type="client"), job_id, Path(job_dir))


def _current() -> JobSession:
    session = getattr(_thread, "session", None) or _worker
    if session is None:
        raise StateError("call fedclient.api.init() first")
    return session


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


def proximal_term(model: torch.nn.Module, task: FLModel) -> torch.Tensor:
    """FedProx: mu/2·||w − w_global||² over the model's trainable parameters, with mu from the server
    (task.settings["mu"]); add it to the loss. A zero tensor when the job is not FedProx."""
    return strategy.proximal_term(model, task.reference, task.settings.get("mu", 0.0))


def scaffold_correction(model: torch.nn.Module, task: FLModel) -> None:
    """SCAFFOLD: add c − c_i to each parameter's gradient; call after every backward(), before the step.
    Does nothing when the job is not SCAFFOLD."""
    if task.scaffold is not None:
        task.scaffold.correct(model)


def scaffold_update(
    model: torch.nn.Module | Mapping[str, Any], task: FLModel, lr: float, steps: int | None = None
) -> None:
    """SCAFFOLD: after training, compute this site's new control variate from the trained weights, the local
    learning rate `lr` and the steps taken (those corrected, unless `steps` is given); `send()` then carries
    it and the site keeps it in its job folder. Does nothing when the job is not SCAFFOLD."""
    if task.scaffold is not None:
        task.scaffold.update(model, lr, steps)


def get_site_name() -> str:
    return _current().site


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
        _worker.close()


__all__ = [
    "FLModel",
    "SummaryWriter",
    "get_job_config",
    "get_job_id",
    "get_site_config",
    "get_site_name",
    "init",
    "is_running",
    "proximal_term",
    "receive",
    "scaffold_correction",
    "scaffold_update",
    "send",
]
