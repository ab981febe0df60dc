"""The daemon under systemd's eye: a poisoned GPU context, a stuck worker, a config reload.

The daemon runs as a subprocess with the tiny model behind a loose plugin backend whose
forward pass misbehaves on demand: a file names the fault (`poison`: the CUDA error a broken
kernel leaves; `stall N`: the pass hangs N seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import time
from pathlib import Path

import aiohttp

from tests.conftest import FIRE_RULE, collect, make_alert
from tests.daemon_proc import Notifications, log_path, start, wait_http_ok, write_config

FAULTY_BACKEND = """
import os
import time
from pathlib import Path

from daemon.hookspecs import hookimpl
from daemon.inference.transformers_backend import TransformersBackend

SWITCH = Path(os.environ["SECONDLOOK_TEST_FAULT"])


class FaultyBackend(TransformersBackend):
    async def start(self):
        await super().start()
        runner = self._runner
        forward = runner.forward

        def faulty_forward(requests, inputs):
            fault = SWITCH.read_text().split() if SWITCH.exists() else []
            if fault[:1] == ["poison"]:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            if fault[:1] == ["stall"]:
                time.sleep(float(fault[1]))
            return forward(requests, inputs)

        runner.forward = faulty_forward


@hookimpl
def register_backends(register):
    register("faulty", FaultyBackend)
"""


def faulty_daemon(tmp_path: Path, broker_port: int, model: Path, extra: str = "") -> tuple:
    """Config (rules: fire), the fault switch file, and the HTTP address."""
    plugins = tmp_path / "plugins.d"
    plugins.mkdir()
    (plugins / "faulty.py").write_text(FAULTY_BACKEND)
    model_extra = '[plugins]\ndir = "plugins.d"\n' + extra
    config, http = write_config(tmp_path, broker_port, model, model_extra)
    text = config.read_text().replace("[model]\n", '[model]\nbackend = "faulty"\nmax_wait_ms = 0\n')
    config.write_text(text)
    (tmp_path / "rules" / "fire.toml").write_text(FIRE_RULE)
    return config, tmp_path / "fault", http


async def post(http: str, alert: dict) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://{http}/v1/alerts", json=alert) as response,
    ):
        return response.status


def alert_state(config: Path, alert_id: str) -> str:
    with sqlite3.connect(config.parent / "var" / "journal.sqlite3") as db:
        [(state,)] = db.execute("SELECT state FROM alerts WHERE alert_id = ?", (alert_id,))
    return state


def alert_attempts(config: Path, alert_id: str) -> int:
    with sqlite3.connect(config.parent / "var" / "journal.sqlite3") as db:
        [(attempts,)] = db.execute("SELECT attempts FROM alerts WHERE alert_id = ?", (alert_id,))
    return attempts


def log_events(config: Path) -> list[dict]:
    lines = log_path(config).read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


async def test_a_poisoned_cuda_context_exits_non_zero_and_the_alert_waits_for_the_restart(
    tmp_path, broker, tiny_model
):
    config, fault, http = faulty_daemon(tmp_path, broker.port, tiny_model)
    async with collect(broker, "secondlook/verdicts/#") as out:
        proc = start(config, SECONDLOOK_TEST_FAULT=str(fault))
        try:
            await wait_http_ok(f"http://{http}", proc)
            fault.write_text("poison")
            assert await post(http, make_alert("poisoned")) == 202
            # systemd's Restart=on-failure needs a non-zero exit
            assert await asyncio.to_thread(proc.wait, 60) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
        assert alert_state(config, "poisoned") == "received"
        assert out.verdicts() == []
        events = log_events(config)
        assert any(
            e["event"] == "the model is unusable" and "illegal memory" in e["error"] for e in events
        )

        fault.unlink()
        proc = start(config, SECONDLOOK_TEST_FAULT=str(fault))
        try:
            [(_, verdict)] = await out.wait_for(1, timeout=60)
            assert verdict["alert_id"] == "poisoned"
            assert verdict["verdict"] in ("confirmed", "rejected", "uncertain")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0
    assert alert_state(config, "poisoned") == "reviewed"


async def test_the_watchdog_is_fed_only_while_the_model_worker_progresses(
    tmp_path, broker, tiny_model
):
    config, fault, http = faulty_daemon(tmp_path, broker.port, tiny_model)
    text = config.read_text().replace("[model]\n", "[model]\nstall_timeout_s = 1\n")
    config.write_text(text)
    notify = Notifications(tmp_path / "notify.sock")
    # WatchdogSec=1s: pings every half second
    proc = start(config, notify, SECONDLOOK_TEST_FAULT=str(fault), WATCHDOG_USEC="1000000")

    def pings() -> int:
        return sum(message.count("WATCHDOG=1") for message in notify.read())

    try:
        await wait_http_ok(f"http://{http}", proc)
        before = pings()
        await asyncio.sleep(1.6)
        assert pings() - before >= 2  # fed while idle
        fault.write_text("stall 6")
        assert await post(http, make_alert("stuck")) == 202
        await asyncio.sleep(2.5)  # one batch for over stall_timeout_s
        stalled_from = pings()
        await asyncio.sleep(2)
        assert pings() == stalled_from  # not fed: systemd would restart the daemon now
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{http}/healthz") as response,
        ):
            health = await response.json()
        assert response.status == 503 and health["status"] == "failing"
        assert "on one batch for" in health["problem"]
        fault.unlink()
        deadline = time.monotonic() + 15
        while pings() == stalled_from and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert pings() > stalled_from  # the batch ended: fed again
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
    events = log_events(config)
    starved = [e for e in events if e["event"].startswith("watchdog not fed")]
    assert starved and "on one batch for" in starved[0]["reason"]
    assert any(e["event"] == "watchdog fed again" for e in events)


async def test_sighup_applies_live_settings_and_names_those_that_need_a_restart(
    tmp_path, broker, tiny_model
):
    config, fault, http = faulty_daemon(
        tmp_path, broker.port, tiny_model, "[pipeline]\nmax_backlog = 1000\n"
    )
    proc = start(config, SECONDLOOK_TEST_FAULT=str(fault))
    try:
        await wait_http_ok(f"http://{http}", proc)
        fault.write_text("stall 5")  # the worker holds what comes in
        statuses = [await post(http, make_alert(f"hup-{i}")) for i in range(4)]
        assert statuses == [202] * 4
        # a lower backlog limit and another batch size: the first applies now
        text = config.read_text().replace("max_backlog = 1000", "max_backlog = 3")
        config.write_text(text.replace("[model]\n", "[model]\nmax_batch = 4\n"))
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert await post(http, make_alert("hup-refused")) == 503
        # a broken config file leaves the running settings alone
        reloaded = config.read_text()
        config.write_text(reloaded + "\n[pipeline]\nworkers = 'many'\n")
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert proc.poll() is None
        # so does one whose next start would fail: the journal's folder under a file
        (tmp_path / "a-file").write_text("")
        config.write_text(reloaded.replace('dir = "var"', 'dir = "a-file/var"'))
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert proc.poll() is None
        fault.unlink()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    events = log_events(config)
    [reloaded] = [e for e in events if e["event"].startswith("config reloaded")]
    assert reloaded["restart_needed_for"] == ["model"] and reloaded["level"] == "warning"
    broken, would_fail = [e for e in events if e["event"].startswith("config not reloaded")]
    assert "pipeline" in broken["error"]
    assert would_fail["event"].startswith(
        "config not reloaded: this file would stop the next start"
    )
    assert would_fail["error"].endswith(
        "a-file/var: " + str(tmp_path / "a-file") + " is not a folder"
    )


async def test_a_verdict_made_within_the_stops_grace_is_published_before_the_exit(
    tmp_path, broker, tiny_model
):
    config, fault, http = faulty_daemon(
        tmp_path, broker.port, tiny_model, "[pipeline]\nstop_grace_s = 10\n"
    )
    status_topic = f"cli/{tmp_path.name}/status"
    async with collect(broker, status_topic, "secondlook/verdicts/#") as out:
        proc = start(config, SECONDLOOK_TEST_FAULT=str(fault))
        try:
            await wait_http_ok(f"http://{http}", proc)
            fault.write_text("stall 1.5")
            assert await post(http, make_alert("late")) == 202
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)  # while the review is in its pass
            assert await asyncio.to_thread(proc.wait, 30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        await out.wait_until(status_topic, b"offline")
        verdicts = [m for m in out.messages if m[0].startswith("secondlook/verdicts/")]
    # published by the stopping daemon, before its `offline`
    assert [json.loads(m[1])["alert_id"] for m in verdicts] == ["late"]
    assert out.messages.index(verdicts[0]) < [m[1] for m in out.messages].index(b"offline")
    with sqlite3.connect(config.parent / "var" / "journal.sqlite3") as db:
        [(published,)] = db.execute("SELECT published_at FROM verdicts")
    assert published and alert_state(config, "late") == "reviewed"


async def test_sigterm_gives_a_stuck_review_its_grace_then_a_second_sigterm_exits_at_once(
    tmp_path, broker, tiny_model
):
    config, fault, http = faulty_daemon(
        tmp_path, broker.port, tiny_model, "[pipeline]\nstop_grace_s = 1.5\n"
    )
    status_topic = f"cli/{tmp_path.name}/status"
    async with collect(broker, status_topic, "secondlook/verdicts/#") as out:
        proc = start(config, SECONDLOOK_TEST_FAULT=str(fault))
        try:
            await wait_http_ok(f"http://{http}", proc)
            fault.write_text("stall 30")
            assert await post(http, make_alert("graceful")) == 202
            await asyncio.sleep(0.5)
            stopped_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            # the grace ends, the review stays journalled, `offline` is announced
            assert await asyncio.to_thread(proc.wait, 20) == 0
            assert 1.5 <= time.monotonic() - stopped_at < 15
            await out.wait_until(status_topic, b"offline")
            assert alert_state(config, "graceful") == "received"
            # a clean stop is no failed attempt: restarts never use up max_attempts
            assert alert_attempts(config, "graceful") == 0

            proc = start(config, SECONDLOOK_TEST_FAULT=str(fault))
            await wait_http_ok(f"http://{http}", proc)  # the replayed review stalls again
            await asyncio.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            stopped_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 10) == 1
            assert time.monotonic() - stopped_at < 1.0
        finally:
            if proc.poll() is None:
                proc.kill()
        fault.unlink()
        proc = start(config, SECONDLOOK_TEST_FAULT=str(fault))
        try:
            [(_, verdict)] = await out.wait_for(1, prefix="secondlook/verdicts", timeout=60)
            assert verdict["alert_id"] == "graceful"
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0


SLOW_LOADING_BACKEND = """
import asyncio
import time

from daemon.hookspecs import hookimpl
from daemon.inference.transformers_backend import TransformersBackend


class SlowLoading(TransformersBackend):
    async def start(self):
        # a model that takes minutes to load (or a load that hangs), on the model thread
        await asyncio.get_running_loop().run_in_executor(self._model_pool, time.sleep, 120)
        await super().start()


@hookimpl
def register_backends(register):
    register("slow-loading", SlowLoading)
"""


async def test_sigterm_while_the_model_loads_stops_without_waiting_for_it(tmp_path, tiny_model):
    plugins = tmp_path / "plugins.d"
    plugins.mkdir()
    (plugins / "slow.py").write_text(SLOW_LOADING_BACKEND)
    config, http = write_config(tmp_path, 1883, tiny_model, '[plugins]\ndir = "plugins.d"\n')
    text = config.read_text().replace("[mqtt]\n", "[mqtt]\nenabled = false\n")
    config.write_text(text.replace("[model]\n", '[model]\nbackend = "slow-loading"\n'))
    proc = start(config)
    try:
        # HTTP intake is open while the model loads: the alert is journalled
        async with asyncio.timeout(30):
            while True:
                assert proc.poll() is None
                with contextlib.suppress(aiohttp.ClientError):
                    if await post(http, make_alert("during-load")) == 202:
                        break
                await asyncio.sleep(0.1)
        # a rule is saved once the model's tokenizer can check it too
        async with (
            aiohttp.ClientSession() as session,
            session.put(f"http://{http}/v1/rules/saved-early", data=FIRE_RULE) as answer,
        ):
            assert answer.status == 503 and answer.headers["Retry-After"] == "5"
            assert "the model is loading" in (await answer.json())["error"]
        assert not (tmp_path / "rules" / "saved-early.toml").exists()
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert time.monotonic() - stopped_at < 15
    finally:
        if proc.poll() is None:
            proc.kill()
    assert alert_state(config, "during-load") == "received"  # reviewed after the restart
