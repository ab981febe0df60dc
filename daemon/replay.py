"""`secondlook replay`: alert files through the daemon's own pipeline, without a broker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from daemon.app import Daemon
from daemon.config import Settings
from daemon.contract import Verdict
from daemon.pipeline import Pipeline


@dataclass(frozen=True)
class ReplayRow:
    file: Path
    verdict: Verdict | None = None
    error: str | None = None


def alert_files(paths: Iterable[Path]) -> list[Path]:
    """Files as given; directories contribute their `*.json`, sorted."""
    found: list[Path] = []
    for path in paths:
        found += sorted(path.glob("*.json")) if path.is_dir() else [path]
    return found


async def replay(settings: Settings, files: list[Path], console: Console) -> list[ReplayRow]:
    """Review each file in turn; a refused file becomes a row with its error."""
    daemon = Daemon(settings)
    pipeline = await daemon.open()
    rows: list[ReplayRow] = []
    try:
        with console.status(f"loading model {settings.model.path}"):
            await daemon.start_model()
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("reviewing", total=len(files))
            for path in files:
                rows += await _replay_one(pipeline, path)
                progress.advance(task)
    finally:
        await daemon.close()
    return rows


async def _replay_one(pipeline: Pipeline, path: Path) -> list[ReplayRow]:
    try:
        payload = await asyncio.to_thread(path.read_bytes)
    except OSError as exc:
        return [ReplayRow(path, error=f"cannot read: {exc.strerror}")]
    result = await pipeline.ingest(payload, source="replay", topic=str(path))
    if result.status == "refused":
        return [ReplayRow(path, error=str(result.error))]
    if result.status == "duplicate":
        return [ReplayRow(path, error="duplicate alert_id: reviewed once already")]
    verdicts = await pipeline.review(pipeline.queue.get_nowait())
    return [ReplayRow(path, verdict=v) for v in verdicts] or [ReplayRow(path, error="dropped")]


def verdict_table(rows: list[ReplayRow]) -> Table:
    table = Table(title="secondlook replay")
    for column in ("file", "alert", "event", "rule", "verdict", "P(real)", "ms", "reason"):
        table.add_column(column, overflow="fold")
    colours = {"confirmed": "red", "rejected": "green", "uncertain": "yellow"}
    for row in rows:
        v = row.verdict
        if v is None:
            table.add_row(row.file.name, "", "", "", "[bold]refused[/]", "", "", row.error or "")
            continue
        colour = colours.get(v.verdict.value, "dim")
        confidence = "" if v.confidence is None else f"{v.confidence:.3f}"
        reason = v.reason + (f" {v.fields}" if v.fields else "")
        table.add_row(
            row.file.name,
            v.alert_id,
            v.event_type,
            v.rule or "-",
            f"[{colour}]{v.verdict.value}[/]",
            confidence,
            str(v.latency_ms),
            reason,
        )
    return table
