"""Pure delivery policy: what an HTTP answer means, how long to wait, when to reconnect.

Nothing here sleeps, reads a clock or touches a socket; ``now`` and randomness come in as
arguments so every rule is tested synchronously.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

RETRYABLE_STATUSES = frozenset({408, 425, 429})
# Headers that describe one hop, not the message: never forwarded to a target.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "expect",
        "host",
        "content-length",
    }
)


class Outcome(enum.Enum):
    DELIVERED = "delivered"  # 2xx: ack
    RETRY = "retry"  # 408/429/5xx, timeout, connection error: try again, then nack(retry)
    REJECTED = "rejected"  # any other status: nack without retry (dead letter)


def classify_status(status: int) -> Outcome:
    """The connector's retry rule (docs/CONFIGURATION.md): 2xx acks; 408/429/5xx retry;
    any other 4xx dead-letters."""
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status in RETRYABLE_STATUSES or status >= 500:
        return Outcome.RETRY
    return Outcome.REJECTED


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


def retry_delay(
    attempt: int,
    *,
    initial: float,
    multiplier: float,
    maximum: float,
    retry_after: float | None = None,
) -> float:
    """Delay before retry number ``attempt`` (1-based); a server's Retry-After wins, capped."""
    if retry_after is not None:
        return min(retry_after, maximum)
    return min(initial * multiplier ** (attempt - 1), maximum)


@dataclass
class Backoff:
    """Reconnect schedule: exponential with "equal jitter", reset after a good connection."""

    initial: float = 1.0
    maximum: float = 60.0
    multiplier: float = 2.0
    failures: int = 0

    def next_delay(self, rng: random.Random) -> float:
        base = min(self.initial * self.multiplier**self.failures, self.maximum)
        self.failures += 1
        return base / 2 + rng.uniform(0, base / 2)

    def reset(self) -> None:
        self.failures = 0
