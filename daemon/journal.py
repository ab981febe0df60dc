"""The journal: a SQLite file (WAL, fsync on commit) holding alerts, snapshots, verdicts.

An alert is committed here before anyone is told it was received; a verdict is committed
here before it is published, and marked published only after the broker acknowledged it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from daemon.contract import Alert, Verdict, utc_now
from daemon.plugin_api import RawImage

SCHEMA_VERSION = 1
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
    UNIQUE (box_id, alert_id)
);
CREATE INDEX IF NOT EXISTS alerts_pending ON alerts (id) WHERE state = 'received';
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
    published_at TEXT
);
CREATE INDEX IF NOT EXISTS verdicts_unpublished ON verdicts (id) WHERE published_at IS NULL;
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
class OutboxItem:
    id: int
    topic: str
    payload: str


@dataclass(frozen=True)
class PlannedVerdict:
    """A verdict and the topic it goes to, about to be journalled."""

    verdict: Verdict
    topic: str


class Journal:
    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        # one connection: write transactions must not interleave across coroutines
        self._write = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Journal:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path)
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = FULL")
        await db.execute("PRAGMA foreign_keys = ON")
        await db.executescript(SCHEMA)
        await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        await db.commit()
        return cls(db, path)

    async def close(self) -> None:
        await self._db.close()

    async def record_alert(
        self, alert: Alert, images: Sequence[RawImage], *, source: str, topic: str | None
    ) -> tuple[int, bool]:
        """(row id, True) for a new alert; (existing row id, False) for a resend."""
        async with self._write:
            cursor = await self._db.execute(
                "INSERT INTO alerts (box_id, alert_id, alert, source, topic, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (box_id, alert_id) DO NOTHING",
                (
                    alert.box_id,
                    alert.alert_id,
                    alert.model_dump_json(),
                    source,
                    topic,
                    utc_now().isoformat(),
                ),
            )
            if cursor.rowcount == 0:
                await self._db.rollback()
                async with self._db.execute(
                    "SELECT id FROM alerts WHERE box_id = ? AND alert_id = ?",
                    (alert.box_id, alert.alert_id),
                ) as rows:
                    row = await rows.fetchone()
                assert row is not None
                return int(row["id"]), False
            ref = int(cursor.lastrowid or 0)
            await self._db.executemany(
                "INSERT INTO alert_images (alert_ref, idx, source, data) VALUES (?, ?, ?, ?)",
                [(ref, i, image.source, image.data) for i, image in enumerate(images)],
            )
            await self._db.commit()
            return ref, True

    async def record_reject(
        self, *, source: str, topic: str | None, field: str, error: str, payload: bytes
    ) -> None:
        async with self._write:
            await self._db.execute(
                "INSERT INTO rejects (received_at, source, topic, field, error, payload) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    utc_now().isoformat(),
                    source,
                    topic,
                    field,
                    error,
                    payload[:REJECT_PAYLOAD_BYTES],
                ),
            )
            await self._db.commit()

    async def pending_reviews(self) -> list[int]:
        async with self._db.execute(
            "SELECT id FROM alerts WHERE state = 'received' ORDER BY id"
        ) as rows:
            return [int(row["id"]) for row in await rows.fetchall()]

    async def load_alert(self, ref: int) -> StoredAlert:
        async with self._db.execute("SELECT * FROM alerts WHERE id = ?", (ref,)) as rows:
            row = await rows.fetchone()
        if row is None:
            raise KeyError(ref)
        async with self._db.execute(
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

    async def begin_review(self, ref: int) -> int:
        """Count one more review attempt (committed first, so a crash loop is bounded)."""
        async with self._write:
            await self._db.execute("UPDATE alerts SET attempts = attempts + 1 WHERE id = ?", (ref,))
            await self._db.commit()
            async with self._db.execute("SELECT attempts FROM alerts WHERE id = ?", (ref,)) as rows:
                row = await rows.fetchone()
            return int(row["attempts"]) if row else 0

    async def finish_review(self, ref: int, planned: Sequence[PlannedVerdict]) -> None:
        """Store the alert's verdicts and mark it reviewed, in one transaction."""
        async with self._write:
            now = utc_now().isoformat()
            await self._db.executemany(
                "INSERT INTO verdicts (alert_ref, rule, verdict, topic, payload, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        ref,
                        p.verdict.rule,
                        p.verdict.verdict.value,
                        p.topic,
                        p.verdict.to_json(),
                        now,
                    )
                    for p in planned
                ],
            )
            await self._db.execute(
                "UPDATE alerts SET state = 'reviewed', reviewed_at = ? WHERE id = ?", (now, ref)
            )
            await self._db.commit()

    async def unpublished(self, limit: int = 100) -> list[OutboxItem]:
        async with self._db.execute(
            "SELECT id, topic, payload FROM verdicts WHERE published_at IS NULL "
            "ORDER BY id LIMIT ?",
            (limit,),
        ) as rows:
            return [OutboxItem(r["id"], r["topic"], r["payload"]) for r in await rows.fetchall()]

    async def mark_published(self, verdict_id: int) -> None:
        async with self._write:
            await self._db.execute(
                "UPDATE verdicts SET published_at = ? WHERE id = ?",
                (utc_now().isoformat(), verdict_id),
            )
            await self._db.commit()

    async def count_unpublished(self) -> int:
        async with self._db.execute(
            "SELECT count(*) FROM verdicts WHERE published_at IS NULL"
        ) as rows:
            row = await rows.fetchone()
        return int(row[0]) if row else 0

    async def find_alerts(self, alert_id: str, box_id: str | None = None) -> list[dict[str, Any]]:
        """Alerts with this id (one per box unless `box_id` narrows it), with their verdicts."""
        sql = "SELECT * FROM alerts WHERE alert_id = ?"
        args: tuple[Any, ...] = (alert_id,)
        if box_id is not None:
            sql += " AND box_id = ?"
            args += (box_id,)
        async with self._db.execute(sql + " ORDER BY id", args) as rows:
            alerts = list(await rows.fetchall())
        found = []
        for row in alerts:
            async with self._db.execute(
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
