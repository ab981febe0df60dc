"""Alert formats over a real broker: Frigate's topics and a configured field mapping."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from typing import Any

import aiomqtt
import pytest
from rich.console import Console

from daemon.config import FrigateSettings, MappingFormat, Settings
from daemon.plugin_api import AlertError, IncomingAlert, parsing_retained
from daemon.replay import NO_ALERT, replay
from plugins.frigate import LIVE_S, FrigateFormat
from plugins.mapping import MappedFormat
from tests.conftest import (
    FIRE_RULE,
    collect,
    jpeg_bytes,
    make_settings,
    publish,
    run_daemon,
)
from tests.test_image_url import snapshot_server

PERSON_RULE = FIRE_RULE.replace('event_types = ["fire"]', 'event_types = ["person"]')
FRIGATE_SUBSCRIPTIONS = [
    {"topic": "frigate/events", "format": "frigate"},
    {"topic": "frigate/+/+/snapshot", "format": "frigate"},
]


def frigate_event(kind: str, event_id: str, camera: str = "loading_dock") -> str:
    """A `frigate/events` message in the shape of Frigate's MQTT documentation."""
    after = {
        "id": event_id,
        "camera": camera,
        "frame_time": 1763647392.5,
        "snapshot_time": 1763647392.5,
        "label": "person",
        "sub_label": None,
        "top_score": 0.83,
        "false_positive": False,
        "start_time": 1763647390.25,
        "end_time": None if kind != "end" else 1763647400.0,
        "score": 0.79,
        "box": [424, 300, 536, 512],
        "area": 23744,
        "region": [264, 250, 667, 653],
        "current_zones": ["dock"],
        "entered_zones": ["yard", "dock"],
        "has_snapshot": True,
        "has_clip": False,
        "active": True,
    }
    return json.dumps({"type": kind, "before": after, "after": after})


def frigate_settings(tmp_path, broker, model, **sections: Any) -> Settings:
    """A daemon subscribed to Frigate's topics, with a rule for `person` events."""
    settings = make_settings(
        tmp_path,
        broker=broker,
        model=model,
        mqtt={"subscriptions": FRIGATE_SUBSCRIPTIONS},
        **sections,
    )
    (settings.rules.dir / "person.toml").write_text(PERSON_RULE)
    return settings


async def test_a_frigate_event_and_its_snapshot_yield_one_verdict(tmp_path, broker, tiny_model):
    settings = frigate_settings(
        tmp_path, broker, tiny_model, frigate={"box_id": "frigate-nvr", "site": "plant-north"}
    )
    async with collect(broker, "secondlook/verdicts/#") as out, run_daemon(settings) as d:
        # Frigate's order: the event, then the snapshot of its object
        await publish(broker, "frigate/events", frigate_event("new", "1763647390.25-abc123"))
        await publish(broker, "frigate/loading_dock/person/snapshot", jpeg_bytes((1280, 720)))
        for kind in ("update", "update", "end"):
            await publish(broker, "frigate/events", frigate_event(kind, "1763647390.25-abc123"))
        [(topic, verdict)] = await out.wait_for(1)
        _, record = await d.get_alert("1763647390.25-abc123")
    assert topic == f"secondlook/verdicts/{verdict['verdict']}/frigate-nvr/loading_dock/person"
    assert verdict["rule"] == "person" and verdict["confidence"] is not None
    assert verdict["site"] == "plant-north"
    assert verdict["occurred_at"] == "2025-11-20T14:03:10.250000+00:00"  # start_time, UTC
    assert record["attempts"] == 1  # updates and the end message are not reviewed again


async def test_a_frigate_event_without_a_snapshot_uses_the_frigate_api(tmp_path, tiny_model):
    async with snapshot_server() as base:
        settings = make_settings(
            tmp_path,
            broker=None,
            model=tiny_model,
            frigate={"api_url": base},
            images={"url_hosts": ["127.0.0.1"]},
        )
        (settings.rules.dir / "person.toml").write_text(PERSON_RULE)
        async with run_daemon(settings) as d:
            async with d.http.post(
                f"{d.base_url}/v1/alerts?format=frigate",
                data=frigate_event("new", "evt-api", camera="gate"),
                headers={"Content-Type": "application/json"},
            ) as response:
                assert response.status == 202
            record = await d.wait_reviewed("evt-api")
    [verdict] = record["verdicts"]
    # the test server answers /snap.jpg only: Frigate's API path is what was asked for
    assert "image_url answered HTTP 404" in verdict["reason"]


ACME = {
    "time_format": "%Y-%m-%d %H:%M:%S",
    "utc_offset": "+08:00",
    "fields": {
        "alert_id": "data.eventId",
        "box_id": "device.sn",
        "camera_id": "data.channel",
        "event_type": "data.alarmType",
        "occurred_at": "data.time",
        "image": "data.pictures.0.base64",
        "score": "data.confidence",
        "site": "=plant-east",
    },
    "values": {"event_type": {"1001": "fire", "1002": "smoke"}},
    "extra": {"zone": "data.area"},
}


def acme_payload(event_id: int, picture: str) -> str:
    return json.dumps(
        {
            "device": {"sn": "ACME-77", "model": "AI-Box 4"},
            "data": {
                "eventId": event_id,
                "channel": "ch-02",
                "alarmType": 1001,
                "time": "2026-11-20 21:15:00",
                "confidence": 0.66,
                "area": "tank farm",
                "pictures": [{"base64": picture}],
            },
        }
    )


async def test_a_field_mapping_ingests_a_vendor_payload(tmp_path, broker, tiny_model):
    import base64

    settings = make_settings(
        tmp_path,
        broker=broker,
        model=tiny_model,
        mqtt={"subscriptions": [{"topic": "acme/+/alarm", "format": "acme"}]},
        formats={"acme": ACME},
    )
    (settings.rules.dir / "fire.toml").write_text(
        FIRE_RULE.replace("Is there a real open flame?", "Fire in {extra.zone}?")
    )
    picture = base64.b64encode(jpeg_bytes()).decode()
    async with collect(broker, "secondlook/verdicts/#") as out, run_daemon(settings) as d:
        await publish(broker, "acme/ACME-77/alarm", acme_payload(9001, "not-base64!"))
        await publish(broker, "acme/ACME-77/alarm", acme_payload(9002, picture))
        [(topic, verdict)] = await out.wait_for(1)
        [(field, error)] = await d.daemon.journal.rejects()
    assert field == "data.pictures.0.base64 (image)" and "base64" in error
    assert topic == f"secondlook/verdicts/{verdict['verdict']}/ACME-77/ch-02/fire"
    assert verdict["alert_id"] == "9002" and verdict["site"] == "plant-east"
    assert verdict["occurred_at"] == "2026-11-20T21:15:00+08:00"
    assert verdict["rule"] == "fire"


async def test_frigate_messages_that_are_not_reviewed_are_consumed(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model, frigate={"review": ["end"]})
    async with run_daemon(settings) as d:
        async with d.http.post(
            f"{d.base_url}/v1/alerts?format=frigate",
            data=frigate_event("update", "evt-upd"),
            headers={"Content-Type": "application/json"},
        ) as response:
            assert response.status == 202
            assert await response.json() == {"status": "consumed"}
        status, _ = await d.get_alert("evt-upd")
    assert status == 404


async def test_replay_of_a_frigate_message_without_an_alert_says_so(tmp_path, tiny_model):
    settings = make_settings(
        tmp_path, broker=None, model=tiny_model, mqtt={"format": "frigate"}, frigate={}
    )
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    event = tmp_path / "new.json"  # waits for a snapshot that never comes
    event.write_text(frigate_event("new", "evt-replayed"))
    rows = await asyncio.wait_for(replay(settings, [event], Console(quiet=True)), 60)
    assert [(row.file, row.verdict, row.error) for row in rows] == [(event, None, NO_ALERT)]


def test_a_frigate_event_waits_for_its_snapshot_and_an_older_one_is_not_used():
    now = [1000.0]
    old, fresh = jpeg_bytes((64, 48)), jpeg_bytes((48, 64))
    snapshot_topic = "frigate/gate/person/snapshot"
    with_api = FrigateFormat(FrigateSettings(api_url="http://nvr:5000"))
    without_api = FrigateFormat(FrigateSettings())
    for frigate in (with_api, without_api):
        frigate.clock = lambda: now[0]  # when messages arrive
        assert frigate.parse(old, topic=snapshot_topic) is None  # an earlier object's
    now[0] = 1010.0
    event = frigate_event("new", "../../api/config#", camera="gate").encode()
    fetched = with_api.parse(event, topic="frigate/events")
    assert fetched is not None and not fetched.images
    # the event id is one path segment of Frigate's API, whatever it holds
    url = "http://nvr:5000/api/events/..%2F..%2Fapi%2Fconfig%23/snapshot.jpg"
    assert fetched.alert.image_url == url
    assert [b.x1 for b in fetched.alert.boxes] == [424]  # the API's frame: the box applies
    assert without_api.parse(event, topic="frigate/events") is None  # waits for its snapshot
    now[0] = 1010.3
    arrived = without_api.parse(fresh, topic=snapshot_topic)  # brings the event in
    assert arrived is not None and arrived.alert.alert_id == "../../api/config#"
    assert arrived.images[0].data == fresh
    assert arrived.alert.boxes == []  # Frigate's MQTT snapshot is cropped to the object
    # an event whose end comes before any snapshot of its own is refused, named
    lonely = frigate_event("new", "evt-lonely", camera="yard").encode()
    assert without_api.parse(lonely, topic="frigate/events") is None
    ended = frigate_event("end", "evt-lonely", camera="yard").encode()
    with pytest.raises(AlertError, match="no snapshot received for yard/person before the"):
        without_api.parse(ended, topic="frigate/events")


@pytest.mark.parametrize("review", [["end"], ["update"]])
def test_a_frigate_event_reviewed_later_uses_the_snapshot_that_followed_its_first_message(
    review,
):
    now = [1000.0]
    frigate = FrigateFormat(FrigateSettings(review=review))
    frigate.clock = lambda: now[0]
    snapshot = jpeg_bytes((64, 48))
    came: list[IncomingAlert | None] = []
    for at, topic, payload in (
        (1000.0, "frigate/events", frigate_event("new", "evt-late", camera="gate").encode()),
        (1000.2, "frigate/gate/person/snapshot", snapshot),
        (1005.0, "frigate/events", frigate_event("update", "evt-late", camera="gate").encode()),
        (1010.0, "frigate/events", frigate_event("end", "evt-late", camera="gate").encode()),
    ):
        now[0] = at
        came.append(frigate.parse(payload, topic=topic))
    [incoming] = [c for c in came if c is not None]
    assert came.index(incoming) == (3 if review == ["end"] else 2)
    assert incoming.images[0].data == snapshot


async def test_a_snapshot_retained_from_before_the_start_waits_for_the_live_one(
    tmp_path, own_broker, tiny_model
):
    stale, live = jpeg_bytes((640, 360)), jpeg_bytes((320, 240))
    async with aiomqtt.Client("127.0.0.1", own_broker.port) as frigate:  # as Frigate does
        await frigate.publish("frigate/gate/person/snapshot", stale, qos=1, retain=True)
    settings = frigate_settings(tmp_path, own_broker, tiny_model)
    async with run_daemon(settings) as d:
        await asyncio.sleep(0.5)  # the retained snapshot has come at subscribing
        await publish(own_broker, "frigate/events", frigate_event("new", "evt-r", camera="gate"))
        await asyncio.sleep(0.5)
        assert (await d.get_alert("evt-r"))[0] == 404  # waits for its own snapshot
        await publish(own_broker, "frigate/gate/person/snapshot", live)
        await d.wait_reviewed("evt-r")
        [row] = await d.daemon.journal.read("SELECT data FROM alert_images")
    assert bytes(row[0]) == live


def test_a_retained_frigate_snapshot_is_never_an_events_own():
    now = [3000.0]
    frigate = FrigateFormat(FrigateSettings())
    frigate.clock = lambda: now[0]
    stale, own = jpeg_bytes((64, 48)), jpeg_bytes((48, 64))

    def event(kind: str, camera: str) -> IncomingAlert | None:
        message = frigate_event(kind, f"evt-{camera}", camera=camera)
        return frigate.parse(message.encode(), topic="frigate/events")

    def snapshot(camera: str, data: bytes, retained: bool = False) -> IncomingAlert | None:
        with parsing_retained(retained):
            return frigate.parse(data, topic=f"frigate/{camera}/person/snapshot")

    # a waiting event is not released by the retained snapshot a reconnect brings
    assert event("new", "gate") is None and snapshot("gate", stale, retained=True) is None
    # nor is an event that begins just after it, nor one caught up from before the start
    assert snapshot("yard", stale, retained=True) is None
    assert snapshot("dock", stale, retained=True) is None
    now[0] = 3000.5
    assert event("new", "yard") is None and event("update", "dock") is None
    # the live snapshot that follows is theirs
    now[0] = 3001.0
    for camera in ("gate", "yard", "dock"):
        came = snapshot(camera, own)
        assert came is not None and came.alert.alert_id == f"evt-{camera}"
        assert came.images[0].data == own


def test_a_retained_copy_of_the_live_frigate_snapshot_leaves_it_the_events_own():
    now = [500.0]
    frigate = FrigateFormat(FrigateSettings(review=["end"]))
    frigate.clock = lambda: now[0]
    own, topic = jpeg_bytes((64, 48)), "frigate/gate/person/snapshot"
    assert frigate.parse(frigate_event("new", "e", "gate").encode(), topic="frigate/events") is None
    now[0] = 500.2
    assert frigate.parse(own, topic=topic) is None  # its own; reviewed at its end
    now[0] = 520.0
    with parsing_retained(True):  # an MQTT 3.1.1 reconnect: the broker sends it again
        assert frigate.parse(own, topic=topic) is None
    now[0] = 530.0
    came = frigate.parse(frigate_event("end", "e", "gate").encode(), topic="frigate/events")
    assert came is not None and came.images[0].data == own


def test_a_frigate_snapshot_is_an_events_own_only_when_no_other_event_could_be_its_object():
    """Frigate's snapshot topic shows the best object of a label on a camera, named by
    nothing: while two events of them are live, a snapshot may show either's object."""
    now = [100.0]
    frigate = FrigateFormat(FrigateSettings())
    frigate.clock = lambda: now[0]
    first, second, third = jpeg_bytes((64, 48)), jpeg_bytes((48, 64)), jpeg_bytes((40, 40))
    topic = "frigate/gate/person/snapshot"

    def event(kind: str, event_id: str) -> IncomingAlert | None:
        return frigate.parse(frigate_event(kind, event_id, "gate").encode(), topic="frigate/events")

    assert event("new", "a") is None
    now[0] = 100.2
    assert frigate.parse(first, topic=topic).alert.alert_id == "a"
    now[0] = 110.0
    assert event("new", "b") is None  # a worse object: Frigate sends no snapshot for it
    now[0] = 112.0
    assert frigate.parse(second, topic=topic) is None  # a's or b's: b waits
    assert event("update", "b") is None
    with pytest.raises(AlertError, match="could not show another event's object"):
        event("end", "b")
    # an event not heard of for LIVE_S (its end lost) is over: it claims no snapshot
    assert event("new", "c") is None
    now[0] += LIVE_S + 1
    assert event("new", "d") is None
    now[0] += 0.3
    came = frigate.parse(third, topic=topic)
    assert came is not None and came.alert.alert_id == "d"


def test_a_frigate_object_that_stands_still_claims_no_snapshot_and_one_goes_with_one_event():
    now = [0.0]
    frigate = FrigateFormat(FrigateSettings())
    frigate.clock = lambda: now[0]
    topic = "frigate/gate/person/snapshot"

    def event(kind: str, event_id: str, **after: Any) -> IncomingAlert | None:
        message = json.loads(frigate_event(kind, event_id, "gate"))
        message["after"] |= after
        return frigate.parse(json.dumps(message).encode(), topic="frigate/events")

    # a person standing still all along (Frigate repeats its event, and sends no snapshot
    # of it): the next one's snapshot is that one's
    assert event("new", "still", position_changes=0) is None
    for minute in range(1, 30):
        now[0] = 60.0 * minute
        assert event("update", "still", position_changes=0, active=False) is None
    assert event("new", "walker") is None
    now[0] += 0.3
    came = frigate.parse(jpeg_bytes((64, 48)), topic=topic)
    assert came is not None and came.alert.alert_id == "walker"
    # a snapshot from before two events were heard of (as after a restart) goes with the
    # first only
    after_restart = FrigateFormat(FrigateSettings())
    assert after_restart.parse(jpeg_bytes((48, 64)), topic=topic) is None
    first, second = (
        after_restart.parse(frigate_event("update", name, "gate").encode(), topic="frigate/events")
        for name in ("a", "b")
    )
    assert first is not None and first.alert.alert_id == "a" and second is None


def test_a_frigate_api_snapshot_carries_only_the_box_of_the_frame_it_shows():
    frigate = FrigateFormat(FrigateSettings(api_url="http://nvr:5000"))

    def boxes(**changes: Any) -> list[float]:
        message = json.loads(frigate_event("new", "e"))
        message["after"] |= changes
        incoming = frigate.parse(json.dumps(message).encode(), topic="frigate/events")
        return [box.x1 for box in incoming.alert.boxes]

    assert boxes() == [424]  # the latest frame is the snapshot's
    assert boxes(frame_time=1763647393.0) == []  # a later frame's box (Frigate before 0.14)
    assert boxes(frame_time=1763647393.0, snapshot={"box": [10, 20, 30, 40]}) == [10]


def test_a_frigate_event_dropped_from_the_waiting_is_refused_at_its_next_message(monkeypatch):
    monkeypatch.setattr("plugins.frigate.MAX_WAITING", 2)
    frigate = FrigateFormat(FrigateSettings())
    for i in range(3):
        message = frigate_event("new", f"e{i}", f"cam{i}").encode()
        assert frigate.parse(message, topic="frigate/events") is None
    with pytest.raises(AlertError, match="dropped while waiting for its snapshot"):
        frigate.parse(frigate_event("end", "e0", "cam0").encode(), topic="frigate/events")
    came = frigate.parse(jpeg_bytes((64, 48)), topic="frigate/cam1/person/snapshot")
    assert came is not None and came.alert.alert_id == "e1"


def test_a_frigate_event_begun_before_the_start_is_reviewed_at_its_first_message_here():
    now = [2000.0]
    frigate = FrigateFormat(FrigateSettings())  # reviews "new"
    frigate.clock = lambda: now[0]
    snapshot, later = jpeg_bytes((64, 48)), jpeg_bytes((48, 64))

    def event(kind: str, event_id: str, camera: str = "gate") -> IncomingAlert | None:
        return frigate.parse(frigate_event(kind, event_id, camera).encode(), topic="frigate/events")

    # a snapshot taken since the start serves an event that began before it
    assert frigate.parse(snapshot, topic="frigate/gate/person/snapshot") is None
    now[0] = 2030.0
    caught = event("update", "evt-before")
    assert caught is not None and caught.images[0].data == snapshot
    assert event("update", "evt-before") is None  # once
    # without one, it waits for the next, as a new event would
    assert event("update", "evt-waits", camera="yard") is None
    now[0] = 2031.0
    came = frigate.parse(later, topic="frigate/yard/person/snapshot")
    assert came is not None and came.alert.alert_id == "evt-waits"
    # an event seen first at its end, without a snapshot: not refused (it may well have been
    # reviewed before the start)
    assert event("end", "evt-gone", camera="dock") is None
    # events that begin here follow their first message's rules
    assert event("new", "evt-here", camera="dock") is None  # waits
    # the gate's snapshot went with evt-before: no other event's
    assert event("end", "evt-here-2", camera="gate") is None
    with pytest.raises(AlertError, match="no snapshot received"):
        event("end", "evt-here", camera="dock")
    # a type that no reviewed type precedes is not caught up
    only_end = FrigateFormat(FrigateSettings(review=["end"]))
    assert only_end.parse(frigate_event("update", "u").encode(), topic="frigate/events") is None
    assert only_end._waiting == {}


async def test_a_frigate_event_waiting_at_a_restart_is_reviewed_after_it_once(
    tmp_path, broker, tiny_model
):
    settings = frigate_settings(tmp_path, broker, tiny_model)
    snapshot_topic = "frigate/loading_dock/person/snapshot"
    async with collect(broker, "secondlook/verdicts/#") as out:
        async with run_daemon(settings):
            await publish(broker, "frigate/events", frigate_event("new", "evt-done"))
            await publish(broker, snapshot_topic, jpeg_bytes((640, 360)))
            await out.wait_for(1)
            # stopped while this one waits for its snapshot
            await publish(broker, "frigate/events", frigate_event("new", "evt-waiting", "gate"))
            await asyncio.sleep(0.5)
        async with run_daemon(settings) as d:
            await publish(broker, "frigate/events", frigate_event("update", "evt-done"))
            await publish(broker, "frigate/events", frigate_event("update", "evt-waiting", "gate"))
            await publish(broker, snapshot_topic, jpeg_bytes((640, 360)))
            await publish(broker, "frigate/gate/person/snapshot", jpeg_bytes((640, 360)))
            verdicts = await out.wait_for(2)
            _, done = await d.get_alert("evt-done")
            await asyncio.sleep(0.5)
    assert [v["alert_id"] for _, v in verdicts] == ["evt-done", "evt-waiting"]
    assert len(out.messages) == 2 and done["attempts"] == 1  # evt-done not reviewed twice


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"after": {"id": "x"}}, "type"),
        ({"type": "created", "after": {}}, "type"),
        ({"type": "new", "after": "x"}, "after"),
    ],
)
def test_frigate_messages_that_are_no_event_are_refused_naming_the_field(message, field):
    frigate = FrigateFormat(FrigateSettings())
    with pytest.raises(AlertError) as refused:
        frigate.parse(json.dumps(message).encode(), topic="frigate/events")
    assert refused.value.field == field


def test_frigate_snapshots_are_checked_before_they_are_kept(monkeypatch):
    monkeypatch.setattr("plugins.frigate.MAX_SNAPSHOT_BYTES", 1000)
    frigate = FrigateFormat(FrigateSettings())
    with pytest.raises(AlertError, match="over 1000 kept at most"):
        frigate.parse(jpeg_bytes((640, 480)), topic="frigate/gate/person/snapshot")
    with pytest.raises(AlertError, match="not a JPEG or PNG"):
        frigate.parse(b"GIF89a....", topic="frigate/gate/person/snapshot")


def test_frigate_times_are_written_in_the_cameras_utc_offset():
    local = FrigateFormat(FrigateSettings(utc_offset="+08:00"))
    local.parse(jpeg_bytes((64, 48)), topic="frigate/gate/person/snapshot")
    incoming = local.parse(frigate_event("new", "evt-local", camera="gate").encode(), topic=None)
    # start_time 1763647390.25 is 14:03:10 UTC: a rule's hours see the cameras' 22:03
    assert incoming is not None and incoming.alert.occurred_at == "2025-11-20T22:03:10.250000+08:00"


def short_mapping(time_format: str, **changes: Any) -> MappedFormat:
    """A mapped format reading the contract's fields from short paths (`id`, `t`, `img`),
    at +08:00; `changes`: other fields or values."""
    fields = {"alert_id": "id", "box_id": "=b", "camera_id": "=c", "event_type": "=fire"}
    fields |= {"occurred_at": "t", "image": "img"} | changes.pop("fields", {})
    spec = MappingFormat(time_format=time_format, utc_offset="+08:00", fields=fields, **changes)
    return MappedFormat("acme", spec)


def test_vendor_times_beyond_the_calendar_are_refused_naming_the_field():
    acme = short_mapping("epoch_s")
    frigate = FrigateFormat(FrigateSettings(utc_offset="+08:00"))
    for seconds in (1e18, "inf", 253402300799):  # the last: year 10000 at +08:00
        payload = json.dumps({"id": "1", "t": seconds, "img": "x"}).encode()
        with pytest.raises(AlertError) as refused:
            acme.parse(payload, topic="acme/x")
        assert refused.value.field == "t (occurred_at)"
        event = json.loads(frigate_event("new", "evt-far"))
        event["after"]["start_time"] = seconds
        with pytest.raises(AlertError) as refused:
            frigate.parse(json.dumps(event).encode(), topic="frigate/events")
        assert refused.value.field == "after.start_time"


def test_mapped_values_are_read_the_json_way():
    acme = short_mapping(
        "%Y-%m-%d %H:%M:%S %Z",
        fields={"camera_id": "ch", "event_type": "type"},
        values={"event_type": {"1001": "fire", "true": "smoke"}},
    )
    image = base64.b64encode(jpeg_bytes((64, 48))).decode()

    def parse(**fields: object) -> IncomingAlert:
        data = {"id": 7, "ch": 3.0, "type": 1001.0, "t": "2024-05-01 10:00:00 UTC", "img": image}
        return acme.parse(json.dumps(data | fields).encode(), topic="acme/x")

    alert = parse().alert
    # a zone name read by %Z is its zone, not the configured offset
    assert alert.occurred_at == "2024-05-01T10:00:00+00:00"
    # %z reads offsets to the second, which RFC 3339 has not: the same instant in UTC
    seconds = short_mapping("%Y-%m-%d %H:%M:%S%z")
    data = {"id": 1, "t": "2024-05-01 10:00:00+053015", "img": image}
    assert seconds.parse(json.dumps(data).encode(), topic="acme/x").alert.occurred_at == (
        "2024-05-01T04:29:45+00:00"
    )
    # numbers name things as JSON writes them; translations are keyed alike
    assert (alert.alert_id, alert.camera_id, alert.event_type) == ("7", "3", "fire")
    assert parse(type=True).alert.event_type == "smoke"
    with pytest.raises(AlertError, match=r"ch \(camera_id\): expected a name, got True"):
        parse(ch=True)
    with pytest.raises(AlertError, match=r"id \(alert_id\): expected a name, got nan"):
        parse(id=float("nan"))  # JSON's NaN, which Python's reader takes


async def test_a_frigate_alert_held_back_by_the_journal_is_not_lost(tmp_path, broker, tiny_model):
    settings = frigate_settings(tmp_path, broker, tiny_model, storage={"check_interval_s": 0.2})
    async with collect(broker, "secondlook/verdicts/#") as out, run_daemon(settings) as d:
        journal = d.daemon.journal
        record_alert = journal.record_alert
        failures = [sqlite3.OperationalError("database or disk is full")]

        async def full_once(*args, **kwargs):  # the disk is full for the first write
            if failures:
                raise failures.pop()
            return await record_alert(*args, **kwargs)

        journal.record_alert = full_once
        await publish(broker, "frigate/events", frigate_event("new", "evt-held"))
        # the snapshot brings the waiting event in; its first write fails, the retry must
        # not parse the snapshot again (the event no longer waits by then)
        await publish(broker, "frigate/loading_dock/person/snapshot", jpeg_bytes((640, 360)))
        [(_, verdict)] = await out.wait_for(1, timeout=30)
    assert verdict["alert_id"] == "evt-held" and not failures
