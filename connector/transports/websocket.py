"""WebSocket transport: the native dialect (byte-exact binary message frames, batched acks),
or the seed dialect when the cloud does not choose the native subprotocol, which is how the
Core Webhook Module's cloud answers (JSON ``webhook`` frames, one ack per frame)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

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
from webhook_connect.shared.frames import (
    NATIVE_SUBPROTOCOL,
    FrameError,
    WireMessage,
    decode_native_batch,
    decode_seed_message,
    encode_acks,
    encode_nack,
)

logger = logging.getLogger("webhook_connect.connector")

CLOSE_AUTH = 4001
OPEN_TIMEOUT = 10.0
MAX_FRAME = 64 * 1024 * 1024


def stream_url(settings: ConnectorSettings) -> str:
    base = settings.cloud_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    query = {"group": settings.group}
    if settings.window:
        query["max_in_flight"] = str(settings.window)
    return f"{base}/connect/stream/{quote(settings.channel)}?{urlencode(query)}"


class WebSocketTransport:
    def __init__(self, settings: ConnectorSettings) -> None:
        self._settings = settings
        self._ws: ClientConnection | None = None
        self.connection_id = ""
        self.native = True

    async def connect(self) -> None:
        settings = self._settings
        headers = {
            "Authorization": f"Bearer {settings.token}",
            "X-Connector-ID": settings.connector_id,
        }
        url = stream_url(settings)
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        host = parts.hostname or ""
        port = parts.port or (443 if secure else 80)
        # Our own proxy decision and tunnel (the ``proxy`` key, else HTTPS_PROXY/NO_PROXY),
        # never websockets' default reading of the environment: one rule for all transports.
        extra: dict[str, Any] = {"proxy": None}
        if secure:
            extra["ssl"] = tls_context(settings) or True
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                tunnel = await open_socket(cloud_proxies(settings), parts.scheme, host, port)
            if tunnel is not None:
                extra["sock"] = tunnel
            self._ws = await connect(
                url,
                additional_headers=headers,
                subprotocols=[NATIVE_SUBPROTOCOL],  # type: ignore[list-item]
                **extra,
                open_timeout=OPEN_TIMEOUT,
                ping_interval=5,
                ping_timeout=10,
                max_size=MAX_FRAME,
                max_queue=4,
                compression=None,
            )
        except InvalidStatus as exc:
            # Only the cloud's explicit refusal is fatal (connector/refusal.py); this cloud
            # refuses after the upgrade (close 4001), a proxy before it.
            answer = exc.response
            body = bytes(answer.body or b"")
            reason = token_refusal(answer.status_code, body)
            if reason is not None:
                raise Refused(f"the cloud refused the token: {reason}") from exc
            kind = answer.headers.get("Content-Type", "")
            raise Disconnected(not_a_refusal(answer.status_code, body, kind)) from exc
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            cause = describe(exc, host, OPEN_TIMEOUT)
            raise Disconnected(f"{parts.netloc}: {cause}") from exc
        hello = await self._receive_text()
        if hello.get("type") != "connected":
            raise Disconnected(f"unexpected first frame {hello.get('type')!r}")
        self.connection_id = str(hello.get("connection_id", ""))
        # A cloud that did not pick the subprotocol speaks the seed dialect (the Core Webhook
        # Module's cloud): read its frames and ack one id at a time, so agents can move first.
        self.native = self._ws.subprotocol == NATIVE_SUBPROTOCOL
        if not self.native:
            logger.info("the cloud speaks the seed dialect: bodies arrive as it re-encodes them")

    async def _receive_text(self) -> dict[str, object]:
        assert self._ws is not None
        try:
            frame = await self._ws.recv()
        except ConnectionClosed as exc:
            raise self._closed(exc) from exc
        if isinstance(frame, bytes):
            raise Disconnected("expected a text frame")
        data = orjson.loads(frame)
        return data if isinstance(data, dict) else {}

    def _closed(self, exc: ConnectionClosed) -> Exception:
        received = exc.rcvd
        if received is not None and received.code == CLOSE_AUTH:
            return Refused(f"the cloud refused the token: {received.reason}")
        if received is not None:
            return Disconnected(f"closed by the cloud: {received.code} {received.reason}")
        return Disconnected("connection lost")

    async def messages(self) -> AsyncIterator[WireMessage]:
        assert self._ws is not None
        while True:
            try:
                frame = await self._ws.recv()
            except ConnectionClosed as exc:
                raise self._closed(exc) from exc
            if isinstance(frame, bytes):
                try:
                    batch = decode_native_batch(frame)
                except FrameError as exc:
                    raise Disconnected(f"bad frame from the cloud: {exc}") from exc
                for message in batch:
                    yield message
                continue
            try:
                data = orjson.loads(frame)
            except orjson.JSONDecodeError as exc:
                raise Disconnected(f"bad frame from the cloud: {exc}") from exc
            if not isinstance(data, dict):
                continue
            kind = data.get("type")
            if kind == "webhook" and not self.native:
                try:
                    yield decode_seed_message(data, self._settings.channel, time.time())
                except FrameError as exc:
                    # Without an id it can be neither acked nor nacked; reconnecting would
                    # not change the frame, so say so and read on.
                    logger.warning("skipped a frame from the cloud: %s", exc)
            elif kind == "heartbeat" and not self.native:
                # The seed cloud's own connector answers each heartbeat; do as it does.
                await self._send(b'{"type":"heartbeat"}')
            elif kind == "error":
                logger.debug("cloud: %s", data)

    async def ack(self, message_ids: list[str]) -> None:
        if self.native:
            await self._send(encode_acks(message_ids))
            return
        for message_id in message_ids:  # the seed dialect reads only ``message_id``
            await self._send(orjson.dumps({"type": "ack", "message_id": message_id}))

    async def nack(self, message_id: str, *, retry: bool, reason: str = "") -> None:
        await self._send(encode_nack(message_id, retry=retry, reason=reason))

    async def _send(self, frame: bytes) -> None:
        if self._ws is None:
            return
        # A closed connection loses the ack; the cloud redelivers and the dedup log answers.
        with contextlib.suppress(ConnectionClosed):
            await self._ws.send(frame.decode())

    async def aclose(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
