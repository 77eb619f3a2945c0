"""Pull-style delivery for SSE and long-poll: the window and liveness live in storage.

Acks for these transports arrive by ``POST /connect/ack``, possibly at another replica, so the
in-flight window is counted in storage (what the consumer holds), not in this process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from webhook_connect.cloud.buffers import Buffer
from webhook_connect.cloud.sessions import (
    CLOSE_AUTH,
    CLOSE_REMOVED,
    Connection,
    Refusal,
    unavailable,
    wire_messages,
)
from webhook_connect.cloud.tokens import token_in_force
from webhook_connect.shared.exceptions import StorageError
from webhook_connect.shared.frames import WireMessage

TOUCH_INTERVAL = 5.0
IDLE_WAIT = 1.0
FULL_WINDOW_WAIT = 0.05  # acks may come through another replica: look again soon


@dataclass
class Puller:
    buffer: Buffer
    connection: Connection
    sequence: int = 0
    touched_at: float = 0.0
    # Upper bound of what the connection holds: the last count from storage plus what was
    # sent since. Storage is asked again only when the bound says the window may be full.
    held_bound: int = 1 << 30  # unknown until first counted

    async def next_batch(self, max_count: int, deadline: float) -> list[WireMessage]:
        """Messages for this connection, waiting until ``deadline`` (monotonic) for some."""
        buffer, connection = self.buffer, self.connection
        channel, group, consumer = connection.channel, connection.group, connection.consumer
        try:
            while True:
                await self._keep_alive()
                since = buffer.change_version(channel)
                if self.held_bound >= connection.window // 2:
                    self.held_bound = await buffer.pending_count(
                        channel, group, consumer, connection.window
                    )
                room = connection.window - self.held_bound
                if room > 0:
                    deliveries = await buffer.read(channel, group, consumer, min(room, max_count))
                    if deliveries:
                        self.held_bound += len(deliveries)
                        messages = wire_messages(deliveries, channel, self.sequence + 1)
                        self.sequence += len(messages)
                        return messages
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                wait = IDLE_WAIT if room > 0 else FULL_WINDOW_WAIT
                await buffer.wait_for_change(channel, since, min(wait, remaining))
        except StorageError as exc:
            raise unavailable(exc) from exc

    async def _keep_alive(self) -> None:
        now = time.monotonic()
        if now - self.touched_at < TOUCH_INTERVAL:
            return
        self.touched_at = now
        connection = self.connection
        if not await self.buffer.touch_connection(connection.channel, connection.consumer):
            raise Refusal(410, CLOSE_REMOVED, "connection_closed", "connection removed")
        token_id = connection.record.token_id
        tokens = await self.buffer.list_tokens(connection.channel)
        if token_id and not token_in_force(tokens, token_id, time.time()):
            raise Refusal(401, CLOSE_AUTH, "unauthorized", "token revoked or expired")
