"""Per alert: parse -> journal -> match -> prepare -> infer -> interpret -> journal verdicts.

Publishing is the outbox's job: every verdict goes out from the journal, so one code path
serves fresh verdicts, reconnects and restarts alike.
"""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import structlog
from pluggy import HookImpl
from pydantic_core import PydanticSerializationError

from daemon.backlog import Backlog
from daemon.config import ImageSettings, Settings
from daemon.contract import (
    Alert,
    Verdict,
    VerdictKind,
    parse_rfc3339,
    too_many_boxes,
    utc_now,
)
from daemon.journal import Journal, PlannedVerdict, StoredAlert
from daemon.plugin_api import (
    AlertError,
    AlertFormat,
    Backend,
    BackendUnusable,
    IncomingAlert,
    Judgement,
    RawImage,
)
from daemon.plugins import Registry, call_impl, is_plugin_failure, plain_impls
from daemon.review_gate import ReviewGate
from daemon.reviewer import Reviewer
from daemon.rules import Rule, RuleBook
from daemon.snapshots import SnapshotLoader, check_image_url, check_raw_image, has_own_frame
from daemon.stats import StageStats
from daemon.templates import check_topic_template, render_topic

log = structlog.get_logger(__name__)

#: alerts kept in memory between intake and review; older ones are read from the journal
FRESH_IN_MEMORY = 256
#: after a review crashes (a journal that cannot write, a bug), reviews pause this long at
#: first, twice as long after each further crash, at most the second figure
CRASH_PAUSE_S = (0.5, 30.0)
#: an `async def verdict_ready` hook is given up on after this long (logged)
VERDICT_HOOK_LIMIT_S = 60.0


class CutOff(Exception):
    """A review not begun because a stop's grace ran out; the alert waits for the next start."""


@dataclass(frozen=True)
class IngestResult:
    #: consumed: the payload carried no alert of its own (see AlertFormat.parse);
    #: busy: not taken now (backlog full, storage trouble), try again later
    status: Literal["accepted", "duplicate", "refused", "consumed", "busy"]
    alert: Alert | None = None
    error: AlertError | None = None
    #: why a busy payload was not taken
    busy_reason: str | None = None
    #: a busy payload's alert, parsed: given back to `ingest` (`parsed=`) instead of the
    #: payload being parsed again (a format may keep state: Frigate's waiting events)
    incoming: IncomingAlert | None = None


def parse_payload(
    payload: bytes,
    topic: str | None,
    parser: AlertFormat | None,
    format_name: str,
    images: ImageSettings,
) -> IncomingAlert | None:
    """The alert in a payload, its snapshots checked from their headers; AlertError names
    the field at fault (None: a payload that is no alert of its own)."""
    if parser is None:
        raise AlertError("format", f"unknown alert format {format_name!r}")
    try:
        incoming = parser.parse(payload, topic=topic)
        if incoming is None:
            return None
        if not (
            isinstance(incoming, IncomingAlert)
            and isinstance(incoming.alert, Alert)
            and isinstance(incoming.images, list | tuple)
            and all(
                isinstance(image, RawImage)
                and isinstance(image.data, bytes)
                and isinstance(image.source, str)
                for image in incoming.images
            )
        ):
            raise TypeError(
                f"it returned {incoming!r:.80}, not an IncomingAlert of RawImages of bytes"
            )
        if reason := too_many_boxes(len(incoming.alert.boxes)):  # (any format's alert)
            raise AlertError("boxes", reason)
        extra = sum(image.source != "image" for image in incoming.images)
        if extra > images.max_extra_images:
            raise AlertError(
                "images",
                f"{extra} extra frames, over [images] max_extra_images ({images.max_extra_images})",
            )
        for image in incoming.images:
            check_raw_image(image, images)
        url = incoming.alert.image_url
        if url and not has_own_frame(incoming.images):
            check_image_url(url, images)  # fetched at review
    except AlertError:
        raise
    except BaseException as exc:
        if not is_plugin_failure(exc):
            raise
        # a format plugin's own failure on this payload: refused like a bad one, never
        # left to break intake (over MQTT the payload would come back again and again)
        log.exception("alert format failed", format=format_name)
        raise AlertError("payload", f"the {format_name} format could not read it: {exc!r}") from exc
    return incoming


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
        #: called once when the backend became unusable (the daemon then stops)
        self.on_fatal: Callable[[str], None] = lambda reason: None
        self.fatal: str | None = None
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
        self.backlog = Backlog(
            journal.pending_reviews,
            capacity=settings.pipeline.queue_size,
            max_backlog=settings.pipeline.max_backlog,
        )
        #: set while the journal cannot take alerts (disk full, write errors): intake waits
        self.storage_problem: str | None = None
        #: alerts just journalled, by row id, so that their review need not read them back
        self._fresh: OrderedDict[int, StoredAlert] = OrderedDict()
        self._closed = False
        self._busy = 0
        self._quiet = asyncio.Event()
        self._quiet.set()
        #: alerts whose review attempt is counted and not finished
        self._attempting: set[int] = set()
        #: alerts whose attempt a failing journal (a full disk) kept counted: their next
        #: review is that attempt (see _review_counted), or the stop takes it back
        self._uncount_later: set[int] = set()
        #: a stop's grace ran out: reviews not begun by then are not begun at all
        self._cut_off = False
        #: an alert whose review a crash cut off is reviewed alone (see daemon.review_gate)
        self.gate = ReviewGate()
        #: False (replay, eval): no plugin's `verdict_ready` runs (no pager rings)
        self.announce = True
        #: `verdict_ready` hooks under way (they run beside the reviews)
        self._announcing: set[asyncio.Task[None]] = set()
        #: reviews start again at this loop time after a crash; the pause in force
        self._paused_until = 0.0
        self._crash_pause_s = 0.0

    async def ingest(
        self,
        payload: bytes,
        *,
        source: str,
        topic: str | None = None,
        fmt: str | None = None,
        parsed: IncomingAlert | None = None,
    ) -> IngestResult:
        """Parse, check and journal one payload; queue it for review if it is new.

        A refused payload is logged and recorded with the field at fault. While the backlog
        is full or the journal cannot write, nothing is taken: the result is `busy`.
        """
        if reason := self.busy_reason():
            result = IngestResult("busy", busy_reason=reason)
        else:
            # count this payload against the backlog until it is queued (or turns out not to
            # be new), so that concurrent intakes cannot overshoot max_backlog
            self.backlog.reserve()
            try:
                result = await self._ingest(payload, source, topic, fmt, parsed)
            finally:
                self.backlog.release()
        self.stats.count("alerts_received", source=source, outcome=result.status)
        return result

    async def refuse(
        self, error: AlertError, payload: bytes, *, source: str, topic: str | None = None
    ) -> None:
        """A payload refused before it reached the pipeline (a transport's own checks):
        logged, recorded and counted like any other refusal."""
        await self.record_refusal(error, payload, source=source, topic=topic)
        self.stats.count("alerts_received", source=source, outcome="refused")

    async def record_refusal(
        self, error: AlertError, payload: bytes, *, source: str, topic: str | None
    ) -> None:
        """Log a refusal and record it in the journal's rejects with the payload's start."""
        log.error(
            "alert refused", source=source, topic=topic, field=error.field, error=error.message
        )
        try:
            await self.journal.record_reject(
                source=source, topic=topic, field=error.field, error=error.message, payload=payload
            )
        except sqlite3.Error as write_error:
            log.error("could not record the refusal", error=str(write_error))

    async def _ingest(
        self,
        payload: bytes,
        source: str,
        topic: str | None,
        fmt: str | None,
        parsed: IncomingAlert | None,
    ) -> IngestResult:
        format_name = fmt or self.settings.mqtt.format
        try:
            with self.stats.time("parse"):
                incoming = parsed or parse_payload(
                    payload,
                    topic,
                    self.registry.alert_formats.get(format_name),
                    format_name,
                    self.settings.images,
                )
        except AlertError as exc:
            await self.record_refusal(exc, payload, source=source, topic=topic)
            return IngestResult("refused", error=exc)
        if incoming is None:
            return IngestResult("consumed")
        alert = incoming.alert
        received_at = utc_now()
        # a shadow rule's trial run does not move its alerts ahead of others
        matched = self.rules.match(alert)
        priority = max((rule.priority for rule in matched if not rule.shadow), default=0)
        try:
            with self.stats.time("journal_alert"):
                recorded = await self.journal.record_alert(
                    alert,
                    incoming.images,
                    source=source,
                    topic=topic,
                    received_at=received_at,
                    priority=priority,
                )
        except sqlite3.Error as exc:
            problem = f"the journal cannot write: {exc}"
            if problem != self.storage_problem:  # once, not once per alert held meanwhile
                log.error("journal write failed; intake paused", error=str(exc))
            self.storage_problem = problem
            return IngestResult("busy", alert, busy_reason=problem, incoming=incoming)
        except PydanticSerializationError as exc:
            # JSON's "\ud800" escapes decode to lone surrogates, which are not Unicode: the
            # alert cannot be stored (its own text stays out of the message for that reason)
            reason = (
                "a text holds a lone UTF-16 surrogate (\\ud800-\\udfff)"
                if "surrogate" in str(exc)
                else "the alert cannot be written as JSON (nested too deeply?)"
            )
            refused = AlertError("payload", reason)
            await self.record_refusal(refused, payload, source=source, topic=topic)
            return IngestResult("refused", error=refused)
        ref = recorded.ref
        log.debug(
            "alert journalled",
            alert_id=alert.alert_id,
            ref=ref,
            new=recorded.new,
            rules=[rule.name for rule in matched],
            priority=priority,
        )
        if not recorded.new:
            if not recorded.reviewed and not self.backlog.is_scheduled(ref):
                # the first delivery was journalled but its intake cut short: review it now
                log.info("resend of an unreviewed alert: reviewing it", alert_id=alert.alert_id)
                self.backlog.add(ref, priority, new=False)
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
        while len(self._fresh) > min(FRESH_IN_MEMORY, self.backlog.capacity):
            self._fresh.popitem(last=False)
        self.backlog.add(ref, priority)
        return IngestResult("accepted", alert)

    def apply_settings(self, settings: Settings) -> None:
        """Settings reloaded on SIGHUP: image limits and the backlog's bound."""
        self.settings = settings
        self.snapshots.settings = settings.images
        self.reviewer.resample = settings.images.resample
        self.backlog.set_max_backlog(settings.pipeline.max_backlog)

    def busy_reason(self) -> str | None:
        """Why intake must wait now, if it must."""
        if self.storage_problem:
            return self.storage_problem
        if self.backlog.paused:
            return (
                f"{self.backlog.pending} alerts wait for review (max_backlog reached: intake "
                "goes on below nine tenths of it)"
            )
        return None

    async def wait_for_intake(self) -> None:
        """Return once intake may go on (MQTT pauses here; the broker holds the rest)."""
        await self.backlog.wait_for_room()

    async def close(self) -> None:
        for task in self._announcing:
            task.cancel()
        await asyncio.gather(*self._announcing, return_exceptions=True)
        await self.snapshots.close()
        self.reviewer.close()

    async def requeue_pending(self) -> int:
        """Count alerts journalled but never reviewed (a crash or stop interrupted them);
        the backlog reads them back from the journal, best first."""
        pending = await self.journal.count_pending()
        await self.backlog.load(pending)
        if pending:
            log.info("resuming interrupted reviews", count=pending)
        return pending

    async def run_worker(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            ref = await self.backlog.take()
            if (pause := self._paused_until - loop.time()) > 0:
                await asyncio.sleep(pause)  # after a crash: see _pause_after_crash
            if self._closed:
                self.backlog.done(ref, reviewed=False)
                break
            self._busy += 1
            self._quiet.clear()
            reviewed: bool | None = False
            try:
                # None: reviewed already (by an earlier take of it): counted then
                reviewed = None if await self.review(ref) is None else True
                self._crash_pause_s = 0.0
            except CutOff:
                pass  # left in the journal for the next start
            except BackendUnusable as exc:
                self.backend_unusable(str(exc))
            except Exception as exc:
                self._pause_after_crash(ref, exc, loop.time())
            finally:
                if reviewed is None:
                    self.backlog.drop(ref)
                else:
                    self.backlog.done(ref, reviewed=reviewed)
                self._busy -= 1
                if self._busy == 0:
                    self._quiet.set()

    def backend_unusable(self, reason: str) -> None:
        """The model cannot serve again (its process ended, a poisoned CUDA context): start
        no more reviews, each would fail alike; the daemon stops (see `on_fatal`)."""
        if self.fatal is None:
            self.fatal = reason
            self._closed = True
            self.on_fatal(reason)

    def _pause_after_crash(self, ref: int, exc: Exception, now: float) -> None:
        """Pause all reviews a while, longer while they keep crashing: the alert would
        otherwise come back at once, and fail alike while the cause lasts."""
        if now >= self._paused_until:  # reviews that crash together count once
            first, longest = CRASH_PAUSE_S
            self._crash_pause_s = min(max(2 * self._crash_pause_s, first), longest)
            self._paused_until = now + self._crash_pause_s
        pause_s = round(self._crash_pause_s, 1)
        if isinstance(exc, sqlite3.Error):
            log.error(
                "the journal failed during a review; reviews pause",
                error=str(exc),
                ref=ref,
                pause_s=pause_s,
            )
        else:
            log.exception("review crashed; reviews pause", ref=ref, pause_s=pause_s)

    async def drain(self, grace_s: float) -> bool:
        """Start no more reviews; wait for those running. False if `grace_s` ran out first."""
        self._closed = True
        deadline = asyncio.get_running_loop().time() + grace_s
        try:
            if not self._quiet.is_set():  # (a grace of 0 with nothing running is no timeout)
                async with asyncio.timeout(grace_s):  # (not wait_for: see daemon.waiting)
                    await self._quiet.wait()
            if self._announcing:  # the hooks of the last verdicts, in what is left
                left = deadline - asyncio.get_running_loop().time()
                await asyncio.wait(self._announcing, timeout=max(left, 0.0))
        except TimeoutError:
            # cut off by a clean stop, not by a crash: the attempts do not count towards
            # max_attempts (restarts would otherwise give alerts up unjudged)
            self._cut_off = True
            refs = self._attempting | self._uncount_later
            self._attempting.clear()  # taken back here, not again when they end
            await self._take_back(refs)
            return False
        await self._take_back(set(self._uncount_later))
        return True

    async def _take_back(self, refs: set[int]) -> None:
        """At a stop: take back the attempts of reviews a clean stop cut off, and those a
        failing journal kept counted."""
        self._uncount_later.clear()
        if refs:
            try:
                await self.journal.uncount_attempts(sorted(refs))
            except sqlite3.Error as exc:  # the stop goes on; they count as a crash would
                log.error("the journal failed while stopping", error=str(exc))

    async def review(self, ref: int) -> list[PlannedVerdict] | None:
        """Review one journalled alert with every matching rule; journal the verdicts.
        None: the alert was reviewed already (its verdicts are out)."""
        stored = self._fresh.pop(ref, None) or await self.journal.load_alert(ref)
        if stored.state == "reviewed":
            self._uncount_later.discard(ref)
            return None
        alert = stored.alert
        # once past max_attempts it is given up without a review: no need to be alone
        counted = stored.attempts - (ref in self._uncount_later)
        alone = 0 < counted < self.settings.pipeline.max_attempts
        with structlog.contextvars.bound_contextvars(alert_id=alert.alert_id, box_id=alert.box_id):
            async with self.gate.review(alone=alone):
                if alone:
                    log.info(
                        "reviewing alone: a crash cut off its review", attempts=stored.attempts
                    )
                planned = await self._review_counted(ref, stored)
            if planned is None:  # another review of it ended first: its verdicts stand
                log.warning("alert reviewed twice; the first review's verdicts stand")
                return None
            for item in planned:
                self.stats.count(
                    "verdicts", rule=item.verdict.rule or "", verdict=item.verdict.verdict.value
                )
                log.info(
                    "verdict",
                    rule=item.verdict.rule,
                    verdict=item.verdict.verdict.value,
                    confidence=item.verdict.confidence,
                    latency_ms=item.verdict.latency_ms,
                )
            # published first; the hooks run beside the outbox and the next reviews
            self.on_verdicts()
            if planned and self.announce and plain_impls(self.hooks.verdict_ready):
                task = asyncio.create_task(self._announce(alert, planned))
                self._announcing.add(task)
                task.add_done_callback(self._announcing.discard)
        return planned

    async def _review_counted(self, ref: int, stored: StoredAlert) -> list[PlannedVerdict] | None:
        """Count the attempt, judge, journal the verdicts; None if another review of the
        alert was journalled first."""
        if self._cut_off:
            raise CutOff
        if ref in self._uncount_later:
            # the attempt a failing journal left counted (see below) stands for this one
            self._uncount_later.discard(ref)
            attempts = stored.attempts
        else:
            attempts = await self.journal.begin_review(ref)
        self._attempting.add(ref)
        try:
            if self._cut_off:  # the stop's deadline came while the attempt was counted
                raise CutOff
            planned = await self._verdicts_for(stored, attempts)
            with self.stats.time("journal_verdict"):
                finished = await self.journal.finish_review(ref, planned)
        except (CutOff, sqlite3.OperationalError):
            # neither a crash nor the alert's doing (a full disk, an I/O error): the attempt
            # does not count
            if ref in self._attempting:
                try:
                    await self.journal.uncount_attempts([ref])
                except sqlite3.Error:  # the same failing journal
                    self._uncount_later.add(ref)
            raise
        finally:
            self._attempting.discard(ref)
        return planned if finished else None

    async def _verdicts_for(self, stored: StoredAlert, attempts: int) -> list[PlannedVerdict]:
        alert = stored.alert
        if stored.problem is not None:
            # judged at each try alike: forwarded unreviewed now, not retried without end
            log.error("the stored alert fails the contract's checks", problem=stored.problem)
            reason = f"the stored alert fails the contract's checks: {stored.problem}"
            return [self._plan(stored, None, Judgement(VerdictKind.UNREVIEWED, None, reason))]
        rules = self.rules.match(alert)
        if attempts > self.settings.pipeline.max_attempts:
            # on the topics of the rules it matches, which alarm systems may follow alone
            reason = f"review interrupted {attempts - 1} times; giving up"
            given_up = Judgement(VerdictKind.UNREVIEWED, None, reason)
            live = [rule for rule in rules if not rule.shadow]
            return [self._plan(stored, rule, given_up) for rule in live] or [
                self._plan(stored, None, given_up)
            ]
        if not rules:
            if self.settings.rules.unmatched == "drop":
                log.info("no rule matches; dropped by config")
                return []
            return [self._plan(stored, None, Judgement(VerdictKind.UNREVIEWED, None, "no rule"))]
        age_s = alert_age_s(stored)
        stale = [r for r in rules if r.max_age_s is not None and age_s > r.max_age_s]
        fresh = [r for r in rules if r not in stale]
        planned = (
            [
                self._plan(stored, rule, judgement)
                for rule, judgement in await self.reviewer.judge_all(stored, fresh)
            ]
            if fresh
            else []
        )
        for rule in stale:
            reason = f"stale: the alert is {age_s:.0f} s old, over max_age_s = {rule.max_age_s:g}"
            planned.append(
                self._plan(stored, rule, Judgement(VerdictKind.UNREVIEWED, None, reason))
            )
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
        return PlannedVerdict(verdict, topic, judgement.prompt, judgement.raw, rule)

    async def _announce(self, alert: Alert, planned: list[PlannedVerdict]) -> None:
        """Run each plugin's `verdict_ready` for each verdict on its own (async ones side by
        side), each with a copy of the alert."""
        impls = plain_impls(self.hooks.verdict_ready)
        await asyncio.gather(
            *(self._verdict_ready(impl, alert, item) for item in planned for impl in impls)
        )

    async def _verdict_ready(self, impl: HookImpl, alert: Alert, item: PlannedVerdict) -> None:
        """One plugin's `verdict_ready` for one verdict: a failure is logged naming the
        plugin, never fatal; an async one is given up on after VERDICT_HOOK_LIMIT_S."""
        plugin = getattr(impl.plugin, "__name__", type(impl.plugin).__name__)
        given = {"alert": alert.model_copy(deep=True), "rule": item.rule, "verdict": item.verdict}
        limit: asyncio.Timeout | None = None
        try:
            result = call_impl(impl, given)
            if inspect.isawaitable(result):
                async with asyncio.timeout(VERDICT_HOOK_LIMIT_S) as limit:
                    await result
        except TimeoutError as exc:
            if limit is None or not limit.expired():  # the hook's own
                log.error("verdict_ready hook failed", plugin=plugin, error=repr(exc))
                return
            log.error("verdict_ready hook given up on", plugin=plugin, limit_s=VERDICT_HOOK_LIMIT_S)
        except BaseException as exc:
            if not is_plugin_failure(exc):
                raise
            log.error(
                "verdict_ready hook failed",
                plugin=plugin,
                error=str(exc) or type(exc).__name__,
                error_type=type(exc).__name__,
            )


def alert_age_s(stored: StoredAlert) -> float:
    """Seconds since the alert happened: from `occurred_at`, or from its arrival where the
    box's clock says later (a box clock running ahead must not make alerts look young)."""
    since = min(parse_rfc3339(stored.alert.occurred_at), stored.received_at)
    return (utc_now() - since).total_seconds()


def _ms_between(start: datetime, end: datetime) -> int:
    return max(0, round((end - start).total_seconds() * 1000))
