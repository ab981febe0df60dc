"""The schema of a rule file, and the `[match]` logic: which alerts a rule reviews."""

from __future__ import annotations

import functools
import re
from fnmatch import fnmatchcase
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from daemon.contract import Alert, Name, parse_rfc3339
from daemon.templates import Template, check_topic_template, without_control_tokens

_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_window(text: str) -> tuple[int, int]:
    """'22:00-06:00' -> (1320, 360), minutes after midnight; may wrap past midnight."""
    found = _WINDOW.match(text.strip())
    if not found:
        raise ValueError(f"{text!r} is not a time window like '22:00-06:00'")
    start = int(found[1]) * 60 + int(found[2])
    end = int(found[3]) * 60 + int(found[4])
    if start == end or end > 24 * 60:
        raise ValueError(f"{text!r} is an empty or impossible window")
    return start, end


def in_window(minute: int, window: tuple[int, int]) -> bool:
    start, end = window
    return start <= minute < end if start < end else minute >= start or minute < end


class MatchSpec(_Strict):
    """Which alerts a rule reviews. Lists hold glob patterns (`cam-0*`, `*`)."""

    event_types: list[Name] = Field(min_length=1)
    cameras: list[Name] = Field(default_factory=lambda: ["*"], min_length=1)
    boxes: list[Name] = Field(default_factory=lambda: ["*"], min_length=1)
    #: an alert without `site` matches only the pattern "*"
    sites: list[Name] = Field(default_factory=lambda: ["*"], min_length=1)
    #: alerts whose box score is below are left to other rules; alerts without a score pass
    min_score: float = Field(default=0.0, ge=0, le=1)
    #: time of day of `occurred_at`, e.g. ["22:00-06:00"]: in `timezone`, else at the UTC
    #: offset `occurred_at` is written with
    hours: list[str] = Field(default_factory=list)
    #: an IANA time zone name ("Asia/Shanghai") for `hours`
    timezone: str | None = None

    @field_validator("hours")
    @classmethod
    def _windows(cls, value: list[str]) -> list[str]:
        for text in value:
            parse_window(text)
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            _zone(value)
        return value

    @model_validator(mode="after")
    def _zone_for_hours(self) -> MatchSpec:
        if self.timezone is not None and not self.hours:
            raise ValueError("timezone is read for hours only: set hours too, or leave it out")
        return self

    def matches(self, alert: Alert) -> bool:
        if not (
            _any_glob(alert.event_type, self.event_types)
            and _any_glob(alert.camera_id, self.cameras)
            and _any_glob(alert.box_id, self.boxes)
            and (_any_glob(alert.site, self.sites) if alert.site else "*" in self.sites)
        ):
            return False
        if alert.score is not None and alert.score < self.min_score:
            return False
        if self.hours:
            local = parse_rfc3339(alert.occurred_at)
            if self.timezone is not None:
                local = local.astimezone(_zone(self.timezone))
            minute = local.hour * 60 + local.minute
            return any(in_window(minute, parse_window(text)) for text in self.hours)
        return True


@functools.lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:  # a path, a folder ...
        raise ValueError(
            f"unknown time zone {name!r}: expected an IANA name such as 'Asia/Shanghai' or 'UTC'"
        ) from exc


def _any_glob(value: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(value, pattern) for pattern in patterns)


ImageMode = Literal["frame", "crop", "boxes", "crop+frame"]


class ReviewSpec(BaseModel):
    """The keys of `[review]` every kind shares; the rest go to the kind's Options."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: str = "verdict"
    prompt: str = Field(min_length=1)
    on_error: Literal["forward", "drop"] = "forward"
    #: what the model sees: the frame, the detection's crop, the frame with the boxes drawn,
    #: or the crop followed by the frame
    image: ImageMode = "frame"
    #: context around the detection when cropping, as a fraction of its size on each side
    crop_margin: float = Field(default=0.25, ge=0, le=5)
    #: a LoRA adapter directory (peft's save_pretrained layout) applied to the base model for
    #: this rule; relative to the rule file's folder
    adapter: str | None = Field(default=None, min_length=1)

    @field_validator("prompt")
    @classmethod
    def _template(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is blank")
        without_control_tokens(value, "the prompt")
        Template.parse(value)
        return value.strip()


class CooldownSpec(_Strict):
    """Repeats of an alert (same camera and event, overlapping boxes) reuse its verdict."""

    #: 0: off. A repeat within this many seconds of the last model call reuses its verdict.
    window_s: float = Field(default=0, ge=0, le=24 * 3600)
    #: boxes overlap when their intersection over union reaches this
    iou: float = Field(default=0.5, gt=0, le=1)


class PublishSpec(_Strict):
    topic: str | None = None

    @field_validator("topic")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            check_topic_template(value)
        return value


#: how high (or low) a rule's priority goes (the journal keeps it as a 64-bit integer)
PRIORITY_LIMIT = 1_000_000


class RuleFile(_Strict):
    name: Name | None = None
    description: str = ""
    enabled: bool = True
    #: higher first when several rules match one alert
    priority: int = Field(default=0, ge=-PRIORITY_LIMIT, le=PRIORITY_LIMIT)
    #: rules of lower priority do not review the alerts this rule reviews
    exclusive: bool = False
    #: verdicts go to the shadow topic prefix; when only shadow rules match, the alert is
    #: also forwarded unreviewed
    shadow: bool = False
    #: an alert older than this many seconds when its turn comes is forwarded as
    #: `unreviewed` (reason "stale: ...") instead of being judged late
    max_age_s: float | None = Field(default=None, gt=0)
    match: MatchSpec
    review: ReviewSpec
    cooldown: CooldownSpec = Field(default_factory=CooldownSpec)
    publish: PublishSpec = Field(default_factory=PublishSpec)
