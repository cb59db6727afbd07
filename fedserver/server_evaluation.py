"""Evaluation of each new global model at the server, by an evaluator its operator installed.

The evaluator (fedserver/strategies/installed.py) gets the model's tensors and the server's own data_root
(local/server.json), never data from a job. It runs in a thread while the next round trains; its metrics
join the sites' in the round's record as server_<name>, so they reach metrics.csv, the plot and MLflow,
and a target_metric or key_metric may name them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from logging import Logger
from pathlib import Path
from typing import Any

import numpy as np

from fedgrid import tensors
from fedgrid.errors import StateError
from fedserver.model import Model

PREFIX = "server_"


class ServerEvaluator:
    def __init__(self, name: str, evaluate: Callable[..., Any], data_root: Path | None, log: Logger) -> None:
        self.name = name
        self.evaluate = evaluate
        self.data_root = data_root
        self.log = log

    def start(self, round_no: int, model: Model) -> asyncio.Future[dict[str, float]]:
        """Evaluate `model` (the global model of `round_no`) in a thread; the future holds its metrics."""
        return asyncio.ensure_future(asyncio.to_thread(self._run, round_no, model))

    def _run(self, round_no: int, model: Model) -> dict[str, float]:
        if model.payload_format != tensors.FORMAT:
            raise StateError(f"server evaluator {self.name}: the global model is encrypted")
        started = time.perf_counter()
        with model.open() as stream:
            params: dict[str, np.ndarray] = tensors.decode(stream.read(), what=f"global model of round {round_no}")
        try:
            metrics = self.evaluate(params, self.data_root)
        except Exception as exc:  # noqa: BLE001 - the operator's code: its failure fails the job, not the server
            raise StateError(
                f"server evaluator {self.name} failed on round {round_no}: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(metrics, Mapping):
            raise StateError(f"server evaluator {self.name} returned {type(metrics).__name__}, not a dict of metrics")
        clean = {}
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise StateError(f"server evaluator {self.name}: metric {key!r} is {value!r}, not a finite number")
            clean[PREFIX + str(key)] = float(value)
        self.log.info(
            "round %d: global model evaluated at the server in %.3f s: %s",
            round_no,
            time.perf_counter() - started,
            ", ".join(f"{k}={v:.4f}" for k, v in clean.items()) or "no metrics",
        )
        return clean
