"""The journal's group commit: writes that share a commit succeed or fail one by one."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from daemon import journal as journal_module
from daemon.contract import Alert
from daemon.journal import Journal, JournalError, PlannedVerdict
from daemon.plugin_api import RawImage
from tests.conftest import jpeg_bytes, make_alert, make_verdict


def alert(alert_id: str) -> Alert:
    return Alert.model_validate(make_alert(alert_id))


def insert_reject(error: str):
    def op(db: sqlite3.Connection) -> int:
        cursor = db.execute(
            "INSERT INTO rejects (received_at, source, topic, field, error, payload) "
            "VALUES ('2026-11-25T00:00:00+00:00', 'test', NULL, 'payload', ?, x'')",
            (error,),
        )
        return int(cursor.lastrowid or 0)

    return op


def insert_then_fail(db: sqlite3.Connection) -> None:
    insert_reject("written by the failing write")(db)
    db.execute("INSERT INTO no_such_table VALUES (1)")


def insert_then_fail_to_encode(db: sqlite3.Connection) -> None:
    insert_reject("written by the failing write")(db)
    insert_reject("a lone surrogate: \udcff")(db)  # no UTF-8: raised by Python, not SQLite


@pytest.mark.parametrize(
    ("failing", "error", "message"),
    [
        (insert_then_fail, sqlite3.OperationalError, "no_such_table"),
        (insert_then_fail_to_encode, UnicodeEncodeError, "surrogates not allowed"),
    ],
)
async def test_a_failing_write_in_a_group_commit_undoes_only_itself(
    tmp_path, failing, error, message
):
    journal = await Journal.open(tmp_path / "journal.db")
    try:
        image = RawImage("image", jpeg_bytes())
        # issued in one tick, so all four share one commit
        results = await asyncio.gather(
            journal.record_alert(alert("kept-1"), [image], source="test", topic=None),
            journal._write(failing),
            journal._write(insert_reject("kept-2")),
            journal.record_alert(alert("kept-3"), [image], source="test", topic=None),
            return_exceptions=True,
        )
        assert isinstance(results[1], error)
        assert message in str(results[1])
        assert results[0].new and results[3].new
        assert results[2] > 0
        alerts = await journal.read("SELECT alert_id FROM alerts ORDER BY id")
        assert [row["alert_id"] for row in alerts] == ["kept-1", "kept-3"]
        images = await journal.read("SELECT COUNT(*) AS n FROM alert_images")
        assert images[0]["n"] == 2
        rejects = await journal.read("SELECT error FROM rejects ORDER BY id")
        assert [row["error"] for row in rejects] == ["kept-2"]
    finally:
        await journal.close()


async def test_writes_after_a_failed_group_still_commit(tmp_path):
    journal = await Journal.open(tmp_path / "journal.db")
    try:
        with pytest.raises(sqlite3.OperationalError):
            await journal._write(insert_then_fail)
        assert await journal._write(insert_reject("after")) > 0
        rejects = await journal.read("SELECT error FROM rejects")
        assert [row["error"] for row in rejects] == ["after"]
    finally:
        await journal.close()


async def test_an_alert_is_marked_reviewed_once_and_keeps_its_first_verdicts(tmp_path):
    journal = await Journal.open(tmp_path / "journal.db")
    try:
        recorded = await journal.record_alert(alert("once"), [], source="test", topic=None)
        first = PlannedVerdict(make_verdict("once", "confirmed"), "t")
        second = PlannedVerdict(make_verdict("once", "rejected"), "t")
        assert await journal.finish_review(recorded.ref, [first]) is True
        assert await journal.finish_review(recorded.ref, [second]) is False
        rows = await journal.read("SELECT verdict FROM verdicts")
        assert [row["verdict"] for row in rows] == ["confirmed"]
    finally:
        await journal.close()


async def test_a_migration_cut_short_leaves_the_journal_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "journal.db"
    await (await Journal.open(path)).close()
    with sqlite3.connect(path) as db:  # as version 2 left it
        db.execute("ALTER TABLE verdicts DROP COLUMN prompt")
        db.execute("ALTER TABLE verdicts DROP COLUMN raw")
        db.execute("PRAGMA user_version = 2")

    def columns() -> tuple[set[str], int]:
        with sqlite3.connect(path) as db:
            names = {row[1] for row in db.execute("PRAGMA table_info(verdicts)")}
            return names, db.execute("PRAGMA user_version").fetchone()[0]

    real = journal_module._migrations
    # the first step works, the second fails (a crash, a full disk): neither is kept
    monkeypatch.setattr(
        journal_module,
        "_migrations",
        lambda db: [real(db)[0], "ALTER TABLE nowhere ADD COLUMN x;"],
    )
    with pytest.raises(sqlite3.OperationalError, match="no such table: nowhere"):
        await Journal.open(path)
    names, version = columns()
    assert "prompt" not in names and version == 2
    monkeypatch.setattr(journal_module, "_migrations", real)
    await (await Journal.open(path)).close()
    names, version = columns()
    assert {"prompt", "raw"} <= names and version == journal_module.SCHEMA_VERSION


async def test_ids_are_never_given_twice_in_a_journal_upgraded_from_schema_3(tmp_path):
    path = tmp_path / "journal.db"
    with sqlite3.connect(path) as db:  # as version 3 left it, with two reviewed alerts
        db.executescript(journal_module.SCHEMA.replace(" AUTOINCREMENT", ""))
        db.execute("PRAGMA user_version = 3")
        for ref in (1, 2):
            db.execute(
                "INSERT INTO alerts (id, box_id, alert_id, alert, source, received_at, state) "
                "VALUES (?, 'box-t', ?, ?, 'http', '2026-11-25T00:00:00+00:00', 'reviewed')",
                (ref, f"old-{ref}", alert(f"old-{ref}").model_dump_json()),
            )
            db.execute(
                "INSERT INTO verdicts (alert_ref, rule, verdict, topic, payload, created_at) "
                "VALUES (?, 'fire', 'confirmed', 't', '{}', '2026-11-25T00:00:01+00:00')",
                (ref,),
            )
        db.execute("INSERT INTO alert_images VALUES (1, 0, 'inline', x'ffd8ffd9')")
        db.execute(
            "INSERT INTO feedback (alert_ref, rule, verdict, label, source, created_at) "
            "VALUES (1, 'fire', 'confirmed', 'real', 'http', '2026-11-25T00:00:02+00:00')"
        )
    journal = await Journal.open(path)
    try:
        counts = [
            (await journal.read_one(f"SELECT count(*) FROM {table}"))[0]
            for table in ("alerts", "alert_images", "verdicts", "feedback")
        ]
        assert counts == [2, 1, 2, 1]  # nothing lost in the rebuild, children included
        # the newest alert pruned: its id (and its verdict's) is not given again
        await journal._write(lambda db: db.execute("DELETE FROM alerts WHERE id = 2"))
        recorded = await journal.record_alert(alert("new"), [], source="test", topic=None)
        assert recorded.ref == 3
        await journal.finish_review(recorded.ref, [PlannedVerdict(make_verdict("new"), "t")])
        rows = await journal.read("SELECT id, alert_ref FROM verdicts ORDER BY id")
        assert [tuple(row) for row in rows] == [(1, 1), (3, 3)]
        # feedback ids are answered to operators: the newest one pruned, its id stays gone
        await journal._write(lambda db: db.execute("DELETE FROM alerts WHERE id = 1"))
        made = await journal._write(
            lambda db: (
                db.execute(
                    "INSERT INTO feedback (alert_ref, rule, verdict, label, source, created_at) "
                    "VALUES (3, 'fire', 'confirmed', 'real', 'http', '2026-11-25T00:00:03+00:00')"
                ).lastrowid
            )
        )
        assert made == 2
    finally:
        await journal.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == journal_module.SCHEMA_VERSION
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []


async def test_a_journal_upgraded_halfway_by_an_older_version_still_opens(tmp_path):
    """Versions before the one-transaction upgrade ran one statement at a time: cut off
    after the first, a journal numbered 2 already had `verdicts.prompt`."""
    path = tmp_path / "journal.db"
    with sqlite3.connect(path) as db:
        db.executescript(journal_module.SCHEMA.replace(" AUTOINCREMENT", ""))
        db.execute("ALTER TABLE verdicts DROP COLUMN raw")
        db.execute("PRAGMA user_version = 2")
    await (await Journal.open(path)).close()
    with sqlite3.connect(path) as db:
        assert {"prompt", "raw"} <= {row[1] for row in db.execute("PRAGMA table_info(verdicts)")}
        assert db.execute("PRAGMA user_version").fetchone()[0] == journal_module.SCHEMA_VERSION
        tables = dict(db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
    assert all("AUTOINCREMENT" in tables[name] for name in ("alerts", "verdicts", "feedback"))


async def test_a_journal_of_a_newer_schema_is_refused_untouched(tmp_path):
    path = tmp_path / "journal.db"
    await (await Journal.open(path)).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = DELETE")  # as a newer version might keep it
    db.execute("PRAGMA user_version = 99")
    db.close()
    before = path.read_bytes()
    with pytest.raises(JournalError, match=r"written by a newer secondlook \(journal schema 99"):
        await Journal.open(path)
    assert path.read_bytes() == before  # not a byte changed (no switch to WAL, no pragma)
