"""Per alert: parse -> journal -> match -> prepare -> infer -> interpret -> journal verdicts.

Publishing is the outbox's job: every verdict goes out from the journal, so one code path
serves fresh verdicts, reconnects and restarts alike.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import structlog

from daemon.config import Settings
from daemon.contract import Alert, Verdict, VerdictKind, utc_now
from daemon.journal import Journal, PlannedVerdict, StoredAlert
from daemon.plugin_api import AlertError, Backend, IncomingAlert, Judgement
from daemon.plugins import Registry
from daemon.reviewer import Reviewer
from daemon.rules import Rule, RuleBook
from daemon.snapshots import SnapshotLoader, check_image_url, check_raw_image
from daemon.stats import StageStats
from daemon.templates import check_topic_template, render_topic

log = structlog.get_logger(__name__)

#: alerts kept in memory between intake and review; older ones are read from the journal
FRESH_IN_MEMORY = 256


@dataclass(frozen=True)
class IngestResult:
    #: consumed: the payload carried no alert of its own (see AlertFormat.parse)
    status: Literal["accepted", "duplicate", "refused", "consumed"]
    alert: Alert | None = None
    error: AlertError | None = None


class Pipeline:
    def __init__(
        self,
        *,
        settings: Settings,
        journal: Journal,
        rules: RuleBook,
        registry: Registry,
        backend: Backend,
        hooks: Any,
        on_verdicts: Callable[[], None] = lambda: None,
        stats: StageStats | None = None,
    ) -> None:
        self.settings = settings
        self.journal = journal
        self.rules = rules
        self.registry = registry
        self.backend = backend
        self.hooks = hooks
        self.on_verdicts = on_verdicts
        self.stats = stats or StageStats()
        self.snapshots = SnapshotLoader(settings.images)
        self.reviewer = Reviewer(
            registry=registry,
            backend=backend,
            hooks=hooks,
            snapshots=self.snapshots,
            model=settings.model,
            stats=self.stats,
            resample=settings.images.resample,
        )
        self.verdict_topic = check_topic_template(settings.mqtt.verdict_topic)
        self.queue: asyncio.Queue[int] = asyncio.Queue()
        #: alerts just journalled, by row id, so that their review need not read them back
        self._fresh: OrderedDict[int, StoredAlert] = OrderedDict()
        #: row ids queued or under review in this process
        self._scheduled: set[int] = set()
        self._closed = False
        self._busy = 0
        self._quiet = asyncio.Event()
        self._quiet.set()

    async def ingest(
        self, payload: bytes, *, source: str, topic: str | None = None, fmt: str | None = None
    ) -> IngestResult:
        """Parse, check and journal one payload; queue it for review if it is new.

        A refused payload is logged and recorded with the field at fault.
        """
        format_name = fmt or self.settings.mqtt.format
        try:
            with self.stats.time("parse"):
                incoming = self._parse(payload, topic, format_name)
        except AlertError as exc:
            log.error(
                "alert refused", source=source, topic=topic, field=exc.field, error=exc.message
            )
            await self.journal.record_reject(
                source=source, topic=topic, field=exc.field, error=exc.message, payload=payload
            )
            return IngestResult("refused", error=exc)
        if incoming is None:
            return IngestResult("consumed")
        alert = incoming.alert
        received_at = utc_now()
        with self.stats.time("journal_alert"):
            recorded = await self.journal.record_alert(
                alert, incoming.images, source=source, topic=topic, received_at=received_at
            )
        ref = recorded.ref
        if not recorded.new:
            if not recorded.reviewed and ref not in self._scheduled:
                # the first delivery was journalled but its intake cut short: review it now
                log.info("resend of an unreviewed alert: reviewing it", alert_id=alert.alert_id)
                self._schedule(ref)
            else:
                log.info("duplicate alert ignored", alert_id=alert.alert_id, box_id=alert.box_id)
            return IngestResult("duplicate", alert)
        log.info(
            "alert received",
            alert_id=alert.alert_id,
            box_id=alert.box_id,
            event_type=alert.event_type,
            source=source,
        )
        # hand the alert to its review in memory; the journal copy is for restarts
        self._fresh[ref] = StoredAlert(
            ref, alert, list(incoming.images), received_at, 0, "received"
        )
        while len(self._fresh) > FRESH_IN_MEMORY:
            self._fresh.popitem(last=False)
        self._schedule(ref)
        return IngestResult("accepted", alert)

    def _schedule(self, ref: int) -> None:
        self._scheduled.add(ref)
        self.queue.put_nowait(ref)

    def _parse(self, payload: bytes, topic: str | None, format_name: str) -> IncomingAlert | None:
        """The alert in a payload, its snapshots checked from their headers."""
        parser = self.registry.alert_formats.get(format_name)
        if parser is None:
            raise AlertError("format", f"unknown alert format {format_name!r}")
        incoming = parser.parse(payload, topic=topic)
        if incoming is None:
            return None
        for image in incoming.images:
            check_raw_image(image, self.settings.images)
        if incoming.alert.image_url and not incoming.images:
            check_image_url(incoming.alert.image_url, self.settings.images)
        return incoming

    async def close(self) -> None:
        await self.snapshots.close()
        self.reviewer.close()

    async def requeue_pending(self) -> int:
        """Queue alerts journalled but never reviewed (a crash or stop interrupted them)."""
        pending = await self.journal.pending_reviews()
        for ref in pending:
            self._schedule(ref)
        if pending:
            log.info("resuming interrupted reviews", count=len(pending))
        return len(pending)

    async def run_worker(self) -> None:
        while not self._closed:
            ref = await self.queue.get()
            if self._closed:
                break
            self._busy += 1
            self._quiet.clear()
            try:
                await self.review(ref)
            except Exception:
                log.exception("review crashed; the alert stays in the journal", ref=ref)
            finally:
                self._scheduled.discard(ref)
                self._busy -= 1
                if self._busy == 0:
                    self._quiet.set()

    async def drain(self, grace_s: float) -> bool:
        """Start no more reviews; wait for those running. False if `grace_s` ran out first."""
        self._closed = True
        try:
            await asyncio.wait_for(self._quiet.wait(), grace_s)
        except TimeoutError:
            return False
        return True

    async def review(self, ref: int) -> list[PlannedVerdict]:
        """Review one journalled alert with every matching rule; journal the verdicts."""
        stored = self._fresh.pop(ref, None) or await self.journal.load_alert(ref)
        if stored.state == "reviewed":
            return []
        alert = stored.alert
        with structlog.contextvars.bound_contextvars(alert_id=alert.alert_id, box_id=alert.box_id):
            attempts = await self.journal.begin_review(ref)
            planned = await self._verdicts_for(stored, attempts)
            with self.stats.time("journal_verdict"):
                await self.journal.finish_review(ref, planned)
            for item in planned:
                log.info(
                    "verdict",
                    rule=item.verdict.rule,
                    verdict=item.verdict.verdict.value,
                    confidence=item.verdict.confidence,
                    latency_ms=item.verdict.latency_ms,
                )
            await self._announce(alert, planned)
        self.on_verdicts()
        return planned

    async def _verdicts_for(self, stored: StoredAlert, attempts: int) -> list[PlannedVerdict]:
        alert = stored.alert
        if attempts > self.settings.pipeline.max_attempts:
            reason = f"review interrupted {attempts - 1} times; giving up"
            return [self._plan(stored, None, Judgement(VerdictKind.UNREVIEWED, None, reason))]
        rules = self.rules.match(alert)
        if not rules:
            if self.settings.rules.unmatched == "drop":
                log.info("no rule matches; dropped by config")
                return []
            return [self._plan(stored, None, Judgement(VerdictKind.UNREVIEWED, None, "no rule"))]
        planned = [
            self._plan(stored, rule, judgement)
            for rule, judgement in await self.reviewer.judge_all(stored, rules)
        ]
        shadows = [rule.name for rule in rules if rule.shadow]
        if len(shadows) == len(rules):
            # rules under evaluation do not speak for the alert: it goes out unreviewed
            reason = f"only rules in shadow mode matched: {', '.join(shadows)}"
            forward = Judgement(VerdictKind.UNREVIEWED, None, reason)
            planned.append(self._plan(stored, None, forward))
        return planned

    def _plan(self, stored: StoredAlert, rule: Rule | None, judgement: Judgement) -> PlannedVerdict:
        alert = stored.alert
        reviewed_at = utc_now()
        verdict = Verdict(
            alert_id=alert.alert_id,
            box_id=alert.box_id,
            camera_id=alert.camera_id,
            event_type=alert.event_type,
            site=alert.site,
            occurred_at=alert.occurred_at,
            rule=rule.name if rule else None,
            verdict=judgement.verdict,
            confidence=judgement.confidence,
            reason=judgement.reason,
            fields=dict(judgement.fields),
            model=self.backend.model_name if rule else None,
            received_at=stored.received_at.isoformat(),
            reviewed_at=reviewed_at.isoformat(),
            latency_ms=_ms_between(stored.received_at, reviewed_at),
        )
        template = (rule.topic if rule else None) or self.verdict_topic
        topic = render_topic(template, alert, rule=verdict.rule, verdict=verdict.verdict.value)
        if rule is not None and rule.shadow:
            topic = f"{self.settings.mqtt.shadow_prefix}/{topic}"
        return PlannedVerdict(verdict, topic)

    async def _announce(self, alert: Alert, planned: list[PlannedVerdict]) -> None:
        """Run `verdict_ready` hooks; their failures are logged, never fatal."""
        for item in planned:
            rule = self.rules.get(item.verdict.rule)
            try:
                for result in self.hooks.verdict_ready(
                    alert=alert, rule=rule, verdict=item.verdict
                ):
                    if inspect.isawaitable(result):
                        await result
            except Exception:
                log.exception("verdict_ready hook failed")


def _ms_between(start: datetime, end: datetime) -> int:
    return max(0, round((end - start).total_seconds() * 1000))
