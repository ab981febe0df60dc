"""Every hook secondlook calls. Plugins implement them with `@hookimpl` (see docs/hooks.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("secondlook")
hookimpl = pluggy.HookimplMarker("secondlook")


@hookspec
def register_rule_kinds(register: Callable[[Any], None]) -> None:
    """Register rule kinds: call `register(kind)` with an object that has `name`, an
    `Options` pydantic model for the kind's `[review]` keys, `compose(alert, rule)` returning
    a ChoiceQuery or GenerateQuery, and `interpret(answer, rule)` returning a Judgement."""


@hookspec
def register_alert_formats(register: Callable[[Any], None], settings: Any) -> None:
    """Register alert formats: call `register(fmt)` with an object that has `name` and
    `parse(payload, *, topic)` returning an IncomingAlert (or None for a payload that is not
    an alert of its own) or raising AlertError. `settings` is the daemon's configuration."""


@hookspec
def register_backends(register: Callable[[str, Any], None]) -> None:
    """Register model backends: call `register(name, factory)`; `factory(model_settings)`
    returns a Backend (`start`, `run(request)`, `close`, `model_name`, `image_factor`)."""


@hookspec(firstresult=True)
def suppress_alert(alert: Any, rule: Any, recent: Any) -> Any:
    """Spare the model a repeat: return a Judgement to use instead of a model call, or None.

    `recent` lists the rule's model reviews (RecentReview) of the same box, camera and event
    type within the rule's `[cooldown] window_s` of this review and of this alert's
    `occurred_at`, newest first. Called only for rules with a
    cooldown window. Must be synchronous: the first non-None answer wins.
    """


@hookspec
def verdict_ready(alert: Any, rule: Any, verdict: Any) -> Any:
    """Called once a verdict is journalled and handed to the outbox (it may be published
    already), beside the next reviews, with a copy of the alert. `rule` is None for a verdict of
    no rule (no rule matched, only shadow rules matched, the review was interrupted
    `max_attempts` times, or a journalled alert fails the contract's checks). May return an
    awaitable, which the host awaits (60 s at most); errors are logged."""
