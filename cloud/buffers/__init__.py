"""Storage backends behind one :class:`~.base.Buffer` protocol, chosen by URL.

``Buffer`` is three narrower protocols one backend implements together: the
:class:`~.base.MessageQueue`, the :class:`~.base.Registry` (channels, tokens, groups,
connections) and the :class:`~.base.Limits` (nonces, rate counters).
"""

from __future__ import annotations

from webhook_connect.cloud.buffers.base import (
    Buffer,
    ChannelEvent,
    ChannelSpec,
    ConnectionRecord,
    DeadLetter,
    Delivery,
    DeliveryAttempt,
    Limits,
    MessageQueue,
    Registry,
    TokenRecord,
)

SCHEMES = (
    "sqlite:///",
    "redis://",
    "rediss://",
    "unix://",
    "amqp://",
    "amqps://",
    "redis+cluster://",
    "rediss+cluster://",
)


def open_buffer(url: str) -> Buffer:
    """Return the backend for ``url``; nothing is connected until first use."""
    if url.startswith("sqlite:///"):
        from webhook_connect.cloud.buffers.sqlite import SQLiteBuffer

        return SQLiteBuffer(url)
    if url.startswith(("redis+cluster://", "rediss+cluster://")):
        from webhook_connect.cloud.buffers.redis_cluster import RedisClusterBuffer

        return RedisClusterBuffer(url)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from webhook_connect.cloud.buffers.redis import RedisBuffer

        return RedisBuffer(url)
    if url.startswith(("amqp://", "amqps://")):
        from webhook_connect.cloud.buffers.rabbitmq import RabbitMQBuffer

        return RabbitMQBuffer(url)
    raise ValueError(
        f"unsupported storage URL {url!r}: use sqlite:///path.db or redis://host:port/db"
    )


__all__ = [
    "Buffer",
    "ChannelEvent",
    "ChannelSpec",
    "ConnectionRecord",
    "DeadLetter",
    "Delivery",
    "DeliveryAttempt",
    "Limits",
    "MessageQueue",
    "Registry",
    "TokenRecord",
    "open_buffer",
]
