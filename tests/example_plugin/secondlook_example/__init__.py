"""Example secondlook plugin: a rule kind and a verdict side effect."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from daemon.contract import VerdictKind
from daemon.hookspecs import hookimpl
from daemon.plugin_api import ChoiceAnswer, ChoiceQuery, Judgement

#: (alert_id, rule, verdict) of every verdict seen
VERDICTS: list[tuple[str, str | None, str]] = []


class BinaryOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    threshold: float = Field(default=0.5, ge=0, le=1)


class Binary:
    """The model answers "real" or "fake"."""

    name: ClassVar[str] = "binary"
    Options: ClassVar[type[BaseModel]] = BinaryOptions

    def choices(self, rule):
        return {"real": ("real", "Real", " real"), "fake": ("fake", "Fake", " fake")}

    def compose(self, alert, rule):
        return ChoiceQuery(rule.prompt_for(alert), self.choices(rule))

    def interpret(self, answer, rule):
        assert isinstance(answer, ChoiceAnswer)
        p_real = answer.probabilities["real"]
        confirmed = p_real >= rule.options.threshold
        verdict = VerdictKind.CONFIRMED if confirmed else VerdictKind.REJECTED
        return Judgement(verdict, p_real, f"binary: P(real)={p_real:.3f}")


@hookimpl
def register_rule_kinds(register):
    register(Binary())


@hookimpl
def verdict_ready(alert, rule, verdict):
    VERDICTS.append((alert.alert_id, rule.name if rule else None, verdict.verdict.value))
