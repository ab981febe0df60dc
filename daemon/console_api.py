"""The operator's side of the HTTP API: recent alerts, snapshots, rules, stats, feedback,
Prometheus metrics, and the web console's static files.

GET  /v1/alerts                      recent alerts with verdicts and feedback, newest first
                                     (?camera_id= &box_id= &rule= &verdict= &before= &limit=)
GET  /v1/snapshots/{ref}/{idx}       a stored snapshot (?thumb=1: 320 px JPEG with the
                                     detection boxes drawn)
POST /v1/alerts/{alert_id}/feedback  {"rule", "correct" | "label", "fields", "note"} (?box_id=)
POST /v1/feedback                    the same with "alert_id" (and "box_id") in the body, as on
                                     MQTT (browsers rewrite the path of an alert_id "..")
GET  /v1/rules                       rules with their state, errors, last reload, counts
PUT  /v1/rules/{name}                save a rule file (TOML body, or JSON {"prompt", "kind",
                                     "event_types"}); the daemon uses it at once
POST /v1/try                         the playground: {"image": base64 | "snapshot": {"ref",
                                     "idx"}, "prompt" + "kind" | "rule_toml", "camera_id",
                                     "event_type"} -> verdict, P(real), fields, raw, latency
GET  /v1/stats                       per-rule stats and a timeline (?hours=24)
GET  /metrics                        Prometheus text format
GET  /console/                       the web console (static files, no build step)
"""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from PIL import Image
from pydantic import ValidationError

from daemon import feedback, history, metrics, playground
from daemon.config import describe_validation_error
from daemon.contract import Alert, utc_now
from daemon.http_api import busy, error, read_whole_body
from daemon.images import ImageError, decode, draw_detections
from daemon.journal import Journal
from plugins.canonical import decode_base64_image

if TYPE_CHECKING:
    from daemon.app import Daemon
    from daemon.rules import Rule

log = structlog.get_logger(__name__)

STATIC = Path(__file__).parent / "console"
#: what /console/static/ serves
CONSOLE_FILES = frozenset(path.name for path in STATIC.iterdir() if path.is_file())
THUMB_PX = 320
#: the largest row id or index there can be (SQLite's integers are 64-bit)
MAX_ID = 2**63 - 1
#: a row id names another snapshot once a journal is started afresh: never kept by browsers
NOT_STORED = {"Cache-Control": "no-store"}


#: how long the rules' verdict counts are reused (the Rules tab refreshes every 10 s)
RULE_COUNTS_MAX_AGE_S = 60.0


class ConsoleApi:
    """Routes over a running daemon's journal, rules and counters."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        #: the rules' verdict counts and when they were counted (a count of every verdict
        #: of the journal: not at each refresh of the Rules tab)
        self._rule_counts: tuple[float, dict[str, dict[str, int]]] | None = None

    def routes(self) -> list[web.AbstractRouteDef]:
        return [
            web.get("/v1/alerts", self.list_alerts),
            # more digits than a row id has: no such snapshot (404), not a number to parse
            web.get("/v1/snapshots/{ref:\\d{1,19}}/{idx:\\d{1,19}}", self.snapshot),
            web.post("/v1/alerts/{alert_id:[^/]+}/feedback", self.feedback),
            web.post("/v1/feedback", self.feedback),
            web.get("/v1/rules", self.rules),
            web.put("/v1/rules/{name}", self.save_rule),
            web.post("/v1/try", self.try_rule),
            web.get("/v1/stats", self.stats),
            web.get("/metrics", self.metrics),
            web.get("/console", self.console_root),
            web.get("/console/", self.console_index),
            web.get("/console/static/{name}", self.console_file),
        ]

    @property
    def journal(self) -> Journal:
        """The daemon's journal, open while the API runs."""
        assert self.daemon.journal is not None
        return self.daemon.journal

    async def list_alerts(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            before = _whole_number(q, "before", None, 1, MAX_ID)
            limit = _whole_number(q, "limit", 50, 1, 500)
        except _BadQuery as exc:
            return error(400, exc.message, exc.field)
        verdict = q.get("verdict") or None
        if verdict is not None and verdict not in history.VERDICT_KINDS:
            return error(400, f"one of {', '.join(history.VERDICT_KINDS)}", "verdict")
        where = history.AlertFilter(
            camera_id=q.get("camera_id") or None,
            box_id=q.get("box_id") or None,
            rule=q.get("rule") or None,
            verdict=verdict,
            before=before,
            limit=limit,
        )
        alerts = await history.recent_alerts(self.journal, where)
        for alert in alerts:
            for verdict in alert["verdicts"]:
                # what the correction form offers: the kind of the rule in force by that name
                rule = self.daemon.rules.get(verdict["rule"]) if verdict["rule"] else None
                verdict["kind"] = rule.kind if rule is not None else None
                verdict["answers"] = _answers(rule)
        return web.json_response({"alerts": alerts})

    async def snapshot(self, request: web.Request) -> web.Response:
        ref, idx = int(request.match_info["ref"]), int(request.match_info["idx"])
        stored = await history.snapshot(self.journal, ref, idx) if max(ref, idx) <= MAX_ID else None
        if stored is None:
            return error(404, "no such snapshot (never stored, or pruned)")
        data = stored.data
        if request.query.get("thumb") != "1":
            kind = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
            return web.Response(body=data, content_type=kind, headers=NOT_STORED)
        try:
            boxes = await self._boxes(ref) if stored.is_frame else []
        except KeyError:  # pruned since the snapshot was read
            return error(404, "no such snapshot (never stored, or pruned)")
        try:
            thumb = await asyncio.get_running_loop().run_in_executor(None, _thumbnail, data, boxes)
        except ImageError as exc:
            return error(422, str(exc))
        return web.Response(body=thumb, content_type="image/jpeg", headers=NOT_STORED)

    async def _boxes(self, ref: int) -> list[tuple[float, float, float, float]]:
        stored = await self.journal.load_alert(ref)
        return [(b.x1, b.y1, b.x2, b.y2) for b in stored.alert.boxes]

    async def feedback(self, request: web.Request) -> web.Response:
        source = request.headers.get("X-Feedback-Source") or "http"  # empty: not given
        if not (source.isascii() and source.isprintable()):
            return error(400, "printable ASCII only", "X-Feedback-Source")
        try:
            said = feedback.parse_feedback(await read_whole_body(request))
            stored = await feedback.record(
                self.journal,
                said,
                alert_id=feedback.alert_id_of(said, request.match_info.get("alert_id")),
                box_id=feedback.box_id_of(said, request.query.get("box_id")),
                source=source[:16],
                stats=self.daemon.stats,
                rules=self.daemon.rules,
            )
        except feedback.FeedbackError as exc:
            return error(exc.status, str(exc), exc.field)
        except sqlite3.Error as exc:
            return busy(f"the journal cannot write: {exc}")
        return web.json_response(stored, status=201)

    async def _counts_per_rule(self) -> dict[str, dict[str, int]]:
        now = time.monotonic()
        if self._rule_counts is None or now - self._rule_counts[0] > RULE_COUNTS_MAX_AGE_S:
            self._rule_counts = (now, await history.rule_counts(self.journal))
        return self._rule_counts[1]

    async def rules(self, request: web.Request) -> web.Response:
        book = self.daemon.rules
        counts = await self._counts_per_rule()
        rules = [
            {
                "name": rule.name,
                "file": rule.path.name,
                "description": rule.description,
                "kind": rule.kind,
                "enabled": rule.enabled,
                "shadow": rule.shadow,
                "priority": rule.priority,
                "exclusive": rule.exclusive,
                "event_types": list(rule.match.event_types),
                "prompt": rule.prompt.text,
                "text": book.text_of(rule),
                "digest": rule.digest,
                "since": _iso(book.since.get(rule.name)),
                "state": "disabled" if not rule.enabled else "shadow" if rule.shadow else "active",
                "counts": counts.get(rule.name, {}),
            }
            for rule in book.rules
        ]
        errors = [
            {"file": err.path.name, "where": err.where, "reason": err.reason} for err in book.errors
        ]
        return web.json_response(
            {
                "directory": str(book.directory),
                "loaded_at": _iso(book.loaded_at),
                "rules": rules,
                "errors": errors,
            }
        )

    async def try_rule(self, request: web.Request) -> web.Response:
        d = self.daemon
        try:
            body = await _json_object(request)
            _known_keys(body, TRY_KEYS)
            image, like = await self._playground_image(body)
            text = (
                _text(body, "rule_toml")
                if body.get("rule_toml")
                else playground.rule_toml(_text(body, "prompt"), kind=_prompt_kind(body))
            )
            rule = playground.load_rule(
                text,
                d.registry.rule_kinds,
                d.rules.check_choices,
                folder=d.rules.directory,
                is_file=False,
            )
            assert d.pipeline is not None
            result = await playground.try_rule(
                d.pipeline.reviewer,
                rule,
                image,
                camera_id=_text(body, "camera_id") if body.get("camera_id") else "playground",
                event_type=_text(body, "event_type") if body.get("event_type") else None,
                max_pixels=d.settings.images.max_input_pixels,
                like=like,
                gate=d.pipeline.gate,
            )
        except ValueError as exc:  # PlaygroundError, JSON errors
            return error(400, str(exc))
        return web.json_response({**result, "rule_toml": text})

    async def _playground_image(self, body: dict[str, Any]) -> tuple[bytes, Alert | None]:
        """The image to try, and for a stored snapshot its alert (with the request's
        `camera_id` and `event_type`, where given): the try sees what the review saw."""
        if isinstance(body.get("snapshot"), dict):
            ref, idx = body["snapshot"].get("ref"), body["snapshot"].get("idx", 0)
            if not all(type(n) is int and 0 <= n <= MAX_ID for n in (ref, idx)):
                raise playground.PlaygroundError(
                    f"snapshot: ref and idx must be whole numbers from 0 to {MAX_ID}"
                )
            stored = await history.snapshot(self.journal, ref, idx)
            try:
                stored_alert = await self.journal.load_alert(ref) if stored else None
            except KeyError:  # pruned since the snapshot was read
                stored_alert = None
            if stored is None or stored_alert is None:
                raise playground.PlaygroundError("snapshot: no such stored snapshot")
            if stored_alert.problem is not None:  # tried as its alert, it would be another
                raise playground.PlaygroundError(
                    f"snapshot: its alert fails the contract's checks ({stored_alert.problem}): "
                    "upload the image instead"
                )
            alert = stored_alert.alert
            given = {key: body[key] for key in ("camera_id", "event_type") if body.get(key)}
            if not stored.is_frame:  # the detection boxes are of the alert's frame
                given["boxes"] = []
            try:
                return stored.data, Alert.model_validate(alert.model_dump() | given)
            except ValidationError as exc:
                raise playground.PlaygroundError(describe_validation_error(exc)) from exc
        if body.get("image") is None:
            raise playground.PlaygroundError(
                'give an image (base64) or a stored snapshot ({"ref", "idx"})'
            )
        return decode_base64_image(body.get("image"), "image").data, None

    async def save_rule(self, request: web.Request) -> web.Response:
        d = self.daemon
        name = request.match_info["name"]
        if not d.model_started:
            # its tokenizer may refuse what passes now (answers it cannot tell apart)
            return error(
                503,
                "the model is loading: rules are checked against its tokenizer once it is "
                "ready; save the rule again then",
                **{"Retry-After": "5"},
            )
        try:
            if request.content_type == "application/json":
                body = await _json_object(request)
                _known_keys(body, SAVE_KEYS)
                event_types = _texts(body, "event_types")
                if not event_types:
                    raise playground.PlaygroundError(
                        'event_types: name the event types to review ("*" for all of them)'
                    )
                text = playground.rule_toml(
                    _text(body, "prompt"),
                    kind=_prompt_kind(body),
                    event_types=event_types,
                    description=_optional_text(body, "description"),
                )
            else:
                text = await _body_text(request)
            path, rule = playground.save_rule(
                d.rules.directory,
                name,
                text,
                d.registry.rule_kinds,
                d.rules.check_choices,
                overwrite=request.query.get("overwrite") == "1",
                in_force={rule.name: rule.path for rule in d.rules.rules},
                check_topic=d.rules.check_topic,
            )
        except playground.RuleFileExists as exc:
            return error(409, f"{exc}: add ?overwrite=1 to replace it", "name")
        except ValueError as exc:
            return error(400, str(exc))
        except OSError as exc:
            # e.g. a rules directory under /etc that the service may only read
            where = exc.filename or d.rules.directory
            return error(
                409,
                f"cannot write the rule into {where}: {exc.strerror or exc} (the rules "
                "directory must be writable by the daemon to save rules from the console)",
            )
        d.reload_rules()
        held = d.rules.get(rule.name)
        if held is None or held.path != path:  # changed meanwhile by another hand
            why = next((e.reason for e in d.rules.errors if e.path == path), "not read back")
            return error(409, f"written to {path.name}, but not in force: {why}", "rule")
        return web.json_response(
            {"name": rule.name, "file": path.name, "rule_toml": text}, status=201
        )

    async def stats(self, request: web.Request) -> web.Response:
        try:
            hours = float(request.query.get("hours", "24"))
            if not 0 < hours <= 24 * 366:
                raise ValueError
        except ValueError:
            return error(400, "hours must be a number above 0 and at most 8784 (366 days)", "hours")
        since = utc_now() - timedelta(hours=hours)
        per_rule = await history.rule_stats(self.journal, since)
        series = await history.timeline(self.journal, hours=hours)
        return web.json_response({"hours": hours, "rules": per_rule, "timeline": series})

    async def metrics(self, request: web.Request) -> web.Response:
        d = self.daemon
        pipeline = d.pipeline
        gauges: dict[str, float] = {
            "rules": len(d.rules.rules),
            "rule_errors": len(d.rules.errors),
            "unpublished": await d.count_unpublished(),
        }
        if pipeline is not None:
            gauges["queued"] = pipeline.backlog.queued
            gauges["backlog"] = pipeline.backlog.pending
            gauges["intake_paused"] = 1 if pipeline.busy_reason() else 0
        worker: dict[str, Any] = getattr(d.backend, "health", dict)()
        if "waiting" in worker:
            gauges["model_waiting"] = worker["waiting"]
        if "busy_for_s" in worker:
            gauges["model_busy_for_seconds"] = worker["busy_for_s"]
        if "batch_limit" in worker:
            gauges["model_batch_limit"] = worker["batch_limit"]
        gauges["healthy"] = 1 if d.status()[0] == "ok" else 0
        body = metrics.render(d.stats, gauges, worker)
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    async def console_root(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/console/")

    async def console_index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def console_file(self, request: web.Request) -> web.FileResponse:
        """One of the console's own files (a 404 for any other name is JSON, as all errors)."""
        name = request.match_info["name"]
        if name not in CONSOLE_FILES:
            raise web.HTTPNotFound()
        return web.FileResponse(STATIC / name)


def _thumbnail(data: bytes, boxes: list[tuple[float, float, float, float]]) -> bytes:
    img = decode(data)
    size = img.size
    img.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.BILINEAR)
    if boxes:  # drawn after scaling, so that the lines stay sharp
        img = draw_detections(img, boxes, size)
    out = io.BytesIO()
    # no chroma subsampling: it would wash out the thin red box lines
    img.save(out, "JPEG", quality=85, subsampling=0)
    return out.getvalue()


async def _body_text(request: web.Request) -> str:
    """The body as UTF-8 text, whatever charset the request names."""
    try:
        return (await read_whole_body(request)).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise playground.PlaygroundError(
            f"the body is not UTF-8 text: {exc.reason} at byte {exc.start}"
        ) from exc


async def _json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object (UTF-8, whatever charset the request names)."""
    try:
        body = json.loads(await _body_text(request))
    except RecursionError as exc:
        raise playground.PlaygroundError("JSON nested too deeply") from exc
    if not isinstance(body, dict):
        raise playground.PlaygroundError("expected a JSON object")
    return body


def _answers(rule: Rule | None) -> dict[str, Any] | None:
    """What a rule in force may answer, for the correction form: a classify rule's labels,
    an extract rule's fields and their types; None for other rules."""
    options = getattr(rule, "options", None)
    labels = getattr(options, "labels", None)
    if isinstance(labels, list | tuple):
        return {"labels": list(labels)}
    fields = getattr(options, "fields", None)
    if isinstance(fields, dict):
        return {"fields": {name: getattr(spec, "type", None) for name, spec in fields.items()}}
    return None


#: the keys of the JSON bodies of POST /v1/try and PUT /v1/rules/{name}
TRY_KEYS = frozenset(
    {"image", "snapshot", "prompt", "kind", "rule_toml", "camera_id", "event_type"}
)
SAVE_KEYS = frozenset({"prompt", "kind", "event_types", "description"})
#: a rule with labels or fields is sent as a rule file's text
AS_TOML = "send the rule file's text (rule_toml; a TOML body to PUT /v1/rules/{name})"


def _known_keys(body: dict[str, Any], known: frozenset[str]) -> None:
    """Refuse a key the request does not take (a rule's labels, say), not drop it."""
    if unknown := sorted(set(body) - known):
        raise playground.PlaygroundError(
            f"{unknown[0]}: not a key of this request (it takes {', '.join(sorted(known))}); "
            f"for a rule with labels or fields, {AS_TOML}"
        )


def _prompt_kind(body: dict[str, Any]) -> str:
    """The kind of a rule made of a prompt (verdict unless said)."""
    kind = body.get("kind", "verdict")
    if not isinstance(kind, str) or not kind:
        raise playground.PlaygroundError("kind: a rule kind's name is required")
    return playground.prompt_rule_kind(kind, AS_TOML)


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise playground.PlaygroundError(f"{key}: a non-empty text is required")
    return value


def _optional_text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise playground.PlaygroundError(f"{key}: a text is required")
    return value


def _texts(body: dict[str, Any], key: str) -> list[str]:
    """A text or a list of texts (none: an empty list)."""
    value = body.get(key) or []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise playground.PlaygroundError(f"{key}: a text or a list of texts is required")
    return values


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


class _BadQuery(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


def _whole_number(
    query: Mapping[str, str], key: str, default: int | None, low: int, high: int
) -> int | None:
    """A query parameter that must be a whole number in [low, high]."""
    text = query.get(key)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise _BadQuery(
            key, f"{key} must be a whole number from {low} to {high}, got {text[:40]!r}"
        )
    return value
