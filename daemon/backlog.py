"""What waits for review: a bounded in-memory queue in priority order, the rest in the journal.

Every alert is journalled before it is queued, so the queue only holds row ids, and at most
`capacity` of them: beyond that the journal is the queue, and it is read back (highest
priority, then oldest first) whenever the in-memory part runs dry. `pending` counts every
alert journalled but not yet reviewed; past `max_backlog` intake is refused (HTTP 503) or
paused (MQTT, the broker holds the messages) until it falls below nine tenths of it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable

#: reads the journal: (row id, priority) of unreviewed alerts, best first, at most `limit`
PendingReader = Callable[[int], Awaitable[list[tuple[int, int]]]]


class Backlog:
    def __init__(self, read_pending: PendingReader, *, capacity: int, max_backlog: int) -> None:
        self._read_pending = read_pending
        self.capacity = capacity
        self.max_backlog = max_backlog
        self._heap: list[tuple[int, int, int]] = []  # (-priority, arrival, row id)
        self._arrival = itertools.count()
        self._queued: set[int] = set()
        self._active: set[int] = set()
        #: the journal holds unreviewed alerts that are not in the heap
        self._spilled = False
        self._refilling = asyncio.Lock()
        #: while the journal is read: the alerts whose reviews ended meanwhile (the read
        #: may still list them as waiting)
        self._ended_while_reading: set[int] | None = None
        self._available = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        #: alerts journalled and not yet reviewed, wherever they wait
        self.pending = 0
        #: payloads being taken in right now, counted against `max_backlog` too
        self.reserved = 0

    async def load(self, pending: int) -> None:
        """At start: `pending` alerts wait in the journal from an earlier run."""
        self.pending = pending
        self._spilled = pending > 0
        self._update()

    @property
    def queued(self) -> int:
        return len(self._heap)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def full(self) -> bool:
        return self.pending + self.reserved >= self.max_backlog

    def reserve(self) -> None:
        self.reserved += 1
        self._update()

    def release(self) -> None:
        self.reserved -= 1
        self._update()

    def add(self, ref: int, priority: int, *, new: bool = True) -> None:
        """Queue a journalled alert (`new=False`: one already counted, e.g. a resend)."""
        if new:
            self.pending += 1
        if ref in self._queued or ref in self._active:
            return
        if len(self._heap) < self.capacity:
            heapq.heappush(self._heap, (-priority, next(self._arrival), ref))
            self._queued.add(ref)
        else:
            self._spilled = True
        self._update()

    def set_max_backlog(self, max_backlog: int) -> None:
        self.max_backlog = max_backlog
        self._update()

    def is_scheduled(self, ref: int) -> bool:
        return ref in self._queued or ref in self._active

    async def take(self) -> int:
        """The next alert to review, best first; waits when there is none."""
        while True:
            if self._heap:
                _, _, ref = heapq.heappop(self._heap)
                self._queued.discard(ref)
                self._active.add(ref)
                self._update()
                return ref
            if self._spilled:
                await self._refill()
                if self._heap:
                    continue
            self._available.clear()
            await self._available.wait()

    def done(self, ref: int, *, reviewed: bool) -> None:
        """A review ended; `reviewed=False` leaves the alert in the journal for later."""
        self._active.discard(ref)
        if reviewed:
            self.pending = max(0, self.pending - 1)
            if self._ended_while_reading is not None:
                self._ended_while_reading.add(ref)
        else:
            self._spilled = True
        self._update()

    def drop(self, ref: int) -> None:
        """An alert taken that turned out reviewed already (counted when that review
        ended): forgotten, and counted no second time."""
        self._active.discard(ref)
        self._update()

    async def wait_for_room(self) -> None:
        """Return once intake may go on (below nine tenths of `max_backlog`)."""
        while not self._room.is_set():
            await self._room.wait()

    async def _refill(self) -> None:
        async with self._refilling:
            if self._heap or not self._spilled:
                return
            self._spilled = False  # adds that spill while we read set it again
            limit = self.capacity + len(self._active)
            self._ended_while_reading = set()
            try:
                rows = await self._read_pending(limit)
            finally:
                ended, self._ended_while_reading = self._ended_while_reading, None
            if len(rows) >= limit:
                self._spilled = True
            for ref, priority in rows:
                if ref in self._queued or ref in self._active or ref in ended:
                    continue
                if len(self._heap) >= self.capacity:
                    self._spilled = True
                    break
                heapq.heappush(self._heap, (-priority, next(self._arrival), ref))
                self._queued.add(ref)

    def _update(self) -> None:
        if self._heap or self._spilled:
            self._available.set()
        if self.full:
            self._room.clear()
        elif self.pending + self.reserved < self.max_backlog * 9 // 10 or self.max_backlog < 10:
            self._room.set()
