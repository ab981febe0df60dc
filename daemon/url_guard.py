"""Where `image_url` may lead: never to link-local (cloud metadata at 169.254.169.254),
unspecified, multicast or reserved addresses, and to loopback only when the allowed host
itself is a loopback address or `localhost`.

The host allowlist says which names may be fetched; this guard checks what those names
resolve to at connection time, so a name re-pointed in DNS (rebinding) cannot reach inside.
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: cloud metadata services and ranges that `ipaddress` does not class as special: AWS's IPv6
#: metadata address, Alibaba Cloud's metadata address, and "this network" (0.0.0.0/8)
REFUSED_NETWORKS = {
    ipaddress.ip_network("fd00:ec2::254/128"): "cloud metadata",
    ipaddress.ip_network("100.100.100.200/32"): "cloud metadata",
    ipaddress.ip_network("0.0.0.0/8"): "unspecified",
}


class Refused(OSError):
    """A name that resolves only to addresses the guard refuses."""


def refusal(address: Address, *, loopback_allowed: bool) -> str | None:
    """Why an address may not be fetched from, or None."""
    if isinstance(address, ipaddress.IPv6Address):
        # an IPv4 address inside an IPv6 one (mapped, 6to4) is judged as such
        inner = address.ipv4_mapped or address.sixtofour
        if inner is not None:
            address = inner
    for network, reason in REFUSED_NETWORKS.items():
        if address in network:
            return reason
    if address.is_link_local:
        return "link-local"
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address.is_loopback:
        return None if loopback_allowed else "loopback"
    if address.is_reserved:
        return "reserved"
    return None


def literal_address(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's threaded resolver, minus refused addresses."""

    def __init__(self) -> None:
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        kept: list[ResolveResult] = []
        refused: list[str] = []
        local = host.rstrip(".").lower() == "localhost"  # as the allowed hosts compare
        for result in found:
            reason = refusal(ipaddress.ip_address(result["host"]), loopback_allowed=local)
            if reason is None:
                kept.append(result)
            else:
                refused.append(f"{reason} {result['host']}")
        if not kept:
            raise Refused(
                f"host {host!r} resolves only to refused addresses ({', '.join(refused)})"
            )
        return kept

    async def close(self) -> None:
        await self._inner.close()
