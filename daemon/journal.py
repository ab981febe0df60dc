"""The journal: a SQLite file (WAL, fsync on commit) holding alerts, snapshots, verdicts.

An alert is committed here before anyone is told it was received; a verdict is committed
here before it is published, and marked published only after the broker acknowledged it.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite
import structlog
from pydantic import ValidationError

from daemon.config import describe_validation_error
from daemon.contract import Alert, Verdict, parse_rfc3339, utc_now
from daemon.plugin_api import RawImage

if TYPE_CHECKING:
    from daemon.rules import Rule

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 5
#: the tables whose row ids are known outside the journal (the outbox's place, snapshot and
#: feedback references, exported ids, feedback ids answered to operators): AUTOINCREMENT, so
#: that an id is never given twice, even once the newest rows are pruned
ALERTS_TABLE = """(
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
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
)"""
VERDICTS_TABLE = """(
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    alert_ref    INTEGER NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
    rule         TEXT,
    verdict      TEXT NOT NULL,
    topic        TEXT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    published_at TEXT,                      -- NULL: to be published; '': never (MQTT off)
    prompt       TEXT,                      -- what the model was asked
    raw          TEXT                       -- what it answered (scores as JSON, or text)
)"""
FEEDBACK_TABLE = """(
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    alert_ref   INTEGER NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
    rule        TEXT NOT NULL,
    verdict     TEXT NOT NULL,              -- the verdict the operator judged
    label       TEXT,                       -- real | false: what the alert really was
    correct     INTEGER,                    -- 1: the verdict was right, 0: wrong
    fields      TEXT,                       -- extract rules: the corrected fields (JSON)
    note        TEXT,
    source      TEXT NOT NULL,              -- http | mqtt | console
    created_at  TEXT NOT NULL
)"""
#: the tables rebuilt with AUTOINCREMENT where a journal has them without
NUMBERED_TABLES = {"alerts": ALERTS_TABLE, "verdicts": VERDICTS_TABLE, "feedback": FEEDBACK_TABLE}
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS alerts {ALERTS_TABLE};
CREATE INDEX IF NOT EXISTS alerts_pending ON alerts (priority DESC, id) WHERE state = 'received';
CREATE INDEX IF NOT EXISTS alerts_reviewed ON alerts (reviewed_at) WHERE state = 'reviewed';
CREATE INDEX IF NOT EXISTS alerts_by_alert_id ON alerts (alert_id);
-- the console's filters and stats (history.py): each answers without scanning the journal
CREATE INDEX IF NOT EXISTS alerts_by_camera ON alerts (json_extract(alert, '$.camera_id'));
-- in row-id order within a box: the newest of a box's alerts without sorting them all
CREATE INDEX IF NOT EXISTS alerts_by_box ON alerts (box_id);
CREATE TABLE IF NOT EXISTS alert_images (
    alert_ref INTEGER NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
    idx       INTEGER NOT NULL,
    source    TEXT NOT NULL,
    data      BLOB NOT NULL,
    PRIMARY KEY (alert_ref, idx)
);
CREATE TABLE IF NOT EXISTS verdicts {VERDICTS_TABLE};
CREATE INDEX IF NOT EXISTS verdicts_unpublished ON verdicts (id) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS verdicts_by_alert ON verdicts (alert_ref);
CREATE INDEX IF NOT EXISTS verdicts_by_rule ON verdicts (rule, alert_ref, verdict);
CREATE INDEX IF NOT EXISTS verdicts_by_verdict ON verdicts (verdict, alert_ref);
CREATE INDEX IF NOT EXISTS verdicts_by_time ON verdicts (created_at);
CREATE TABLE IF NOT EXISTS feedback {FEEDBACK_TABLE};
CREATE INDEX IF NOT EXISTS feedback_by_alert ON feedback (alert_ref, rule);
CREATE INDEX IF NOT EXISTS feedback_by_time ON feedback (created_at);
CREATE TABLE IF NOT EXISTS rejects (
    id          INTEGER PRIMARY KEY,
    received_at TEXT NOT NULL,
    source      TEXT NOT NULL,
    topic       TEXT,
    field       TEXT NOT NULL,
    error       TEXT NOT NULL,
    payload     BLOB NOT NULL               -- the first bytes, for diagnosis
);
CREATE INDEX IF NOT EXISTS rejects_by_time ON rejects (received_at);
"""
#: `published_at` of a verdict made without MQTT: none waits to be published
NOT_PUBLISHED = ""
REJECT_PAYLOAD_BYTES = 4096
#: the write-ahead log's size after a checkpoint, at most
WAL_LIMIT_BYTES = 64 * 2**20
#: refused payloads kept at most (at 4 KiB each, 400 MiB)
MAX_REJECTS = 100_000
#: alerts (or alerts' snapshots) pruned per commit
PRUNE_CHUNK = 2_000
#: alerts whose snapshots are pruned per commit, at most ...
SNAPSHOT_PRUNE_CHUNK = 256
#: ... and snapshot bytes per commit, at most (beyond one alert's)
SNAPSHOT_PRUNE_BYTES = 64 * 2**20
#: free pages given back to the file system per commit (16 MiB of 4 KiB pages)
VACUUM_PAGES = 4_096


@dataclass(frozen=True)
class StoredAlert:
    ref: int
    alert: Alert
    images: list[RawImage]
    received_at: datetime
    attempts: int
    state: str
    #: why the stored alert no longer passes the contract's checks (a journal of an older,
    #: laxer version, a row edited by hand); `alert` then holds what of it could be read
    problem: str | None = None


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
    #: the rule that made it, as it was then (for hooks; not journalled)
    rule: Rule | None = None


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


#: a write: runs inside the writer's transaction, on the writer's thread
WriteOp = Callable[[sqlite3.Connection], Any]


class Journal:
    """Three connections to one file: writes go through a group-commit queue on one, owned
    by a thread of its own; the daemon's reads use the second, and operators' queries (the
    console, stats) the third, so that a long one never holds up a review (WAL lets them
    all run side by side, and readers only ever see committed data)."""

    def __init__(
        self,
        writer: sqlite3.Connection,
        reader: aiosqlite.Connection,
        browser: aiosqlite.Connection,
        path: Path,
    ):
        self._db = writer
        self._writer_thread = ThreadPoolExecutor(1, "journal-writer")
        self._reader = reader
        self._browser = browser
        self.path = path
        #: False for a daemon without MQTT: its verdicts are stored as NOT_PUBLISHED, so that
        #: turning MQTT on later does not send a backlog of old verdicts to the alarm systems
        self.publishes = True
        self._pending: list[tuple[WriteOp, asyncio.Future[Any]]] = []
        self._flushing: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: Path) -> Journal:
        writer = await asyncio.to_thread(_open_writer, path)
        readers = []
        for _ in range(2):
            reader = await aiosqlite.connect(path, isolation_level=None)
            reader.row_factory = aiosqlite.Row
            readers.append(reader)
        return cls(writer, *readers, path)

    async def close(self) -> None:
        if self._flushing is not None:
            await self._flushing
        await self.call_writer(lambda db: db.close())
        self._writer_thread.shutdown()
        await self._reader.close()
        await self._browser.close()

    async def call_writer(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """`fn(connection)` on the writer's thread, outside any transaction (maintenance)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer_thread, fn, self._db)

    # writes ------------------------------------------------------------------------------

    async def _write(self, op: WriteOp) -> Any:
        """Run `op` in the next group commit; return once that commit is on disk.

        Writes that arrive while a commit is under way share the next one: one fsync, and
        one trip to the writer's thread, for many alerts under load; no waiting when idle.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await self.call_writer(partial(_commit, [op for op, _ in batch]))
            except BaseException as exc:
                # the commit failed (disk full, I/O error): nothing in it is durable
                _settle(batch, [exc] * len(batch))
                if isinstance(exc, Exception):
                    continue
                raise
            _settle(batch, results)

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

        def op(db: sqlite3.Connection) -> Recorded:
            cursor = db.execute(
                "INSERT INTO alerts (box_id, alert_id, alert, source, topic, received_at, "
                "priority) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (box_id, alert_id) DO NOTHING",
                (*values, priority),
            )
            if cursor.rowcount == 0:
                row = db.execute(
                    "SELECT id, state FROM alerts WHERE box_id = ? AND alert_id = ?",
                    (alert.box_id, alert.alert_id),
                ).fetchone()
                assert row is not None
                return Recorded(int(row[0]), new=False, reviewed=row[1] == "reviewed")
            ref = int(cursor.lastrowid or 0)
            db.executemany(
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

        def op(db: sqlite3.Connection) -> int:
            row = db.execute(
                "UPDATE alerts SET attempts = attempts + 1 WHERE id = ? RETURNING attempts", (ref,)
            ).fetchone()
            return int(row[0]) if row else 0

        return await self._write(op)

    async def uncount_attempts(self, refs: Sequence[int]) -> None:
        """Take back the attempts of reviews a clean stop cut off (not yet reviewed)."""

        def op(db: sqlite3.Connection) -> None:
            db.executemany(
                "UPDATE alerts SET attempts = attempts - 1 "
                "WHERE id = ? AND state != 'reviewed' AND attempts > 0",
                [(ref,) for ref in refs],
            )

        await self._write(op)

    async def finish_review(self, ref: int, planned: Sequence[PlannedVerdict]) -> bool:
        """Store the alert's verdicts and mark it reviewed, in one transaction; False (and
        nothing stored) when it is reviewed already."""
        now = utc_now().isoformat()
        published_at = None if self.publishes else NOT_PUBLISHED
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
                published_at,
            )
            for p in planned
        ]

        def op(db: sqlite3.Connection) -> bool:
            marked = db.execute(
                "UPDATE alerts SET state = 'reviewed', reviewed_at = ? "
                "WHERE id = ? AND state = 'received'",
                (now, ref),
            ).rowcount
            if marked:
                db.executemany(
                    "INSERT INTO verdicts (alert_ref, rule, verdict, topic, payload, "
                    "created_at, prompt, raw, published_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    verdicts,
                )
            return bool(marked)

        return await self._write(op)

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

        def op(db: sqlite3.Connection) -> int:
            cursor = db.execute(
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
        self,
        *,
        snapshots_before: datetime,
        alerts_before: datetime,
        snapshot_max_bytes: int,
        published_only: bool = True,
        max_rejects: int = MAX_REJECTS,
    ) -> Pruned:
        """Forget what is done with: only alerts that are reviewed and (`published_only`:
        a daemon with an outbox) whose verdicts are all published are touched. Their
        snapshots go after `snapshots_before` (those of alerts with an operator's feedback,
        what `export-dataset` learns from, stay with the alert) and, oldest first (those
        with feedback last), while all snapshots together exceed `snapshot_max_bytes`; the
        alerts themselves, with their verdicts and feedback, after `alerts_before`; refused
        payloads after `alerts_before` and beyond the newest `max_rejects`. The work is done
        PRUNE_CHUNK alerts or rows (SNAPSHOT_PRUNE_CHUNK alerts' or SNAPSHOT_PRUNE_BYTES of
        snapshots) and VACUUM_PAGES pages per commit, so that intake's writes wait for one
        chunk at most, never for the whole prune."""
        done = "a.state = 'reviewed' AND a.reviewed_at < ?"
        if published_only:
            done += (
                " AND NOT EXISTS (SELECT 1 FROM verdicts v WHERE v.alert_ref = a.id "
                "AND v.published_at IS NULL)"
            )
        # snapshots first, those of the alerts about to go too: the alerts' deletion then
        # cascades to no snapshot, and no commit holds more than SNAPSHOT_PRUNE_BYTES of them
        aged = f"{done} AND (NOT EXISTS ({HAS_FEEDBACK}) OR a.reviewed_at < ?)"
        cutoffs = (max(snapshots_before, alerts_before).isoformat(), alerts_before.isoformat())
        snapshots = 0
        while True:
            sized = await self._write(partial(_snapshots_of, aged, cutoffs))
            # still aged when deleted: feedback given meanwhile keeps an alert's snapshots
            snapshots += await self._prune_snapshots(sized, aged, cutoffs)
            if len(sized) < PRUNE_CHUNK:
                break
        alerts = await self._in_chunks(
            f"DELETE FROM alerts WHERE id IN (SELECT a.id FROM alerts a WHERE {done} LIMIT ?)",
            alerts_before.isoformat(),
        )
        await self._in_chunks(
            "DELETE FROM rejects WHERE id IN (SELECT id FROM rejects WHERE received_at < ? "
            "LIMIT ?)",
            alerts_before.isoformat(),
        )
        newest_gone = await self._write(
            lambda db: db.execute(
                "SELECT id FROM rejects ORDER BY id DESC LIMIT 1 OFFSET ?", (max_rejects,)
            ).fetchone()
        )
        if newest_gone is not None:
            await self._in_chunks(
                "DELETE FROM rejects WHERE id IN (SELECT id FROM rejects WHERE id <= ? LIMIT ?)",
                newest_gone[0],
            )

        def choose(db: sqlite3.Connection) -> tuple[list[tuple[int, int]], int]:
            """The snapshots to go beyond the cap, oldest first and those with feedback last
            (each alert's, with their size), and all snapshots' size."""
            row = db.execute("SELECT coalesce(sum(length(data)), 0) FROM alert_images").fetchone()
            total = int((row or (0,))[0])
            excess = total - snapshot_max_bytes
            doomed: list[tuple[int, int]] = []
            if excess <= 0:
                return doomed, total
            any_age = "9999"  # every done alert, the oldest first, however recent
            rows = db.execute(
                "SELECT i.alert_ref, sum(length(i.data)) FROM alert_images i JOIN alerts a "
                f"ON a.id = i.alert_ref WHERE {done} GROUP BY i.alert_ref "
                f"ORDER BY EXISTS ({HAS_FEEDBACK}), a.reviewed_at, i.alert_ref",
                (any_age,),
            )
            for ref, size in rows:
                if excess <= 0:
                    break
                doomed.append((ref, size))
                excess -= size
            rows.close()
            return doomed, total

        doomed, total = await self._write(choose)
        capped = await self._prune_snapshots(doomed)
        total -= sum(size for _, size in doomed)
        while await self._write(_vacuum_some):
            pass
        return Pruned(alerts=alerts, snapshots=snapshots + capped, snapshot_bytes=max(0, total))

    async def _prune_snapshots(
        self, sized: list[tuple[int, int]], where: str = "1", args: tuple[str, ...] = ()
    ) -> int:
        """Delete the snapshots of these (alert, bytes) pairs whose alert (`a`) still meets
        `where` (taking `args`), a bounded chunk per commit; how many."""
        deleted = 0
        for chunk in _chunks_by_bytes(sized, SNAPSHOT_PRUNE_CHUNK, SNAPSHOT_PRUNE_BYTES):
            deleted += await self._write(partial(_delete_snapshots, chunk, where, args))
        return deleted

    async def _in_chunks(self, sql: str, bound: Any) -> int:
        """Rows `sql` deletes, run a commit at a time until it deletes fewer than a chunk
        (`sql` takes `bound` and PRUNE_CHUNK)."""
        deleted = 0
        while True:
            count = await self._write(lambda db: db.execute(sql, (bound, PRUNE_CHUNK)).rowcount)
            deleted += count
            if count < PRUNE_CHUNK:
                return deleted

    # reads -------------------------------------------------------------------------------

    async def read(self, sql: str, args: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        """Every row of a query, fetched in one trip to the reader's thread.

        No statement stays open between trips: WAL keeps a read transaction (an older
        snapshot) open while any statement is, and other queries would see that snapshot.
        """
        return list(await self._reader.execute_fetchall(sql, args))

    async def read_one(self, sql: str, args: Sequence[Any] = ()) -> aiosqlite.Row | None:
        rows = await self.read(sql, args)
        return rows[0] if rows else None

    async def browse(self, sql: str, args: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        """As `read`, for operators' queries: on a connection of their own."""
        return list(await self._browser.execute_fetchall(sql, args))

    async def pending_reviews(self, limit: int = -1) -> list[tuple[int, int]]:
        """(row id, priority) of alerts journalled but not reviewed, highest priority and
        then oldest first."""
        rows = await self.read(
            "SELECT id, priority FROM alerts WHERE state = 'received' "
            "ORDER BY priority DESC, id LIMIT ?",
            (limit,),
        )
        return [(int(row["id"]), int(row["priority"])) for row in rows]

    async def count_pending(self) -> int:
        row = await self.read_one("SELECT count(*) FROM alerts WHERE state = 'received'")
        return int(row[0]) if row else 0

    async def load_alert(self, ref: int) -> StoredAlert:
        row = await self.read_one("SELECT * FROM alerts WHERE id = ?", (ref,))
        if row is None:
            raise KeyError(ref)
        images = [
            RawImage(r["source"], bytes(r["data"]))
            for r in await self.read(
                "SELECT source, data FROM alert_images WHERE alert_ref = ? ORDER BY idx", (ref,)
            )
        ]
        alert, problem = _stored_alert(row)
        return StoredAlert(
            ref=ref,
            alert=alert,
            images=images,
            received_at=datetime.fromisoformat(row["received_at"]),
            attempts=int(row["attempts"]),
            state=row["state"],
            problem=problem,
        )

    async def unpublished(self, limit: int = 100, after: int = 0) -> list[OutboxItem]:
        """The oldest verdicts not yet published whose id is above `after`."""
        rows = await self.read(
            "SELECT id, topic, payload FROM verdicts WHERE published_at IS NULL AND id > ? "
            "ORDER BY id LIMIT ?",
            (after, limit),
        )
        return [OutboxItem(r["id"], r["topic"], r["payload"]) for r in rows]

    async def count_unpublished(self) -> int:
        row = await self.read_one("SELECT count(*) FROM verdicts WHERE published_at IS NULL")
        return int(row[0]) if row else 0

    async def rejects(self) -> list[tuple[str, str]]:
        """(field, error) of every refused payload, oldest first."""
        rows = await self.read("SELECT field, error FROM rejects ORDER BY id")
        return [(r["field"], r["error"]) for r in rows]

    async def find_alerts(self, alert_id: str, box_id: str | None = None) -> list[dict[str, Any]]:
        """Alerts with this id (one per box unless `box_id` narrows it), with their verdicts."""
        sql = "SELECT * FROM alerts WHERE alert_id = ?"
        args: tuple[Any, ...] = (alert_id,)
        if box_id is not None:
            sql += " AND box_id = ?"
            args += (box_id,)
        found = []
        for row in await self.read(sql + " ORDER BY id", args):
            verdicts = [
                {**json.loads(v["payload"]), "published": bool(v["published_at"])}
                for v in await self.read(
                    "SELECT payload, published_at FROM verdicts WHERE alert_ref = ? ORDER BY id",
                    (row["id"],),
                )
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


class JournalError(Exception):
    """A journal this daemon cannot use as it is."""


def lock_journal(path: Path) -> int:
    """Hold an exclusive lock beside the journal for as long as the returned descriptor is
    open: two daemons on one journal would review its alerts twice. JournalError when
    another process holds it."""
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise JournalError(
            f"{path} is in use by another secondlook daemon (pid {holder}, holding "
            f"{lock_path}): stop it first, or give this one another [storage] dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _open_writer(path: Path) -> sqlite3.Connection:
    """The write connection, its pragmas set and the schema brought up to date."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # autocommit mode: the writer opens and commits its transactions itself
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        # first: a journal of a newer version is refused before anything changes its file
        row = writer.execute("PRAGMA user_version").fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"{path} was written by a newer secondlook (journal schema {version}, this one "
                f"knows {SCHEMA_VERSION}): upgrade secondlook, or start with another "
                "[storage] dir"
            )
        # pages freed by pruning go back to the file system (takes effect in a new file)
        writer.execute("PRAGMA auto_vacuum = INCREMENTAL")
        writer.execute("PRAGMA journal_mode = WAL")
        # the write-ahead log is cut back to this size after checkpoints (a prune or a burst
        # would otherwise leave it at its largest until the daemon stops)
        writer.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
        writer.execute("PRAGMA synchronous = FULL")
        steps = _migrations(writer)  # (the lock beside the journal: no other daemon writes)
        if steps:
            log.info(
                "upgrading the journal's schema: tables are copied once (seconds per 100,000 rows)",
                journal=str(path),
                schema=version,
                to_schema=SCHEMA_VERSION,
            )
        # one transaction: a start cut short leaves the journal as it was, never half migrated
        writer.executescript(
            "\n".join(
                [
                    "BEGIN IMMEDIATE;",
                    *steps,
                    SCHEMA,
                    f"PRAGMA user_version = {SCHEMA_VERSION};",
                    "COMMIT;",
                ]
            )
        )
        # after the migration: tables rebuilt there must not take their rows' children along
        writer.execute("PRAGMA foreign_keys = ON")
        if writer.execute("PRAGMA auto_vacuum").fetchone()[0] == 0:
            log.warning(
                "this journal keeps the pages pruning frees (it predates schema 2); see "
                "docs/operations.md to give them back to the file system",
                journal=str(path),
            )
    except BaseException:
        if writer.in_transaction:
            writer.execute("ROLLBACK")
        writer.close()
        raise
    return writer


def _migrations(db: sqlite3.Connection) -> list[str]:
    """The statements that bring the journal's tables to this version's shape, judged by the
    tables themselves rather than the schema number (a version that upgraded one statement at
    a time may have been cut off between two, its number not yet raised)."""
    made = dict(db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())

    def columns(table: str) -> set[str]:
        return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}

    steps = []
    if "alerts" in made and "priority" not in columns("alerts"):
        steps += [
            "ALTER TABLE alerts ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;",
            "DROP INDEX IF EXISTS alerts_pending;",
        ]
    if "verdicts" in made:
        have = columns("verdicts")
        steps += [
            f"ALTER TABLE verdicts ADD COLUMN {c} TEXT;" for c in ("prompt", "raw") if c not in have
        ]
    for table, shape in NUMBERED_TABLES.items():
        if table in made and "AUTOINCREMENT" not in made[table].upper():
            # SQLite's way of changing a table: a copy renamed
            names = ", ".join(re.findall(r"^\s+(\w+)\s+(?:INTEGER|TEXT|BLOB)", shape, re.M))
            steps += [
                f"CREATE TABLE {table}_new {shape};",
                f"INSERT INTO {table}_new ({names}) SELECT {names} FROM {table};",
                f"DROP TABLE {table};",
                f"ALTER TABLE {table}_new RENAME TO {table};",
            ]
    return steps


def _commit(ops: list[WriteOp], db: sqlite3.Connection) -> list[Any]:
    """Run `ops` in one transaction; each op's result, or the error it raised (SQLite's, or
    Python's, such as a value it cannot encode): one failing write does not undo the others.
    A failed commit (disk full, I/O error) raises: nothing in it is durable.

    Ops run straight in the transaction first; only when one fails is the transaction rolled
    back and run again with a savepoint per op (ops are functions of the database alone, so
    a rerun is safe). The common case costs no savepoints: fewer statements, and fewer trips
    for the writer's thread back to the GIL.
    """
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            results = [op(db) for op in ops]
        except Exception:
            if db.in_transaction:
                db.execute("ROLLBACK")
            db.execute("BEGIN IMMEDIATE")
            results = [_in_savepoint(op, db) for op in ops]
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return results


#: whether alert `a` carries an operator's feedback
HAS_FEEDBACK = "SELECT 1 FROM feedback f WHERE f.alert_ref = a.id"
#: the problems of a stored alert told in its verdict's reason, at most
MAX_PROBLEMS_TOLD = 3


def _stored_alert(row: Any) -> tuple[Alert, str | None]:
    """The alert of a journal row, or, when it no longer passes the contract's checks, what
    is wrong with it and its identity as far as it can be read (the row's own columns, the
    JSON's texts): enough for a verdict that forwards it unreviewed."""
    try:
        return Alert.model_validate_json(row["alert"]), None
    except ValidationError as exc:
        problems = describe_validation_error(exc).split("\n")
        more = len(problems) - MAX_PROBLEMS_TOLD
        problem = "; ".join(problems[:MAX_PROBLEMS_TOLD]) + (
            f"; and {more} more" if more > 0 else ""
        )
    data = json.loads(row["alert"])  # JSON always: the journal's json_extract index sees to it
    if not isinstance(data, dict):
        data = {}

    def text(key: str) -> str:
        value = data.get(key)
        return value[:256] if isinstance(value, str) else ""

    try:  # the contract's verdicts carry an RFC 3339 time: the alert's, or its arrival's
        occurred_at = text("occurred_at")
        parse_rfc3339(occurred_at)
    except ValueError:
        occurred_at = row["received_at"]

    salvaged = Alert.model_construct(
        alert_id=row["alert_id"],
        box_id=row["box_id"],
        camera_id=text("camera_id"),
        event_type=text("event_type"),
        occurred_at=occurred_at,
        image_url=None,
        score=None,
        boxes=[],
        site=text("site") or None,
        extra={},
    )
    return salvaged, problem


def _snapshots_of(
    where: str, args: tuple[str, ...], db: sqlite3.Connection
) -> list[tuple[int, int]]:
    """Up to PRUNE_CHUNK alerts (`a`) that still have snapshots and meet `where` (taking
    `args`), each with its snapshots' bytes; from the snapshots kept (a few days' worth),
    not from every old alert (CROSS JOIN: SQLite keeps that order)."""
    rows = db.execute(
        "SELECT i.alert_ref, sum(length(i.data)) FROM alert_images i CROSS JOIN alerts a "
        f"ON a.id = i.alert_ref WHERE {where} GROUP BY i.alert_ref LIMIT ?",
        (*args, PRUNE_CHUNK),
    )
    return [(int(ref), int(size)) for ref, size in rows]


def _delete_snapshots(
    refs: list[int], where: str, args: tuple[str, ...], db: sqlite3.Connection
) -> int:
    """Delete the snapshots of these alerts that meet `where` (`a`, taking `args`); how many."""
    return db.executemany(
        "DELETE FROM alert_images WHERE alert_ref = ? AND EXISTS "
        f"(SELECT 1 FROM alerts a WHERE a.id = alert_images.alert_ref AND {where})",
        [(ref, *args) for ref in refs],
    ).rowcount


def _chunks_by_bytes(sized: list[tuple[int, int]], most: int, most_bytes: int) -> list[list[int]]:
    """The refs of `sized` ((ref, bytes) pairs) in order, in chunks of at most `most` refs
    and `most_bytes` bytes (a single larger ref makes a chunk of its own)."""
    chunks: list[list[int]] = []
    chunk: list[int] = []
    size = 0
    for ref, ref_bytes in sized:
        if chunk and (len(chunk) == most or size + ref_bytes > most_bytes):
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(ref)
        size += ref_bytes
    if chunk:
        chunks.append(chunk)
    return chunks


def _vacuum_some(db: sqlite3.Connection) -> bool:
    """Give up to VACUUM_PAGES free pages back to the file system; True while more are left.
    (Python's sqlite3 steps a statement without result columns once, and each step of
    `incremental_vacuum` frees one page: hence a statement per page, each closed so that
    the transaction can end.)"""
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    for _ in range(VACUUM_PAGES):
        if not free:
            return False
        db.execute("PRAGMA incremental_vacuum").close()
        left = db.execute("PRAGMA freelist_count").fetchone()[0]
        if left >= free:  # a file made without incremental vacuum keeps its free pages
            return False
        free = left
    return True


def _in_savepoint(op: WriteOp, db: sqlite3.Connection) -> Any:
    """`op`'s result, or its error with only its own writes undone."""
    db.execute("SAVEPOINT op")
    try:
        result = op(db)
    except Exception as exc:
        if not db.in_transaction:
            raise  # SQLite undid the whole transaction (disk full, I/O error)
        db.execute("ROLLBACK TO op")
        db.execute("RELEASE op")
        return exc
    db.execute("RELEASE op")
    return result


def _settle(batch: list[tuple[WriteOp, asyncio.Future[Any]]], results: list[Any]) -> None:
    """Hand each waiting writer its result (an exception instance is raised to it)."""
    for (_, future), value in zip(batch, results, strict=True):
        if future.done():
            continue
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)
