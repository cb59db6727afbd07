"""The seam between a job's controller and the transport: tasks out, results in.

The controller asks a set of sites to do a task and reads their results as they arrive; it never
sees gRPC. `TaskBoard` is the gRPC-facing implementation: each site's job worker waits on a long poll
(`next_task`) that is answered the moment a task for it exists, and uploads its result
(`deliver`), which is queued for the controller. A result for a task that is no longer current
(a straggler's late update) is dropped and logged, never folded into a later round.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fedgrid import tensors
from fedgrid.errors import PayloadError
from fedgrid.tensor_file import ArraySource, TensorFile, TensorSource
from fedserver.model import Model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    task_id: str
    kind: str
    """"train", "evaluate", "release" (HE: upload the decrypted model) or "end"."""
    round: int
    total_rounds: int
    model: Model | None = None
    """The global model the task brings (None for an end task)."""
    evaluate_task_id: str = ""
    """Set on a training task whose sites first evaluate the model it brings, answering this task id."""
    evaluate_round: int = 0
    settings: Mapping[str, float] = field(default_factory=dict)
    """The strategy's settings for this task (e.g. FedProx's mu), sent in TaskHeader.settings."""


END = Task(task_id="end", kind="end", round=0, total_rounds=0)


@dataclass
class Result:
    site: str
    task_id: str
    num_samples: float
    metrics: dict[str, float]
    payload_format: str
    path: Path | None
    """The received payload when it was spooled to a file in the job folder."""
    size: int = 0
    received: float = field(default_factory=time.time)
    data: bytes | None = None
    """The received payload when it was small enough to stay in memory."""
    on_discard: Callable[[], None] | None = None
    """Releases the payload when the result is dropped (its spool file or its share of the memory budget)."""

    @property
    def has_payload(self) -> bool:
        return self.path is not None or self.data is not None

    def open(self) -> BinaryIO:
        """The payload as a readable binary stream, wherever it is."""
        if self.data is not None:
            return io.BytesIO(self.data)
        if self.path is None:
            raise ValueError(f"result of {self.task_id} from {self.site} has no payload")
        return open(self.path, "rb")

    def read(self) -> bytes:
        with self.open() as stream:
            return stream.read()

    def source(self, what: str) -> TensorSource:
        """A plaintext payload's tensors, read block by block from wherever the payload is."""
        if self.data is not None:
            return ArraySource(tensors.decode(self.data, what=what))
        if self.path is None:
            raise PayloadError(f"{what}: no payload")
        return TensorFile(self.path, what)

    def discard(self) -> None:
        """Drop the payload: `on_discard` releases it (a spool file goes back to the server's pool, memory
        to its budget); without one, its file is deleted."""
        self.data = None
        if self.on_discard is not None:
            self.on_discard()
            self.on_discard = None
        elif self.path is not None:
            self.path.unlink(missing_ok=True)
        self.path = None


@dataclass(frozen=True)
class SiteGone:
    """A site stopped taking part in the job (its worker failed or ended, or it went silent)."""

    site: str
    reason: str


class TaskBoard:
    """Tasks waiting for each site's worker, and results waiting for the controller."""

    def __init__(self, job_id: str, sites: list[str]) -> None:
        self.job_id = job_id
        self.members: set[str] = set(sites)
        self.gone: dict[str, str] = {}
        self._tasks: dict[str, Task] = {}
        self._pending: dict[str, set[str]] = {}
        """task_id -> sites asked that have not answered yet."""
        self._changed = asyncio.Condition()
        self._inbox: asyncio.Queue[Result | SiteGone] = asyncio.Queue()
        self.closed = False
        self.ready: set[str] = set()
        """Sites whose worker has asked for work at least once (it imported torch and loaded its data)."""
        self._ready_changed = asyncio.Event()
        self._polling: dict[str, int] = {}
        """Sites whose worker waits for its next task right now (site -> requests waiting)."""

    def mark_ready(self, site: str) -> None:
        if site not in self.ready:
            self.ready.add(site)
            self._ready_changed.set()

    async def wait_ready(self, timeout: float) -> list[str]:
        """Wait until every active site's worker asked for work; returns the sites still not ready."""
        deadline = time.monotonic() + timeout
        while True:
            missing = [s for s in self.active_sites() if s not in self.ready]
            remaining = deadline - time.monotonic()
            if not missing or remaining <= 0:
                return missing
            self._ready_changed.clear()
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation that arrives as
                # the event is set (a site failing is both), and the job would wait out the timeout.
                async with asyncio.timeout(remaining):
                    await self._ready_changed.wait()
            except TimeoutError:
                pass

    def active_sites(self) -> list[str]:
        return sorted(self.members - set(self.gone))

    def expect(self, task_id: str, sites: list[str]) -> None:
        """Accept results for `task_id` from `sites` too (those that got it riding on another task)."""
        self._pending.setdefault(task_id, set()).update(set(sites) - set(self.gone))

    async def ask(self, task: Task, sites: list[str]) -> None:
        """Make `task` the current task of each site in `sites` and wake their workers."""
        async with self._changed:
            for site in sites:
                self._tasks[site] = task
            self._pending.setdefault(task.task_id, set()).update(set(sites) - set(self.gone))
            self._changed.notify_all()

    async def next_task(self, site: str, last_task_id: str, timeout: float) -> Task | None:
        """The site's current task once it differs from `last_task_id`; None after `timeout` seconds."""
        async with self._changed:
            self._polling[site] = self._polling.get(site, 0) + 1
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(
                        lambda: self.closed or (site in self._tasks and self._tasks[site].task_id != last_task_id)
                    ),
                    timeout,
                )
            except TimeoutError:
                return None
            finally:
                self._polling[site] -= 1
            if self.closed:
                return END
            return self._tasks[site]

    def accepts(self, site: str, task_id: str) -> bool:
        """True when `site` was asked for `task_id` and has not answered it yet."""
        return site in self._pending.get(task_id, ())

    def deliver(self, result: Result) -> bool:
        """Queue a result for the controller; False (and the caller drops it) when it is not wanted."""
        pending = self._pending.get(result.task_id)
        if pending is None or result.site not in pending:
            return False
        pending.discard(result.site)
        self._inbox.put_nowait(result)
        return True

    def polling(self, site: str) -> bool:
        """True while the site's worker waits for its next task."""
        return self._polling.get(site, 0) > 0

    def rejoin(self, site: str) -> None:
        """Take a site that left back: it is active again, asked from the next task on. Nothing it was
        asked before it left is awaited or accepted from it any more."""
        if site in self.gone:
            del self.gone[site]
            self._tasks.pop(site, None)

    def site_gone(self, site: str, reason: str) -> None:
        if site in self.members and site not in self.gone:
            self.gone[site] = reason
            self._ready_changed.set()
            for pending in self._pending.values():
                pending.discard(site)
            self._inbox.put_nowait(SiteGone(site, reason))

    async def results(self, task: Task, sites: list[str], timeout: float) -> AsyncIterator[Result | SiteGone]:
        """Results of `task` as they arrive (see `collect`)."""
        async for item in self.collect({task.task_id: sites}, timeout):
            yield item

    async def collect(self, expect: dict[str, list[str]], timeout: float) -> AsyncIterator[Result | SiteGone]:
        """Results of the tasks in `expect` (task id -> sites asked) as they arrive, until every site
        asked answered or left, or `timeout` (seconds, 0 = none) passed. A departure is yielded once
        for every task that still waited on that site; whatever is still pending afterwards is dropped
        when it arrives."""
        waiting = {task_id: set(sites) - set(self.gone) for task_id, sites in expect.items()}
        for task_id in waiting:
            self._pending.setdefault(task_id, set())
        deadline = time.monotonic() + timeout if timeout > 0 else None
        try:
            while any(waiting.values()):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return
                try:
                    item = await asyncio.wait_for(self._inbox.get(), remaining)
                except TimeoutError:
                    return
                if isinstance(item, SiteGone):
                    if item.site not in self.gone:
                        continue  # it has rejoined since: the departure is over
                    if any(item.site in sites for sites in waiting.values()):
                        for sites in waiting.values():
                            sites.discard(item.site)
                        yield item
                    continue
                if item.task_id not in waiting:
                    item.discard()
                    continue
                waiting[item.task_id].discard(item.site)
                yield item
        finally:
            for task_id in expect:
                self._pending.pop(task_id, None)

    async def close(self) -> None:
        """Wake every waiting worker: the job is over."""
        async with self._changed:
            self.closed = True
            self._changed.notify_all()


class UploadSlots:
    """A few uploads of large results at a time per job; the other sites wait at their end.

    A slot is granted (`acquire`) before the site sends, held while its upload streams in, and given
    back at the end. A site that was granted a slot and never starts sending loses it after `lease` s.
    """

    def __init__(self, count: int, lease: float = 30.0) -> None:
        self.count = count
        self.lease = lease
        self._holders: dict[str, float] = {}
        self._changed = asyncio.Condition()

    def _expire(self) -> None:
        now = time.monotonic()
        for site, until in list(self._holders.items()):
            if until < now:
                del self._holders[site]

    def holds(self, site: str) -> bool:
        self._expire()
        return site in self._holders

    async def acquire(self, site: str, timeout: float | None) -> bool:
        """True once `site` holds a slot; False after `timeout` seconds without one."""
        async with self._changed:

            def free() -> bool:
                self._expire()
                return site in self._holders or len(self._holders) < self.count

            try:
                await asyncio.wait_for(self._changed.wait_for(free), timeout)
            except TimeoutError:
                return False
            self._holders[site] = time.monotonic() + self.lease
            return True

    def start(self, site: str) -> None:
        """The site's upload began: it keeps the slot until `release`."""
        self._holders[site] = float("inf")

    async def release(self, site: str) -> None:
        async with self._changed:
            self._holders.pop(site, None)
            self._changed.notify_all()
