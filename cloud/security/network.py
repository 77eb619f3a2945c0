"""Who sent a request: the TCP peer, or the client a trusted proxy names; and ``ip_whitelist``.

``X-Forwarded-For`` is a list each proxy appends to, so only its right end is trustworthy: walk
it from the right while the hop is one of our ``trusted_proxies``; the first other address is
the client. From an untrusted peer the header is ignored, so a sender cannot spoof its address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from webhook_connect.cloud.security.inbound import Check, InboundRequest, Services, forbidden

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """CIDR ranges or single addresses (already validated by the config model)."""
    return tuple(ipaddress.ip_network(value, strict=False) for value in values)


def parse_address(text: str) -> Address | None:
    """An IP address, unwrapping IPv4-mapped IPv6 (``::ffff:1.2.3.4``); None if malformed."""
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def contains(networks: Sequence[Network], address: Address | None) -> bool:
    return address is not None and any(address in network for network in networks)


def client_address(peer: str, headers: dict[str, str], trusted_proxies: Sequence[Network]) -> str:
    """The address a request came from, believing forwarded headers only from trusted peers."""
    if not trusted_proxies or not contains(trusted_proxies, parse_address(peer)):
        return peer
    forwarded = headers.get("x-forwarded-for")
    if forwarded:
        hops = [hop.strip() for hop in forwarded.split(",")]
        for hop in reversed(hops):
            address = parse_address(hop)
            if address is None:
                return peer  # garbage in the chain: trust nothing beyond the peer
            if not contains(trusted_proxies, address):
                return str(address)
        return str(parse_address(hops[0]))
    real_ip = parse_address(headers.get("x-real-ip", ""))
    return str(real_ip) if real_ip is not None else peer


def build_ip_whitelist(allowed: list[str], services: Services) -> Check:
    """Only senders inside ``allowed`` get in (403 otherwise)."""
    networks = parse_networks(allowed)

    async def check(request: InboundRequest) -> None:
        if not contains(networks, parse_address(request.client)):
            raise forbidden(f"address {request.client} is not allowed")

    return check
