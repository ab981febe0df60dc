"""The `secondlook` command's first moment: SIGHUP is held from here until `run`'s event loop
takes it over (its default action would end a daemon that `systemctl reload`, logrotate or
`kill -HUP` reach while it still imports); any other command lets it act as usual."""

from __future__ import annotations

import os
import signal
from types import FrameType

#: SIGHUPs that came before the daemon could act on them
HELD: list[int] = []


def hold(signum: int, frame: FrameType | None) -> None:
    HELD.append(signum)


def release() -> None:
    """SIGHUP back to its default action, taken at once if one was held (not a daemon)."""
    if signal.getsignal(signal.SIGHUP) is hold:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        if HELD:
            os.kill(os.getpid(), signal.SIGHUP)


def main() -> None:
    signal.signal(signal.SIGHUP, hold)
    from daemon.cli import main as command_line

    command_line()
