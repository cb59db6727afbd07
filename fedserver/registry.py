"""The sites the server knows: sessions, heartbeats, and the commands waiting for each site.

A site is alive while its heartbeats keep arriving; after `heartbeat_timeout` seconds of silence it
is shown dead and no longer scheduled. Commands (start or abort a job) are pushed to a site over its
open Commands stream the moment they are queued; nothing here polls.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fedgrid.errors import StateError
from fedgrid.v1 import federation_pb2 as fpb

log = logging.getLogger(__name__)


@dataclass
class Site:
    name: str
    org: str
    session_id: str
    address: str
    hostname: str
    cpu_count: int
    memory_gb: float
    """0 = not reported: no limit."""
    max_jobs: int
    """Jobs the site runs at once; 0 = not reported: no limit."""
    registered: float
    last_heartbeat: float
    running_jobs: tuple[str, ...] = ()
    stream_open: bool = False
    commands: asyncio.Queue[fpb.Command] = field(default_factory=asyncio.Queue)


class SiteRegistry:
    def __init__(self, *, heartbeat_timeout: float, heartbeat_interval: float) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_interval = heartbeat_interval
        self._sites: dict[str, Site] = {}
        self.changed = asyncio.Event()
        """Set whenever a site registers or a command stream opens, to wake the scheduler."""

    def register(
        self,
        *,
        name: str,
        org: str,
        address: str,
        hostname: str,
        cpu_count: int,
        memory_gb: float,
        running_jobs: list[str],
        max_jobs: int = 0,
    ) -> Site:
        """Start a new session for `name`; refused while another daemon of that name is connected and
        heartbeating (a session whose heartbeats stopped, e.g. behind a network partition, gives way)."""
        now = time.time()
        old = self._sites.get(name)
        if old is not None and old.stream_open and self.is_alive(old):
            raise StateError(
                f"site {name} is already connected from {old.address} (session since "
                f"{time.strftime('%H:%M:%S', time.localtime(old.registered))}); stop that daemon first"
            )
        site = Site(
            name=name,
            org=org,
            session_id=secrets.token_hex(8),
            address=address,
            hostname=hostname,
            cpu_count=cpu_count,
            memory_gb=memory_gb,
            max_jobs=max_jobs,
            registered=now,
            last_heartbeat=now,
            running_jobs=tuple(running_jobs),
        )
        if old is not None:
            site.commands = old.commands
        self._sites[name] = site
        log.info(
            "site %s registered from %s (host %s, offers %d cpus, %.1f GB)",
            name,
            address,
            hostname or "?",
            cpu_count,
            memory_gb,
        )
        self._notify()
        return site

    def heartbeat(self, name: str, session_id: str, running_jobs: list[str]) -> bool:
        site = self._sites.get(name)
        if site is None or site.session_id != session_id:
            return False
        was_alive = self.is_alive(site)
        site.last_heartbeat = time.time()
        site.running_jobs = tuple(running_jobs)
        if not was_alive:
            log.info("site %s is alive again", name)
            self._notify()
        return True

    def is_alive(self, site: Site) -> bool:
        return time.time() - site.last_heartbeat <= self.heartbeat_timeout

    def get(self, name: str) -> Site | None:
        return self._sites.get(name)

    def sites(self) -> list[Site]:
        return sorted(self._sites.values(), key=lambda s: s.name)

    def alive(self) -> list[Site]:
        return [s for s in self.sites() if self.is_alive(s)]

    def send(self, name: str, command: fpb.Command) -> None:
        """Queue a command; it is pushed as soon as the site's command stream is open."""
        site = self._sites.get(name)
        if site is None:
            raise StateError(f"site {name} has never registered")
        site.commands.put_nowait(command)

    async def commands(self, name: str, session_id: str) -> AsyncIterator[fpb.Command]:
        """The command stream of one session; ends when a newer session of the site replaces it."""
        site = self._sites.get(name)
        if site is None or site.session_id != session_id:
            raise StateError(f"site {name}: unknown session; register again")
        site.stream_open = True
        self._notify()
        try:
            while self._sites.get(name) is site:
                try:
                    command = await asyncio.wait_for(site.commands.get(), timeout=self.heartbeat_interval)
                except TimeoutError:
                    continue
                yield command
        finally:
            site.stream_open = False
            log.info("command stream of site %s closed", name)

    def _notify(self) -> None:
        self.changed.set()
