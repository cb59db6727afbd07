"""The tracking journal: every accepted record on disk before a site hears "accepted", and how far each
tracker got.

Layout of `<job>/tracking/`:

```
runs.json                   run key -> journal file ("job" is the job's own run, "site:<name>" a site's)
journal/<run>.jsonl         append-only, one record a line; the line number is the record's index
delivered-<tracker>.json    per run: records the tracker finished with, byte offset of the next one
text/<run>/<tag>.txt        text events, appended as they arrive (uploaded whole, so uploads are idempotent)
```

The journal is the queue: nothing waits in memory, so an outage of any length costs disk, not RAM, and
a restarted server finds every undelivered record where it left it. A watermark only moves after its
tracker confirmed the records, and is replaced atomically (write, then rename).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from fedgrid.files import write_atomic

METRIC, PARAMS, TEXT, ARTIFACT = "metric", "params", "text", "artifact"


@dataclass(frozen=True)
class Record:
    """One accepted item of a run: a metric point, a set of params, a text entry or an artifact file.

    `index` is its position in the run's journal (from 1); `timestamp_ms` is unique per (run, key, step,
    value) so that MLflow can tell a replayed point from a new one.
    """

    index: int
    kind: str
    key: str = ""
    value: float = 0.0
    step: int = 0
    timestamp_ms: int = 0
    text: str = ""
    params: Mapping[str, str] = field(default_factory=dict)
    path: str = ""
    """TEXT: the text file this entry was appended to; ARTIFACT: the file to upload."""
    seq: int = 0
    """The site's seq for this event (0 for the server's own records)."""

    def to_line(self) -> bytes:
        data: dict[str, object] = {"i": self.index, "k": self.kind}
        if self.key:
            data["n"] = self.key
        if self.kind == METRIC:
            data["v"] = self.value
        if self.step:
            data["s"] = self.step
        data["t"] = self.timestamp_ms
        if self.text:
            data["x"] = self.text
        if self.params:
            data["p"] = dict(self.params)
        if self.path:
            data["f"] = self.path
        if self.seq:
            data["q"] = self.seq
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> Record:
        data = json.loads(line)
        return cls(
            index=int(data["i"]),
            kind=str(data["k"]),
            key=str(data.get("n", "")),
            value=float(data.get("v", 0.0)),
            step=int(data.get("s", 0)),
            timestamp_ms=int(data.get("t", 0)),
            text=str(data.get("x", "")),
            params={str(k): str(v) for k, v in data.get("p", {}).items()},
            path=str(data.get("f", "")),
            seq=int(data.get("q", 0)),
        )


class RunJournal:
    """One run's records, appended by the server's event loop and read by the delivery threads.

    Appends happen under the intake's lock; readers (the couriers) never take it: they read only below `committed`, a
    (count, size) pair replaced in one assignment after the bytes were flushed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.committed: tuple[int, int] = (0, 0)
        self._out: BinaryIO | None = None

    @property
    def count(self) -> int:
        return self.committed[0]

    def load(self) -> list[Record]:
        """Records already on disk (after a restart), cutting off a line torn by a crash mid-write."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(self.path, "r+b") as repair:
                repair.truncate(end)
        records = [Record.from_line(line) for line in data[:end].splitlines() if line.strip()]
        self.committed = (len(records), end)
        return records

    def append(self, records: list[Record]) -> None:
        """Write and flush `records`; on a disk error leave the file as it was and raise OSError."""
        if not records:
            return
        count, size = self.committed
        payload = b"".join(r.to_line() for r in records)
        out = self._open()
        try:
            out.write(payload)
            out.flush()
        except OSError:
            try:
                out.truncate(size)
            except OSError:
                pass
            raise
        self.committed = (count + len(records), size + len(payload))

    def read(self, offset: int, end: int, max_records: int) -> tuple[list[Record], int]:
        """Up to `max_records` records starting at byte `offset`, never past byte `end`; and where the next starts."""
        records: list[Record] = []
        with open(self.path, "rb") as src:
            src.seek(offset)
            position = offset
            while position < end and len(records) < max_records:
                line = src.readline()
                if not line.endswith(b"\n"):
                    break
                position += len(line)
                records.append(Record.from_line(line))
        return records, position

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def _open(self) -> BinaryIO:
        if self._out is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._out = open(self.path, "ab")  # kept open for the job's life: one append per batch
        return self._out


@dataclass(frozen=True)
class Mark:
    """How far one tracker got in one run: records finished with (delivered or refused) and bytes read."""

    count: int = 0
    offset: int = 0
    refused: int = 0


class Watermarks:
    """The per-run marks of one tracker, persisted after every confirmed batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._marks: dict[str, Mark] = {}
        self.existed = path.exists()
        if self.existed:
            raw = json.loads(path.read_text(encoding="utf-8"))
            self._marks = {key: Mark(**value) for key, value in raw.get("runs", {}).items()}

    def get(self, run: str) -> Mark:
        return self._marks.get(run, Mark())

    def all(self) -> dict[str, Mark]:
        return dict(self._marks)

    def advance(self, run: str, mark: Mark) -> None:
        self._marks[run] = mark
        write_json_atomic(self.path, {"runs": {key: asdict(m) for key, m in self._marks.items()}})


def write_json_atomic(path: Path, data: object) -> None:
    """Replace `path` with `data` (sorted keys, so equal states give equal files)."""
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True))
