"""ZeroMQ output module: each webhook becomes one multipart message on a PUB, PUSH, DEALER or REQ
socket.

Frames (``"format": "multipart"``, the default): ``[topic (PUB only), metadata JSON, body]``,
the body being the exact bytes received and the metadata :meth:`Message.metadata` (ids, receive
time, method, path, query string, headers as ``[name, value]`` pairs). ``"format": "raw"``
sends ``[topic (PUB only), body]``.

ZeroMQ has no delivery confirmation. ``deliver`` returns once the message is queued in
ZeroMQ's outgoing queue, not once a peer has it: a peer that dies loses what was queued for it
or in flight. PUSH and DEALER queue only to connected peers (``ZMQ_IMMEDIATE``), so with no
peer ``deliver`` raises :class:`Transient` after ``timeout``. PUB drops the message silently
when no subscriber matches (that is what PUB does), so it always "delivers". REQ is the one
confirmation available: ``deliver`` waits for the peer's reply (any reply).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

import orjson
import zmq
import zmq.asyncio
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.modules.base import Message, Module, Pools, Transient

logger = logging.getLogger("webhook_connect.modules.zeromq")

SOCKET_TYPES = {"PUB": zmq.PUB, "PUSH": zmq.PUSH, "DEALER": zmq.DEALER, "REQ": zmq.REQ}
# How long closing waits for queued messages to leave.
LINGER_MS = 1000
# tcp://host:port (host may be "*" to bind, or [IPv6]) or ipc://path; inproc:// cannot reach
# another context, so it could never reach a peer.
ENDPOINT_PATTERN = r"^(tcp://(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):\d{1,5}|ipc://\S+)$"


class ZeroMQConfig(BaseModel):
    """``module-config`` of ``zeromq`` (the Core Webhook Module's keys, plus framing)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str = Field(pattern=ENDPOINT_PATTERN)
    socket_type: Literal["PUB", "PUSH", "DEALER", "REQ"] = "PUB"
    bind: bool = False  # bind the endpoint instead of connecting to it
    topic: str | None = None  # PUB: the first frame, subscribers filter on it; webhook id if unset
    format: Literal["multipart", "raw"] = "multipart"
    # Seconds a delivery may wait for a peer to take the message (REQ: for its turn and the reply).
    timeout: float = Field(default=5.0, gt=0)

    @field_validator("socket_type", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _topic_for_pub(self) -> ZeroMQConfig:
        if self.topic is not None and self.socket_type != "PUB":
            raise ValueError('"topic" applies to "socket_type": "PUB" only')
        return self


def frames(message: Message, config: ZeroMQConfig) -> list[bytes]:
    """The frames of one message, as the module docstring lays them out."""
    parts = [message.body]
    if config.format == "multipart":
        parts.insert(0, orjson.dumps(message.metadata()))
    if config.socket_type == "PUB":
        parts.insert(0, (config.topic or message.webhook_id).encode())
    return parts


class Endpoint:
    """One socket (with its own context) per socket type, endpoint and bind/connect."""

    def __init__(self, config: ZeroMQConfig) -> None:
        self.is_req = config.socket_type == "REQ"
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(SOCKET_TYPES[config.socket_type])
        self.lock = asyncio.Lock()  # REQ: one request and its reply at a time
        try:
            self.socket.setsockopt(zmq.LINGER, LINGER_MS)
            if config.socket_type != "PUB":
                # Queue only to peers actually connected: a missing peer becomes a timeout
                # (Transient), not a backlog waiting for a peer that may never come.
                self.socket.setsockopt(zmq.IMMEDIATE, 1)
            if self.is_req:
                # After a reply timed out, allow the next request; drop late replies.
                self.socket.setsockopt(zmq.REQ_RELAXED, 1)
                self.socket.setsockopt(zmq.REQ_CORRELATE, 1)
            if config.bind:
                self.socket.bind(config.endpoint)
            else:
                self.socket.connect(config.endpoint)
        except zmq.ZMQError:
            self.socket.close(linger=0)
            self.context.term()
            raise

    async def send(self, parts: list[bytes]) -> None:
        """Queue ``parts``; for REQ, also wait for the reply (run under a timeout)."""
        if not self.is_req:
            await self.socket.send_multipart(parts)
            return
        async with self.lock:
            await self.socket.send_multipart(parts)
            while True:
                try:
                    await self.socket.recv_multipart()
                    return
                except zmq.Again:  # readable was a late reply, which REQ_CORRELATE dropped
                    continue

    async def aclose(self) -> None:
        self.socket.close()
        # term() waits up to LINGER_MS for queued messages: not on the event loop.
        await asyncio.to_thread(self.context.term)


class ZeroMQModule(Module[ZeroMQConfig]):
    """Sends each webhook as one multipart ZeroMQ message."""

    name = "zeromq"
    Config = ZeroMQConfig

    def __init__(
        self, config: ZeroMQConfig, connection: ConnectionEntry | None, pools: Pools
    ) -> None:
        super().__init__(config, connection, pools)
        bind = "bind" if config.bind else "connect"
        self._pool_key = f"zeromq:{config.socket_type}:{bind}:{config.endpoint}"

    async def _endpoint(self) -> Endpoint:
        config = self.config

        async def open_endpoint() -> Endpoint:
            return Endpoint(config)

        async def close(endpoint: Endpoint) -> None:
            await endpoint.aclose()

        try:
            return await self.pools.get(self._pool_key, open_endpoint, close)
        except zmq.ZMQError as exc:  # e.g. the address to bind is in use: may free up
            raise Transient(f"ZeroMQ cannot open {config.endpoint}: {exc}") from exc

    async def start(self) -> None:
        """Bind or connect now, so peers and subscribers can attach before the first message."""
        try:
            await self._endpoint()
        except Transient as exc:
            logger.warning("%s", exc)

    async def deliver(self, message: Message) -> None:
        config = self.config
        endpoint = await self._endpoint()
        try:
            async with asyncio.timeout(config.timeout):
                await endpoint.send(frames(message, config))
        except TimeoutError:
            waited = "no reply" if endpoint.is_req else "no peer took the message"
            where = f"ZeroMQ {config.endpoint}"
            raise Transient(f"{where}: {waited} within {config.timeout}s") from None
        except zmq.ZMQError as exc:
            raise Transient(f"ZeroMQ {config.endpoint}: {exc}") from exc
