"""The one retry policy: a call is repeated while its error is retryable, given up after its time, and
asynchronous calls are awaited on every attempt."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from fedgrid import retry

LOG = logging.getLogger("test")


def flaky(failures: int) -> tuple[list[int], object]:
    calls: list[int] = []

    def call() -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise ConnectionError("down")
        return "up"

    return calls, call


def test_a_retryable_error_is_retried_until_the_call_succeeds() -> None:
    calls, call = flaky(2)
    result = retry.call(
        call, what="t", retryable=lambda e: isinstance(e, ConnectionError), give_up_after=10, log=LOG, first=0.01
    )  # type: ignore[arg-type]
    assert result == "up" and len(calls) == 3


def test_another_error_is_raised_at_once_and_time_runs_out_with_the_last_error() -> None:
    calls, call = flaky(100)
    with pytest.raises(ConnectionError):
        retry.call(call, what="t", retryable=lambda e: False, give_up_after=10, log=LOG)  # type: ignore[arg-type]
    assert len(calls) == 1
    with pytest.raises(ConnectionError):
        retry.call(call, what="t", retryable=lambda e: True, give_up_after=0.2, log=LOG, first=0.05)  # type: ignore[arg-type]
    assert len(calls) > 2


def test_a_set_stop_event_ends_the_retries() -> None:
    calls, call = flaky(100)
    stop = threading.Event()
    stop.set()
    with pytest.raises(ConnectionError):
        retry.call(call, what="t", retryable=lambda e: True, give_up_after=None, log=LOG, stop_event=stop)  # type: ignore[arg-type]
    assert len(calls) == 1


def test_an_asynchronous_call_is_awaited_on_every_attempt() -> None:
    attempts: list[int] = []

    async def call() -> str:
        attempts.append(1)
        await asyncio.sleep(0)
        if len(attempts) < 3:
            raise ConnectionError("down")
        return "up"

    result = asyncio.run(
        retry.acall(lambda: call(), what="t", retryable=lambda e: True, give_up_after=10, log=LOG, first=0.01)
    )
    assert result == "up" and len(attempts) == 3


def test_backoff_grows_to_its_cap_and_starts_over_after_a_reset() -> None:
    backoff = retry.Backoff(first=0.5, cap=4.0)
    delays = [backoff.next() for _ in range(8)]
    assert 0.5 <= delays[0] <= 1.0
    assert all(d <= 4.0 for d in delays) and delays[-1] == 4.0
    backoff.reset()
    assert backoff.next() <= 1.0
