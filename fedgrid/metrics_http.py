"""A daemon's Prometheus endpoint: the client library's own HTTP server, on the port the daemon's local settings
name (`metrics_port`, `metrics_address` in `local/server.json` or `local/site.json`).

The server and the site daemon each keep their metrics in one module (fedserver/metrics.py,
fedclient/metrics.py) with a registry of their own; this is the one way either serves it. The endpoint
answers in its own threads, so a scrape never waits for a busy event loop or a job's worker.
"""

from __future__ import annotations

import errno
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server

from fedgrid.errors import ConfigError

log = logging.getLogger(__name__)

_WHAT_TO_DO = {
    errno.EADDRINUSE: "choose a free port there, or stop what listens on it",
    errno.EADDRNOTAVAIL: "metrics_address must be an address of this machine",
    errno.EACCES: "ports below 1024 need privileges: choose a port from 1024 on",
}

# A `_created` series beside every counter and histogram doubles what is scraped and nothing here reads it.
disable_created_metrics()


@dataclass
class Endpoint:
    """A running /metrics endpoint; `close` stops it and frees its port."""

    server: WSGIServer
    thread: threading.Thread
    url: str

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5.0)


def serve(registry: CollectorRegistry, address: str, port: int, settings_file: Path) -> Endpoint | None:
    """Serve `registry` at http://address:port/metrics; None when `port` is 0 (no endpoint).

    A port that cannot be had (taken, or privileged) is a ConfigError naming the setting, its file and
    the port, so the daemon refuses to start rather than run unwatched.
    """
    if not port:
        return None
    host = f"[{address}]" if ":" in address else address
    try:
        server, thread = start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"{settings_file}: cannot serve metrics on {host}:{port} (metrics_port {port}, metrics_address "
            f"{address}): {exc.strerror or exc}; {_WHAT_TO_DO.get(exc.errno or 0, 'change them there')}"
        ) from None
    url = f"http://{host}:{port}/metrics"
    log.info("metrics for Prometheus at %s", url)
    return Endpoint(server=server, thread=thread, url=url)
