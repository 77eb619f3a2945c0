"""``rabbitmq``: publish each webhook to RabbitMQ with publisher confirms.

The AMQP body is the exact bytes received; the metadata travels in the message's headers and
``message_id`` property. ``deliver`` returns once the broker confirmed the message (a
``basic.ack``), so a message it could not route or store is never reported as written.

Concurrent ``deliver`` calls share one channel: confirms are pipelined (many publishes in flight,
each awaiting its own ack), which is what makes thousands of messages a second possible without
batching on our side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from datetime import UTC, datetime
from typing import Any, ClassVar, cast

import aio_pika
import aiormq.exceptions
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.modules import attributes
from webhook_connect.shared.modules.amqp import SHORTSTR_MAX, PublishedProperties
from webhook_connect.shared.modules.base import Message, Module, Permanent, Pools, Transient

logger = logging.getLogger("webhook_connect.modules.rabbitmq")

# The Core Webhook Module's rule: no reserved ``amq.`` names, no characters that need quoting.
QUEUE_NAME_PATTERN = r"^[A-Za-z0-9_.:\-]{1,255}$"
# A shortstr property (content-type) holds at most 255 bytes.
# All properties travel in one content-header frame (RabbitMQ's frame_max: 128 KiB).
HEADERS_ROOM = 64 * 1024
# The broker refused the message itself or the destination: another attempt cannot succeed.
REFUSED = (
    aiormq.exceptions.DeliveryError,  # basic.nack, or basic.return of a mandatory message
    aiormq.exceptions.ChannelAccessRefused,
    aiormq.exceptions.ChannelNotFoundEntity,
    aiormq.exceptions.ChannelPreconditionFailed,
    aiormq.exceptions.ChannelLockedResource,
)
# RabbitMQ's reply (406) to a message over its max_message_size.
TOO_LARGE = re.compile(r"larger than configured max size (\d+)")
# The broker is unreachable or went away mid-publish: the next attempt reconnects.
UNREACHABLE = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    OSError,
    TimeoutError,
)


class RabbitMQConfig(BaseModel):
    """``module-config`` of ``rabbitmq``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Declared durable on first use; with ``exchange`` it is also bound to it.
    queue_name: str | None = Field(default=None, pattern=QUEUE_NAME_PATTERN)
    # An existing exchange to publish to; "" is the default exchange (routes by queue name).
    exchange: str = Field(default="", max_length=255)
    # Defaults to ``queue_name``.
    routing_key: str | None = Field(default=None, max_length=255)
    # An unroutable message is returned by the broker (Permanent) instead of silently dropped.
    mandatory: bool = True
    timeout_seconds: float = Field(default=10.0, gt=0)

    @field_validator("queue_name")
    @classmethod
    def _not_reserved(cls, name: str | None) -> str | None:
        if name is not None and name.startswith("amq."):
            raise ValueError("queue names starting with 'amq.' are reserved by RabbitMQ")
        return name

    @model_validator(mode="after")
    def _has_destination(self) -> RabbitMQConfig:
        if self.queue_name is None and not self.exchange:
            raise ValueError("set queue_name, or exchange and routing_key")
        return self

    @property
    def key(self) -> str:
        """The routing key each message is published with."""
        return self.routing_key if self.routing_key is not None else self.queue_name or ""


class RabbitMQSettings(BaseModel):
    """The ``connections.json`` entry (Core Webhook Module keys; ``url`` overrides the rest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = Field(default=None, pattern=r"^amqps?://")
    host: str = "localhost"
    port: int = Field(default=5672, ge=1, le=65535)
    user: str = Field(default="guest", validation_alias=AliasChoices("user", "username"))
    password: str = Field(default="guest", validation_alias=AliasChoices("pass", "password"))
    vhost: str = "/"
    ssl: bool = False
    connect_timeout: float = Field(default=10.0, gt=0)

    def connect_kwargs(self) -> dict[str, Any]:
        if self.url is not None:
            return {"url": self.url, "timeout": self.connect_timeout}
        return {
            "host": self.host,
            "port": self.port,
            "login": self.user,
            "password": self.password,
            "virtualhost": self.vhost,
            "ssl": self.ssl,
            "timeout": self.connect_timeout,
        }


class RabbitMQLink:
    """One AMQP connection per named connection, reopened by the first caller after it broke.

    Reconnecting on demand (instead of aio-pika's background loop) means the first ``deliver``
    after the broker is back succeeds at once, and a broker that stays down costs one refused
    TCP connect per attempt, paced by the connector's retry backoff.
    """

    def __init__(self, settings: RabbitMQSettings) -> None:
        self._settings = settings
        self._connection: AbstractConnection | None = None
        self._lock = asyncio.Lock()

    async def connection(self) -> AbstractConnection:
        async with self._lock:
            connection = self._connection
            if connection is None or not connection.connected.is_set():
                if connection is not None:  # lost: the server went away; free what is left
                    with contextlib.suppress(Exception):
                        await connection.close()
                connection = await aio_pika.connect(**self._settings.connect_kwargs())
                self._connection = connection
            return connection

    async def aclose(self) -> None:
        if self._connection is not None:
            await self._connection.close()


class RabbitMQModule(Module[RabbitMQConfig]):
    """Publishes the body to a durable queue (or an exchange), persistent, confirmed."""

    name: ClassVar[str] = "rabbitmq"
    Config: ClassVar[type[BaseModel]] = RabbitMQConfig
    connection_types: ClassVar[frozenset[str]] = frozenset({"rabbitmq"})
    needs_connection: ClassVar[bool] = True

    def __init__(
        self, config: RabbitMQConfig, connection: ConnectionEntry | None, pools: Pools
    ) -> None:
        super().__init__(config, connection, pools)
        self._settings = RabbitMQSettings.model_validate(self.connection_settings)
        # The connection a channel was opened on, the channel, and the exchange to publish to.
        self._opened: tuple[AbstractConnection, AbstractChannel, AbstractExchange] | None = None
        self._lock = asyncio.Lock()
        self._routing_key = config.key

    async def start(self) -> None:
        try:
            await self._target()
        except (Transient, Permanent) as exc:
            logger.warning("rabbitmq: not ready yet, deliveries will retry: %s", exc)

    async def deliver(self, message: Message) -> None:
        opened, exchange = await self._target()
        try:
            # Straight to aiormq, as aio-pika's Exchange.publish would, without an
            # aio_pika.Message and its per-publish timeout task: a third less CPU per message.
            # aiormq's own deadline spans the publish and its confirm, so no second one here.
            # ``wait=False`` (a keyword of aiormq's Channel, not of its abstract class): we
            # still await the broker's ack, just not also the socket write before it, which
            # saved two event-loop turns per message; the in-flight bytes stay bounded by the
            # connector's concurrency, each publish waiting for its confirm.
            channel = cast(aiormq.Channel, await opened.get_underlay_channel())
            await channel.basic_publish(
                message.body,
                exchange=exchange.name,
                routing_key=self._routing_key,
                properties=amqp_properties(message),
                mandatory=self.config.mandatory,
                timeout=self.config.timeout_seconds,
                wait=False,
            )
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            # The broker closes the whole channel over one message it cannot take: the
            # publishes in flight beside it fail too, through no fault of theirs.
            limit = TOO_LARGE.search(str(exc))
            if limit is not None and len(message.body) > int(limit.group(1)):
                raise Permanent(f"RabbitMQ refused the message: {exc}") from exc
            raise Transient(f"RabbitMQ closed the channel: {exc}") from exc
        except REFUSED as exc:
            raise Permanent(f"RabbitMQ refused the message: {exc}") from exc
        except UNREACHABLE as exc:
            raise Transient(f"RabbitMQ is unreachable: {exc!r}") from exc

    async def aclose(self) -> None:
        opened, self._opened = self._opened, None
        if opened is not None and not opened[1].is_closed:
            await opened[1].close()

    def _ready(self) -> tuple[AbstractChannel, AbstractExchange] | None:
        if self._opened is None:
            return None
        connection, channel, exchange = self._opened
        if channel.is_closed or not connection.connected.is_set():
            return None
        return channel, exchange

    async def _target(self) -> tuple[AbstractChannel, AbstractExchange]:
        """The exchange to publish to, on an open confirming channel (reopened after a loss,
        with the queue declared again: a broker restarted without its data has lost it)."""
        ready = self._ready()
        if ready is not None:
            return ready
        async with self._lock:
            ready = self._ready()
            if ready is None:
                try:
                    self._opened = await self._open()
                except REFUSED as exc:
                    raise Permanent(f"RabbitMQ refused the destination: {exc}") from exc
                except UNREACHABLE as exc:
                    raise Transient(f"RabbitMQ is unreachable: {exc!r}") from exc
                ready = self._opened[1], self._opened[2]
            return ready

    async def _open(self) -> tuple[AbstractConnection, AbstractChannel, AbstractExchange]:
        settings = orjson.dumps(self._settings.model_dump(), option=orjson.OPT_SORT_KEYS)
        link = await self.pools.get(
            f"rabbitmq:{settings.decode()}",
            lambda: _open_link(self._settings),
            RabbitMQLink.aclose,
        )
        connection = await link.connection()
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        config = self.config
        exchange: AbstractExchange = channel.default_exchange
        if config.exchange:
            exchange = await channel.get_exchange(config.exchange, ensure=True)
        if config.queue_name is not None:
            queue = await channel.declare_queue(config.queue_name, durable=True)
            if config.exchange:
                await queue.bind(exchange, config.key)
        return connection, channel, exchange


async def _open_link(settings: RabbitMQSettings) -> RabbitMQLink:
    return RabbitMQLink(settings)


def amqp_properties(message: Message) -> aiormq.spec.Basic.Properties:
    """Persistent; the metadata as headers (the names every module uses, see ``attributes``),
    the message id, content type and receive time as standard properties."""
    content_type = message.header_map.get("content-type")
    if content_type is not None and len(content_type.encode()) > SHORTSTR_MAX:
        content_type = None
    return PublishedProperties(
        headers={
            **attributes.message_attributes(message),
            **attributes.fitting_headers(message, HEADERS_ROOM, "AMQP frame limit"),
        },
        content_type=content_type,
        delivery_mode=int(aio_pika.DeliveryMode.PERSISTENT),
        message_id=message.message_id,
        timestamp=datetime.fromtimestamp(message.envelope.received_at, UTC),
    )
