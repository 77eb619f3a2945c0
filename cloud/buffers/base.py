"""The ``Buffer`` protocol every storage backend implements, and the values it trades in.

``Buffer`` is the composition of three narrower protocols, one per concern: the
:class:`MessageQueue` (messages, their delivery and settling, dead letters, history and the
activity feed those steps write), the :class:`Registry` (channels, tokens, consumer groups,
connections) and the :class:`Limits` (replay keys and rate counters). A caller that needs one
concern is typed against that one (``cloud/tokens.py`` takes a ``Registry``).

Semantics shared by every backend (the conformance suite in ``tests/test_buffers.py`` holds
each of them to it):

* A channel is provisioned with a :class:`ChannelSpec`; its limits live in the backend so every
  cloud replica sees the same ones. The ``default`` group exists from provisioning on, so
  messages sent before any connector connects wait for it. Another group starts at the first
  message appended after it joined.
* ``append`` refuses with :class:`~webhook_connect.shared.exceptions.ChannelFull` at
  ``max_queue_size`` retained messages and returns the message id only once the message is durable.
* ``read`` hands a consumer of a group messages nobody else in that group holds, marks them in
  flight and counts the attempt. Each group gets every message.
* ``ack`` removes a message from the group. ``nack(retry=True)`` makes it deliverable again
  after ``retry_delay_seconds`` (capped at the ack timeout); ``nack(retry=False)`` dead-letters
  it. A message in flight longer than ``ack_timeout_seconds`` is deliverable again; one read
  more than ``max_delivery_attempts`` times is dead-lettered instead.
* Every delivery that does not end in an ack (a nack, an ack timeout, a connection that
  closed) is logged with the message, and a dead letter carries that log.
* A message older than ``ttl_seconds`` is expired (counted), never delivered. A message is
  removed from storage only when every group has acked, expired or dead-lettered it.
* Groups have a lifecycle. ``read`` never creates a group (``join`` does), so a group the
  operator dropped stays dropped while its last connections close. ``drop_group`` forgets a
  group with its backlog and removes its connections (their heartbeats then close them); the
  ``default`` group is recreated at once, empty, because messages always wait for it. On a
  channel with ``dynamic_groups``, any other group with no connection for
  ``group_idle_seconds`` is dropped by ``drop_idle_groups``: any connector may create such a
  group (``?group=typo``, a smee-client tried once), and one nobody reads would otherwise keep
  every message until its TTL and fill the channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from webhook_connect.shared.envelope import Envelope

DEFAULT_GROUP = "default"


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """A channel and its limits."""

    name: str
    ttl_seconds: int = 86400
    max_queue_size: int = 10000
    max_connections: int = 10
    max_in_flight: int = 100
    ack_timeout_seconds: float = 30.0
    max_delivery_attempts: int = 5
    retry_delay_seconds: float = 5.0
    # How long a copy of every message is kept for history replay (0: no history).
    history_seconds: int = 0
    # A group other than "default" with no connection this long is dropped with its backlog
    # (0: never). Only on channels with dynamic_groups: elsewhere the operator made each group.
    group_idle_seconds: int = 3600
    # Whether a connection may create a group by naming it; if not, only existing groups
    # (the default one, those the operator added) can be joined.
    dynamic_groups: bool = True


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A connector token as stored: only its hash, never the token."""

    token_id: str
    channel: str
    token_hash: str
    label: str = ""
    created_at: float = 0.0
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message handed to a consumer: ``attempt`` is 1 on first delivery."""

    message_id: str
    attempt: int
    envelope: Envelope


# Outcomes of a delivery the cloud ended itself; a nack's outcome is the connector's reason
# ("http_503", "timeout", "connect_error", ...).
ACK_TIMEOUT = "ack_timeout"
CONNECTION_CLOSED = "connection_closed"
# How many failed deliveries a message keeps the record of (the latest).
ATTEMPTS_KEPT = 50


@dataclass(frozen=True, slots=True)
class DeliveryAttempt:
    """One delivery of a message that did not end in an ack."""

    attempt: int  # 1 for the first delivery
    time: float  # when it was handed to the connection
    connection: str  # the connection (consumer) that held it
    connector: str  # the connector id that connection gave, "" if none
    outcome: str  # the nack's reason, ACK_TIMEOUT or CONNECTION_CLOSED
    duration: float  # seconds from delivery to the outcome

    @property
    def status_code(self) -> int | None:
        """The target's HTTP status, when the connector nacked with ``http_<status>``."""
        prefix, _, code = self.outcome.partition("_")
        return int(code) if prefix == "http" and code.isdigit() else None


def encode_attempts(attempts: list[DeliveryAttempt]) -> bytes:
    """The storage form of an attempt log, as the Redis scripts write it too (times in ms)."""
    return orjson.dumps(
        [
            [
                a.attempt,
                round(a.time * 1000),
                a.connection,
                a.connector,
                a.outcome,
                round(a.duration * 1000),
            ]
            for a in attempts[-ATTEMPTS_KEPT:]
        ]
    )


def decode_attempts(raw: bytes | str | None) -> tuple[DeliveryAttempt, ...]:
    """An attempt log from storage; nothing (or an empty Lua table, ``{}``) is no attempts."""
    rows: Any = orjson.loads(raw) if raw else []
    if not isinstance(rows, list):
        return ()
    return tuple(
        DeliveryAttempt(
            int(n),
            t / 1000,
            str(connection),
            connector if isinstance(connector, str) else "",
            str(outcome),
            duration / 1000,
        )
        for n, t, connection, connector, outcome, duration in rows
    )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message a group gave up on, with why, after how many attempts, and each of them."""

    dead_letter_id: str
    message_id: str
    group: str
    reason: str
    attempts: int
    dead_at: float
    envelope: Envelope
    delivery_attempts: tuple[DeliveryAttempt, ...] = ()


@dataclass(frozen=True, slots=True)
class ChannelEvent:
    """One line of a channel's recent-activity feed (for the dashboard)."""

    time: float
    type: str  # "received", "delivered" or "dead_lettered"
    message_id: str
    consumer: str = ""


# How many recent events a channel keeps.
EVENTS_KEPT = 200


@dataclass(slots=True)
class ChannelStats:
    """Counters and gauges of one channel."""

    depth: int = 0
    in_flight: int = 0
    dead_letters: int = 0
    oldest_age_seconds: float | None = None
    counters: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """A live connector connection, kept in storage so every replica can see and act on it."""

    connection_id: str
    channel: str
    group: str
    connector_id: str = ""
    transport: str = "websocket"
    address: str = ""
    token_id: str = ""
    connected_at: float = 0.0
    seen_at: float = 0.0
    delivered: int = 0  # messages it acked, filled in when connections are listed


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """A consumer group and what it holds back."""

    name: str
    backlog: int  # messages the group has not acked yet: unread, in flight or waiting to retry
    in_flight: int  # of those, held by a connection or waiting for a retry
    oldest_age_seconds: float | None  # age of its oldest message not acked, None if none
    connections: int  # live connections of the group
    last_seen: float  # when a connection of the group was last alive (or it was created)


# A connection not heard of for this long is gone (its replica died): it no longer counts.
CONNECTION_STALE_SECONDS = 30.0

COUNTERS = ("accepted", "delivered", "redelivered", "dead_lettered", "expired")


class MessageQueue(Protocol):
    """The messages of a channel: stored, handed out, settled, expired, dead-lettered, replayed.

    The recent-activity feed lives here too: it is written by the queue's own steps (received,
    delivered, dead-lettered), in the same transaction or script. So is ``append_once``: the
    idempotency check must be one atomic step with the store it guards.
    """

    async def append(self, envelope: Envelope) -> str:
        """Store ``envelope`` durably in its channel and return the message id."""

    async def append_once(
        self, envelope: Envelope, key: str, window_seconds: float
    ) -> tuple[str, bool]:
        """Store ``envelope`` unless one with the same ``key`` was stored on its channel in the
        last ``window_seconds`` (a provider's retry). Returns the message id, the original one
        for a repeat, and whether this call stored it. Check and store are one atomic step."""

    async def read(self, channel: str, group: str, consumer: str, count: int) -> list[Delivery]:
        """Take up to ``count`` deliverable messages for ``consumer`` of ``group``; nothing if
        the group does not exist (it was dropped: ``join`` first)."""

    async def ack(self, channel: str, group: str, message_id: str, consumer: str = "") -> bool:
        """Remove a message from ``group``; False if it was not in flight (for ``consumer``)."""

    async def nack(
        self,
        channel: str,
        group: str,
        message_id: str,
        *,
        retry: bool,
        consumer: str = "",
        reason: str = "",
    ) -> bool:
        """Give a message back for a later attempt, or dead-letter it."""

    async def release(self, channel: str, group: str, consumer: str) -> int:
        """Return everything ``consumer`` holds to the group at once (it disconnected)."""

    async def pending_count(self, channel: str, group: str, consumer: str, limit: int) -> int:
        """How many messages ``consumer`` holds, counted up to ``limit`` (its window)."""

    async def housekeep(self, channel: str) -> int:
        """Expire messages past their TTL and drop what every group is done with."""

    def wake(self, channel: str) -> None:
        """Wake this process's readers of ``channel`` (acks freed room in a window)."""

    def change_version(self, channel: str) -> int:
        """A number that changes whenever messages may have become deliverable."""

    async def wait_for_change(self, channel: str, since: int, max_wait: float) -> None:
        """Wait until ``change_version`` differs from ``since`` (any replica), or ``max_wait``."""

    async def dead_letters(self, channel: str, limit: int = 100) -> list[DeadLetter]: ...

    async def replay_dead_letters(self, channel: str, ids: list[str] | None = None) -> int:
        """Deliver dead letters again, each to the group that gave up on it, with new ids."""

    async def purge_dead_letters(self, channel: str, ids: list[str] | None = None) -> int: ...

    async def replay_history(
        self, channel: str, group: str, since: float, limit: int = 10000
    ) -> int:
        """Deliver again to ``group`` (only) the messages received since ``since`` that the
        channel's history still holds (``history_seconds``), as new messages; oldest first, at
        most ``limit``. Returns how many."""

    async def stats(self, channel: str) -> ChannelStats: ...

    async def recent_events(self, channel: str, limit: int = 50) -> list[ChannelEvent]:
        """The channel's latest received, delivered and dead-lettered messages, newest first
        (at most EVENTS_KEPT are kept), as every replica recorded them."""


class Registry(Protocol):
    """What exists: channels and their limits, connector tokens, consumer groups, and the live
    connections of every replica."""

    async def provision(self, spec: ChannelSpec) -> None:
        """Create the channel, or update its limits; existing messages are kept."""

    async def get_channel(self, name: str) -> ChannelSpec | None: ...

    async def list_channels(self) -> list[ChannelSpec]: ...

    async def delete_channel(self, name: str) -> bool:
        """Remove the channel with its messages, dead letters and tokens."""

    async def put_token(self, token: TokenRecord) -> None: ...

    async def find_token(self, token_hash: str) -> TokenRecord | None: ...

    async def list_tokens(self, channel: str) -> list[TokenRecord]: ...

    async def delete_token(self, channel: str, token_id: str) -> bool: ...

    async def join(self, channel: str, group: str) -> None:
        """Make sure ``group`` exists on ``channel`` (new groups start at the next message)."""

    async def has_group(self, channel: str, group: str) -> bool:
        """Whether ``group`` exists on ``channel``."""

    async def list_groups(self, channel: str) -> list[GroupInfo]:
        """Every group of ``channel`` with its backlog, sorted by name."""

    async def drop_group(self, channel: str, group: str) -> int | None:
        """Forget ``group`` and its backlog and remove its connections; the ``default`` group
        is recreated at once, empty. Returns how many connections were removed, None if there
        was no such group."""

    async def drop_idle_groups(self, channel: str) -> list[str]:
        """Drop the groups other than ``default`` with no connection for the channel's
        ``group_idle_seconds`` (only with ``dynamic_groups``); returns their names."""

    async def add_connection(self, record: ConnectionRecord, limit: int) -> bool:
        """Register a connection unless ``limit`` live ones exist already."""

    async def touch_connection(self, channel: str, connection_id: str) -> bool:
        """Mark a connection alive; False if it was removed (disconnect it)."""

    async def remove_connection(self, channel: str, connection_id: str) -> bool: ...

    async def get_connection(self, channel: str, connection_id: str) -> ConnectionRecord | None: ...

    async def list_connections(self, channel: str) -> list[ConnectionRecord]: ...

    async def reap_connections(self, channel: str) -> int:
        """Forget connections not heard of for CONNECTION_STALE_SECONDS; return what they
        held to the channel at once. Returns how many were reaped."""


class Limits(Protocol):
    """Short-lived counters every replica shares: replayed nonces and rate windows. Losing
    them (a power cut) only forgets a limit for one window; they never hold a message."""

    async def remember(self, key: str, ttl_seconds: float) -> bool:
        """Record ``key`` for ``ttl_seconds``, for every replica; False if it was recorded
        already (a replayed nonce)."""

    async def hit_rate(self, channel: str, key: str, limit: int, window_seconds: float) -> float:
        """Count one request against ``key`` in the current window of ``window_seconds``.
        Returns 0 while at most ``limit`` requests fell in the window, else the seconds until
        it ends (for ``Retry-After``). Shared by every replica."""


class Buffer(MessageQueue, Registry, Limits, Protocol):
    """Durable per-channel message storage with consumer groups: the three concerns one
    backend implements together. Take the narrow protocol where a caller needs only one."""

    url: str

    async def aclose(self) -> None: ...

    async def ping(self) -> None:
        """Raise :class:`~webhook_connect.shared.exceptions.StorageUnavailable` if it fails."""
