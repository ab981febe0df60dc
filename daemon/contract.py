"""The public contract: the alert a box sends and the verdict alarm systems receive.

Data only, no I/O. Field meanings are documented in README.md ("The contract").
"""

from __future__ import annotations

from datetime import UTC, datetime
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


def _rfc3339(value: str) -> str:
    """Check an RFC 3339 timestamp with a UTC offset; keep the text as sent."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("expected an RFC 3339 time such as 2026-11-20T14:03:12+08:00") from None
    if parsed.tzinfo is None:
        raise ValueError("RFC 3339 time needs a UTC offset (Z or +HH:MM)")
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


def _depth(value: Any) -> int:
    """How deeply lists and dicts nest in a JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_EXTRA_DEPTH:
                break
            stack.extend(
                (child, depth) for child in (item.values() if isinstance(item, dict) else item)
            )
    return deepest


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
    site: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("extra")
    @classmethod
    def _shallow(cls, extra: dict[str, Any]) -> dict[str, Any]:
        if _depth(extra) > MAX_EXTRA_DEPTH:
            raise ValueError(f"nested more than {MAX_EXTRA_DEPTH} levels deep")
        return extra


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


def utc_now() -> datetime:
    return datetime.now(UTC)
