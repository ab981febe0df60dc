"""The public contract: the alert a box sends and the verdict alarm systems receive.

Data only, no I/O. Field meanings are documented in README.md ("The contract").
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime, tzinfo
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

VERDICT_SCHEMA = "secondlook.verdict/1"

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]


#: RFC 3339's date-time (section 5.6): T and Z in either case, a space for the T (its note
#: allows one), a fraction of any length, the offset Z or +HH:MM (optional here: see below)
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"(?P<offset>[Zz]|[+-][0-9]{2}:[0-9]{2})?"
)


def parse_rfc3339(text: str, default_tz: tzinfo | None = None) -> datetime:
    """An RFC 3339 time as an aware datetime. Without an offset the text is refused, or read
    in `default_tz` when one is given (vendors' formats that write local time)."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError("expected an RFC 3339 time such as 2026-11-20T14:03:12+08:00")
    if match["offset"] is None and default_tz is None:
        raise ValueError("RFC 3339 time needs a UTC offset (Z or +HH:MM)")
    # a leap second (RFC 3339 allows :60) is read as the second before it
    clock = text[11:17] + ("59" if text[17:19] == "60" else text[17:19]) + text[19:]
    try:  # the fields' ranges: month 13, hour 25, offset +24:00 …
        parsed = datetime.fromisoformat(f"{text[:10]}T{clock}".upper())
    except ValueError:
        raise ValueError(f"not a valid time: {text}") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=default_tz)


def _rfc3339(value: str) -> str:
    """Check an RFC 3339 timestamp with a UTC offset; keep the text as sent."""
    parse_rfc3339(value)
    return value


Timestamp = Annotated[str, StringConstraints(max_length=64), AfterValidator(_rfc3339)]


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


#: a finite number (a numeric string is read too: vendors' formats send them)
Number = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]
Score = Annotated[Number, Field(ge=0, le=1)]
#: `extra` nested deeper than this is refused (the journal stores it as JSON)
MAX_EXTRA_DEPTH = 32
#: detections per alert taken in, at most (a box model's frame holds far fewer; each is
#: validated, drawn, cropped around and compared with a repeat's, so an unbounded list is
#: refused at intake; alerts journalled before the limit still load)
MAX_BOXES = 256


def _check_json(value: Any) -> None:
    """ValueError for a JSON value nested more than MAX_EXTRA_DEPTH levels deep, or holding
    NaN or infinity (Python's reader takes them; no JSON can store them, so the journal would
    keep null), or a key with a lone surrogate (JSON's "\\ud800" escapes: the journal would
    write U+FFFD for it, and two such keys would become one); walked without recursion."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"holds {item}, which is no JSON number")
        if isinstance(item, dict) and not all(_is_unicode(key) for key in item):
            raise ValueError("a key holds a lone UTF-16 surrogate (\\ud800-\\udfff)")
        if isinstance(item, dict | list):
            depth += 1
            if depth > MAX_EXTRA_DEPTH:
                raise ValueError(f"nested more than {MAX_EXTRA_DEPTH} levels deep")
            stack.extend(
                (child, depth) for child in (item.values() if isinstance(item, dict) else item)
            )


def _is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class Detection(BaseModel):
    """One box-model detection, in pixels of the snapshot."""

    model_config = ConfigDict(extra="allow")

    x1: Number
    y1: Number
    x2: Number
    y2: Number
    label: str | None = None
    score: Score | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Detection:
        if self.x2 < self.x1 or self.y2 < self.y1:
            raise ValueError("x2/y2 must not be smaller than x1/y1")
        # a box's own keys (a tracker id, a class index ...) are kept like `extra`: checked alike
        _check_json(self.model_extra or {})
        return self


class Alert(BaseModel):
    """An alert in the canonical shape; images travel separately as bytes."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    alert_id: Name
    box_id: Name
    camera_id: Name
    event_type: Name
    occurred_at: Timestamp
    image_url: str | None = None
    score: Score | None = None
    boxes: list[Detection] = Field(default_factory=list)
    site: Annotated[str, StringConstraints(max_length=256)] | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("extra")
    @classmethod
    def _shallow(cls, extra: dict[str, Any]) -> dict[str, Any]:
        _check_json(extra)
        return extra


def too_many_boxes(count: int) -> str | None:
    """Why an alert with `count` detections is refused at intake, or None."""
    if count > MAX_BOXES:
        return f"{count} detections, over the limit of {MAX_BOXES} per alert"
    return None


class VerdictKind(StrEnum):
    CONFIRMED = "confirmed"
    REJECTED = "rejected"
    UNCERTAIN = "uncertain"
    UNREVIEWED = "unreviewed"


class Verdict(BaseModel):
    """What alarm systems receive for one alert and one rule."""

    model_config = ConfigDict(frozen=True)

    schema_: str = Field(default=VERDICT_SCHEMA, alias="schema")
    alert_id: str
    box_id: str
    camera_id: str
    event_type: str
    site: str | None
    occurred_at: str
    rule: str | None
    verdict: VerdictKind
    confidence: float | None
    reason: str
    fields: dict[str, Any] = Field(default_factory=dict)
    model: str | None
    received_at: str
    reviewed_at: str
    latency_ms: int

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)


def problem_text(item: Mapping[str, Any]) -> str:
    """One problem of a pydantic ValidationError in words: its "Value error, " prefix
    dropped, an unexpected key called unknown."""
    if item["type"] == "extra_forbidden":
        return "unknown key"
    message: str = item["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def utc_now() -> datetime:
    return datetime.now(UTC)
