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
import re
import time
import uuid
from dataclasses import dataclass, field

from starlette.websockets import WebSocket, WebSocketDisconnect

from cloud.buffers import Buffer, ChannelSpec, ConnectionRecord, Delivery
from cloud.buffers.base import DEFAULT_GROUP
from cloud.tokens import authenticate_connector, bearer_token
from shared.exceptions import StorageError
from shared.frames import (
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

GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CONNECTOR_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
READ_BATCH = 100
IDLE_WAIT = 1.0  # also how soon an ack-timeout redelivery is noticed without a notification
SEND_TIMEOUT = 10.0  # per frame: a connector that cannot take 1 MiB in 10 s is not reading
FRAME_BUDGET = 1024 * 1024  # native frames hold messages up to about this many body bytes
CLOSE_TIMEOUT = 5.0

CLOSE_AUTH = 4001
CLOSE_REMOVED = 4002
CLOSE_TOO_MANY = 4003
CLOSE_BAD_FRAME = 4400
CLOSE_SLOW = 4408
CLOSE_UNAVAILABLE = 4503


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
    spec: ChannelSpec
    record: ConnectionRecord
    native: bool
    window: int
    settings: StreamSettings
    in_flight: set[str] = field(default_factory=set)
    room: asyncio.Event = field(default_factory=asyncio.Event)
    sequence: int = 0

    @property
    def channel(self) -> str:
        return self.record.channel

    @property
    def group(self) -> str:
        return self.record.group

    @property
    def consumer(self) -> str:
        return self.record.connection_id

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
        for delivery in deliveries:
            self.sequence += 1
            self.in_flight.add(delivery.message_id)
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

    async def listen(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                raise SessionEnded(CLOSE_BAD_FRAME, "binary frames are not accepted here")
            try:
                frame = parse_client_frame(text)
            except FrameError as exc:
                raise SessionEnded(CLOSE_BAD_FRAME, f"malformed frame: {exc}"[:120]) from None
            if isinstance(frame, AckFrame):
                await self.settle(frame.ids(), None)
            elif isinstance(frame, NackFrame):
                await self.settle((frame.message_id,), frame)

    async def settle(self, message_ids: tuple[str, ...], nack: NackFrame | None) -> None:
        unknown = [i for i in message_ids if i not in self.in_flight]
        known = [i for i in message_ids if i in self.in_flight]
        for message_id in known:
            self.in_flight.discard(message_id)
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
            if self.record.token_id and all(t.token_id != self.record.token_id for t in token):
                raise SessionEnded(CLOSE_AUTH, "token revoked")
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
        channel = websocket.path_params["channel"]
        params = websocket.query_params
        token = bearer_token(websocket.headers.get("authorization")) or params.get("token")
        group = params.get("group", DEFAULT_GROUP)
        connector_id = websocket.headers.get("x-connector-id") or params.get("connector_id", "")
        native = NATIVE_SUBPROTOCOL in websocket.scope.get("subprotocols", [])
        await websocket.accept(NATIVE_SUBPROTOCOL if native else None)
        try:
            session = await self._open(websocket, channel, token, group, connector_id, native)
        except SessionEnded as refused:
            logger.info("refused connector on %r: %s", channel, refused.reason)
            await websocket.close(refused.code, refused.reason)
            return
        try:
            await session.run()
        finally:
            with contextlib.suppress(StorageError):
                await self.buffer.release(channel, group, session.consumer)
                await self.buffer.remove_connection(channel, session.consumer)
            logger.info("connector %s left %r", session.consumer, channel)

    async def _open(
        self,
        websocket: WebSocket,
        channel: str,
        token: str | None,
        group: str,
        connector_id: str,
        native: bool,
    ) -> StreamSession:
        if not GROUP_NAME.match(group):
            raise SessionEnded(CLOSE_BAD_FRAME, "invalid group name")
        if connector_id and not CONNECTOR_ID.match(connector_id):
            raise SessionEnded(CLOSE_BAD_FRAME, "invalid connector id")
        try:
            auth = await authenticate_connector(self.buffer, channel, token, time.time())
            spec = await self.buffer.get_channel(channel) if auth else None
        except StorageError as exc:
            raise SessionEnded(CLOSE_UNAVAILABLE, "storage unavailable") from exc
        if auth is None or spec is None:
            raise SessionEnded(CLOSE_AUTH, "invalid token or channel")
        window = spec.max_in_flight
        requested = websocket.query_params.get("max_in_flight", "")
        if requested.isdigit() and 0 < int(requested) < window:
            window = int(requested)
        client = websocket.client
        now = time.time()
        record = ConnectionRecord(
            connection_id=uuid.uuid4().hex,
            channel=channel,
            group=group,
            connector_id=connector_id,
            transport="websocket",
            address=f"{client.host}:{client.port}" if client else "",
            token_id=auth.token_id,
            connected_at=now,
            seen_at=now,
        )
        try:
            if not await self.buffer.add_connection(record, spec.max_connections):
                raise SessionEnded(CLOSE_TOO_MANY, "too many connections to this channel")
            await self.buffer.join(channel, group)
        except StorageError as exc:
            raise SessionEnded(CLOSE_UNAVAILABLE, "storage unavailable") from exc
        extra = {
            "group": group,
            "max_in_flight": window,
            "protocol": "native" if native else "seed",
        }
        await websocket.send_text(
            encode_connected(record.connection_id, channel, now, **extra).decode()
        )
        logger.info(
            "connector %s (%s) joined %r group %r",
            record.connection_id,
            connector_id,
            channel,
            group,
        )
        return StreamSession(websocket, self.buffer, spec, record, native, window, self.settings)
