"""Fault tests on loopback: the daemon killed, the broker down, bursts beyond capacity.

Each prints its figures (alerts, kills, outage, duplicates, memory) for the record.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image

from daemon.mqtt import publish_all
from tests.conftest import (
    FIRE_RULE,
    Collector,
    collect,
    make_alert,
    make_settings,
    publish,
    run_daemon,
)
from tests.daemon_proc import start, wait_http_ok, write_config

ALERTS = "secondlook/alerts/box-t"
VERDICTS = "secondlook/verdicts/#"
JSON = {"Content-Type": "application/json"}


def rss_mb(pid: int) -> float:
    with Path(f"/proc/{pid}/status").open() as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def until_every_verdict(out: Collector, ids: set[str], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not ids <= {v["alert_id"] for _, v in out.verdicts()}:
            await out.wait_for(len(out.verdicts()) + 1, timeout=timeout)


def duplicates(out: Collector) -> int:
    verdicts = out.verdicts()
    return len(verdicts) - len({v["alert_id"] for _, v in verdicts})


async def test_kill_9_during_a_stream_of_200_alerts_then_restart_loses_none(
    tmp_path, broker, tiny_model
):
    config, http = write_config(tmp_path, broker.port, tiny_model)
    (tmp_path / "rules" / "fire.toml").write_text(FIRE_RULE)
    ids = [f"kill-{i:03d}" for i in range(200)]
    async with collect(broker, VERDICTS) as out:
        proc = start(config)
        try:
            await wait_http_ok(f"http://{http}", proc)
            await publish_all(
                "127.0.0.1", broker.port, ALERTS, [json.dumps(make_alert(i)) for i in ids]
            )
            await out.wait_for(20, timeout=60)
            proc.kill()  # SIGKILL: no shutdown, no last word
            await asyncio.to_thread(proc.wait, 10)
            at_kill = len({v["alert_id"] for _, v in out.verdicts()})
            proc = start(config)
            await wait_http_ok(f"http://{http}", proc)
            await until_every_verdict(out, set(ids), timeout=120)
        finally:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)
    assert at_kill < len(ids), "the kill came after the stream: it proves nothing"
    assert {v["alert_id"] for _, v in out.verdicts()} == set(ids)
    print(
        f"\nkill -9: {len(ids)} alerts, 1 kill after {at_kill} verdicts, "
        f"{duplicates(out)} duplicate verdicts, 0 lost"
    )


async def test_http_alerts_during_a_broker_outage_are_delivered_once_it_returns(
    tmp_path, own_broker, tiny_model
):
    settings = make_settings(tmp_path, broker=own_broker, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    ids = [f"outage-http-{i}" for i in range(30)]
    async with collect(own_broker, VERDICTS) as out, run_daemon(settings) as d:
        await asyncio.to_thread(own_broker.stop)
        began = time.monotonic()
        for alert_id in ids:
            status, _ = await d.post_alert(make_alert(alert_id))
            assert status == 202
        for alert_id in ids:
            await d.wait_reviewed(alert_id)
        # reviewed, journalled, waiting for the broker
        assert await d.daemon.journal.count_unpublished() == len(ids)
        await asyncio.sleep(max(0.0, 3 - (time.monotonic() - began)))
        await asyncio.to_thread(own_broker.start)
        outage = time.monotonic() - began
        await until_every_verdict(out, set(ids), timeout=60)
        async with asyncio.timeout(30):
            while await d.daemon.journal.count_unpublished():
                await asyncio.sleep(0.05)
    print(
        f"\nHTTP during an outage: {len(ids)} alerts, broker down {outage:.1f} s, "
        f"{duplicates(out)} duplicates, 0 lost"
    )


async def test_a_broker_down_at_boot_does_not_hold_the_start(
    tmp_path, own_broker, tiny_model, monkeypatch
):
    monkeypatch.setattr("daemon.app.MQTT_READY_WAIT_S", 1.0)
    settings = make_settings(tmp_path, broker=own_broker, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    await asyncio.to_thread(own_broker.stop)
    async with run_daemon(settings) as d:  # ready without the broker
        health = await d.daemon.health()
        assert (health["status"], health["mqtt"]) == ("ok", "disconnected")
        assert (await d.post_alert(make_alert("boot-http")))[0] == 202
        await d.wait_reviewed("boot-http")
        await asyncio.to_thread(own_broker.start)
        await asyncio.wait_for(d.daemon.link.subscribed.wait(), 30)
        async with collect(own_broker, VERDICTS) as out:
            await publish_all(
                "127.0.0.1", own_broker.port, ALERTS, [json.dumps(make_alert("boot-mqtt"))]
            )
            await until_every_verdict(out, {"boot-mqtt"}, timeout=60)


async def test_broker_down_during_an_mqtt_stream_loses_none(tmp_path, own_broker, tiny_model):
    settings = make_settings(tmp_path, broker=own_broker, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    ids = [f"outage-mqtt-{i:03d}" for i in range(200)]
    payloads = [json.dumps(make_alert(alert_id)) for alert_id in ids]
    async with collect(own_broker, VERDICTS) as out, run_daemon(settings):
        await publish_all("127.0.0.1", own_broker.port, ALERTS, payloads[:100])
        await out.wait_for(10, timeout=30)
        await asyncio.to_thread(own_broker.stop)  # mid-stream: reviews and publishes cut off
        began = time.monotonic()
        await asyncio.sleep(3)
        await asyncio.to_thread(own_broker.start)
        outage = time.monotonic() - began
        await publish_all("127.0.0.1", own_broker.port, ALERTS, payloads[100:])
        await until_every_verdict(out, set(ids), timeout=90)
    print(
        f"\nbroker outage mid-stream: {len(ids)} alerts, broker down {outage:.1f} s, "
        f"{duplicates(out)} duplicates, 0 lost"
    )


def noise_jpeg(size: tuple[int, int] = (1280, 720)) -> bytes:
    """A snapshot that compresses badly (about 0.5 MB), so that holding many would show."""
    rng = np.random.default_rng(5)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, "JPEG", quality=80
    )
    return buffer.getvalue()


async def test_a_10x_burst_keeps_memory_bounded_answers_503_and_loses_nothing(
    tmp_path, broker, tiny_model
):
    max_backlog = 40
    config, http = write_config(
        tmp_path,
        broker.port,
        tiny_model,
        f"[pipeline]\nmax_backlog = {max_backlog}\nqueue_size = 8\n",
    )
    (tmp_path / "rules" / "fire.toml").write_text(FIRE_RULE)
    image = base64.b64encode(noise_jpeg()).decode()
    http_ids = [f"burst-http-{i:03d}" for i in range(10 * max_backlog)]
    mqtt_ids = [f"burst-mqtt-{i:03d}" for i in range(10 * max_backlog)]
    busy = 0
    backlog_seen: list[int] = []
    #: (verdicts so far, RSS in MB)
    rss_seen: list[tuple[int, float]] = []

    async def post(session: aiohttp.ClientSession, alert_id: str) -> None:
        nonlocal busy
        body = json.dumps(make_alert(alert_id, image=image))
        while True:
            async with session.post(
                f"http://{http}/v1/alerts", data=body, headers=JSON
            ) as response:
                if response.status == 202:
                    return
                assert response.status == 503, await response.text()
                assert response.headers["Retry-After"].isdigit()
                busy += 1
            await asyncio.sleep(0.05)  # a box would wait Retry-After seconds

    async def watch(session: aiohttp.ClientSession, pid: int) -> None:
        while True:
            rss_seen.append((len(out.verdicts()), rss_mb(pid)))
            async with session.get(f"http://{http}/healthz") as response:
                backlog_seen.append((await response.json())["backlog"])
            await asyncio.sleep(0.05)

    async with collect(broker, VERDICTS) as out, aiohttp.ClientSession() as session:
        proc = start(config, MALLOC_ARENA_MAX="2")  # as the systemd unit sets it
        watcher = None
        try:
            await wait_http_ok(f"http://{http}", proc)
            # steady state first: a load within capacity fills the model's batches and pools
            for round_ in range(3):
                warm_ids = [f"burst-warm-{round_}-{i:02d}" for i in range(max_backlog // 2)]
                await asyncio.gather(*(post(session, alert_id) for alert_id in warm_ids))
                await until_every_verdict(out, set(warm_ids), timeout=60)
            idle_rss = rss_mb(proc.pid)
            warm = len(out.verdicts())
            watcher = asyncio.create_task(watch(session, proc.pid))
            gate = asyncio.Semaphore(32)

            async def one(alert_id: str) -> None:
                async with gate:
                    await post(session, alert_id)

            await asyncio.gather(*(one(alert_id) for alert_id in http_ids))
            # the same burst over MQTT: intake pauses, the broker holds the rest
            await publish_all(
                "127.0.0.1",
                broker.port,
                ALERTS,
                [json.dumps(make_alert(alert_id, image=image)) for alert_id in mqtt_ids],
            )
            await until_every_verdict(out, set(http_ids + mqtt_ids), timeout=180)
        finally:
            if watcher is not None:
                watcher.cancel()
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)
    payload_mb = len(image) * len(http_ids + mqtt_ids) / 2**20
    peak = max(rss for _, rss in rss_seen)
    growth = peak - idle_rss
    # bounded: in each half, what its first fifth needed the other four fifths did not add
    # much to; memory that grew with the input would add at least their payload
    phases = []
    for first, count in ((warm, len(http_ids)), (warm + len(http_ids), len(mqtt_ids))):
        seen = [(done - first, rss) for done, rss in rss_seen if first <= done <= first + count]
        early = max(rss for done, rss in seen if done <= count // 5)
        phases.append((early, max(rss for _, rss in seen)))
    print(
        f"\nburst: {len(http_ids)} over HTTP + {len(mqtt_ids)} over MQTT "
        f"({payload_mb:.0f} MB of snapshots), max_backlog {max_backlog}: {busy} answers 503, "
        f"largest backlog {max(backlog_seen)}, RSS {idle_rss:.0f} MB within capacity, "
        f"peak {peak:.0f} MB (+{growth:.0f}); after the first fifth of each half / at its "
        f"end: {' and '.join(f'{a:.0f} / {b:.0f} MB' for a, b in phases)}; "
        f"{duplicates(out)} duplicates, 0 lost"
    )
    assert busy > 0
    assert max(backlog_seen) <= max_backlog
    later_payload_mb = payload_mb / 2 * 4 / 5
    for early, phase_peak in phases:
        assert phase_peak - early < 0.5 * later_payload_mb, "memory grew with the burst"


async def test_an_mqtt_alert_whose_intake_keeps_failing_is_refused_and_the_rest_go_on(
    tmp_path, broker, tiny_model
):
    settings = make_settings(tmp_path, broker=broker, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    async with collect(broker, "secondlook/verdicts/#") as out, run_daemon(settings) as d:
        journal = d.daemon.journal
        record_alert = journal.record_alert
        tries: list[str] = []

        async def failing_for_one(alert, *args, **kwargs):  # a fault nobody foresaw
            if alert.alert_id == "poison":
                tries.append(alert.alert_id)
                raise RuntimeError("an unforeseen fault")
            return await record_alert(alert, *args, **kwargs)

        journal.record_alert = failing_for_one
        await publish(broker, "secondlook/alerts/b", json.dumps(make_alert("poison")))
        await publish(broker, "secondlook/alerts/b", json.dumps(make_alert("after")))
        [(_, verdict)] = await out.wait_for(1)
        [reject] = await journal.read("SELECT field, error FROM rejects")
    assert verdict["alert_id"] == "after" and len(tries) == 3
    assert reject["field"] == "payload"
    assert reject["error"] == "intake failed 3 times: RuntimeError('an unforeseen fault')"
