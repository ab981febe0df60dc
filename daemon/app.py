"""The daemon: startup order, the task group, readiness, staged shutdown, signals.

Start: plugins -> journal -> rules -> HTTP + MQTT (alerts are journalled, with their rules'
priority, while the model loads) -> model -> rules checked against its tokenizer -> review
workers -> READY=1 once subscribed.
Stop: STOPPING=1 -> close HTTP and MQTT intake (unacknowledged MQTT alerts are redelivered
by the broker later) -> let in-flight reviews finish within a grace period -> publish what
the outbox holds -> retained `offline` -> disconnect. Anything cut short stays journalled
and is resumed at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import resource
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from daemon import feedback
from daemon.config import Settings, looks_local
from daemon.console_api import ConsoleApi
from daemon.credentials import CredentialError, read_tokens
from daemon.http_api import BearerTokens, HttpApi
from daemon.journal import Journal, JournalError, lock_journal
from daemon.logs import configure_logging
from daemon.mqtt import MqttLink
from daemon.outbox import Outbox
from daemon.pipeline import Pipeline
from daemon.plugin_api import AlertError, BackendUnusable
from daemon.plugins import Registry, make_plugin_manager
from daemon.rules import RuleBook
from daemon.rules_saved import SAVED_RULES_FILE, SavedRules
from daemon.rules_watch import watch_rules
from daemon.sdnotify import notify
from daemon.stats import StageStats
from daemon.storage import StorageKeeper
from daemon.templates import check_topic_template
from daemon.watchdog import feed_watchdog, watchdog_interval_s, worker_problem

log = structlog.get_logger(__name__)

JOURNAL_FILE = "journal.sqlite3"
#: while the journal cannot take an MQTT alert, it is retried this often (unacknowledged)
BUSY_RETRY_S = 1.0
#: an MQTT message whose intake fails this many times with an unforeseen error is refused
#: (recorded and acknowledged), else the broker would deliver it, and block the messages
#: behind it, for ever
INTAKE_ATTEMPTS = 3
#: messages whose failed intakes are counted, at most
INTAKE_FAILURES_KEPT = 256
#: at a stop, how long the verdicts still in the outbox may take to be acknowledged
FINAL_FLUSH_S = 10.0
#: READY waits this long at most for the broker's subscription: a broker down at boot must
#: not hold the start (systemd would kill it at TimeoutStartSec); MQTT comes in once it connects
MQTT_READY_WAIT_S = 30.0
#: how often the backend's health is looked at for a fatal failure
BACKEND_CHECK_S = 1.0
#: name prefixes of the threads a backend runs the model on
MODEL_THREADS = ("model", "collate")
#: open files (sockets included) the daemon raises its soft limit to, within the hard limit:
#: systemd's default soft limit of 1024 is a few hundred slow HTTP clients
OPEN_FILES = 65536
#: settings that SIGHUP applies at once; the others take effect at the next start
LIVE_SECTIONS = ("log", "images")
LIVE_KEYS = {"pipeline": ("max_backlog",), "storage": StorageKeeper.LIVE_KEYS}


class IntakeDeferred(Exception):
    """An MQTT alert not taken before shutdown: it stays unacknowledged with the broker."""


class StartupError(Exception):
    """A setting that names something that does not exist (format, backend ...)."""


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        extra_plugins: Iterable[object] = (),
        reload_settings: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        #: reads the config file again (SIGHUP); None: only the rules are reloaded
        self.reload_settings = reload_settings
        self.pm = make_plugin_manager(extra_plugins, settings.plugins.dir)
        self.registry = Registry.collect(self.pm, settings)
        _check_settings(settings, self.registry)
        self.rules = RuleBook(
            settings.rules.dir,
            self.registry.rule_kinds,
            saved=SavedRules(settings.storage.dir / SAVED_RULES_FILE),
            check_topic=settings.mqtt.echo_of,  # [mqtt] changes only at a restart
        )
        self.backend = self.registry.backends[settings.model.backend](settings.model)
        self.ready = asyncio.Event()
        #: the model is loaded (rules are checked against its tokenizer from then on)
        self.model_started = False
        self.stats = StageStats()
        self.stopping = False
        self.journal: Journal | None = None
        self.pipeline: Pipeline | None = None
        self.link: MqttLink | None = None
        self.outbox: Outbox | None = None
        self.storage: StorageKeeper | None = None
        self.api: HttpApi | None = None
        #: why the backend became unusable (the daemon then exits non-zero)
        self.fatal: str | None = None
        #: failed intakes per MQTT message (by digest of topic and payload)
        self._intake_failures: dict[bytes, int] = {}
        #: the journal's lock (a descriptor), held from the start to the end
        self._journal_lock: int | None = None

    def reload_rules(self) -> None:
        """Read the rules directory again; a failure keeps the rules in force (never raises:
        the watcher and SIGHUP call this)."""
        try:
            errors = self.rules.load()
        except Exception:
            log.exception("rules not reloaded; the rules in force stay")
            self.stats.count("rule_reload_errors")
            return
        self.stats.count("rule_reload_errors", len(errors))
        log.info("rules reloaded", rules=len(self.rules.rules), errors=len(errors))

    def reload(self) -> None:
        """SIGHUP: the rules, the credential files, and the config file's settings that can
        change live."""
        self.reload_rules()
        self.reread_credentials()
        if self.outbox is not None:
            self.outbox.retry_refused()
        if self.reload_settings is None:
            return
        try:
            new = self.reload_settings()
            # a file that would not start (an unknown format or backend) is no better now
            _check_settings(new, self.registry)
        except Exception as exc:
            log.error("config not reloaded; the running settings stay", error=str(exc))
            return
        merged, later = self._merged(new)
        if problems := _restart_problems(new, later):
            # the file is refused whole, as one that would not start at all: said now, not
            # at the next restart (which would fail, and under systemd loop)
            log.error(
                "config not reloaded: this file would stop the next start, fix it; the "
                "running settings stay",
                error="; ".join(problems),
                restart_needed_for=later,
            )
            return
        try:
            # the new live sections beside the running ones that wait for a restart
            Settings.model_validate(merged.model_dump())
        except ValidationError as exc:
            log.error(
                "config not reloaded: its live settings do not fit the running ones that "
                "wait for a restart (restart to apply it whole); the running settings stay",
                error=str(exc),
                restart_needed_for=later,
            )
            return
        self._apply(merged, later)

    def reread_credentials(self) -> None:
        """New HTTP tokens apply at once; the MQTT password and TLS files from the next
        connection. A file that cannot be used keeps what is in force."""
        http = self.settings.http
        if self.api is not None and self.api.tokens is not None and http.tokens_file is not None:
            try:
                tokens = read_tokens(http.tokens_file)
            except CredentialError as exc:
                log.error("http tokens not re-read; the tokens in force stay", error=str(exc))
            else:
                self.api.tokens.replace(tokens)
                log.info("http tokens re-read", tokens=len(tokens))
        if self.link is not None:
            self.link.reread_credentials()
        reread = getattr(self.backend, "reread_credentials", None)
        if reread is not None:
            reread()

    def _merged(self, new: Settings) -> tuple[Settings, list[str]]:
        """The running settings with `new`'s live ones; and the sections that changed but
        wait for a restart."""
        old = self.settings
        later = [
            name
            for name in Settings.model_fields
            if name not in LIVE_SECTIONS
            and _without(getattr(old, name), LIVE_KEYS.get(name, ()))
            != _without(getattr(new, name), LIVE_KEYS.get(name, ()))
        ]
        updates: dict[str, Any] = {section: getattr(new, section) for section in LIVE_SECTIONS}
        for section, keys in LIVE_KEYS.items():
            values = {key: getattr(getattr(new, section), key) for key in keys}
            updates[section] = getattr(old, section).model_copy(update=values)
        return old.model_copy(update=updates), later

    def _apply(self, settings: Settings, later: list[str]) -> None:
        self.settings = settings
        configure_logging(settings.log)
        if self.pipeline is not None:
            self.pipeline.apply_settings(settings)
        if self.storage is not None:
            self.storage.settings = settings.storage
        if later:
            log.warning(
                "config reloaded; changes to some sections wait for a restart",
                restart_needed_for=later,
            )
        else:
            log.info("config reloaded", restart_needed_for=later)

    def status(self) -> tuple[str, str | None]:
        """ok, starting, failing or stopping; and what makes it fail (see `unfit`)."""
        problem = self.unfit()
        if self.stopping:
            return "stopping", problem
        if not self.ready.is_set():
            return "starting", problem
        return ("failing" if problem else "ok"), problem

    async def health(self) -> dict[str, Any]:
        status, problem = self.status()
        mqtt = "disabled"
        if self.link is not None:
            mqtt = "connected" if self.link.connected.is_set() else "disconnected"
        return {
            "status": status,
            "model": self.backend.model_name,
            "mqtt": mqtt,
            # filters the broker refused (its access list): nothing arrives on them
            "subscriptions_refused": dict(self.link.refused) if self.link is not None else {},
            "rules": [rule.name for rule in self.rules.rules],
            "rule_errors": [str(error) for error in self.rules.errors],
            "queued": self.pipeline.backlog.queued if self.pipeline else 0,
            "backlog": self.pipeline.backlog.pending if self.pipeline else 0,
            "intake": (self.pipeline.busy_reason() if self.pipeline else None) or "open",
            "model_worker": getattr(self.backend, "health", dict)(),
            "unpublished": await self.count_unpublished(),
            "publish_refused": len(self.outbox.refused) if self.outbox else 0,
            "fatal": self.fatal,
            "problem": problem,
        }

    async def count_unpublished(self) -> int:
        """Verdicts waiting for the broker (without MQTT none wait: nothing is published)."""
        if self.journal is None or self.outbox is None:
            return 0
        return await self.journal.count_unpublished()

    async def open(self) -> Pipeline:
        """Open the journal, read the rules (alerts taken in while the model loads are matched
        against them for their priority) and wire the pipeline; no network, no model yet."""
        s = self.settings
        if s.mqtt.enabled:
            # first: unreadable credentials stop the start before the journal is open
            self.link = MqttLink(s.mqtt, on_message=self._mqtt_alert)
        self.journal = journal = await self._open_journal(s.storage.dir / JOURNAL_FILE)
        self.rules.load()
        s = self.settings  # a SIGHUP while the journal opened may have changed live settings
        if self.link is not None:
            self.link.on_feedback = self._mqtt_feedback
            self.outbox = Outbox(journal, self.link, self.stats)
            self.link.on_connected = self.outbox.wake
        journal.publishes = self.outbox is not None
        self.pipeline = Pipeline(
            settings=s,
            journal=journal,
            rules=self.rules,
            registry=self.registry,
            backend=self.backend,
            hooks=self.pm.hook,
            on_verdicts=self.outbox.wake if self.outbox else lambda: None,
            stats=self.stats,
        )
        if self.link is not None:
            self.link.intake_gate = self.pipeline.wait_for_intake
        self.storage = StorageKeeper(
            s.storage, journal, self.pipeline, publishes=self.outbox is not None
        )
        return self.pipeline

    async def _open_journal(self, path: Path) -> Journal:
        """The journal, locked to this daemon; StartupError saying why it cannot be used."""
        try:
            if self._journal_lock is None:
                self._journal_lock = await asyncio.to_thread(lock_journal, path)
            return await Journal.open(path)
        except JournalError as exc:
            raise StartupError(str(exc)) from exc
        except (sqlite3.Error, OSError) as exc:
            raise StartupError(f"the journal {path} cannot be opened: {exc}{_hint(exc)}") from exc

    async def start_model(self) -> None:
        """Load the model, then read the rules again, checked against its tokenizer."""
        await self.backend.start()
        self.model_started = True
        self.rules.check_choices = getattr(self.backend, "check_choices", None)
        self.rules.final = True
        self.rules.load(recheck=True)

    async def close(self) -> None:
        if self.pipeline is not None:
            await self.pipeline.close()
        await self.backend.close()
        if self.journal is not None:
            await self.journal.close()
        if self._journal_lock is not None:
            os.close(self._journal_lock)
            self._journal_lock = None

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then shut down in stages."""
        s = self.settings

        def on_fatal(reason: str) -> None:
            self.fatal = reason
            log.critical("the backend is unusable: stopping so that systemd restarts us")
            stop.set()

        api = None
        try:
            pipeline = await self.open()
            assert self.storage is not None
            # before intake starts, or an alert arriving now would be queued twice
            await pipeline.requeue_pending()
            self.storage.check_space()
            pipeline.on_fatal = on_fatal
            async with asyncio.TaskGroup() as tg:
                if s.http.enabled:
                    api = self.api = await self._start_http(pipeline)
                background = [tg.create_task(self.storage.run())]
                if (interval := watchdog_interval_s()) is not None:
                    background.append(tg.create_task(feed_watchdog(interval, self.unfit)))
                if self.link is not None and self.outbox is not None:
                    background += [
                        tg.create_task(self.link.run()),
                        tg.create_task(self.outbox.run()),
                    ]
                notify("STATUS=loading model")
                log.info("loading model", backend=s.model.backend, model=s.model.path)
                # a stop while the model loads does not wait for it (a loading thread left
                # behind is not waited for either: see _leave_stuck_threads)
                loading = asyncio.create_task(self.start_model())
                await _first(loading, stop.wait())
                if loading.done() and not loading.cancelled():
                    loading.result()  # a load that failed stops the start
                if not stop.is_set():
                    background.append(tg.create_task(self._watch_backend(pipeline)))
                    background.append(tg.create_task(watch_rules(s.rules.dir, self.reload_rules)))
                    background += [
                        tg.create_task(pipeline.run_worker()) for _ in range(s.pipeline.workers)
                    ]
                if self.link is not None and not stop.is_set():
                    subscribed = self.link.subscribed
                    await _first(subscribed.wait(), stop.wait(), asyncio.sleep(MQTT_READY_WAIT_S))
                    if not subscribed.is_set() and not stop.is_set():
                        log.warning(
                            "the MQTT broker is not reachable yet: ready for HTTP alerts, MQTT "
                            "alerts come in once it connects",
                            waited_s=MQTT_READY_WAIT_S,
                        )
                if not stop.is_set():
                    self.ready.set()
                    notify("READY=1\nSTATUS=reviewing alerts")
                    log.info("ready", rules=len(self.rules.rules), model=self.backend.model_name)
                await stop.wait()
                await self._shutdown(api, pipeline)
                for task in background:
                    task.cancel()
        finally:
            if api is not None:
                await api.stop()
            await self.close()
            log.info("stopped")
        if self.fatal is not None:
            raise BackendUnusable(self.fatal)

    async def _start_http(self, pipeline: Pipeline) -> HttpApi:
        s = self.settings.http
        tokens = BearerTokens(read_tokens(s.tokens_file)) if s.tokens_file else None
        api = HttpApi(
            pipeline,
            self.health,
            max_body_bytes=int(s.max_body_mb * 1024 * 1024),
            tokens=tokens,
        )
        api.add_routes(ConsoleApi(self).routes())
        try:
            await api.start(s.host, s.port)
        except OSError as exc:
            await api.stop()
            raise StartupError(
                f"[http] listen = {s.listen!r}: cannot listen there: {exc.strerror or exc}"
            ) from exc
        return api

    async def _watch_backend(self, pipeline: Pipeline) -> None:
        """A backend that became unusable while no review needed it (its model process
        ended while idle) stops the daemon too, as a review that met it would."""
        while True:
            await asyncio.sleep(BACKEND_CHECK_S)
            fatal = getattr(self.backend, "health", dict)().get("fatal")
            if fatal:
                pipeline.backend_unusable(str(fatal))
                return

    def unfit(self) -> str | None:
        """Why the watchdog must not be fed now, or None."""
        if self.fatal is not None:
            return self.fatal
        report = getattr(self.backend, "health", dict)()
        return worker_problem(report, self.settings.model.stall_timeout_s)

    async def _mqtt_feedback(self, topic: str, payload: bytes) -> None:
        """Store feedback from the MQTT feedback topic; refusals are logged, never fatal.
        While the journal cannot write, the message is held (unacknowledged) and tried
        again, as an alert is."""
        try:
            await self._record_feedback(feedback.parse_feedback(payload))
        except feedback.FeedbackError as exc:
            log.warning("feedback refused", topic=topic, error=str(exc), field=exc.field)
        except IntakeDeferred:
            raise
        except Exception:
            # a bug: this message is dropped (acknowledged), not delivered again for ever
            # ahead of the alerts
            log.exception("feedback refused: it could not be handled", topic=topic)

    async def _record_feedback(self, said: feedback.Feedback) -> None:
        """Journal MQTT feedback, trying again every BUSY_RETRY_S while the journal cannot
        write (IntakeDeferred at shutdown)."""
        assert self.journal is not None
        failed = False
        while True:
            try:
                await feedback.record(
                    self.journal,
                    said,
                    alert_id=feedback.alert_id_of(said),
                    box_id=said.box_id,
                    source="mqtt",
                    stats=self.stats,
                    rules=self.rules,
                )
                return
            except sqlite3.Error as exc:
                if not failed:
                    log.error("feedback held: the journal cannot write", error=str(exc))
                failed = True
            if self.stopping:
                raise IntakeDeferred("feedback not journalled before shutdown")
            await asyncio.sleep(BUSY_RETRY_S)

    async def _mqtt_alert(self, topic: str, payload: bytes, fmt: str) -> None:
        """Ingest one MQTT alert; while the journal cannot take it, hold it (unacknowledged)
        and try again."""
        assert self.pipeline is not None
        limit = int(self.settings.mqtt.max_payload_mb * 1024 * 1024)
        if len(payload) > limit:
            over = AlertError(
                "payload",
                f"{len(payload)} bytes, over the limit of {limit} ([mqtt] max_payload_mb)",
            )
            await self.pipeline.refuse(over, payload, source="mqtt", topic=topic)
            return
        parsed = None  # once parsed, never again: formats may keep state
        while True:
            try:
                result = await self.pipeline.ingest(
                    payload, source="mqtt", topic=topic, fmt=fmt, parsed=parsed
                )
            except Exception as exc:
                if not await self._refused_after_failures(topic, payload, exc):
                    raise  # unacknowledged: the broker delivers it again
                return
            parsed = result.incoming or parsed
            if result.status != "busy":
                return
            if self.stopping:
                raise IntakeDeferred(f"not journalled before shutdown: {result.busy_reason}")
            await asyncio.sleep(BUSY_RETRY_S)

    async def _refused_after_failures(self, topic: str, payload: bytes, exc: Exception) -> bool:
        """Count an unforeseen intake failure of a message; at INTAKE_ATTEMPTS it is refused
        (True), and the messages behind it go on."""
        key = hashlib.sha256(topic.encode(errors="surrogateescape") + b"\0" + payload).digest()
        failures = self._intake_failures.pop(key, 0) + 1
        if failures < INTAKE_ATTEMPTS:
            self._intake_failures[key] = failures
            while len(self._intake_failures) > INTAKE_FAILURES_KEPT:
                self._intake_failures.pop(next(iter(self._intake_failures)))
            return False
        assert self.pipeline is not None
        error = AlertError("payload", f"intake failed {failures} times: {exc!r:.300}")
        await self.pipeline.refuse(error, payload, source="mqtt", topic=topic)
        return True

    async def _shutdown(self, api: HttpApi | None, pipeline: Pipeline) -> None:
        self.stopping = True
        notify("STOPPING=1")
        log.info("stopping: intake closed, finishing in-flight reviews")
        if self.link is not None:
            # first: an MQTT alert deferred by the stop is left to the next session, not
            # taken for a failed intake (which would drop the connection) while HTTP stops
            self.link.close_intake()
        if api is not None:
            await api.stop()
        if not await pipeline.drain(self.settings.pipeline.stop_grace_s):
            log.warning("reviews still running at the deadline; they resume at next start")
        if self.outbox is not None and self.link is not None and self.link.connected.is_set():
            try:
                async with asyncio.timeout(FINAL_FLUSH_S):
                    await self.outbox.flush()
            except TimeoutError:
                log.warning("verdicts not all published before the stop; sent at next start")
            await self.link.announce_offline()


def _hint(exc: Exception) -> str:
    """What to look at, for the journal errors people meet."""
    text = str(exc)
    if "disk I/O error" in text or "disk is full" in text:
        return " (is its disk full, or failing?)"
    if "not a database" in text or "malformed" in text:
        return (
            " (the file is damaged: move it aside, with its -wal and -shm files, to start "
            "afresh; sqlite3's .recover may save its rows)"
        )
    if "unable to open" in text or isinstance(exc, PermissionError):
        return " (does its directory exist, and may the daemon's user write there?)"
    return ""


async def _first(*aws: Any) -> None:
    """Wait until the first of several awaitables finishes; cancel the rest."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _check_settings(s: Settings, registry: Registry) -> None:
    """What the config's own validation cannot know: the plugins' names, topic templates."""
    for subscription in s.mqtt.all_subscriptions():
        if subscription.format not in registry.alert_formats:
            known = ", ".join(sorted(registry.alert_formats))
            raise StartupError(
                f"[mqtt] format {subscription.format!r} of {subscription.topic!r} is "
                f"unknown; known: {known}"
            )
    if s.model.backend not in registry.backends:
        known = ", ".join(sorted(registry.backends))
        raise StartupError(f"[model] backend {s.model.backend!r} is unknown; known: {known}")
    try:
        check_topic_template(s.mqtt.verdict_topic)
    except ValueError as exc:
        raise StartupError(f"[mqtt] verdict_topic: {exc}") from exc


def _restart_problems(s: Settings, later: list[str]) -> list[str]:
    """What in the sections that wait for a restart would stop it, as far as a cheap look
    tells: a journal folder that cannot be made or written, a model folder that is not there."""
    problems = []
    if "storage" in later and (reason := _not_writable(s.storage.dir)):
        problems.append(f"[storage] dir {s.storage.dir}: {reason}")
    path = s.model.path
    local = s.model.backend == "transformers" and looks_local(path)
    if "model" in later and local and not Path(path).is_dir():
        problems.append(f"[model] path {path!r}: no such directory")
    return problems


def _not_writable(folder: Path) -> str | None:
    """Why the daemon could not make or write `folder`, or None."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _without(section: Any, keys: Iterable[str]) -> Any:
    """A settings section minus some keys, for comparison."""
    return section.model_copy(update=dict.fromkeys(keys)) if keys else section


def run_daemon(
    settings: Settings,
    reload_settings: Callable[[], Settings] | None = None,
    early_hup: list[int] | None = None,
) -> None:
    """Run under asyncio with signal handling: TERM/INT stop (twice: at once), HUP reloads."""

    async def main() -> None:
        _raise_open_file_limit()
        stop = asyncio.Event()
        daemon = Daemon(settings, reload_settings=reload_settings)
        loop = asyncio.get_running_loop()

        def on_stop(signum: int) -> None:
            if stop.is_set():
                log.warning("second stop signal: exiting at once")
                os._exit(1)
            log.info("stop signal", signal=signal.Signals(signum).name)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_stop, signum)
        loop.add_signal_handler(signal.SIGHUP, daemon.reload)
        if early_hup:
            loop.call_soon(daemon.reload)  # a SIGHUP that came before the handler
        await daemon.run(stop)
        _leave_stuck_threads()

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main())
    finally:
        # the loop's handler is gone with the loop: a late SIGHUP must not kill the exit
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _raise_open_file_limit() -> None:
    """Raise the soft limit on open files towards OPEN_FILES (asyncio uses epoll: a high
    limit costs nothing)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _leave_stuck_threads() -> None:
    """Exit now if a model thread still runs (a pass that hangs on a stuck device): the
    interpreter would otherwise wait for it, past systemd's stop timeout. Everything is
    journalled, and the review resumes at the next start."""
    stuck = [t.name for t in threading.enumerate() if t.name.startswith(MODEL_THREADS)]
    if stuck:
        log.warning("exiting without waiting for stuck threads", threads=stuck)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
