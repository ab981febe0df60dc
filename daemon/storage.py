"""Keeps the journal's disk in bounds: prunes on a schedule, pauses intake when space runs out.

A full disk must not become a crash loop: while free space is under `[storage] min_free_mb`,
or after the journal failed to write, the pipeline takes no alerts (HTTP answers 503, MQTT
leaves them with the broker); the next check that finds space opens intake again.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from datetime import UTC, datetime, timedelta

import structlog

from daemon.config import StorageSettings
from daemon.contract import utc_now
from daemon.journal import Journal, Pruned
from daemon.pipeline import Pipeline
from daemon.waiting import wait_event

log = structlog.get_logger(__name__)


def days_before(now: datetime, days: float) -> datetime:
    """`days` before `now`; the earliest time there is when that is further back (a max age
    of a million days means "keep everything")."""
    try:
        return now - timedelta(days=days)
    except OverflowError:
        return datetime.min.replace(tzinfo=UTC)


def free_mb(settings: StorageSettings) -> float:
    return shutil.disk_usage(settings.dir).free / 2**20


class StorageKeeper:
    #: the [storage] keys that SIGHUP changes at once (`dir` needs a restart)
    LIVE_KEYS = (
        "snapshot_max_age_days",
        "snapshot_max_mb",
        "journal_max_age_days",
        "prune_interval_s",
        "min_free_mb",
        "check_interval_s",
    )

    def __init__(
        self,
        settings: StorageSettings,
        journal: Journal,
        pipeline: Pipeline,
        *,
        publishes: bool = True,
    ) -> None:
        self._settings = settings
        #: whether an outbox publishes verdicts: alerts wait for it before they are pruned
        self.publishes = publishes
        #: set by a reload: the checks' loop takes the new intervals at once
        self._reloaded = asyncio.Event()
        self.journal = journal
        self.pipeline = pipeline
        self.last_pruned: Pruned | None = None

    @property
    def settings(self) -> StorageSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: StorageSettings) -> None:
        self._settings = settings
        self._reloaded.set()

    def check_space(self) -> None:
        """Pause intake while free space is short; open it again once it is back."""
        s = self.settings
        free = free_mb(s)
        if free < s.min_free_mb:
            problem = f"only {free:.0f} MB free on {s.dir} (min_free_mb = {s.min_free_mb:g})"
            if self.pipeline.storage_problem != problem:
                log.error("disk nearly full; intake paused", free_mb=round(free), dir=str(s.dir))
            self.pipeline.storage_problem = problem
        elif self.pipeline.storage_problem is not None and free > s.min_free_mb:
            # strictly more: a write that failed on a full disk is not retried while none
            # is free (min_free_mb = 0 would open and close intake at every check)
            log.info("storage usable again; intake open", free_mb=round(free))
            self.pipeline.storage_problem = None

    async def prune(self) -> Pruned:
        s = self.settings
        now = utc_now()
        pruned = await self.journal.prune(
            snapshots_before=days_before(now, s.snapshot_max_age_days),
            alerts_before=days_before(now, s.journal_max_age_days),
            snapshot_max_bytes=int(s.snapshot_max_mb * 2**20),
            published_only=self.publishes,
        )
        self.last_pruned = pruned
        if pruned.alerts or pruned.snapshots:
            log.info(
                "journal pruned",
                alerts=pruned.alerts,
                snapshots=pruned.snapshots,
                snapshot_mb=round(pruned.snapshot_bytes / 2**20, 1),
            )
        return pruned

    async def run(self) -> None:
        """Check space every `check_interval_s`, prune every `prune_interval_s` (both read
        at each turn: a reload changes them). A prune runs beside the checks (a long one
        must not hold a pause that space no longer calls for), one at a time."""
        loop = asyncio.get_running_loop()
        last_prune: float | None = None
        pruning: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    self.check_space()
                except Exception:
                    log.exception("storage check failed")
                now = loop.time()
                due = last_prune is None or now >= last_prune + self.settings.prune_interval_s
                if due and (pruning is None or pruning.done()):
                    last_prune = now
                    pruning = asyncio.create_task(self._prune_logged())
                await wait_event(self._reloaded, self.settings.check_interval_s)
                self._reloaded.clear()
        finally:
            if pruning is not None:
                pruning.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pruning

    async def _prune_logged(self) -> None:
        try:
            await self.prune()
        except Exception:
            log.exception("journal prune failed")
