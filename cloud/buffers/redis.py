"""Redis Streams backend: one stream per channel, consumer groups for connector groups.

Keys of a channel share the hash tag ``{<channel>}`` so a Redis Cluster keeps them in one slot.
All state changes run as Lua scripts (``redis_scripts.lua``, loaded by ``scripts.py``, which
also maps every error Redis reports) so concurrent cloud replicas never see a half-done step.
Channel names are restricted to ``[A-Za-z0-9._-]``, so they are safe inside a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import inspect
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from webhook_connect.cloud.buffers.base import (
    CONNECTION_STALE_SECONDS,
    COUNTERS,
    DEFAULT_GROUP,
    EVENTS_KEPT,
    ChannelEvent,
    ChannelSpec,
    ChannelStats,
    ConnectionRecord,
    DeadLetter,
    Delivery,
    GroupInfo,
    TokenRecord,
    decode_attempts,
)
from webhook_connect.cloud.buffers.redispy import redis_py_client
from webhook_connect.cloud.buffers.redisurl import parse_redis_url
from webhook_connect.cloud.buffers.resp import ReplyError, RespClient
from webhook_connect.cloud.buffers.scripts import (
    ABSENT,
    BY_CONNECTION,
    UNAVAILABLE,
    error_code,
    load_scripts,
    storage_error,
)
from webhook_connect.cloud.notifier import Notifier
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.exceptions import StorageError, UnknownChannel
from webhook_connect.shared.frames import nack_reason

logger = logging.getLogger("webhook_connect.redis")

T = TypeVar("T")
STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
CHANNELS_KEY = "wc:channels"
TOKENS_KEY = "wc:tokens"
NOTIFY_CHANNEL = "wc:changed"
CHANNEL_KEYS = 9  # what channel_keys() returns; a script's own extra keys come after
# What _call returns by default for an error reply: raise it (as the project's exception).
RAISE: Any = object()


def key_digest(key: str) -> str:
    """A caller-supplied key (a delivery id, a nonce) made safe to embed in a Redis key."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def channel_keys(channel: str) -> list[str]:
    """The keys of one channel, in the order every script expects them."""
    tag = "{" + channel + "}"
    return [
        f"wc:{tag}:s",
        f"wc:{tag}:cfg",
        f"wc:{tag}:stats",
        f"wc:{tag}:dlq",
        f"wc:{tag}:conns",
        f"wc:{tag}:events",
        f"wc:{tag}:history",
        f"wc:{tag}:attempts",
        f"wc:{tag}:groups",
    ]


def _storage_errors(cls: type[T]) -> type[T]:
    """Make every public coroutine method of ``cls`` raise what redis-py reports (a lost
    server, an error reply) as the project's exceptions (scripts.storage_error)."""
    for name, method in list(vars(cls).items()):
        if name.startswith("_") or not inspect.iscoroutinefunction(method):
            continue

        def wrap(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            @functools.wraps(method)
            async def guarded(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await method(*args, **kwargs)
                except (RedisError, *UNAVAILABLE) as exc:
                    raise storage_error(exc) from exc

            return guarded

        setattr(cls, name, wrap(method))
    return cls


def channel_config(spec: ChannelSpec) -> dict[str, bytes | int]:
    """The channel's configuration hash (``wc:{ch}:cfg``), as the Lua scripts read it."""
    return {
        "spec": orjson.dumps(dataclasses.asdict(spec)),
        "max_queue_size": spec.max_queue_size,
        "ttl_ms": spec.ttl_seconds * 1000,
        "ack_timeout_ms": int(spec.ack_timeout_seconds * 1000),
        "max_attempts": spec.max_delivery_attempts,
        "retry_delay_ms": int(spec.retry_delay_seconds * 1000),
        "history_ms": spec.history_seconds * 1000,
    }


@_storage_errors
class RedisBuffer:
    """The production backend. ``url`` is a ``redis://`` or ``rediss://`` URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        # One reading of the URL for both clients (redisurl.py): the same credentials and the
        # same SSLContext, so the cold path cannot connect where the hot path is refused.
        endpoint = parse_redis_url(url)
        self._redis: aioredis.Redis = redis_py_client(
            endpoint, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30
        )
        self._sources = load_scripts()
        self._shas: dict[str, str] = {}
        # Script calls (every hot-path operation) go through a lean pipelining client:
        # concurrent callers share round trips, each still awaiting its own reply (a 202 only
        # after its own write succeeded). redis-py serves the rest.
        self._resp = RespClient(endpoint)
        self._to_announce: set[str] = set()
        self._notifier = Notifier()
        self._instance = uuid.uuid4().hex[:12]
        self._listener: asyncio.Task[None] | None = None

    async def aclose(self) -> None:
        await self._resp.aclose()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, *UNAVAILABLE):
                await self._listener
        await self._redis.aclose()

    async def _call(
        self,
        name: str,
        channel: str,
        *args: Any,
        keys: tuple[str, ...] = (),
        absent: Any = RAISE,
    ) -> Any:
        """Run script ``name`` on ``channel`` (and ``keys``, in its slot). An error reply is
        raised as the project's exception, except that ``absent``, if given, is returned when
        the group or the channel's stream does not exist."""
        sha = self._shas.get(name)
        if sha is None:
            loaded = await self._resp.execute("SCRIPT", "LOAD", self._sources[name])
            if isinstance(loaded, ReplyError):
                raise StorageError(f"cannot load script {name}: {loaded}")
            sha = self._shas[name] = loaded.decode()
        reply = await self._resp.execute(
            "EVALSHA", sha, CHANNEL_KEYS + len(keys), *channel_keys(channel), *keys, *args
        )
        if isinstance(reply, ReplyError):
            code = error_code(reply)
            if code == "NOSCRIPT":
                # Redis restarted and lost its script cache; the script did not run.
                self._shas.pop(name, None)
                return await self._call(name, channel, *args, keys=keys, absent=absent)
            if code in ABSENT and absent is not RAISE:
                return absent
            raise storage_error(reply, channel)
        return reply

    async def ping(self) -> None:
        # Both clients: the hot path (every ingest) first, so /ready fails when ingest would.
        reply = await self._resp.execute("PING")
        if isinstance(reply, ReplyError):
            raise storage_error(reply)
        await self._redis.ping()

    # Channels and tokens ------------------------------------------------------------------

    async def provision(self, spec: ChannelSpec) -> None:
        cfg = channel_keys(spec.name)[1]
        mapping = channel_config(spec)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(cfg, mapping=mapping)  # type: ignore[arg-type]
            pipe.sadd(CHANNELS_KEY, spec.name)
            await pipe.execute()
        await self.join(spec.name, DEFAULT_GROUP, from_start=True)

    async def get_channel(self, name: str) -> ChannelSpec | None:
        raw = await self._redis.hget(channel_keys(name)[1], "spec")
        return None if raw is None else ChannelSpec(**orjson.loads(raw))

    async def list_channels(self) -> list[ChannelSpec]:
        members: Any = await self._redis.smembers(CHANNELS_KEY)
        names = sorted(n.decode() for n in members)
        specs = [await self.get_channel(name) for name in names]
        return [spec for spec in specs if spec is not None]

    async def delete_channel(self, name: str) -> bool:
        tokens = await self.list_tokens(name)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.srem(CHANNELS_KEY, name)
            pipe.delete(*channel_keys(name))
            if tokens:
                pipe.hdel(TOKENS_KEY, *(t.token_hash for t in tokens))
            removed, *_ = await pipe.execute()
        return bool(removed)

    async def put_token(self, token: TokenRecord) -> None:
        record = orjson.dumps(dataclasses.asdict(token))
        await self._redis.hset(TOKENS_KEY, token.token_hash, record)

    async def find_token(self, token_hash: str) -> TokenRecord | None:
        raw = await self._redis.hget(TOKENS_KEY, token_hash)
        return None if raw is None else TokenRecord(**orjson.loads(raw))

    async def list_tokens(self, channel: str) -> list[TokenRecord]:
        records = [TokenRecord(**orjson.loads(v)) for v in await self._redis.hvals(TOKENS_KEY)]
        return sorted((r for r in records if r.channel == channel), key=lambda r: r.created_at)

    async def delete_token(self, channel: str, token_id: str) -> bool:
        for record in await self.list_tokens(channel):
            if record.token_id == token_id:
                return bool(await self._redis.hdel(TOKENS_KEY, record.token_hash))
        return False

    # Messages -----------------------------------------------------------------------------

    async def append(self, envelope: Envelope) -> str:
        channel = envelope.channel
        reply = await self._call("append", channel, envelope.encode_meta(), envelope.body)
        self._announce(channel)
        return str(reply.decode())

    async def append_once(
        self, envelope: Envelope, key: str, window_seconds: float
    ) -> tuple[str, bool]:
        channel = envelope.channel
        once = "wc:{" + channel + "}:once:" + key_digest(key)
        window_ms = max(1, int(window_seconds * 1000))
        reply = await self._call(
            "append", channel, envelope.encode_meta(), envelope.body, window_ms, keys=(once,)
        )
        message_id, is_new = reply[0].decode(), bool(reply[1])
        if is_new:
            self._announce(channel)
        return message_id, is_new

    async def remember(self, key: str, ttl_seconds: float) -> bool:
        ttl_ms = max(1, int(ttl_seconds * 1000))
        reply = await self._resp.execute(
            "SET", "wc:seen:" + key_digest(key), "1", "NX", "PX", ttl_ms
        )
        if isinstance(reply, ReplyError):
            raise storage_error(reply)
        return reply is not None

    async def hit_rate(self, channel: str, key: str, limit: int, window_seconds: float) -> float:
        counter = "wc:{" + channel + "}:rate:" + key_digest(key)
        window_ms = max(1, int(window_seconds * 1000))
        hits, left_ms = await self._call("hit", channel, window_ms, keys=(counter,))
        return 0.0 if int(hits) <= limit else max(int(left_ms), 1) / 1000

    def _announce(self, channel: str) -> None:
        """Wake readers here at once, and on other replicas (once per loop turn) via pub/sub."""
        self._notifier.notify(channel)
        if not self._to_announce:
            asyncio.get_running_loop().call_soon(self._publish)
        self._to_announce.add(channel)

    def _publish(self) -> None:
        for channel in self._to_announce:
            message = f"{self._instance} {channel}"
            task = asyncio.ensure_future(self._resp.execute("PUBLISH", NOTIFY_CHANNEL, message))
            task.add_done_callback(_ignore_result)
        self._to_announce.clear()

    def wake(self, channel: str) -> None:
        self._notifier.notify(channel)

    def change_version(self, channel: str) -> int:
        return self._notifier.version(channel)

    async def wait_for_change(self, channel: str, since: int, max_wait: float) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen())
        await self._notifier.wait(channel, since, max_wait)

    async def _listen(self) -> None:
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(NOTIFY_CHANNEL)
                    async for message in pubsub.listen():
                        instance, _, channel = message["data"].decode().partition(" ")
                        if instance != self._instance:  # our own appends notified already
                            self._notifier.notify(channel)
            except UNAVAILABLE as exc:
                logger.warning("change notifications lost, retrying: %s", exc)
                await asyncio.sleep(1)

    async def join(self, channel: str, group: str, *, from_start: bool = False) -> None:
        await self._call("join", channel, group, "0" if from_start else "$")

    async def has_group(self, channel: str, group: str) -> bool:
        return bool(await self._call("hasgroup", channel, group))

    async def list_groups(self, channel: str) -> list[GroupInfo]:
        rows = await self._call("groups", channel, absent=[])
        now = time.time()
        live: dict[str, list[float]] = {}
        for record in await self.list_connections(channel):
            live.setdefault(record.group, []).append(record.seen_at)
        infos = []
        for name, backlog, held, oldest, seen in rows:
            name = name.decode()
            mine = live.get(name, [])
            oldest_age = None
            if oldest:
                oldest_age = max(0.0, now - int(oldest.decode().split("-")[0]) / 1000)
            infos.append(
                GroupInfo(
                    name=name,
                    backlog=int(backlog),
                    in_flight=int(held),
                    oldest_age_seconds=oldest_age,
                    connections=len(mine),
                    last_seen=max([int(seen) / 1000 if seen else 0.0, *mine]),
                )
            )
        return sorted(infos, key=lambda info: info.name)

    async def drop_group(self, channel: str, group: str) -> int | None:
        removed = await self._call("dropgroup", channel, group, DEFAULT_GROUP, absent=-1)
        return None if int(removed) < 0 else int(removed)

    async def drop_idle_groups(self, channel: str) -> list[str]:
        spec = await self.get_channel(channel)
        if spec is None or not spec.dynamic_groups or spec.group_idle_seconds <= 0:
            return []
        idle_ms = spec.group_idle_seconds * 1000
        dropped = await self._call("idlegroups", channel, idle_ms, DEFAULT_GROUP, absent=[])
        return [name.decode() for name in dropped]

    async def read(self, channel: str, group: str, consumer: str, count: int) -> list[Delivery]:
        # A group dropped (or never joined) has nothing: reading must not bring it back.
        rows = await self._call("read", channel, group, consumer, count, absent=[])
        return [
            Delivery(row[0].decode(), int(row[1]), Envelope.decode(row[2], row[3])) for row in rows
        ]

    async def ack(self, channel: str, group: str, message_id: str, consumer: str = "") -> bool:
        if not STREAM_ID.match(message_id):
            return False
        return await self._settle("ack", channel, group, message_id, consumer)

    async def nack(
        self,
        channel: str,
        group: str,
        message_id: str,
        *,
        retry: bool,
        consumer: str = "",
        reason: str = "",
    ) -> bool:
        if not STREAM_ID.match(message_id):
            return False
        reason = nack_reason(reason, retry)
        return await self._settle(
            "nack", channel, group, message_id, consumer, "1" if retry else "0", reason
        )

    async def _settle(self, name: str, channel: str, *args: str) -> bool:
        return bool(await self._call(name, channel, *args, absent=0))

    async def release(self, channel: str, group: str, consumer: str) -> int:
        released = int(await self._call("release", channel, group, consumer, absent=0))
        if released:
            self._announce(channel)
        return released

    async def housekeep(self, channel: str) -> int:
        return int(await self._call("housekeep", channel, absent=0))

    # Connections ----------------------------------------------------------------------------

    async def add_connection(self, record: ConnectionRecord, limit: int) -> bool:
        info = orjson.dumps(dataclasses.asdict(record))
        stale_ms = int(CONNECTION_STALE_SECONDS * 1000)
        args = (record.connection_id, info, limit, stale_ms)
        return bool(await self._call("connect", record.channel, *args))

    async def touch_connection(self, channel: str, connection_id: str) -> bool:
        return bool(await self._call("touch", channel, connection_id))

    async def remove_connection(self, channel: str, connection_id: str) -> bool:
        _, _, stats, _, conns, *_ = channel_keys(channel)
        await self._redis.hdel(stats, BY_CONNECTION + connection_id)
        return bool(await self._redis.hdel(conns, connection_id))

    async def get_connection(self, channel: str, connection_id: str) -> ConnectionRecord | None:
        _, _, stats, _, conns, *_ = channel_keys(channel)
        # Every long poll (10,000 idle connectors: 400 a second) finds its connection again:
        # through the pipelining client, where redis-py's pool ran dry under that load.
        raw, delivered = await asyncio.gather(
            self._resp.execute("HGET", conns, connection_id),
            self._resp.execute("HGET", stats, BY_CONNECTION + connection_id),
        )
        for reply in (raw, delivered):
            if isinstance(reply, ReplyError):
                raise storage_error(reply, channel)
        if raw is None:
            return None
        record = ConnectionRecord(**orjson.loads(raw))
        return dataclasses.replace(record, delivered=int(delivered or 0))

    async def list_connections(self, channel: str) -> list[ConnectionRecord]:
        _, _, stats, _, conns, *_ = channel_keys(channel)
        raw: Any = await self._redis.hvals(conns)
        cutoff = time.time() - CONNECTION_STALE_SECONDS
        records = [ConnectionRecord(**orjson.loads(value)) for value in raw]
        live = sorted((r for r in records if r.seen_at >= cutoff), key=lambda r: r.connected_at)
        if not live:
            return []
        fields = [BY_CONNECTION + r.connection_id for r in live]
        counts: Any = await self._redis.hmget(stats, fields)
        return [
            dataclasses.replace(r, delivered=int(n or 0)) for r, n in zip(live, counts, strict=True)
        ]

    async def reap_connections(self, channel: str) -> int:
        raw: Any = await self._redis.hgetall(channel_keys(channel)[4])
        cutoff = time.time() - CONNECTION_STALE_SECONDS
        reaped = 0
        for value in raw.values():
            record = ConnectionRecord(**orjson.loads(value))
            if record.seen_at < cutoff:
                await self.release(channel, record.group, record.connection_id)
                reaped += await self.remove_connection(channel, record.connection_id)
        return reaped

    async def pending_count(self, channel: str, group: str, consumer: str, limit: int) -> int:
        # An entry idle past the ack timeout is due again, not held (the read script hands it
        # out first): counted, such entries could fill the window of a connection that lost
        # them (a long-poll answer cut off) for good, as only a read hands them out again.
        stream, cfg = channel_keys(channel)[:2]
        reply, timeout = await asyncio.gather(
            self._resp.execute("XPENDING", stream, group, "-", "+", limit, consumer),
            self._resp.execute("HGET", cfg, "ack_timeout_ms"),
        )
        for answer in (reply, timeout):
            if isinstance(answer, ReplyError):
                if error_code(answer) in ABSENT:
                    return 0
                raise storage_error(answer, channel)
        if timeout is None:  # the channel is gone
            return 0
        # XPENDING's extended form: [id, consumer, idle ms, deliveries] per entry.
        return sum(1 for entry in reply if int(entry[2]) < int(timeout))

    # Dead letters and stats ----------------------------------------------------------------

    async def dead_letters(self, channel: str, limit: int = 100) -> list[DeadLetter]:
        entries = await self._xrange(channel_keys(channel)[3], count=limit)
        return [_dead_letter(entry_id, fields) for entry_id, fields in entries]

    async def replay_dead_letters(self, channel: str, ids: list[str] | None = None) -> int:
        stream, _, stats, dlq, *_ = channel_keys(channel)
        letters = await self._select_dead_letters(channel, ids)
        for letter in letters:
            # A replay is a new message for the one group that gave up on it.
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xadd(
                    stream,
                    {
                        "meta": letter.envelope.encode_meta(),
                        "body": letter.envelope.body,
                        "group": letter.group,
                    },
                )
                pipe.xdel(dlq, letter.dead_letter_id)
                pipe.hincrby(stats, "replayed", 1)
                await pipe.execute()
        return len(letters)

    async def replay_history(
        self, channel: str, group: str, since: float, limit: int = 10000
    ) -> int:
        stream, _, stats, _, _, _, history, *_ = channel_keys(channel)
        spec = await self.get_channel(channel)
        if spec is None:
            raise UnknownChannel(channel)
        await self.join(channel, group)
        # Only what the window holds, even where the cheap trimming left older entries.
        since = max(since, time.time() - spec.history_seconds)
        start = f"{max(int(since * 1000), 0)}-0"
        entries: Any = await self._redis.xrange(history, min=start, count=limit)
        # A replay is a new message for that one group, as a dead-letter replay is.
        async with self._redis.pipeline(transaction=True) as pipe:
            for _, fields in entries:
                pipe.xadd(
                    stream, {b"meta": fields[b"meta"], b"body": fields[b"body"], b"group": group}
                )
            pipe.hincrby(stats, "replayed", len(entries))
            await pipe.execute()
        if entries:
            self._announce(channel)
        return len(entries)

    async def purge_dead_letters(self, channel: str, ids: list[str] | None = None) -> int:
        dlq = channel_keys(channel)[3]
        if ids is None:
            count = await self._redis.xlen(dlq)
            await self._redis.delete(dlq)
            return int(count)
        valid = [i for i in ids if STREAM_ID.match(i)]
        return int(await self._redis.xdel(dlq, *valid)) if valid else 0

    async def _select_dead_letters(self, channel: str, ids: list[str] | None) -> list[DeadLetter]:
        dlq = channel_keys(channel)[3]
        if ids is None:
            entries = await self._xrange(dlq)
        else:
            entries = []
            for entry_id in ids:
                if STREAM_ID.match(entry_id):
                    entries.extend(await self._xrange(dlq, entry_id, entry_id))
        return [_dead_letter(entry_id, fields) for entry_id, fields in entries]

    async def _xrange(
        self, key: str, first: str = "-", last: str = "+", count: int | None = None
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        entries: Any = await self._redis.xrange(key, first, last, count=count)
        return list(entries)

    async def recent_events(self, channel: str, limit: int = 50) -> list[ChannelEvent]:
        raw = await self._redis.lrange(channel_keys(channel)[5], 0, min(limit, EVENTS_KEPT) - 1)
        events = []
        for line in cast("list[bytes]", raw):
            kind, ms, message_id, consumer = line.decode().split(" ", 3)
            events.append(ChannelEvent(int(ms) / 1000, kind, message_id, consumer))
        return events

    async def stats(self, channel: str) -> ChannelStats:
        depth, in_flight, oldest = await self._call("depth", channel)
        _, _, stats_key, dlq, *_ = channel_keys(channel)
        raw = await self._redis.hgetall(stats_key)
        dead = await self._redis.xlen(dlq)
        counters = {name: 0 for name in COUNTERS}
        counters.update(
            {
                k.decode(): int(v)
                for k, v in cast(dict[bytes, bytes], raw).items()
                if not k.startswith(BY_CONNECTION.encode())
            }
        )
        oldest_age = None
        if oldest:
            oldest_age = max(0.0, time.time() - int(oldest.decode().split("-")[0]) / 1000)
        return ChannelStats(
            depth=int(depth),
            in_flight=int(in_flight),
            dead_letters=int(dead),
            oldest_age_seconds=oldest_age,
            counters=counters,
        )


def _ignore_result(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a lost notification only delays a remote reader


def _dead_letter(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    return DeadLetter(
        dead_letter_id=entry_id.decode(),
        message_id=fields[b"message_id"].decode(),
        group=fields[b"group"].decode(),
        reason=fields[b"reason"].decode(),
        attempts=int(fields[b"attempts"]),
        dead_at=int(fields[b"dead_at"]) / 1000,
        envelope=Envelope.decode(fields[b"meta"], fields[b"body"]),
        delivery_attempts=decode_attempts(fields.get(b"attempts_log")),
    )
