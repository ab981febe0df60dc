"""`{field}` templates for prompts and topics, filled from an alert's values as plain data.

A template names contract fields (`{camera_id}`) or keys of the alert's `extra` object
(`{extra.zone}`, `{extra.line.name}`); `{{` and `}}` are literal braces. Names are checked
when the template is read, so a typo is a load-time error. Filling never evaluates anything:
alert text is inserted as it is (prompts) or made topic-safe (topics).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from daemon.contract import Alert

#: contract fields a template may name
ALERT_FIELDS = ("alert_id", "box_id", "camera_id", "event_type", "site", "occurred_at", "score")
#: what a topic template may name besides the alert's fields
TOPIC_FIELDS = ("rule", "verdict")
MISSING = "unknown"
_TOPIC_UNSAFE = str.maketrans({"/": "_", "+": "_", "#": "_", "\x00": "_"})
#: characters of one alert value in a topic (MQTT topics end at 65,535 bytes; an `extra`
#: value of any length must not make a verdict unpublishable)
TOPIC_VALUE_CHARS = 128


@dataclass(frozen=True)
class Template:
    text: str
    #: (literal text, field name or None) pairs, in order
    parts: tuple[tuple[str, str | None], ...]

    @classmethod
    def parse(cls, text: str, *, also: Iterable[str] = ()) -> Template:
        """Read a template; ValueError names an unknown field or a syntax problem."""
        known = (*ALERT_FIELDS, *also)
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ValueError(f"{exc} (write {{{{ and }}}} for literal braces)") from exc
        parts = []
        for literal, name, spec, conversion in parsed:
            if name is not None:
                if spec or conversion:
                    raise ValueError(f"{{{name}}}: format specs and conversions are not allowed")
                if name not in known and not (name.startswith("extra.") and len(name) > 6):
                    names = ", ".join("{" + n + "}" for n in known)
                    raise ValueError(f"unknown field {{{name}}}; known: {names}, {{extra.<key>}}")
            parts.append((literal, name))
        return cls(text, tuple(parts))

    @property
    def fields(self) -> list[str]:
        return [name for _, name in self.parts if name is not None]

    def render(self, value: Callable[[str], str]) -> str:
        return "".join(literal + (value(name) if name else "") for literal, name in self.parts)


def alert_value(alert: Alert, name: str, extras: Mapping[str, Any] | None = None) -> str | None:
    """The text of a field (None when the alert does not have it)."""
    if extras is not None and name in extras:
        value = extras[name]
    elif name.startswith("extra."):
        value = alert.extra
        for key in name.split(".")[1:]:
            value = value.get(key) if isinstance(value, dict) else None
    else:
        value = getattr(alert, name)
    if value is None or isinstance(value, dict | list):
        return None
    return str(value)


def render_prompt(template: Template, alert: Alert) -> str:
    return template.render(lambda name: alert_value(alert, name) or MISSING)


def check_topic_template(text: str) -> Template:
    if not text.strip():
        raise ValueError("topic template is empty")
    if "+" in text or "#" in text:
        raise ValueError("a publish topic cannot contain the wildcards + or #")
    return Template.parse(text, also=TOPIC_FIELDS)


def render_topic(template: Template, alert: Alert, *, rule: str | None, verdict: str) -> str:
    """Fill a topic template; alert values cannot add levels or wildcards, and each is cut
    to its first TOPIC_VALUE_CHARS characters."""
    extras = {"rule": rule, "verdict": verdict}

    def value(name: str) -> str:
        text = alert_value(alert, name, extras)
        return text[:TOPIC_VALUE_CHARS].translate(_TOPIC_UNSAFE) if text else "_"

    return template.render(value)
