"""An alert that kills the daemon takes only itself down: after a crash, the alerts that were
in review are reviewed one at a time, so the next crash counts against the culprit alone."""

from __future__ import annotations

import asyncio
import json
import subprocess

import aiohttp

from daemon.app import JOURNAL_FILE
from daemon.journal import Journal
from daemon.review_gate import ReviewGate
from plugins.canonical import CanonicalFormat
from tests.conftest import FIRE_RULE, make_alert
from tests.daemon_proc import start, write_config

#: a loose plugin standing for a model that brings the process down on one image: a rule
#: kind that asks as `verdict` does, but dies (SIGKILL: no last word) composing for "poison"
POISON_PLUGIN = """
import os
import signal

from daemon.hookspecs import hookimpl
from plugins.verdict import YesNoVerdict


class Fragile(YesNoVerdict):
    name = "fragile"

    def compose(self, alert, rule):
        if alert.alert_id == "poison":
            os.kill(os.getpid(), signal.SIGKILL)
        return super().compose(alert, rule)


@hookimpl
def register_rule_kinds(register):
    register(Fragile())
"""


async def test_innocent_alerts_outlive_one_that_crashes_the_daemon_at_every_start(
    tmp_path, broker, tiny_model
):
    config, http = write_config(tmp_path, broker.port, tiny_model, '[plugins]\ndir = "plugins"\n')
    (tmp_path / "rules" / "fire.toml").write_text(FIRE_RULE.replace('"verdict"', '"fragile"'))
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "poison.py").write_text(POISON_PLUGIN)
    innocent = [f"innocent-{i}" for i in range(6)]
    # journalled before the start, the culprit last: the others are in review when it strikes
    journal = await Journal.open(tmp_path / "var" / JOURNAL_FILE)
    for alert_id in [*innocent, "poison"]:
        incoming = CanonicalFormat().parse(json.dumps(make_alert(alert_id)).encode(), topic=None)
        await journal.record_alert(incoming.alert, incoming.images, source="http", topic=None)
    await journal.close()

    crashes = 0
    records: dict[str, dict] = {}
    while not records:
        proc = start(config)
        try:
            records = await _reviewed_unless_it_dies(proc, http, [*innocent, "poison"])
        finally:
            proc.kill()
            code = await asyncio.to_thread(proc.wait, 10)
        if not records:
            assert code == -9, f"the daemon stopped with {code}, not by the culprit"
            crashes += 1
            assert crashes <= 4, "the culprit was never given up"

    assert crashes == 3  # once side by side, then twice alone
    [given_up] = records["poison"]["verdicts"]
    assert given_up["verdict"] == "unreviewed"
    assert given_up["reason"] == "review interrupted 3 times; giving up"
    for alert_id in innocent:
        [verdict] = records[alert_id]["verdicts"]
        assert verdict["verdict"] != "unreviewed", (alert_id, verdict["reason"])
        # beside the culprit at the first crash, then reviewed alone, once
        assert records[alert_id]["attempts"] == 2


async def _reviewed_unless_it_dies(
    proc: subprocess.Popen[bytes], http: str, ids: list[str]
) -> dict[str, dict]:
    """Each alert's record once all are reviewed; {} if the daemon dies first."""
    records: dict[str, dict] = {}
    async with aiohttp.ClientSession() as session, asyncio.timeout(90):
        while len(records) < len(ids):
            if proc.poll() is not None:
                return {}
            for alert_id in ids:
                try:
                    async with session.get(f"http://{http}/v1/alerts/{alert_id}") as response:
                        body = await response.json()
                except aiohttp.ClientError:  # starting, or dead
                    break
                if response.status == 200 and body["state"] == "reviewed":
                    records[alert_id] = body
            await asyncio.sleep(0.2)
    return records


async def test_a_review_alone_waits_for_those_under_way_and_holds_back_new_ones():
    gate = ReviewGate()
    events: list[str] = []
    first_in = asyncio.Event()
    release_first = asyncio.Event()

    async def beside(name: str, hold: asyncio.Event | None = None) -> None:
        async with gate.review(alone=False):
            events.append(f"{name} in")
            if hold is not None:
                first_in.set()
                await hold.wait()
            events.append(f"{name} out")

    async def alone() -> None:
        async with gate.review(alone=True):
            events.append("alone in")
            await asyncio.sleep(0.01)
            events.append("alone out")

    first = asyncio.create_task(beside("first", release_first))
    await first_in.wait()
    lone = asyncio.create_task(alone())
    await asyncio.sleep(0.01)
    later = asyncio.create_task(beside("later"))
    await asyncio.sleep(0.01)
    assert events == ["first in"]  # the lone one waits for `first`, and `later` behind it
    release_first.set()
    await asyncio.gather(first, lone, later)
    assert events == ["first in", "first out", "alone in", "alone out", "later in", "later out"]


async def test_a_review_cancelled_while_waiting_to_be_alone_lets_the_others_through():
    gate = ReviewGate()
    release = asyncio.Event()

    async def hold() -> None:
        async with gate.review(alone=False):
            await release.wait()

    held = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiting = asyncio.create_task(_enter(gate, alone=True))
    await asyncio.sleep(0.01)
    blocked = asyncio.create_task(_enter(gate, alone=False))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    waiting.cancel()
    await asyncio.wait_for(blocked, 1)  # goes in beside `held`, no longer held back
    release.set()
    await held


async def _enter(gate: ReviewGate, *, alone: bool) -> None:
    async with gate.review(alone=alone):
        pass
