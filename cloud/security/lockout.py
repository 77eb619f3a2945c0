"""Source addresses that failed authentication too often, refused before any signature work.

Failures are counted in storage (``Limits.hit_rate``, cloud/buffers/base.py), so every replica
adds to one count per address. What a process learns from that count, "this address is over its
limit until T", is kept here, in memory: the refusals that follow cost neither a storage round
trip nor a signature. Another replica learns it at the address's next failure there, so a
locked-out address gets at most one more failure through per replica and window.

Pure logic: the clock comes in as an argument.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

# An IPv6 subscriber gets a /64 at least: counted per address, one host would have 2^64 fresh
# quotas. An IPv4 address is counted alone (a NAT may hide many honest senders behind it, but
# so may any per-address limit).
IPV6_PREFIX = 64
CAPACITY = 10_000  # addresses remembered per process; a flood from more forgets the oldest


def source_key(client: str) -> str:
    """What one source is counted as: the address, or its /64 for IPv6."""
    if ":" not in client:
        # IPv4 as the server or the client address header gave it: already canonical (the
        # ipaddress module accepts nothing else), and on every request, so not parsed again.
        return client
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client  # not an address (a Unix socket peer): counted as itself
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)


@dataclass
class Lockouts:
    """Keys refused until a monotonic instant, at most ``capacity`` of them."""

    capacity: int = CAPACITY
    _until: dict[str, float] = field(default_factory=dict)

    def remaining(self, key: str, now: float) -> float:
        """Seconds ``key`` stays locked out after ``now`` (0 when it is not)."""
        until = self._until.get(key)
        if until is None:
            return 0.0
        if until <= now:
            del self._until[key]
            return 0.0
        return until - now

    def lock(self, key: str, until: float, now: float) -> None:
        """Refuse ``key`` until ``until``."""
        if key not in self._until and len(self._until) >= self.capacity:
            self._prune(now)
        self._until[key] = until

    def _prune(self, now: float) -> None:
        for key in [key for key, until in self._until.items() if until <= now]:
            del self._until[key]
        while len(self._until) >= self.capacity:  # all still locked: forget the oldest
            del self._until[next(iter(self._until))]
