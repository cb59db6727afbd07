"""Turn gRPC's own lines about refused TLS handshakes into readable server log lines.

A certificate that is expired or issued by another CA is refused inside the TLS handshake, before
any of our code runs; gRPC's C core then prints a terse line to stderr. The server routes its stderr
through this reader so that such refusals appear in its log as a warning that says why.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TextIO

log = logging.getLogger("fedserver.tls")

REASONS = {
    "certificate has expired": "the client certificate has expired (re-provision that participant)",
    "certificate is not yet valid": "the client certificate is not valid yet (check the clocks)",
    "unable to get local issuer certificate": "the client certificate was not issued by this project's root CA",
    "self signed certificate": "the client certificate is self-signed, not issued by this project's root CA",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate",
    "CERTIFICATE_VERIFY_FAILED": "the client certificate did not verify",
}


def explain(line: str) -> str | None:
    """A readable reason for a gRPC handshake-failure line, or None for any other line."""
    if "Handshake failed" not in line:
        return None
    for needle, reason in REASONS.items():
        if needle in line:
            return reason
    return line.split("Handshake failed", 1)[1].strip(" :")


def route_stderr() -> TextIO:
    """Send fd 2 through a reader thread; returns a stream on the original stderr for log handlers."""
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    out = os.fdopen(original, "w", buffering=1, encoding="utf-8", errors="replace")

    def pump() -> None:
        with os.fdopen(read_end, "r", encoding="utf-8", errors="replace") as lines:
            for line in lines:
                reason = explain(line)
                if reason is None:
                    out.write(line)
                else:
                    log.warning("refused a TLS connection before identification: %s", reason)

    threading.Thread(target=pump, name="stderr-router", daemon=True).start()
    return out
