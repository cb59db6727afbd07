"""The simulator's worker hosts: local processes, or Ray actors on a cluster.

A local host is `python -m fedgrid.sim.host FD`, a process of its own connected to the driver by a socket
pair (a plain process, as the site daemon starts its workers: nothing of the driver's program is imported
into it). A Ray host is an actor (`HostActor`) running the same `SiteHost` on a thread, fed and drained by
actor calls that carry batches of envelopes, one call at a time each way, so that order is kept.

Ray is optional (the extra `fedgrid[ray]`, fedgrid/extras.py) and imported only here, only when asked for.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from fedgrid import extras
from fedgrid.errors import ConfigError
from fedgrid.sim.link import HOST_END, ConnectionLink, Link, QueueLink

PULL_WAIT = 1.0
"""Seconds a driver's pull waits inside an idle Ray host before it returns empty (and asks again)."""


class Host:
    """The driver's handle on one worker host: its link, and how to end it."""

    def __init__(self, index: int, link: Link) -> None:
        self.index = index
        self.link = link
        self.pid = 0
        """The host's process id, once it said it is ready."""

    def close(self) -> None:
        """End the host (after the driver sent it stop, or when the simulation is torn down)."""

    def exit_status(self) -> str:
        """How the host ended, for an error message ("" when unknown)."""
        return ""


class LocalHost(Host):
    def __init__(self, index: int, log: Any) -> None:
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-m", "fedgrid.sim.host", str(theirs.fileno())]
        self.process = subprocess.Popen(command, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stderr=log)
        theirs.close()
        super().__init__(index, ConnectionLink(Connection(ours.detach())))

    def close(self) -> None:
        try:
            self.process.wait(HOST_END + 5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.link.connection.close()  # type: ignore[attr-defined]

    def exit_status(self) -> str:
        code = self.process.poll()
        return "" if code is None else f"exit status {code}"


def start_local(count: int, log: Any = None) -> list[Host]:
    """`count` host processes on this machine; their own errors (not the sites' logs) go to `log`."""
    return [LocalHost(index, log) for index in range(count)]


# ---------------------------------------------------------------------------------------------------- Ray


class HostActor:
    """A worker host inside a Ray actor: `SiteHost` on a thread, its link two queues the calls reach."""

    def __init__(self) -> None:
        from fedgrid.sim.host import SiteHost

        self.link = QueueLink()
        self.done = threading.Event()

        def serve() -> None:
            try:
                SiteHost(self.link).serve()
            finally:
                self.done.set()

        threading.Thread(target=serve, name="site-host", daemon=True).start()

    def push(self, batch: list[bytes]) -> None:
        for data in batch:
            self.link.inbox.put(data)

    def finished(self, timeout: float) -> bool:
        """Whether the host has ended (its sites' threads joined, its folders removed), waiting up to `timeout`."""
        return self.done.wait(timeout)

    def pull(self) -> list[bytes] | None:
        """What the host sent since the last pull (waiting up to PULL_WAIT for something); None once it ended."""
        try:
            items = [self.link.outbox.get(timeout=PULL_WAIT)]
        except queue.Empty:
            return None if self.done.is_set() else []
        while True:
            try:
                items.append(self.link.outbox.get_nowait())
            except queue.Empty:
                return items


class RayLink:
    """The driver's end of a Ray host: sends are batched into one `push` at a time, receives come from `pull`."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self._pending: list[bytes] = []
        self._ready = threading.Condition()
        self._received: list[bytes] = []
        self._closed = False
        threading.Thread(target=self._pusher, name="ray-push", daemon=True).start()

    def send(self, data: bytes) -> None:
        with self._ready:
            self._pending.append(data)
            self._ready.notify()

    def recv(self) -> bytes:
        import ray

        while not self._received:
            try:
                batch = ray.get(self.actor.pull.remote())
            except ray.exceptions.RayError as exc:
                raise EOFError(f"the Ray worker host is gone ({type(exc).__name__})") from None
            if batch is None:
                raise EOFError("the Ray worker host ended")
            self._received = batch[::-1]
        return self._received.pop()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()

    def _pusher(self) -> None:
        import ray

        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._pending or self._closed)
                batch, self._pending = self._pending, []
                if not batch and self._closed:
                    return
            try:
                ray.get(self.actor.push.remote(batch))
            except ray.exceptions.RayError:
                return


class RayHost(Host):
    def __init__(self, index: int, actor: Any) -> None:
        self.actor = actor
        super().__init__(index, RayLink(actor))

    def close(self) -> None:
        import ray

        self.link.close()  # type: ignore[attr-defined]
        try:
            # Let the host end as a local one does (it removes its folders) before its process goes.
            ray.get(self.actor.finished.remote(HOST_END + 5.0), timeout=HOST_END + 10.0)
        except ray.exceptions.RayError:
            pass
        ray.kill(self.actor)


def check_ray() -> None:
    """ConfigError with the pip command when Ray is not installed."""
    problem = extras.missing("ray")
    if problem:
        raise ConfigError(f"--ray: {problem}")


def import_ray() -> Any:
    check_ray()
    import ray

    return ray


def start_ray(count: int, address: str, cpus_per_host: int) -> tuple[list[Host], bool]:
    """`count` hosts as Ray actors: on the cluster at `address` ("ray://host:10001", "host:6379", "auto"),
    or on a Ray instance started here for `address` "local". Returns the hosts and whether Ray was started
    here (and is to be shut down with them)."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        try:
            if address == "local":
                ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = "cannot start Ray here" if address == "local" else "cannot reach a Ray cluster there"
            raise ConfigError(f"--ray {address}: {where} ({exc})") from None
        started = True
    actor_class = ray.remote(num_cpus=cpus_per_host, max_concurrency=4)(HostActor)
    return [RayHost(index, actor_class.remote()) for index in range(count)], started
