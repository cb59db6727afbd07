"""How soon sites are back after their server restarts, and how hard they knock while it is down.

    python bench/restart.py [--sites 4] [--down 30] [--repeat 3]

Provisions a throw-away project, starts a server and --sites site daemons from their kits' start.sh
(mutual TLS on loopback), then kills the server (SIGKILL, as a crash), keeps it down for --down seconds,
and starts it again. Printed per repeat: the seconds from the restarted server being ready (its ready
file) to every site being registered again (the server's log), and the TCP connection attempts the
sites made while it was down (counted by a listener that takes the server's federation port while the
server is down, so a knock is a real connection attempt). Sites wait for a server with gRPC's own
reconnection, capped at one attempt every 2 s (fedgrid/transfer.py GRPC_OPTIONS).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def registrations(log: str) -> list[tuple[float, str]]:
    """(time, site) of every registration in a server log."""
    found = []
    for line in log.splitlines():
        match = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*site (\S+) registered from", line)
        if match:
            found.append((datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), match.group(2)))
    return found


class Knocks(threading.Thread):
    """Accept (and drop) connections on the server's port while the server is down, counting them."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True)
        deadline = time.monotonic() + 20
        while True:  # the dead server's connections may hold the port for a moment while they close
            try:
                self.listener = socket.create_server((host, port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.listener.settimeout(0.2)
        self.count = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.count += 1
            conn.close()

    def stop(self) -> int:
        self.stopping.set()
        self.join()
        self.listener.close()
        return self.count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--down", type=float, default=30.0, help="seconds the server stays down (default 30)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from conftest import provision_project
    from federation import Federation

    with tempfile.TemporaryDirectory() as tmp:
        project = provision_project(Path(tmp), n_sites=args.sites)
        federation = Federation(project)
        try:
            federation.start_all()
            names = [site.name for site in project.sites]
            back, knocks = [], []
            for index in range(args.repeat):
                pid = federation.pid(project.server)
                os.kill(pid, signal.SIGKILL)
                while Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text():
                    time.sleep(0.01)
                federation.running.remove(project.server)
                (project.server / "daemon.pid").unlink(missing_ok=True)
                listener = Knocks(project.host, project.fed_port)
                listener.start()
                time.sleep(args.down)
                knocks.append(listener.stop())
                log = project.server / "log.txt"
                offset = log.stat().st_size if log.exists() else 0
                federation.start(project.server)
                ready = float((project.server / "daemon.ready").read_text())
                deadline = time.time() + 120
                while time.time() < deadline:
                    again = {site: t for t, site in registrations(log.read_text()[offset:])}
                    if set(names) <= set(again):
                        break
                    time.sleep(0.05)
                else:
                    print(f"repeat {index + 1}: not every site registered again within 120 s")
                    return 1
                back.append(max(again[site] for site in names) - ready)
                print(
                    f"repeat {index + 1}: all {args.sites} sites registered {back[-1]:.2f} s after the server was "
                    f"ready; {knocks[-1]} connection attempts in {args.down:.0f} s down "
                    f"({knocks[-1] / args.down / args.sites:.2f} per site per second)"
                )
        finally:
            federation.close()
    print(
        f"\nseconds from server ready to all sites back: median {statistics.median(back):.2f}, max {max(back):.2f}; "
        f"connection attempts per site per second while down: {statistics.median(knocks) / args.down / args.sites:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
