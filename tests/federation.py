"""A real federation for tests: daemons started from their startup kits with the kits' own scripts.

`Federation` starts the server and sites exactly as a user does (`startup/start.sh`, which waits for
the daemon's ready file), talks to them through the admin Session over mutual TLS on loopback, and
stops each daemon it started with the kit's `stop.sh` (by the PID in the kit) when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from conftest import ProvisionedProject

from fedgrid.session import Session

ENV = dict(os.environ, FEDGRID_PYTHON=sys.executable, FEDGRID_START_TIMEOUT="30")


def set_local(kit: Path, file: str, **values: Any) -> None:
    """Change a kit's local settings (local/ is the operator's, not signed)."""
    path = kit / "local" / file
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(values)
    path.write_text(json.dumps(data, indent=2))


def wait_until(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition", every: float = 0.1) -> Any:
    """Poll `check` until it returns something truthy; fail the test with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def log_text(kit: Path) -> str:
    path = kit / "log.txt"
    return path.read_text(errors="replace") if path.exists() else ""


class Federation:
    """The daemons of one provisioned project, started on demand and always stopped at the end.

    `launcher` gives the command prefix a kit's start.sh runs under (e.g. `ip netns exec <namespace>`,
    tests/test_netns.py); none by default.
    """

    def __init__(
        self,
        project: ProvisionedProject,
        launcher: Callable[[Path], list[str]] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.project = project
        self.launcher = launcher or (lambda kit: [])
        self.running: list[Path] = []
        self.env = {**ENV, **(env or {})}
        """The daemons' environment (e.g. a PYTHONPATH with modules "installed" on the server)."""

    def start(self, kit: Path) -> None:
        command = [*self.launcher(kit), str(kit / "startup" / "start.sh")]
        result = subprocess.run(command, env=self.env, capture_output=True, text=True)
        if result.returncode != 0:
            raise AssertionError(
                f"{kit.name} did not start:\n{result.stdout}\n{result.stderr}\n{log_text(kit)[-3000:]}"
            )
        self.running.append(kit)

    def stop(self, kit: Path) -> None:
        subprocess.run([str(kit / "startup" / "stop.sh")], env=ENV, capture_output=True, text=True)
        if kit in self.running:
            self.running.remove(kit)

    def pid(self, kit: Path) -> int:
        return int((kit / "daemon.pid").read_text())

    def start_all(self, sites: Iterable[Path] | None = None) -> None:
        self.start(self.project.server)
        names = []
        for site in self.project.sites if sites is None else sites:
            self.start(site)
            names.append(site.name)
        self.wait_alive(names)

    def session(self, role: str = "project_admin") -> Session:
        return Session(self.project.admin_roles[role], timeout=20)

    def alive(self, session: Session) -> list[str]:
        return sorted(s.name for s in session.check_status("client") if s.state == "alive")  # type: ignore[union-attr]

    def wait_alive(self, names: list[str], timeout: float = 30.0) -> None:
        with self.session() as session:
            wait_until(lambda: set(names) <= set(self.alive(session)), timeout, f"sites {names} alive")

    def close(self) -> None:
        for kit in reversed(list(self.running)):
            self.stop(kit)


@contextlib.contextmanager
def running(
    project: ProvisionedProject, sites: Iterable[Path] | None = None, env: dict[str, str] | None = None
) -> Iterator[Federation]:
    """The project's server and sites (all, or `sites`) running for the duration of a with-block."""
    federation = Federation(project, env=env)
    try:
        federation.start_all(sites)
        yield federation
    finally:
        federation.close()
