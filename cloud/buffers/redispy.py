"""redis-py clients built from a :class:`~.redisurl.RedisEndpoint`, never from the URL itself.

redis-py's own TLS connection builds its SSLContext from keyword options, with defaults of its
own; :class:`TLSConnection` hands it the context :func:`~.redisurl.parse_redis_url` built, the
very object the hot-path client uses, so the two cannot verify the server differently.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection

from webhook_connect.cloud.buffers.redisurl import RedisEndpoint

# redis-py 8 caps a pool at 100 connections and *refuses* the 101st caller at once ("Too many
# connections"): a burst of connectors connecting, or the liveness checks of thousands of idle
# ones, then reads as storage unavailable and closes connections with 4503. Callers beyond the
# cap wait for a free connection instead, up to POOL_WAIT seconds.
POOL_SIZE = 100
POOL_WAIT = 10.0


class TLSConnection(Connection):
    """A redis-py TCP connection wrapped in TLS with a given :class:`ssl.SSLContext`."""

    def __init__(self, *, ssl_context: ssl.SSLContext, **kwargs: Any) -> None:
        self._ssl_context = ssl_context
        super().__init__(**kwargs)

    def _connection_arguments(self) -> Mapping[str, Any]:
        # The hook redis-py's own SSLConnection uses to pass ``ssl=`` to open_connection.
        return {**super()._connection_arguments(), "ssl": self._ssl_context}


def redis_py_client(endpoint: RedisEndpoint, **options: Any) -> aioredis.Redis:
    """A redis-py client (pool of connections) for ``endpoint``; ``options`` are timeouts and
    the like, passed to every connection."""
    kwargs: dict[str, Any] = {
        "username": endpoint.username,
        "password": endpoint.password,
        "db": endpoint.db,
        **options,
    }
    if endpoint.path:
        kwargs |= {"connection_class": UnixDomainSocketConnection, "path": endpoint.path}
    else:
        kwargs |= {"host": endpoint.host, "port": endpoint.port}
        if endpoint.tls is not None:
            kwargs |= {"connection_class": TLSConnection, "ssl_context": endpoint.tls}
    pool = aioredis.BlockingConnectionPool(max_connections=POOL_SIZE, timeout=POOL_WAIT, **kwargs)
    return aioredis.Redis.from_pool(pool)
