"""SIGHUP at the edges: early in a start, late in a stop, while the journal opens; a reloaded
config checked as a start checks it; refused verdicts offered again; odd rule files."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from structlog.testing import capture_logs

from daemon.app import Daemon
from daemon.config import Settings
from daemon.journal import Journal, OutboxItem
from daemon.mqtt import PublishRefused
from daemon.outbox import Outbox
from daemon.plugins import Registry, make_plugin_manager
from daemon.rules import RuleBook
from daemon.snapshots import check_image_url
from daemon.stats import StageStats
from tests.conftest import ROOT, make_settings, run_daemon
from tests.daemon_proc import write_config


def instant_settings(tmp_path: Path, **sections) -> Settings:
    """Settings whose backend answers at once (no model to load)."""
    settings = make_settings(tmp_path, broker=None, model=tmp_path, **sections)
    instant = settings.model.model_copy(update={"backend": "instant"})
    return settings.model_copy(update={"model": instant})


def start_instant(tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`secondlook run` with the instant backend and no MQTT, as a subprocess."""
    config, http = write_config(tmp_path, 1883, tmp_path)
    text = config.read_text().replace("[mqtt]\n", "[mqtt]\nenabled = false\n")
    config.write_text(text.replace("[model]\n", '[model]\nbackend = "instant"\n'))
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, http


def wait_healthy(proc: subprocess.Popen[bytes], http: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the daemon exited: {proc.returncode}"
        try:
            urllib.request.urlopen(f"http://{http}/healthz", timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("never healthy")


def test_a_sighup_early_in_the_start_is_a_reload_not_the_end(tmp_path):
    proc, http = start_instant(tmp_path)
    try:
        time.sleep(0.5)  # importing: kill -HUP, logrotate, `systemctl reload` come anyway
        proc.send_signal(signal.SIGHUP)
        wait_healthy(proc, http)  # SIGHUP's default action would have ended the process
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0


def test_sighups_during_a_stop_leave_a_clean_exit(tmp_path):
    proc, http = start_instant(tmp_path)
    wait_healthy(proc, http)
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(signal.SIGHUP)  # a reload racing the stop
            time.sleep(0.02)
    finally:
        if proc.poll() is None:  # a stop that hangs: no daemon left behind
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0


async def test_reloaded_images_resample_applies(tmp_path):
    settings = instant_settings(tmp_path)
    new = instant_settings(tmp_path, images={"resample": "bicubic"})
    async with run_daemon(settings, reload_settings=lambda: new) as d:
        d.daemon.reload()
        assert d.daemon.pipeline.reviewer.resample == "bicubic"


async def test_a_sighup_while_the_journal_opens_reaches_the_pipeline_and_storage(
    tmp_path, monkeypatch
):
    settings = instant_settings(tmp_path)
    new = instant_settings(
        tmp_path,
        pipeline={"max_backlog": 5},
        images={"max_bytes_mb": 1},
        storage={"min_free_mb": 1},
    )
    opened = Journal.open.__func__
    daemon = Daemon(settings, reload_settings=lambda: new)

    async def open_then_reload(cls, path):
        journal = await opened(cls, path)
        daemon.reload()  # the SIGHUP lands while the start awaits the journal
        return journal

    monkeypatch.setattr(Journal, "open", classmethod(open_then_reload))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await asyncio.wait_for(daemon.ready.wait(), 30)
        assert daemon.pipeline.backlog.max_backlog == 5
        assert daemon.pipeline.settings.images.max_bytes_mb == 1
        assert daemon.storage.settings.min_free_mb == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_reloaded_config_that_would_not_start_is_refused_naming_what_is_wrong(tmp_path):
    settings = instant_settings(tmp_path)
    new = instant_settings(tmp_path, mqtt={"format": "no-such-format"})
    async with run_daemon(settings, reload_settings=lambda: new) as d:
        with capture_logs() as logs:
            d.daemon.reload()
        assert d.daemon.settings.mqtt.format != "no-such-format"
    [refused] = [e for e in logs if e["event"].startswith("config not reloaded")]
    assert "no-such-format" in refused["error"]
    assert not [e for e in logs if e["event"].startswith("config reloaded")]


async def test_live_images_that_no_longer_fit_the_running_frigate_are_not_applied(tmp_path):
    settings = instant_settings(
        tmp_path,
        images={"url_hosts": ["frigate.lan"]},
        frigate={"api_url": "http://frigate.lan:5000"},
    )
    # valid on its own, but [frigate] waits for a restart while [images] would apply now:
    # every snapshot fetch from the running Frigate would be refused until then
    new = instant_settings(
        tmp_path,
        images={"url_hosts": ["nvr.lan"]},
        frigate={"api_url": "http://nvr.lan:5000"},
    )
    async with run_daemon(settings, reload_settings=lambda: new) as d:
        with capture_logs() as logs:
            d.daemon.reload()
        running = d.daemon.settings
    assert running.images.url_hosts == ["frigate.lan"]
    check_image_url("http://frigate.lan:5000/api/events/1/snapshot.jpg", running.images)
    [refused] = [e for e in logs if e["event"].startswith("config not reloaded")]
    assert "frigate" in refused["restart_needed_for"]


class ListedJournal:
    """The outbox's view of the journal: unpublished verdicts by id."""

    def __init__(self, ids: list[int]) -> None:
        self.rows = {i: OutboxItem(i, f"t/{i}", "{}") for i in ids}

    async def unpublished(self, limit: int = 100, after: int = 0) -> list[OutboxItem]:
        return [self.rows[i] for i in sorted(self.rows) if i > after][:limit]

    async def mark_published(self, ids) -> None:
        for i in ids:
            self.rows.pop(i, None)


class GatedBroker:
    """Refuses the verdicts named in `refuse`; holds PUBACKs while `gate` is closed."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.connected.set()
        self.refuse: set[int] = set()
        self.gate: asyncio.Event | None = None

    async def publish(self, topic: str, payload: str, *, retain: bool = False) -> None:
        ident = int(topic.split("/")[1])
        if self.gate is not None:
            await self.gate.wait()
        if ident in self.refuse:
            raise PublishRefused(f"not authorized: {topic}")


async def test_a_sighup_during_a_flush_offers_every_refused_verdict_again(monkeypatch):
    monkeypatch.setattr("daemon.outbox.BATCH", 2)
    journal, broker = ListedJournal([1, 2, 3, 4]), GatedBroker()
    outbox = Outbox(journal, broker, StageStats())
    broker.refuse = {1, 2}
    await outbox.flush()
    assert outbox.refused == {1, 2} and set(journal.rows) == {1, 2}
    # the broker's ACL is fixed for 1 and 2; meanwhile 5 and 6 come (6 still refused)
    journal.rows.update({5: OutboxItem(5, "t/5", "{}"), 6: OutboxItem(6, "t/6", "{}")})
    broker.refuse = {6}
    broker.gate = asyncio.Event()
    flushing = asyncio.create_task(outbox.flush())
    await asyncio.sleep(0.05)  # the flush waits for the PUBACKs of 5 and 6
    outbox.retry_refused()  # SIGHUP
    broker.gate.set()
    await flushing
    broker.gate = None
    await outbox.flush()  # what the wake-up runs
    assert set(journal.rows) == {6} and outbox.refused == {6}


def test_an_unreadable_rules_directory_is_named_in_the_log(tmp_path):
    book = RuleBook(tmp_path / "nowhere", {})
    with capture_logs() as logs:
        book.load()
    [line] = [e for e in logs if e["event"].startswith("rules directory unreadable")]
    assert line["path"] == str(tmp_path / "nowhere")


def test_a_fifo_in_the_rules_directory_is_refused_without_blocking(tmp_path):
    (tmp_path / "good.toml").write_text(
        'name = "g"\n[match]\nevent_types = ["x"]\n[review]\nprompt = "Is it real?"\n'
    )
    os.mkfifo(tmp_path / "pipe.toml")  # open() would wait for a writer: on the event loop
    kinds = Registry.collect(make_plugin_manager(), Settings()).rule_kinds
    book = RuleBook(tmp_path, kinds)
    done = threading.Event()
    errors = []
    threading.Thread(target=lambda: (errors.extend(book.load()), done.set()), daemon=True).start()
    assert done.wait(5), "loading the rules blocked on the FIFO"
    assert [r.name for r in book.rules] == ["g"]
    [error] = errors
    assert error.path.name == "pipe.toml" and "not a regular file" in str(error)


def test_a_sighup_held_at_the_start_acts_as_usual_for_a_command_other_than_run():
    code = (
        "import signal; from daemon import entry; signal.signal(signal.SIGHUP, entry.hold); "
        "entry.HELD.append(signal.SIGHUP); entry.release(); print('alive')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
    assert done.returncode == -signal.SIGHUP and b"alive" not in done.stdout
