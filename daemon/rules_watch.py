"""Hot reload: watch the rules directory and re-read it when a rule file changes.

The directory itself is followed too: one created after the start, deleted and made again,
or swapped (renamed over, or a symlink re-pointed) is watched afresh and re-read.
"""

from __future__ import annotations

import asyncio
import stat
from collections.abc import Callable
from pathlib import Path

import structlog
import watchfiles

log = structlog.get_logger(__name__)

#: a burst of changes is read once its files have been quiet this long (an editor's save is
#: several events; `cp`, scp and pasting write a file in several steps)
QUIET_MS = 600
#: ... or at the latest this long after its first change
DEBOUNCE_MS = 3000
#: an idle watcher wakes this often: its first wake-up re-reads the directory once, and each
#: one checks that the directory is still the one watched
IDLE_MS = 500


#: a Kubernetes ConfigMap volume's files link through this symlink, swapped on each update
CONFIGMAP_LINK = "..data"


def _is_rule_file(change: watchfiles.Change, path: str) -> bool:
    name = Path(path).name
    return (name.endswith(".toml") and not name.startswith(".")) or name == CONFIGMAP_LINK


def directory_identity(directory: Path) -> tuple[int, int] | None:
    """(device, inode) of the directory the path leads to now, or None when there is none."""
    try:
        found = directory.stat()
    except OSError:
        return None
    return (found.st_dev, found.st_ino) if stat.S_ISDIR(found.st_mode) else None


async def watch_rules(directory: Path, reload: Callable[[], object]) -> None:
    """Call `reload` after each burst of changes to `*.toml` files, and whenever the
    directory appears, vanishes or is replaced, until cancelled."""
    missing_told = False
    while True:
        identity = await asyncio.to_thread(directory_identity, directory)
        if identity is None:
            if not missing_told:
                log.warning("rules directory missing: waiting for it", path=str(directory))
                missing_told = True
            await asyncio.sleep(IDLE_MS / 1000)
            continue
        if missing_told:
            log.info("rules directory found", path=str(directory))
            missing_told = False
        try:
            await _watch_while_same(directory, identity, reload)
        except (OSError, RuntimeError) as exc:  # the watcher lost the directory under it
            log.warning("rules directory watch ended", path=str(directory), error=str(exc))
        log.info("rules directory replaced or removed", path=str(directory))
        if await asyncio.to_thread(directory_identity, directory) is None:
            reload()  # said in the health report; a replacement is read by its own watch
        await asyncio.sleep(IDLE_MS / 1000)


async def _watch_while_same(
    directory: Path, identity: tuple[int, int], reload: Callable[[], object]
) -> None:
    """Watch one directory until the path leads elsewhere (or nowhere)."""
    first = True
    real = await asyncio.to_thread(directory.resolve)
    async for changes in watchfiles.awatch(
        real,
        watch_filter=_is_rule_file,
        debounce=DEBOUNCE_MS,
        step=QUIET_MS,
        recursive=False,
        yield_on_timeout=True,
        rust_timeout=IDLE_MS,
    ):
        if await asyncio.to_thread(directory_identity, directory) != identity:
            return
        if changes:
            log.info("rule files changed", files=sorted(Path(p).name for _, p in changes))
        if changes or first:
            # the first wake-up also catches edits made before the watch was in place
            reload()
        first = False
