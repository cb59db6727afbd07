"""What one participant may hold on the server, so that one misbehaving peer cannot starve the others.

Three limits apply on both ports:
- gRPC's own: connections that never finish their TLS handshake are dropped after `HANDSHAKE_TIMEOUT_MS`,
  connections that carry no call for `CONNECTION_IDLE_MS` are closed (a client reconnects by itself),
  and one connection carries at most `MAX_STREAMS_PER_CONNECTION` calls at once;
- `StreamQuota`: long-lived streams (a job worker's Work stream, a site's command stream, an admin's
  watch) held at once by one identity, across all its connections;
- `read` and `write`: every read from a client stream, and every write to a peer that has stopped
  reading, has a deadline; a peer that sends nothing (or trickles a payload), or takes nothing, is cut off
  with a status saying so, and the server goes on serving everyone else.
The asyncio server spends no thread on a waiting peer; these limits bound its memory and sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from fedgrid.errors import FrameError, LimitError
from fedgrid.transfer import GRPC_OPTIONS

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_MS = 20_000
CONNECTION_IDLE_MS = 10 * 60_000
MAX_STREAMS_PER_CONNECTION = 100

SERVER_OPTIONS = [
    *[option for option in GRPC_OPTIONS if "reconnect" not in option[0]],
    # Let clients keep idle streams alive with the keepalive pings of GRPC_OPTIONS (gRPC's default policy
    # answers a ping more often than every 5 minutes with GOAWAY "too_many_pings").
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
    ("grpc.max_connection_idle_ms", CONNECTION_IDLE_MS),
    ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
]


class StreamQuota:
    """Long-lived streams held at once, per identity."""

    def __init__(self, per_identity: int) -> None:
        self.per_identity = per_identity
        self._held: Counter[str] = Counter()

    @contextlib.contextmanager
    def hold(self, identity: str, what: str) -> Iterator[None]:
        """Count one stream of `identity` while the block runs; LimitError when it holds too many."""
        if self._held[identity] >= self.per_identity:
            log.warning("refused a %s stream of %s: it holds %d already", what, identity, self._held[identity])
            raise LimitError(
                f"{identity} already holds {self._held[identity]} streams, the most one participant may "
                f"(server setting max_streams_per_identity); close some first"
            )
        self._held[identity] += 1
        try:
            yield
        finally:
            self._held[identity] -= 1
            if not self._held[identity]:
                del self._held[identity]

    def held(self, identity: str) -> int:
        return self._held[identity]


async def read(context: grpc.aio.ServicerContext, timeout: float | None, what: str) -> Any:
    """The next message of a client stream, or None once the client closed it.

    LimitError when nothing arrives within `timeout` seconds; TransferError (answered INVALID_ARGUMENT)
    when the bytes that arrived do not parse as the message the method expects.
    """
    try:
        # asyncio.timeout, not wait_for: no task of its own per message, one event-loop turn less.
        async with asyncio.timeout(timeout):
            message = await context.read()
    except TimeoutError:
        raise LimitError(f"{what}: nothing received for {timeout:g} s; the stream is closed") from None
    except DecodeError as exc:
        raise FrameError(f"{what}: a message that does not parse ({exc})") from None
    return None if message is grpc.aio.EOF else message


async def write(context: grpc.aio.ServicerContext, message: Any, timeout: float | None, what: str) -> None:
    """Send one message of a server stream; LimitError when the peer has not taken it within `timeout`
    seconds (it stopped reading: gRPC's flow control holds the write)."""
    try:
        async with asyncio.timeout(timeout):
            await context.write(message)
    except TimeoutError:
        raise LimitError(f"{what}: the peer read nothing for {timeout:g} s; the stream is closed") from None


async def messages(context: grpc.aio.ServicerContext, timeout: float, what: str) -> AsyncIterator[Any]:
    """The messages of a client stream, each read within `timeout` seconds (see `read`)."""
    while (message := await read(context, timeout, what)) is not None:
        yield message
