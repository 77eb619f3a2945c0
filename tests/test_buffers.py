"""One conformance suite for every storage backend (the Buffer semantics, cloud/buffers/base.py)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
import redis.asyncio as aioredis

from tests.servers import free_port
from webhook_connect.cloud.buffers import (
    Buffer,
    ChannelSpec,
    ConnectionRecord,
    TokenRecord,
    open_buffer,
)
from webhook_connect.cloud.buffers.base import CONNECTION_STALE_SECONDS, EVENTS_KEPT
from webhook_connect.cloud.buffers.redis import channel_keys
from webhook_connect.cloud.buffers.resp import ReplyError
from webhook_connect.cloud.buffers.resp_cluster import parse_cluster_url
from webhook_connect.cloud.buffers.scripts import LUA_CONSTANTS, load_scripts, storage_error
from webhook_connect.cloud.buffers.sqlite import SQLiteBuffer
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.exceptions import (
    ChannelFull,
    StorageError,
    StorageUnavailable,
    UnknownChannel,
)

EVERY_BYTE = bytes(range(256))


class StorageClock:
    """The time as the buffer under test sees it, and a way to move it on.

    The SQLite buffer takes this clock, so time moves at once. Redis reads its own (``TIME``),
    so moving it on means polling the server's clock until it has passed the mark.
    """

    def __init__(self, redis_url: str | None) -> None:
        self._redis_url = redis_url
        self._offset = 0.0

    def now(self) -> float:
        return time.time() + self._offset

    async def advance(self, seconds: float) -> None:
        if self._redis_url is None:
            self._offset += seconds
            return
        if self._redis_url.startswith("amqp"):
            # RabbitMQ and this process share the machine's clock: wait until it has passed.
            mark = time.time() + seconds
            await asyncio.sleep(seconds)
            assert time.time() >= mark
            return
        client = aioredis.Redis.from_url(_one_node(self._redis_url))
        try:
            mark = await _server_time(client) + seconds
            deadline = time.monotonic() + seconds + 10
            while await _server_time(client) < mark:
                assert time.monotonic() < deadline, "the Redis server's clock does not move"
                await asyncio.sleep(0.01)
        finally:
            await client.aclose()


def _one_node(url: str) -> str:
    """A Redis Cluster's first node (every node reads the one clock of this machine)."""
    if url.startswith("redis+cluster://"):
        host, port = parse_cluster_url(url).nodes[0]
        return f"redis://{host}:{port}"
    return url


async def _server_time(client: aioredis.Redis) -> float:
    seconds, micros = await client.time()
    return seconds + micros / 1_000_000


def not_kept_by_rabbitmq(url: str, semantic: str) -> None:
    """Skip a semantic the RabbitMQ backend cannot keep (docs/STORAGE-RABBITMQ.md says why)."""
    if url.startswith(("amqp://", "amqps://")):
        pytest.skip(f"RabbitMQ does not keep {semantic}")


@pytest.fixture
def clock(storage_url: str) -> StorageClock:
    return StorageClock(None if storage_url.startswith("sqlite:") else storage_url)


@pytest.fixture
async def buffer(storage_url: str, clock: StorageClock) -> AsyncIterator[Buffer]:
    """The backend under test; the SQLite one on the test's clock."""
    store: Buffer
    if storage_url.startswith("sqlite:"):
        store = SQLiteBuffer(storage_url, clock=clock.now)
    else:
        store = open_buffer(storage_url)
    try:
        yield store
    finally:
        await store.aclose()


def envelope(
    body: bytes = b'{"n": 1}', channel: str = "orders", at: float | None = None, **extra: str
) -> Envelope:
    return Envelope(
        channel=channel,
        webhook_id="shop",
        received_at=time.time() if at is None else at,
        method="POST",
        path="/webhook/shop",
        query_string="a=1&b=%20x",
        headers=(("content-type", "application/json"), ("x-custom", "\xe9\xff"), *extra.items()),
        body=body,
        client="127.0.0.1",
    )


async def test_channels_are_provisioned_listed_updated_and_deleted(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders", max_queue_size=5))
    await buffer.provision(ChannelSpec("billing"))
    assert [c.name for c in await buffer.list_channels()] == ["billing", "orders"]
    message_id = await buffer.append(envelope())
    await buffer.provision(ChannelSpec("orders", max_queue_size=7))
    spec = await buffer.get_channel("orders")
    assert spec is not None and spec.max_queue_size == 7
    [delivery] = await buffer.read("orders", "default", "c1", 10)
    assert delivery.message_id == message_id, "updating limits keeps messages"
    assert await buffer.delete_channel("orders")
    assert await buffer.get_channel("orders") is None
    assert not await buffer.delete_channel("orders")
    with pytest.raises(UnknownChannel):
        await buffer.append(envelope())


async def test_a_message_comes_back_byte_exact_with_its_first_attempt(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders"))
    sent = envelope(EVERY_BYTE)
    message_id = await buffer.append(sent)
    [delivery] = await buffer.read("orders", "default", "c1", 10)
    assert delivery.message_id == message_id
    assert delivery.attempt == 1
    assert delivery.envelope == sent


async def test_messages_wait_for_the_default_group_and_keep_their_order(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders"))
    ids = [await buffer.append(envelope(str(i).encode())) for i in range(20)]
    got = await buffer.read("orders", "default", "c1", 100)
    assert [d.message_id for d in got] == ids
    assert [d.envelope.body for d in got] == [str(i).encode() for i in range(20)]


async def test_ack_removes_a_message_once(buffer: Buffer, clock: StorageClock) -> None:
    await buffer.provision(ChannelSpec("orders", ack_timeout_seconds=0.2))
    message_id = await buffer.append(envelope())
    await buffer.read("orders", "default", "c1", 10)
    assert not await buffer.ack("orders", "default", message_id, consumer="someone-else")
    assert await buffer.ack("orders", "default", message_id, consumer="c1")
    assert not await buffer.ack("orders", "default", message_id)
    assert not await buffer.ack("orders", "default", "not-an-id")
    assert not await buffer.ack("orders", "default", "99999999-0")
    await clock.advance(0.3)
    assert await buffer.read("orders", "default", "c1", 10) == []
    stats = await buffer.stats("orders")
    assert (stats.depth, stats.in_flight, stats.counters["delivered"]) == (0, 0, 1)


async def test_two_consumers_of_one_group_never_hold_the_same_message(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders"))
    ids = {await buffer.append(envelope(str(i).encode())) for i in range(50)}
    first, second = await asyncio.gather(
        *(buffer.read("orders", "default", name, 30) for name in ("c1", "c2"))
    )
    held_first = {d.message_id for d in first}
    held_second = {d.message_id for d in second}
    assert not held_first & held_second
    assert held_first | held_second == ids


async def test_each_group_gets_every_message(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders"))
    await buffer.join("orders", "analytics")
    ids = [await buffer.append(envelope(str(i).encode())) for i in range(10)]
    for group in ("default", "analytics"):
        got = await buffer.read("orders", group, "c1", 100)
        assert [d.message_id for d in got] == ids
        for message_id in ids:
            assert await buffer.ack("orders", group, message_id)
    assert (await buffer.stats("orders")).depth == 0


async def test_a_message_stays_until_every_group_is_done(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders"))
    await buffer.join("orders", "analytics")
    message_id = await buffer.append(envelope())
    [delivery] = await buffer.read("orders", "default", "c1", 10)
    assert await buffer.ack("orders", "default", delivery.message_id)
    assert (await buffer.stats("orders")).depth == 1
    [late] = await buffer.read("orders", "analytics", "c9", 10)
    assert late.message_id == message_id


async def test_nack_with_retry_delivers_again_after_the_delay(
    buffer: Buffer, clock: StorageClock
) -> None:
    spec = ChannelSpec("orders", ack_timeout_seconds=5, retry_delay_seconds=0.3)
    await buffer.provision(spec)
    message_id = await buffer.append(envelope())
    await buffer.read("orders", "default", "c1", 10)
    assert await buffer.nack("orders", "default", message_id, retry=True, consumer="c1")
    assert await buffer.read("orders", "default", "c1", 10) == []
    await clock.advance(0.35)
    [again] = await buffer.read("orders", "default", "c2", 10)
    assert (again.message_id, again.attempt) == (message_id, 2)
    assert (await buffer.stats("orders")).counters["redelivered"] == 1


async def test_nack_without_retry_dead_letters(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders"))
    sent = envelope(EVERY_BYTE)
    message_id = await buffer.append(sent)
    await buffer.read("orders", "default", "c1", 10)
    assert await buffer.nack("orders", "default", message_id, retry=False, reason="http_400")
    assert not await buffer.nack("orders", "default", message_id, retry=False)
    [letter] = await buffer.dead_letters("orders")
    assert (letter.message_id, letter.group, letter.reason, letter.attempts) == (
        message_id,
        "default",
        "http_400",
        1,
    )
    assert letter.envelope == sent
    stats = await buffer.stats("orders")
    assert (stats.depth, stats.dead_letters, stats.counters["dead_lettered"]) == (0, 1, 1)


async def test_an_unacked_message_is_delivered_again_after_the_ack_timeout(
    buffer: Buffer, clock: StorageClock
) -> None:
    await buffer.provision(ChannelSpec("orders", ack_timeout_seconds=0.3))
    message_id = await buffer.append(envelope())
    [first] = await buffer.read("orders", "default", "c1", 10)
    assert await buffer.read("orders", "default", "c2", 10) == []
    await clock.advance(0.4)
    [second] = await buffer.read("orders", "default", "c2", 10)
    assert (second.message_id, second.attempt) == (message_id, 2)
    assert not await buffer.ack("orders", "default", message_id, consumer="c1")
    assert await buffer.ack("orders", "default", message_id, consumer="c2")


async def test_the_last_attempt_is_followed_by_the_dead_letter_queue(
    buffer: Buffer, clock: StorageClock
) -> None:
    spec = ChannelSpec("orders", ack_timeout_seconds=0.2, max_delivery_attempts=2)
    await buffer.provision(spec)
    message_id = await buffer.append(envelope())
    for attempt in (1, 2):
        [delivery] = await buffer.read("orders", "default", "c1", 10)
        assert delivery.attempt == attempt
        await clock.advance(0.25)
    assert await buffer.read("orders", "default", "c1", 10) == []
    [letter] = await buffer.dead_letters("orders")
    assert (letter.message_id, letter.reason, letter.attempts) == (
        message_id,
        "max_delivery_attempts",
        2,
    )


async def test_release_returns_in_flight_messages_at_once(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders", ack_timeout_seconds=30))
    ids = [await buffer.append(envelope()) for _ in range(3)]
    await buffer.read("orders", "default", "gone", 10)
    assert await buffer.release("orders", "default", "gone") == 3
    got = await buffer.read("orders", "default", "c2", 10)
    assert [d.message_id for d in got] == ids


async def test_ttl_expiry_is_counted_and_nothing_expired_is_delivered(
    buffer: Buffer, clock: StorageClock
) -> None:
    await buffer.provision(ChannelSpec("orders", ttl_seconds=1, ack_timeout_seconds=0.1))
    await buffer.append(envelope(b"unread", at=clock.now()))
    await buffer.append(envelope(b"in flight", at=clock.now()))
    await buffer.read("orders", "default", "c1", 1)
    await clock.advance(1.1)
    fresh_id = await buffer.append(envelope(b"fresh", at=clock.now()))
    assert await buffer.housekeep("orders") == 2
    [delivery] = await buffer.read("orders", "default", "c1", 10)
    assert delivery.message_id == fresh_id
    stats = await buffer.stats("orders")
    assert stats.counters["expired"] == 2
    assert stats.depth == 1


async def test_expiry_found_while_reading_is_counted_too(
    buffer: Buffer, clock: StorageClock
) -> None:
    await buffer.provision(ChannelSpec("orders", ttl_seconds=1))
    await buffer.append(envelope(at=clock.now()))
    await clock.advance(1.1)
    assert await buffer.read("orders", "default", "c1", 10) == []
    assert (await buffer.stats("orders")).counters["expired"] == 1


async def test_a_full_channel_refuses_and_keeps_what_it_has(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders", max_queue_size=3))
    ids = [await buffer.append(envelope()) for _ in range(3)]
    with pytest.raises(ChannelFull) as refused:
        await buffer.append(envelope())
    assert refused.value.limit == 3
    in_flight = await buffer.read("orders", "default", "c1", 2)
    with pytest.raises(ChannelFull):
        await buffer.append(envelope())  # in flight still counts: nothing trimmed silently
    assert await buffer.ack("orders", "default", in_flight[0].message_id)
    ids.append(await buffer.append(envelope()))
    rest = await buffer.read("orders", "default", "c2", 10)
    assert [d.message_id for d in rest] == ids[2:]


async def test_dead_letters_are_replayed_to_their_group_and_purged(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders"))
    await buffer.join("orders", "analytics")
    for body in (b"a", b"b", b"c"):
        await buffer.append(envelope(body))
    for d in await buffer.read("orders", "default", "c1", 10):
        await buffer.nack("orders", "default", d.message_id, retry=False)
    for d in await buffer.read("orders", "analytics", "c1", 10):
        await buffer.ack("orders", "analytics", d.message_id)
    letters = await buffer.dead_letters("orders")
    assert [letter.envelope.body for letter in letters] == [b"a", b"b", b"c"]
    assert await buffer.replay_dead_letters("orders", [letters[0].dead_letter_id]) == 1
    assert await buffer.read("orders", "analytics", "c1", 10) == []
    [replayed] = await buffer.read("orders", "default", "c1", 10)
    assert replayed.envelope.body == b"a"
    assert replayed.message_id != letters[0].message_id
    assert await buffer.purge_dead_letters("orders", [letters[1].dead_letter_id, "junk"]) == 1
    assert [x.envelope.body for x in await buffer.dead_letters("orders")] == [b"c"]
    assert await buffer.replay_dead_letters("orders") == 1
    assert await buffer.purge_dead_letters("orders") == 0


async def test_token_hashes_are_stored_found_and_deleted(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders"))
    record = TokenRecord("tok_1", "orders", "ab" * 32, label="laptop", created_at=1.0)
    await buffer.put_token(record)
    assert await buffer.find_token("ab" * 32) == record
    assert await buffer.list_tokens("orders") == [record]
    assert await buffer.list_tokens("billing") == []
    assert await buffer.delete_token("orders", "tok_1")
    assert await buffer.find_token("ab" * 32) is None


async def test_another_replica_sees_the_same_channels_and_messages(storage_url: str) -> None:
    first, second = open_buffer(storage_url), open_buffer(storage_url)
    try:
        await first.provision(ChannelSpec("orders", max_queue_size=42))
        message_id = await first.append(envelope())
        spec = await second.get_channel("orders")
        assert spec is not None and spec.max_queue_size == 42
        [delivery] = await second.read("orders", "default", "c1", 10)
        assert delivery.message_id == message_id
        assert await first.ack("orders", "default", message_id, consumer="c1")
    finally:
        await first.aclose()
        await second.aclose()


async def test_concurrent_appends_are_batched_and_each_gets_its_id(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders"))
    ids = await asyncio.gather(*(buffer.append(envelope(str(i).encode())) for i in range(300)))
    assert len(set(ids)) == 300
    got = await buffer.read("orders", "default", "c1", 1000)
    assert sorted(d.envelope.body for d in got) == sorted(str(i).encode() for i in range(300))


async def test_unreachable_redis_is_reported_as_unavailable() -> None:
    store = open_buffer(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(StorageUnavailable):
            await store.ping()
        with pytest.raises(StorageUnavailable):
            await store.append(envelope())
        # Every operation, not only the hot path: background loops and admin routes rely on it.
        for call in (
            store.list_channels(),
            store.get_channel("orders"),
            store.stats("orders"),
            store.list_tokens("orders"),
            store.list_connections("orders"),
            store.dead_letters("orders"),
            store.recent_events("orders"),
        ):
            with pytest.raises(StorageUnavailable):
                await call
    finally:
        await store.aclose()


async def test_connections_are_registered_up_to_the_limit(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders"))
    records = [ConnectionRecord(f"conn-{i}", "orders", "default", connected_at=i) for i in range(3)]
    assert await buffer.add_connection(records[0], limit=2)
    assert await buffer.add_connection(records[1], limit=2)
    assert not await buffer.add_connection(records[2], limit=2)
    assert [r.connection_id for r in await buffer.list_connections("orders")] == [
        "conn-0",
        "conn-1",
    ]
    assert await buffer.touch_connection("orders", "conn-0")
    found = await buffer.get_connection("orders", "conn-0")
    assert found is not None and found.group == "default" and found.seen_at > 0
    assert await buffer.remove_connection("orders", "conn-0")
    assert not await buffer.touch_connection("orders", "conn-0"), "a removed connection must go"
    assert await buffer.add_connection(records[2], limit=2)


async def test_many_connections_on_one_channel_keep_its_limit(
    buffer: Buffer, storage_url: str
) -> None:
    """Thousands of connectors may share a channel: its limit counts live records exactly,
    and the records of a replica that died give their places up when the channel is full."""
    await buffer.provision(ChannelSpec("orders"))
    limit = 300
    records = [ConnectionRecord(f"conn-{i}", "orders", "default") for i in range(limit + 2)]
    for record in records[:limit]:
        assert await buffer.add_connection(record, limit)
    dead = [r.connection_id for r in records[:3]]
    await age_connections(storage_url, "orders", dead, CONNECTION_STALE_SECONDS + 60)
    assert await buffer.add_connection(records[limit], limit), "a dead replica's place is free"
    assert all([await buffer.get_connection("orders", i) is None for i in dead])
    for number in range(2):
        assert await buffer.add_connection(
            ConnectionRecord(f"more-{number}", "orders", "default"), limit
        )
    assert len(await buffer.list_connections("orders")) == limit
    for _ in range(3):  # refused every time, however often asked
        assert not await buffer.add_connection(records[limit + 1], limit)
    assert await buffer.touch_connection("orders", "conn-10")
    assert await buffer.remove_connection("orders", "conn-10")
    assert await buffer.add_connection(records[limit + 1], limit)
    assert not await buffer.add_connection(
        ConnectionRecord("one-too-many", "orders", "default"), limit
    )
    assert not await buffer.add_connection(
        ConnectionRecord("one-too-many", "orders", "default"), limit
    )
    assert await buffer.add_connection(
        ConnectionRecord("one-too-many", "orders", "default"), limit + 1
    )
    assert len(await buffer.list_connections("orders")) == limit + 1


async def age_connections(url: str, channel: str, ids: list[str], seconds: float) -> None:
    """Make connection records look untouched for ``seconds`` more, as if the replica that
    kept them alive died that long ago (what a restarted Redis or a crash leaves behind)."""
    if url.startswith(("amqp://", "amqps://")):  # its connections live in the registry
        [registry] = parse_qs(urlsplit(url).query)["registry"]
        await age_connections(registry, channel, ids, seconds)
    elif url.startswith("sqlite:"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            marks = ",".join("?" * len(ids))
            db.execute(
                f"UPDATE connections SET seen_at = seen_at - ? "
                f"WHERE channel = ? AND connection_id IN ({marks})",
                (seconds, channel, *ids),
            )
    else:
        client: aioredis.Redis | aioredis.RedisCluster
        if url.startswith("redis+cluster://"):
            host, port = parse_cluster_url(url).nodes[0]
            client = aioredis.RedisCluster(host=host, port=port)
        else:
            client = aioredis.Redis.from_url(url)
        conns = channel_keys(channel)[4]
        try:
            for connection_id in ids:
                raw = await client.hget(conns, connection_id)
                assert raw is not None
                record = orjson.loads(raw)
                record["seen_at"] -= seconds
                await client.hset(conns, connection_id, orjson.dumps(record))
        finally:
            await client.aclose()


async def test_an_append_wakes_a_waiting_reader(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders"))
    since = buffer.change_version("orders")
    waiter = asyncio.create_task(buffer.wait_for_change("orders", since, 30))
    for _ in range(10):  # a few turns of the loop: the waiter is waiting when the append comes
        await asyncio.sleep(0)
    started = time.monotonic()
    await buffer.append(envelope())
    await asyncio.wait_for(waiter, 5)
    assert time.monotonic() - started < 2


async def test_an_append_on_another_replica_wakes_a_reader(redis_url: str) -> None:
    first, second = open_buffer(redis_url), open_buffer(redis_url)
    try:
        await first.provision(ChannelSpec("orders"))
        await second.wait_for_change("orders", second.change_version("orders"), 0.2)
        since = second.change_version("orders")
        waiter = asyncio.create_task(second.wait_for_change("orders", since, 30))
        await first.append(envelope())
        await asyncio.wait_for(waiter, 5)
    finally:
        await first.aclose()
        await second.aclose()


async def test_append_once_stores_a_repeated_delivery_once(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders"))
    first = await buffer.append_once(envelope(b"1"), "gh:delivery-1", 60)
    # Concurrent repeats (a provider retrying while the first is being written) included.
    repeats = await asyncio.gather(
        *(buffer.append_once(envelope(b"2"), "gh:delivery-1", 60) for _ in range(5))
    )
    other = await buffer.append_once(envelope(b"3"), "gh:delivery-2", 60)
    assert first[1] and other[1]
    assert set(repeats) == {(first[0], False)}
    deliveries = await buffer.read("orders", "default", "c1", 10)
    assert [d.envelope.body for d in deliveries] == [b"1", b"3"]
    assert (await buffer.stats("orders")).counters["accepted"] == 2


async def test_append_once_forgets_after_its_window(buffer: Buffer, clock: StorageClock) -> None:
    await buffer.provision(ChannelSpec("orders"))
    first, _ = await buffer.append_once(envelope(), "k", 0.2)
    await clock.advance(0.3)
    second, is_new = await buffer.append_once(envelope(), "k", 0.2)
    assert is_new and second != first


async def test_append_once_is_refused_like_append_when_full(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders", max_queue_size=1))
    await buffer.append_once(envelope(), "a", 60)
    with pytest.raises(ChannelFull):
        await buffer.append_once(envelope(), "b", 60)
    # A refused delivery was not remembered: its retry is stored once there is room.
    [delivery] = await buffer.read("orders", "default", "c1", 1)
    assert await buffer.ack("orders", "default", delivery.message_id)
    assert (await buffer.append_once(envelope(), "b", 60))[1]


async def test_remember_reports_a_replay_until_the_key_expires(
    buffer: Buffer, clock: StorageClock
) -> None:
    assert await buffer.remember("oauth1:key:nonce-1", 0.3)
    assert not await buffer.remember("oauth1:key:nonce-1", 0.3)
    assert await buffer.remember("oauth1:key:nonce-2", 0.3)
    await clock.advance(0.4)
    assert await buffer.remember("oauth1:key:nonce-1", 0.3)


async def test_rate_counters_refuse_past_the_limit_until_the_window_ends(
    buffer: Buffer, clock: StorageClock
) -> None:
    await buffer.provision(ChannelSpec("orders"))
    # Start at a window boundary so the 3 hits share one window.
    await clock.advance(0.5 - clock.now() % 0.5 + 0.01)
    waits = [await buffer.hit_rate("orders", "webhook:shop", 2, 0.5) for _ in range(3)]
    assert waits[:2] == [0.0, 0.0]
    assert 0 < waits[2] <= 0.5
    assert await buffer.hit_rate("orders", "webhook:other", 2, 0.5) == 0.0
    await clock.advance(waits[2] + 0.01)
    assert await buffer.hit_rate("orders", "webhook:shop", 2, 0.5) == 0.0


async def test_replicas_share_replay_keys_and_rate_counters(storage_url: str) -> None:
    one, two = open_buffer(storage_url), open_buffer(storage_url)
    try:
        await one.provision(ChannelSpec("orders"))
        assert await one.remember("nonce", 60)
        assert not await two.remember("nonce", 60)
        assert await one.hit_rate("orders", "k", 1, 60) == 0.0
        assert await two.hit_rate("orders", "k", 1, 60) > 0
        first, _ = await one.append_once(envelope(), "d", 60)
        assert await two.append_once(envelope(), "d", 60) == (first, False)
    finally:
        await one.aclose()
        await two.aclose()


async def test_recent_events_feed_the_dashboard(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders", max_delivery_attempts=5))
    first = await buffer.append(envelope(b"1"))
    second = await buffer.append(envelope(b"2"))
    taken = await buffer.read("orders", "default", "c1", 10)
    assert await buffer.ack("orders", "default", taken[0].message_id, "c1")
    assert await buffer.nack("orders", "default", taken[1].message_id, retry=False, consumer="c1")
    events = await buffer.recent_events("orders", 10)
    assert [(e.type, e.message_id) for e in events] == [
        ("dead_lettered", second),
        ("delivered", first),
        ("received", second),
        ("received", first),
    ]
    assert events[1].consumer == "c1"
    assert events[0].time >= events[-1].time > 0
    assert len(await buffer.recent_events("orders", 2)) == 2
    assert await buffer.recent_events("other") == []


async def test_history_is_replayed_to_one_group_from_a_point_in_time(
    buffer: Buffer, clock: StorageClock
) -> None:
    not_kept_by_rabbitmq(buffer.url, "history replay (a queue forgets what was acked)")
    await buffer.provision(ChannelSpec("orders", history_seconds=3600))
    await buffer.join("orders", "audit")
    first = await buffer.append(envelope(b"old", at=clock.now()))
    await clock.advance(0.05)
    since = clock.now()
    await buffer.append(envelope(b"new-1", at=clock.now()))
    await buffer.append(envelope(b"new-2", at=clock.now()))
    for group in ("default", "audit"):
        taken = await buffer.read("orders", group, "c1", 10)
        for delivery in taken:
            assert await buffer.ack("orders", group, delivery.message_id)
    await buffer.housekeep("orders")  # delivered messages leave the channel; history stays
    assert await buffer.replay_history("orders", "audit", since) == 2
    again = await buffer.read("orders", "audit", "c2", 10)
    assert [d.envelope.body for d in again] == [b"new-1", b"new-2"]
    assert first not in [d.message_id for d in again]
    assert await buffer.read("orders", "default", "c1", 10) == []  # one group only
    assert await buffer.replay_history("orders", "fresh", 0) == 3  # a new group, from the start
    assert len(await buffer.read("orders", "fresh", "c3", 10)) == 3


async def test_a_channel_without_history_replays_nothing(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders"))
    await buffer.append(envelope())
    assert await buffer.replay_history("orders", "default", 0) == 0


async def test_connections_count_what_they_delivered(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders"))
    for name in ("c1", "c2"):
        record = ConnectionRecord(name, "orders", "default", seen_at=time.time())
        assert await buffer.add_connection(record, 10)
    for _ in range(3):
        await buffer.append(envelope())
    taken = await buffer.read("orders", "default", "c1", 10)
    for delivery in taken[:2]:
        assert await buffer.ack("orders", "default", delivery.message_id, "c1")
    counts = {r.connection_id: r.delivered for r in await buffer.list_connections("orders")}
    assert counts == {"c1": 2, "c2": 0}
    found = await buffer.get_connection("orders", "c1")
    assert found is not None and found.delivered == 2
    assert (await buffer.stats("orders")).counters["delivered"] == 2
    assert set((await buffer.stats("orders")).counters) >= {"delivered", "accepted"}
    assert not any(":" in name for name in (await buffer.stats("orders")).counters)
    await buffer.remove_connection("orders", "c1")
    assert await buffer.get_connection("orders", "c1") is None


async def test_a_dead_letter_carries_each_failed_delivery(
    buffer: Buffer, clock: StorageClock
) -> None:
    spec = ChannelSpec(
        "orders", ack_timeout_seconds=0.3, retry_delay_seconds=0.05, max_delivery_attempts=4
    )
    await buffer.provision(spec)
    record = ConnectionRecord("conn-a", "orders", "default", connector_id="laptop")
    assert await buffer.add_connection(record, 10)
    message_id = await buffer.append(envelope())
    started = clock.now()
    # 1: the target answered 503; 2: the connection closed; 3: no answer within the ack
    # timeout; 4: a 400, which gives up.
    [first] = await buffer.read("orders", "default", "conn-a", 10)
    await clock.advance(0.05)
    assert await buffer.nack("orders", "default", message_id, retry=True, reason="http_503")
    await clock.advance(0.1)
    [second] = await buffer.read("orders", "default", "conn-b", 10)
    assert await buffer.release("orders", "default", "conn-b") == 1
    [third] = await buffer.read("orders", "default", "conn-a", 10)
    await clock.advance(0.35)
    [fourth] = await buffer.read("orders", "default", "conn-a", 10)
    assert [d.attempt for d in (first, second, third, fourth)] == [1, 2, 3, 4]
    assert await buffer.nack(
        "orders", "default", message_id, retry=False, consumer="conn-a", reason="http_400"
    )
    [letter] = await buffer.dead_letters("orders")
    log = letter.delivery_attempts
    assert [(a.attempt, a.connection, a.outcome) for a in log] == [
        (1, "conn-a", "http_503"),
        (2, "conn-b", "connection_closed"),
        (3, "conn-a", "ack_timeout"),
        (4, "conn-a", "http_400"),
    ]
    assert [a.connector for a in log] == ["laptop", "", "laptop", "laptop"]
    assert [a.status_code for a in log] == [503, None, None, 400]
    assert log[0].duration >= 0.04 and log[2].duration >= 0.3
    assert all(started - 1 <= a.time <= clock.now() for a in log)
    assert [a.time for a in log] == sorted(a.time for a in log)


async def test_an_acked_message_leaves_no_attempt_log_behind(
    buffer: Buffer, clock: StorageClock
) -> None:
    spec = ChannelSpec("orders", retry_delay_seconds=0.05, max_delivery_attempts=2)
    await buffer.provision(spec)
    message_id = await buffer.append(envelope())
    await buffer.read("orders", "default", "c1", 10)
    assert await buffer.nack("orders", "default", message_id, retry=True, reason="timeout")
    await clock.advance(0.1)
    await buffer.read("orders", "default", "c1", 10)
    assert await buffer.ack("orders", "default", message_id)
    # A later message that fails starts its own log.
    second = await buffer.append(envelope())
    await buffer.read("orders", "default", "c1", 10)
    assert await buffer.nack("orders", "default", second, retry=False, reason="http_410")
    [letter] = await buffer.dead_letters("orders")
    assert [(a.attempt, a.outcome) for a in letter.delivery_attempts] == [(1, "http_410")]


async def test_a_sqlite_file_from_before_the_attempt_log_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the tables as the first release created them
        db.executescript(
            "CREATE TABLE pending (channel TEXT NOT NULL, grp TEXT NOT NULL, seq INTEGER NOT NULL,"
            " consumer TEXT NOT NULL, attempts INTEGER NOT NULL, due_at REAL NOT NULL,"
            " PRIMARY KEY (channel, grp, seq));"
            "CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " channel TEXT NOT NULL, grp TEXT NOT NULL, message_id TEXT NOT NULL,"
            " reason TEXT NOT NULL, attempts INTEGER NOT NULL, dead_at REAL NOT NULL,"
            " meta BLOB NOT NULL, body BLOB NOT NULL);"
        )
    buffer = open_buffer(f"sqlite:///{path}")
    try:
        await buffer.provision(ChannelSpec("orders"))
        message_id = await buffer.append(envelope())
        await buffer.read("orders", "default", "c1", 10)
        assert await buffer.nack("orders", "default", message_id, retry=False, reason="http_422")
        [letter] = await buffer.dead_letters("orders")
        assert [a.status_code for a in letter.delivery_attempts] == [422]
    finally:
        await buffer.aclose()


async def test_groups_are_listed_with_their_backlog(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders"))
    await buffer.join("orders", "analytics")
    assert await buffer.has_group("orders", "analytics")
    assert not await buffer.has_group("orders", "typo")
    assert not await buffer.has_group("nowhere", "default")
    ids = [await buffer.append(envelope(str(i).encode())) for i in range(3)]
    taken = await buffer.read("orders", "default", "c1", 2)
    assert await buffer.ack("orders", "default", taken[0].message_id)
    await buffer.add_connection(ConnectionRecord("conn-a", "orders", "analytics"), limit=10)
    groups = {g.name: g for g in await buffer.list_groups("orders")}
    assert list(groups) == ["analytics", "default"]
    assert (groups["default"].backlog, groups["default"].in_flight) == (2, 1)
    assert (groups["analytics"].backlog, groups["analytics"].in_flight) == (3, 0)
    assert (groups["default"].connections, groups["analytics"].connections) == (0, 1)
    assert groups["analytics"].last_seen > time.time() - 30
    oldest = groups["analytics"].oldest_age_seconds
    assert oldest is not None and 0 <= oldest < 30
    for message_id in ids:
        await buffer.read("orders", "analytics", "conn-a", 10)
        await buffer.ack("orders", "analytics", message_id)
    analytics = {g.name: g for g in await buffer.list_groups("orders")}["analytics"]
    assert (analytics.backlog, analytics.oldest_age_seconds) == (0, None)
    assert await buffer.list_groups("nowhere") == []


async def test_a_full_channel_names_the_group_holding_it_and_dropping_it_frees_it(
    buffer: Buffer,
) -> None:
    await buffer.provision(ChannelSpec("orders", max_queue_size=3))
    await buffer.join("orders", "stray")
    await buffer.add_connection(ConnectionRecord("conn-s", "orders", "stray"), limit=10)
    for _ in range(3):
        await buffer.append(envelope())
    for delivery in await buffer.read("orders", "default", "c1", 10):
        assert await buffer.ack("orders", "default", delivery.message_id, "c1")
    with pytest.raises(ChannelFull) as refused:
        await buffer.append(envelope())
    assert (refused.value.group, refused.value.backlog) == ("stray", 3)
    assert "'stray'" in str(refused.value)
    assert await buffer.drop_group("orders", "stray") == 1, "its connection is removed"
    assert not await buffer.touch_connection("orders", "conn-s")
    assert not await buffer.has_group("orders", "stray")
    assert await buffer.read("orders", "stray", "conn-s", 10) == []
    assert not await buffer.has_group("orders", "stray"), "reading must not bring it back"
    fresh = await buffer.append(envelope(b"fresh"))
    [delivery] = await buffer.read("orders", "default", "c1", 10)
    assert delivery.message_id == fresh
    assert [g.name for g in await buffer.list_groups("orders")] == ["default"]
    assert await buffer.drop_group("orders", "stray") is None
    assert await buffer.drop_group("nowhere", "stray") is None


async def test_dropping_the_default_group_brings_it_back_empty(buffer: Buffer) -> None:
    await buffer.provision(ChannelSpec("orders", max_queue_size=2))
    for _ in range(2):
        await buffer.append(envelope())
    await buffer.read("orders", "default", "c1", 1)
    assert await buffer.drop_group("orders", "default") == 0
    assert await buffer.has_group("orders", "default")
    assert await buffer.read("orders", "default", "c1", 10) == []
    assert (await buffer.stats("orders")).depth == 0
    later = await buffer.append(envelope(b"later"))
    [delivery] = await buffer.read("orders", "default", "c1", 10)
    assert delivery.message_id == later


async def test_groups_without_a_connection_are_dropped_when_idle(
    buffer: Buffer, clock: StorageClock
) -> None:
    # RabbitMQ answers the first append into new queues once the broker saved them (2 s,
    # cloud/buffers/rabbitmq.py REGISTRATION_MARGIN): idle times are longer there.
    unit = 5 if buffer.url.startswith("amqp") else 1
    await buffer.provision(ChannelSpec("orders", group_idle_seconds=unit))
    await buffer.provision(ChannelSpec("fixed", group_idle_seconds=unit, dynamic_groups=False))
    await buffer.provision(ChannelSpec("forever", group_idle_seconds=0))
    for channel in ("orders", "fixed", "forever"):
        await buffer.join(channel, "stray")
    await buffer.join("orders", "busy")
    await buffer.join("orders", "left")
    await buffer.add_connection(ConnectionRecord("conn-b", "orders", "busy"), limit=10)
    await buffer.add_connection(ConnectionRecord("conn-l", "orders", "left"), limit=10)
    await buffer.append(envelope())
    assert await buffer.drop_idle_groups("orders") == []
    await clock.advance(0.7 * unit)
    # A connection leaving is the group's last sign of life: its idle time starts then.
    await buffer.release("orders", "left", "conn-l")
    await buffer.remove_connection("orders", "conn-l")
    await clock.advance(0.5 * unit)
    assert await buffer.drop_idle_groups("orders") == ["stray"]
    assert await buffer.drop_idle_groups("fixed") == [], "only on channels with dynamic groups"
    assert await buffer.drop_idle_groups("forever") == [], "0: never"
    assert await buffer.drop_idle_groups("nowhere") == []
    await clock.advance(0.7 * unit)
    assert await buffer.drop_idle_groups("orders") == ["left"]
    names = [g.name for g in await buffer.list_groups("orders")]
    assert names == ["busy", "default"], "a connected group and the default one stay"
    [delivery] = await buffer.read("orders", "default", "c1", 10)
    assert await buffer.ack("orders", "default", delivery.message_id)
    await buffer.read("orders", "busy", "conn-b", 10)
    assert await buffer.ack("orders", "busy", delivery.message_id)
    assert (await buffer.stats("orders")).depth == 0


async def test_a_sqlite_file_from_before_group_times_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE groups (channel TEXT NOT NULL, name TEXT NOT NULL,"
            " cursor INTEGER NOT NULL, PRIMARY KEY (channel, name));"
            "INSERT INTO groups VALUES ('orders', 'old', 0);"
        )
    buffer = open_buffer(f"sqlite:///{path}")
    try:
        await buffer.provision(ChannelSpec("orders", group_idle_seconds=1))
        # A group whose last sign of life is unknown starts its idle time now.
        assert await buffer.drop_idle_groups("orders") == []
        assert [g.name for g in await buffer.list_groups("orders")] == ["default", "old"]
    finally:
        await buffer.aclose()


async def test_a_group_backlog_stays_right_after_housekeeping_expires_messages(
    buffer: Buffer, clock: StorageClock
) -> None:
    await buffer.provision(ChannelSpec("orders", ttl_seconds=1))
    await buffer.join("orders", "late")
    for _ in range(2):
        await buffer.append(envelope(b"old", at=clock.now()))
    await clock.advance(1.1)
    await buffer.append(envelope(b"fresh", at=clock.now()))
    assert await buffer.housekeep("orders") == 4  # two old messages for each of two groups
    backlog = {g.name: g.backlog for g in await buffer.list_groups("orders")}
    assert backlog == {"default": 1, "late": 1}
    await buffer.append(envelope(b"another", at=clock.now()))
    backlog = {g.name: g.backlog for g in await buffer.list_groups("orders")}
    assert backlog == {"default": 2, "late": 2}


def test_the_redis_scripts_take_their_constants_from_python() -> None:
    lua = resources.files("webhook_connect.cloud.buffers").joinpath("redis_scripts.lua")
    text = lua.read_text()
    for name, value in LUA_CONSTANTS.items():
        assert f"local {name} =" not in text, f"{name} is defined in Python only"
        for source in load_scripts().values():
            assert f"local {name} = {orjson.dumps(value).decode()}\n" in source
    assert LUA_CONSTANTS["EVENTS_KEPT"] == EVENTS_KEPT


def test_redis_error_replies_map_to_the_projects_exceptions_by_their_code() -> None:
    full = storage_error(ReplyError("WC_CHANNEL_FULL 5 slow 7"), "orders")
    assert isinstance(full, ChannelFull)
    assert (full.channel, full.limit, full.group, full.backlog) == ("orders", 5, "slow", 7)
    for reply in ("WC_NO_CHANNEL", "WC_NO_STREAM script: 1f2e, on @user_script:40."):
        assert isinstance(storage_error(ReplyError(reply), "orders"), UnknownChannel)
    other = storage_error(ReplyError("ERR WRONGTYPE Operation against a key"), "orders")
    assert type(other) is StorageError
    assert isinstance(storage_error(ConnectionRefusedError("refused")), StorageUnavailable)
