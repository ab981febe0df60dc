"""The operator's API over a running daemon: recent alerts, thumbnails, feedback, stats,
rules and Prometheus metrics; and the journal migration that made room for them."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import random
import sqlite3
from datetime import timedelta

import pytest
from PIL import Image
from structlog.testing import capture_logs

from daemon import feedback, history
from daemon.contract import utc_now
from daemon.feedback import Feedback, FeedbackError, check_fields, judged
from daemon.journal import SCHEMA_VERSION, Journal, PlannedVerdict
from plugins.canonical import CanonicalFormat
from tests.conftest import (
    FIRE_RULE,
    jpeg_bytes,
    make_alert,
    make_settings,
    make_verdict,
    publish,
    run_daemon,
)

#: a rule that confirms at any P(real) (so every verdict is known: confirmed)
CONFIRM_ALL = FIRE_RULE + "confirm_at = 0.0\nreject_below = 0.0\n"
#: ... and one that rejects at any P(real)
REJECT_ALL = FIRE_RULE.replace('"fire"', '"smoke"') + "confirm_at = 1.0\nreject_below = 1.0\n"


async def test_feedback_is_stored_and_changes_the_rules_measured_precision(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(CONFIRM_ALL)
    (settings.rules.dir / "smoke.toml").write_text(REJECT_ALL)
    async with run_daemon(settings) as d:
        ids = {f"fire-{i}": "fire" for i in range(4)} | {f"smoke-{i}": "smoke" for i in range(2)}
        for alert_id, event_type in ids.items():
            assert (await d.post_alert(make_alert(alert_id, event_type=event_type)))[0] == 202
        for alert_id in ids:
            await d.wait_reviewed(alert_id)

        async def feedback(alert_id: str, body: dict, **headers: str) -> tuple[int, dict]:
            async with d.http.post(
                f"{d.base_url}/v1/alerts/{alert_id}/feedback", json=body, headers=headers
            ) as response:
                return response.status, await response.json()

        async def stats() -> dict:
            async with d.http.get(f"{d.base_url}/v1/stats") as response:
                assert response.status == 200
                return (await response.json())["rules"]

        before = await stats()
        assert before["fire"]["alerts"] == 4 and before["fire"]["confirmed"] == 4
        assert before["fire"]["filtered_ratio"] == 0.0
        assert before["smoke"]["rejected"] == 2 and before["smoke"]["filtered_ratio"] == 1.0
        assert before["fire"]["feedback"]["precision"] is None
        assert before["fire"]["latency_p50_ms"] is not None

        # a source the journal could not store: refused, and nothing else disturbed
        status, body = await feedback("fire-0", {"correct": True}, **{"X-Feedback-Source": "cÿ"})
        assert status == 400 and body["field"] == "X-Feedback-Source"
        # three of four confirmed fires were real, one was a lamp
        for alert_id in ("fire-0", "fire-1", "fire-2"):
            status, body = await feedback(alert_id, {"correct": True})
            assert status == 201 and body["label"] == "real" and body["rule"] == "fire"
        status, body = await feedback("fire-3", {"label": "false", "note": "a lamp"})
        assert status == 201 and body["correct"] is False
        # the rejected smoke was right once, wrong once; then corrected (latest counts)
        assert (await feedback("smoke-0", {"correct": True}))[1]["label"] == "false"
        assert (await feedback("smoke-1", {"correct": True}))[0] == 201
        assert (await feedback("smoke-1", {"label": "real"}))[1]["correct"] is False

        after = await stats()
        fire, smoke = after["fire"]["feedback"], after["smoke"]["feedback"]
        assert (fire["count"], fire["right"], fire["wrong"]) == (4, 3, 1)
        assert fire["precision"] == 0.75
        assert (smoke["count"], smoke["rejections_right"]) == (2, 0.5)

        # refusals name what is wrong
        assert (await feedback("nobody", {"correct": True}))[0] == 404
        for said in ("maybe", "yes", 1):  # JSON's true or false only
            status, body = await feedback("fire-0", {"correct": said})
            assert status == 400 and body["error"] == "correct: Input should be a valid boolean"
        status, body = await feedback("fire-0", {})
        assert status == 400 and "give correct" in body["error"]
        status, body = await feedback("fire-0", {"rule": "smoke", "correct": True})
        assert status == 404 and body["field"] == "rule"
        status, body = await feedback("fire-0", {"label": "real", "correct": False})
        assert status == 400 and "disagree" in body["error"]
        assert (await d.post_alert(make_alert("stray", event_type="unknown")))[0] == 202
        await d.wait_reviewed("stray")
        status, body = await feedback("stray", {"correct": True})
        assert status == 409 and "no rule reviewed the alert" in body["error"]

        # the ids in the body (as the console sends them): an alert_id a browser would
        # rewrite in a path
        assert (await d.post_alert(make_alert("..", event_type="fire")))[0] == 202
        await d.wait_reviewed("..")
        body = {"alert_id": "..", "box_id": "box-t", "correct": True}
        async with d.http.post(f"{d.base_url}/v1/feedback", json=body) as response:
            assert response.status == 201 and (await response.json())["alert_id"] == ".."
        async with d.http.post(f"{d.base_url}/v1/feedback", json={"correct": True}) as response:
            assert response.status == 400 and (await response.json())["field"] == "alert_id"
        # the path and the body name one alert; ids are as long as an alert's at most
        status, body = await feedback("fire-0", {"alert_id": "fire-1", "correct": True})
        assert status == 400 and body["field"] == "alert_id" and "another alert" in body["error"]
        # and the query and the body one box
        url = f"{d.base_url}/v1/feedback?box_id=box-t"
        async with d.http.post(url, json={"alert_id": "..", "box_id": "b2", "correct": True}) as r:
            said = await r.json()
        assert r.status == 400 and said["field"] == "box_id" and "another box" in said["error"]
        for key in ("alert_id", "box_id", "rule"):
            long = {"alert_id": "fire-0", "correct": True} | {key: "x" * 100_000}
            async with d.http.post(f"{d.base_url}/v1/feedback", json=long) as response:
                said = await response.json()
                assert response.status == 400 and said["field"] == key
                assert len(json.dumps(said)) < 300  # the value is not echoed back
        # an empty source header is none: the default
        status, body = await feedback("fire-0", {"correct": True}, **{"X-Feedback-Source": ""})
        assert status == 201
        [source] = await d.daemon.journal.read(
            "SELECT source FROM feedback WHERE id = ?", (body["id"],)
        )
        assert source["source"] == "http"
        async with d.http.get(f"{d.base_url}/v1/alerts/fire-0", params={"box_id": ""}) as response:
            assert response.status == 200  # an empty box_id names no box
            [verdict] = (await response.json())["verdicts"]
        # a method a route does not take: 405, naming those it takes
        async with d.http.delete(f"{d.base_url}/v1/alerts") as response:
            assert response.status == 405 and "POST" in response.headers["Allow"]
            assert (await response.json())["error"] == "Method Not Allowed"

        # the listing shows the feedback with the verdict, and filters
        async with d.http.get(f"{d.base_url}/v1/alerts", params={"rule": "smoke"}) as response:
            listed = (await response.json())["alerts"]
        assert [a["alert_id"] for a in listed] == ["smoke-1", "smoke-0"]
        [verdict] = listed[0]["verdicts"]
        assert verdict["feedback"]["label"] == "real" and verdict["feedback"]["correct"] is False
        assert verdict["prompt"] and '"yes"' in verdict["raw"]


def test_feedback_on_verdicts_without_a_side_needs_a_label():
    assert judged("confirmed", 0.9, Feedback(correct=False)) == ("false", False)
    assert judged("rejected", 0.1, Feedback(correct=False)) == ("real", False)
    assert judged("uncertain", 0.5, Feedback(label="real")) == ("real", None)
    with pytest.raises(FeedbackError, match="an uncertain verdict is neither right nor wrong"):
        judged("uncertain", 0.5, Feedback(correct=True))
    # an unreviewed verdict has no answer to correct (nor would export find one)
    unreviewed = {"rule": "fight", "verdict": "unreviewed", "confidence": None, "fields": {}}
    with pytest.raises(FeedbackError, match="an unreviewed verdict has no answer to correct"):
        check_fields({"label": "play"}, unreviewed, None)
    # extract rules: no P(real); what was said is kept
    assert judged("confirmed", None, Feedback(correct=False, fields={"plate": "B1"})) == (
        None,
        False,
    )


async def test_feedback_on_an_alert_pruned_meanwhile_is_a_404_not_a_journal_failure(tmp_path):
    journal = await Journal.open(tmp_path / "j.sqlite3")
    incoming = CanonicalFormat().parse(json.dumps(make_alert("gone")).encode(), topic=None)
    ref = (await journal.record_alert(incoming.alert, [], source="http", topic=None)).ref
    await journal.finish_review(ref, [PlannedVerdict(make_verdict("gone"), "t")])
    record = journal.record_feedback

    async def pruned_first(row):  # the prune's commit lands between the lookup and the insert
        await journal._write(lambda db: db.execute("DELETE FROM alerts WHERE id = ?", (ref,)))
        return await record(row)

    journal.record_feedback = pruned_first
    with pytest.raises(FeedbackError, match="no alert 'gone': pruned meanwhile") as refused:
        await feedback.record(
            journal, Feedback(correct=True), alert_id="gone", box_id=None, source="http"
        )
    assert refused.value.status == 404
    await journal.close()


async def test_an_alert_pruned_or_mangled_in_the_journal_is_told_not_an_internal_error(
    tmp_path, tiny_model, monkeypatch
):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    async with run_daemon(settings) as d:
        for alert_id in ("kept", "mangled", "pruned"):
            assert (await d.post_alert(make_alert(alert_id)))[0] == 202
            await d.wait_reviewed(alert_id)
        journal = d.daemon.journal
        [[kept], [mangled], [pruned]] = [
            [
                row["id"]
                for row in await journal.read("SELECT id FROM alerts WHERE alert_id = ?", (a,))
            ]
            for a in ("kept", "mangled", "pruned")
        ]
        # a stored alert that is no JSON object (edited by hand, or by a laxer version)
        await journal._write(
            lambda db: db.execute("UPDATE alerts SET alert = '[]' WHERE id = ?", (mangled,))
        )
        async with d.http.get(f"{d.base_url}/v1/alerts") as response:
            assert response.status == 200
            listed = {a["alert_id"]: a for a in (await response.json())["alerts"]}
        assert listed["mangled"]["camera_id"] is None and listed["kept"]["camera_id"]
        # the prune's commit lands between reading a snapshot and reading its alert
        read_snapshot = history.snapshot

        async def pruned_meanwhile(journal, ref, idx):
            stored = await read_snapshot(journal, ref, idx)
            await journal._write(lambda db: db.execute("DELETE FROM alerts WHERE id = ?", (ref,)))
            return stored

        monkeypatch.setattr(history, "snapshot", pruned_meanwhile)
        async with d.http.get(f"{d.base_url}/v1/snapshots/{pruned}/0?thumb=1") as response:
            assert response.status == 404
            assert "pruned" in (await response.json())["error"]
        tried = {"snapshot": {"ref": kept}, "prompt": "Real?"}
        async with d.http.post(f"{d.base_url}/v1/try", json=tried) as response:
            assert response.status == 400
            assert (await response.json())["error"] == "snapshot: no such stored snapshot"


async def test_recent_alerts_thumbnails_rules_and_metrics(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    (settings.rules.dir / "broken.toml").write_text("[match\n")
    blue = base64.b64encode(jpeg_bytes(colour=(30, 80, 200))).decode()
    async with run_daemon(settings) as d:
        for i, camera in enumerate(("cam-a", "cam-b", "cam-a")):
            alert = make_alert(f"list-{i}", camera_id=camera, image=blue)
            alert["boxes"] = [{"x1": 10, "y1": 10, "x2": 200, "y2": 150, "label": "fire"}]
            assert (await d.post_alert(alert))[0] == 202
            await d.wait_reviewed(f"list-{i}")
        assert (await d.post_alert(b"{not json"))[0] == 400

        async with d.http.get(f"{d.base_url}/v1/alerts", params={"camera_id": "cam-a"}) as r:
            listed = (await r.json())["alerts"]
        assert [a["alert_id"] for a in listed] == ["list-2", "list-0"]
        first = listed[0]
        assert first["images"] == 1 and first["boxes"][0]["x2"] == 200
        async with d.http.get(
            f"{d.base_url}/v1/alerts", params={"limit": "1", "before": str(first["ref"])}
        ) as r:
            assert [a["alert_id"] for a in (await r.json())["alerts"]] == ["list-1"]
        for params, field in [
            ({"before": "abc"}, "before"),
            ({"limit": "-5"}, "limit"),
            ({"verdict": "Confirmed"}, "verdict"),
        ]:
            async with d.http.get(f"{d.base_url}/v1/alerts", params=params) as r:
                assert r.status == 400 and (await r.json())["field"] == field

        async with d.http.get(f"{d.base_url}/v1/snapshots/{first['ref']}/0?thumb=1") as r:
            assert r.status == 200 and r.content_type == "image/jpeg"
            thumb = Image.open(io.BytesIO(await r.read()))
        assert max(thumb.size) == 320
        # the detection box is drawn in red around the box, near the thumbnail's top left
        scale = 320 / 640
        red = thumb.convert("RGB").getpixel((int(100 * scale), int(10 * scale) - 1))
        assert red[0] > 180 and red[1] < 90 and red[2] < 90, red
        async with d.http.get(f"{d.base_url}/v1/snapshots/{first['ref']}/7") as r:
            assert r.status == 404

        async with d.http.get(f"{d.base_url}/v1/rules") as r:
            rules = await r.json()
        [fire] = rules["rules"]
        assert fire["name"] == "fire" and fire["state"] == "active"
        assert fire["counts"]["alerts"] == 3 and fire["since"] and rules["loaded_at"]
        assert rules["errors"][0]["file"] == "broken.toml"

        async with d.http.get(f"{d.base_url}/metrics") as r:
            assert r.status == 200
            text = await r.text()
    lines = text.splitlines()

    def value(prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))

    assert value('secondlook_alerts_received_total{outcome="accepted",source="http"}') == 3
    assert value('secondlook_alerts_received_total{outcome="refused",source="http"}') == 1
    assert value('secondlook_verdicts_total{rule="fire"') == 3
    assert value('secondlook_stage_seconds_count{stage="model"}') == 3
    assert value('secondlook_batch_size_bucket{le="+Inf"}') >= 1
    assert value("secondlook_model_busy_seconds_total ") > 0
    assert value("secondlook_rule_errors ") == 1
    assert value("secondlook_backlog ") == 0
    assert value("secondlook_healthy ") == 1 and value("secondlook_model_busy_for_seconds ") == 0
    assert value("secondlook_model_failures_total ") == 0
    assert "secondlook_model_oom_splits_total 0.0" in lines
    assert value("secondlook_model_batch_limit ") == d.settings.model.max_batch


async def test_a_version_2_journal_is_migrated_without_losing_anything(tmp_path):
    path = tmp_path / "journal.sqlite3"
    journal = await Journal.open(path)
    await journal.close()
    with sqlite3.connect(path) as db:  # make it look like version 2: no prompt, raw, feedback
        db.execute("DROP TABLE feedback")
        db.execute("ALTER TABLE verdicts DROP COLUMN prompt")
        db.execute("ALTER TABLE verdicts DROP COLUMN raw")
        db.execute(
            "INSERT INTO alerts (box_id, alert_id, alert, source, received_at) "
            "VALUES ('b', 'old', '{}', 'http', '2026-01-01T00:00:00+00:00')"
        )
        db.execute("PRAGMA user_version = 2")
    journal = await Journal.open(path)
    try:
        assert await journal.count_pending() == 1
        assert await journal.read("SELECT prompt, raw FROM verdicts") == []
        assert (await journal.read_one("SELECT count(*) FROM feedback"))[0] == 0
        assert (await journal.read_one("PRAGMA user_version"))[0] == SCHEMA_VERSION
    finally:
        await journal.close()


async def test_feedback_on_the_mqtt_topic_is_stored_and_bad_feedback_is_refused(
    tmp_path, broker, tiny_model, monkeypatch
):
    settings = make_settings(tmp_path, broker=broker, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(CONFIRM_ALL)
    record = feedback.record

    async def a_bug_for_one_alert(journal, said, **kwargs):
        if kwargs["alert_id"] == "bug":
            raise TypeError("unhashable type: 'list'")
        return await record(journal, said, **kwargs)

    monkeypatch.setattr(feedback, "record", a_bug_for_one_alert)
    async with run_daemon(settings) as d:
        assert (await d.post_alert(make_alert("mqtt-fb")))[0] == 202
        await d.wait_reviewed("mqtt-fb")
        await publish(broker, "secondlook/feedback/op-1", b"{not json")
        await publish(broker, "secondlook/feedback/op-1", json.dumps({"correct": True}))
        # a message that meets a bug is dropped, not delivered again ahead of the rest
        with capture_logs() as logs:
            bug = {"alert_id": "bug", "label": "false"}
            await publish(broker, "secondlook/feedback/op-1", json.dumps(bug))
            async with asyncio.timeout(10):
                while not any(e["event"].startswith("feedback refused: it") for e in logs):
                    await asyncio.sleep(0.05)
        assert not any(entry["event"].startswith("alert intake failed") for entry in logs)
        body = {"alert_id": "mqtt-fb", "box_id": "box-t", "label": "false"}
        await publish(broker, "secondlook/feedback/op-1", json.dumps(body))
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            async with d.http.get(f"{d.base_url}/v1/stats") as response:
                fire = (await response.json())["rules"]["fire"]["feedback"]
            if fire["count"] or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        assert (fire["count"], fire["wrong"], fire["precision"]) == (1, 1, 0.0)
        rows = await d.daemon.journal.read("SELECT source, label FROM feedback")
        assert [tuple(row) for row in rows] == [("mqtt", "false")]


async def test_feedback_while_the_journal_cannot_write_is_held_not_lost(
    tmp_path, broker, tiny_model
):
    settings = make_settings(tmp_path, broker=broker, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(CONFIRM_ALL)
    async with run_daemon(settings) as d:
        assert (await d.post_alert(make_alert("held-fb")))[0] == 202
        await d.wait_reviewed("held-fb")
        journal, loop = d.daemon.journal, asyncio.get_running_loop()
        record_feedback, full_until = journal.record_feedback, loop.time() + 2.5

        async def full_disk_for_a_while(row):
            if loop.time() < full_until:
                raise sqlite3.OperationalError("database or disk is full")
            return await record_feedback(row)

        journal.record_feedback = full_disk_for_a_while
        said = {"alert_id": "held-fb", "box_id": "box-t", "label": "false"}
        async with d.http.post(f"{d.base_url}/v1/feedback", json=said) as response:
            assert response.status == 503 and "Retry-After" in response.headers
            assert (
                "the journal cannot write: database or disk is full"
                in (await response.json())["error"]
            )
        await publish(broker, "secondlook/feedback/op-1", json.dumps(said))
        link_kept = True
        while loop.time() < full_until + 0.2:
            link_kept = link_kept and d.daemon.link.connected.is_set()
            await asyncio.sleep(0.02)
        assert link_kept  # not a reconnect (and a redelivery) per try
        for _ in range(100):
            rows = await journal.read("SELECT source, label FROM feedback")
            if rows:
                break
            await asyncio.sleep(0.1)
        assert [tuple(row) for row in rows] == [("mqtt", "false")]


async def test_a_timeline_over_a_sliver_of_time_counts_verdicts_stamped_ahead(tmp_path):
    path = tmp_path / "j.sqlite3"
    await (await Journal.open(path)).close()
    with sqlite3.connect(path) as db:  # a verdict written while the clock ran ahead
        db.execute(
            "INSERT INTO alerts (box_id, alert_id, alert, source, received_at) "
            "VALUES ('b', 'ahead', '{}', 'http', '2099-01-01T00:00:00+00:00')"
        )
        db.execute(
            "INSERT INTO verdicts (alert_ref, rule, verdict, topic, payload, created_at) "
            "VALUES (1, 'fire', 'confirmed', 't', '{}', '2099-01-01T00:00:01+00:00')"
        )
    journal = await Journal.open(path)
    try:
        for hours in (24, 1e-9):  # the API accepts any hours above 0
            series = await history.timeline(journal, hours=hours)
            assert series["rules"]["fire"]["confirmed"][-1] == 1, hours
    finally:
        await journal.close()


async def test_stats_counted_in_the_journal_match_the_nearest_rank_definition(tmp_path):
    path = tmp_path / "j.sqlite3"
    await (await Journal.open(path)).close()
    rng = random.Random(7)
    latencies = {"fire": rng.sample(range(1, 5000), 37), "smoke": [42], "gate": list(range(20))}
    now = utc_now()
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO alerts (box_id, alert_id, alert, source, received_at) "
            "VALUES ('b', 'a', '{}', 'http', ?)",
            (now.isoformat(),),
        )
        for rule, values in latencies.items():
            for i, latency in enumerate(values):
                verdict = "confirmed" if i % 3 else "rejected"
                created = (now - timedelta(minutes=5 * i)).isoformat()
                db.execute(
                    "INSERT INTO verdicts (alert_ref, rule, verdict, topic, payload, created_at) "
                    "VALUES (1, ?, ?, 't', ?, ?)",
                    (rule, verdict, json.dumps({"latency_ms": latency}), created),
                )
            # unreviewed verdicts count as alerts, never as latencies
            db.execute(
                "INSERT INTO verdicts (alert_ref, rule, verdict, topic, payload, created_at) "
                "VALUES (1, ?, 'unreviewed', 't', '{\"latency_ms\": 999999}', ?)",
                (rule, now.isoformat()),
            )
    journal = await Journal.open(path)
    try:
        stats = await history.rule_stats(journal)
        series = await history.timeline(journal, hours=24)
    finally:
        await journal.close()
    for rule, values in latencies.items():
        ordered = sorted(values)
        nearest = {q: ordered[math.ceil(q * len(ordered)) - 1] for q in (0.5, 0.95)}
        got = stats[rule]
        assert (got["latency_p50_ms"], got["latency_p95_ms"]) == (nearest[0.5], nearest[0.95])
        assert got["alerts"] == len(values) + 1 and got["unreviewed"] == 1
        assert got["rejected"] == len(range(0, len(values), 3))
        counts = series["rules"][rule]
        assert sum(map(sum, counts.values())) == len(values) + 1  # all within 24 h
        assert counts["unreviewed"][-1] == 1  # stamped now: the last bucket
    # "fire": one verdict every 5 minutes over the last 3 hours, 12 to an hour's bucket
    fire = series["rules"]["fire"]
    per_bucket = [sum(counts[b] for counts in fire.values()) for b in range(24)]
    assert per_bucket[:-4] == [0] * 20 and sum(per_bucket[-4:]) == 38
    assert max(per_bucket) <= 13 and sorted(per_bucket)[-3] >= 11


async def test_operator_queries_are_led_by_an_index_and_answer_what_was_asked(tmp_path):
    path = tmp_path / "j.sqlite3"
    await (await Journal.open(path)).close()
    now = utc_now().isoformat()
    with sqlite3.connect(path) as db:
        for ref in range(1, 41):
            alert = {"camera_id": f"cam-{ref % 4}", "event_type": "fire"}
            db.execute(
                "INSERT INTO alerts (id, box_id, alert_id, alert, source, received_at) "
                "VALUES (?, ?, ?, ?, 'http', ?)",
                (ref, f"box-{ref % 2}", f"a-{ref}", json.dumps(alert), now),
            )
            for rule in ("fire", "smoke") if ref % 3 else ("fire",):
                verdict = ("confirmed", "rejected", "uncertain")[(ref + len(rule)) % 3]
                db.execute(
                    "INSERT INTO verdicts (alert_ref, rule, verdict, topic, payload, created_at)"
                    " VALUES (?, ?, ?, 't', ?, ?)",
                    (ref, rule, verdict, json.dumps({"rule": rule, "verdict": verdict}), now),
                )
    journal = await Journal.open(path)
    asked: list[tuple[str, tuple]] = []
    browse = journal.browse

    async def recording(sql: str, args=()):
        asked.append((sql, tuple(args)))
        return await browse(sql, args)

    journal.browse = recording  # type: ignore[method-assign]
    try:
        expected = {}
        for where in (
            history.AlertFilter(rule="smoke", before=30, limit=5),
            history.AlertFilter(verdict="rejected", limit=5),
            history.AlertFilter(rule="fire", verdict="confirmed", box_id="box-1"),
            history.AlertFilter(camera_id="cam-2"),
            history.AlertFilter(camera_id="cam-1", rule="smoke", verdict="uncertain"),
            history.AlertFilter(camera_id="cam-3", rule="fire", limit=3),
            history.AlertFilter(box_id="box-1", before=20, limit=4),
        ):
            listed = await history.recent_alerts(journal, where)
            expected[where] = [a["ref"] for a in listed]
            # what a plain reading of the filter selects, newest first
            with sqlite3.connect(path) as db:
                rows = db.execute("SELECT id, box_id, alert FROM alerts ORDER BY id DESC")
                wanted = []
                for ref, box, alert in rows:
                    verdicts = db.execute(
                        "SELECT rule, verdict FROM verdicts WHERE alert_ref = ?", (ref,)
                    ).fetchall()
                    if (
                        (where.before is None or ref < where.before)
                        and (where.box_id is None or box == where.box_id)
                        and (where.camera_id in (None, json.loads(alert)["camera_id"]))
                        and any(
                            where.rule in (None, r) and where.verdict in (None, v)
                            for r, v in verdicts
                        )
                    ):
                        wanted.append(ref)
            assert expected[where] == wanted[: where.limit], where
        counted: dict[str, dict[str, int]] = {}
        with sqlite3.connect(path) as db:
            for rule, verdict in db.execute("SELECT rule, verdict FROM verdicts"):
                per_rule = counted.setdefault(rule, dict.fromkeys(history.VERDICT_KINDS, 0))
                per_rule[verdict] += 1
                per_rule["alerts"] = per_rule.get("alerts", 0) + 1
        assert await history.rule_counts(journal) == counted
        assert counted["smoke"]["alerts"] == 27 and len(counted["fire"]) == 5
        await history.rule_stats(journal, utc_now() - timedelta(hours=1))
        await history.timeline(journal, hours=1)
        await history.snapshot(journal, 1, 0)
        with sqlite3.connect(path) as db:
            for sql, args in asked:
                steps = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, args)]
                scans = [s for s in steps if s.split(" ")[:2] in (["SCAN", "a"], ["SCAN", "v"])]
                scans += [
                    s
                    for s in steps
                    if s.startswith(("SCAN verdicts", "SCAN alert", "SCAN feedback"))
                ]
                # only the unfiltered list walks the alerts, newest first, up to its limit
                assert not scans or sql.endswith("WHERE 1 = 1 ORDER BY a.id DESC LIMIT ?"), (
                    sql,
                    steps,
                )
                if "FROM alerts a" in sql and "ORDER BY a.id DESC" in sql:
                    # the newest of a camera's or a box's alerts, not all of them sorted
                    assert not any("TEMP B-TREE" in s for s in steps), (sql, steps)
                    if "camera_id" in sql:
                        assert "alerts_by_camera" in steps[0], (sql, steps)
    finally:
        await journal.close()


async def test_a_long_operator_query_holds_up_none_of_the_daemons_reads(tmp_path):
    journal = await Journal.open(tmp_path / "j.sqlite3")
    try:
        slow = asyncio.create_task(
            journal.browse(
                "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n "
                "WHERE x < 20000000) SELECT count(*) FROM n"
            )
        )
        await asyncio.sleep(0.05)  # under way on the operators' connection
        assert await journal.count_pending() == 0
        assert not slow.done()
        assert (await slow)[0][0] == 20_000_000
    finally:
        await journal.close()


async def test_a_stored_extra_frame_is_told_from_the_alerts_frame(tmp_path):
    journal = await Journal.open(tmp_path / "j.sqlite3")
    try:
        parse = CanonicalFormat().parse
        frame = base64.b64encode(jpeg_bytes()).decode()
        # an image_url snapshot is fetched at review and not stored: only its extra frame is
        fetched = make_alert("by-url", image=None, image_url="http://cams.example/1.jpg")
        for alert in (make_alert("sent", images=[frame]), fetched | {"images": [frame]}):
            incoming = parse(json.dumps(alert).encode(), topic=None)
            await journal.record_alert(incoming.alert, incoming.images, source="http", topic=None)
        sent = [await history.snapshot(journal, 1, idx) for idx in (0, 1)]
        by_url = await history.snapshot(journal, 2, 0)
    finally:
        await journal.close()
    assert [s.is_frame for s in sent] == [True, False] and by_url is not None
    assert not by_url.is_frame  # its boxes are of the fetched frame: none drawn on it
