"""Verdict topic templates: `{field}` placeholders filled with topic-safe values."""

from __future__ import annotations

import string

from daemon.contract import Alert

TOPIC_FIELDS = ("alert_id", "box_id", "camera_id", "event_type", "site", "rule", "verdict")
_UNSAFE = str.maketrans({"/": "_", "+": "_", "#": "_", "\x00": "_"})


def check_topic_template(template: str) -> None:
    """Raise ValueError naming the problem if `template` is not a usable topic template."""
    if not template.strip():
        raise ValueError("topic template is empty")
    if "+" in template or "#" in template:
        raise ValueError("a publish topic cannot contain the wildcards + or #")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"bad topic template {template!r}: {exc}") from exc
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in TOPIC_FIELDS:
            known = ", ".join("{" + f + "}" for f in TOPIC_FIELDS)
            raise ValueError(f"unknown field {{{field}}} in topic template; known: {known}")
        if spec or conversion:
            raise ValueError(f"{{{field}}}: format specs and conversions are not allowed")


def render_topic(template: str, alert: Alert, *, rule: str | None, verdict: str) -> str:
    """Fill a checked template; alert values cannot add levels or wildcards."""
    values = {
        "alert_id": alert.alert_id,
        "box_id": alert.box_id,
        "camera_id": alert.camera_id,
        "event_type": alert.event_type,
        "site": alert.site,
        "rule": rule,
        "verdict": verdict,
    }
    safe = {
        key: (str(value).translate(_UNSAFE) or "_") if value else "_"
        for key, value in values.items()
    }
    return template.format_map(safe)
