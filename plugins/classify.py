"""Rule kind `classify`: the model picks one of several labels, scored in one forward pass.

Each label is scored from the first-token logits of its surface forms (the label, its
capitalised form, each with and without a leading space); the probabilities are a softmax
over the labels. The rule maps labels to confirmed or rejected.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from daemon.contract import Alert, VerdictKind
from daemon.hookspecs import hookimpl
from daemon.plugin_api import Answer, ChoiceAnswer, ChoiceQuery, Judgement
from daemon.rules import Rule
from daemon.templates import without_control_tokens


def surface_forms(label: str) -> tuple[str, ...]:
    forms = dict.fromkeys([label, label.lower(), label.capitalize()])
    return tuple(forms) + tuple(" " + form for form in forms)


class ClassifyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: what the model may answer, e.g. ["fire", "lamp", "reflection", "sunlight"]
    labels: list[str] = Field(min_length=2)
    #: labels that make the alert real
    confirm: list[str] = Field(min_length=1)
    #: labels that make it a false alarm; any other label gives `uncertain`
    reject: list[str] = Field(default_factory=list)
    #: below this probability of the top label the verdict is `uncertain`
    min_confidence: float = Field(default=0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _known_labels(self) -> ClassifyOptions:
        if "" in self.labels:
            raise ValueError("a label cannot be empty")
        for label in self.labels:
            without_control_tokens(label, f"label {label!r}")
        padded = [label for label in self.labels if label != label.strip()]
        if padded:
            raise ValueError(f"labels cannot begin or end with a space: {padded!r}")
        seen: dict[str, str] = {}
        for label in self.labels:
            if (twin := seen.get(label.lower())) is not None:
                raise ValueError(f"labels must be distinct: {twin!r} and {label!r}")
            seen[label.lower()] = label
        for key in ("confirm", "reject"):
            named = getattr(self, key)
            unknown = [label for label in named if label not in self.labels]
            if unknown:
                raise ValueError(f"{key} names labels not in labels: {', '.join(unknown)}")
            if len(set(named)) != len(named):
                raise ValueError(f"{key} names a label twice: {named!r}")
        if set(self.confirm) & set(self.reject):
            raise ValueError("a label cannot both confirm and reject")
        return self


class Classify:
    name: ClassVar[str] = "classify"
    Options: ClassVar[type[BaseModel]] = ClassifyOptions

    def choices(self, rule: Rule) -> dict[str, tuple[str, ...]]:
        options = rule.options
        assert isinstance(options, ClassifyOptions)
        return {label: surface_forms(label) for label in options.labels}

    def compose(self, alert: Alert, rule: Rule) -> ChoiceQuery:
        return ChoiceQuery(prompt=rule.prompt_for(alert), choices=self.choices(rule))

    def interpret(self, answer: Answer, rule: Rule) -> Judgement:
        if not isinstance(answer, ChoiceAnswer):
            raise TypeError(f"classify rules need choice scores, got {type(answer).__name__}")
        options = rule.options
        assert isinstance(options, ClassifyOptions)
        scores = dict(answer.probabilities)
        top = max(scores, key=scores.__getitem__)
        # a sum of probabilities can round a step past 1
        p_real = min(1.0, sum(scores[label] for label in options.confirm))
        if scores[top] < options.min_confidence:
            verdict = VerdictKind.UNCERTAIN
        elif top in options.confirm:
            verdict = VerdictKind.CONFIRMED
        elif top in options.reject:
            verdict = VerdictKind.REJECTED
        else:
            verdict = VerdictKind.UNCERTAIN
        ranked = ", ".join(
            f"{label} {p:.2f}" for label, p in sorted(scores.items(), key=lambda i: -i[1])
        )
        fields = {"label": top, "scores": {label: round(p, 6) for label, p in scores.items()}}
        return Judgement(verdict, p_real, f"label {top!r} ({ranked})", fields)


@hookimpl
def register_rule_kinds(register):
    register(Classify())
