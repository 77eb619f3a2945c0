"""``WS /connect/stream/{channel}``: push messages to a connector, take its acks and nacks.

A thin pump over :class:`~webhook_connect.cloud.session.ConsumerSession`, which decides what to
read, what an ack settles and when to beat. Two tasks per connection: *pump* reads from the
buffer while the session's window has room and sends, and between reads sends heartbeats and
checks the connection's record and token when the session says so; *listen* hands the
connector's frames to the session and settles what it plans. The first to end (disconnect, bad
frame, revoked token) ends the other; whatever the connection still held goes back to the
channel at once.

Thousands of connectors idle on one process, so an idle connection keeps little: no task of its
own for the heartbeat (the pump's waits end at the next deadline), and no event object while the
window has room (a future is made only while the pump waits for an ack).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from webhook_connect.cloud import logs, metrics
from webhook_connect.cloud.buffers import Buffer, Delivery
from webhook_connect.cloud.session import READ_BATCH, ConsumerSession
from webhook_connect.cloud.sessions import (
    CLOSE_BAD_REQUEST,
    Connection,
    check_liveness,
    close_connection,
    hello,
    open_connection,
    settle,
    unavailable,
)
from webhook_connect.shared.exceptions import ConnectorRefusal, FrameError, StorageError
from webhook_connect.shared.frames import (
    NATIVE_SUBPROTOCOL,
    AckFrame,
    NackFrame,
    WireMessage,
    encode_error,
    encode_heartbeat,
    encode_native_batch,
    encode_seed_message,
    parse_client_frame,
)

logger = logging.getLogger("webhook_connect.stream")

IDLE_WAIT = 1.0  # also how soon an ack-timeout redelivery is noticed without a notification
# Reads that keep finding nothing space out to this (1 s, 2 s, then every 3 s): a new message
# still wakes the pump at once; only a redelivery nothing announces (an ack timeout, the end of
# a retry delay) reaches an idle connection up to this late. 10,000 idle connectors otherwise
# cost 10,000 storage reads a second.
IDLE_WAIT_MAX = 3.0
SEND_TIMEOUT = 10.0  # per frame: a connector that cannot take 1 MiB in 10 s is not reading
FRAME_BUDGET = 1024 * 1024  # native frames hold messages up to about this many body bytes
CLOSE_TIMEOUT = 5.0

CLOSE_SLOW = 4408


@dataclass(frozen=True, slots=True)
class StreamSettings:
    heartbeat_seconds: float = 5.0


@dataclass(slots=True)
class StreamSession:
    """The pump of one WebSocket connection."""

    websocket: WebSocket
    buffer: Buffer
    connection: Connection
    native: bool
    settings: StreamSettings
    session: ConsumerSession = field(init=False)
    # Set while the pump waits for room in a full window; an ack resolves it.
    room: asyncio.Future[None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.session = ConsumerSession.local(
            self.channel,
            self.connection.window,
            now=time.monotonic(),
            heartbeat_seconds=self.settings.heartbeat_seconds,
        )

    @property
    def channel(self) -> str:
        return self.connection.channel

    @property
    def group(self) -> str:
        return self.connection.group

    @property
    def consumer(self) -> str:
        return self.connection.consumer

    async def run(self) -> None:
        tasks = [asyncio.create_task(self.pump()), asyncio.create_task(self.listen())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        ended = next((t.exception() for t in done if t.exception() is not None), None)
        if isinstance(ended, ConnectorRefusal):
            logger.info("closing %s: %s", self.consumer, ended.reason)
            await self.close(ended.close_code, ended.reason)
        elif ended is not None and not isinstance(ended, WebSocketDisconnect):
            logger.error("stream %s failed: %r", self.consumer, ended)
            await self.close(1011, "internal error")

    async def close(self, code: int, reason: str) -> None:
        # A peer that does not read cannot take a close frame either: do not wait on it.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.websocket.close(code, reason), CLOSE_TIMEOUT)

    async def pump(self) -> None:
        session = self.session
        idle_wait = IDLE_WAIT
        while True:
            await self.beat()
            count = session.read_size(READ_BATCH)
            if count == 0:
                await self.wait_for_room(session.next_deadline() - time.monotonic())
                continue
            since = self.buffer.change_version(self.channel)
            try:
                deliveries = await self.buffer.read(self.channel, self.group, self.consumer, count)
            except StorageError as exc:
                raise unavailable(exc) from exc
            if not deliveries:
                wait = min(idle_wait, session.next_deadline() - time.monotonic())
                await self.buffer.wait_for_change(self.channel, since, max(0.0, wait))
                if self.buffer.change_version(self.channel) == since:  # nothing announced
                    idle_wait = min(idle_wait + IDLE_WAIT, IDLE_WAIT_MAX)
                continue
            idle_wait = IDLE_WAIT
            await self.send_messages(deliveries)

    async def wait_for_room(self, max_wait: float) -> None:
        """Until an ack frees room in the window, or ``max_wait`` seconds (a beat is due)."""
        loop = asyncio.get_running_loop()
        room = self.room = loop.create_future()
        timer = loop.call_later(max(0.0, max_wait), _resolve, room)
        try:
            await room
        finally:
            timer.cancel()
            self.room = None

    async def send_messages(self, deliveries: list[Delivery]) -> None:
        messages = self.session.sent(deliveries, time.monotonic())
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                if self.native:
                    for frame in split_frames(messages, FRAME_BUDGET):
                        await self.websocket.send_bytes(encode_native_batch(frame))
                else:
                    for message in messages:
                        await self.websocket.send_text(encode_seed_message(message).decode())
        except TimeoutError:
            reason = "slow consumer: not reading"
            raise ConnectorRefusal(408, CLOSE_SLOW, "slow_consumer", reason) from None
        logs.log_redeliveries(self.group, self.consumer, messages)

    async def listen(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                reason = "binary frames are not accepted here"
                raise ConnectorRefusal(400, CLOSE_BAD_REQUEST, "bad_request", reason)
            try:
                frame = parse_client_frame(text)
            except FrameError as exc:
                reason = f"malformed frame: {exc}"[:120]
                raise ConnectorRefusal(400, CLOSE_BAD_REQUEST, "bad_request", reason) from None
            if isinstance(frame, AckFrame | NackFrame):
                await self.settle(frame)

    async def settle(self, frame: AckFrame | NackFrame) -> None:
        plan = self.session.settle(frame.settlement())
        if self.room is not None:
            _resolve(self.room)
        outcome = await settle(self.buffer, self.connection, plan)
        metrics.observe_ack_latency(self.channel, outcome.latencies)
        # At-least-once: an ack for a message already redelivered elsewhere is normal; say so.
        if outcome.rejected:
            error = encode_error("unknown_message", message_ids=outcome.rejected)
            await self.websocket.send_text(error.decode())

    async def beat(self) -> None:
        """Check the connection's record and token, and send a heartbeat, if either is due."""
        session = self.session
        now = time.monotonic()
        if session.check_due(now):
            await check_liveness(self.buffer, self.connection)
            session.checked(now)
        if session.heartbeat_due(now):
            await self.websocket.send_text(encode_heartbeat(time.time()).decode())
            session.heartbeat_sent(now)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


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


STREAM_PATH = "/connect/stream/"


def stream_channel(path: str) -> str | None:
    """The channel of a ``/connect/stream/{channel}`` path (as Starlette's route matches it:
    one non-empty segment), or ``None``."""
    if not path.startswith(STREAM_PATH):
        return None
    channel = path[len(STREAM_PATH) :]
    return channel if channel and "/" not in channel else None


class StreamEndpoint:
    """Accepts connector WebSockets for a channel."""

    def __init__(self, buffer: Buffer, settings: StreamSettings | None = None) -> None:
        self.buffer = buffer
        self.settings = settings or StreamSettings()

    async def serve(self, scope: Scope, receive: Receive, send: Send, channel: str) -> None:
        """The endpoint as a bare ASGI app, for a path :func:`stream_channel` matched.

        The cloud calls it directly rather than through Starlette's middleware and router: a
        connection lives for hours, idle most of the time, and each layer's suspended frame
        stays with it (about 4.7 KB per connection together).
        """
        scope["path_params"] = {"channel": channel}
        await self.handle(WebSocket(scope, receive, send))

    async def handle(self, websocket: WebSocket) -> None:
        native = NATIVE_SUBPROTOCOL in websocket.scope.get("subprotocols", [])
        await websocket.accept(NATIVE_SUBPROTOCOL if native else None)
        channel = websocket.path_params["channel"]
        try:
            connection = await open_connection(self.buffer, websocket, channel, "websocket")
        except ConnectorRefusal as refused:
            logger.info("refused connector on %r: %s", channel, refused.reason)
            await websocket.close(refused.close_code, refused.reason)
            return
        try:
            await websocket.send_text(hello(connection, native, time.time()).decode())
            await StreamSession(websocket, self.buffer, connection, native, self.settings).run()
        finally:
            await close_connection(self.buffer, connection)
