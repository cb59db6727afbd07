"""Entry point of the site daemon: `fedclient --kit <site kit>` (what `startup/start.sh` runs).

Exit codes: 0 stopped normally, 2 the kit or its settings are unusable, 4 the server refused this
site (its certificate, or another daemon of the same site is already connected).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from fedgrid.errors import ConfigError, KitError
from fedgrid.exit_codes import ExitCode
from fedgrid.logs import setup_logging

log = logging.getLogger("fedclient")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedclient",
        description="Run a fedgrid site daemon from its startup kit: it connects to the server over mutual TLS, "
        "keeps a heartbeat, and runs the jobs the server sends (each in its own worker process). Usually "
        "started by <kit>/startup/start.sh and stopped by <kit>/startup/stop.sh.",
    )
    parser.add_argument("--kit", type=Path, required=True, help="the site's kit folder (holding startup/ and local/)")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("FEDGRID_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO (default), WARNING or ERROR",
    )
    parser.add_argument(
        "--no-ready-file",
        action="store_true",
        help="do not write <kit>/daemon.ready once registered (start.sh waits for that file)",
    )
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    from fedgrid.kit import load_kit
    from fedgrid.settings import SITE_SETTINGS_FILE, SiteSettings, load_settings

    try:
        kit = load_kit(args.kit.resolve(), expect_type="client")
        settings = load_settings(SiteSettings, kit.local_dir / SITE_SETTINGS_FILE)
    except (KitError, ConfigError) as exc:
        log.error("cannot start: %s", exc)
        return ExitCode.BAD_INPUT
    from fedclient import metrics
    from fedclient.daemon import FatalError, SiteDaemon

    daemon = SiteDaemon(kit, settings)
    endpoint = None
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.request_stop())
    ready = None if args.no_ready_file else kit.ready_path
    log.info("site %s of project %s starting (server %s:%d)", kit.name, kit.project, kit.server_host, kit.fed_port)
    try:
        endpoint = metrics.serve(daemon, settings, kit.local_dir / SITE_SETTINGS_FILE)
        daemon.run(ready)
    except FatalError as exc:
        log.error("stopping: %s", exc)
        return ExitCode.REFUSED
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return ExitCode.BAD_INPUT
    finally:
        if ready is not None:
            ready.unlink(missing_ok=True)
        daemon.stop()
        if endpoint is not None:
            endpoint.close()
        log.info("site daemon stopped")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
