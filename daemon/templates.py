"""`{field}` templates for prompts and topics, filled from an alert's values as plain data.

A template names contract fields (`{camera_id}`) or keys of the alert's `extra` object
(`{extra.zone}`, `{extra.line.name}`); `{{` and `}}` are literal braces. Names are checked
when the template is read, so a typo is a load-time error. Filling never evaluates anything:
alert text is inserted as it is (prompts) or made topic-safe (topics).
"""

from __future__ import annotations

import re
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
#: what brokers refuse in a topic name (mosquitto drops the connection of a client that
#: publishes one): control characters and Unicode noncharacters
_TOPIC_REFUSED = "\x00-\x1f\x7f-\x9f\ufdd0-\ufdef" + "".join(
    chr(plane + 0xFFFE) + chr(plane + 0xFFFF) for plane in range(0, 0x110000, 0x10000)
)
_TOPIC_REFUSED_RE = re.compile(f"[{_TOPIC_REFUSED}]")
#: ... and, in an alert's value, what would add levels or wildcards
_TOPIC_UNSAFE_RE = re.compile(f"[/+#{_TOPIC_REFUSED}]")
#: characters of one alert value in a prompt (the prompt's length is the model's work)
PROMPT_VALUE_CHARS = 1024
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
                field = name not in known and not (name.startswith("extra.") and len(name) > 6)
                if field and (spec or conversion or not name.replace(".", "_").isidentifier()):
                    # JSON or other text in braces, not a field: {"a": 1}
                    raise ValueError(
                        f"{{{name}{':' if spec else ''}{spec}}} is no field; write {{{{ and }}}} "
                        "for literal braces"
                    )
                if spec or conversion:
                    raise ValueError(f"{{{name}}}: format specs and conversions are not allowed")
                if field:
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
    """Fill a prompt; each alert value is cut to PROMPT_VALUE_CHARS characters, and cannot
    carry the chat format's control tokens (see `prompt_text`)."""
    return template.render(lambda name: prompt_text(alert_value(alert, name) or MISSING))


def without_control_tokens(value: str, what: str) -> str:
    """A rule's own text for the model (its prompt, a label, a field's name or description),
    refused (ValueError naming `what`) when it holds the chat format's control tokens."""
    if "<|" in value:
        raise ValueError(f"{what} cannot hold the model's control tokens (<|...|>)")
    return value


def prompt_text(value: str) -> str:
    """An alert value as plain prompt text: `<|` becomes `< |`, so that no part of it is read
    as one of the model's control tokens (`<|im_end|>`, `<|image_pad|>` ...), which would end
    the user's turn or ask for an image that is not there."""
    text = value[:PROMPT_VALUE_CHARS].replace("<|", "< |")
    # nor with its neighbour: "<" ending one value, "|im_end|>" starting the next
    return (" " if text.startswith("|") else "") + text + (" " if text.endswith("<") else "")


def check_topic_template(text: str) -> Template:
    if not text.strip():
        raise ValueError("topic template is empty")
    if "+" in text or "#" in text:
        raise ValueError("a publish topic cannot contain the wildcards + or #")
    if text.startswith("$"):
        raise ValueError("a publish topic cannot start with $ (the broker's own topics)")
    if found := _TOPIC_REFUSED_RE.search(text):
        raise ValueError(f"a topic cannot contain the character U+{ord(found[0]):04X}")
    return Template.parse(text, also=TOPIC_FIELDS)


def render_topic(template: Template, alert: Alert, *, rule: str | None, verdict: str) -> str:
    """Fill a topic template; alert values cannot add levels or wildcards, nor start the
    topic with `$` (the broker's own topics, which subscribers to `#` never see), and each
    is cut to its first TOPIC_VALUE_CHARS characters."""
    extras = {"rule": rule, "verdict": verdict}

    def value(name: str) -> str:
        text = alert_value(alert, name, extras)
        return _TOPIC_UNSAFE_RE.sub("_", text[:TOPIC_VALUE_CHARS]) if text else "_"

    topic = template.render(value)
    return "_" + topic[1:] if topic.startswith("$") else topic
