"""Judging one alert with one rule: cooldown, image preparation, the model, `on_error`."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import structlog
from pydantic_core import to_json

from daemon.config import ModelSettings
from daemon.contract import Alert, VerdictKind, parse_rfc3339
from daemon.images import Budget, ImageError, Resample
from daemon.journal import StoredAlert
from daemon.plugin_api import (
    MAX_NEW_TOKENS,
    Backend,
    BackendUnusable,
    ChoiceQuery,
    GenerateQuery,
    Judgement,
    ModelRequest,
    RecentReview,
    refuse_adapter,
)
from daemon.plugins import Registry, is_plugin_failure
from daemon.rules import Rule
from daemon.snapshots import SnapshotLoader, SnapshotSet
from daemon.stats import StageStats

log = structlog.get_logger(__name__)

#: model reviews kept per (rule, box, camera, event type) for cooldowns
RECENT_PER_KEY = 32
#: rule name and digest, box, camera, event type
RecentKey = tuple[str, str, str, str, str]
#: how often (in reviews kept) keys whose window has passed are dropped
SWEEP_EVERY = 256


class RecentReviews:
    """Recent model reviews per rule, box, camera and event type (in memory)."""

    def __init__(self) -> None:
        self._by_key: dict[RecentKey, deque[RecentReview]] = {}
        #: when each key's newest review leaves its rule's window
        self._expires: dict[RecentKey, float] = {}
        self._adds = 0

    @staticmethod
    def _key(rule: Rule, alert: Alert) -> RecentKey:
        # a camera id names a channel of its box: another box's cam-1 is another camera; an
        # edited rule (another digest) does not reuse what its earlier version judged
        return rule.name, rule.digest, alert.box_id, alert.camera_id, alert.event_type

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

    def _forget(self, key: RecentKey) -> None:
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
        """Each rule's judgement, in order; rules whose failure means `drop` are left out.
        The rules are judged side by side (their model calls share batches, and a slow
        rule, a shadow one under trial say, adds its own time only once)."""
        images = self.images_once(stored)

        async def judged_by(rule: Rule) -> Judgement | None:
            with structlog.contextvars.bound_contextvars(rule=rule.name):
                return await self.judge(stored.alert, rule, images)

        if len(rules) == 1:
            judgements = [await judged_by(rules[0])]
        else:
            tasks = [asyncio.create_task(judged_by(rule)) for rule in rules]
            try:
                judgements = await asyncio.gather(*tasks)
            except BaseException:  # cut off (a stop), cancelled: the others end with it
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        return [
            (rule, judgement)
            for rule, judgement in zip(rules, judgements, strict=True)
            if judgement is not None
        ]

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
        own = alert.model_copy(deep=True)  # what a plugin changes stays with this rule
        kind = self.registry.rule_kinds[rule.kind]
        try:
            if window > 0:
                recent = self.recent.within(rule, alert, window)
                reused = self.hooks.suppress_alert(alert=own, rule=rule, recent=recent)
                if reused is not None:
                    reused = checked_judgement(reused, "suppress_alert")
                    log.info("model call spared", reason=reused.reason)
                    return reused
            with self.stats.time("prepare"):
                snapshot_set = await images()
                pictures = await asyncio.get_running_loop().run_in_executor(
                    self.prep_pool, snapshot_set.for_rule, rule.image, rule.crop_margin
                )
            query = checked_query(kind.compose(own, rule), rule.kind)
            with self.stats.time("model"):
                adapter = str(rule.adapter) if rule.adapter else None
                request = ModelRequest(query, pictures, adapter)
                if not getattr(self.backend, "applies_adapters", False):
                    refuse_adapter(request, self.backend.model_name)
                answer = await self.backend.run(request)
            judgement = checked_judgement(kind.interpret(answer, rule), f"rule kind {rule.kind!r}")
            judgement = dataclasses.replace(judgement, prompt=query.prompt, raw=answer.raw())
        except BackendUnusable:
            raise  # not this alert's fault: it stays in the journal for the next run
        except BaseException as exc:
            if not is_plugin_failure(exc):
                raise
            log.error(
                "review failed",
                error=str(exc),
                error_type=type(exc).__name__,
                on_error=rule.on_error,
                kind=rule.kind,
                kind_module=type(kind).__module__,
                # a snapshot that cannot be used is the alert's doing, told in the error: the
                # traceback is for everything else (a plugin's bug, the model's)
                exc_info=None if isinstance(exc, ImageError) else exc,
            )
            if rule.on_error == "drop":
                return None
            why = str(exc) or type(exc).__name__
            return Judgement(VerdictKind.UNREVIEWED, None, f"review failed: {why}")
        if window > 0:
            self.recent.add(rule, alert, judgement)
        return judgement


def checked_query(query: Any, kind: str) -> ChoiceQuery | GenerateQuery:
    """A rule kind's query, checked before it joins a batch (one bad query must not fail
    the other alerts of its batch)."""
    if not isinstance(getattr(query, "prompt", None), str):
        raise TypeError(f"rule kind {kind!r} composed a query without a text prompt")
    if isinstance(query, GenerateQuery):
        limit = query.max_new_tokens
        if limit is not None and (type(limit) is not int or not 1 <= limit <= MAX_NEW_TOKENS):
            raise ValueError(
                f"rule kind {kind!r} asked for max_new_tokens={limit!r:.20}: a whole number "
                f"from 1 to {MAX_NEW_TOKENS}, or None"
            )
        if query.json_schema is not None and not isinstance(query.json_schema, Mapping):
            raise TypeError(f"rule kind {kind!r} composed a json_schema that is no mapping")
        return query
    if not isinstance(query, ChoiceQuery):
        raise TypeError(f"rule kind {kind!r} composed {type(query).__name__}, not a query")
    choices = query.choices
    if not choices or not all(
        isinstance(forms, list | tuple) and forms and all(isinstance(f, str) and f for f in forms)
        for forms in choices.values()
    ):
        raise ValueError(f"rule kind {kind!r} composed choices without answers: {choices!r:.80}")
    return query


def checked_judgement(judgement: Any, source: str) -> Judgement:
    """A plugin's judgement, checked against what a verdict may say (the contract): a
    verdict kind, a P(real) in 0..1 or none (always none when unreviewed), a reason of
    Unicode text, fields that are a JSON object."""
    if not isinstance(judgement, Judgement):
        raise TypeError(f"{source} returned {type(judgement).__name__}, not a Judgement")
    try:
        verdict = VerdictKind(judgement.verdict)
    except ValueError:
        raise ValueError(f"{source} returned the verdict {judgement.verdict!r:.40}") from None
    confidence = judgement.confidence
    if confidence is not None and (
        isinstance(confidence, bool)
        or not isinstance(confidence, int | float)
        or not 0 <= confidence <= 1  # NaN too
        or verdict is VerdictKind.UNREVIEWED
    ):
        raise ValueError(f"{source} returned the confidence {confidence!r:.40} for {verdict}")
    if not isinstance(judgement.reason, str):
        raise TypeError(f"{source} returned a reason of {type(judgement.reason).__name__}")
    try:
        judgement.reason.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{source} returned a reason holding a lone UTF-16 surrogate") from None
    if not isinstance(judgement.fields, Mapping):
        raise TypeError(f"{source} returned fields of {type(judgement.fields).__name__}")
    if not all(isinstance(key, str) for key in judgement.fields):
        raise TypeError(f"{source} returned fields whose names are not all text")
    try:
        to_json(judgement.fields)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source} returned fields that are no JSON: {exc}") from None
    return dataclasses.replace(judgement, verdict=verdict)
