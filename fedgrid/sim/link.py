"""What travels between the simulator's driver and a worker host, and what carries it.

An envelope is one message for one virtual site (or for the host itself): a kind, the site, the number of
the site's Work stream, a few JSON fields, and a payload that is the serialized Work protocol message
(`WorkerMessage` up, `ServerMessage` down) or a site's log. It is plain bytes: nothing is pickled.

    driver -> host   sites (start these sites: job package, settings), msg, end (a stream closed by the
                     server, with why), abort, stop
    host -> driver   ready (the host's pid), started, open (a site opened its Work stream), msg, close,
                     ended (a site's script ended: state, error, its log), busy (seconds a task took)

A `Link` carries envelopes one way each: a multiprocessing connection for the local pool, a pair of
queues inside a Ray actor (fedgrid/sim/pool.py moves batches of them with actor calls).
"""

from __future__ import annotations

import json
import os
import queue
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class Envelope:
    kind: str
    site: str = ""
    stream: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    def encode(self) -> bytes:
        head = json.dumps({"k": self.kind, "s": self.site, "n": self.stream, "f": self.fields}).encode()
        return b"".join((_LENGTH.pack(len(head)), head, self.payload))

    @classmethod
    def decode(cls, data: bytes) -> Envelope:
        (length,) = _LENGTH.unpack_from(data)
        head = json.loads(data[4 : 4 + length])
        return cls(head["k"], head["s"], head["n"], head["f"], data[4 + length :])


class Link(Protocol):
    """One end of a host's connection: envelopes as bytes, in order."""

    def send(self, data: bytes) -> None: ...

    def recv(self) -> bytes:
        """The next envelope; EOFError once the other end is gone."""
        ...


class ConnectionLink:
    """A multiprocessing connection (a pipe to a host process of the local pool)."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def send(self, data: bytes) -> None:
        self.connection.send_bytes(data)

    def recv(self) -> bytes:
        try:
            return self.connection.recv_bytes()
        except OSError as exc:
            raise EOFError(str(exc)) from None


HOST_END = 10.0
"""Seconds a host gives its sites' threads to end before it removes its folders and leaves; the driver
waits longer than this before it kills a host (fedgrid/sim/pool.py)."""


class QueueLink:
    """Two queues: a host inside a Ray actor reads `inbox` and writes `outbox`, which the actor's methods
    fill and drain for the driver."""

    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()

    def send(self, data: bytes) -> None:
        self.outbox.put(data)

    def recv(self) -> bytes:
        data = self.inbox.get()
        if data is None:
            raise EOFError("the driver closed the link")
        return data


def scratch_folder(prefix: str) -> Path:
    """A new temporary folder for the simulation's files, in memory (/dev/shm) where the machine has it: what a
    server writes durably (a fsync per file, 30 ms here) a simulation throws away at its end."""
    memory = "/dev/shm"  # noqa: S108 - a private folder made by mkdtemp, not a fixed path
    where = memory if os.path.isdir(memory) and os.access(memory, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=where))
