"""The base of every configuration file's schema, and pydantic's report turned into one line.

Each file fedgrid reads (project.yml, a kit's config.json, local/*.json, a job's meta.json and app
configs) is a pydantic model derived from `Schema`: unknown keys are errors, values are not coerced
(a port written "8002" is refused, not guessed), infinities and NaN are refused, and a parsed
object cannot change. `one_line` gives the first problem as the one line our errors carry: where in
the file, what is accepted there, and what was found.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, ValidationInfo
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

Labels = Callable[[tuple[int | str, ...]], str | None]
"""Names a place of a file in the reader's words (("participants", 2) -> "participant 'site-2' (#3)")."""

_SHOW_AT_MOST = 60
_NOT_ACCEPTED = "not_accepted"


class Schema(BaseModel):
    """A configuration file or section: strict, closed to unknown keys, frozen once parsed."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def accepts(test: Callable[[Any], Any], rule: str) -> AfterValidator:
    """A field validator refusing values for which `test` is false; `rule` says what is accepted
    ("a DNS name or an IP address"), so that the error reads "host must be <rule>, got <value>"."""

    def check(value: Any) -> Any:
        if not test(value):
            raise PydanticCustomError(_NOT_ACCEPTED, "must be {rule}", {"rule": rule})
        return value

    return AfterValidator(check)


def drop_retired(data: Any, info: ValidationInfo, *keys: str) -> Any:
    """`data` without `keys` that fedgrid no longer reads; each one found is listed in the
    validation context's "retired" list (when the caller passed one) so the caller can say so once."""
    if not isinstance(data, dict) or not any(key in data for key in keys):
        return data
    found = [key for key in keys if key in data]
    retired = (info.context or {}).get("retired")
    if isinstance(retired, list):
        retired.extend(found)
    return {key: value for key, value in data.items() if key not in found}


@dataclass
class _Spot:
    """Where a problem is, and what the schema accepts there."""

    path: str = ""
    parent: str = ""
    annotation: Any = None
    constraints: list[Any] = field(default_factory=list)
    description: str | None = None
    allowed: list[str] = field(default_factory=list)
    """The keys of the mapping that holds the last key, when that mapping is a model."""


def _unwrap(annotation: Any) -> tuple[Any, list[Any], str | None]:
    """The type under Optional and Annotated, with the constraints and description gathered on the way."""
    constraints: list[Any] = []
    description = None
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation, *extras = get_args(annotation)
            for extra in extras:
                if isinstance(extra, FieldInfo):
                    constraints += extra.metadata
                    description = description or extra.description
                else:
                    constraints.append(extra)
        elif origin in (Union, types.UnionType):
            members = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return annotation, constraints, description
            annotation = members[0]
        else:
            return annotation, constraints, description


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _join(path: str, name: str, labelled: bool) -> str:
    if not path:
        return name
    return f"{path}: {name}" if labelled else f"{path}.{name}"


def _spot(model: type[BaseModel], loc: tuple[int | str, ...], labels: Labels | None) -> _Spot:
    spot = _Spot(annotation=model)
    labelled = False
    index = 0
    while index < len(loc):
        part = loc[index]
        annotation = _unwrap(spot.annotation)[0]
        origin = get_origin(annotation)
        spot.parent = spot.path
        if _is_model(annotation):
            fields = annotation.model_fields
            spot.allowed = list(fields)
            spot.path = _join(spot.path, str(part), labelled)
            info = fields.get(part) if isinstance(part, str) else None
            spot.annotation = info.annotation if info else None
            spot.constraints = list(info.metadata) if info else []
            spot.description = info.description if info else None
        elif origin in (list, tuple) and isinstance(part, int):
            spot.path = f"{spot.path}[{part}]"
            spot.annotation, spot.constraints, spot.description = get_args(annotation)[0], [], None
        elif origin is dict and index + 1 < len(loc) and loc[index + 1] == "[key]":
            spot.path = f"{spot.path} key" if spot.path else "key"
            spot.annotation, spot.constraints, spot.description = get_args(annotation)[0], [], None
            index += 1
        elif origin is dict:
            spot.path = f"{spot.path}[{part!r}]"
            spot.annotation, spot.constraints, spot.description = get_args(annotation)[1], [], None
        else:
            spot.path = f"{spot.path}[{part!r}]" if spot.path else repr(part)
            spot.annotation, spot.constraints, spot.description = None, [], None
        index += 1
        label = labels(loc[:index]) if labels else None
        labelled = label is not None
        if label is not None:
            spot.path = label
    return spot


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _range(constraints: list[Any]) -> str:
    """The bounds among `constraints` in words: " from 1 to 65535", " above 0 and at most 1"."""
    kinds = {at.Ge: "ge", at.Gt: "gt", at.Le: "le", at.Lt: "lt"}
    bounds = {kinds[type(item)]: getattr(item, kinds[type(item)]) for item in constraints if type(item) in kinds}
    if "ge" in bounds and "le" in bounds:
        return f" from {_number(bounds['ge'])} to {_number(bounds['le'])}"
    words = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}
    said = [f"{words[name]} {_number(value)}" for name, value in bounds.items()]
    if not said:
        return ""
    return (" of " if said[0].startswith("at ") else " ") + " and ".join(said)


def _min_length(constraints: list[Any]) -> int:
    return max((item.min_length for item in constraints if isinstance(item, at.MinLen)), default=0)


def _expected(spot: _Spot, mapping: str) -> str | None:
    """What the schema accepts at `spot`, in words ("an integer from 1 to 65535")."""
    annotation, constraints, description = _unwrap(spot.annotation)
    constraints = spot.constraints + constraints
    if spot.description or description:
        return spot.description or description
    origin = get_origin(annotation)
    if origin is Literal:
        choices = get_args(annotation)
        return str(choices[0]) if len(choices) == 1 else f"one of {', '.join(map(str, choices))}"
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return f"an integer{_range(constraints)}"
    if annotation is float:
        return f"a number{_range(constraints)}"
    if annotation is str:
        return "a non-empty string" if _min_length(constraints) else "a string"
    if origin in (list, tuple):
        items = {str: " of strings"}.get(get_args(annotation)[0], "")
        return f"a non-empty list{items}" if _min_length(constraints) else f"a list{items}"
    if origin is dict or _is_model(annotation):
        return f"{mapping} with at least one entry" if _min_length(constraints) else mapping
    return None


_AT = re.compile(r"at line (\d+) column (\d+)$")
_LOCATE_AT_MOST = 1 << 18
"""Bytes scanned to name the place of a JSON syntax error; past it the error names no key."""


def _json_place(text: Any, problem: str) -> str:
    """The key path ("tracking[0][0]...") of the value being read where JSON parsing stopped, from the
    "at line L column C" of pydantic's message (columns count bytes); "" when it cannot be told."""
    found = _AT.search(problem)
    data = text.encode() if isinstance(text, str) else text
    if not found or not isinstance(data, bytes):
        return ""
    line, column = int(found.group(1)), int(found.group(2))
    lines = data.split(b"\n", line - 1)
    end = sum(len(part) + 1 for part in lines[: line - 1]) + column - 1
    if end > _LOCATE_AT_MOST:
        return ""
    frames: list[list[Any]] = []  # [True, key or None] for an object, [False, index] for an array
    index = 0
    while index < end:
        char = data[index : index + 1]
        if char == b'"':
            close = index + 1
            while close < len(data) and data[close : close + 1] != b'"':
                close += 2 if data[close : close + 1] == b"\\" else 1
            if frames and frames[-1][0] and frames[-1][1] is None:
                frames[-1][1] = data[index + 1 : close].decode(errors="replace")
            index = close + 1
            continue
        if char in (b"{", b"["):
            frames.append([char == b"{", None if char == b"{" else 0])
        elif char in (b"}", b"]") and frames:
            frames.pop()
        elif char == b"," and frames:
            frames[-1][1] = None if frames[-1][0] else frames[-1][1] + 1
        index += 1
    parts = [f".{key}" if is_object else f"[{key}]" for is_object, key in frames if key is not None]
    return "".join(parts[:6]).lstrip(".") + ("..." if len(parts) > 6 else "")


def show(value: Any) -> str:
    """A value as the reader wrote it, cut short: error lines stay one readable line."""
    try:
        text = repr(value)
    except ValueError:
        return "a number too long to show"
    return text if len(text) <= _SHOW_AT_MOST else text[: _SHOW_AT_MOST - 3] + "..."


def one_line(
    exc: ValidationError, model: type[BaseModel], *, labels: Labels | None = None, mapping: str = "an object"
) -> str:
    """The first problem in `exc` (raised validating `model`) as one line without the file's name.

    `labels` names places in the reader's words; `mapping` is what the file's format calls a mapping
    ("an object" in JSON, "a mapping" in YAML).
    """
    error = exc.errors(include_url=False)[0]
    kind, loc, ctx = error["type"], tuple(error["loc"]), error.get("ctx") or {}
    if kind == "json_invalid":
        problem = str(ctx.get("error", error["msg"]))
        place = _json_place(error["input"], problem)
        return f"{place + ': ' if place else ''}not valid JSON ({problem})"
    spot = _spot(model, loc, labels)
    where = f"{spot.parent}: " if spot.parent else ""
    if kind == "missing":
        return f"{where}missing key {loc[-1]!r}"
    if kind == "extra_forbidden":
        return f"{where}unknown key {loc[-1]!r}; allowed: {', '.join(spot.allowed)}"
    if kind == _NOT_ACCEPTED:
        return f"{spot.path} must be {ctx['rule']}, got {show(error['input'])}"
    if kind in ("value_error", "assertion_error"):
        problem = str(ctx.get("error", error["msg"]))
        return f"{spot.path}: {problem}" if spot.path else problem
    expected = _expected(spot, mapping)
    if expected is None:
        problem = error["msg"][:1].lower() + error["msg"][1:]
        return f"{spot.path or 'the file'}: {problem}, got {show(error['input'])}"
    if not spot.path:
        return f"expected {expected}, got {show(error['input'])}"
    return f"{spot.path} must be {expected}, got {show(error['input'])}"
