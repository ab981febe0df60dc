"""Hot reload: watch the rules directory and re-read it when a rule file changes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import structlog
import watchfiles

log = structlog.get_logger(__name__)

#: changes closer together than this are read as one (an editor's save is several events)
DEBOUNCE_MS = 300
#: an idle watcher wakes this often; its first wake-up re-reads the directory once
IDLE_MS = 500


def _is_rule_file(change: watchfiles.Change, path: str) -> bool:
    return path.endswith(".toml")


async def watch_rules(directory: Path, reload: Callable[[], object]) -> None:
    """Call `reload` after each burst of changes to `*.toml` files, until cancelled."""
    if not await asyncio.to_thread(directory.is_dir):
        log.warning("rules directory missing: not watching it", path=str(directory))
        return
    first = True
    async for changes in watchfiles.awatch(
        directory,
        watch_filter=_is_rule_file,
        debounce=DEBOUNCE_MS,
        recursive=False,
        yield_on_timeout=True,
        rust_timeout=IDLE_MS,
    ):
        if changes:
            log.info("rule files changed", files=sorted(Path(p).name for _, p in changes))
        if changes or first:
            # the first wake-up also catches edits made before the watch was in place
            reload()
        first = False
