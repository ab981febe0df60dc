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
    ConfigDict,
    Field,
    StringConstraints,
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


class Detection(BaseModel):
    """One box-model detection, in pixels of the snapshot."""

    model_config = ConfigDict(extra="allow")

    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None
    score: Annotated[float, Field(ge=0, le=1)] | None = None

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
    score: Annotated[float, Field(ge=0, le=1)] | None = None
    boxes: list[Detection] = Field(default_factory=list)
    site: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


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
