"""What survives a stop: journalled alerts are reviewed, journalled verdicts are published."""

from __future__ import annotations

import json

from daemon.app import JOURNAL_FILE
from daemon.journal import Journal
from plugins.canonical import CanonicalFormat
from tests.conftest import FIRE_RULE, collect, make_alert, make_settings, run_daemon


async def test_verdicts_made_without_a_broker_are_published_after_a_restart(
    tmp_path, broker, tiny_model
):
    offline = make_settings(tmp_path, broker=None, model=tiny_model)
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
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    journal = await Journal.open(settings.storage.dir / JOURNAL_FILE)
    incoming = CanonicalFormat().parse(json.dumps(make_alert("loop-1")).encode(), topic=None)
    ref, _ = await journal.record_alert(incoming.alert, incoming.images, source="http", topic=None)
    for _ in range(settings.pipeline.max_attempts):  # three starts that died mid-review
        await journal.begin_review(ref)
    await journal.close()
    async with run_daemon(settings) as d:
        record = await d.wait_reviewed("loop-1")
    [verdict] = record["verdicts"]
    assert verdict["verdict"] == "unreviewed"
    assert verdict["reason"] == "review interrupted 3 times; giving up"
