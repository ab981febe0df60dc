"""Back-pressure and order: the backlog, priorities, stale alerts, a full disk, pruning,
persistent sessions and shared subscriptions."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import sqlite3
import types
from datetime import timedelta

import pytest

from daemon import journal as journal_module
from daemon.app import JOURNAL_FILE, Daemon
from daemon.backlog import Backlog
from daemon.config import StorageSettings
from daemon.contract import utc_now
from daemon.journal import FeedbackRow, Journal, PlannedVerdict
from daemon.mqtt import publish_all
from daemon.storage import StorageKeeper
from plugins.canonical import CanonicalFormat
from tests.conftest import FIRE_RULE, collect, make_alert, make_settings, make_verdict, run_daemon
from tests.test_faults import noise_jpeg

ALERTS = "secondlook/alerts/box-t"
VERDICTS = "secondlook/verdicts/#"


async def test_the_backlog_hands_out_best_first_and_spills_to_the_journal():
    journal_rows = {1: 0, 2: 5, 3: 0, 4: 9, 5: 5}

    async def read_pending(limit: int) -> list[tuple[int, int]]:
        rows = sorted(journal_rows.items(), key=lambda row: (-row[1], row[0]))
        return rows[:limit]

    backlog = Backlog(read_pending, capacity=2, max_backlog=5)
    for ref, priority in journal_rows.items():
        backlog.add(ref, priority)
    # 4 took the place of 1 in memory; 1, 3 and 5 wait in the journal
    assert backlog.queued == 2 and backlog.pending == 5 and backlog.full
    order = []
    for _ in range(5):
        ref = await backlog.take()
        order.append(ref)
        del journal_rows[ref]  # reviewed
        backlog.done(ref, reviewed=True)
    # highest priority first, then the oldest, wherever each waited
    assert order == [4, 2, 5, 1, 3]
    assert backlog.pending == 0 and not backlog.full


async def test_intake_stays_paused_until_the_backlog_is_below_nine_tenths():
    async def read_pending(limit: int) -> list[tuple[int, int]]:
        return []

    backlog = Backlog(read_pending, capacity=100, max_backlog=20)
    for ref in range(1, 21):
        backlog.add(ref, 0)
    assert backlog.full and backlog.paused
    for _ in range(2):  # a slot freed is not taken at once (by HTTP, leaving MQTT paused)
        backlog.done(await backlog.take(), reviewed=True)
        assert not backlog.full and backlog.paused
    backlog.done(await backlog.take(), reviewed=True)  # 17 of 20: below nine tenths
    assert not backlog.paused
    # full only with a payload being taken in that turns out to add nothing (a duplicate)
    for ref in range(21, 23):
        backlog.add(ref, 0)
    backlog.reserve()
    assert backlog.paused
    backlog.release()
    assert backlog.pending == 19 and not backlog.paused


async def test_alerts_waiting_in_the_journal_are_not_passed_over_by_newer_ones():
    waiting: dict[int, int] = {}  # the journal's unreviewed alerts: priority by row id

    async def read_pending(limit: int) -> list[tuple[int, int]]:
        return sorted(waiting.items(), key=lambda row: (-row[1], row[0]))[:limit]

    def arrive(ref: int) -> None:
        waiting[ref] = 0
        backlog.add(ref, 0)

    backlog = Backlog(read_pending, capacity=4, max_backlog=100)
    for ref in range(1, 11):  # a burst: 6 of them spill to the journal
        arrive(ref)
    order = []
    for ref in range(100, 115):  # steady load: one new alert per review
        taken = await backlog.take()
        order.append(taken)
        del waiting[taken]
        backlog.done(taken, reviewed=True)
        arrive(ref)
    assert order == [*range(1, 11), *range(100, 105)]


async def test_a_failed_read_of_the_journal_is_tried_again(monkeypatch):
    monkeypatch.setattr("daemon.backlog.REFILL_RETRY_S", 0.01)
    failures = [sqlite3.OperationalError("disk I/O error")]

    async def read_pending(limit: int) -> list[tuple[int, int]]:
        if failures:
            raise failures.pop()
        return [(1, 0), (2, 0)][:limit]

    backlog = Backlog(read_pending, capacity=1, max_backlog=10)
    await backlog.load(2)  # two alerts left by an earlier run
    assert await asyncio.wait_for(backlog.take(), 5) == 1
    assert not failures


async def test_alerts_in_memory_do_not_wait_for_a_journal_that_fails(monkeypatch):
    monkeypatch.setattr("daemon.backlog.REFILL_RETRY_S", 60)

    async def failing(limit: int) -> list[tuple[int, int]]:
        raise sqlite3.OperationalError("disk I/O error")

    backlog = Backlog(failing, capacity=4, max_backlog=10)
    for ref in range(1, 6):  # the fifth waits in the journal
        backlog.add(ref, 0)
    taken = [await asyncio.wait_for(backlog.take(), 5) for _ in range(4)]
    assert taken == [1, 2, 3, 4]  # not held a minute by the retries of the journal's read


async def test_a_review_that_ends_while_the_journal_is_read_is_not_taken_again():
    waiting = {1: 0, 2: 0, 3: 0}  # the journal's unreviewed alerts
    reading = asyncio.Event()
    answer = asyncio.Event()

    async def read_pending(limit: int) -> list[tuple[int, int]]:
        rows = sorted(waiting.items())[:limit]  # read before the review below ends
        reading.set()
        await answer.wait()
        return rows

    backlog = Backlog(read_pending, capacity=1, max_backlog=10)
    for ref in waiting:
        backlog.add(ref, 0)
    assert await backlog.take() == 1  # 2 and 3 spilled to the journal
    second = asyncio.create_task(backlog.take())
    await reading.wait()
    del waiting[1]
    backlog.done(1, reviewed=True)  # ... while the journal is read
    answer.set()
    assert await second == 2  # not 1 again
    backlog.done(2, reviewed=True)
    del waiting[2]
    assert await backlog.take() == 3
    backlog.done(3, reviewed=True)
    assert backlog.pending == 0


async def test_an_alert_reviewed_already_is_dropped_uncounted():
    async def nothing(limit: int) -> list[tuple[int, int]]:
        return []

    backlog = Backlog(nothing, capacity=10, max_backlog=10)
    backlog.add(7, 0)
    backlog.add(8, 0)
    backlog.drop(await backlog.take())
    assert backlog.pending == 2 and backlog.active == 0


async def test_intake_reopens_below_nine_tenths_of_the_backlog():
    async def nothing(limit: int) -> list[tuple[int, int]]:
        return []

    backlog = Backlog(nothing, capacity=100, max_backlog=20)
    for ref in range(20):
        backlog.add(ref, 0)
    waiting = asyncio.create_task(backlog.wait_for_room())
    for _ in range(2):
        backlog.done(await backlog.take(), reviewed=True)
    await asyncio.sleep(0)
    assert not waiting.done()  # 18: not yet below 18
    backlog.done(await backlog.take(), reviewed=True)
    await asyncio.wait_for(waiting, 1)


async def journal_alerts(settings, alerts: list[tuple[dict, int]]) -> None:
    """Journal alerts as an earlier run would have left them: received, not reviewed."""
    journal = await Journal.open(settings.storage.dir / JOURNAL_FILE)
    for alert, priority in alerts:
        incoming = CanonicalFormat().parse(json.dumps(alert).encode(), topic=None)
        await journal.record_alert(
            incoming.alert, incoming.images, source="mqtt", topic=ALERTS, priority=priority
        )
    await journal.close()


async def test_alerts_taken_in_while_the_model_loads_carry_their_rules_priority(
    tmp_path, tiny_model
):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text("priority = 7\n" + FIRE_RULE)
    # a rule on trial neither raises its alerts' priority nor gives one to alerts it alone takes
    trial = "priority = 50\nshadow = true\n" + FIRE_RULE
    (settings.rules.dir / "fire_trial.toml").write_text(trial)
    (settings.rules.dir / "smoke_trial.toml").write_text(trial.replace('"fire"', '"smoke"'))
    daemon = Daemon(settings)
    pipeline = await daemon.open()  # intake opens here; the model is not loaded yet
    try:
        result = await pipeline.ingest(json.dumps(make_alert("early")).encode(), source="http")
        assert result.status == "accepted"
        smoke = make_alert("smoke", event_type="smoke")
        assert (await pipeline.ingest(json.dumps(smoke).encode(), source="http")).status == (
            "accepted"
        )
        assert [priority for _, priority in await pipeline.journal.pending_reviews()] == [7, 0]
    finally:
        await daemon.close()


async def test_rule_priority_decides_what_is_reviewed_first(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model, pipeline={"workers": 1})
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    intrusion = "priority = 10\n" + FIRE_RULE.replace('"fire"', '"intrusion"')
    (settings.rules.dir / "intrusion.toml").write_text(intrusion)
    backlog = [(make_alert(f"low-{i}"), 0) for i in range(4)]
    backlog += [(make_alert(f"high-{i}", event_type="intrusion"), 10) for i in range(2)]
    await journal_alerts(settings, backlog)
    async with run_daemon(settings) as d:
        records = [await d.wait_reviewed(alert["alert_id"]) for alert, _ in backlog]
    order = [r["alert_id"] for r in sorted(records, key=lambda r: r["reviewed_at"])]
    assert order[:2] == ["high-0", "high-1"]
    assert order[2:] == [f"low-{i}" for i in range(4)]


async def test_an_alert_older_than_max_age_is_forwarded_stale(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text("max_age_s = 600\n" + FIRE_RULE)
    old = (utc_now() - timedelta(hours=2)).isoformat()
    recent = utc_now().isoformat()
    async with run_daemon(settings) as d:
        await d.post_alert(make_alert("old-1", occurred_at=old))
        await d.post_alert(make_alert("recent-1", occurred_at=recent))
        [stale] = (await d.wait_reviewed("old-1"))["verdicts"]
        [judged] = (await d.wait_reviewed("recent-1"))["verdicts"]
    assert stale["verdict"] == "unreviewed" and stale["rule"] == "fire"
    # two hours old when posted, and a few seconds more by its review on a slow machine
    age = re.match(r"stale: the alert is (\d+) s old, over max_age_s = 600", stale["reason"])
    assert age is not None and 7200 <= int(age[1]) < 7260, stale["reason"]
    assert judged["verdict"] != "unreviewed"


async def test_a_full_disk_pauses_intake_with_a_clear_error_and_loses_nothing(
    tmp_path, broker, tiny_model
):
    settings = make_settings(
        tmp_path, broker=broker, model=tiny_model, storage={"check_interval_s": 0.2}
    )
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    noise = base64.b64encode(noise_jpeg((640, 360))).decode()
    async with collect(broker, VERDICTS) as out, run_daemon(settings) as d:
        journal = d.daemon.journal
        (pages,) = await journal.call_writer(lambda db: db.execute("PRAGMA page_count").fetchone())
        # SQLite's own limit: writes past it fail exactly as on a full disk
        await journal.call_writer(lambda db: db.execute(f"PRAGMA max_page_count = {pages}"))
        status, body = await d.post_alert(make_alert("full-http", image=noise))
        assert status == 503
        assert "database or disk is full" in body["error"]
        health = await d.daemon.health()
        assert "the journal cannot write" in health["intake"]
        # an MQTT alert meanwhile stays unacknowledged with the broker
        await publish_all("127.0.0.1", broker.port, ALERTS, [json.dumps(make_alert("full-mqtt"))])
        await asyncio.sleep(0.5)
        assert out.verdicts() == []
        await journal.call_writer(lambda db: db.execute("PRAGMA max_page_count = 1073741823"))
        verdicts = await out.wait_for(1, timeout=30)
        status, body = await d.post_alert(make_alert("full-http", image=noise))  # sent again
        assert status == 202 and body["status"] == "accepted"  # nothing of it was kept at 503
        verdicts = await out.wait_for(2, timeout=30)
    assert sorted(v["alert_id"] for _, v in verdicts) == ["full-http", "full-mqtt"]


async def test_a_journal_that_cannot_mark_a_verdict_published_neither_stops_nor_repeats_it(
    tmp_path, broker, tiny_model
):
    settings = make_settings(tmp_path, broker=broker, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    async with collect(broker, VERDICTS) as out, run_daemon(settings) as d:
        journal = d.daemon.journal
        mark_published, failures = journal.mark_published, []

        async def full_disk_twice(ids):
            if len(failures) < 2:
                failures.append(list(ids))  # as SQLite fails a write to a full disk
                raise sqlite3.OperationalError("database or disk is full")
            await mark_published(ids)

        journal.mark_published = full_disk_twice
        status, _ = await d.post_alert(make_alert("unmarked"))
        assert status == 202
        await out.wait_for(1, timeout=30)
        for _ in range(100):  # marked once the journal writes again (a few seconds)
            if (await d.daemon.health())["unpublished"] == 0:
                break
            await asyncio.sleep(0.1)
        health = await d.daemon.health()
        assert health["unpublished"] == 0 and health["status"] == "ok"
        assert len(failures) == 2 and failures[0] == failures[1]  # the same verdict, kept
        status, _ = await d.post_alert(make_alert("after"))
        await out.wait_for(2, timeout=30)
        await asyncio.sleep(1)
    # each verdict published once: the acknowledged one was not sent again
    assert [v["alert_id"] for _, v in out.verdicts()] == ["unmarked", "after"]


async def test_reviews_that_fail_on_the_journal_pause_instead_of_spinning(
    tmp_path, broker, tiny_model
):
    settings = make_settings(tmp_path, broker=broker, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    async with collect(broker, VERDICTS) as out, run_daemon(settings) as d:
        journal = d.daemon.journal
        begin_review, tries = journal.begin_review, []

        async def full_disk_for_3_s(ref):
            tries.append(asyncio.get_running_loop().time())
            if tries[-1] - tries[0] < 3 or len(tries) == 5:
                raise sqlite3.OperationalError("database or disk is full")
            return await begin_review(ref)

        journal.begin_review = full_disk_for_3_s
        status, _ = await d.post_alert(make_alert("paused"))
        assert status == 202
        verdicts = await out.wait_for(1, timeout=30)
        assert (await d.daemon.health())["status"] == "ok"
        # a failure after a review that went through pauses the first pause again
        await d.post_alert(make_alert("again"))
        verdicts = await out.wait_for(2, timeout=30)
    # pauses of 0.5, 1, 2 s: tried four times, not in a loop, then reviewed once; then 0.5 s
    gaps = [later - earlier for earlier, later in itertools.pairwise(tries)]
    assert len(tries) == 6, tries
    for gap, pause in zip([gaps[0], gaps[1], gaps[2], gaps[4]], [0.5, 1, 2, 0.5], strict=True):
        assert pause <= gap < pause + 0.75, gaps
    assert [v["alert_id"] for _, v in verdicts] == ["paused", "again"]


async def test_a_verdict_the_journal_could_not_write_costs_the_alert_no_attempt(
    tmp_path, tiny_model
):
    settings = make_settings(tmp_path, broker=None, model=tiny_model, pipeline={"max_attempts": 2})
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    async with run_daemon(settings) as d:
        journal = d.daemon.journal
        finish_review, failures = journal.finish_review, []

        async def full_disk_three_times(ref, planned):
            if len(failures) < 3:  # more than max_attempts: a crash count would give it up
                failures.append(ref)
                raise sqlite3.OperationalError("database or disk is full")
            return await finish_review(ref, planned)

        uncount_attempts = journal.uncount_attempts

        async def full_disk_to_take_back(refs):
            if len(failures) < 3:  # the same full disk: taking the attempt back fails too
                raise sqlite3.OperationalError("database or disk is full")
            return await uncount_attempts(refs)

        journal.finish_review = full_disk_three_times
        journal.uncount_attempts = full_disk_to_take_back
        status, _ = await d.post_alert(make_alert("unwritten"))
        assert status == 202
        for _ in range(150):
            row = await journal.read_one(
                "SELECT state, attempts FROM alerts WHERE alert_id = 'unwritten'"
            )
            if row["state"] == "reviewed":
                break
            await asyncio.sleep(0.1)
        [verdict] = await journal.read("SELECT verdict, rule FROM verdicts")
    assert len(failures) == 3
    assert (row["state"], row["attempts"]) == ("reviewed", 1)
    assert (verdict["verdict"], verdict["rule"]) != ("unreviewed", None)


async def test_no_review_begins_once_a_stops_grace_has_run_out(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model, pipeline={"workers": 1})
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    async with run_daemon(settings) as d:
        pipeline, journal = d.daemon.pipeline, d.daemon.journal
        verdicts_for, release = pipeline._verdicts_for, asyncio.Event()

        async def stuck(stored, attempts):
            await release.wait()
            return await verdicts_for(stored, attempts)

        pipeline._verdicts_for = stuck
        assert (await d.post_alert(make_alert("stuck")))[0] == 202
        while not pipeline._attempting:
            await asyncio.sleep(0.05)
        assert await pipeline.drain(0.2) is False  # the grace runs out
        result = await pipeline.ingest(json.dumps(make_alert("late")).encode(), source="http")
        assert result.status == "accepted"
        [(late,)] = await journal.read("SELECT id FROM alerts WHERE alert_id = 'late'")
        with contextlib.suppress(Exception):  # not begun (the pipeline says why)
            await pipeline.review(late)
        rows = await journal.read("SELECT alert_id, state, attempts FROM alerts ORDER BY id")
        release.set()
    # neither the review cut off nor the one that came after counts as an attempt
    assert [tuple(row) for row in rows] == [("stuck", "received", 0), ("late", "received", 0)]


async def test_verdicts_made_without_mqtt_are_not_sent_once_it_is_turned_on(
    tmp_path, broker, tiny_model
):
    offline = make_settings(tmp_path, broker=None, model=tiny_model)
    (offline.rules.dir / "fire.toml").write_text(FIRE_RULE)
    async with run_daemon(offline) as d:
        assert (await d.post_alert(make_alert("made-offline")))[0] == 202
        [verdict] = (await d.wait_reviewed("made-offline"))["verdicts"]
        assert verdict["published"] is False
    online = make_settings(tmp_path, broker=broker, model=tiny_model)  # the same journal
    async with collect(broker, VERDICTS) as out, run_daemon(online) as d:
        assert await d.daemon.journal.count_unpublished() == 0
        assert (await d.post_alert(make_alert("made-online")))[0] == 202
        await out.wait_for(1, timeout=30)
        await asyncio.sleep(0.5)
    assert [v["alert_id"] for _, v in out.verdicts()] == ["made-online"]


async def test_pruning_forgets_only_what_is_reviewed_and_published(tmp_path):
    journal = await Journal.open(tmp_path / "j.sqlite3")
    parse = CanonicalFormat().parse
    refs = {}
    for alert_id in ("done-old", "done-new", "unpublished", "unreviewed"):
        incoming = parse(json.dumps(make_alert(alert_id)).encode(), topic=None)
        refs[alert_id] = (
            await journal.record_alert(incoming.alert, incoming.images, source="http", topic=None)
        ).ref
    for alert_id in ("done-old", "done-new", "unpublished"):
        verdict = make_verdict(alert_id)
        await journal.finish_review(refs[alert_id], [PlannedVerdict(verdict, "t")])
    ids = [item.id for item in await journal.unpublished()]
    await journal.mark_published(ids[:2])  # done-old and done-new
    later = utc_now() + timedelta(days=1)
    # every snapshot of what is done goes beyond the cap; nothing else is touched
    pruned = await journal.prune(
        snapshots_before=utc_now() - timedelta(days=1),
        alerts_before=utc_now() - timedelta(days=1),
        snapshot_max_bytes=1,
    )
    assert (pruned.alerts, pruned.snapshots) == (0, 2)
    assert [len((await journal.load_alert(refs[a])).images) for a in refs] == [0, 0, 1, 1]
    pruned = await journal.prune(
        snapshots_before=later, alerts_before=later, snapshot_max_bytes=10**9
    )
    assert pruned.alerts == 2
    assert [a["alert_id"] for a in await journal.find_alerts("done-old")] == []
    assert len(await journal.find_alerts("unpublished")) == 1
    assert await journal.count_pending() == 1
    await journal.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_alerts_published_while_the_daemon_is_down_wait_in_its_session(
    tmp_path, broker, tiny_model, protocol
):
    settings = make_settings(tmp_path, broker=broker, model=tiny_model, mqtt={"protocol": protocol})
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    async with collect(broker, VERDICTS) as out:
        async with run_daemon(settings):
            pass  # subscribed once: the broker now keeps the session
        ids = [f"away-{i}" for i in range(5)]
        await publish_all(
            "127.0.0.1", broker.port, ALERTS, [json.dumps(make_alert(i)) for i in ids]
        )
        async with run_daemon(settings):
            verdicts = await out.wait_for(5, timeout=30)
    assert sorted(v["alert_id"] for _, v in verdicts) == ids


async def test_two_gateways_on_one_shared_subscription_review_each_alert_once(
    tmp_path, broker, tiny_model
):
    gateways = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        settings = make_settings(
            tmp_path / name, broker=broker, model=tiny_model, mqtt={"share_group": "review"}
        )
        (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
        gateways.append(settings)
    ids = [f"shared-{i:02d}" for i in range(60)]
    async with (
        collect(broker, VERDICTS) as out,
        run_daemon(gateways[0]) as a,
        run_daemon(gateways[1]) as b,
    ):
        await publish_all(
            "127.0.0.1", broker.port, ALERTS, [json.dumps(make_alert(i)) for i in ids]
        )
        await out.wait_for(len(ids), timeout=60)
        await asyncio.sleep(0.5)  # a second verdict for any alert would arrive by now
        share = []
        for gateway in (a, b):
            async with gateway.daemon.journal._reader.execute(
                "SELECT count(*) FROM alerts"
            ) as rows:
                share.append((await rows.fetchone())[0])
    verdicts = out.verdicts()
    assert sorted(v["alert_id"] for _, v in verdicts) == ids  # each exactly once
    assert sum(share) == len(ids) and min(share) > 0, share
    print(f"\nshared subscription: {len(ids)} alerts split {share[0]} / {share[1]}, 0 twice")


async def test_pruning_without_an_outbox_a_chunk_at_a_time_gives_the_space_back(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(journal_module, "PRUNE_CHUNK", 3)  # several commits per prune
    journal = await Journal.open(tmp_path / "j.sqlite3")
    parse = CanonicalFormat().parse
    refs = []
    for i in range(10):
        alert = make_alert(f"a-{i}", image=base64.b64encode(noise_jpeg((400, 300))).decode())
        incoming = parse(json.dumps(alert).encode(), topic=None)
        recorded = await journal.record_alert(
            incoming.alert, incoming.images, source="http", topic=None
        )
        refs.append(recorded.ref)
    for ref in refs[:8]:  # reviewed, never published: no MQTT
        await journal.finish_review(ref, [])
    for _ in range(7):
        await journal.record_reject(
            source="http", topic=None, field="payload", error="bad", payload=b"x" * 4000
        )
    checkpoint = lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # noqa: E731
    await journal.call_writer(checkpoint)
    size = (tmp_path / "j.sqlite3").stat().st_size
    later = utc_now() + timedelta(days=1)
    pruned = await journal.prune(
        snapshots_before=later,
        alerts_before=utc_now() - timedelta(days=1),
        snapshot_max_bytes=10**9,
        published_only=False,
        max_rejects=2,
    )
    assert (pruned.alerts, pruned.snapshots) == (0, 8)  # the snapshots of the 8 reviewed
    assert (await journal.read_one("SELECT count(*) FROM rejects"))[0] == 2  # the newest
    pruned = await journal.prune(
        snapshots_before=later, alerts_before=later, snapshot_max_bytes=10**9, published_only=False
    )
    assert pruned.alerts == 8 and await journal.count_pending() == 2
    assert (await journal.read_one("PRAGMA freelist_count"))[0] == 0
    await journal.call_writer(checkpoint)
    assert (tmp_path / "j.sqlite3").stat().st_size < size / 2  # given back, not kept free
    await journal.close()


async def reviewed_with_snapshots(journal: Journal, count: int, first: int = 0) -> list[int]:
    """Journal `count` alerts (a-`first`, …) with a snapshot each, reviewed; the snapshots'
    sizes."""
    parse = CanonicalFormat().parse
    sizes = []
    for i in range(first, first + count):
        picture = noise_jpeg((400, 300))
        sizes.append(len(picture))
        alert = make_alert(f"a-{i}", image=base64.b64encode(picture).decode())
        incoming = parse(json.dumps(alert).encode(), topic=None)
        recorded = await journal.record_alert(
            incoming.alert, incoming.images, source="http", topic=None
        )
        await journal.finish_review(recorded.ref, [])
    return sizes


def snapshot_deletes(journal: Journal) -> list[list[int]]:
    """From now on, the alerts whose snapshots each commit of the journal deletes."""
    deletes: list[list[int]] = []
    write = journal._write

    async def noted(op):
        if getattr(op, "func", None) is journal_module._delete_snapshots:
            deletes.append(op.args[0])
        return await write(op)

    journal._write = noted
    return deletes


async def test_snapshots_over_the_cap_are_pruned_oldest_first_in_commits_of_bounded_size(
    tmp_path, monkeypatch
):
    journal = await Journal.open(tmp_path / "j.sqlite3")
    sizes = await reviewed_with_snapshots(journal, 10)
    # at most three snapshots' bytes per commit
    monkeypatch.setattr(journal_module, "SNAPSHOT_PRUNE_BYTES", 3 * max(sizes))
    deletes = snapshot_deletes(journal)
    pruned = await journal.prune(
        snapshots_before=utc_now() - timedelta(days=1),
        alerts_before=utc_now() - timedelta(days=1),
        snapshot_max_bytes=sum(sizes[-2:]),
        published_only=False,
    )
    assert pruned.snapshots == 8 and pruned.snapshot_bytes == sum(sizes[-2:])
    kept = await journal.read("SELECT alert_ref FROM alert_images ORDER BY alert_ref")
    assert [row["alert_ref"] for row in kept] == [9, 10]  # the newest two
    assert [len(refs) for refs in deletes] == [3, 3, 2]
    await journal.close()


async def test_alerts_pruned_with_their_snapshots_free_them_in_bounded_commits(
    tmp_path, monkeypatch
):
    journal = await Journal.open(tmp_path / "j.sqlite3")
    sizes = await reviewed_with_snapshots(journal, 6)
    monkeypatch.setattr(journal_module, "SNAPSHOT_PRUNE_BYTES", 2 * max(sizes))
    deletes = snapshot_deletes(journal)
    # snapshots kept longer than alerts: the alerts' snapshots go with them
    pruned = await journal.prune(
        snapshots_before=utc_now() - timedelta(days=90),
        alerts_before=utc_now() + timedelta(days=1),
        snapshot_max_bytes=10**9,
        published_only=False,
    )
    assert (pruned.alerts, pruned.snapshots) == (6, 6)
    assert [len(refs) for refs in deletes] == [2, 2, 2]
    await journal.close()


async def test_refused_payloads_are_pruned_a_chunk_per_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "PRUNE_CHUNK", 3)
    journal = await Journal.open(tmp_path / "j.sqlite3")
    for _ in range(11):
        await journal.record_reject(
            source="http", topic=None, field="payload", error="bad", payload=b"x" * 100
        )
    write, changes = journal._write, []

    async def counted(op):
        before = await journal.call_writer(lambda db: db.total_changes)
        result = await write(op)
        changes.append(await journal.call_writer(lambda db: db.total_changes) - before)
        return result

    journal._write = counted
    now = utc_now()
    await journal.prune(
        snapshots_before=now,
        alerts_before=now - timedelta(days=1),
        snapshot_max_bytes=10**9,
        max_rejects=2,
    )
    kept = await journal.read("SELECT id FROM rejects ORDER BY id")
    assert [row["id"] for row in kept] == [10, 11]  # the newest two
    assert sum(changes) == 9 and max(changes) <= 3  # not one commit that waits for them all
    await journal.close()


async def test_an_alert_with_feedback_keeps_its_snapshot_as_long_as_the_alert(tmp_path):
    journal = await Journal.open(tmp_path / "j.sqlite3")
    sizes = await reviewed_with_snapshots(journal, 4)
    await journal.record_feedback(FeedbackRow(2, "fire", "false_alarm", "real", False))
    now = utc_now()
    ages = {"snapshots_before": now + timedelta(days=1), "alerts_before": now - timedelta(days=1)}
    pruned = await journal.prune(**ages, snapshot_max_bytes=10**9, published_only=False)
    kept = await journal.read("SELECT alert_ref FROM alert_images ORDER BY alert_ref")
    assert pruned.snapshots == 3 and [row["alert_ref"] for row in kept] == [2]
    # over the cap, the others' snapshots go first
    sizes += await reviewed_with_snapshots(journal, 2, first=4)
    ages["snapshots_before"] = now - timedelta(days=1)
    pruned = await journal.prune(**ages, snapshot_max_bytes=max(sizes) + 1, published_only=False)
    kept = await journal.read("SELECT alert_ref FROM alert_images ORDER BY alert_ref")
    assert pruned.snapshots == 2 and [row["alert_ref"] for row in kept] == [2]
    # the alert itself goes at its age, its snapshot and feedback with it
    ages["alerts_before"] = now + timedelta(days=1)
    pruned = await journal.prune(**ages, snapshot_max_bytes=10**9, published_only=False)
    assert pruned.alerts == 6 and not await journal.read("SELECT * FROM feedback")
    assert not await journal.read("SELECT * FROM alert_images")
    await journal.close()


async def test_feedback_given_while_snapshots_are_pruned_keeps_its_alerts_snapshot(tmp_path):
    journal = await Journal.open(tmp_path / "j.sqlite3")
    await reviewed_with_snapshots(journal, 4)
    write = journal._write

    async def feedback_meanwhile(op):
        result = await write(op)
        if getattr(op, "func", None) is journal_module._snapshots_of and result:
            # the operator's feedback lands between the choice and the deletion
            await journal.record_feedback(FeedbackRow(2, "fire", "confirmed", "real", True))
        return result

    journal._write = feedback_meanwhile
    now = utc_now()
    pruned = await journal.prune(
        snapshots_before=now + timedelta(days=1),
        alerts_before=now - timedelta(days=1),
        snapshot_max_bytes=10**9,
        published_only=False,
    )
    kept = await journal.read("SELECT alert_ref FROM alert_images ORDER BY alert_ref")
    assert pruned.snapshots == 3 and [row["alert_ref"] for row in kept] == [2]
    await journal.close()


def test_refs_are_chunked_by_count_and_by_bytes():
    sized = [(1, 10), (2, 10), (3, 50), (4, 5), (5, 5), (6, 5)]
    assert journal_module._chunks_by_bytes(sized, 2, 30) == [[1, 2], [3], [4, 5], [6]]
    assert journal_module._chunks_by_bytes([], 2, 30) == []


async def test_a_journal_made_without_incremental_vacuum_is_pruned_all_the_same(tmp_path):
    path = tmp_path / "j.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:  # free pages it cannot give back
        db.execute("CREATE TABLE filler (x BLOB)")
        db.executemany("INSERT INTO filler VALUES (?)", [(b"x" * 3000,) for _ in range(300)])
        db.commit()
        db.execute("DELETE FROM filler")
        db.commit()
    journal = await Journal.open(path)
    later = utc_now() + timedelta(days=1)
    try:
        pruned = await asyncio.wait_for(
            journal.prune(snapshots_before=later, alerts_before=later, snapshot_max_bytes=1), 10
        )  # it looped for good, waiting for the free pages to go
        assert (pruned.alerts, pruned.snapshots) == (0, 0)
    finally:
        await journal.close()


async def test_a_max_age_beyond_the_calendar_keeps_everything(tmp_path):
    journal = await Journal.open(tmp_path / "j.sqlite3")
    settings = StorageSettings(dir=tmp_path, journal_max_age_days=1e6, snapshot_max_age_days=1e12)
    keeper = StorageKeeper(settings, journal, types.SimpleNamespace(storage_problem=None))  # type: ignore[arg-type]
    incoming = CanonicalFormat().parse(json.dumps(make_alert("kept")).encode(), topic=None)
    await journal.record_alert(incoming.alert, incoming.images, source="http", topic=None)
    try:
        pruned = await keeper.prune()  # "keep for ever" (was an OverflowError at every prune)
        assert (pruned.alerts, pruned.snapshots) == (0, 0)
        assert len(await journal.find_alerts("kept")) == 1
    finally:
        await journal.close()


async def test_a_long_prune_does_not_hold_a_pause_that_space_no_longer_calls_for(
    tmp_path, monkeypatch
):
    journal = await Journal.open(tmp_path / "j.sqlite3")
    pipeline = types.SimpleNamespace(storage_problem=None)
    settings = StorageSettings(dir=tmp_path, check_interval_s=0.05)
    keeper = StorageKeeper(settings, journal, pipeline)  # type: ignore[arg-type]
    slow = asyncio.Event()

    async def slow_prune():
        await slow.wait()  # a prune of a big journal

    keeper.prune = slow_prune
    running = asyncio.create_task(keeper.run())
    try:
        await asyncio.sleep(0.2)  # the prune is under way when a write fails
        pipeline.storage_problem = "the journal cannot write: disk I/O error"
        await asyncio.sleep(0.5)
        assert pipeline.storage_problem is None  # space was there all along
        assert not slow.is_set()
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await journal.close()


def test_with_no_space_kept_free_a_failed_write_is_not_retried_on_a_full_disk(
    tmp_path, monkeypatch
):
    from daemon import storage

    problem = "the journal cannot write: database or disk is full"
    pipeline = types.SimpleNamespace(storage_problem=problem)
    keeper = StorageKeeper(StorageSettings(dir=tmp_path, min_free_mb=0), None, pipeline)  # type: ignore[arg-type]
    monkeypatch.setattr(storage, "free_mb", lambda settings: 0.0)
    keeper.check_space()
    assert pipeline.storage_problem == problem  # not opened to fail again at once
    monkeypatch.setattr(storage, "free_mb", lambda settings: 0.5)
    keeper.check_space()
    assert pipeline.storage_problem is None


async def test_reloaded_storage_intervals_apply_without_a_restart(tmp_path):
    journal = await Journal.open(tmp_path / "j.sqlite3")
    pipeline = types.SimpleNamespace(storage_problem=None)
    keeper = StorageKeeper(StorageSettings(dir=tmp_path), journal, pipeline)  # type: ignore[arg-type]
    prunes = []
    prune = keeper.prune

    async def counted_prune():
        prunes.append(1)
        return await prune()

    keeper.prune = counted_prune
    running = asyncio.create_task(keeper.run())
    try:
        await asyncio.sleep(0.3)
        assert len(prunes) == 1  # at start; the next after prune_interval_s (600 s)
        # as SIGHUP applies a new [storage] section
        keeper.settings = StorageSettings(
            dir=tmp_path, prune_interval_s=0.05, check_interval_s=0.01
        )
        await asyncio.sleep(0.5)
        assert len(prunes) >= 5
    finally:
        running.cancel()
        await journal.close()
