"""Reviews side by side, or one alone: an alert whose earlier review was cut off by a crash
(the daemon killed, a CUDA fatal error) is reviewed with no other review under way.

A crash counts an attempt against every alert then in review, and after `max_attempts`
an alert ends `unreviewed`. Reviewed alone, an alert that crashes the daemon again counts
against itself only: the alerts that were merely beside it at the first crash are judged,
each on its own, instead of sharing its fate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class ReviewGate:
    """Many reviews at once, or one alone; one waiting to be alone holds back new ones."""

    def __init__(self) -> None:
        self._side_by_side = 0
        self._alone = False
        self._waiting_alone = 0
        self._changed = asyncio.Event()

    @asynccontextmanager
    async def review(self, *, alone: bool) -> AsyncIterator[None]:
        """Hold the gate for one review: `alone`, once every review under way has ended."""
        if alone:
            self._waiting_alone += 1
            try:
                await self._until(lambda: not self._alone and self._side_by_side == 0)
            finally:
                self._waiting_alone -= 1
                self._changed.set()  # cancelled while waiting: the others go on
            self._alone = True
        else:
            await self._until(lambda: not self._alone and self._waiting_alone == 0)
            self._side_by_side += 1
        try:
            yield
        finally:
            # no await here: a cancelled review still lets the others through
            if alone:
                self._alone = False
            else:
                self._side_by_side -= 1
            self._changed.set()

    async def _until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            self._changed.clear()
            await self._changed.wait()
