"""Strategies and evaluators that the server's operator installed as Python modules.

A job names one as `module:<module>`; the server imports it from its own installed packages only. A job's
upload is never on the import path, and a module whose file lies inside the server's job store is refused
all the same, so code that arrived with a job never runs on the server.

    strategy module   defines `strategy(params: dict) -> fedserver.strategies.Strategy`; `params` are the
                      job's other keys of "strategy"; it raises ValueError or TypeError for bad ones
    evaluator module  defines `evaluate(params: dict[str, numpy.ndarray], data_root: Path | None)
                      -> Mapping[str, float]`: metrics of a global model on the operator's own data
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from fedgrid.errors import JobSpecError


def import_installed(name: str, what: str, where: str, forbidden: Path | None) -> ModuleType:
    """Import module `name` from the server's installed packages; JobSpecError (naming `where`) if it is not
    installed, does not import, or lies under `forbidden` (the job store)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        spec, problem = None, str(exc)
    else:
        problem = ""
    if spec is None:
        raise JobSpecError(
            f"{where}: {what} module:{name} is not installed on the server{f' ({problem})' if problem else ''}; "
            "its operator installs it (pip install) and restarts the server, or the job names a built-in one"
        )
    origin = Path(spec.origin).resolve() if spec.origin else None
    if forbidden is not None and origin is not None and origin.is_relative_to(forbidden.resolve()):
        raise JobSpecError(f"{where}: {what} module:{name} lies in the server's job store; only installed modules run")
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - an operator's module failing to import is a refusal, not a crash
        raise JobSpecError(f"{where}: {what} module:{name} does not import: {type(exc).__name__}: {exc}") from None


def installed_strategy(name: str, params: dict[str, Any], where: str, forbidden: Path | None) -> Any:
    """The Strategy that module `name` builds from `params`; JobSpecError when it is none."""
    from fedserver.strategies.base import Strategy

    module = import_installed(name, "strategy", where, forbidden)
    factory = getattr(module, "strategy", None)
    if not callable(factory):
        raise JobSpecError(
            f"{where}: module:{name} is not a strategy: it defines no function strategy(params) returning "
            "a fedserver.strategies.Strategy"
        )
    try:
        strategy = factory(dict(params))
    except (ValueError, TypeError) as exc:
        raise JobSpecError(f"{where}: strategy module:{name} refused its parameters: {exc}") from None
    if not isinstance(strategy, Strategy):
        raise JobSpecError(
            f"{where}: module:{name} is not a strategy: strategy(params) returned {type(strategy).__name__}, "
            "not a fedserver.strategies.Strategy"
        )
    return strategy


def installed_evaluator(name: str, where: str, forbidden: Path | None) -> Any:
    """The `evaluate` function of evaluator module `name`; JobSpecError when it has none."""
    module = import_installed(name, "evaluator", where, forbidden)
    evaluate = getattr(module, "evaluate", None)
    if not callable(evaluate):
        raise JobSpecError(
            f"{where}: module:{name} is not an evaluator: it defines no function evaluate(params, data_root)"
        )
    return evaluate
