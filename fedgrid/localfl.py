"""A whole federation on one machine, for trials: `./start_fl.sh N` and `./stop_fl.sh`.

Starts the server and the first N sites of the newest provisioned project (each with its own kit's
`startup/start.sh`, exactly as on separate machines), waits until the server lists N sites alive,
and remembers what it started so that `stop_fl.sh` stops exactly those daemons.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fedgrid.exit_codes import ExitCode
from fedgrid.files import write_json_atomic

STATE_FILE = ".fl_running.json"


def newest_prod(workspaces: Path) -> Path:
    """The most recently provisioned prod_NN folder under `workspaces/<project>/`."""
    prods = [p for p in workspaces.glob("*/prod_*") if p.is_dir()]
    if not prods:
        raise SystemExit(
            f"no provisioned project under {workspaces}: run `provision -p {workspaces}/project.yml` first"
        )
    return max(prods, key=lambda p: (p.stat().st_mtime, p.name))


def kits_by_type(prod: Path) -> dict[str, list[Path]]:
    kits: dict[str, list[Path]] = {"server": [], "client": [], "admin": []}
    for config in sorted(prod.glob("*/startup/config.json")):
        kit_type = json.loads(config.read_text())["type"]
        kits.setdefault(kit_type, []).append(config.parent.parent)
    return kits


def _run_script(script: Path) -> None:
    env = dict(os.environ, FEDGRID_PYTHON=os.environ.get("FEDGRID_PYTHON", sys.executable))
    result = subprocess.run([str(script)], env=env, capture_output=True, text=True)
    print(result.stdout.rstrip())
    if result.returncode != 0:
        raise SystemExit(f"{script} failed:\n{result.stderr.strip() or result.stdout.strip()}")


def start(n: int, workspaces: Path, timeout: float) -> int:
    prod = newest_prod(workspaces)
    kits = kits_by_type(prod)
    sites = kits["client"][:n]
    if len(sites) < n:
        raise SystemExit(f"{prod} has only {len(kits['client'])} site kits; asked for {n}")
    started: list[str] = []
    state = workspaces / STATE_FILE
    try:
        for kit in [kits["server"][0], *sites]:
            _run_script(kit / "startup" / "start.sh")
            started.append(str(kit))
            write_json_atomic(state, {"prod": str(prod), "kits": started})
    except SystemExit:
        stop(workspaces)
        raise
    if kits["admin"]:
        _wait_for_sites(kits["admin"][0], [k.name for k in sites], timeout)
    print(f"\nfederation of {prod.parent.name} ({prod.name}) is up: server + {n} sites")
    for kit in [kits["server"][0], *sites]:
        print(f"  {kit.name:<24} log: {kit / 'log.txt'}")
    if kits["admin"]:
        print(f"admin console: {kits['admin'][0] / 'startup' / 'fl_admin.sh'}")
    print("stop everything with ./stop_fl.sh")
    return ExitCode.OK


def _wait_for_sites(admin_kit: Path, names: list[str], timeout: float) -> None:
    from fedgrid.errors import FedgridError
    from fedgrid.session import Session

    deadline = time.monotonic() + timeout
    last = "server not answering yet"
    while time.monotonic() < deadline:
        try:
            with Session(admin_kit, timeout=5) as session:
                while time.monotonic() < deadline:
                    sites = session.check_status("client", names)
                    alive = sorted(s.name for s in sites if s.state == "alive")  # type: ignore[union-attr]
                    if len(alive) == len(names):
                        return
                    last = f"alive: {', '.join(alive) or 'none'}"
                    time.sleep(0.2)
        except FedgridError as exc:
            last = str(exc)
            time.sleep(0.5)
    raise SystemExit(f"not all {len(names)} sites registered within {timeout:.0f} s ({last}); see the logs")


def stop(workspaces: Path) -> int:
    state = workspaces / STATE_FILE
    if not state.exists():
        print("nothing started by start_fl.sh is running")
        return ExitCode.OK
    kits = [Path(k) for k in json.loads(state.read_text())["kits"]]
    failures = 0
    for kit in reversed(kits):
        script = kit / "startup" / "stop.sh"
        result = subprocess.run([str(script)], capture_output=True, text=True)
        print(result.stdout.rstrip() or f"{kit.name} stopped")
        failures += result.returncode != 0
    state.unlink(missing_ok=True)
    return ExitCode.FAILED if failures else ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="start_fl.sh / stop_fl.sh",
        description="Start (or stop) the server and N sites of the newest provisioned project on this machine.",
    )
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("n", type=int, nargs="?", default=2, help="number of sites to start (default 2)")
    parser.add_argument(
        "--workspaces",
        type=Path,
        default=Path("workspaces"),
        help="where provision wrote the kits (default: workspaces/ in the current folder)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the sites to register")
    args = parser.parse_args(argv)
    if args.action == "start":
        if args.n < 1:
            parser.error("N must be at least 1")
        return start(args.n, args.workspaces.resolve(), args.timeout)
    return stop(args.workspaces.resolve())


if __name__ == "__main__":
    sys.exit(main())
