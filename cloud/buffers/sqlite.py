"""Embedded default backend: one SQLite file, so the cloud runs with nothing else installed.

Every statement runs on one worker thread that owns the connection. WAL with
``synchronous=FULL`` makes a commit durable before ``append`` returns; concurrent appends are
committed together (group commit), so the fsync is shared. Several cloud processes may open the
same file: each state change is one ``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from webhook_connect.cloud.buffers.base import (
    ACK_TIMEOUT,
    CONNECTION_CLOSED,
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
    DeliveryAttempt,
    GroupInfo,
    TokenRecord,
    decode_attempts,
    encode_attempts,
)
from webhook_connect.cloud.notifier import Notifier
from webhook_connect.shared.coalescer import Coalescer
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.exceptions import (
    ChannelFull,
    StorageError,
    StorageUnavailable,
    UnknownChannel,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY, channel TEXT NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, received_at REAL NOT NULL,
    only_group TEXT, meta BLOB NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS messages_by_channel ON messages (channel, seq);
CREATE TABLE IF NOT EXISTS groups (
    channel TEXT NOT NULL, name TEXT NOT NULL, cursor INTEGER NOT NULL,
    seen_at REAL NOT NULL DEFAULT 0, PRIMARY KEY (channel, name));
CREATE TABLE IF NOT EXISTS pending (
    channel TEXT NOT NULL, grp TEXT NOT NULL, seq INTEGER NOT NULL, consumer TEXT NOT NULL,
    attempts INTEGER NOT NULL, due_at REAL NOT NULL, delivered_at REAL NOT NULL DEFAULT 0,
    log BLOB, PRIMARY KEY (channel, grp, seq));
CREATE INDEX IF NOT EXISTS pending_by_due ON pending (channel, grp, due_at);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, grp TEXT NOT NULL,
    message_id TEXT NOT NULL, reason TEXT NOT NULL, attempts INTEGER NOT NULL,
    dead_at REAL NOT NULL, meta BLOB NOT NULL, body BLOB NOT NULL, log BLOB);
CREATE INDEX IF NOT EXISTS dead_letters_by_channel ON dead_letters (channel, id);
CREATE TABLE IF NOT EXISTS connections (
    channel TEXT NOT NULL, connection_id TEXT NOT NULL, record TEXT NOT NULL,
    seen_at REAL NOT NULL, PRIMARY KEY (channel, connection_id));
CREATE TABLE IF NOT EXISTS seen (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rates (
    key TEXT PRIMARY KEY, window_start REAL NOT NULL, hits INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, time REAL NOT NULL,
    type TEXT NOT NULL, message_id TEXT NOT NULL, consumer TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_channel ON events (channel, id);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY, channel TEXT NOT NULL, received_at REAL NOT NULL,
    meta BLOB NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS history_by_channel ON history (channel, received_at);
CREATE TABLE IF NOT EXISTS delivered_by (
    channel TEXT NOT NULL, connection_id TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (channel, connection_id));
CREATE TABLE IF NOT EXISTS counters (
    channel TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (channel, name));
"""
# Columns added since the first release, for files created before them.
ADDED_COLUMNS = (
    ("pending", "delivered_at", "REAL NOT NULL DEFAULT 0"),
    ("pending", "log", "BLOB"),
    ("dead_letters", "log", "BLOB"),
    ("groups", "seen_at", "REAL NOT NULL DEFAULT 0"),
)


def path_from_url(url: str) -> str:
    """``sqlite:///relative.db`` or ``sqlite:////abs/path.db`` to a file path."""
    if not url.startswith("sqlite:///"):
        raise ValueError(f"not a sqlite:/// URL: {url!r}")
    return url.removeprefix("sqlite:///") or "webhook-connect.db"


# What the appender batches: an envelope, and its idempotency key and window, if any.
ToAppend = tuple[Envelope, str | None, float]


class SQLiteBuffer:
    """Channels in one SQLite file. ``url`` is ``sqlite:///path.db``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._path = path_from_url(url)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-buffer")
        self._db: sqlite3.Connection | None = None
        self._appender = Coalescer(self._append_batch, max_batch=512)
        # Acks share one commit (and one fsync) as appends do.
        self._acker = Coalescer(self._ack_batch, max_batch=512)
        # Other processes on the same file are not notified: readers also wake on a timeout.
        self._notifier = Notifier()

    # Plumbing -----------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._in_thread, fn, args)
        except sqlite3.OperationalError as exc:
            raise StorageUnavailable(f"sqlite: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"sqlite: {exc}") from exc

    def _in_thread(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self._db is None:
            self._db = self._connect()
        return fn(self._db, *args)

    def _connect(self) -> sqlite3.Connection:
        Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute("PRAGMA journal_mode = WAL")
        # At-least-once: a 202 promises the message survives a crash, so fsync every commit.
        db.execute("PRAGMA synchronous = FULL")
        db.executescript(SCHEMA)
        for table, column, declaration in ADDED_COLUMNS:
            if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
        return db

    async def aclose(self) -> None:
        await self._appender.aclose()
        await self._acker.aclose()

        def close(db: sqlite3.Connection) -> None:
            db.close()
            self._db = None

        if self._db is not None:
            await self._run(close)
        self._executor.shutdown(wait=True)

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    # Channels and tokens ------------------------------------------------------------------

    async def provision(self, spec: ChannelSpec) -> None:
        def provision(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.execute(
                    "INSERT INTO channels (name, spec) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec",
                    (spec.name, orjson.dumps(dataclasses.asdict(spec)).decode()),
                )
                _join(db, spec.name, DEFAULT_GROUP, time.time(), from_start=True)

        await self._run(provision)

    async def get_channel(self, name: str) -> ChannelSpec | None:
        return await self._run(_get_channel, name)

    async def list_channels(self) -> list[ChannelSpec]:
        def list_all(db: sqlite3.Connection) -> list[ChannelSpec]:
            rows = db.execute("SELECT spec FROM channels ORDER BY name").fetchall()
            return [ChannelSpec(**orjson.loads(row[0])) for row in rows]

        return await self._run(list_all)

    async def delete_channel(self, name: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            with _transaction(db):
                found = db.execute("DELETE FROM channels WHERE name = ?", (name,)).rowcount
                for table in CHANNEL_TABLES:
                    db.execute(f"DELETE FROM {table} WHERE channel = ?", (name,))
            return bool(found)

        return await self._run(delete)

    async def put_token(self, token: TokenRecord) -> None:
        def put(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.execute(
                    "INSERT OR REPLACE INTO tokens (token_hash, channel, record) VALUES (?, ?, ?)",
                    (token.token_hash, token.channel, orjson.dumps(dataclasses.asdict(token))),
                )

        await self._run(put)

    async def find_token(self, token_hash: str) -> TokenRecord | None:
        def find(db: sqlite3.Connection) -> TokenRecord | None:
            row = db.execute(
                "SELECT record FROM tokens WHERE token_hash = ?", (token_hash,)
            ).fetchone()
            return None if row is None else TokenRecord(**orjson.loads(row[0]))

        return await self._run(find)

    async def list_tokens(self, channel: str) -> list[TokenRecord]:
        def list_all(db: sqlite3.Connection) -> list[TokenRecord]:
            rows = db.execute("SELECT record FROM tokens WHERE channel = ?", (channel,))
            records = [TokenRecord(**orjson.loads(row[0])) for row in rows]
            return sorted(records, key=lambda r: r.created_at)

        return await self._run(list_all)

    async def delete_token(self, channel: str, token_id: str) -> bool:
        for record in await self.list_tokens(channel):
            if record.token_id == token_id:

                def delete(db: sqlite3.Connection, token_hash: str = record.token_hash) -> bool:
                    with _transaction(db):
                        sql = "DELETE FROM tokens WHERE token_hash = ?"
                        return bool(db.execute(sql, (token_hash,)).rowcount)

                return await self._run(delete)
        return False

    # Messages -----------------------------------------------------------------------------

    async def append(self, envelope: Envelope) -> str:
        message_id, _ = await self._appender.submit((envelope, None, 0.0))
        return message_id

    async def append_once(
        self, envelope: Envelope, key: str, window_seconds: float
    ) -> tuple[str, bool]:
        return await self._appender.submit((envelope, key, window_seconds))

    async def _append_batch(self, items: list[ToAppend]) -> list[tuple[str, bool] | Exception]:
        # One transaction, one fsync for the whole batch (group commit).
        results = await self._run(_append_many, items, time.time())
        for (envelope, _, _), result in zip(items, results, strict=True):
            if isinstance(result, tuple) and result[1]:
                self._notifier.notify(envelope.channel)
        return results

    async def remember(self, key: str, ttl_seconds: float) -> bool:
        def remember(db: sqlite3.Connection) -> bool:
            now = time.time()
            with _transaction(db, durable=False):
                row = db.execute(
                    "SELECT expires_at FROM seen WHERE key = ?", ("r:" + key,)
                ).fetchone()
                if row is not None and row[0] > now:
                    return False
                db.execute(
                    "INSERT OR REPLACE INTO seen (key, value, expires_at) VALUES (?, '', ?)",
                    ("r:" + key, now + ttl_seconds),
                )
                return True

        return await self._run(remember)

    async def hit_rate(self, channel: str, key: str, limit: int, window_seconds: float) -> float:
        def hit(db: sqlite3.Connection) -> float:
            now = time.time()
            start = now - now % window_seconds
            name = f"{channel}\0{key}"
            with _transaction(db, durable=False):
                row = db.execute(
                    "SELECT window_start, hits FROM rates WHERE key = ?", (name,)
                ).fetchone()
                hits = row[1] + 1 if row is not None and row[0] == start else 1
                db.execute(
                    "INSERT OR REPLACE INTO rates (key, window_start, hits) VALUES (?, ?, ?)",
                    (name, start, hits),
                )
            return 0.0 if hits <= limit else start + window_seconds - now

        return await self._run(hit)

    def wake(self, channel: str) -> None:
        self._notifier.notify(channel)

    def change_version(self, channel: str) -> int:
        return self._notifier.version(channel)

    async def wait_for_change(self, channel: str, since: int, max_wait: float) -> None:
        await self._notifier.wait(channel, since, max_wait)

    async def join(self, channel: str, group: str) -> None:
        def join(db: sqlite3.Connection) -> None:
            with _transaction(db):
                _join(db, channel, group, time.time(), from_start=False)

        await self._run(join)

    async def has_group(self, channel: str, group: str) -> bool:
        def exists(db: sqlite3.Connection) -> bool:
            sql = "SELECT 1 FROM groups WHERE channel = ? AND name = ?"
            return db.execute(sql, (channel, group)).fetchone() is not None

        return await self._run(exists)

    async def list_groups(self, channel: str) -> list[GroupInfo]:
        return await self._run(_list_groups, channel, time.time())

    async def drop_group(self, channel: str, group: str) -> int | None:
        return await self._run(_drop_group, channel, group, time.time())

    async def drop_idle_groups(self, channel: str) -> list[str]:
        return await self._run(_drop_idle_groups, channel, time.time())

    async def read(self, channel: str, group: str, consumer: str, count: int) -> list[Delivery]:
        return await self._run(_read, channel, group, consumer, count, time.time())

    async def ack(self, channel: str, group: str, message_id: str, consumer: str = "") -> bool:
        return await self._acker.submit((channel, group, message_id, consumer))

    async def _ack_batch(self, acks: list[tuple[str, str, str, str]]) -> list[bool | Exception]:
        return await self._run(_ack_many, acks)

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
        reason = reason or ("nack_retry" if retry else "nack")
        return await self._run(
            _nack, channel, group, message_id, consumer, retry, reason, time.time()
        )

    async def release(self, channel: str, group: str, consumer: str) -> int:
        released = await self._run(_release, channel, group, consumer, time.time())
        if released:
            self._notifier.notify(channel)
        return released

    async def housekeep(self, channel: str) -> int:
        return await self._run(_housekeep, channel, time.time())

    # Connections ----------------------------------------------------------------------------

    async def add_connection(self, record: ConnectionRecord, limit: int) -> bool:
        return await self._run(_add_connection, record, limit, time.time())

    async def touch_connection(self, channel: str, connection_id: str) -> bool:
        def touch(db: sqlite3.Connection) -> bool:
            with _transaction(db):
                sql = "UPDATE connections SET seen_at = ? WHERE channel = ? AND connection_id = ?"
                return bool(db.execute(sql, (time.time(), channel, connection_id)).rowcount)

        return await self._run(touch)

    async def remove_connection(self, channel: str, connection_id: str) -> bool:
        def remove(db: sqlite3.Connection) -> bool:
            with _transaction(db):
                db.execute(
                    "DELETE FROM delivered_by WHERE channel = ? AND connection_id = ?",
                    (channel, connection_id),
                )
                sql = "DELETE FROM connections WHERE channel = ? AND connection_id = ?"
                return bool(db.execute(sql, (channel, connection_id)).rowcount)

        return await self._run(remove)

    async def get_connection(self, channel: str, connection_id: str) -> ConnectionRecord | None:
        def get(db: sqlite3.Connection) -> ConnectionRecord | None:
            row = db.execute(
                f"SELECT {CONNECTION_COLUMNS} WHERE c.channel = ? AND c.connection_id = ?",
                (channel, connection_id),
            ).fetchone()
            return None if row is None else _connection(row)

        return await self._run(get)

    async def list_connections(self, channel: str) -> list[ConnectionRecord]:
        def list_all(db: sqlite3.Connection) -> list[ConnectionRecord]:
            rows = db.execute(
                f"SELECT {CONNECTION_COLUMNS} WHERE c.channel = ? AND c.seen_at >= ?",
                (channel, time.time() - CONNECTION_STALE_SECONDS),
            )
            return sorted((_connection(row) for row in rows), key=lambda r: r.connected_at)

        return await self._run(list_all)

    async def reap_connections(self, channel: str) -> int:
        def stale(db: sqlite3.Connection) -> list[ConnectionRecord]:
            rows = db.execute(
                "SELECT record, seen_at FROM connections WHERE channel = ? AND seen_at < ?",
                (channel, time.time() - CONNECTION_STALE_SECONDS),
            )
            return [_connection(row) for row in rows]

        reaped = 0
        for record in await self._run(stale):
            await self.release(channel, record.group, record.connection_id)
            reaped += await self.remove_connection(channel, record.connection_id)
        return reaped

    async def pending_count(self, channel: str, group: str, consumer: str, limit: int) -> int:
        def count(db: sqlite3.Connection) -> int:
            row = db.execute(
                "SELECT COUNT(*) FROM pending WHERE channel = ? AND grp = ? AND consumer = ?",
                (channel, group, consumer),
            ).fetchone()
            return min(int(row[0]), limit)

        return await self._run(count)

    # Dead letters and stats ----------------------------------------------------------------

    async def dead_letters(self, channel: str, limit: int = 100) -> list[DeadLetter]:
        def select(db: sqlite3.Connection) -> list[DeadLetter]:
            rows = db.execute(
                f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE channel = ? "
                "ORDER BY id LIMIT ?",
                (channel, limit),
            )
            return [_dead_letter(row) for row in rows]

        return await self._run(select)

    async def replay_dead_letters(self, channel: str, ids: list[str] | None = None) -> int:
        return await self._run(_replay_dead_letters, channel, ids, time.time())

    async def purge_dead_letters(self, channel: str, ids: list[str] | None = None) -> int:
        def purge(db: sqlite3.Connection) -> int:
            with _transaction(db):
                if ids is None:
                    sql = "DELETE FROM dead_letters WHERE channel = ?"
                    return db.execute(sql, (channel,)).rowcount
                sql = "DELETE FROM dead_letters WHERE channel = ? AND id = ?"
                return sum(db.execute(sql, (channel, _int(i))).rowcount for i in ids)

        return await self._run(purge)

    async def stats(self, channel: str) -> ChannelStats:
        return await self._run(_stats, channel, time.time())

    async def replay_history(
        self, channel: str, group: str, since: float, limit: int = 10000
    ) -> int:
        replayed = await self._run(_replay_history, channel, group, since, limit, time.time())
        if replayed:
            self._notifier.notify(channel)
        return replayed

    async def recent_events(self, channel: str, limit: int = 50) -> list[ChannelEvent]:
        def select(db: sqlite3.Connection) -> list[ChannelEvent]:
            rows = db.execute(
                "SELECT time, type, message_id, consumer FROM events WHERE channel = ? "
                "ORDER BY id DESC LIMIT ?",
                (channel, min(limit, EVENTS_KEPT)),
            )
            return [ChannelEvent(*row) for row in rows]

        return await self._run(select)


# Work done on the database thread ------------------------------------------------------------

CHANNEL_TABLES = (
    "tokens", "messages", "groups", "pending", "dead_letters", "counters", "connections",
    "events", "history", "delivered_by",
)  # fmt: skip
CONNECTION_COLUMNS = (
    "c.record, c.seen_at, COALESCE(d.n, 0) FROM connections AS c LEFT JOIN delivered_by AS d "
    "ON d.channel = c.channel AND d.connection_id = c.connection_id"
)
DEAD_LETTER_COLUMNS = "id, message_id, grp, reason, attempts, dead_at, meta, body, log"


class _transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` on error: one writer at a time.

    ``durable=False`` commits without an fsync (WAL, ``synchronous=NORMAL``): for rate counters
    and replay keys, which a process crash keeps and only a power cut could lose, and which
    must not cost a disk flush per webhook.
    """

    def __init__(self, db: sqlite3.Connection, *, durable: bool = True) -> None:
        self._db = db
        self._durable = durable

    def __enter__(self) -> None:
        if not self._durable:
            self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        try:
            self._db.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            if not self._durable:
                self._db.execute("PRAGMA synchronous = FULL")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return -1


def _message_id(received_at: float, seq: int | None) -> str:
    """Ids carry the time received, so a new database never reissues an id a connector saw."""
    return f"{int(received_at * 1000)}-{seq}"


def _get_channel(db: sqlite3.Connection, name: str) -> ChannelSpec | None:
    row = db.execute("SELECT spec FROM channels WHERE name = ?", (name,)).fetchone()
    return None if row is None else ChannelSpec(**orjson.loads(row[0]))


def _join(
    db: sqlite3.Connection, channel: str, group: str, now: float, *, from_start: bool
) -> None:
    cursor = 0
    if not from_start:
        row = db.execute("SELECT MAX(seq) FROM messages").fetchone()
        cursor = row[0] or 0
    db.execute(
        "INSERT INTO groups (channel, name, cursor, seen_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (channel, name) DO UPDATE SET seen_at = excluded.seen_at",
        (channel, group, cursor, now),
    )


def _group_rows(db: sqlite3.Connection, channel: str) -> list[tuple[str, int, int, float | None]]:
    """``(name, backlog, in flight, oldest received_at)`` of every group of ``channel``."""
    rows = []
    groups = db.execute(
        "SELECT name, cursor FROM groups WHERE channel = ? ORDER BY name", (channel,)
    ).fetchall()
    for name, cursor in groups:
        unread, unread_oldest = db.execute(
            "SELECT COUNT(*), MIN(received_at) FROM messages WHERE channel = ? AND seq > ? "
            "AND (only_group IS NULL OR only_group = ?)",
            (channel, cursor, name),
        ).fetchone()
        held, held_oldest = db.execute(
            "SELECT COUNT(*), MIN(m.received_at) FROM pending p JOIN messages m ON m.seq = p.seq "
            "WHERE p.channel = ? AND p.grp = ?",
            (channel, name),
        ).fetchone()
        oldest = min((t for t in (unread_oldest, held_oldest) if t is not None), default=None)
        rows.append((name, unread + held, held, oldest))
    return rows


def _full(db: sqlite3.Connection, channel: str) -> ChannelFull:
    """The refusal of a full channel, naming the group with the most messages not acked."""
    spec = _get_channel(db, channel)
    limit = spec.max_queue_size if spec else 0
    rows = _group_rows(db, channel)
    if not rows:
        return ChannelFull(channel, limit)
    name, backlog, _, _ = max(rows, key=lambda row: row[1])
    return ChannelFull(channel, limit, name, backlog)


def _group_connections(db: sqlite3.Connection, channel: str) -> list[tuple[str, str, float]]:
    """``(connection id, group, seen_at)`` of every connection record of ``channel``."""
    rows = db.execute(
        "SELECT connection_id, record, seen_at FROM connections WHERE channel = ?", (channel,)
    ).fetchall()
    return [(cid, str(orjson.loads(record).get("group", "")), seen) for cid, record, seen in rows]


def _list_groups(db: sqlite3.Connection, channel: str, now: float) -> list[GroupInfo]:
    seen = dict(
        db.execute("SELECT name, seen_at FROM groups WHERE channel = ?", (channel,)).fetchall()
    )
    live = [c for c in _group_connections(db, channel) if c[2] >= now - CONNECTION_STALE_SECONDS]
    infos = []
    for name, backlog, held, oldest in _group_rows(db, channel):
        mine = [c[2] for c in live if c[1] == name]
        infos.append(
            GroupInfo(
                name=name,
                backlog=backlog,
                in_flight=held,
                oldest_age_seconds=None if oldest is None else max(0.0, now - oldest),
                connections=len(mine),
                last_seen=max([seen.get(name, 0.0), *mine]),
            )
        )
    return infos


def _forget_group(db: sqlite3.Connection, channel: str, group: str) -> None:
    db.execute("DELETE FROM groups WHERE channel = ? AND name = ?", (channel, group))
    db.execute("DELETE FROM pending WHERE channel = ? AND grp = ?", (channel, group))


def _drop_group(db: sqlite3.Connection, channel: str, group: str, now: float) -> int | None:
    with _transaction(db):
        sql = "SELECT 1 FROM groups WHERE channel = ? AND name = ?"
        if db.execute(sql, (channel, group)).fetchone() is None:
            return None
        _forget_group(db, channel, group)
        removed = 0
        for connection_id, of_group, _ in _group_connections(db, channel):
            if of_group == group:
                for table in ("connections", "delivered_by"):
                    db.execute(
                        f"DELETE FROM {table} WHERE channel = ? AND connection_id = ?",
                        (channel, connection_id),
                    )
                removed += 1
        if group == DEFAULT_GROUP:  # messages always wait for it: back at once, empty
            _join(db, channel, group, now, from_start=False)
        _trim(db, channel)
        return removed


def _drop_idle_groups(db: sqlite3.Connection, channel: str, now: float) -> list[str]:
    with _transaction(db):
        spec = _get_channel(db, channel)
        if spec is None or not spec.dynamic_groups or spec.group_idle_seconds <= 0:
            return []
        # Groups from before last-seen times were kept start their idle time now.
        db.execute(
            "UPDATE groups SET seen_at = ? WHERE channel = ? AND seen_at = 0", (now, channel)
        )
        connected = {group for _, group, _ in _group_connections(db, channel)}
        idle = db.execute(
            "SELECT name FROM groups WHERE channel = ? AND name != ? AND seen_at < ?",
            (channel, DEFAULT_GROUP, now - spec.group_idle_seconds),
        ).fetchall()
        dropped = [name for (name,) in idle if name not in connected]
        for name in dropped:
            _forget_group(db, channel, name)
        if dropped:
            _trim(db, channel)
        return dropped


def _count(db: sqlite3.Connection, channel: str, name: str, amount: int = 1) -> None:
    db.execute(
        "INSERT INTO counters (channel, name, value) VALUES (?, ?, ?) "
        "ON CONFLICT (channel, name) DO UPDATE SET value = value + excluded.value",
        (channel, name, amount),
    )


def _depth(db: sqlite3.Connection, channel: str) -> int:
    sql = "SELECT COUNT(*) FROM messages WHERE channel = ?"
    return int(db.execute(sql, (channel,)).fetchone()[0])


def _append_many(
    db: sqlite3.Connection, items: list[ToAppend], now: float
) -> list[tuple[str, bool] | Exception]:
    results: list[tuple[str, bool] | Exception] = []
    history: dict[str, int] = {}
    room: dict[str, int] = {}
    accepted: dict[str, int] = {}
    full: dict[str, ChannelFull] = {}
    with _transaction(db):
        for envelope, once, window in items:
            channel = envelope.channel
            once_key = None if once is None else f"o:{channel}\0{once}"
            if once_key is not None:
                row = db.execute(
                    "SELECT value FROM seen WHERE key = ? AND expires_at > ?", (once_key, now)
                ).fetchone()
                if row is not None:
                    results.append((row[0], False))
                    continue
            if channel not in room:
                spec = _get_channel(db, channel)
                if spec is None:
                    room[channel] = -1
                else:
                    if _depth(db, channel) >= spec.max_queue_size:
                        _trim(db, channel)
                    room[channel] = spec.max_queue_size - _depth(db, channel)
            if room[channel] < 0:
                results.append(UnknownChannel(channel))
                continue
            if room[channel] == 0:
                full[channel] = full.get(channel) or _full(db, channel)
                results.append(full[channel])
                continue
            row = db.execute(
                "INSERT INTO messages (channel, received_at, meta, body) VALUES (?, ?, ?, ?)",
                (channel, envelope.received_at, envelope.encode_meta(), envelope.body),
            )
            room[channel] -= 1
            accepted[channel] = accepted.get(channel, 0) + 1
            message_id = _message_id(envelope.received_at, row.lastrowid)
            _event(db, channel, now, "received", message_id)
            if history.setdefault(channel, _history_seconds(db, channel)):
                db.execute(
                    "INSERT INTO history (seq, channel, received_at, meta, body) "
                    "SELECT seq, channel, received_at, meta, body FROM messages WHERE seq = ?",
                    (row.lastrowid,),
                )
            if once_key is not None:
                db.execute(
                    "INSERT OR REPLACE INTO seen (key, value, expires_at) VALUES (?, ?, ?)",
                    (once_key, message_id, now + window),
                )
            results.append((message_id, True))
        for channel, amount in accepted.items():
            _count(db, channel, "accepted", amount)
    return results


def _read(
    db: sqlite3.Connection, channel: str, group: str, consumer: str, count: int, now: float
) -> list[Delivery]:
    with _transaction(db):
        spec = _get_channel(db, channel)
        if spec is None:
            raise UnknownChannel(channel)
        joined = db.execute(
            "SELECT cursor FROM groups WHERE channel = ? AND name = ?", (channel, group)
        ).fetchone()
        if joined is None:  # dropped (or never joined): reading must not bring it back
            return []
        cutoff = now - spec.ttl_seconds
        due_at = now + spec.ack_timeout_seconds
        out: list[Delivery] = []
        # Messages whose ack timeout passed or whose retry delay is over come first.
        redue = db.execute(
            "SELECT p.seq, p.attempts, p.consumer, p.delivered_at, p.log, m.received_at, "
            "m.meta, m.body FROM pending p JOIN messages m ON m.seq = p.seq "
            "WHERE p.channel = ? AND p.grp = ? AND p.due_at <= ? ORDER BY p.seq LIMIT ?",
            (channel, group, now, count),
        ).fetchall()
        for seq, attempts, holder, delivered_at, log, received_at, meta, body in redue:
            if holder:  # still held when its ack timeout passed (a nack or release clears it)
                log = _logged(db, channel, log, attempts, delivered_at, holder, ACK_TIMEOUT, now)
            attempts += 1
            if received_at < cutoff:
                _settle(db, channel, group, seq)
                _count(db, channel, "expired")
            elif attempts > spec.max_delivery_attempts:
                reason = "max_delivery_attempts"
                _dead_letter_now(db, channel, group, seq, attempts - 1, reason, now, log)
            else:
                db.execute(
                    "UPDATE pending SET attempts = ?, consumer = ?, due_at = ?, "
                    "delivered_at = ?, log = ? WHERE channel = ? AND grp = ? AND seq = ?",
                    (attempts, consumer, due_at, now, log, channel, group, seq),
                )
                _count(db, channel, "redelivered")
                out.append(
                    Delivery(_message_id(received_at, seq), attempts, Envelope.decode(meta, body))
                )
        if len(out) < count:
            (cursor,) = db.execute(
                "SELECT cursor FROM groups WHERE channel = ? AND name = ?", (channel, group)
            ).fetchone()
            fresh = db.execute(
                "SELECT seq, received_at, only_group, meta, body FROM messages "
                "WHERE channel = ? AND seq > ? ORDER BY seq LIMIT ?",
                (channel, cursor, count - len(out)),
            ).fetchall()
            for seq, received_at, only_group, meta, body in fresh:
                cursor = seq
                if received_at < cutoff:
                    _count(db, channel, "expired")
                elif only_group is None or only_group == group:
                    db.execute(
                        "INSERT INTO pending "
                        "(channel, grp, seq, consumer, attempts, due_at, delivered_at) "
                        "VALUES (?, ?, ?, ?, 1, ?, ?)",
                        (channel, group, seq, consumer, due_at, now),
                    )
                    out.append(
                        Delivery(_message_id(received_at, seq), 1, Envelope.decode(meta, body))
                    )
            db.execute(
                "UPDATE groups SET cursor = ? WHERE channel = ? AND name = ?",
                (cursor, channel, group),
            )
        return out


def _settle(db: sqlite3.Connection, channel: str, group: str, seq: int) -> None:
    db.execute(
        "DELETE FROM pending WHERE channel = ? AND grp = ? AND seq = ?", (channel, group, seq)
    )


def _dead_letter_now(
    db: sqlite3.Connection,
    channel: str,
    group: str,
    seq: int,
    attempts: int,
    reason: str,
    now: float,
    log: bytes | None,
) -> None:
    db.execute(
        "INSERT INTO dead_letters "
        "(channel, grp, message_id, reason, attempts, dead_at, meta, body, log) "
        "SELECT channel, ?, CAST(CAST(received_at * 1000 AS INTEGER) AS TEXT) || '-' || seq, "
        "?, ?, ?, meta, body, ? FROM messages WHERE seq = ?",
        (group, reason, attempts, now, log, seq),
    )
    _settle(db, channel, group, seq)
    _count(db, channel, "dead_lettered")
    row = db.execute("SELECT received_at FROM messages WHERE seq = ?", (seq,)).fetchone()
    if row is not None:
        _event(db, channel, now, "dead_lettered", _message_id(row[0], seq))


def _logged(
    db: sqlite3.Connection,
    channel: str,
    log: bytes | None,
    attempt: int,
    delivered_at: float,
    connection: str,
    outcome: str,
    now: float,
) -> bytes:
    """``log`` (a pending message's attempt log) with one more failed delivery."""
    row = db.execute(
        "SELECT record FROM connections WHERE channel = ? AND connection_id = ?",
        (channel, connection),
    ).fetchone()
    connector = str(orjson.loads(row[0]).get("connector_id") or "") if row else ""
    duration = max(now - delivered_at, 0.0) if delivered_at else 0.0
    entry = DeliveryAttempt(attempt, delivered_at or now, connection, connector, outcome, duration)
    return encode_attempts([*decode_attempts(log), entry])


def _release(db: sqlite3.Connection, channel: str, group: str, consumer: str, now: float) -> int:
    with _transaction(db):
        held = db.execute(
            "SELECT seq, attempts, delivered_at, log FROM pending "
            "WHERE channel = ? AND grp = ? AND consumer = ?",
            (channel, group, consumer),
        ).fetchall()
        for seq, attempts, delivered_at, log in held:
            log = _logged(
                db, channel, log, attempts, delivered_at, consumer, CONNECTION_CLOSED, now
            )
            db.execute(
                "UPDATE pending SET due_at = 0, consumer = '', log = ? "
                "WHERE channel = ? AND grp = ? AND seq = ?",
                (log, channel, group, seq),
            )
        # A connection of the group was alive until now: its idle time starts here.
        db.execute(
            "UPDATE groups SET seen_at = ? WHERE channel = ? AND name = ?", (now, channel, group)
        )
        return len(held)


def _history_seconds(db: sqlite3.Connection, channel: str) -> int:
    spec = _get_channel(db, channel)
    return 0 if spec is None else spec.history_seconds


def _replay_history(
    db: sqlite3.Connection, channel: str, group: str, since: float, limit: int, now: float
) -> int:
    with _transaction(db):
        spec = _get_channel(db, channel)
        if spec is None:
            raise UnknownChannel(channel)
        _join(db, channel, group, now, from_start=False)
        since = max(since, now - spec.history_seconds)
        # A replay is a new message for that one group, as a dead-letter replay is.
        replayed = db.execute(
            "INSERT INTO messages (channel, received_at, only_group, meta, body) "
            "SELECT channel, ?, ?, meta, body FROM history "
            "WHERE channel = ? AND received_at >= ? ORDER BY seq LIMIT ?",
            (now, group, channel, since, limit),
        ).rowcount
        if replayed:
            _count(db, channel, "replayed", replayed)
        return replayed


def _event(
    db: sqlite3.Connection,
    channel: str,
    now: float,
    kind: str,
    message_id: str,
    consumer: str = "",
) -> None:
    db.execute(
        "INSERT INTO events (channel, time, type, message_id, consumer) VALUES (?, ?, ?, ?, ?)",
        (channel, now, kind, message_id, consumer),
    )


def _pending_row(
    db: sqlite3.Connection, channel: str, group: str, message_id: str, consumer: str
) -> tuple[int, int, str, float, bytes | None] | None:
    """``(seq, attempts, holder, delivered_at, log)`` of a message in flight (for ``consumer``)."""
    seq = _int(message_id.rpartition("-")[2])
    row = db.execute(
        "SELECT attempts, consumer, delivered_at, log FROM pending "
        "WHERE channel = ? AND grp = ? AND seq = ?",
        (channel, group, seq),
    ).fetchone()
    if row is None or (consumer and row[1] != consumer):
        return None
    return seq, row[0], row[1], row[2], row[3]


def _ack_many(
    db: sqlite3.Connection, acks: list[tuple[str, str, str, str]]
) -> list[bool | Exception]:
    results: list[bool | Exception] = []
    with _transaction(db):
        for channel, group, message_id, consumer in acks:
            found = _pending_row(db, channel, group, message_id, consumer)
            if found is not None:
                _settle(db, channel, group, found[0])
                _count(db, channel, "delivered")
                _event(db, channel, time.time(), "delivered", message_id, consumer)
                if consumer:
                    db.execute(
                        "INSERT INTO delivered_by (channel, connection_id, n) VALUES (?, ?, 1) "
                        "ON CONFLICT (channel, connection_id) DO UPDATE SET n = n + 1",
                        (channel, consumer),
                    )
            results.append(found is not None)
    return results


def _add_connection(
    db: sqlite3.Connection, record: ConnectionRecord, limit: int, now: float
) -> bool:
    with _transaction(db):
        db.execute(
            "DELETE FROM connections WHERE channel = ? AND seen_at < ?",
            (record.channel, now - CONNECTION_STALE_SECONDS),
        )
        sql = "SELECT COUNT(*) FROM connections WHERE channel = ?"
        if db.execute(sql, (record.channel,)).fetchone()[0] >= limit:
            return False
        db.execute(
            "INSERT OR REPLACE INTO connections (channel, connection_id, record, seen_at) "
            "VALUES (?, ?, ?, ?)",
            (record.channel, record.connection_id, orjson.dumps(dataclasses.asdict(record)), now),
        )
        return True


def _connection(row: tuple[Any, ...]) -> ConnectionRecord:
    fields = orjson.loads(row[0])
    fields["seen_at"] = row[1]
    if len(row) > 2:
        fields["delivered"] = row[2]
    return ConnectionRecord(**fields)


def _nack(
    db: sqlite3.Connection,
    channel: str,
    group: str,
    message_id: str,
    consumer: str,
    retry: bool,
    reason: str,
    now: float,
) -> bool:
    with _transaction(db):
        found = _pending_row(db, channel, group, message_id, consumer)
        spec = _get_channel(db, channel)
        if found is None or spec is None:
            return False
        seq, attempts, holder, delivered_at, log = found
        if holder:  # not a second nack of what already waits for its retry
            log = _logged(db, channel, log, attempts, delivered_at, holder, reason, now)
        if retry:
            delay = min(spec.retry_delay_seconds, spec.ack_timeout_seconds)
            db.execute(
                "UPDATE pending SET due_at = ?, consumer = '', log = ? "
                "WHERE channel = ? AND grp = ? AND seq = ?",
                (now + delay, log, channel, group, seq),
            )
        else:
            _dead_letter_now(db, channel, group, seq, attempts, reason, now, log)
        return True


def _trim(db: sqlite3.Connection, channel: str) -> int:
    """Drop messages every group is done with; never one a group still reads or holds."""
    floor = db.execute(
        "SELECT MIN(f) FROM ("
        " SELECT COALESCE((SELECT MIN(p.seq) FROM pending p"
        "   WHERE p.channel = g.channel AND p.grp = g.name), g.cursor + 1) AS f"
        " FROM groups g WHERE g.channel = ?)",
        (channel,),
    ).fetchone()[0]
    if floor is None:
        return 0
    sql = "DELETE FROM messages WHERE channel = ? AND seq < ?"
    return db.execute(sql, (channel, floor)).rowcount


def _housekeep(db: sqlite3.Connection, channel: str, now: float) -> int:
    with _transaction(db):
        spec = _get_channel(db, channel)
        if spec is None:
            return 0
        cutoff = now - spec.ttl_seconds
        expired = db.execute(
            "DELETE FROM pending WHERE channel = ? AND seq IN "
            "(SELECT seq FROM messages WHERE channel = ? AND received_at < ?)",
            (channel, channel, cutoff),
        ).rowcount
        groups = db.execute(
            "SELECT name, cursor FROM groups WHERE channel = ?", (channel,)
        ).fetchall()
        for name, cursor in groups:
            row = db.execute(
                "SELECT COUNT(*), MAX(seq) FROM messages WHERE channel = ? AND seq > ? "
                "AND received_at < ? AND (only_group IS NULL OR only_group = ?)",
                (channel, cursor, cutoff, name),
            ).fetchone()
            if row[0]:
                expired += row[0]
                db.execute(
                    "UPDATE groups SET cursor = ? WHERE channel = ? AND name = ?",
                    (row[1], channel, name),
                )
        if expired:
            _count(db, channel, "expired", expired)
        _trim(db, channel)
        db.execute("DELETE FROM seen WHERE expires_at < ?", (now,))
        db.execute(
            "DELETE FROM history WHERE channel = ? AND received_at < ?",
            (channel, now - spec.history_seconds),
        )
        db.execute(
            "DELETE FROM events WHERE channel = ? AND id <= "
            "(SELECT id FROM events WHERE channel = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (channel, channel, EVENTS_KEPT),
        )
        db.execute("DELETE FROM rates WHERE window_start < ?", (now - 86400,))
        return expired


def _replay_dead_letters(
    db: sqlite3.Connection, channel: str, ids: list[str] | None, now: float
) -> int:
    with _transaction(db):
        if ids is None:
            rows = db.execute(
                "SELECT id FROM dead_letters WHERE channel = ? ORDER BY id", (channel,)
            ).fetchall()
        else:
            sql = "SELECT id FROM dead_letters WHERE channel = ? AND id = ?"
            rows = [r for i in ids for r in db.execute(sql, (channel, _int(i))).fetchall()]
        for (dead_id,) in rows:
            # A replay is a new message for the one group that gave up on it.
            db.execute(
                "INSERT INTO messages (channel, received_at, only_group, meta, body) "
                "SELECT channel, ?, grp, meta, body FROM dead_letters WHERE id = ?",
                (now, dead_id),
            )
            db.execute("DELETE FROM dead_letters WHERE id = ?", (dead_id,))
        if rows:
            _count(db, channel, "replayed", len(rows))
        return len(rows)


def _dead_letter(row: tuple[Any, ...]) -> DeadLetter:
    dead_id, message_id, group, reason, attempts, dead_at, meta, body, log = row
    return DeadLetter(
        dead_letter_id=str(dead_id),
        message_id=message_id,
        group=group,
        reason=reason,
        attempts=attempts,
        dead_at=dead_at,
        envelope=Envelope.decode(meta, body),
        delivery_attempts=decode_attempts(log),
    )


def _stats(db: sqlite3.Connection, channel: str, now: float) -> ChannelStats:
    with _transaction(db):
        _trim(db, channel)
    depth, oldest = db.execute(
        "SELECT COUNT(*), MIN(received_at) FROM messages WHERE channel = ?", (channel,)
    ).fetchone()
    in_flight = db.execute("SELECT COUNT(*) FROM pending WHERE channel = ?", (channel,))
    dead = db.execute("SELECT COUNT(*) FROM dead_letters WHERE channel = ?", (channel,))
    counters = {name: 0 for name in COUNTERS}
    for name, value in db.execute("SELECT name, value FROM counters WHERE channel = ?", (channel,)):
        counters[name] = value
    return ChannelStats(
        depth=depth,
        in_flight=in_flight.fetchone()[0],
        dead_letters=dead.fetchone()[0],
        oldest_age_seconds=None if oldest is None else max(0.0, now - oldest),
        counters=counters,
    )
