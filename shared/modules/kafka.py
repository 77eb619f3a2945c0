"""Kafka: each webhook becomes one record whose value is the exact body bytes.

The record key is ``message_id`` by default, so a redelivered message lands on the same
partition as its first copy; the id, webhook id, channel, receive time and the original HTTP
request (method, path, query string, headers as JSON) travel as record headers named
``webhook-connect-*``. ``forward_headers`` (as in the Core Webhook Module) also copies each
HTTP header to a record header of its own name, its value the bytes received.

One ``AIOKafkaProducer`` per connection, shared by every webhook that names it: concurrent
``deliver`` calls fill the producer's batches (``linger_ms``), and each awaits the broker's
acknowledgement of its own record (``acks="all"``, idempotent unless the connection says not).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import ssl
from typing import Any, ClassVar, Literal

import orjson
from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped]
from aiokafka import errors as kafka_errors
from aiokafka.helpers import create_ssl_context  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, field_validator

from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.modules.base import (
    DeliveryError,
    Message,
    Module,
    Permanent,
    Pools,
    Transient,
)

logger = logging.getLogger("webhook_connect.modules.kafka")

# Kafka's own rule for topic names (kafka.common.internals.Topic): legal characters, 1..249.
TOPIC_PATTERN = r"^[A-Za-z0-9._-]{1,249}$"
KEY_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
KEY_FIELDS = frozenset({"message_id", "webhook_id", "channel"})
HEADER_PREFIX = "webhook-connect-"
# deliver() waits this much longer than the producer's own request timeout: a record the
# producer expires is dropped for good, while one whose caller was cancelled may still be
# sent later (a duplicate of the retry the connector then makes).
EXPIRY_MARGIN_SECONDS = 1.0

# The broker will refuse these for this record or this topic whatever the attempt.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordTooLargeError,
    kafka_errors.InvalidTopicError,
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.UnsupportedForMessageFormatError,
)
# The producer itself is unusable (closed, or its idempotence state no longer matches the
# broker's, e.g. after a broker lost its log): a fresh producer is the cure.
BROKEN_PRODUCER_ERRORS: tuple[type[Exception], ...] = (
    kafka_errors.ProducerClosed,
    kafka_errors.ProducerFenced,
    kafka_errors.IllegalStateError,
    kafka_errors.OutOfOrderSequenceNumber,
    kafka_errors.UnknownProducerId,
    kafka_errors.InvalidProducerEpoch,
    kafka_errors.InvalidProducerIdMapping,
)


class KafkaConfig(BaseModel):
    """``module-config`` of ``kafka``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: str = Field(pattern=TOPIC_PATTERN)
    # A literal key (the Core Webhook Module's meaning) that may name {message_id},
    # {webhook_id} or {channel}; null sends no key (the producer spreads records).
    key: str | None = "{message_id}"
    partition: int | None = Field(default=None, ge=0)
    forward_headers: bool = False

    @field_validator("topic")
    @classmethod
    def _not_dots(cls, topic: str) -> str:
        if topic in {".", ".."}:
            raise ValueError("'.' and '..' are not topic names")
        return topic

    @field_validator("key")
    @classmethod
    def _known_placeholders(cls, key: str | None) -> str | None:
        unknown = {name for name in KEY_PLACEHOLDER.findall(key or "") if name not in KEY_FIELDS}
        if unknown:
            known = ", ".join(f"{{{name}}}" for name in sorted(KEY_FIELDS))
            raise ValueError(f"unknown placeholder {sorted(unknown)} (known: {known})")
        return key


class KafkaConnection(BaseModel):
    """A ``connections.json`` entry of type ``kafka``: how to reach the cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bootstrap_servers: str | list[str] = Field(min_length=1)
    client_id: str = "webhook-connect"
    # How long one delivery may wait for the broker's acknowledgement, reconnecting included.
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    # Idempotence stops a retried produce request from writing a record twice; a broker that
    # cannot hand out producer ids (InitProducerId) needs it off.
    enable_idempotence: bool = True
    linger_ms: int = Field(default=5, ge=0, le=60_000)
    max_request_size: int = Field(default=1_048_576, gt=0)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = None
    ssl_cafile: str | None = None

    def servers(self) -> list[str]:
        """``"a:9092,b:9092"`` or ``["a:9092", "b:9092"]`` as a list."""
        given = self.bootstrap_servers
        parts = given.split(",") if isinstance(given, str) else given
        return [part.strip() for part in parts if part.strip()]

    def producer_options(self) -> dict[str, Any]:
        context: ssl.SSLContext | None = None
        if self.security_protocol in {"SSL", "SASL_SSL"}:
            context = create_ssl_context(cafile=self.ssl_cafile)
        timeout_ms = int(self.timeout_seconds * 1000)
        return {
            "bootstrap_servers": self.servers(),
            "client_id": self.client_id,
            "acks": "all",
            "enable_idempotence": self.enable_idempotence,
            "linger_ms": self.linger_ms,
            "max_request_size": self.max_request_size,
            "request_timeout_ms": timeout_ms,
            "security_protocol": self.security_protocol,
            "ssl_context": context,
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_plain_username,
            "sasl_plain_password": self.sasl_plain_password,
        }


def record_key(template: str | None, message: Message) -> bytes | None:
    """The record key: ``template`` with its placeholders filled from ``message``."""
    if template is None:
        return None
    values = {
        "message_id": message.message_id,
        "webhook_id": message.webhook_id,
        "channel": message.channel,
    }
    return KEY_PLACEHOLDER.sub(lambda match: values[match.group(1)], template).encode()


def record_headers(message: Message, forward_headers: bool) -> list[tuple[str, bytes]]:
    """Metadata as record headers; header values round-trip through latin-1 byte for byte."""
    envelope = message.envelope
    headers = [
        (f"{HEADER_PREFIX}message-id", message.message_id.encode()),
        (f"{HEADER_PREFIX}webhook-id", message.webhook_id.encode()),
        (f"{HEADER_PREFIX}channel", message.channel.encode()),
        (f"{HEADER_PREFIX}received-at", repr(envelope.received_at).encode()),
        (f"{HEADER_PREFIX}method", envelope.method.encode()),
        (f"{HEADER_PREFIX}path", envelope.path.encode()),
        (f"{HEADER_PREFIX}query-string", envelope.query_string.encode()),
        (f"{HEADER_PREFIX}headers", orjson.dumps([list(pair) for pair in envelope.headers])),
    ]
    if forward_headers:
        headers.extend((name, value.encode("latin-1")) for name, value in envelope.headers)
    return headers


def classify(exc: Exception) -> DeliveryError:
    """Map a producer error to what the connector should do about it."""
    if isinstance(exc, PERMANENT_ERRORS):
        return Permanent(f"Kafka refused the record: {exc!r}")
    return Transient(f"Kafka did not acknowledge the record: {exc!r}")


class ProducerSlot:
    """One connection's producer: started on first use, replaced when it breaks.

    Shared through :class:`Pools`, so every module naming the connection uses one producer
    and its batches. A broker that is down at start-up costs a Transient, not the slot.
    """

    def __init__(self, settings: KafkaConnection) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._attempts = 0
        self._last_error: Exception | None = None
        self._stopping: set[asyncio.Task[None]] = set()

    async def get(self) -> AIOKafkaProducer:
        attempts_seen = self._attempts
        async with self._lock:
            if self._producer is not None:
                return self._producer
            # A caller that queued behind a failed start shares that failure instead of
            # hammering a dead broker once per waiting delivery.
            if self._attempts != attempts_seen and self._last_error is not None:
                raise self._unreachable(self._last_error)
            self._attempts += 1
            producer = AIOKafkaProducer(**self.settings.producer_options())
            try:
                await producer.start()
            except Exception as exc:
                await producer.stop()
                self._last_error = exc
                raise self._unreachable(exc) from exc
            self._last_error = None
            self._producer = producer
            return producer

    def _unreachable(self, exc: Exception) -> Transient:
        servers = ",".join(self.settings.servers())
        return Transient(f"cannot start a Kafka producer for {servers}: {exc!r}")

    def discard(self, producer: AIOKafkaProducer) -> None:
        """Retire a broken producer; the next :meth:`get` starts a fresh one.

        It stops in the background: stopping flushes, which may wait on a broker that is gone.
        """
        current, stop = self._producer, producer.stop
        if current is not producer:
            return  # another delivery saw it break first
        self._producer = None
        task = asyncio.create_task(stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def aclose(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
        await asyncio.gather(*self._stopping, return_exceptions=True)


class KafkaModule(Module[KafkaConfig]):
    """Publish each webhook as one Kafka record and wait for the broker's acknowledgement."""

    name = "kafka"
    Config = KafkaConfig
    connection_types: ClassVar[frozenset[str]] = frozenset({"kafka"})
    needs_connection = True

    def __init__(
        self, config: KafkaConfig, connection: ConnectionEntry | None, pools: Pools
    ) -> None:
        super().__init__(config, connection, pools)
        # Refuse a bad connection entry at configuration time, not at the first webhook.
        self.settings = KafkaConnection.model_validate(self.connection_settings)
        # Keyed by a digest of the settings: equal settings share a producer, and the password
        # never shows up in a repr of the pools.
        settings = orjson.dumps(self.settings.model_dump(), option=orjson.OPT_SORT_KEYS)
        self._pool_key = f"kafka:{hashlib.sha256(settings).hexdigest()}"

    async def _slot(self) -> ProducerSlot:
        async def open_slot() -> ProducerSlot:
            return ProducerSlot(self.settings)

        async def close_slot(slot: ProducerSlot) -> None:
            await slot.aclose()

        return await self.pools.get(self._pool_key, open_slot, close_slot)

    async def start(self) -> None:
        """Connect now so the first webhook does not wait; a broker that is down is fine."""
        try:
            await (await self._slot()).get()
        except Transient as exc:
            logger.warning("kafka: %s (deliveries will retry)", exc)

    async def deliver(self, message: Message) -> None:
        key = record_key(self.config.key, message)
        headers = record_headers(message, self.config.forward_headers)
        slot = await self._slot()
        try:
            async with asyncio.timeout(self.settings.timeout_seconds + EXPIRY_MARGIN_SECONDS):
                producer = await slot.get()
                await self._send(producer, slot, message.body, key, headers)
        except TimeoutError:
            raise Transient(
                f"no acknowledgement from Kafka within {self.settings.timeout_seconds}s"
            ) from None

    async def _send(
        self,
        producer: AIOKafkaProducer,
        slot: ProducerSlot,
        value: bytes,
        key: bytes | None,
        headers: list[tuple[str, bytes]],
    ) -> None:
        config = self.config
        try:
            await self._check_partition(producer)
            await producer.send_and_wait(
                config.topic, value, key=key, partition=config.partition, headers=headers
            )
        except BROKEN_PRODUCER_ERRORS as exc:
            slot.discard(producer)
            raise Transient(f"the Kafka producer broke and will be replaced: {exc!r}") from exc
        except kafka_errors.KafkaError as exc:
            raise classify(exc) from exc

    async def _check_partition(self, producer: AIOKafkaProducer) -> None:
        """aiokafka only asserts that a chosen partition exists; say so plainly instead."""
        wanted = self.config.partition
        if wanted is None:
            return
        partitions: set[int] = await producer.partitions_for(self.config.topic)
        if wanted not in partitions:
            raise Permanent(
                f"topic {self.config.topic!r} has no partition {wanted} "
                f"(it has {len(partitions)}: 0..{len(partitions) - 1})"
            )
