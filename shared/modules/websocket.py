"""WebSocket output module: each webhook becomes one message on a long-lived client connection.

WebSocket has no acknowledgement of its own, so "confirmed" means the frame was written to the
socket (``send`` drained it). With ``wait_for_response`` the peer must also answer with a
message (any message) before ``deliver`` returns; exchanges on a connection then happen one at
a time, since nothing ties an answer to the message it answers.

Modules writing to the same URL with the same handshake headers share one connection, reopened
on the next delivery when it dropped. A background reader keeps consuming what the peer sends,
so keepalive pings get answered and unread answers never fill the receive buffer.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.protocol import State
from websockets.typing import Data

from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.exceptions import ModuleProtocolError
from webhook_connect.shared.modules.attributes import json_envelope
from webhook_connect.shared.modules.base import Message, Module, Permanent, Pools, Transient
from webhook_connect.shared.policy import Outcome, classify_status

logger = logging.getLogger("webhook_connect.modules.websocket")

# Close codes by which the peer refuses the message itself: unsupported data, invalid payload
# data, policy violation, message too big (RFC 6455 §7.4.1).
REFUSING_CLOSE_CODES = frozenset({1003, 1007, 1008, 1009})


class WebSocketConfig(BaseModel):
    """``module-config`` of ``websocket`` (the Core Webhook Module's keys, plus ``frame``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(pattern=r"^wss?://[^/?#\s]+", description="ws:// or wss:// URL")
    format: Literal["json", "raw"] = "json"  # JSON envelope (text frame) or the exact body
    frame: Literal["binary", "text"] = "binary"  # raw format: text frame when body is UTF-8
    include_headers: bool = False  # json format: add the webhook's headers
    headers: dict[str, str] = Field(default_factory=dict)  # extra handshake headers
    wait_for_response: bool = False
    timeout: float = Field(default=10.0, gt=0, description="open and answer timeout, seconds")
    max_retries: int = Field(default=3, ge=1, description="connection attempts per delivery")

    @model_validator(mode="after")
    def _format_options(self) -> WebSocketConfig:
        if self.format == "json" and self.frame != "binary":
            raise ValueError('"frame" applies to "format": "raw" only (JSON goes as text)')
        return self


def encode(message: Message, config: WebSocketConfig) -> tuple[bytes, bool]:
    """The message's bytes and whether they go in a text frame."""
    if config.format == "json":
        return json_envelope(message, include_headers=config.include_headers), True
    if config.frame == "text":
        try:
            message.body.decode("utf-8")
        except UnicodeDecodeError:
            return message.body, False  # a text frame must be UTF-8: keep the bytes exact
        return message.body, True
    return message.body, False


def refusal(exc: InvalidStatus) -> Permanent | Transient:
    """A refused handshake, judged as an HTTP target's answer: 4xx is final, 408/429/5xx pass."""
    status = exc.response.status_code
    if classify_status(status) is Outcome.REJECTED:
        return Permanent(f"the WebSocket server refused the connection: HTTP {status}")
    return Transient(f"the WebSocket server answered HTTP {status}")


@dataclass(frozen=True, slots=True)
class Closed:
    """Put in the answer queue when the connection closes while an answer is awaited."""

    code: int | None


class PeerClosed(ModuleProtocolError):
    def __init__(self, code: int | None) -> None:
        self.code = code
        super().__init__(f"the peer closed the connection (code {code})")


class Link:
    """One connection to a URL, shared by the modules writing there; reopened on demand."""

    def __init__(self, url: str, headers: dict[str, str], timeout: float) -> None:
        self.url, self.headers, self.timeout = url, headers, timeout
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._opening = asyncio.Lock()
        self._exchange = asyncio.Lock()
        self._answers: asyncio.Queue[Data | Closed] = asyncio.Queue()
        self._awaiting = False

    async def open(self) -> ClientConnection:
        """The open connection, connecting (again) when there is none."""
        async with self._opening:
            if self._ws is not None and self._ws.state is State.OPEN:
                return self._ws
            await self.aclose()
            ws = await connect(
                self.url,
                additional_headers=self.headers,
                open_timeout=self.timeout,
                close_timeout=self.timeout,
            )
            self._ws, self._reader = ws, asyncio.create_task(self._read(ws))
            return ws

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                if self._awaiting:
                    self._answers.put_nowait(data)
        except ConnectionClosed:
            pass
        if self._awaiting:
            # Only a close the peer started says something about the message (not our 1009
            # for an answer too big).
            received = ws.protocol.close_rcvd
            by_peer = received is not None and ws.protocol.close_rcvd_then_sent
            self._answers.put_nowait(Closed(received.code if by_peer and received else None))

    async def send(self, data: bytes, text: bool, wait_for_answer: bool) -> None:
        """Write one message; with ``wait_for_answer``, return once the peer answered."""
        if not wait_for_answer:
            await (await self.open()).send(data, text=text)
            return
        async with self._exchange:
            ws = await self.open()
            while not self._answers.empty():  # a late answer to an exchange that timed out
                self._answers.get_nowait()
            self._awaiting = True
            try:
                await ws.send(data, text=text)
                async with asyncio.timeout(self.timeout):
                    answer = await self._answers.get()
            except TimeoutError:
                raise Transient(f"no answer from {self.url} within {self.timeout}s") from None
            finally:
                self._awaiting = False
            if isinstance(answer, Closed):
                raise PeerClosed(answer.code)

    async def aclose(self) -> None:
        ws, reader, self._ws, self._reader = self._ws, self._reader, None, None
        if ws is not None:
            await ws.close()
        if reader is not None:
            await reader


class WebSocketModule(Module[WebSocketConfig]):
    """Sends each webhook as one WebSocket message."""

    name = "websocket"
    Config = WebSocketConfig

    def __init__(
        self, config: WebSocketConfig, connection: ConnectionEntry | None, pools: Pools
    ) -> None:
        super().__init__(config, connection, pools)
        headers = tuple(sorted(config.headers.items()))
        self._pool_key = f"websocket:{config.url}:{headers!r}:{config.timeout}"

    async def _link(self) -> Link:
        config = self.config

        async def open_link() -> Link:
            return Link(config.url, dict(config.headers), config.timeout)

        async def close(link: Link) -> None:
            await link.aclose()

        return await self.pools.get(self._pool_key, open_link, close)

    async def start(self) -> None:
        """Connect now, so a wrong URL shows at start-up; a peer that is down is no error."""
        try:
            await (await self._link()).open()
        except (InvalidHandshake, OSError, TimeoutError) as exc:
            logger.warning("websocket %s not reachable yet: %s", self.config.url, exc)

    async def deliver(self, message: Message) -> None:
        data, text = encode(message, self.config)
        link = await self._link()
        last: Exception | None = None
        # A dropped connection is reopened and the message sent again, up to max_retries times.
        for _ in range(self.config.max_retries):
            try:
                await link.send(data, text, self.config.wait_for_response)
                return
            except InvalidStatus as exc:
                raise refusal(exc) from exc
            except PeerClosed as exc:
                if exc.code in REFUSING_CLOSE_CODES:
                    raise Permanent(f"{self.config.url} refused the message: {exc}") from exc
                last = exc
            except (ConnectionClosed, InvalidHandshake, OSError, TimeoutError) as exc:
                last = exc
        raise Transient(f"WebSocket {self.config.url} unavailable: {last}") from last
