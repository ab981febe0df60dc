"""`secondlook replay`: alert files through the daemon's own pipeline, without a broker."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from daemon.app import Daemon
from daemon.config import Settings
from daemon.contract import Alert, Verdict
from daemon.pipeline import Pipeline
from daemon.rules import Rule, RuleBook

#: a file no rule matched, with `[rules] unmatched = "drop"`
NO_RULE = 'no rule matched: dropped ([rules] unmatched = "drop")'
#: a file whose format took it in without an alert of its own (a Frigate event that waits for
#: its snapshot, or of a kind `[frigate] review` leaves out)
NO_ALERT = "no alert of its own: the format took it in without one (e.g. a Frigate event)"


@dataclass(frozen=True)
class ReplayRow:
    file: Path
    verdict: Verdict | None = None
    #: where the daemon would publish the verdict
    topic: str | None = None
    error: str | None = None

    def to_json(self) -> str:
        if self.verdict is None:
            return json.dumps({"file": str(self.file), "error": self.error})
        verdict = self.verdict.model_dump(mode="json", by_alias=True)
        return json.dumps({"file": str(self.file), "topic": self.topic, "verdict": verdict})


def alert_files(paths: Iterable[Path]) -> list[Path]:
    """Files as given; directories contribute their `*.json`, sorted."""
    found: list[Path] = []
    for path in paths:
        found += sorted(path.glob("*.json")) if path.is_dir() else [path]
    return found


class EachAlone(RuleBook):
    """The rules without cooldown and `max_age_s`: every alert gets a model call of its own,
    however many repeat each other and however old they are (for measuring rules)."""

    def match(self, alert: Alert) -> list[Rule]:
        return [
            dataclasses.replace(
                rule, max_age_s=None, cooldown=rule.cooldown.model_copy(update={"window_s": 0})
            )
            for rule in super().match(alert)
        ]


async def replay(
    settings: Settings,
    files: list[Path],
    console: Console,
    *,
    payloads: Mapping[Path, bytes] | None = None,
    each_alone: bool = False,
    on_row: Callable[[ReplayRow], None] | None = None,
) -> list[ReplayRow]:
    """Review each file in turn; a refused file becomes a row with its error.

    `payloads`: what to send for a file instead of its content. `each_alone`: rules judge
    every alert afresh (see `EachAlone`). `on_row`: called with each row once it is known.
    """
    daemon = Daemon(settings)
    if each_alone:
        daemon.rules = EachAlone(
            settings.rules.dir, daemon.registry.rule_kinds, check_topic=settings.mqtt.echo_of
        )
    pipeline = await daemon.open()
    pipeline.announce = False  # offline: verdicts go to no pager, webhook or other sink
    rows: list[ReplayRow] = []
    try:
        with console.status(f"loading model {settings.model.path}"):
            await daemon.start_model()
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("reviewing", total=len(files))
            for path in files:
                payload = payloads.get(path) if payloads is not None else None
                done = await _replay_one(pipeline, path, payload)
                if on_row is not None:
                    for row in done:
                        on_row(row)
                rows += done
                progress.advance(task)
    finally:
        await daemon.close()
    return rows


async def _replay_one(pipeline: Pipeline, path: Path, payload: bytes | None) -> list[ReplayRow]:
    if payload is None:
        try:
            payload = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            return [ReplayRow(path, error=f"cannot read: {exc.strerror}")]
    result = await pipeline.ingest(payload, source="replay", topic=printable(path))
    if result.status == "refused":
        return [ReplayRow(path, error=str(result.error))]
    if result.status == "duplicate":
        return [ReplayRow(path, error="duplicate alert_id: reviewed once already")]
    if result.status == "busy":
        return [ReplayRow(path, error=f"not taken: {result.busy_reason}")]
    if result.status == "consumed":
        return [ReplayRow(path, error=NO_ALERT)]
    ref = await pipeline.backlog.take()
    try:
        planned = await pipeline.review(ref) or []
    finally:
        pipeline.backlog.done(ref, reviewed=True)
    rows = [ReplayRow(path, verdict=p.verdict, topic=p.topic) for p in planned]
    if rows:
        return rows
    if result.alert is not None and not pipeline.rules.match(result.alert):
        return [ReplayRow(path, error=NO_RULE)]
    return [ReplayRow(path, error="dropped (the rule's on_error)")]


def printable(path: Path | str) -> str:
    """A path as text: a name that is no UTF-8 (surrogates in Python) can neither be stored
    nor printed as it is."""
    return os.fsencode(path).decode("utf-8", "replace")


def verdict_table(rows: list[ReplayRow], shadow_prefix: str | None = None) -> Table:
    table = Table(title="secondlook replay")
    for column in ("file", "alert", "rule", "verdict", "P(real)", "ms", "reason"):
        table.add_column(column, overflow="fold")
    colours = {"confirmed": "red", "rejected": "green", "uncertain": "yellow"}
    for row in rows:
        v = row.verdict
        # text from files, alerts and the model is shown as it is, never read as markup
        if v is None:
            table.add_row(
                Text(printable(row.file.stem)),
                "",
                "",
                "[bold]refused[/]",
                "",
                "",
                Text(row.error or ""),
            )
            continue
        shadow = bool(shadow_prefix and row.topic and row.topic.startswith(shadow_prefix))
        colour = colours.get(v.verdict.value, "dim")
        confidence = "" if v.confidence is None else f"{v.confidence:.3f}"
        extracted = {k: f for k, f in v.fields.items() if k != "scores"}
        reason = v.reason + (f" {json.dumps(extracted)}" if extracted else "")
        table.add_row(
            Text(printable(row.file.stem)),
            Text(v.alert_id),
            Text((v.rule or "-") + (" (shadow)" if shadow else "")),
            f"[{colour}]{v.verdict.value}[/]",
            confidence,
            str(v.latency_ms),
            Text(reason[:160]),
        )
    return table
