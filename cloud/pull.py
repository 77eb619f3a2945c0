"""Pull-style delivery for SSE and long-poll: the window and liveness live in storage.

Acks for these transports arrive by ``POST /connect/ack``, possibly at another replica, so the
in-flight window is counted in storage (what the consumer holds), not in this process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from webhook_connect.cloud.buffers import Buffer
from webhook_connect.cloud.session import ConsumerSession
from webhook_connect.cloud.sessions import Connection, check_liveness, unavailable
from webhook_connect.shared.exceptions import StorageError
from webhook_connect.shared.frames import WireMessage

TOUCH_INTERVAL = 5.0
IDLE_WAIT = 1.0
FULL_WINDOW_WAIT = 0.05  # acks may come through another replica: look again soon
HEARTBEAT_SECONDS = 5.0


@dataclass
class Puller:
    """The pump of one SSE stream or long-poll: reads what its session has room for."""

    buffer: Buffer
    connection: Connection
    heartbeat_seconds: float = HEARTBEAT_SECONDS
    session: ConsumerSession = field(init=False)

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
        buffer, connection, session = self.buffer, self.connection, self.session
        channel, group, consumer = connection.channel, connection.group, connection.consumer
        try:
            while True:
                since = buffer.change_version(channel)
                count = await self._room(max_count)
                if count > 0:
                    deliveries = await buffer.read(channel, group, consumer, count)
                    if deliveries:
                        return session.sent(deliveries, time.monotonic())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                wait = IDLE_WAIT if count > 0 else FULL_WINDOW_WAIT
                await buffer.wait_for_change(channel, since, min(wait, remaining))
        except StorageError as exc:
            raise unavailable(exc) from exc

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
