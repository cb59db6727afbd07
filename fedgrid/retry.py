"""The one retry policy of fedgrid, on tenacity: exponential backoff with jitter, a cap, and a give-up time.

Two shapes cover every caller:
- `call` / `acall` retry one call while it fails with an error `retryable` accepts (a server that is
  restarting), logging each wait, and raise the last error once `give_up_after` seconds have passed;
- `Backoff` gives the delays of a loop that must keep going until it succeeds or is stopped (a site
  daemon reconnecting, a tracking courier waiting for MLflow), reset after each success.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import tenacity

T = TypeVar("T")

FIRST = 0.5
"""Seconds of the first wait; each later one doubles, with up to as much again of random jitter."""
CAP = 10.0


def _wait(first: float, cap: float) -> tenacity.wait.wait_base:
    return tenacity.wait_exponential_jitter(multiplier=first, max=cap, jitter=first)


def _stop(give_up_after: float | None, stop_event: threading.Event | None) -> tenacity.stop.stop_base:
    stop: tenacity.stop.stop_base = tenacity.stop_never
    if give_up_after is not None:
        stop = tenacity.stop_after_delay(give_up_after)
    if stop_event is not None:
        stop = stop | (lambda _state: stop_event.is_set())
    return stop


def _before_sleep(what: str, log: logging.Logger) -> Callable[[tenacity.RetryCallState], None]:
    def note(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning("%s: %s; retrying in %.1f s", what, _describe(error), delay)

    return note


def _describe(error: BaseException | None) -> str:
    details = getattr(error, "details", None)
    if callable(details):
        try:
            return str(details())
        except Exception:  # noqa: BLE001 - only for a log line
            pass
    return str(error)


def call(
    fn: Callable[[], T],
    *,
    what: str,
    retryable: Callable[[BaseException], bool],
    give_up_after: float | None,
    log: logging.Logger,
    first: float = FIRST,
    cap: float = CAP,
    stop_event: threading.Event | None = None,
) -> T:
    """`fn()`, retried while it raises an error `retryable` accepts; the last error once time is up."""
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(retryable),
        wait=_wait(first, cap),
        stop=_stop(give_up_after, stop_event),
        sleep=stop_event.wait if stop_event is not None else tenacity.nap.sleep,
        before_sleep=_before_sleep(what, log),
        reraise=True,
    )
    return retrying(fn)


async def acall(
    fn: Callable[[], Awaitable[T]],
    *,
    what: str,
    retryable: Callable[[BaseException], bool],
    give_up_after: float | None,
    log: logging.Logger,
    first: float = FIRST,
    cap: float = CAP,
) -> T:
    """The asyncio form of `call`: waits without blocking the event loop."""
    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(retryable),
        wait=_wait(first, cap),
        stop=_stop(give_up_after, None),
        before_sleep=_before_sleep(what, log),
        reraise=True,
    )

    async def attempt() -> T:
        # tenacity awaits only coroutine functions; `fn` may be a lambda that returns an awaitable
        return await fn()

    return await retrying(attempt)


class Backoff:
    """Delays for a loop that retries until it succeeds: `next()` after a failure, `reset()` after a success."""

    def __init__(self, first: float = FIRST, cap: float = CAP) -> None:
        self._wait = _wait(first, cap)
        self._state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        self._state.attempt_number = 0

    def next(self) -> float:
        self._state.attempt_number += 1
        return float(self._wait(self._state))

    def reset(self) -> None:
        self._state.attempt_number = 0
