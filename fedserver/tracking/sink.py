"""What a tracking system must offer: four calls, driven by one courier thread per tracker (`delivery`).

The contract that makes delivery exactly-once:
- `deliver` either returns (every record handled: written, or refused for good and counted) or raises
  (nothing is known: the courier keeps the records and retries the same ones later, with `verify=True`).
- A sink must make a replay harmless: records carry deterministic identities, so re-sending what may
  already have arrived either overwrites the same thing or is filtered out when `verify` is set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fedserver.tracking.journal import Record

JOB_RUN = "job"


@dataclass(frozen=True)
class RunRef:
    """A run of the job: its own run (`site` None) or one site's nested run."""

    key: str
    site: str | None = None

    @property
    def is_job(self) -> bool:
        return self.site is None


@dataclass(frozen=True)
class Delivery:
    """The outcome of one `deliver`: how many records the tracker refused for good, and why."""

    refused: int = 0
    error: str = ""


class Sink(Protocol):
    """One tracking system (MLflow, TensorBoard) as its courier sees it."""

    max_records: int
    """Records handed to one `deliver` call."""

    def open(self) -> None:
        """Connect and prepare; raise if the system cannot be reached (the courier retries with backoff)."""

    def deliver(self, run: RunRef, records: Sequence[Record], *, verify: bool) -> Delivery:
        """Write `records` of `run` in order; with `verify`, skip what a lost earlier attempt already wrote."""

    def finish(self, run: RunRef, status: str) -> None:
        """Mark `run` done (every record delivered); `status` is FINISHED, FAILED or KILLED."""

    def close(self) -> None:
        """Release connections and files."""
