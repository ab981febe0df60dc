"""What survives a stop: journalled alerts are reviewed, journalled verdicts are published."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3

import pytest

from daemon.app import JOURNAL_FILE, Daemon, StartupError
from daemon.journal import Journal
from plugins.canonical import CanonicalFormat
from tests.conftest import (
    FIRE_RULE,
    collect,
    free_port,
    make_alert,
    make_settings,
    run_daemon,
)


async def test_verdicts_made_without_a_broker_are_published_after_a_restart(
    tmp_path, broker, tiny_model, monkeypatch
):
    monkeypatch.setattr("daemon.app.MQTT_READY_WAIT_S", 0.5)
    # MQTT on, its broker unreachable (not MQTT off: those verdicts are never published)
    offline = make_settings(tmp_path, broker=broker, model=tiny_model, mqtt={"port": free_port()})
    (offline.rules.dir / "fire.toml").write_text(FIRE_RULE)
    async with run_daemon(offline) as d:
        for alert_id in ("restart-1", "restart-2"):
            await d.post_alert(make_alert(alert_id))
            await d.wait_reviewed(alert_id)
        assert await d.daemon.journal.count_unpublished() == 2
    online = make_settings(tmp_path, broker=broker, model=tiny_model)
    async with collect(broker, "secondlook/verdicts/#") as out, run_daemon(online) as d:
        verdicts = await out.wait_for(2)
        _, record = await d.get_alert("restart-1")
    assert sorted(v["alert_id"] for _, v in verdicts) == ["restart-1", "restart-2"]
    assert record["verdicts"][0]["published"] is True
    assert record["attempts"] == 1  # published again, not reviewed again


async def test_alerts_journalled_but_not_reviewed_are_reviewed_at_start(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    # as if the daemon had died right after the journal commit
    journal = await Journal.open(settings.storage.dir / JOURNAL_FILE)
    incoming = CanonicalFormat().parse(json.dumps(make_alert("crash-1")).encode(), topic=None)
    await journal.record_alert(incoming.alert, incoming.images, source="mqtt", topic="t")
    await journal.close()
    async with run_daemon(settings) as d:
        record = await d.wait_reviewed("crash-1")
    assert record["verdicts"][0]["rule"] == "fire"


async def test_a_review_interrupted_too_often_ends_unreviewed(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(
        FIRE_RULE + '[publish]\ntopic = "alarms/{event_type}/{verdict}"\n'
    )
    journal = await Journal.open(settings.storage.dir / JOURNAL_FILE)
    incoming = CanonicalFormat().parse(json.dumps(make_alert("loop-1")).encode(), topic=None)
    ref = (
        await journal.record_alert(incoming.alert, incoming.images, source="http", topic=None)
    ).ref
    for _ in range(settings.pipeline.max_attempts):  # three starts that died mid-review
        await journal.begin_review(ref)
    await journal.close()
    async with run_daemon(settings) as d:
        record = await d.wait_reviewed("loop-1")
        topics = await d.daemon.journal.read("SELECT topic FROM verdicts")
    [verdict] = record["verdicts"]
    assert verdict["verdict"] == "unreviewed"
    assert verdict["reason"] == "review interrupted 3 times; giving up"
    # on the rule's own topic, which an alarm system may follow alone
    assert verdict["rule"] == "fire" and [row["topic"] for row in topics] == [
        "alarms/fire/unreviewed"
    ]


async def test_a_stored_alert_that_fails_the_checks_is_forwarded_unreviewed(tmp_path, tiny_model):
    """An alert in the journal that no longer validates (a laxer older version wrote it,
    a hand edit) ends unreviewed with what is wrong, once; the alerts behind it go on."""
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    path = settings.storage.dir / JOURNAL_FILE
    journal = await Journal.open(path)
    for alert_id in ("bad-score", "bad-camera", "fine"):
        incoming = CanonicalFormat().parse(json.dumps(make_alert(alert_id)).encode(), topic=None)
        await journal.record_alert(incoming.alert, incoming.images, source="http", topic=None)
    await journal.close()
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE alerts SET alert = json_set(alert, '$.score', 7) WHERE alert_id = 'bad-score'"
        )
        db.execute(
            "UPDATE alerts SET alert = json_set(alert, '$.camera_id', 5, '$.occurred_at', "
            "'yesterday', '$.boxes', json('[1, 2, 3, 4]')) WHERE alert_id = 'bad-camera'"
        )
    async with run_daemon(settings) as d:
        records = {a: await d.wait_reviewed(a) for a in ("bad-score", "bad-camera", "fine")}
        assert await d.daemon.journal.count_pending() == 0
        payloads = {
            json.loads(row[0])["alert_id"]: json.loads(row[0])
            for row in await d.daemon.journal.read("SELECT payload FROM verdicts")
        }
        # its snapshot is no playground subject as that alert: it would be another one
        row = await d.daemon.journal.read_one("SELECT id FROM alerts WHERE alert_id = 'bad-score'")
        snapshot = {"ref": row["id"], "idx": 0}
        async with d.http.post(
            f"{d.base_url}/v1/try", json={"snapshot": snapshot, "prompt": "Fire?"}
        ) as response:
            assert response.status == 400
            assert (await response.json())["error"].startswith(
                "snapshot: its alert fails the contract's checks (score: "
            )
    [score] = records["bad-score"]["verdicts"]
    assert score["verdict"] == "unreviewed" and score["rule"] is None
    assert score["reason"].startswith("the stored alert fails the contract's checks: score:")
    assert payloads["bad-score"]["camera_id"] == "cam-1"  # what could be read
    [camera] = records["bad-camera"]["verdicts"]
    assert camera["verdict"] == "unreviewed" and camera["reason"].endswith(
        "camera_id: Input should be a valid string; occurred_at: expected an RFC 3339 time such "
        "as 2026-11-20T14:03:12+08:00; boxes.0: Input should be an object; and 3 more"
    )
    # what cannot be read is empty; the time is the alert's arrival, a time as the contract says
    assert payloads["bad-camera"]["camera_id"] == ""
    assert payloads["bad-camera"]["occurred_at"] == records["bad-camera"]["received_at"]
    assert records["bad-score"]["attempts"] == records["bad-camera"]["attempts"] == 1
    assert records["fine"]["verdicts"][0]["rule"] == "fire"


async def test_a_resend_of_an_alert_whose_intake_was_cut_short_is_reviewed(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    alert = make_alert("cut-1")
    async with run_daemon(settings) as d:
        # journalled, but the intake stopped before queueing it (its connection dropped)
        incoming = CanonicalFormat().parse(json.dumps(alert).encode(), topic=None)
        await d.daemon.journal.record_alert(
            incoming.alert, incoming.images, source="mqtt", topic="t"
        )
        status, body = await d.post_alert(alert)  # the broker's redelivery
        assert status == 202 and body["status"] == "duplicate"
        record = await d.wait_reviewed("cut-1")
        # a later resend of the reviewed alert is only a duplicate
        await d.post_alert(alert)
        await asyncio.sleep(0.2)
        record = (await d.get_alert("cut-1"))[1]
    assert record["attempts"] == 1 and len(record["verdicts"]) == 1


async def test_a_second_daemon_on_the_same_journal_is_refused_at_its_start(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    async with run_daemon(settings):
        second = Daemon(settings)
        with pytest.raises(
            StartupError, match=rf"in use by another secondlook daemon \(pid {os.getpid()}"
        ):
            await second.open()
        await second.close()
    third = Daemon(settings)  # once the first has stopped
    await third.open()
    await third.close()


@pytest.mark.parametrize(
    ("damage", "hint"),
    [
        (b"\x00\xff" * 3000, "the file is damaged: move it aside"),
        (None, "may the daemon's user write there"),
    ],
)
async def test_a_journal_that_cannot_be_opened_is_one_clear_error(tmp_path, damage, hint):
    settings = make_settings(tmp_path, broker=None, model=tmp_path / "unused")
    path = settings.storage.dir / JOURNAL_FILE
    path.parent.mkdir(parents=True)
    if damage is not None:
        path.write_bytes(damage)
    else:
        path.mkdir()  # a directory where the file belongs
    daemon = Daemon(settings)
    with pytest.raises(StartupError, match=rf"the journal {path} cannot be opened: .*{hint}"):
        await daemon.open()
    await daemon.close()
