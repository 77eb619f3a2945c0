"""The Redis Streams backend on a Redis Cluster (``redis+cluster://`` / ``rediss+cluster://``).

The same scripts and keys as :class:`~.redis.RedisBuffer`: a channel's keys share the hash tag
``{<channel>}``, so each script touches one slot. What differs on a cluster:

* the hot path goes through :class:`~.resp_cluster.ClusterRespClient` (slot routing, one
  pipelined round trip per node per batch), the cold path through redis-py's ``RedisCluster``;
* the registry (``wc:channels``, ``wc:tokens``) lives in slots of its own, so provisioning and
  deleting a channel are single-slot steps in an order a crash between them leaves safe;
* an accepted message is on a replica before the 202 (``WAIT``), so a failover keeps it;
* change notifications use ``PUBLISH``, which a cluster forwards to every node: a listener
  subscribed on any node hears every replica's appends.

docs/STORAGE-REDIS-CLUSTER.md describes the deployment and the guarantees.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from webhook_connect.cloud.buffers.base import DEFAULT_GROUP, ChannelSpec
from webhook_connect.cloud.buffers.redis import (
    CHANNELS_KEY,
    NOTIFY_CHANNEL,
    TOKENS_KEY,
    RedisBuffer,
    _storage_errors,
    channel_config,
    channel_keys,
)
from webhook_connect.cloud.buffers.redispy import redis_py_client
from webhook_connect.cloud.buffers.redisurl import parse_redis_url
from webhook_connect.cloud.buffers.resp_cluster import ClusterRespClient, parse_cluster_url
from webhook_connect.cloud.buffers.scripts import UNAVAILABLE, load_scripts
from webhook_connect.cloud.notifier import Notifier
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.exceptions import StorageUnavailable

logger = logging.getLogger("webhook_connect.redis")


def cold_path_client(url: str) -> RedisCluster:
    """redis-py's cluster client for the nodes, credentials and TLS options of ``url``, as
    every other client reads them (redisurl.py: the options mean the same to each)."""
    parsed = parse_cluster_url(url)
    endpoint = parse_redis_url(parsed.node_url(parsed.nodes[0]))
    tls = endpoint.tls_settings.redis_py_options() if endpoint.tls_settings is not None else {}
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
        username=endpoint.username,
        password=endpoint.password,
        socket_timeout=10,
        socket_connect_timeout=5,
        **tls,
    )


@_storage_errors
class RedisClusterBuffer(RedisBuffer):
    """The Redis Streams backend on a Redis Cluster."""

    def __init__(self, url: str) -> None:
        # Not RedisBuffer.__init__: its clients speak to one server.
        self.url = url
        self._cluster = ClusterRespClient(url)
        self._redis = cast(aioredis.Redis, cold_path_client(url))
        self._resp = cast(Any, self._cluster)
        self._sources = load_scripts()
        self._shas = {}
        self._to_announce = set()
        self._notifier = Notifier()
        self._instance = uuid.uuid4().hex[:12]
        self._listener = None

    async def ping(self) -> None:
        await self._cluster.check()

    async def provision(self, spec: ChannelSpec) -> None:
        # The configuration (the channel's slot), then the registry (its own slot): a crash
        # between them leaves a channel that works but is not listed, until the next
        # provisioning (every start-up and reload) lists it. Each step is idempotent.
        cfg = channel_keys(spec.name)[1]
        mapping = channel_config(spec)
        await self._redis.hset(cfg, mapping=mapping)  # type: ignore[arg-type]
        await self._redis.sadd(CHANNELS_KEY, spec.name)
        await self.join(spec.name, DEFAULT_GROUP, from_start=True)

    async def delete_channel(self, name: str) -> bool:
        # The channel's keys first (one slot, one DEL: appends are refused from then on), the
        # registry entry and the tokens after: a crash between them leaves a listed name
        # without configuration, which list_channels skips and a repeated delete removes.
        tokens = await self.list_tokens(name)
        existed = await self._redis.delete(*channel_keys(name))
        listed = await self._redis.srem(CHANNELS_KEY, name)
        if tokens:
            await self._redis.hdel(TOKENS_KEY, *(t.token_hash for t in tokens))
        return bool(listed or existed)

    async def append(self, envelope: Envelope) -> str:
        message_id = await super().append(envelope)
        await self._cluster.replicated(channel_keys(envelope.channel)[0])
        return message_id

    async def append_once(
        self, envelope: Envelope, key: str, window_seconds: float
    ) -> tuple[str, bool]:
        stored = await super().append_once(envelope, key, window_seconds)
        await self._cluster.replicated(channel_keys(envelope.channel)[0])
        return stored

    async def _listen(self) -> None:
        # A cluster forwards PUBLISH to every node: any one node will do; the next one when it
        # goes away.
        for attempt in itertools.count():
            try:
                table = await self._cluster.table()
                node = table.nodes[attempt % len(table.nodes)]
                client = redis_py_client(self._cluster.endpoint(node))
                try:
                    async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                        await pubsub.subscribe(NOTIFY_CHANNEL)
                        async for message in pubsub.listen():
                            instance, _, channel = message["data"].decode().partition(" ")
                            if instance != self._instance:
                                self._notifier.notify(channel)
                finally:
                    await client.aclose()
            except (StorageUnavailable, *UNAVAILABLE) as exc:
                logger.warning("change notifications lost, retrying: %s", exc)
                await asyncio.sleep(1 if attempt % 6 == 5 else 0.1)
