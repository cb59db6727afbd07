"""A job's checkpoint: everything its rounds need to go on after the server restarts.

After each round's aggregate the round loop writes, while the next round runs:

    checkpoint/global_model.safetensors | .ckks   the new global model
    checkpoint/strategy.safetensors               the strategy's tensors (FedOpt's m and v, SCAFFOLD's c)
    checkpoint/best_model.ckks                    encrypted jobs: the best model so far (plaintext ones keep
                                                  it in result/best_model.safetensors)
    checkpoint/state.json                         the round, the attempt, the strategy's values, the random
                                                  state that samples sites, the best round, the round's
                                                  own figures (its record waits for its evaluation), and
                                                  a private job's noise multipliers so far

A checkpoint is a folder written whole under another name and then swapped in (`checkpoint.old` holds
the previous one for the instant between the two renames), so a crash at any moment leaves one complete
checkpoint, never a model of one round beside the state of another. Round records and metrics so far are
in the job store; tracking events in the tracking journal, which resumes delivery by itself.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgrid import tensors
from fedgrid.files import sync_folder, write_json_atomic
from fedgrid.tensor_file import copy_file
from fedgrid.transfer import CKKS_FORMAT
from fedserver.model import MEMORY_LIMIT, Model
from fedserver.strategies import StrategyState

STATE = "state.json"
OLD = ".old"
NEW = ".new"


@dataclass(frozen=True)
class RoundFigures:
    """What a round's record needs besides its evaluation: kept until the evaluation comes back."""

    seconds: float
    asked: int
    answered: int
    moved: int


@dataclass(frozen=True)
class Checkpoint:
    """One round's checkpoint, as written or as read back to resume."""

    round: int
    attempt: int
    model: Model
    figures: RoundFigures
    strategy: StrategyState = field(default_factory=StrategyState)
    rng_state: Any = None
    best_round: int = 0
    best_value: float | None = None
    best: Model | None = None
    """Encrypted jobs only: the best model so far, kept here since the server cannot write it out."""
    privacy: list[float] = field(default_factory=list)
    """Private jobs: the noise multiplier each round so far carried (the privacy ledger, fedserver/privacy.py)."""


def suffix(model: Model) -> str:
    return "safetensors" if model.payload_format == tensors.FORMAT else "ckks"


def write(folder: Path, point: Checkpoint, strategy_name: str) -> None:
    """Write `point` as the job's checkpoint folder `folder`, whole or not at all."""
    staged = folder.with_name(folder.name + NEW)
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    point.model.save(staged / f"global_model.{suffix(point.model)}")
    if point.strategy.tensors:
        tensors.save_file(dict(point.strategy.tensors), staged / "strategy.safetensors")
    if point.best is not None:
        previous = folder / "best_model.ckks"
        if point.best.path == previous and previous.exists():
            os.link(previous, staged / "best_model.ckks")  # unchanged since the last checkpoint: no copy
        else:
            point.best.save(staged / "best_model.ckks")
    state = {
        "round": point.round,
        "attempt": point.attempt,
        "payload_format": point.model.payload_format,
        "total_weight": point.model.total_weight,
        "figures": point.figures.__dict__,
        "rng": point.rng_state,
        "best_round": point.best_round,
        "best_value": point.best_value,
        "strategy": {"name": strategy_name, **point.strategy.values},
        "privacy": point.privacy,
    }
    write_json_atomic(staged / STATE, state)
    old = folder.with_name(folder.name + OLD)
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    staged.rename(folder)
    sync_folder(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def read(folder: Path, model_dir: Path) -> Checkpoint | None:
    """The job's last complete checkpoint, or None when no round finished before the server stopped. A
    large global model is copied to `model_dir`, where the round loop keeps its models (the checkpoint
    folder is replaced after the next round)."""
    for candidate in (folder, folder.with_name(folder.name + OLD)):
        state_file = candidate / STATE
        if state_file.is_file():
            return _load(candidate, json.loads(state_file.read_text()), model_dir)
    return None


def _load(folder: Path, state: dict[str, Any], model_dir: Path) -> Checkpoint:
    kind = "safetensors" if state["payload_format"] == tensors.FORMAT else "ckks"
    model_file = folder / f"global_model.{kind}"
    if model_file.stat().st_size > MEMORY_LIMIT:
        model_dir.mkdir(parents=True, exist_ok=True)
        copy_file(model_file, model_dir / f"round-{state['round']}.{kind}")
        model_file = model_dir / f"round-{state['round']}.{kind}"
    strategy_values = {k: v for k, v in state.get("strategy", {}).items() if k != "name"}
    strategy_file = folder / "strategy.safetensors"
    strategy_tensors = tensors.load_file(strategy_file) if strategy_file.exists() else {}
    best_file = folder / "best_model.ckks"
    rng = state.get("rng")
    return Checkpoint(
        round=state["round"],
        attempt=state.get("attempt", 0),
        model=_model(state["payload_format"], model_file, state.get("total_weight", 0.0)),
        figures=RoundFigures(**state["figures"]),
        strategy=StrategyState(values=strategy_values, tensors=strategy_tensors),
        rng_state=(rng[0], tuple(rng[1]), rng[2]) if rng else None,
        best_round=state.get("best_round", 0),
        best_value=state.get("best_value"),
        best=_model(CKKS_FORMAT, best_file, 0.0) if best_file.exists() else None,
        privacy=[float(z) for z in state.get("privacy", [])],
    )


def _model(payload_format: str, path: Path, total_weight: float) -> Model:
    """A checkpointed model, in memory when small (as the round loop keeps it), else used from its file."""
    if path.stat().st_size <= MEMORY_LIMIT:
        return Model.in_memory(payload_format, path.read_bytes(), total_weight)
    return Model.on_disk(payload_format, path, total_weight)
