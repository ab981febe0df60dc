"""systemd's watchdog, fed only while the daemon really works.

The unit sets `WatchdogSec=`; systemd passes it as WATCHDOG_USEC. A task pings every half of
it, but only while the event loop turns (the task itself runs on it) and the model worker is
alive and progressing: not failed, and not stuck on one batch for longer than
`[model] stall_timeout_s`. A daemon that stops being fed is restarted by systemd.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import structlog

from daemon.sdnotify import notify

log = structlog.get_logger(__name__)


def watchdog_interval_s() -> float | None:
    """Half the watchdog timeout systemd asked for, or None when there is none."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2 / 1_000_000


def worker_problem(report: dict[str, Any], stall_s: float) -> str | None:
    """Why the model worker is not fit to be vouched for, or None."""
    if report.get("fatal"):
        return str(report["fatal"])
    busy_for = float(report.get("busy_for_s") or 0.0)
    if busy_for > stall_s:
        return f"the model worker has been on one batch for {busy_for:.0f} s (stall_timeout_s)"
    return None


async def feed_watchdog(interval_s: float, problem: Callable[[], str | None]) -> None:
    """Ping every `interval_s` while `problem()` finds none; log when feeding stops."""
    starved: str | None = None
    while True:
        reason = problem()
        if reason is None:
            notify("WATCHDOG=1")
            if starved is not None:
                log.info("watchdog fed again")
        elif reason != starved:
            log.error("watchdog not fed: systemd will restart the daemon", reason=reason)
        starved = reason
        await asyncio.sleep(interval_s)
