"""Rule kind `verdict`: P(real) from the first answer token's yes/no logits."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from daemon.contract import Alert, VerdictKind
from daemon.hookspecs import hookimpl
from daemon.plugin_api import Answer, ChoiceAnswer, ChoiceQuery, Judgement
from daemon.rules import Rule

#: surface forms of the two answers: case and leading-space variants
YES_FORMS = ("yes", "Yes", "YES", " yes", " Yes", " YES")
NO_FORMS = ("no", "No", "NO", " no", " No", " NO")


class VerdictOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: P(real) at or above this confirms
    confirm_at: float = Field(default=0.6, ge=0, le=1)
    #: P(real) below this rejects; in between is uncertain
    reject_below: float = Field(default=0.4, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> VerdictOptions:
        if self.reject_below > self.confirm_at:
            raise ValueError("reject_below must not be above confirm_at")
        return self


def classify(p_real: float, options: VerdictOptions) -> VerdictKind:
    if p_real >= options.confirm_at:
        return VerdictKind.CONFIRMED
    if p_real < options.reject_below:
        return VerdictKind.REJECTED
    return VerdictKind.UNCERTAIN


class YesNoVerdict:
    name: ClassVar[str] = "verdict"
    Options: ClassVar[type[BaseModel]] = VerdictOptions

    def choices(self, rule: Rule) -> dict[str, tuple[str, ...]]:
        return {"yes": YES_FORMS, "no": NO_FORMS}

    def compose(self, alert: Alert, rule: Rule) -> ChoiceQuery:
        return ChoiceQuery(prompt=rule.prompt_for(alert), choices=self.choices(rule))

    def interpret(self, answer: Answer, rule: Rule) -> Judgement:
        if not isinstance(answer, ChoiceAnswer):
            raise TypeError(f"verdict rules need choice scores, got {type(answer).__name__}")
        options = rule.options
        assert isinstance(options, VerdictOptions)
        p_real = float(answer.probabilities["yes"])
        verdict = classify(p_real, options)
        reason = (
            f"P(real)={p_real:.3f}; confirm at >= {options.confirm_at}, "
            f"reject below {options.reject_below}"
        )
        return Judgement(verdict=verdict, confidence=p_real, reason=reason)


@hookimpl
def register_rule_kinds(register):
    register(YesNoVerdict())
