"""``WS /connect/stream/{channel}``: push messages to a connector, take its acks and nacks.

One :class:`StreamSession` per connection runs three tasks: *pump* reads from the buffer while
the in-flight window has room and sends; *listen* applies the connector's frames; *beat* sends
heartbeats and keeps the connection's record alive in storage. The first to end (disconnect,
bad frame, revoked token) ends the others; whatever the connection still held goes back to the
channel at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from starlette.websockets import WebSocket, WebSocketDisconnect

from webhook_connect.cloud import logs, metrics
from webhook_connect.cloud.buffers import Buffer, Delivery
from webhook_connect.cloud.sessions import (
    CLOSE_AUTH,
    CLOSE_BAD_REQUEST,
    CLOSE_REMOVED,
    CLOSE_UNAVAILABLE,
    Connection,
    Refusal,
    close_connection,
    open_connection,
)
from webhook_connect.cloud.tokens import token_in_force
from webhook_connect.shared.exceptions import StorageError
from webhook_connect.shared.frames import (
    NATIVE_SUBPROTOCOL,
    AckFrame,
    FrameError,
    NackFrame,
    WireMessage,
    encode_connected,
    encode_error,
    encode_heartbeat,
    encode_native_batch,
    encode_seed_message,
    parse_client_frame,
)

logger = logging.getLogger("webhook_connect.stream")

READ_BATCH = 100
IDLE_WAIT = 1.0  # also how soon an ack-timeout redelivery is noticed without a notification
SEND_TIMEOUT = 10.0  # per frame: a connector that cannot take 1 MiB in 10 s is not reading
FRAME_BUDGET = 1024 * 1024  # native frames hold messages up to about this many body bytes
CLOSE_TIMEOUT = 5.0

CLOSE_SLOW = 4408


@dataclass(frozen=True, slots=True)
class StreamSettings:
    heartbeat_seconds: float = 5.0


class SessionEnded(Exception):
    """Ends a session with a close code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class StreamSession:
    websocket: WebSocket
    buffer: Buffer
    connection: Connection
    native: bool
    settings: StreamSettings
    in_flight: dict[str, float] = field(default_factory=dict)  # message id: monotonic sent at
    room: asyncio.Event = field(default_factory=asyncio.Event)
    sequence: int = 0

    @property
    def channel(self) -> str:
        return self.connection.channel

    @property
    def group(self) -> str:
        return self.connection.group

    @property
    def consumer(self) -> str:
        return self.connection.consumer

    @property
    def window(self) -> int:
        return self.connection.window

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self.pump()),
            asyncio.create_task(self.listen()),
            asyncio.create_task(self.beat()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        ended = next((t.exception() for t in done if t.exception() is not None), None)
        if isinstance(ended, SessionEnded):
            logger.info("closing %s: %s", self.consumer, ended.reason)
            await self.close(ended.code, ended.reason)
        elif ended is not None and not isinstance(ended, WebSocketDisconnect):
            logger.error("stream %s failed: %r", self.consumer, ended)
            await self.close(1011, "internal error")

    async def close(self, code: int, reason: str) -> None:
        # A peer that does not read cannot take a close frame either: do not wait on it.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.websocket.close(code, reason), CLOSE_TIMEOUT)

    async def pump(self) -> None:
        # Refill the window in chunks, not one ack at a time: fewer, fuller reads and frames.
        low_water = max(1, min(self.window // 4, READ_BATCH // 4))
        while True:
            room = self.window - len(self.in_flight)
            if room <= 0 or (room < low_water and self.in_flight):
                self.room.clear()
                await self.room.wait()
                continue
            since = self.buffer.change_version(self.channel)
            try:
                deliveries = await self.buffer.read(
                    self.channel, self.group, self.consumer, min(room, READ_BATCH)
                )
            except StorageError as exc:
                raise SessionEnded(CLOSE_UNAVAILABLE, "storage unavailable") from exc
            if not deliveries:
                await self.buffer.wait_for_change(self.channel, since, IDLE_WAIT)
                continue
            await self.send_messages(deliveries)

    async def send_messages(self, deliveries: list[Delivery]) -> None:
        messages = []
        sent_at = time.monotonic()
        for delivery in deliveries:
            self.sequence += 1
            self.in_flight[delivery.message_id] = sent_at
            messages.append(
                WireMessage(
                    delivery.message_id,
                    self.sequence,
                    delivery.attempt,
                    self.channel,
                    delivery.envelope,
                )
            )
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                if self.native:
                    for frame in split_frames(messages, FRAME_BUDGET):
                        await self.websocket.send_bytes(encode_native_batch(frame))
                else:
                    for message in messages:
                        await self.websocket.send_text(encode_seed_message(message).decode())
        except TimeoutError:
            raise SessionEnded(CLOSE_SLOW, "slow consumer: not reading") from None
        logs.log_redeliveries(self.group, self.consumer, messages)

    async def listen(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                raise SessionEnded(CLOSE_BAD_REQUEST, "binary frames are not accepted here")
            try:
                frame = parse_client_frame(text)
            except FrameError as exc:
                raise SessionEnded(CLOSE_BAD_REQUEST, f"malformed frame: {exc}"[:120]) from None
            if isinstance(frame, AckFrame):
                await self.settle(frame.ids(), None)
            elif isinstance(frame, NackFrame):
                await self.settle((frame.message_id,), frame)

    async def settle(self, message_ids: tuple[str, ...], nack: NackFrame | None) -> None:
        unknown = [i for i in message_ids if i not in self.in_flight]
        known = [i for i in message_ids if i in self.in_flight]
        sent_at = {i: self.in_flight.pop(i) for i in dict.fromkeys(known)}
        self.room.set()
        try:
            if nack is None:
                results = await asyncio.gather(
                    *(self.buffer.ack(self.channel, self.group, i, self.consumer) for i in known)
                )
            else:
                reason = nack.reason or ("nack_retry" if nack.retry else "nack")
                results = [
                    await self.buffer.nack(
                        self.channel, self.group, i, retry=nack.retry,
                        consumer=self.consumer, reason=reason,
                    )
                    for i in known
                ]  # fmt: skip
        except StorageError as exc:
            raise SessionEnded(CLOSE_UNAVAILABLE, "storage unavailable") from exc
        settled = list(zip(known, results, strict=True))
        if nack is None:
            now = time.monotonic()
            acked = {i: now - sent_at[i] for i, ok in settled if ok}
            metrics.observe_ack_latency(self.channel, acked.values())
            logs.log_settled(self.channel, self.group, self.consumer, settled, ack=True)
        else:
            logs.log_settled(
                self.channel, self.group, self.consumer, settled,
                ack=False, retry=nack.retry, reason=reason,
            )  # fmt: skip
        # At-least-once: an ack for a message already redelivered elsewhere is normal; say so.
        stale = [i for i, ok in zip(known, results, strict=True) if not ok]
        if unknown or stale:
            await self.websocket.send_text(
                encode_error("unknown_message", message_ids=unknown + stale).decode()
            )

    async def beat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            try:
                alive = await self.buffer.touch_connection(self.channel, self.consumer)
                token = await self.buffer.list_tokens(self.channel)
            except StorageError as exc:
                raise SessionEnded(CLOSE_UNAVAILABLE, "storage unavailable") from exc
            if not alive:
                raise SessionEnded(CLOSE_REMOVED, "disconnected by the operator")
            token_id = self.connection.record.token_id
            if token_id and not token_in_force(token, token_id, time.time()):
                raise SessionEnded(CLOSE_AUTH, "token revoked or expired")
            await self.websocket.send_text(encode_heartbeat(time.time()).decode())


def split_frames(messages: list[WireMessage], budget: int) -> list[list[WireMessage]]:
    """Group messages into frames of about ``budget`` body bytes (at least one each)."""
    frames: list[list[WireMessage]] = [[]]
    size = 0
    for message in messages:
        length = len(message.envelope.body)
        if frames[-1] and size + length > budget:
            frames.append([])
            size = 0
        frames[-1].append(message)
        size += length
    return frames


class StreamEndpoint:
    """Accepts connector WebSockets for a channel."""

    def __init__(self, buffer: Buffer, settings: StreamSettings | None = None) -> None:
        self.buffer = buffer
        self.settings = settings or StreamSettings()

    async def handle(self, websocket: WebSocket) -> None:
        native = NATIVE_SUBPROTOCOL in websocket.scope.get("subprotocols", [])
        await websocket.accept(NATIVE_SUBPROTOCOL if native else None)
        channel = websocket.path_params["channel"]
        try:
            connection = await open_connection(self.buffer, websocket, channel, "websocket")
        except Refusal as refused:
            logger.info("refused connector on %r: %s", channel, refused.reason)
            await websocket.close(refused.close_code, refused.reason)
            return
        try:
            hello = encode_connected(
                connection.consumer, channel, time.time(), group=connection.group,
                max_in_flight=connection.window, protocol="native" if native else "seed",
            )  # fmt: skip
            await websocket.send_text(hello.decode())
            await StreamSession(websocket, self.buffer, connection, native, self.settings).run()
        finally:
            await close_connection(self.buffer, connection)
