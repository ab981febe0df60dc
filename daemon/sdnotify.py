"""systemd's notify protocol (READY=1, STOPPING=1, STATUS=...) without a dependency."""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send one notification; False when not run by systemd (no NOTIFY_SOCKET)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True
