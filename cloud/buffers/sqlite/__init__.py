"""Embedded default backend: one SQLite file, so the cloud runs with nothing else installed.

Every statement runs on one worker thread that owns the connection. WAL with
``synchronous=FULL`` makes a commit durable before ``append`` returns; concurrent appends are
committed together (group commit), so the fsync is shared. Several cloud processes may open the
same file: each state change is one ``BEGIN IMMEDIATE`` transaction.

This class is the asynchronous shell: it reads the clock and runs the functions of the modules
beside it on the database thread. The rules live there, one concern each: ``queue.py`` and
``archive.py`` (the :class:`~webhook_connect.cloud.buffers.base.MessageQueue`), ``registry.py``
(the ``Registry``), ``limits.py`` (the ``Limits``); ``schema.sql`` holds the tables.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from webhook_connect.cloud.buffers.base import (
    ChannelEvent,
    ChannelSpec,
    ChannelStats,
    ConnectionRecord,
    DeadLetter,
    Delivery,
    GroupInfo,
    TokenRecord,
)
from webhook_connect.cloud.buffers.sqlite import archive, database, limits, queue, registry
from webhook_connect.cloud.buffers.sqlite.queue import ToAck, ToAppend
from webhook_connect.cloud.notifier import Notifier
from webhook_connect.shared.coalescer import Coalescer
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.exceptions import StorageError, StorageUnavailable
from webhook_connect.shared.frames import nack_reason

T = TypeVar("T")


def path_from_url(url: str) -> str:
    """``sqlite:///relative.db`` or ``sqlite:////abs/path.db`` to a file path."""
    if not url.startswith("sqlite:///"):
        raise ValueError(f"not a sqlite:/// URL: {url!r}")
    return url.removeprefix("sqlite:///") or "webhook-connect.db"


class SQLiteBuffer:
    """Channels in one SQLite file. ``url`` is ``sqlite:///path.db``; ``clock`` tells every
    rule the time (tests pass their own to move it without waiting)."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self._path = path_from_url(url)
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-buffer")
        self._db: sqlite3.Connection | None = None
        self._appender = Coalescer(self._append_batch, max_batch=512)
        # Acks share one commit (and one fsync) as appends do.
        self._acker = Coalescer(self._ack_batch, max_batch=512)
        # Other processes on the same file are not notified: readers also wake on a timeout.
        self._notifier = Notifier()

    # Plumbing -----------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` on the database thread; SQLite's errors as the project's."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._in_thread, fn, args)
        except sqlite3.OperationalError as exc:
            raise StorageUnavailable(f"sqlite: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"sqlite: {exc}") from exc

    def _in_thread(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self._db is None:
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            self._db = database.connect(self._path)
        return fn(self._db, *args)

    def _close(self, db: sqlite3.Connection) -> None:
        db.close()
        self._db = None

    async def aclose(self) -> None:
        await self._appender.aclose()
        await self._acker.aclose()
        if self._db is not None:
            await self._run(self._close)
        self._executor.shutdown(wait=True)

    async def ping(self) -> None:
        await self._run(_select_one)

    # Registry: channels and tokens --------------------------------------------------------

    async def provision(self, spec: ChannelSpec) -> None:
        await self._run(registry.provision, spec, self._clock())

    async def get_channel(self, name: str) -> ChannelSpec | None:
        return await self._run(database.channel_spec, name)

    async def list_channels(self) -> list[ChannelSpec]:
        return await self._run(registry.list_channels)

    async def delete_channel(self, name: str) -> bool:
        return await self._run(registry.delete_channel, name)

    async def put_token(self, token: TokenRecord) -> None:
        await self._run(registry.put_token, token)

    async def find_token(self, token_hash: str) -> TokenRecord | None:
        return await self._run(registry.find_token, token_hash)

    async def list_tokens(self, channel: str) -> list[TokenRecord]:
        return await self._run(registry.list_tokens, channel)

    async def delete_token(self, channel: str, token_id: str) -> bool:
        return await self._run(registry.delete_token, channel, token_id)

    # Registry: groups ---------------------------------------------------------------------

    async def join(self, channel: str, group: str) -> None:
        await self._run(registry.join, channel, group, self._clock())

    async def has_group(self, channel: str, group: str) -> bool:
        return await self._run(registry.has_group, channel, group)

    async def list_groups(self, channel: str) -> list[GroupInfo]:
        return await self._run(registry.list_groups, channel, self._clock())

    async def drop_group(self, channel: str, group: str) -> int | None:
        return await self._run(registry.drop_group, channel, group, self._clock())

    async def drop_idle_groups(self, channel: str) -> list[str]:
        return await self._run(registry.drop_idle_groups, channel, self._clock())

    # Registry: connections ----------------------------------------------------------------

    async def add_connection(self, record: ConnectionRecord, limit: int) -> bool:
        return await self._run(registry.add_connection, record, limit, self._clock())

    async def touch_connection(self, channel: str, connection_id: str) -> bool:
        return await self._run(registry.touch_connection, channel, connection_id, self._clock())

    async def remove_connection(self, channel: str, connection_id: str) -> bool:
        return await self._run(registry.remove_connection, channel, connection_id)

    async def get_connection(self, channel: str, connection_id: str) -> ConnectionRecord | None:
        return await self._run(registry.get_connection, channel, connection_id)

    async def list_connections(self, channel: str) -> list[ConnectionRecord]:
        return await self._run(registry.list_connections, channel, self._clock())

    async def reap_connections(self, channel: str) -> int:
        reaped = 0
        for record in await self._run(registry.stale_connections, channel, self._clock()):
            await self.release(channel, record.group, record.connection_id)
            reaped += await self.remove_connection(channel, record.connection_id)
        return reaped

    # Limits -------------------------------------------------------------------------------

    async def remember(self, key: str, ttl_seconds: float) -> bool:
        return await self._run(limits.remember, key, ttl_seconds, self._clock())

    async def hit_rate(self, channel: str, key: str, limit: int, window_seconds: float) -> float:
        now = self._clock()
        return await self._run(limits.hit_rate, channel, key, limit, window_seconds, now)

    # Message queue ------------------------------------------------------------------------

    async def append(self, envelope: Envelope) -> str:
        message_id, _ = await self._appender.submit((envelope, None, 0.0))
        return message_id

    async def append_once(
        self, envelope: Envelope, key: str, window_seconds: float
    ) -> tuple[str, bool]:
        return await self._appender.submit((envelope, key, window_seconds))

    async def _append_batch(self, items: list[ToAppend]) -> list[tuple[str, bool] | Exception]:
        # One transaction, one fsync for the whole batch (group commit).
        results = await self._run(queue.append_many, items, self._clock())
        for (envelope, _, _), result in zip(items, results, strict=True):
            if isinstance(result, tuple) and result[1]:
                self._notifier.notify(envelope.channel)
        return results

    def wake(self, channel: str) -> None:
        self._notifier.notify(channel)

    def change_version(self, channel: str) -> int:
        return self._notifier.version(channel)

    async def wait_for_change(self, channel: str, since: int, max_wait: float) -> None:
        await self._notifier.wait(channel, since, max_wait)

    async def read(self, channel: str, group: str, consumer: str, count: int) -> list[Delivery]:
        return await self._run(queue.read, channel, group, consumer, count, self._clock())

    async def ack(self, channel: str, group: str, message_id: str, consumer: str = "") -> bool:
        return await self._acker.submit((channel, group, message_id, consumer))

    async def _ack_batch(self, acks: list[ToAck]) -> list[bool | Exception]:
        return await self._run(queue.ack_many, acks, self._clock())

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
        reason = nack_reason(reason, retry)
        now = self._clock()
        return await self._run(queue.nack, channel, group, message_id, consumer, retry, reason, now)

    async def release(self, channel: str, group: str, consumer: str) -> int:
        released = await self._run(queue.release, channel, group, consumer, self._clock())
        if released:
            self._notifier.notify(channel)
        return released

    async def housekeep(self, channel: str) -> int:
        return await self._run(queue.housekeep, channel, self._clock())

    async def pending_count(self, channel: str, group: str, consumer: str, limit: int) -> int:
        return await self._run(queue.pending_count, channel, group, consumer, limit, self._clock())

    # Message queue: dead letters, history, activity, stats --------------------------------

    async def dead_letters(self, channel: str, limit: int = 100) -> list[DeadLetter]:
        return await self._run(archive.dead_letters, channel, limit)

    async def replay_dead_letters(self, channel: str, ids: list[str] | None = None) -> int:
        return await self._run(archive.replay_dead_letters, channel, ids, self._clock())

    async def purge_dead_letters(self, channel: str, ids: list[str] | None = None) -> int:
        return await self._run(archive.purge_dead_letters, channel, ids)

    async def stats(self, channel: str) -> ChannelStats:
        return await self._run(archive.stats, channel, self._clock())

    async def replay_history(
        self, channel: str, group: str, since: float, limit: int = 10000
    ) -> int:
        now = self._clock()
        replayed = await self._run(archive.replay_history, channel, group, since, limit, now)
        if replayed:
            self._notifier.notify(channel)
        return replayed

    async def recent_events(self, channel: str, limit: int = 50) -> list[ChannelEvent]:
        return await self._run(archive.recent_events, channel, limit)


def _select_one(db: sqlite3.Connection) -> None:
    db.execute("SELECT 1").fetchone()
