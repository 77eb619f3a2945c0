"""Pull-style delivery for SSE and long-poll: the window and liveness live in storage.

Acks for these transports arrive by ``POST /connect/ack``, possibly at another replica, so the
in-flight window is counted in storage (what the consumer holds), not in this process.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from webhook_connect.cloud.buffers import Buffer, Delivery
from webhook_connect.cloud.session import ConsumerSession
from webhook_connect.cloud.sessions import Connection, check_liveness, unavailable
from webhook_connect.cloud.stream import IDLE_WAIT, IDLE_WAIT_MAX
from webhook_connect.shared.exceptions import StorageError
from webhook_connect.shared.frames import WireMessage

TOUCH_INTERVAL = 5.0
FULL_WINDOW_WAIT = 0.05  # acks may come through another replica: look again soon
HEARTBEAT_SECONDS = 5.0


class Unacknowledged(Exception):
    """A stream read back a message it had itself sent: nothing acknowledged it within the ack
    timeout. Its peer is gone (a blackholed link: the writes still succeed) or its acks are
    lost; either way the stream must end so that what it holds goes to a live connection."""


@dataclass(slots=True)
class IdleReads:
    """When a pull that found nothing reads storage again (no I/O; ``now`` monotonic).

    As the WebSocket pump: ``IDLE_WAIT`` after an empty read, then a second longer after each
    empty read that nothing announced, up to ``longest``; at once when a change was announced
    since (``version``: the channel's change version the empty read saw). A message appended
    anywhere is announced, so only what nothing announces (an ack timeout's redelivery, the
    end of a retry delay) reaches an idle connection up to ``longest`` late. 10,000 idle SSE
    connectors otherwise cost 10,000 storage reads a second.
    """

    longest: float = IDLE_WAIT_MAX
    wait: float = IDLE_WAIT
    version: int | None = None
    read_at: float = 0.0

    def is_due(self, version: int, now: float) -> bool:
        return version != self.version or now >= self.read_at

    def found_nothing(self, version: int, now: float) -> None:
        if version == self.version:
            self.wait = min(self.wait + IDLE_WAIT, self.longest)
        self.version, self.read_at = version, now + self.wait

    def found(self) -> None:
        self.version, self.wait = None, IDLE_WAIT


@dataclass
class Puller:
    """The pump of one SSE stream or long-poll: reads what its session has room for, spacing
    out reads that find nothing (:class:`IdleReads`)."""

    buffer: Buffer
    connection: Connection
    heartbeat_seconds: float = HEARTBEAT_SECONDS
    idle: IdleReads = field(default_factory=IdleReads)
    # An SSE stream: one TCP stream, so what it sent arrived unless the stream is dead. A
    # message that comes back to it past the ack timeout raises Unacknowledged (a long poll's
    # answer can be lost with the connection alive, so it gets such a message again instead).
    ends_on_own_redelivery: bool = False
    session: ConsumerSession = field(init=False)
    # The ids last sent, oldest first, from the first delivery on (an idle stream keeps none).
    _recent: deque[str] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.session = ConsumerSession.counted_in_storage(
            self.connection.channel,
            self.connection.window,
            now=time.monotonic(),
            heartbeat_seconds=self.heartbeat_seconds,
            check_seconds=TOUCH_INTERVAL,
        )

    async def next_batch(self, max_count: int, deadline: float) -> list[WireMessage]:
        """Messages for this connection, waiting until ``deadline`` (monotonic) for some."""
        buffer, connection, session, idle = self.buffer, self.connection, self.session, self.idle
        channel, group, consumer = connection.channel, connection.group, connection.consumer
        try:
            while True:
                since = buffer.change_version(channel)
                until = idle.read_at
                if idle.is_due(since, time.monotonic()):
                    # The liveness check waits for a due read too: at most IDLE_WAIT_MAX late,
                    # well within CONNECTION_STALE_SECONDS.
                    count = await self._room(max_count)
                    if count == 0:
                        until = time.monotonic() + FULL_WINDOW_WAIT
                    else:
                        deliveries = await buffer.read(channel, group, consumer, count)
                        if deliveries:
                            idle.found()
                            if self.ends_on_own_redelivery:
                                self._remember(deliveries)
                            return session.sent(deliveries, time.monotonic())
                        idle.found_nothing(since, time.monotonic())
                        until = idle.read_at
                now = time.monotonic()
                if now >= deadline:
                    return []
                await buffer.wait_for_change(channel, since, max(0.0, min(until, deadline) - now))
        except StorageError as exc:
            raise unavailable(exc) from exc

    def nacked(self, message_ids: list[str]) -> None:
        """The connector nacked these (through this process): they may come back."""
        recent = self._recent
        if recent is not None:
            for message_id in message_ids:
                if message_id in recent:
                    recent.remove(message_id)

    def _remember(self, deliveries: list[Delivery]) -> None:
        recent = self._recent
        if recent is None:
            # What a stream holds unacknowledged is among the last ``window`` ids it sent,
            # but for the odd slow one; twice that bounds the memory of a busy stream.
            recent = self._recent = deque(maxlen=2 * self.connection.window)
        # Only a redelivery is looked for (a scan of at most twice the window).
        for delivery in deliveries:
            if delivery.attempt > 1 and delivery.message_id in recent:
                raise Unacknowledged(delivery.message_id)
        recent.extend(delivery.message_id for delivery in deliveries)

    async def _room(self, max_count: int) -> int:
        """How many messages to read now, after the liveness check and the window count the
        session asks for (a removed connection or revoked token raises its refusal)."""
        session, connection = self.session, self.connection
        if session.check_due(now := time.monotonic()):
            session.checked(now)
            await check_liveness(self.buffer, connection)
        if session.count_due():
            held = await self.buffer.pending_count(
                connection.channel, connection.group, connection.consumer, session.window
            )
            session.counted_held(held)
        return session.read_size(max_count)
