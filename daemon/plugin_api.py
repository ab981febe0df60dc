"""The types plugins implement or receive: rule kinds, alert formats, backends.

A rule kind turns an alert into a model query and the model's answer into a judgement;
it never calls the model itself, so the host can batch, retry and time model calls.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel

from daemon.contract import Alert, VerdictKind

if TYPE_CHECKING:
    from PIL.Image import Image

    from daemon.config import ModelSettings
    from daemon.rules import Rule


class AlertError(ValueError):
    """A payload that is not a valid alert; `field` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ModelLoadError(RuntimeError):
    """A backend could not load its model; the message says what to do."""


class BackendUnusable(RuntimeError):
    """The backend can answer nothing more (a CUDA error that poisons the context): the
    daemon stops with a non-zero status so that systemd restarts it, and the alerts it was
    reviewing stay in the journal for the next run."""


@dataclass(frozen=True)
class RawImage:
    """Snapshot bytes as received; `source` names the payload field it came from."""

    source: str
    data: bytes


@dataclass(frozen=True)
class IncomingAlert:
    """An alert parsed by an alert format: contract fields plus its snapshots' bytes."""

    alert: Alert
    images: Sequence[RawImage] = ()


@dataclass(frozen=True)
class ChoiceQuery:
    """Score answer choices from the first answer token's logits, in one forward pass.

    `choices` maps a label to its surface forms ("yes", "Yes", " yes" ...); a label's
    score is the log-sum-exp of the logits of its forms' first tokens.
    """

    prompt: str
    choices: Mapping[str, Sequence[str]]


#: the longest answer a query may ask for, in tokens
MAX_NEW_TOKENS = 4096


@dataclass(frozen=True)
class GenerateQuery:
    """Generate text greedily, e.g. a JSON object of extracted fields."""

    prompt: str
    #: None: the backend's configured limit; else 1 to MAX_NEW_TOKENS
    max_new_tokens: int | None = None
    #: JSON schema the answer must follow, for backends that can constrain generation
    json_schema: Mapping[str, Any] | None = None


Query = ChoiceQuery | GenerateQuery


@dataclass(frozen=True)
class ChoiceAnswer:
    """Probabilities (softmax over the labels' scores) and the scores themselves."""

    probabilities: Mapping[str, float]
    logits: Mapping[str, float]

    def raw(self) -> str:
        """The answer as shown to operators: each label's probability and score."""
        return json.dumps(
            {
                label: {"p": round(p, 6), "logit": round(self.logits.get(label, 0.0), 4)}
                for label, p in self.probabilities.items()
            }
        )


@dataclass(frozen=True)
class TextAnswer:
    text: str

    def raw(self) -> str:
        return self.text


Answer = ChoiceAnswer | TextAnswer


@dataclass(frozen=True)
class ModelRequest:
    """A query plus the images (already scaled to the token budget) it is about."""

    query: Query
    images: Sequence[Image] = ()
    #: a LoRA adapter directory to apply for this request (None: the base model); only
    #: backends that say `applies_adapters = True` are given such requests
    adapter: str | None = None


def refuse_adapter(request: ModelRequest, model: str) -> None:
    """For backends that serve a fixed model: a rule's LoRA adapter cannot be honoured."""
    if request.adapter is not None:
        raise ValueError(
            f"the backend of {model!r} cannot apply LoRA adapters ([review] adapter = "
            f"{request.adapter!r}); use the transformers backend, or serve the merged model"
        )


@dataclass(frozen=True)
class Judgement:
    """A rule kind's reading of the model's answer."""

    verdict: VerdictKind
    confidence: float | None
    reason: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    #: what the model was asked and what it answered (filled in by the host)
    prompt: str | None = None
    raw: str | None = None


class RuleKind(Protocol):
    """A kind of review (`[review] kind = ...` in a rule file).

    A kind that asks ChoiceQuery may also define `choices(rule)` returning the query's
    choices: the host then checks, when the rule is loaded, that the model's tokenizer can
    tell the answers apart by their first token.
    """

    name: ClassVar[str]
    #: validates the kind's own keys of the rule's `[review]` table (extra keys forbidden)
    Options: ClassVar[type[BaseModel]]

    def compose(self, alert: Alert, rule: Rule) -> Query: ...

    def interpret(self, answer: Answer, rule: Rule) -> Judgement: ...


#: set while the payload being parsed is an MQTT message the broker kept (retained)
_RETAINED: ContextVar[bool] = ContextVar("secondlook_message_retained", default=False)


def message_retained() -> bool:
    """Whether the payload an alert format parses now is a retained MQTT message: one the
    broker kept and sends at subscribing (at every reconnect, on MQTT 3.1.1), however old,
    not one published just now."""
    return _RETAINED.get()


@contextmanager
def parsing_retained(retained: bool) -> Iterator[None]:
    """What `message_retained` says within (the MQTT intake sets it per message)."""
    token = _RETAINED.set(retained)
    try:
        yield
    finally:
        _RETAINED.reset(token)


class AlertFormat(Protocol):
    """Turns a payload in some box vendor's shape into an IncomingAlert.

    `parse` may return None for a payload that carries no alert of its own (a format that
    collects snapshots from one topic for events on another, say). `message_retained()`
    tells a retained MQTT message from a live one.
    """

    name: str

    def parse(self, payload: bytes, *, topic: str | None) -> IncomingAlert | None: ...


@runtime_checkable
class Backend(Protocol):
    """Runs model requests. `start` loads the model; `run` may be called concurrently.

    `image_factor` is the side, in pixels, of the square one visual token covers; the host
    scales images to multiples of it within the token budget. A backend that scores choices
    from its own tokenizer may also define `check_choices(choices)`, raising ValueError when
    two answers share their first token; rules are then checked against it when loaded.
    One that can apply a rule's LoRA adapter (`ModelRequest.adapter`) says
    `applies_adapters = True`; the host refuses such requests to the others. One that can
    fail for good may define `health()` (see docs/hooks.md).
    """

    model_name: str
    image_factor: int

    async def start(self) -> None: ...

    async def run(self, request: ModelRequest) -> Answer: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class RecentReview:
    """A model review of a rule, kept a while so that repeats of its alert can reuse it."""

    alert_id: str
    boxes: Sequence[tuple[float, float, float, float]]
    judgement: Judgement
    #: time.monotonic() of the model call
    at: float
    #: when the reviewed alert happened (its `occurred_at`)
    occurred_at: datetime


class BackendFactory(Protocol):
    def __call__(self, settings: ModelSettings) -> Backend: ...
