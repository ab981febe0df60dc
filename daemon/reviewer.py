"""Judging one alert with one rule: cooldown, image preparation, the model, `on_error`."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import structlog

from daemon.config import ModelSettings
from daemon.contract import Alert, VerdictKind, parse_rfc3339
from daemon.images import Budget, Resample
from daemon.journal import StoredAlert
from daemon.plugin_api import Backend, BackendUnusable, Judgement, ModelRequest, RecentReview
from daemon.plugins import Registry
from daemon.rules import Rule
from daemon.snapshots import SnapshotLoader, SnapshotSet
from daemon.stats import StageStats

log = structlog.get_logger(__name__)

#: model reviews kept per (rule, box, camera, event type) for cooldowns
RECENT_PER_KEY = 32
#: how often (in reviews kept) keys whose window has passed are dropped
SWEEP_EVERY = 256


class RecentReviews:
    """Recent model reviews per rule, box, camera and event type (in memory)."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str, str, str], deque[RecentReview]] = {}
        #: when each key's newest review leaves its rule's window
        self._expires: dict[tuple[str, str, str, str], float] = {}
        self._adds = 0

    @staticmethod
    def _key(rule: Rule, alert: Alert) -> tuple[str, str, str, str]:
        # a camera id names a channel of its box: another box's cam-1 is another camera
        return rule.name, alert.box_id, alert.camera_id, alert.event_type

    def within(self, rule: Rule, alert: Alert, window_s: float) -> list[RecentReview]:
        """Those younger than `window_s` whose alerts happened within `window_s` of this one
        (after a backlog, alerts an hour apart are reviewed seconds apart), newest first."""
        key = self._key(rule, alert)
        kept = self._by_key.get(key)
        if not kept:
            return []
        horizon = time.monotonic() - window_s
        while kept and kept[0].at < horizon:
            kept.popleft()
        if not kept:
            self._forget(key)
            return []
        occurred = parse_rfc3339(alert.occurred_at)
        return [
            review
            for review in reversed(kept)
            if abs((occurred - review.occurred_at).total_seconds()) <= window_s
        ]

    def add(self, rule: Rule, alert: Alert, judgement: Judgement) -> None:
        now = time.monotonic()
        boxes = [(b.x1, b.y1, b.x2, b.y2) for b in alert.boxes]
        key = self._key(rule, alert)
        self._by_key.setdefault(key, deque(maxlen=RECENT_PER_KEY)).append(
            RecentReview(alert.alert_id, boxes, judgement, now, parse_rfc3339(alert.occurred_at))
        )
        self._expires[key] = now + rule.cooldown.window_s
        self._adds += 1
        if self._adds % SWEEP_EVERY == 0:  # cameras that went quiet, renamed rules
            for stale in [k for k, expires in self._expires.items() if expires < now]:
                self._forget(stale)

    def __len__(self) -> int:
        return len(self._by_key)

    def _forget(self, key: tuple[str, str, str, str]) -> None:
        self._by_key.pop(key, None)
        self._expires.pop(key, None)


class Reviewer:
    def __init__(
        self,
        *,
        registry: Registry,
        backend: Backend,
        hooks: Any,
        snapshots: SnapshotLoader,
        model: ModelSettings,
        stats: StageStats,
        resample: Resample = "fast",
        prep_pool: Executor | None = None,
    ) -> None:
        self.registry = registry
        self.backend = backend
        self.hooks = hooks
        self.snapshots = snapshots
        self.model = model
        self.stats = stats
        self.resample = resample
        #: decoding and resizing (Pillow releases the GIL): one thread per core by default
        self.prep_pool = prep_pool or ThreadPoolExecutor(os.cpu_count(), "prepare")
        self.recent = RecentReviews()

    def close(self) -> None:
        self.prep_pool.shutdown(wait=False, cancel_futures=True)

    async def judge_all(
        self, stored: StoredAlert, rules: list[Rule]
    ) -> list[tuple[Rule, Judgement]]:
        """Each rule's judgement, in order; rules whose failure means `drop` are left out."""
        images = self.images_once(stored)
        judged = []
        for rule in rules:
            with structlog.contextvars.bound_contextvars(rule=rule.name):
                judgement = await self.judge(stored.alert, rule, images)
            if judgement is not None:
                judged.append((rule, judgement))
        return judged

    def images_once(self, stored: StoredAlert) -> Callable[[], Awaitable[SnapshotSet]]:
        """Collect (and fetch) the alert's snapshots at most once, on first need."""
        task: asyncio.Task[SnapshotSet] | None = None

        async def load() -> SnapshotSet:
            raw = await self.snapshots.collect(stored.images, stored.alert.image_url)
            boxes = [(b.x1, b.y1, b.x2, b.y2) for b in stored.alert.boxes]
            budget = Budget(self.model.image_max_pixels, self.backend.image_factor, self.resample)
            return SnapshotSet(raw, boxes, budget)

        def get() -> Awaitable[SnapshotSet]:
            nonlocal task
            if task is None:
                task = asyncio.ensure_future(load())
            return asyncio.shield(task)

        return get

    async def judge(
        self,
        alert: Alert,
        rule: Rule,
        images: Callable[[], Awaitable[SnapshotSet]],
        *,
        cooldown: bool = True,
    ) -> Judgement | None:
        """The rule's judgement, a repeat's reused one, or the `on_error` outcome (None: drop).
        `cooldown=False` (the playground) neither reuses a verdict nor offers one for reuse."""
        window = rule.cooldown.window_s if cooldown else 0
        if window > 0:
            recent = self.recent.within(rule, alert, window)
            reused = self.hooks.suppress_alert(alert=alert, rule=rule, recent=recent)
            if reused is not None:
                log.info("model call spared", reason=reused.reason)
                return reused
        kind = self.registry.rule_kinds[rule.kind]
        try:
            with self.stats.time("prepare"):
                snapshot_set = await images()
                pictures = await asyncio.get_running_loop().run_in_executor(
                    self.prep_pool, snapshot_set.for_rule, rule.image, rule.crop_margin
                )
            query = kind.compose(alert, rule)
            with self.stats.time("model"):
                adapter = str(rule.adapter) if rule.adapter else None
                answer = await self.backend.run(ModelRequest(query, pictures, adapter))
            judgement = kind.interpret(answer, rule)
            judgement = dataclasses.replace(judgement, prompt=query.prompt, raw=answer.raw())
        except BackendUnusable:
            raise  # not this alert's fault: it stays in the journal for the next run
        except Exception as exc:
            log.error(
                "review failed",
                error=str(exc),
                error_type=type(exc).__name__,
                on_error=rule.on_error,
            )
            if rule.on_error == "drop":
                return None
            return Judgement(VerdictKind.UNREVIEWED, None, f"review failed: {exc}")
        if window > 0:
            self.recent.add(rule, alert, judgement)
        return judgement
