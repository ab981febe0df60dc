"""Waiting for an event with a time limit, without losing a cancellation."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for `event` at most `timeout_s` seconds; whether it is set.

    Python 3.11's `asyncio.wait_for` returns the result instead of raising when the awaited
    event is set just as the caller is cancelled: a loop waiting that way would run on after
    a stop had cancelled it, and hold the stop for ever. `asyncio.timeout` has no such race.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
    return event.is_set()
