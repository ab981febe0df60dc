"""The verdict outbox: publishes journalled verdicts in order, marks each once acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import structlog

from daemon.journal import Journal

log = structlog.get_logger(__name__)

#: a missed wake-up costs at most this long
IDLE_CHECK_S = 5.0


class Publisher(Protocol):
    connected: asyncio.Event

    async def publish(self, topic: str, payload: str | bytes, *, retain: bool = False) -> None: ...


class Outbox:
    def __init__(self, journal: Journal, publisher: Publisher) -> None:
        self.journal = journal
        self.publisher = publisher
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """New verdicts, or a new connection: look at the journal again."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self.publisher.connected.wait()
            self._wake.clear()
            await self.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_CHECK_S)

    async def flush(self) -> int:
        """Publish what is unpublished, oldest first; stop at the first failure."""
        sent = 0
        while batch := await self.journal.unpublished():
            for item in batch:
                try:
                    await self.publisher.publish(item.topic, item.payload)
                except Exception as exc:
                    log.warning("verdict not published yet", topic=item.topic, error=str(exc))
                    return sent
                await self.journal.mark_published(item.id)
                sent += 1
        return sent
