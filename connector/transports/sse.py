"""SSE transport: one ``text/event-stream`` of native messages, acks by POST.

The stream is read with httptools straight into an event splitter: a general HTTP client's
line iterator cost more CPU per message than the rest of the connector.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator
from urllib.parse import quote, urlsplit

import httptools
import orjson

from webhook_connect.connector.causes import describe
from webhook_connect.connector.config import ConnectorSettings
from webhook_connect.connector.refusal import not_a_refusal, token_refusal
from webhook_connect.connector.transports.base import (
    Disconnected,
    Refused,
    cloud_proxies,
    open_socket,
    tls_context,
)
from webhook_connect.connector.transports.http import HttpSide, ack_all, nack_one
from webhook_connect.shared.frames import (
    FrameError,
    WireMessage,
    decode_native_json,
    decode_seed_message,
)

logger = logging.getLogger("webhook_connect.connector")

SILENCE_LIMIT = 20.0  # the cloud sends a heartbeat every 5 s: this long without one is a dead link
# The Core Webhook Module's cloud sends one every 30 s by default (a channel setting it does
# not announce): three of those.
SEED_SILENCE_LIMIT = 90.0
CONNECT_TIMEOUT = 10.0
ANSWER_TIMEOUT = 2.0
Event = tuple[bytes, bytes, bytes]  # event type, data, id


class _StreamProtocol(asyncio.Protocol):
    """Feeds the response body, de-chunked by httptools, into SSE events."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        # One item per chunk read: the events it completed (a list), or why the stream ended.
        self.events: asyncio.Queue[list[Event] | Exception] = asyncio.Queue()
        self.pending = b""
        self.transport: asyncio.Transport | None = None
        # An answer other than 200 is kept (its first KiB) to say what came back.
        self.status = 0
        self.content_type = ""
        self.answer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(Disconnected(f"bad HTTP from the cloud: {exc}"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.content_type = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if not self.head.done():
            self.head.set_result(self.status)

    def on_body(self, body: bytes) -> None:
        if self.status != 200:
            self.answer = (self.answer + body)[:1024]
            return
        data = self.pending + body if self.pending else body
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        *blocks, self.pending = data.split(b"\n\n")
        events: list[Event] = []
        for block in blocks:
            event, payload, event_id = b"message", [], b""
            for line in block.split(b"\n"):
                field, _, value = line.partition(b":")
                value = value[1:] if value.startswith(b" ") else value
                if field == b"data":
                    payload.append(value)
                elif field == b"event":
                    event = value
                elif field == b"id":
                    event_id = value
            if payload:
                events.append((event, b"\n".join(payload), event_id))
        if events:
            self.events.put_nowait(events)

    def on_message_complete(self) -> None:
        self._fail(Disconnected("the cloud closed the stream"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(Disconnected(f"stream broke: {exc or 'closed'}"))

    def _fail(self, error: Exception) -> None:
        if not self.head.done():
            self.head.set_exception(error)
        self.events.put_nowait(error)


class SseTransport:
    def __init__(self, settings: ConnectorSettings) -> None:
        self._settings = settings
        self._side = HttpSide(settings)
        self._stream: _StreamProtocol | None = None
        self._last_event_id = b""
        self._ready: collections.deque[Event] = collections.deque()
        self.native = True
        self._silence_limit = SILENCE_LIMIT
        # The cloud may sit under a path of its proxy (cloud_url https://host/hooks): the
        # stream's request line is written here, so the prefix must be too.
        prefix = urlsplit(self._side.base).path.rstrip("/")
        stream = f"/connect/stream/{quote(settings.channel)}/sse"
        self._path = f"{prefix}{stream}?{self._side.query()}"

    @property
    def connection_id(self) -> str:
        return self._side.connection_id

    async def connect(self) -> None:
        url = urlsplit(self._side.base)
        secure = url.scheme == "https"
        port = url.port or (443 if secure else 80)
        context: ssl.SSLContext | None = None
        if secure:
            context = tls_context(self._settings) or ssl.create_default_context()
        loop = asyncio.get_running_loop()
        host = url.hostname or "127.0.0.1"
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                tunnel = await open_socket(cloud_proxies(self._settings), url.scheme, host, port)
                if tunnel is None:
                    _, stream = await loop.create_connection(
                        _StreamProtocol, host, port, ssl=context
                    )
                else:
                    _, stream = await loop.create_connection(
                        _StreamProtocol,
                        sock=tunnel,
                        ssl=context,
                        server_hostname=host if context else None,
                    )
                self._stream = stream
                headers = [
                    (k, v) for k, v in self._side.headers() if k.lower() != "x-connection-id"
                ]
                headers += [("Host", url.netloc), ("Accept", "text/event-stream")]
                if self._last_event_id:
                    headers.append(("Last-Event-ID", self._last_event_id.decode()))
                head = f"GET {self._path} HTTP/1.1\r\n" + "".join(
                    f"{k}: {v}\r\n" for k, v in headers
                )
                assert stream.transport is not None
                stream.transport.write((head + "\r\n").encode())
                status = await stream.head
        except (OSError, TimeoutError) as exc:
            cause = describe(exc, host, CONNECT_TIMEOUT)
            raise Disconnected(f"{url.netloc}: {cause}") from exc
        if status != 200:
            await self._rest_of_answer()
            answer = stream.answer
            reason = token_refusal(status, answer)
            if reason is not None:
                raise Refused(f"the cloud refused the token: {reason}")
            raise Disconnected(not_a_refusal(status, answer, stream.content_type))
        event, data, _ = await self._next_event()
        if event != b"connected":
            raise Disconnected(f"unexpected first event {event!r}")
        try:
            hello = orjson.loads(data)
            self._side.connection_id = str(hello["connection_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise Disconnected(f"bad connected event from the cloud: {exc!r}") from exc
        # Our cloud says which dialect it chose; one that does not is the seed dialect's
        # (the Core Webhook Module's cloud): its events, its ack form, its heartbeat pace.
        self.native = hello.get("protocol") == "native"
        if not self.native:
            self._silence_limit = SEED_SILENCE_LIMIT
            logger.info("the cloud speaks the seed dialect: bodies arrive as it re-encodes them")

    async def _rest_of_answer(self) -> None:
        """Wait briefly for the body of a refusal (it ends the stream) to read what it says."""
        assert self._stream is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ANSWER_TIMEOUT):
                await self._stream.events.get()

    async def _next_event(self) -> Event:
        assert self._stream is not None
        while not self._ready:
            try:
                async with asyncio.timeout(self._silence_limit):
                    item = await self._stream.events.get()
            except TimeoutError:
                silence = self._silence_limit
                raise Disconnected(f"nothing from the cloud for {silence:.0f}s") from None
            if isinstance(item, Exception):
                raise item
            self._ready.extend(item)
        event = self._ready.popleft()
        if event[2]:
            self._last_event_id = event[2]
        return event

    async def messages(self) -> AsyncIterator[WireMessage]:
        while True:
            event, data, _ = await self._next_event()
            if event == b"webhook" and not self.native:
                try:
                    yield decode_seed_message(
                        orjson.loads(data), self._settings.channel, time.time()
                    )
                except (orjson.JSONDecodeError, FrameError) as exc:
                    # Without an id it can be neither acked nor nacked: say so and read on.
                    logger.warning("skipped an event from the cloud: %s", exc)
            elif event == b"webhook":
                try:
                    yield decode_native_json(orjson.loads(data))
                except (orjson.JSONDecodeError, FrameError) as exc:
                    raise Disconnected(f"bad event from the cloud: {exc}") from exc
            elif event == b"error":
                detail = orjson.loads(data)
                if not isinstance(detail, dict):
                    raise Disconnected(f"the cloud ended the stream: {data[:200]!r}")
                if detail.get("error") == "unauthorized":
                    raise Refused(f"the cloud refused the token: {detail.get('detail')}")
                raise Disconnected(f"the cloud ended the stream: {detail.get('detail')}")

    async def ack(self, message_ids: list[str]) -> None:
        await ack_all(self._side, message_ids, seed=not self.native)

    async def nack(self, message_id: str, *, retry: bool, reason: str = "") -> None:
        await nack_one(self._side, message_id, retry=retry, reason=reason, seed=not self.native)

    async def aclose(self) -> None:
        if self._stream is not None and self._stream.transport is not None:
            with contextlib.suppress(Exception):
                self._stream.transport.close()
        await self._side.aclose()
