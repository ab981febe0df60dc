"""MQTT at its edges: a paused intake flooded at QoS 0 and 1, a stop while intake is busy,
topics the broker would refuse, verdicts the broker drops the connection for, retained
snapshots, overlapping subscriptions."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import types
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from structlog.testing import capture_logs

from daemon.app import Daemon
from daemon.config import ConfigError, Subscription, load_settings
from daemon.hookspecs import hookimpl
from daemon.inference.instant import InstantBackend
from daemon.mqtt import QUEUE_MAX, ConnectionLost, MqttLink, PublishRefused, backoff_delays
from daemon.outbox import LOSSES_TO_SET_ASIDE, Outbox
from daemon.stats import StageStats
from tests.conftest import FIRE_RULE, Broker, collect, jpeg_bytes, make_alert, make_settings
from tests.conftest import run_daemon as run
from tests.test_reload_edges import ListedJournal

ALERTS = "secondlook/alerts/box-t"
SMALL_IMAGE = base64.b64encode(jpeg_bytes((64, 64))).decode()


class StuckBackend(InstantBackend):
    """Never answers: the backlog fills up and MQTT intake pauses."""

    async def run(self, request: Any) -> Any:
        await asyncio.Event().wait()


class StuckPlugin:
    @hookimpl
    def register_backends(self, register):
        register("stuck", StuckBackend)


def settings_for(tmp_path, broker: Broker, backend: str = "instant", **sections):
    settings = make_settings(tmp_path, broker=broker, model=tmp_path, **sections)
    model = settings.model.model_copy(update={"backend": backend})
    return settings.model_copy(update={"model": model})


async def flood(broker: Broker, ids: list[str], qos: int) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port, max_inflight_messages=1000) as box:
        box.pending_calls_threshold = len(ids) + 1
        payloads = [json.dumps(make_alert(alert_id, image=SMALL_IMAGE)) for alert_id in ids]
        await asyncio.gather(*(box.publish(ALERTS, p, qos=qos) for p in payloads))


@pytest.mark.parametrize("qos", [0, 1])
async def test_a_flooded_paused_intake_drops_qos0_and_loses_no_qos1_alert(
    tmp_path, own_broker, qos
):
    ids = [f"flood-{qos}-{i:04d}" for i in range(1000)]
    stuck = settings_for(
        tmp_path, own_broker, "stuck", pipeline={"max_backlog": 5, "stop_grace_s": 0.5}
    )
    (stuck.rules.dir / "fire.toml").write_text(FIRE_RULE)
    with capture_logs() as logs:
        async with run(stuck, extra_plugins=[StuckPlugin()]) as d:
            await flood(own_broker, ids, qos)
            await asyncio.sleep(2)  # the paused intake has looked at its queue meanwhile
            client = d.daemon.link._client
            waiting = len(client.messages) if client is not None else 0
    events = [e["event"] for e in logs]
    assert any(e.startswith("alerts arrive at QoS 0") for e in events) == (qos == 0)
    if qos == 0:
        # what a paused intake cannot take is dropped, not held (the broker keeps no QoS 0
        # message back): a burst goes past the bound for QUEUE_CHECK_S at most
        assert waiting <= QUEUE_MAX, waiting
        drops = [e for e in logs if e["event"].startswith("intake behind: QoS 0 messages")]
        # logged with how many went
        assert drops and all(e["dropped"] > 0 for e in drops)
        assert sum(e["dropped"] for e in drops) <= len(ids)
        return
    # the same session, a backend that answers: every QoS 1 alert is taken in, none lost
    working = settings_for(tmp_path, own_broker)
    same_session = working.mqtt.model_copy(update={"client_id": stuck.mqtt.client_id})
    async with run(working.model_copy(update={"mqtt": same_session})) as d:
        async with asyncio.timeout(90):
            while (await d.daemon.journal.read_one("SELECT count(*) FROM alerts"))[0] < 1000:
                await asyncio.sleep(0.2)
        rows = await d.daemon.journal.read("SELECT alert_id FROM alerts")
    assert sorted(row[0] for row in rows) == ids


def test_the_qos0_warning_advises_qos1_only_where_the_sender_can_be_told(tmp_path):
    settings = make_settings(tmp_path, broker=None, model=tmp_path / "unused").mqtt
    settings = settings.model_copy(
        update={
            "subscribe": ["boxes/#"],
            "subscriptions": [Subscription(topic="frigate/events", format="frigate")],
        }
    )

    async def ignore(*_: object) -> None:
        return None

    link = MqttLink(settings, on_message=ignore)
    with capture_logs() as logs:
        for topic in ("boxes/b1", "boxes/b2", "frigate/events", "frigate/events"):
            link._warn_qos0(types.SimpleNamespace(topic=aiomqtt.Topic(topic)))
    warned = {e["subscription"]: e["event"] for e in logs}
    assert len(logs) == 2  # once per subscription
    assert warned["boxes/#"].endswith("; publish them at QoS 1")
    assert warned["frigate/events"].endswith("nor delivers them again")  # Frigate cannot


async def test_a_stop_while_intake_is_busy_still_says_offline(tmp_path, own_broker):
    settings = settings_for(
        tmp_path,
        own_broker,
        "stuck",
        pipeline={"stop_grace_s": 2},
        mqtt={"reconnect_min_s": 5, "reconnect_max_s": 10},
    )
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    async with run(settings, extra_plugins=[StuckPlugin()]) as d:
        await flood(own_broker, ["busy-1", "busy-2", "busy-3"], 1)  # reviews that run on
        async with asyncio.timeout(10):
            while (await d.daemon.health())["backlog"] < 3:
                await asyncio.sleep(0.1)
        # the disk runs short: intake refuses, and does so again once the stop begins
        storage = d.daemon.storage
        storage.settings = storage.settings.model_copy(update={"min_free_mb": 1e12})
        storage.check_space()
        await flood(own_broker, ["held"], 1)
        await asyncio.sleep(0.5)
        # an HTTP request whose body never comes holds the HTTP side's stop for seconds
        host, port = settings.http.listen.rsplit(":", 1)
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST /v1/feedback HTTP/1.1\r\nHost: {settings.http.listen}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode()
        )
        await writer.drain()
        await asyncio.sleep(0.3)
        with capture_logs() as logs:
            await d.shutdown()  # meanwhile the held alert's intake meets the stop
        writer.close()
    # left to the next session: not taken for a failed intake, nor a reason to reconnect
    events = [entry["event"] for entry in logs]
    assert "alert intake failed; reconnecting" not in events and "mqtt connected" not in events
    async with collect(own_broker, "secondlook/status") as status:
        await asyncio.sleep(1)
    assert status.messages[-1][1] == b"offline"


@pytest.fixture
def small_packet_broker(tmp_path):
    """A broker that drops any client sending a packet over 1,500 bytes."""
    workdir = tmp_path / "small-packets"
    workdir.mkdir()
    broker = Broker(workdir)
    broker.config.write_text(broker.config.read_text() + "max_packet_size 1500\n")
    broker.start()
    yield broker
    broker.stop()


async def test_a_verdict_over_the_brokers_packet_size_is_set_aside_not_sent(
    tmp_path, small_packet_broker
):
    settings = settings_for(tmp_path, small_packet_broker)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    long = "x" * 256
    with capture_logs() as logs:
        async with (
            collect(small_packet_broker, "secondlook/verdicts/#") as out,
            run(settings) as d,
        ):
            big = make_alert("b" * 256, box_id=long, camera_id=long, site=long)
            assert (await d.post_alert(big))[0] == 202
            for i in range(3):
                assert (await d.post_alert(make_alert(f"after-{i}")))[0] == 202
            await out.wait_for(3)
            async with asyncio.timeout(10):  # the PUBACKs are marked just after delivery
                while (health := await d.daemon.health())["unpublished"] > 1:
                    await asyncio.sleep(0.05)
    assert sorted(v["alert_id"] for _, v in out.verdicts()) == ["after-0", "after-1", "after-2"]
    assert health["publish_refused"] == 1 and health["unpublished"] == 1
    [refused] = [e for e in logs if e["event"].startswith("verdict refused by the broker")]
    assert "over the broker's maximum packet size of 1500" in refused["error"]
    assert not [e for e in logs if e["event"] == "mqtt disconnected"]


class DropsTheConnectionFor:
    """A broker's side of publishing: the connection is lost whenever the verdict named
    `poison` is in flight (as an MQTT 3.1.1 broker may answer a publish it refuses)."""

    def __init__(self, poison: int) -> None:
        self.poison = poison
        self.connected = asyncio.Event()
        self.connected.set()
        self.published: list[int] = []
        self.in_flight: list[int] = []

    async def publish(self, topic: str, payload: str, *, retain: bool = False) -> None:
        ident = int(topic.rsplit("/", 1)[1])
        self.in_flight.append(ident)
        await asyncio.sleep(0)  # the batch's publishes are all out before any answer
        lost = self.poison in self.in_flight
        self.in_flight.remove(ident)
        if lost:
            raise ConnectionLost("connection lost before the broker acknowledged")
        self.published.append(ident)


async def test_a_verdict_that_costs_the_connection_each_time_is_set_aside_alone():
    journal, broker = ListedJournal(list(range(1, 8))), DropsTheConnectionFor(poison=3)
    outbox = Outbox(journal, broker, StageStats())
    flushes = 0
    while not outbox.refused and flushes < 10:  # each flush ends with the connection
        await outbox.flush()
        flushes += 1
    assert outbox.refused == {3}
    # one loss with all in flight, then 1 and 2 alone (each lost with the batch behind it),
    # then 3 alone until set aside
    assert flushes == 3 + LOSSES_TO_SET_ASIDE
    # the others went out: 1 and 2 alone, 4 .. 7 together once 3 was set aside
    assert sorted(broker.published) == [1, 2, 4, 5, 6, 7] and set(journal.rows) == {3}
    outbox.retry_refused()  # SIGHUP: offered again
    await outbox.flush()
    assert outbox.refused == set()  # lost once more: counted afresh


class RefusesOneAndLosesTheNext:
    """Refuses verdict 1; verdict 2 goes with the connection the first time it is sent."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.connected.set()
        self.sent: list[int] = []

    async def publish(self, topic: str, payload: str, *, retain: bool = False) -> None:
        ident = int(topic.rsplit("/", 1)[1])
        self.sent.append(ident)
        if ident == 1:
            raise PublishRefused("not authorized")
        if ident == 2 and self.sent.count(2) == 1:
            raise ConnectionLost("connection lost before the broker acknowledged")


async def test_a_refused_verdict_is_not_sent_again_by_the_flush_after_a_lost_connection():
    journal, broker, stats = ListedJournal([1, 2, 3]), RefusesOneAndLosesTheNext(), StageStats()
    outbox = Outbox(journal, broker, stats)
    with capture_logs() as logs:
        await outbox.flush()  # 1 refused, 2 lost with the connection, 3 published
        await outbox.flush()  # 2 alone, then on: 1 waits for SIGHUP
    assert broker.sent.count(1) == 1 and set(journal.rows) == {1}
    refusals = [entry for entry in logs if entry["event"].startswith("verdict refused")]
    assert len(refusals) == 1 and stats.events()[("publish_refused", ())] == 1


@pytest.mark.parametrize(
    "line, key, error",
    [
        ('subscribe = ["secondlook/alerts/#/x"]', "subscribe", "# must be the last level"),
        ('feedback_topic = "secondlook/feedback#"', "feedback_topic", "must be a whole level"),
        ('status_topic = "secondlook/status/#"', "status_topic", "cannot hold the wildcards"),
        ('shadow_prefix = "secondlook/shadow/+"', "shadow_prefix", "cannot hold the wildcards"),
        # what the daemon publishes would come back to it as alerts, each refused
        ('subscribe = ["secondlook/#"]', "'secondlook/#'", "the daemon's own messages"),
        ('subscribe = ["+/verdicts/#"]', "verdict_topic", "the daemon's own messages"),
        # a shared subscription written by hand would slip past that check
        ('subscribe = ["$share/g/secondlook/#"]', "subscribe", "share_group"),
        ('[[mqtt.subscriptions]]\ntopic = "$share/g/x/#"', "topic", "share_group"),
        # feedback would arrive twice: as feedback, and again as an alert
        ('subscribe = ["secondlook/+/x"]', "feedback_topic", "feedback would arrive twice"),
    ],
)
def test_a_topic_the_broker_would_refuse_is_a_config_error_naming_it(tmp_path, line, key, error):
    config = tmp_path / "secondlook.toml"
    config.write_text(f"[mqtt]\n{line}\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert key in str(raised.value) and error in str(raised.value)


def test_the_reconnect_delay_stays_capped_through_an_outage_of_hours():
    next_delay = backoff_delays(0.5, 30.0)
    delays = [next_delay() for _ in range(5000)]  # past 2**1024, which no float holds
    assert max(delays) <= 30.0 and min(delays[20:]) >= 15.0


async def retained_status(broker: Broker, topic: str) -> bytes | None:
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.subscribe(topic, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                async for message in client.messages:
                    return bytes(message.payload)
    return None


class LoadsThenFails(InstantBackend):
    async def start(self) -> None:
        await asyncio.sleep(1.0)  # the link is up by now, `online` retained
        raise RuntimeError("the model cannot be loaded")


class LoadsThenFailsPlugin:
    @hookimpl
    def register_backends(self, register):
        register("loads-then-fails", LoadsThenFails)


async def test_the_status_says_offline_after_a_failed_start_and_a_reconnect_of_its_own(
    tmp_path, own_broker
):
    settings = make_settings(tmp_path, broker=own_broker, model=tmp_path)
    failing = settings.model_copy(
        update={"model": settings.model.model_copy(update={"backend": "loads-then-fails"})}
    )
    daemon = Daemon(failing, extra_plugins=[LoadsThenFailsPlugin()])
    with pytest.raises(BaseException, match=r"unhandled errors|cannot be loaded"):
        await asyncio.wait_for(daemon.run(asyncio.Event()), 20)
    # aiomqtt's clean DISCONNECT drops the last will: the daemon says it itself
    assert await retained_status(own_broker, settings.mqtt.status_topic) == b"offline"
    # an intake that fails reconnects (the broker delivers the alert again): meanwhile
    slow = settings.model_copy(
        update={
            "model": settings.model.model_copy(update={"backend": "instant"}),
            "mqtt": settings.mqtt.model_copy(update={"reconnect_min_s": 20, "reconnect_max_s": 20}),
        }
    )
    async with run(slow) as d:
        assert await retained_status(own_broker, settings.mqtt.status_topic) == b"online"
        ingest = d.daemon.pipeline.ingest

        async def fails_once(*args: Any, **kwargs: Any) -> Any:
            d.daemon.pipeline.ingest = ingest
            raise RuntimeError("a plugin's bug")

        d.daemon.pipeline.ingest = fails_once
        async with aiomqtt.Client("127.0.0.1", own_broker.port) as box:
            await box.publish("secondlook/alerts/box-t", json.dumps(make_alert("x")), qos=1)
        async with asyncio.timeout(10):
            while d.daemon.link.connected.is_set():
                await asyncio.sleep(0.05)
        assert await retained_status(own_broker, settings.mqtt.status_topic) == b"offline"


async def test_a_subscription_the_broker_refuses_is_logged_and_in_the_health(
    tmp_path, own_broker, monkeypatch
):
    async def refused(self: aiomqtt.Client, *args: Any, **kwargs: Any) -> list[ReasonCode]:
        # what brokers enforcing access lists at subscribing answer (mosquitto grants it)
        return [ReasonCode(PacketTypes.SUBACK, "Not authorized")]

    monkeypatch.setattr(aiomqtt.Client, "subscribe", refused)
    settings = make_settings(tmp_path, broker=own_broker, model=tmp_path)
    settings = settings.model_copy(
        update={"model": settings.model.model_copy(update={"backend": "instant"})}
    )
    with capture_logs() as logs:
        async with run(settings) as d:
            health = await d.daemon.health()
    assert health["subscriptions_refused"]["secondlook/alerts/#"] == "Not authorized"
    assert any(e["event"].startswith("mqtt subscription refused") for e in logs)


async def test_a_subscription_that_times_out_leaves_offline_for_the_backoff(
    tmp_path, own_broker, monkeypatch
):
    tries = 0

    async def times_out(self: aiomqtt.Client, *args: Any, **kwargs: Any) -> None:
        nonlocal tries
        tries += 1
        raise aiomqtt.MqttError("Operation timed out")  # aiomqtt's, with the connection up

    monkeypatch.setattr(aiomqtt.Client, "subscribe", times_out)
    settings = make_settings(tmp_path, broker=own_broker, model=tmp_path).mqtt
    settings = settings.model_copy(update={"reconnect_min_s": 30, "reconnect_max_s": 30})

    async def ignore(*args: Any) -> None:
        return None

    link = MqttLink(settings, on_message=ignore)
    running = asyncio.create_task(link.run())
    try:
        async with asyncio.timeout(10):
            while tries == 0:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # the link has given up this connection, and waits
        monkeypatch.undo()
        assert await retained_status(own_broker, settings.status_topic) == b"offline"
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
