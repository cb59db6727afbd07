"""Entry point of the server daemon: `fedserver --kit <server kit>` (what `startup/start.sh` runs).

Exit codes: 0 stopped normally, 1 failed while running, 2 the kit or its settings are unusable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from fedgrid.errors import ConfigError, FedgridError, KitError
from fedgrid.exit_codes import ExitCode
from fedgrid.logs import setup_logging

log = logging.getLogger("fedserver")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fedserver",
        description="Run the fedgrid server from its startup kit: the federation port for sites, the admin "
        "port for admins and job.py, both mutual TLS against the project's root CA. Usually started by "
        "<kit>/startup/start.sh and stopped by <kit>/startup/stop.sh.",
    )
    parser.add_argument("--kit", type=Path, required=True, help="the server's kit folder (holding startup/ and local/)")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("FEDGRID_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO (default), WARNING or ERROR",
    )
    parser.add_argument(
        "--no-ready-file",
        action="store_true",
        help="do not write <kit>/daemon.ready once serving (start.sh waits for that file)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from fedgrid import allocator
    from fedserver.memory import ARENAS
    from fedserver.tlslog import route_stderr

    allocator.tune(arenas=ARENAS)

    setup_logging(args.log_level, stream=route_stderr())
    from fedgrid.kit import load_kit

    try:
        kit = load_kit(args.kit.resolve(), expect_type="server")
    except (KitError, ConfigError) as exc:
        log.error("cannot start: %s", exc)
        return ExitCode.BAD_INPUT
    try:
        return asyncio.run(_serve(kit, None if args.no_ready_file else kit.ready_path))
    except (ConfigError, KitError) as exc:
        log.error("cannot start: %s", exc)
        return ExitCode.BAD_INPUT
    except FedgridError as exc:
        log.error("stopped: %s", exc)
        return ExitCode.FAILED


async def _serve(kit: object, ready_file: Path | None) -> int:
    from fedserver.app import ServerApp

    app = ServerApp(kit)  # type: ignore[arg-type]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.serve(ready_file, stop)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
