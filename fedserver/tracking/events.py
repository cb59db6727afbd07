"""What a site may send to the tracking system, and what the server makes of it.

A site's training script is not trusted to behave: it may log NaN, a 10 kB tag, names MLflow refuses,
or a million events. Everything here is pure and deterministic, so the same event always gets the same
verdict, a resent batch is judged exactly like the original, and a restarted server rebuilds the same
state from its journal.

Decisions (see `EventLimits` for the numbers):
- NaN and ±inf values are **refused** and counted, not logged: MLflow's SQL store would keep NaN as 0
  with a flag and clamp inf to ±1.8e308, TensorBoard would draw them differently again, and a refused
  point is reported back to the site in the reply note, so the researcher learns about the divergence.
- Metric and param names are **sanitized**, never refused for their characters: anything outside
  MLflow's alphabet (letters, digits, `_ - . / : space`) becomes `_`, and path pieces MLflow forbids
  (empty, `.` or `..` segments, a leading `/`) become `_` too. Two tags that differ only in forbidden
  characters therefore share a metric; that is the price of determinism without a lookup table.
- Names over MLflow's 250-character key limit are **shortened** to 241 characters plus `~` and 8 hex
  digits of the full name's SHA-256, so distinct long names stay distinct. Tags longer than
  `max_tag_chars` (default 1000) are **refused**: nobody types those on purpose.
- Text is **truncated** at `max_text_chars` with a marker; param values at MLflow's 6000 characters.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

KINDS = ("scalar", "params", "text")

MLFLOW_KEY_LIMIT = 250
"""MLflow's limit on metric, param and tag key length (MAX_ENTITY_KEY_LENGTH)."""
MLFLOW_PARAM_VALUE_LIMIT = 6000
"""MLflow's limit on a param value (MAX_PARAM_VAL_LENGTH)."""
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# MLflow (utils/validation.py) accepts names matching ^[/\w.\- :]*$ on POSIX servers.
_FORBIDDEN = re.compile(r"[^\w./\- :]")


@dataclass(frozen=True)
class TrackingEvent:
    """One SummaryWriter call at a site, as the server received it.

    `site` comes from the verified certificate; `seq` is per job and site, from 1, and lets the server
    ignore a batch the worker resent after a failed RPC.
    """

    site: str
    seq: int
    kind: str
    tag: str
    value: float
    step: int
    wall_time: float
    text: str = ""
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EventLimits:
    """Bounds on what one site can make the server store, so a runaway script cannot fill its disk."""

    max_events_per_call: int = 2000
    """Events looked at in one `site_events` call; the rest of the batch is dropped and counted."""
    max_events_per_site: int = 250_000
    """Events judged (kept or refused) per site and job: at most ~40 MB of journal and of seq bookkeeping.
    Later events are dropped and counted without being looked at."""
    max_tag_chars: int = 1000
    """Tags longer than this are refused; 251..1000 characters are shortened with a hash."""
    max_text_chars: int = 16_384
    """A text event longer than this is truncated."""
    max_text_chars_per_site: int = 4_000_000
    """Text kept per site and job; later text events are refused."""
    max_params_per_site: int = 1000
    """Distinct param keys per site run (the job's own run has the same bound)."""


def mlflow_name(name: str) -> str:
    """The metric/param key MLflow will accept for `name`: same input, same output, always."""
    cleaned = _FORBIDDEN.sub("_", name)
    parts = ["_" if part in ("", ".", "..") else part for part in cleaned.split("/")]
    cleaned = "/".join(parts)
    if cleaned.startswith(".."):
        cleaned = "_" + cleaned[1:]
    if len(cleaned) > MLFLOW_KEY_LIMIT:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        cleaned = f"{cleaned[: MLFLOW_KEY_LIMIT - 9]}~{digest}"
    return cleaned


def file_name(name: str) -> str:
    """A file or folder name for a site or tag: readable when it can be, unique when it must be."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80].strip(".") or "_"
    if safe != name:
        safe = f"{safe}~{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    return safe


def truncate_text(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, saying how much was cut so nobody mistakes it for the whole."""
    if len(text) <= limit:
        return text
    marker = f"\n[... truncated {len(text) - limit} characters]"
    return text[: max(0, limit - len(marker))] + marker


def describe(value: float) -> str:
    """NaN, +inf or -inf, as a researcher would write them."""
    if math.isnan(value):
        return "NaN"
    return "+inf" if value > 0 else "-inf"


def shorten(name: str) -> str:
    """`name` cut for a log line or a note."""
    return name if len(name) <= 60 else f"{name[:40]}...({len(name)} chars)"


@dataclass(frozen=True)
class Checked:
    """An event that passed: its MLflow-ready key, its value and the adjustments made on the way."""

    key: str
    value: float
    step: int
    timestamp_ms: int
    text: str
    params: Mapping[str, str]
    adjustments: tuple[str, ...] = ()


@dataclass(frozen=True)
class Refused:
    """Why an event was not kept: `reason` is a category for counting, `detail` names the event."""

    reason: str
    detail: str


def check_event(event: TrackingEvent, limits: EventLimits, now: float) -> Checked | Refused:
    """Judge one event on its own (site-level budgets and seq are the intake's business)."""
    if event.kind not in KINDS:
        return Refused("unknown kind", f"unknown kind {shorten(str(event.kind))!r} (want {', '.join(KINDS)})")
    tag = event.tag if event.tag else ("text" if event.kind == "text" else "")
    if event.kind != "params":
        if not tag:
            return Refused("empty tag", f"empty tag for a {event.kind} event")
        if len(tag) > limits.max_tag_chars:
            return Refused("tag too long", f"tag of {len(tag)} characters (limit {limits.max_tag_chars})")
    try:
        step = int(event.step)
    except (TypeError, ValueError, OverflowError):
        return Refused("bad step", f"step {event.step!r} for {shorten(tag)!r} is not an integer")
    if not INT64_MIN <= step <= INT64_MAX:
        return Refused("bad step", f"step {step} for {shorten(tag)!r} is out of range")
    wall_time = event.wall_time
    if not isinstance(wall_time, int | float) or not math.isfinite(wall_time) or wall_time <= 0:
        wall_time = now
    timestamp_ms = min(int(wall_time * 1000), INT64_MAX)
    adjustments: list[str] = []
    key = mlflow_name(tag) if tag else ""
    if key != tag and event.kind != "params":
        adjustments.append("renamed")

    if event.kind == "scalar":
        try:
            value = float(event.value)
        except (TypeError, ValueError):
            return Refused("not a number", f"value {shorten(str(event.value))!r} for {shorten(tag)!r} is not a number")
        if not math.isfinite(value):
            return Refused("non-finite value", f"{describe(value)} value for {shorten(tag)!r} at step {step}")
        return Checked(key, value, step, timestamp_ms, "", {}, tuple(adjustments))

    if event.kind == "text":
        text = str(event.text)
        if len(text) > limits.max_text_chars:
            text = truncate_text(text, limits.max_text_chars)
            adjustments.append("text truncated")
        return Checked(key, 0.0, step, timestamp_ms, text, {}, tuple(adjustments))

    params = normalize_params(event.params, limits.max_tag_chars)
    if isinstance(params, Refused):
        return params
    cleaned, changed = params
    if changed:
        adjustments.append("params renamed or truncated")
    return Checked("params", 0.0, step, timestamp_ms, "", cleaned, tuple(adjustments))


def normalize_params(params: object, max_key_chars: int = 1000) -> tuple[dict[str, str], bool] | Refused:
    """Params with MLflow-ready keys and values; refused when two keys collapse onto one name."""
    if not isinstance(params, Mapping):
        return Refused("bad params", "params is not a mapping")
    cleaned: dict[str, str] = {}
    changed = False
    for raw_key, raw_value in params.items():
        raw = str(raw_key)
        if not raw or len(raw) > max_key_chars:
            return Refused("bad params", f"param key of {len(raw)} characters (limit 1..{max_key_chars})")
        key = mlflow_name(raw)
        value = str(raw_value)
        if len(value) > MLFLOW_PARAM_VALUE_LIMIT:
            value = value[:MLFLOW_PARAM_VALUE_LIMIT]
            changed = True
        if key in cleaned and cleaned[key] != value:
            return Refused("bad params", f"params {shorten(raw)!r} and another key both become {shorten(key)!r}")
        changed = changed or key != raw
        cleaned[key] = value
    return cleaned, changed
