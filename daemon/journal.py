"""The journal: a SQLite file (WAL, fsync on commit) holding alerts, snapshots, verdicts.

An alert is committed here before anyone is told it was received; a verdict is committed
here before it is published, and marked published only after the broker acknowledged it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from daemon.contract import Alert, Verdict, utc_now
from daemon.plugin_api import RawImage

SCHEMA_VERSION = 3
SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id          INTEGER PRIMARY KEY,
    box_id      TEXT NOT NULL,
    alert_id    TEXT NOT NULL,
    alert       TEXT NOT NULL,              -- canonical alert JSON, images excluded
    source      TEXT NOT NULL,              -- mqtt | http | replay
    topic       TEXT,
    received_at TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'received',   -- received | reviewed
    attempts    INTEGER NOT NULL DEFAULT 0,
    reviewed_at TEXT,
    priority    INTEGER NOT NULL DEFAULT 0,  -- of the rules it matched at intake
    UNIQUE (box_id, alert_id)
);
CREATE INDEX IF NOT EXISTS alerts_pending ON alerts (priority DESC, id) WHERE state = 'received';
CREATE INDEX IF NOT EXISTS alerts_reviewed ON alerts (reviewed_at) WHERE state = 'reviewed';
CREATE INDEX IF NOT EXISTS alerts_by_alert_id ON alerts (alert_id);
CREATE TABLE IF NOT EXISTS alert_images (
    alert_ref INTEGER NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
    idx       INTEGER NOT NULL,
    source    TEXT NOT NULL,
    data      BLOB NOT NULL,
    PRIMARY KEY (alert_ref, idx)
);
CREATE TABLE IF NOT EXISTS verdicts (
    id           INTEGER PRIMARY KEY,
    alert_ref    INTEGER NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
    rule         TEXT,
    verdict      TEXT NOT NULL,
    topic        TEXT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    published_at TEXT,
    prompt       TEXT,                      -- what the model was asked
    raw          TEXT                       -- what it answered (scores as JSON, or text)
);
CREATE INDEX IF NOT EXISTS verdicts_unpublished ON verdicts (id) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS verdicts_by_alert ON verdicts (alert_ref);
CREATE TABLE IF NOT EXISTS feedback (
    id          INTEGER PRIMARY KEY,
    alert_ref   INTEGER NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
    rule        TEXT NOT NULL,
    verdict     TEXT NOT NULL,              -- the verdict the operator judged
    label       TEXT,                       -- real | false: what the alert really was
    correct     INTEGER,                    -- 1: the verdict was right, 0: wrong
    fields      TEXT,                       -- extract rules: the corrected fields (JSON)
    note        TEXT,
    source      TEXT NOT NULL,              -- http | mqtt | console
    created_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_by_alert ON feedback (alert_ref, rule);
CREATE TABLE IF NOT EXISTS rejects (
    id          INTEGER PRIMARY KEY,
    received_at TEXT NOT NULL,
    source      TEXT NOT NULL,
    topic       TEXT,
    field       TEXT NOT NULL,
    error       TEXT NOT NULL,
    payload     BLOB NOT NULL               -- the first bytes, for diagnosis
);
"""
REJECT_PAYLOAD_BYTES = 4096


@dataclass(frozen=True)
class StoredAlert:
    ref: int
    alert: Alert
    images: list[RawImage]
    received_at: datetime
    attempts: int
    state: str


@dataclass(frozen=True)
class Recorded:
    """The journal row of an alert: new, or the first one of a resend."""

    ref: int
    new: bool
    reviewed: bool


@dataclass(frozen=True)
class OutboxItem:
    id: int
    topic: str
    payload: str


@dataclass(frozen=True)
class PlannedVerdict:
    """A verdict and the topic it goes to, about to be journalled."""

    verdict: Verdict
    topic: str
    #: what the model was asked and what it answered, when it was asked
    prompt: str | None = None
    raw: str | None = None


@dataclass(frozen=True)
class FeedbackRow:
    """An operator's judgement of the verdict `rule` gave the alert at row `alert_ref`."""

    alert_ref: int
    rule: str
    verdict: str
    #: what the alert really was: real | false (None: not said, e.g. an extract rule)
    label: str | None
    #: whether the verdict was right (None: neither, e.g. for an uncertain verdict)
    correct: bool | None
    #: extract and classify rules: the corrected fields
    fields: dict[str, Any] | None = None
    note: str | None = None
    source: str = "http"


@dataclass(frozen=True)
class Pruned:
    alerts: int
    snapshots: int
    #: all snapshots together, after pruning
    snapshot_bytes: int


WriteOp = Callable[[aiosqlite.Connection], Awaitable[Any]]


class Journal:
    """Two connections to one file: writes go through a group-commit queue on one, reads use
    the other (WAL lets them run side by side, and readers only ever see committed data)."""

    def __init__(self, writer: aiosqlite.Connection, reader: aiosqlite.Connection, path: Path):
        self._db = writer
        self._reader = reader
        self.path = path
        self._pending: list[tuple[WriteOp, asyncio.Future[Any]]] = []
        self._flushing: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: Path) -> Journal:
        path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit mode: the writer opens and commits its transactions itself
        writer = await aiosqlite.connect(path, isolation_level=None)
        # pages freed by pruning go back to the file system (takes effect in a new file)
        await writer.execute("PRAGMA auto_vacuum = INCREMENTAL")
        await writer.execute("PRAGMA journal_mode = WAL")
        await writer.execute("PRAGMA synchronous = FULL")
        await writer.execute("PRAGMA foreign_keys = ON")
        await _migrate(writer)
        await writer.executescript(SCHEMA)
        await writer.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        reader = await aiosqlite.connect(path, isolation_level=None)
        reader.row_factory = aiosqlite.Row
        return cls(writer, reader, path)

    async def close(self) -> None:
        if self._flushing is not None:
            await self._flushing
        await self._db.close()
        await self._reader.close()

    # writes ------------------------------------------------------------------------------

    async def _write(self, op: WriteOp) -> Any:
        """Run `op` in the next group commit; return once that commit is on disk.

        Writes that arrive while a commit is under way share the next one: one fsync for
        many alerts under load, and no waiting at all when idle.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                for op, future in batch:
                    # a savepoint each: one failing write does not undo the others
                    await self._db.execute("SAVEPOINT op")
                    try:
                        results.append((future, await op(self._db), None))
                        await self._db.execute("RELEASE op")
                    except sqlite3.Error as exc:
                        if not self._db.in_transaction:
                            raise  # SQLite undid the whole transaction (disk full, I/O error)
                        await self._db.execute("ROLLBACK TO op")
                        await self._db.execute("RELEASE op")
                        results.append((future, None, exc))
                await self._db.execute("COMMIT")
            except BaseException as exc:
                # the commit itself failed (disk full, I/O error): nothing in it is durable
                if self._db.in_transaction:
                    await self._db.execute("ROLLBACK")
                results = [(future, None, exc) for _, future in batch]
                if not isinstance(exc, Exception):
                    raise
            finally:
                for future, value, error in results:
                    if future.done():
                        continue
                    if error is None:
                        future.set_result(value)
                    else:
                        future.set_exception(error)

    async def record_alert(
        self,
        alert: Alert,
        images: Sequence[RawImage],
        *,
        source: str,
        topic: str | None,
        received_at: datetime | None = None,
        priority: int = 0,
    ) -> Recorded:
        """Journal a new alert; for a resend, say where the first one stands."""
        received = (received_at or utc_now()).isoformat()
        values = (alert.box_id, alert.alert_id, alert.model_dump_json(), source, topic, received)

        async def op(db: aiosqlite.Connection) -> Recorded:
            cursor = await db.execute(
                "INSERT INTO alerts (box_id, alert_id, alert, source, topic, received_at, "
                "priority) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (box_id, alert_id) DO NOTHING",
                (*values, priority),
            )
            if cursor.rowcount == 0:
                async with db.execute(
                    "SELECT id, state FROM alerts WHERE box_id = ? AND alert_id = ?",
                    (alert.box_id, alert.alert_id),
                ) as rows:
                    row = await rows.fetchone()
                assert row is not None
                return Recorded(int(row[0]), new=False, reviewed=row[1] == "reviewed")
            ref = int(cursor.lastrowid or 0)
            await db.executemany(
                "INSERT INTO alert_images (alert_ref, idx, source, data) VALUES (?, ?, ?, ?)",
                [(ref, i, image.source, image.data) for i, image in enumerate(images)],
            )
            return Recorded(ref, new=True, reviewed=False)

        return await self._write(op)

    async def record_reject(
        self, *, source: str, topic: str | None, field: str, error: str, payload: bytes
    ) -> None:
        row = (utc_now().isoformat(), source, topic, field, error, payload[:REJECT_PAYLOAD_BYTES])
        await self._write(
            lambda db: db.execute(
                "INSERT INTO rejects (received_at, source, topic, field, error, payload) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                row,
            )
        )

    async def begin_review(self, ref: int) -> int:
        """Count one more review attempt, durably before the review starts, so that an alert
        that crashes the daemon is given up after a few attempts instead of forever."""

        async def op(db: aiosqlite.Connection) -> int:
            await db.execute("UPDATE alerts SET attempts = attempts + 1 WHERE id = ?", (ref,))
            async with db.execute("SELECT attempts FROM alerts WHERE id = ?", (ref,)) as rows:
                row = await rows.fetchone()
            return int(row[0]) if row else 0

        return await self._write(op)

    async def finish_review(self, ref: int, planned: Sequence[PlannedVerdict]) -> None:
        """Store the alert's verdicts and mark it reviewed, in one transaction."""
        now = utc_now().isoformat()
        verdicts = [
            (
                ref,
                p.verdict.rule,
                p.verdict.verdict.value,
                p.topic,
                p.verdict.to_json(),
                now,
                p.prompt,
                p.raw,
            )
            for p in planned
        ]

        async def op(db: aiosqlite.Connection) -> None:
            await db.executemany(
                "INSERT INTO verdicts (alert_ref, rule, verdict, topic, payload, created_at, "
                "prompt, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                verdicts,
            )
            await db.execute(
                "UPDATE alerts SET state = 'reviewed', reviewed_at = ? WHERE id = ?", (now, ref)
            )

        await self._write(op)

    async def record_feedback(self, feedback: FeedbackRow) -> int:
        """Store an operator's judgement of one verdict; the latest per alert and rule counts."""
        f = feedback
        row = (
            f.alert_ref,
            f.rule,
            f.verdict,
            f.label,
            None if f.correct is None else int(f.correct),
            None if f.fields is None else json.dumps(f.fields),
            f.note,
            f.source,
            utc_now().isoformat(),
        )

        async def op(db: aiosqlite.Connection) -> int:
            cursor = await db.execute(
                "INSERT INTO feedback (alert_ref, rule, verdict, label, correct, fields, note, "
                "source, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            return int(cursor.lastrowid or 0)

        return await self._write(op)

    async def mark_published(self, verdict_ids: Sequence[int]) -> None:
        now = utc_now().isoformat()
        await self._write(
            lambda db: db.executemany(
                "UPDATE verdicts SET published_at = ? WHERE id = ?",
                [(now, verdict_id) for verdict_id in verdict_ids],
            )
        )

    async def prune(
        self, *, snapshots_before: datetime, alerts_before: datetime, snapshot_max_bytes: int
    ) -> Pruned:
        """Forget what is done with: only alerts that are reviewed and whose verdicts are all
        published are touched. Their snapshots go after `snapshots_before` (and, oldest first,
        while all snapshots together exceed `snapshot_max_bytes`); the alerts themselves, with
        their verdicts, and refused payloads go after `alerts_before`."""
        done = (
            "state = 'reviewed' AND reviewed_at < ? AND NOT EXISTS (SELECT 1 FROM verdicts v "
            "WHERE v.alert_ref = alerts.id AND v.published_at IS NULL)"
        )
        far_future = "9999"

        async def op(db: aiosqlite.Connection) -> Pruned:
            cursor = await db.execute(
                f"DELETE FROM alerts WHERE {done}", (alerts_before.isoformat(),)
            )
            alerts = cursor.rowcount
            await db.execute(
                "DELETE FROM rejects WHERE received_at < ?", (alerts_before.isoformat(),)
            )
            cursor = await db.execute(
                f"DELETE FROM alert_images WHERE alert_ref IN (SELECT id FROM alerts WHERE {done})",
                (snapshots_before.isoformat(),),
            )
            snapshots = cursor.rowcount
            async with db.execute(
                "SELECT coalesce(sum(length(data)), 0) FROM alert_images"
            ) as rows:
                total = int((await rows.fetchone() or (0,))[0])
            if total > snapshot_max_bytes:
                excess = total - snapshot_max_bytes
                doomed: list[tuple[int]] = []
                async with db.execute(
                    "SELECT alert_ref, sum(length(data)) FROM alert_images JOIN alerts "
                    f"ON alerts.id = alert_ref WHERE {done} GROUP BY alert_ref "
                    "ORDER BY reviewed_at, alert_ref",
                    (far_future,),
                ) as rows:
                    async for ref, size in rows:
                        if excess <= 0:
                            break
                        doomed.append((ref,))
                        excess -= size
                for (ref,) in doomed:
                    cursor = await db.execute(
                        "DELETE FROM alert_images WHERE alert_ref = ?", (ref,)
                    )
                    snapshots += cursor.rowcount
                total = excess + snapshot_max_bytes
            # the pragma frees one page per step: run it to the end, or the savepoint
            # cannot be released
            async with db.execute("PRAGMA incremental_vacuum") as steps:
                await steps.fetchall()
            return Pruned(alerts=alerts, snapshots=snapshots, snapshot_bytes=max(0, total))

        return await self._write(op)

    # reads -------------------------------------------------------------------------------

    @property
    def reader(self) -> aiosqlite.Connection:
        """The read connection (rows as `aiosqlite.Row`), for queries of other modules."""
        return self._reader

    async def pending_reviews(self, limit: int = -1) -> list[tuple[int, int]]:
        """(row id, priority) of alerts journalled but not reviewed, highest priority and
        then oldest first."""
        async with self._reader.execute(
            "SELECT id, priority FROM alerts WHERE state = 'received' "
            "ORDER BY priority DESC, id LIMIT ?",
            (limit,),
        ) as rows:
            return [(int(row["id"]), int(row["priority"])) for row in await rows.fetchall()]

    async def count_pending(self) -> int:
        async with self._reader.execute(
            "SELECT count(*) FROM alerts WHERE state = 'received'"
        ) as rows:
            row = await rows.fetchone()
        return int(row[0]) if row else 0

    async def load_alert(self, ref: int) -> StoredAlert:
        async with self._reader.execute("SELECT * FROM alerts WHERE id = ?", (ref,)) as rows:
            row = await rows.fetchone()
        if row is None:
            raise KeyError(ref)
        async with self._reader.execute(
            "SELECT source, data FROM alert_images WHERE alert_ref = ? ORDER BY idx", (ref,)
        ) as rows:
            images = [RawImage(r["source"], bytes(r["data"])) for r in await rows.fetchall()]
        return StoredAlert(
            ref=ref,
            alert=Alert.model_validate_json(row["alert"]),
            images=images,
            received_at=datetime.fromisoformat(row["received_at"]),
            attempts=int(row["attempts"]),
            state=row["state"],
        )

    async def unpublished(self, limit: int = 100) -> list[OutboxItem]:
        async with self._reader.execute(
            "SELECT id, topic, payload FROM verdicts WHERE published_at IS NULL "
            "ORDER BY id LIMIT ?",
            (limit,),
        ) as rows:
            return [OutboxItem(r["id"], r["topic"], r["payload"]) for r in await rows.fetchall()]

    async def count_unpublished(self) -> int:
        async with self._reader.execute(
            "SELECT count(*) FROM verdicts WHERE published_at IS NULL"
        ) as rows:
            row = await rows.fetchone()
        return int(row[0]) if row else 0

    async def rejects(self) -> list[tuple[str, str]]:
        """(field, error) of every refused payload, oldest first."""
        async with self._reader.execute("SELECT field, error FROM rejects ORDER BY id") as rows:
            return [(r["field"], r["error"]) for r in await rows.fetchall()]

    async def find_alerts(self, alert_id: str, box_id: str | None = None) -> list[dict[str, Any]]:
        """Alerts with this id (one per box unless `box_id` narrows it), with their verdicts."""
        sql = "SELECT * FROM alerts WHERE alert_id = ?"
        args: tuple[Any, ...] = (alert_id,)
        if box_id is not None:
            sql += " AND box_id = ?"
            args += (box_id,)
        async with self._reader.execute(sql + " ORDER BY id", args) as rows:
            alerts = list(await rows.fetchall())
        found = []
        for row in alerts:
            async with self._reader.execute(
                "SELECT payload, published_at FROM verdicts WHERE alert_ref = ? ORDER BY id",
                (row["id"],),
            ) as rows:
                verdicts = [
                    {**json.loads(v["payload"]), "published": v["published_at"] is not None}
                    for v in await rows.fetchall()
                ]
            found.append(
                {
                    "alert_id": row["alert_id"],
                    "box_id": row["box_id"],
                    "state": row["state"],
                    "source": row["source"],
                    "received_at": row["received_at"],
                    "reviewed_at": row["reviewed_at"],
                    "attempts": row["attempts"],
                    "verdicts": verdicts,
                }
            )
        return found


async def _migrate(db: aiosqlite.Connection) -> None:
    """Bring a journal written by an older version up to SCHEMA_VERSION."""
    async with db.execute("PRAGMA user_version") as rows:
        row = await rows.fetchone()
    version = int(row[0]) if row else 0
    if version == 1:
        await db.execute("ALTER TABLE alerts ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")
        await db.execute("DROP INDEX IF EXISTS alerts_pending")
    if 1 <= version <= 2:
        await db.execute("ALTER TABLE verdicts ADD COLUMN prompt TEXT")
        await db.execute("ALTER TABLE verdicts ADD COLUMN raw TEXT")
