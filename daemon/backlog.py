"""What waits for review: a bounded in-memory queue in priority order, the rest in the journal.

Every alert is journalled before it is queued, so the queue only holds row ids, and at most
`capacity` of them: beyond that the journal is the queue. While alerts wait there, new ones
join them (a newcomer of a higher priority than the queue's lowest takes that one's place),
and the journal is read back (highest priority, then oldest first) whenever the in-memory
part is down to half: an alert left in the journal waits at most about half a queue's worth
of reviews to be weighed against the others again (newcomers of its own priority that arrive
while nothing waits in the journal, or that evict a lower one, may go first meanwhile).
`pending` counts every alert journalled but not yet reviewed; past
`max_backlog` intake is refused (HTTP 503) or paused (MQTT, the broker holds the messages)
until it falls below nine tenths of it.
"""

from __future__ import annotations

import asyncio
import heapq
from collections import Counter
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)

#: reads the journal: (row id, priority) of unreviewed alerts, best first, at most `limit`
PendingReader = Callable[[int], Awaitable[list[tuple[int, int]]]]
#: seconds before the journal is read again after a read failed
REFILL_RETRY_S = 1.0


class Backlog:
    def __init__(self, read_pending: PendingReader, *, capacity: int, max_backlog: int) -> None:
        self._read_pending = read_pending
        self.capacity = capacity
        self.max_backlog = max_backlog
        #: (-priority, row id): row ids grow with intake, so the oldest comes first
        self._heap: list[tuple[int, int]] = []
        #: how many queued alerts have each priority: the lowest without a scan of the heap
        self._priorities: Counter[int] = Counter()
        self._queued: set[int] = set()
        self._active: set[int] = set()
        #: the journal holds unreviewed alerts that are not in the heap
        self._spilled = False
        self._refilling = asyncio.Lock()
        #: after a failed read of the journal: not read again before this (loop time)
        self._retry_at = 0.0
        #: while the journal is read: the alerts whose reviews ended meanwhile (the read
        #: may still list them as waiting)
        self._ended_while_reading: set[int] | None = None
        self._available = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        #: the alerts waiting reached max_backlog: intake waits until below nine tenths
        self._filled = False
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

    @property
    def paused(self) -> bool:
        """Whether intake waits: from `full` until below nine tenths again (HTTP and MQTT
        alike: HTTP taking each slot freed would keep MQTT paused for good); when only the
        payloads being taken in made it full, until it is not."""
        return not self._room.is_set()

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
        if not self._spilled and len(self._heap) < self.capacity:
            self._push(ref, priority)
        elif self._heap and min(self._priorities) < priority:
            if len(self._heap) >= self.capacity:
                # beats the lowest queued alert (the newest of them), which waits in the
                # journal instead
                lowest = max(self._heap)
                self._heap.remove(lowest)
                heapq.heapify(self._heap)
                self._forget(lowest)
            self._push(ref, priority)
            self._spilled = True
        else:
            self._spilled = True  # waits in the journal with the others
        self._update()

    def _push(self, ref: int, priority: int) -> None:
        heapq.heappush(self._heap, (-priority, ref))
        self._queued.add(ref)
        self._priorities[priority] += 1

    def _forget(self, entry: tuple[int, int]) -> None:
        """`entry` is out of the heap: no longer queued."""
        self._queued.discard(entry[1])
        self._priorities[-entry[0]] -= 1
        if not self._priorities[-entry[0]]:
            del self._priorities[-entry[0]]

    def set_max_backlog(self, max_backlog: int) -> None:
        self.max_backlog = max_backlog
        self._update()

    def is_scheduled(self, ref: int) -> bool:
        return ref in self._queued or ref in self._active

    async def take(self) -> int:
        """The next alert to review, best first; waits when there is none."""
        loop = asyncio.get_running_loop()
        while True:
            if self._spilled and len(self._heap) <= self.capacity // 2:
                if (pause := self._retry_at - loop.time()) <= 0:
                    await self._refill()
                elif not self._heap:  # nothing else to hand out meanwhile
                    await asyncio.sleep(pause)
                    continue
            if self._heap:
                entry = heapq.heappop(self._heap)
                self._forget(entry)
                ref = entry[1]
                self._active.add(ref)
                self._update()
                return ref
            if self._spilled:
                continue  # read again (after a pause, if the read failed)
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
        """Top the queue up from the journal, best first (what waits there may beat what is
        queued). A failed read is logged and tried again after a pause; nothing is lost, the
        alerts stay in the journal."""
        async with self._refilling:
            if len(self._heap) > self.capacity // 2 or not self._spilled:
                return
            self._spilled = False  # adds that spill while we read set it again
            # the best rows hold the queued and active alerts too, and enough others to fill up
            limit = self.capacity + len(self._active)
            self._ended_while_reading = set()
            try:
                rows = await self._read_pending(limit)
            except Exception as exc:
                self._spilled = True
                self._retry_at = asyncio.get_running_loop().time() + REFILL_RETRY_S
                log.error("the journal failed while reading waiting alerts", error=str(exc))
                return
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
                self._push(ref, priority)

    def _update(self) -> None:
        if self._heap or self._spilled:
            self._available.set()
        if self.pending >= self.max_backlog:
            self._filled = True
        if self.full:
            self._room.clear()
        elif (
            not self._filled  # full of payloads being taken in only: room once they are
            or self.pending + self.reserved < self.max_backlog * 9 // 10
            or self.max_backlog < 10
        ):
            self._filled = False
            self._room.set()
