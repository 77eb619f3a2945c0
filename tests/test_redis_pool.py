"""The redis-py pool of the Redis backend under a burst: callers beyond its size wait their turn.

redis-py 8 caps a pool at 100 connections and refuses the 101st concurrent caller at once; the
cloud then read that as storage unavailable and closed connectors with 4503 (a burst of
connects, or the liveness checks of a thousand idle WebSockets).
"""

from __future__ import annotations

import asyncio

from webhook_connect.cloud.buffers import ChannelSpec
from webhook_connect.cloud.buffers.redis import RedisBuffer
from webhook_connect.cloud.buffers.redispy import POOL_SIZE


async def test_more_concurrent_calls_than_the_pool_holds_all_succeed(redis_url: str) -> None:
    buffer = RedisBuffer(redis_url)
    try:
        await buffer.provision(ChannelSpec(name="burst", max_connections=1000))
        calls = [buffer.get_channel("burst") for _ in range(POOL_SIZE * 3)]
        calls += [buffer.list_tokens("burst") for _ in range(POOL_SIZE * 3)]
        results = await asyncio.gather(*calls)
        assert all(spec is not None for spec in results[: POOL_SIZE * 3])
    finally:
        await buffer.aclose()
