"""Who sent a request: the TCP peer, or the client a trusted proxy names; and ``ip_whitelist``.

``X-Forwarded-For`` is a list each proxy appends to, so only its right end is trustworthy: walk
it from the right while the hop is one of our ``trusted_proxies``; the first other address is
the client. From an untrusted peer the header is ignored, so a sender cannot spoof its address.

A header sent on several lines is one list, the lines joined in order (RFC 9110 §5.3): a proxy
such as HAProxy adds its own ``X-Forwarded-For`` line after the sender's, so reading only the
first line would believe the sender. Exactly one header is believed, the webhook's
``client_ip_header`` (the one its proxy sets); the other is ignored, because a proxy that sets
only ``X-Real-IP`` passes a forged ``X-Forwarded-For`` through untouched.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Literal

from webhook_connect.cloud.security.inbound import Check, InboundRequest, Services, forbidden

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
RawHeaders = Sequence[tuple[bytes, bytes]]
ClientIpHeader = Literal["x-forwarded-for", "x-real-ip"]
CLIENT_IP_HEADERS: tuple[ClientIpHeader, ...] = ("x-forwarded-for", "x-real-ip")


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


def header_list(raw_headers: RawHeaders, name: str) -> list[str]:
    """The elements of header ``name`` over all its lines, in order, empty elements dropped
    (RFC 9110 §5.3 and §5.6.1: repeated lines are one comma-separated list)."""
    wanted = name.lower().encode("latin-1")
    elements: list[str] = []
    for key, value in raw_headers:
        if key.lower() == wanted:
            elements += (e.strip() for e in value.decode("latin-1").split(","))
    return [element for element in elements if element]


def client_address(
    peer: str,
    raw_headers: RawHeaders,
    trusted_proxies: Sequence[Network],
    header: ClientIpHeader = "x-forwarded-for",
) -> str:
    """The address a request came from: ``peer``, unless ``peer`` is a trusted proxy, then the
    right-most address of ``header`` (all its lines) that is not a trusted proxy itself."""
    if not trusted_proxies or not contains(trusted_proxies, parse_address(peer)):
        return peer
    hops = header_list(raw_headers, header)
    for hop in reversed(hops):
        address = parse_address(hop)
        if address is None:
            return peer  # garbage in the chain: trust nothing beyond the peer
        if not contains(trusted_proxies, address):
            return str(address)
    # Every hop is one of ours (or there is none): the far end of the chain is the client.
    first = parse_address(hops[0]) if hops else None
    return peer if first is None else str(first)


def build_ip_whitelist(allowed: list[str], services: Services) -> Check:
    """Only senders inside ``allowed`` get in (403 otherwise)."""
    networks = parse_networks(allowed)

    async def check(request: InboundRequest) -> None:
        if not contains(networks, parse_address(request.client)):
            raise forbidden(f"address {request.client} is not allowed")

    return check
