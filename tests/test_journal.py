"""The journal's group commit: writes that share a commit succeed or fail one by one."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from daemon.contract import Alert
from daemon.journal import Journal
from daemon.plugin_api import RawImage
from tests.conftest import jpeg_bytes, make_alert


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
