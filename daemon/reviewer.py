"""Judging one alert with one rule: cooldown, image preparation, the model, `on_error`."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from daemon.config import ModelSettings
from daemon.contract import Alert, VerdictKind
from daemon.journal import StoredAlert
from daemon.plugin_api import Backend, Judgement, ModelRequest, RecentReview
from daemon.plugins import Registry
from daemon.rules import Rule
from daemon.snapshots import SnapshotLoader, SnapshotSet

log = structlog.get_logger(__name__)

#: model reviews kept per (rule, camera, event type) for cooldowns
RECENT_PER_KEY = 32


class RecentReviews:
    """Recent model reviews per rule, camera and event type (in memory)."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str, str], deque[RecentReview]] = {}

    @staticmethod
    def _key(rule: Rule, alert: Alert) -> tuple[str, str, str]:
        return rule.name, alert.camera_id, alert.event_type

    def within(self, rule: Rule, alert: Alert, window_s: float) -> list[RecentReview]:
        """Those younger than `window_s`, newest first."""
        key = self._key(rule, alert)
        kept = self._by_key.get(key)
        if not kept:
            return []
        horizon = time.monotonic() - window_s
        while kept and kept[0].at < horizon:
            kept.popleft()
        if not kept:
            del self._by_key[key]
            return []
        return list(reversed(kept))

    def add(self, rule: Rule, alert: Alert, judgement: Judgement) -> None:
        boxes = [(b.x1, b.y1, b.x2, b.y2) for b in alert.boxes]
        review = RecentReview(alert.alert_id, boxes, judgement, time.monotonic())
        self._by_key.setdefault(self._key(rule, alert), deque(maxlen=RECENT_PER_KEY)).append(review)


class Reviewer:
    def __init__(
        self,
        *,
        registry: Registry,
        backend: Backend,
        hooks: Any,
        snapshots: SnapshotLoader,
        model: ModelSettings,
    ) -> None:
        self.registry = registry
        self.backend = backend
        self.hooks = hooks
        self.snapshots = snapshots
        self.model = model
        self.recent = RecentReviews()

    async def judge_all(
        self, stored: StoredAlert, rules: list[Rule]
    ) -> list[tuple[Rule, Judgement]]:
        """Each rule's judgement, in order; rules whose failure means `drop` are left out."""
        images = self._images_once(stored)
        judged = []
        for rule in rules:
            with structlog.contextvars.bound_contextvars(rule=rule.name):
                judgement = await self.judge(stored.alert, rule, images)
            if judgement is not None:
                judged.append((rule, judgement))
        return judged

    def _images_once(self, stored: StoredAlert) -> Callable[[], Awaitable[SnapshotSet]]:
        """Collect (and fetch) the alert's snapshots at most once, on first need."""
        task: asyncio.Task[SnapshotSet] | None = None

        async def load() -> SnapshotSet:
            raw = await self.snapshots.collect(stored.images, stored.alert.image_url)
            boxes = [(b.x1, b.y1, b.x2, b.y2) for b in stored.alert.boxes]
            return SnapshotSet(
                raw, boxes, max_pixels=self.model.image_max_pixels, factor=self.backend.image_factor
            )

        def get() -> Awaitable[SnapshotSet]:
            nonlocal task
            if task is None:
                task = asyncio.ensure_future(load())
            return asyncio.shield(task)

        return get

    async def judge(
        self, alert: Alert, rule: Rule, images: Callable[[], Awaitable[SnapshotSet]]
    ) -> Judgement | None:
        """The rule's judgement, a repeat's reused one, or the `on_error` outcome (None: drop)."""
        window = rule.cooldown.window_s
        if window > 0:
            recent = self.recent.within(rule, alert, window)
            reused = self.hooks.suppress_alert(alert=alert, rule=rule, recent=recent)
            if reused is not None:
                log.info("model call spared", reason=reused.reason)
                return reused
        kind = self.registry.rule_kinds[rule.kind]
        try:
            snapshot_set = await images()
            pictures = await asyncio.to_thread(snapshot_set.for_rule, rule.image, rule.crop_margin)
            answer = await self.backend.run(ModelRequest(kind.compose(alert, rule), pictures))
            judgement = kind.interpret(answer, rule)
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
