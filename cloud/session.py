"""The consumer session: the delivery rules of one connector connection, without any I/O.

A :class:`ConsumerSession` holds what the cloud knows about one consumer of a group: its
in-flight window, the sequence numbers it was sent, when each message left, and when the next
heartbeat and the next liveness check are due. It is driven by events (messages read and sent,
an ack or nack, a count from storage, a liveness answer) and by the clock the caller passes in
(``now``, monotonic seconds unless said otherwise); it never sleeps, reads or sends. The
transports (``stream.py`` for WebSocket, ``pullroutes.py`` for SSE and long-poll, ``smee.py``)
are pumps around it: they do what it decides, the way the ``websockets`` library's
connection pumps its ``protocol.py``.

Two kinds of window share the object:

* **local** (WebSocket): acks come back on the same connection, so the session knows exactly
  which messages are in flight, answers unknown, duplicate and stale acks itself, and times
  each ack.
* **counted** (SSE, long-poll): acks arrive by ``POST /connect/ack``, possibly at another
  replica, so storage knows what the consumer holds. The session keeps an upper bound: the
  last count from storage plus what was sent since, and asks for a new count only when the
  bound says the window may be half full or more.

The rules it keeps are written in ``docs/SEMANTICS.md``: §3 the in-flight window, §4 settling,
§6 liveness and revocation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from webhook_connect.cloud.buffers import Delivery, TokenRecord
from webhook_connect.cloud.tokens import token_in_force
from webhook_connect.shared.exceptions import ConnectorRefusal
from webhook_connect.shared.frames import Settlement, WireMessage

READ_BATCH = 100  # most messages asked of storage, and sent, at once
UNKNOWN_HELD = 1 << 30  # a counted window before its first count: assume full

CLOSE_AUTH = 4001
CLOSE_REMOVED = 4002

# Why liveness ends a connection: (status, close code, error, reason) of a ConnectorRefusal,
# made afresh each time (a raised exception keeps the frames it passed through).
REMOVED = (410, CLOSE_REMOVED, "connection_closed", "connection removed")
REVOKED = (401, CLOSE_AUTH, "unauthorized", "token revoked or expired")


def liveness(
    alive: bool, tokens: Sequence[TokenRecord], token_id: str, now: float
) -> ConnectorRefusal | None:
    """Why a connection must end now, if it must: its record was removed from storage (the
    operator disconnected it), or the token that opened it was revoked or expired by ``now``
    (wall-clock seconds). ``alive`` is what touching the record answered."""
    if not alive:
        return ConnectorRefusal(*REMOVED)
    if token_id and not token_in_force(list(tokens), token_id, now):
        return ConnectorRefusal(*REVOKED)
    return None


@dataclass(frozen=True, slots=True)
class SettlePlan:
    """What to ask storage for one settlement: ``settlement.ids`` are the messages to ack or
    nack there; ``unknown`` are ids this session did not hold (told back to the connector)."""

    settlement: Settlement
    unknown: tuple[str, ...] = ()
    sent_at: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SettleOutcome:
    """What storage did with a plan: ``settled`` pairs each id with whether storage took it;
    ``latencies`` are the seconds from send to ack of the acked ids this session timed;
    ``rejected`` are the ids to report as ``unknown_message`` (unknown, then stale)."""

    settled: list[tuple[str, bool]]
    latencies: list[float]
    rejected: list[str]


def remote_plan(settlement: Settlement) -> SettlePlan:
    """A plan for a settlement that reached a replica without the session (``POST
    /connect/ack``): every id goes to storage, which checks it per consumer."""
    return SettlePlan(settlement)


def settle_outcome(plan: SettlePlan, results: Sequence[bool], now: float) -> SettleOutcome:
    """Join storage's answers to a plan. An id storage refused is *stale*: at-least-once
    delivery gave it to another consumer after an ack timeout, so this ack came too late."""
    settled = list(zip(plan.settlement.ids, results, strict=True))
    latencies = []
    if plan.settlement.ack:
        latencies = [now - plan.sent_at[i] for i, ok in settled if ok and i in plan.sent_at]
    stale = [i for i, ok in settled if not ok]
    return SettleOutcome(settled, latencies, [*plan.unknown, *stale])


class ConsumerSession:
    """The window, sequence, send times and deadlines of one consumer connection."""

    def __init__(
        self,
        channel: str,
        window: int,
        *,
        now: float,
        counted: bool,
        heartbeat_seconds: float,
        check_seconds: float,
        check_at_start: bool,
    ) -> None:
        self.channel = channel
        self.window = window
        self.counted = counted
        self.sequence = 0
        self.in_flight: dict[str, float] = {}  # local window: message id -> sent at
        self.held_bound = UNKNOWN_HELD if counted else 0
        # Refill a local window in chunks, not one ack at a time: fewer, fuller reads and
        # frames. A counted window reads whenever it has room (its bound is coarse anyway).
        self.low_water = max(1, min(window // 4, READ_BATCH // 4)) if not counted else 1
        self.heartbeat_seconds = heartbeat_seconds
        self.check_seconds = check_seconds
        self.beat_at = now + heartbeat_seconds
        self.check_at = now if check_at_start else now + check_seconds

    @classmethod
    def local(
        cls, channel: str, window: int, *, now: float, heartbeat_seconds: float
    ) -> ConsumerSession:
        """A WebSocket session: acks come back here; liveness is checked with each beat."""
        beat = heartbeat_seconds
        return cls(
            channel,
            window,
            now=now,
            counted=False,
            heartbeat_seconds=beat,
            check_seconds=beat,
            check_at_start=False,
        )

    @classmethod
    def counted_in_storage(
        cls,
        channel: str,
        window: int,
        *,
        now: float,
        heartbeat_seconds: float,
        check_seconds: float,
    ) -> ConsumerSession:
        """An SSE or long-poll session: storage counts the window; liveness is checked at once
        (a long-poll connection may have been removed between polls), then every
        ``check_seconds``."""
        beat, check = heartbeat_seconds, check_seconds
        return cls(
            channel,
            window,
            now=now,
            counted=True,
            heartbeat_seconds=beat,
            check_seconds=check,
            check_at_start=True,
        )

    # Window and refill ---------------------------------------------------------------------

    @property
    def held(self) -> int:
        """What the consumer holds: exact for a local window, an upper bound if counted."""
        return self.held_bound if self.counted else len(self.in_flight)

    def count_due(self) -> bool:
        """Whether to ask storage how much a counted window holds before reading."""
        return self.counted and self.held_bound >= self.window // 2

    def counted_held(self, held: int) -> None:
        """Storage counted what the consumer holds."""
        self.held_bound = held

    def read_size(self, max_count: int = READ_BATCH) -> int:
        """How many messages to read now; 0 means wait for room (an ack, or a recount)."""
        room = self.window - self.held
        if room <= 0 or (room < self.low_water and self.held > 0):
            return 0
        return min(room, max_count)

    def sent(self, deliveries: Sequence[Delivery], now: float) -> list[WireMessage]:
        """Number the deliveries about to be sent and count them as held from ``now``."""
        messages = []
        for delivery in deliveries:
            self.sequence += 1
            if not self.counted:
                self.in_flight[delivery.message_id] = now
            message_id, attempt = delivery.message_id, delivery.attempt
            messages.append(
                WireMessage(message_id, self.sequence, attempt, self.channel, delivery.envelope)
            )
        if self.counted:
            self.held_bound += len(deliveries)
        return messages

    # Settling ------------------------------------------------------------------------------

    def settle(self, settlement: Settlement) -> SettlePlan:
        """Take a connector's ack or nack off the local window. Ids it does not hold (never
        sent, already settled, or repeated within the settlement) are ``unknown``: storage is
        not asked about them. The window has room again at once, before storage answers."""
        if self.counted:
            return remote_plan(settlement)
        known: list[str] = []
        unknown: list[str] = []
        sent_at: dict[str, float] = {}
        for message_id in settlement.ids:
            sent = self.in_flight.pop(message_id, None)
            if sent is None:
                unknown.append(message_id)
            else:
                known.append(message_id)
                sent_at[message_id] = sent
        known_ids = Settlement(
            tuple(known), ack=settlement.ack, retry=settlement.retry, note=settlement.note
        )
        return SettlePlan(known_ids, tuple(unknown), sent_at)

    # Deadlines -----------------------------------------------------------------------------

    def heartbeat_due(self, now: float) -> bool:
        return now >= self.beat_at

    def heartbeat_sent(self, now: float) -> None:
        self.beat_at = now + self.heartbeat_seconds

    def check_due(self, now: float) -> bool:
        """Whether to touch the connection's record and re-read its tokens now."""
        return now >= self.check_at

    def checked(self, now: float) -> None:
        self.check_at = now + self.check_seconds

    def next_deadline(self) -> float:
        """The earliest moment the session has something to do without an event."""
        return min(self.beat_at, self.check_at)
