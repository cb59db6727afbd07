"""Live job events for admins watching a job (`WatchJob`): pushed, never polled."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from fedgrid.serde import RoundInfo


class Watchers:
    """Fan-out of per-job events to every open WatchJob stream."""

    def __init__(self) -> None:
        self._queues: dict[str, set[asyncio.Queue[tuple[str, RoundInfo | None]]]] = defaultdict(set)

    def subscribe(self, job_id: str) -> asyncio.Queue[tuple[str, RoundInfo | None]]:
        queue: asyncio.Queue[tuple[str, RoundInfo | None]] = asyncio.Queue()
        self._queues[job_id].add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[tuple[str, RoundInfo | None]]) -> None:
        self._queues[job_id].discard(queue)
        if not self._queues[job_id]:
            del self._queues[job_id]

    def _put(self, job_id: str, event: tuple[str, RoundInfo | None]) -> None:
        for queue in self._queues.get(job_id, ()):
            queue.put_nowait(event)

    async def round(self, job_id: str, record: RoundInfo) -> None:
        self._put(job_id, ("round", record))

    async def status(self, job_id: str) -> None:
        self._put(job_id, ("status", None))

    async def finished(self, job_id: str) -> None:
        self._put(job_id, ("finished", None))
