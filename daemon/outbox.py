"""The verdict outbox: publishes journalled verdicts in order, marks each once acknowledged.

A verdict the broker refuses (an MQTT 5 PUBACK with a failure reason code: not authorized
for its topic, quota exceeded ...) stays unpublished in the journal, logged once, and is
set aside so that it does not hold up the others; SIGHUP or a restart tries it again (after
the broker's access list is fixed, say). So is one the broker answers by dropping the
connection (MQTT 3.1.1 brokers may for a refused publish; any broker for a packet too
large): after a connection was lost with verdicts in flight, the oldest is sent alone, and
one that loses the connection LOSSES_TO_SET_ASIDE times alone is set aside.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Protocol

import structlog

from daemon.journal import Journal, OutboxItem
from daemon.mqtt import ConnectionLost, PublishRefused
from daemon.stats import StageStats
from daemon.waiting import wait_event

log = structlog.get_logger(__name__)

#: a missed wake-up costs at most this long
IDLE_CHECK_S = 5.0
#: after the journal failed (a full disk), the next try
JOURNAL_RETRY_S = 1.0
#: verdicts published (and marked published) together
BATCH = 200
#: a verdict sent alone that many times, each time losing the connection, is set aside
LOSSES_TO_SET_ASIDE = 3


class Publisher(Protocol):
    connected: asyncio.Event

    async def publish(self, topic: str, payload: str | bytes, *, retain: bool = False) -> None: ...


class Outbox:
    def __init__(self, journal: Journal, publisher: Publisher, stats: StageStats) -> None:
        self.journal = journal
        self.publisher = publisher
        self.stats = stats
        self._wake = asyncio.Event()
        #: one flush at a time (the shutdown's final flush may meet the running one)
        self._flushing = asyncio.Lock()
        #: verdicts the broker acknowledged that the journal could not mark yet (a full
        #: disk): marked at the next flush, never published again meanwhile
        self._acknowledged: set[int] = set()
        #: ids of the verdicts the broker refused (each logged with its reason)
        self.refused: set[int] = set()
        #: every unpublished verdict with an id up to this one is refused: flushes start
        #: above it (however many refused verdicts pile up, a flush reads none of them)
        self._refused_upto = 0
        #: counts SIGHUP retries: a flush under way when one comes must not set them aside
        self._retries = 0
        #: a connection was lost with verdicts in flight: the oldest goes alone next
        self._alone_first = False
        #: connections lost while a verdict was sent alone, by its id
        self._losses: dict[int, int] = {}

    def retry_refused(self) -> None:
        """Offer the refused verdicts to the broker again (SIGHUP)."""
        if self.refused:
            log.info("verdicts the broker refused: trying them again", count=len(self.refused))
            self.refused.clear()
            self._refused_upto = 0
            self._retries += 1
            self._losses.clear()
            self.wake()

    def wake(self) -> None:
        """New verdicts, or a new connection: look at the journal again."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self.publisher.connected.wait()
            self._wake.clear()
            if await self.flush():
                await wait_event(self._wake, IDLE_CHECK_S)
            else:
                await asyncio.sleep(JOURNAL_RETRY_S)

    async def flush(self) -> bool:
        """Publish what is unpublished, oldest first, a batch at a time: the batch's PUBACKs
        are awaited together and its rows marked in one commit. Stops at the first failure
        to publish. False when the journal failed (logged; tried again at the next flush)."""
        async with self._flushing:
            try:
                await self._flush()
            except sqlite3.Error as exc:
                log.error(
                    "the journal failed while publishing verdicts",
                    error=str(exc),
                    acknowledged_unmarked=len(self._acknowledged),
                )
                return False
            return True

    async def _flush(self) -> None:
        await self._mark_acknowledged()
        after = self._refused_upto
        retries = self._retries
        while read := await self.journal.unpublished(
            limit=1 if self._alone_first else BATCH, after=after
        ):
            # the refused wait for SIGHUP: a flush that stopped short of them reads them again
            batch = [item for item in read if item.id not in self.refused]
            if batch and not await self._publish(batch):
                return
            # all of this batch published or refused: no later flush needs to read it again
            after = read[-1].id
            if self.refused and self._retries == retries:
                self._refused_upto = after

    async def _publish(self, batch: list[OutboxItem]) -> bool:
        """Publish a batch, its PUBACKs awaited together; False when any is still to send."""
        started = time.perf_counter()
        results = await asyncio.gather(
            *(self.publisher.publish(item.topic, item.payload) for item in batch),
            return_exceptions=True,
        )
        self.stats.add("publish", time.perf_counter() - started, len(batch))
        done = [item.id for item, result in zip(batch, results, strict=True) if result is None]
        self._acknowledged.update(done)
        await self._mark_acknowledged()
        if self._alone_first and (refusal := self._sent_alone(batch[0], results[0])):
            results[0] = refusal
        for item, result in zip(batch, results, strict=True):
            if isinstance(result, PublishRefused):
                self.refused.add(item.id)
                self.stats.count("publish_refused")
                log.error(
                    "verdict refused by the broker; kept unpublished, tried again on SIGHUP "
                    "or at the next start",
                    topic=item.topic,
                    verdict_id=item.id,
                    error=str(result),
                )
        if done:
            published = set(done)
            topics = sorted({item.topic for item in batch if item.id in published})
            log.debug("verdicts published", count=len(done), topics=topics)
        failed = [r for r in results if r is not None and not isinstance(r, PublishRefused)]
        # alone until one goes through (or is set aside): a lost connection may be its doing
        lost = any(isinstance(r, ConnectionLost) for r in failed)
        self._alone_first = lost or (self._alone_first and bool(failed))
        if failed:
            self.stats.count("publish_failures", len(failed))
            log.warning("verdicts not published yet", pending=len(failed), error=str(failed[0]))
            return False
        return True

    def _sent_alone(self, item: OutboxItem, result: BaseException | None) -> PublishRefused | None:
        """Count a connection lost while `item` went alone; the last straw turns the result
        into a refusal (logged and set aside below)."""
        if not isinstance(result, ConnectionLost):
            self._losses.pop(item.id, None)
            return None
        losses = self._losses[item.id] = self._losses.get(item.id, 0) + 1
        if losses < LOSSES_TO_SET_ASIDE:
            return None
        del self._losses[item.id]
        return PublishRefused(
            f"the broker dropped the connection each of the {losses} times it was sent alone "
            f"({len(item.payload)} bytes on {item.topic})"
        )

    async def _mark_acknowledged(self) -> None:
        if self._acknowledged:
            await self.journal.mark_published(sorted(self._acknowledged))
            self._acknowledged.clear()
