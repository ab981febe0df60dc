"""Operators' feedback on verdicts: right or wrong, or what the alert really was.

Arrives over HTTP (`POST /v1/alerts/{alert_id}/feedback`), from the web console, or on the
MQTT feedback topic; stored in the journal; counted in the stats (measured precision) and
exported as training data.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from daemon.contract import problem_text
from daemon.journal import FeedbackRow, Journal
from daemon.rules import Rule, RuleBook
from daemon.stats import StageStats

log = structlog.get_logger(__name__)


class FeedbackError(Exception):
    """Feedback that cannot be taken; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


class Feedback(BaseModel):
    """What an operator says about one verdict."""

    model_config = ConfigDict(extra="forbid")

    #: on MQTT and `POST /v1/feedback` (`POST /v1/alerts/{alert_id}/feedback`: in the path
    #: and the query)
    alert_id: str | None = Field(default=None, min_length=1, max_length=256)
    box_id: str | None = Field(default=None, min_length=1, max_length=256)
    #: the rule whose verdict is judged; may be left out when the alert has one verdict
    rule: str | None = Field(default=None, max_length=256)
    #: the verdict was right (true) or wrong (false)
    correct: StrictBool | None = None  # JSON's true or false: "yes" or 1 is no answer
    #: or: what the alert really was
    label: Literal["real", "false"] | None = None
    #: classify and extract rules: the right fields (classify: {"label": ...})
    fields: dict[str, Any] | None = None
    note: str | None = Field(default=None, max_length=2000)

    @model_validator(mode="after")
    def _says_something(self) -> Feedback:
        if self.correct is None and self.label is None and self.fields is None:
            raise ValueError("give correct (true/false), label (real/false) or fields")
        return self


def parse_feedback(payload: bytes | str | dict[str, Any]) -> Feedback:
    """Validate a feedback body; FeedbackError (400) names the field at fault."""
    try:
        if isinstance(payload, dict):
            return Feedback.model_validate(payload)
        return Feedback.model_validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        raise FeedbackError(400, f"{field or 'feedback'}: {problem_text(first)}", field) from exc


def alert_id_of(feedback: Feedback, in_path: str | None = None) -> str:
    """The alert the feedback is on: named in the URL's path, or in the body (both: alike)."""
    if in_path and feedback.alert_id is not None and feedback.alert_id != in_path:
        raise FeedbackError(400, "alert_id: the body names another alert than the path", "alert_id")
    alert_id = in_path or feedback.alert_id
    if alert_id is None:
        raise FeedbackError(400, "alert_id: field required", "alert_id")
    return alert_id


def box_id_of(feedback: Feedback, in_query: str | None = None) -> str | None:
    """The box that sent the alert, if named: in the query, or in the body (both: alike)."""
    if in_query and feedback.box_id is not None and feedback.box_id != in_query:
        raise FeedbackError(400, "box_id: the body names another box than the query", "box_id")
    return in_query or feedback.box_id


def judged(
    verdict: str, confidence: float | None, feedback: Feedback
) -> tuple[str | None, bool | None]:
    """(label, correct) completed from each other where the verdict allows it.

    A confirmed verdict is right when the alert was real, a rejected one when it was false.
    An uncertain or unreviewed verdict is neither: it takes a label (or corrected fields).
    Verdicts without a P(real) but reviewed (extract rules) keep what was given.
    """
    label, correct = feedback.label, feedback.correct
    if confidence is None and verdict != "unreviewed":
        return label, correct
    if verdict not in ("confirmed", "rejected"):
        if correct is not None:
            raise FeedbackError(
                400, f"an {verdict} verdict is neither right nor wrong: give label", "correct"
            )
        return label, None
    real_if_right = verdict == "confirmed"
    if label is not None:
        right = (label == "real") == real_if_right
        if correct is not None and correct != right:
            raise FeedbackError(
                400,
                f"label {label!r} and correct {correct} disagree on a {verdict} verdict",
                "correct",
            )
        return label, right
    if correct is None:
        return None, None  # corrected fields only
    return ("real" if correct == real_if_right else "false"), correct


def check_fields(fields: dict[str, Any], verdict: dict[str, Any], rule: Rule | None) -> None:
    """Corrected fields that could be the right answer: a classify verdict's one of its
    labels; an extract rule's its fields, each of its type (they become training targets).
    An unreviewed verdict takes none: the model gave no answer to correct."""
    if verdict.get("verdict") == "unreviewed":
        raise FeedbackError(
            400, "fields: an unreviewed verdict has no answer to correct; give label", "fields"
        )
    scores = (verdict.get("fields") or {}).get("scores")
    if isinstance(scores, dict):  # classify
        label = fields.get("label")
        if set(fields) != {"label"} or not isinstance(label, str) or label not in scores:
            raise FeedbackError(400, f'fields: give {{"label": one of {sorted(scores)}}}', "fields")
        return
    if rule is not None and rule.kind == "verdict":
        raise FeedbackError(
            400, "fields: a verdict rule has no fields to correct; give label or correct", "fields"
        )
    if rule is None or rule.kind != "extract":
        return  # the rule is gone, or of a kind whose fields are its own
    from plugins.extract import validate_fields  # the extract kind's own check

    _, problems = validate_fields(fields, rule.options.fields)
    if problems:
        raise FeedbackError(400, "fields: " + "; ".join(problems), "fields")


async def record(
    journal: Journal,
    feedback: Feedback,
    *,
    alert_id: str,
    box_id: str | None,
    source: str,
    stats: StageStats | None = None,
    rules: RuleBook | None = None,
) -> dict[str, Any]:
    """Store `feedback` on the alert's verdict; count and log it; answer what was stored.
    Corrected fields are checked against the verdict's labels and `rules`' fields."""
    rows = await _verdicts(journal, alert_id, box_id)
    if not rows:
        raise FeedbackError(404, f"no alert {alert_id!r}" + (f" from {box_id!r}" if box_id else ""))
    if len({row["alert_ref"] for row in rows}) > 1:
        raise FeedbackError(409, "several boxes sent this alert_id: give box_id", "box_id")
    reviewed = [row for row in rows if row["rule"] is not None]
    if not reviewed:
        waiting = rows[0]["payload"] is None
        raise FeedbackError(
            409,
            "the alert is not reviewed yet: try again once its verdict is out"
            if waiting
            else "no rule reviewed the alert (its verdict is of no rule): nothing to judge",
            "rule",
        )
    if feedback.rule is not None:
        reviewed = [row for row in reviewed if row["rule"] == feedback.rule]
        if not reviewed:
            raise FeedbackError(404, f"rule {feedback.rule!r} gave this alert no verdict", "rule")
    elif len(reviewed) != 1:
        rules = sorted(row["rule"] for row in reviewed)
        raise FeedbackError(400, f"the alert has verdicts of rules {rules}: give rule", "rule")
    row = reviewed[-1]
    verdict = json.loads(row["payload"])
    label, correct = judged(verdict["verdict"], verdict.get("confidence"), feedback)
    if feedback.fields is not None:
        check_fields(feedback.fields, verdict, rules.get(row["rule"]) if rules else None)
    stored = FeedbackRow(
        alert_ref=row["alert_ref"],
        rule=row["rule"],
        verdict=verdict["verdict"],
        label=label,
        correct=correct,
        fields=feedback.fields,
        note=feedback.note,
        source=source,
    )
    try:
        feedback_id = await journal.record_feedback(stored)
    except sqlite3.IntegrityError as exc:  # the foreign key: the alert was pruned meanwhile
        raise FeedbackError(404, f"no alert {alert_id!r}: pruned meanwhile") from exc
    if stats is not None:
        stats.count("feedback", rule=stored.rule, correct=str(correct).lower())
    log.info("feedback", alert_id=alert_id, rule=stored.rule, label=label, correct=correct)
    return {
        "id": feedback_id,
        "alert_id": alert_id,
        "box_id": verdict["box_id"],
        "rule": stored.rule,
        "verdict": stored.verdict,
        "label": label,
        "correct": correct,
    }


async def _verdicts(journal: Journal, alert_id: str, box_id: str | None) -> list[Any]:
    """The alert's verdict rows (the latest of each rule last), with the alert's row id; an
    alert without verdicts yet gives one row of NULLs."""
    sql = (
        "SELECT a.id AS alert_ref, v.rule, v.payload FROM alerts a LEFT JOIN verdicts v "
        "ON v.alert_ref = a.id WHERE a.alert_id = ?"
    )
    args: tuple[Any, ...] = (alert_id,)
    if box_id is not None:
        sql += " AND a.box_id = ?"
        args += (box_id,)
    return await journal.read(sql + " ORDER BY v.id", args)
