"""A channel's room for more messages, as the RabbitMQ backend estimates it between two looks
at the broker: asking the broker each group's depth before every publish cost two round trips
per group per webhook (ingest ran at under 200 req/s).

The estimate never undercounts what this replica did: it starts from a measurement (each
group's ready, retrying and held messages) and adds every message this replica appended
since. Acks only lower the real figure, so a channel the estimate finds full is measured
again before it is refused, and a channel with room is measured at least every
``REFRESH_SECONDS`` (what other replicas appended, a changed limit). Pure logic, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from webhook_connect.cloud.buffers.base import ChannelSpec

# How old a measurement may get before the next append takes a new one.
REFRESH_SECONDS = 0.5
# A channel found full is measured again at most this often, unless this replica freed room
# since (an ack, a dead letter, an expiry): a full channel under load must not turn every
# refused webhook into broker round trips.
RECHECK_SECONDS = 0.05


@dataclass(slots=True)
class Room:
    """What one measurement found, and what this replica did since."""

    spec: ChannelSpec
    backlogs: dict[str, int]  # group -> ready + retrying + held, when measured
    measured_at: float  # time.monotonic()
    added: int = 0  # messages this replica appended since
    freed: bool = False  # this replica settled a message since (the estimate may be high)
    groups: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.groups = tuple(self.backlogs)

    def fullest(self) -> tuple[str, int]:
        """The group with the largest estimated backlog, and that backlog."""
        if not self.backlogs:
            return "", self.added
        group = max(self.backlogs, key=lambda name: (self.backlogs[name], name))
        return group, self.backlogs[group] + self.added

    def is_full(self) -> bool:
        return self.fullest()[1] >= self.spec.max_queue_size

    def stale(self, now: float) -> bool:
        """Whether the next append must measure again before it is let in or refused."""
        age = now - self.measured_at
        if age >= REFRESH_SECONDS:
            return True
        return self.is_full() and (self.freed or age >= RECHECK_SECONDS)
