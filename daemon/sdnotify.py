"""systemd's notify protocol (READY=1, STOPPING=1, STATUS=...) without a dependency."""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger(__name__)

#: the socket addresses whose failure was already logged (one warning each, not one per ping)
_failed: set[str] = set()


def notify(message: str) -> bool:
    """Send one notification; False when not run by systemd (no NOTIFY_SOCKET) or when the
    socket cannot take it. As with libsystemd's sd_notify, a failure is never fatal: it is
    logged once per address, and the message is dropped rather than waited on."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(target)
            sock.send(message.encode(), socket.MSG_DONTWAIT)
    except OSError as exc:
        if address not in _failed:
            _failed.add(address)
            log.warning(
                "systemd notification not sent", socket=address, error=exc.strerror or str(exc)
            )
        return False
    _failed.discard(address)
    return True
