"""The SQLite buffer's registry: channels, connector tokens, consumer groups, connections.

Functions over a connection, ``now`` an argument (see queue.py).
"""

from __future__ import annotations

import dataclasses
import sqlite3
from typing import Any

import orjson

from webhook_connect.cloud.buffers.base import (
    CONNECTION_STALE_SECONDS,
    DEFAULT_GROUP,
    ChannelSpec,
    ConnectionRecord,
    GroupInfo,
    TokenRecord,
)
from webhook_connect.cloud.buffers.sqlite.database import (
    CHANNEL_TABLES,
    Transaction,
    channel_spec,
    group_connections,
    join_group,
)
from webhook_connect.cloud.buffers.sqlite.queue import group_rows, trim

CONNECTION_COLUMNS = (
    "c.record, c.seen_at, COALESCE(d.n, 0) FROM connections AS c LEFT JOIN delivered_by AS d "
    "ON d.channel = c.channel AND d.connection_id = c.connection_id"
)

# Channels -------------------------------------------------------------------------------------


def provision(db: sqlite3.Connection, spec: ChannelSpec, now: float) -> None:
    """Create the channel with its default group, or update its limits."""
    with Transaction(db):
        db.execute(
            "INSERT INTO channels (name, spec) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec",
            (spec.name, orjson.dumps(dataclasses.asdict(spec)).decode()),
        )
        join_group(db, spec.name, DEFAULT_GROUP, now, from_start=True)


def list_channels(db: sqlite3.Connection) -> list[ChannelSpec]:
    """Every channel, by name."""
    rows = db.execute("SELECT spec FROM channels ORDER BY name").fetchall()
    return [ChannelSpec(**orjson.loads(row[0])) for row in rows]


def delete_channel(db: sqlite3.Connection, name: str) -> bool:
    """Remove the channel and everything of it; False if there was none."""
    with Transaction(db):
        found = db.execute("DELETE FROM channels WHERE name = ?", (name,)).rowcount
        for table in CHANNEL_TABLES:
            db.execute(f"DELETE FROM {table} WHERE channel = ?", (name,))
    return bool(found)


# Tokens ---------------------------------------------------------------------------------------


def put_token(db: sqlite3.Connection, token: TokenRecord) -> None:
    """Store (or replace) a token record under its hash."""
    with Transaction(db):
        db.execute(
            "INSERT OR REPLACE INTO tokens (token_hash, channel, record) VALUES (?, ?, ?)",
            (token.token_hash, token.channel, orjson.dumps(dataclasses.asdict(token))),
        )


def find_token(db: sqlite3.Connection, token_hash: str) -> TokenRecord | None:
    """The record stored under ``token_hash``, if any."""
    row = db.execute("SELECT record FROM tokens WHERE token_hash = ?", (token_hash,)).fetchone()
    return None if row is None else TokenRecord(**orjson.loads(row[0]))


def list_tokens(db: sqlite3.Connection, channel: str) -> list[TokenRecord]:
    """The channel's tokens, oldest first."""
    rows = db.execute("SELECT record FROM tokens WHERE channel = ?", (channel,))
    records = [TokenRecord(**orjson.loads(row[0])) for row in rows]
    return sorted(records, key=lambda r: r.created_at)


def delete_token(db: sqlite3.Connection, channel: str, token_id: str) -> bool:
    """Delete the channel's token ``token_id``; False if it has none."""
    for record in list_tokens(db, channel):
        if record.token_id == token_id:
            with Transaction(db):
                sql = "DELETE FROM tokens WHERE token_hash = ?"
                return bool(db.execute(sql, (record.token_hash,)).rowcount)
    return False


# Groups ---------------------------------------------------------------------------------------


def join(db: sqlite3.Connection, channel: str, group: str, now: float) -> None:
    """Make sure ``group`` exists (a new one starts at the next message)."""
    with Transaction(db):
        join_group(db, channel, group, now, from_start=False)


def has_group(db: sqlite3.Connection, channel: str, group: str) -> bool:
    """Whether ``group`` exists on ``channel``."""
    sql = "SELECT 1 FROM groups WHERE channel = ? AND name = ?"
    return db.execute(sql, (channel, group)).fetchone() is not None


def list_groups(db: sqlite3.Connection, channel: str, now: float) -> list[GroupInfo]:
    """Every group with its backlog and live connections, by name."""
    seen = dict(
        db.execute("SELECT name, seen_at FROM groups WHERE channel = ?", (channel,)).fetchall()
    )
    live = [c for c in group_connections(db, channel) if c[2] >= now - CONNECTION_STALE_SECONDS]
    infos = []
    for name, backlog, held, oldest in group_rows(db, channel):
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


def drop_group(db: sqlite3.Connection, channel: str, group: str, now: float) -> int | None:
    """Forget ``group`` with its backlog and connections (``default`` comes back empty);
    returns how many connections were removed, None if there was no such group."""
    with Transaction(db):
        if not has_group(db, channel, group):
            return None
        _forget_group(db, channel, group)
        removed = 0
        for connection_id, of_group, _ in group_connections(db, channel):
            if of_group == group:
                _remove_connection(db, channel, connection_id)
                removed += 1
        if group == DEFAULT_GROUP:  # messages always wait for it: back at once, empty
            join_group(db, channel, group, now, from_start=False)
        trim(db, channel)
        return removed


def drop_idle_groups(db: sqlite3.Connection, channel: str, now: float) -> list[str]:
    """Drop the groups other than ``default`` with no connection for ``group_idle_seconds``
    (only on channels with ``dynamic_groups``); returns their names."""
    with Transaction(db):
        spec = channel_spec(db, channel)
        if spec is None or not spec.dynamic_groups or spec.group_idle_seconds <= 0:
            return []
        # Groups from before last-seen times were kept start their idle time now.
        db.execute(
            "UPDATE groups SET seen_at = ? WHERE channel = ? AND seen_at = 0", (now, channel)
        )
        connected = {group for _, group, _ in group_connections(db, channel)}
        idle = db.execute(
            "SELECT name FROM groups WHERE channel = ? AND name != ? AND seen_at < ?",
            (channel, DEFAULT_GROUP, now - spec.group_idle_seconds),
        ).fetchall()
        dropped = [name for (name,) in idle if name not in connected]
        for name in dropped:
            _forget_group(db, channel, name)
        if dropped:
            trim(db, channel)
        return dropped


# Connections ----------------------------------------------------------------------------------


def add_connection(
    db: sqlite3.Connection, record: ConnectionRecord, limit: int, now: float
) -> bool:
    """Register ``record`` unless ``limit`` live connections exist (stale ones are dropped)."""
    with Transaction(db):
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


def touch_connection(db: sqlite3.Connection, channel: str, connection_id: str, now: float) -> bool:
    """Mark a connection alive; False if it was removed."""
    with Transaction(db):
        sql = "UPDATE connections SET seen_at = ? WHERE channel = ? AND connection_id = ?"
        return bool(db.execute(sql, (now, channel, connection_id)).rowcount)


def _remove_connection(db: sqlite3.Connection, channel: str, connection_id: str) -> bool:
    db.execute(
        "DELETE FROM delivered_by WHERE channel = ? AND connection_id = ?",
        (channel, connection_id),
    )
    sql = "DELETE FROM connections WHERE channel = ? AND connection_id = ?"
    return bool(db.execute(sql, (channel, connection_id)).rowcount)


def remove_connection(db: sqlite3.Connection, channel: str, connection_id: str) -> bool:
    """Forget a connection with its delivered count; False if it was not registered."""
    with Transaction(db):
        return _remove_connection(db, channel, connection_id)


def _connection(row: tuple[Any, ...]) -> ConnectionRecord:
    fields = orjson.loads(row[0])
    fields["seen_at"] = row[1]
    if len(row) > 2:
        fields["delivered"] = row[2]
    return ConnectionRecord(**fields)


def get_connection(
    db: sqlite3.Connection, channel: str, connection_id: str
) -> ConnectionRecord | None:
    """A connection with what it delivered, live or not."""
    row = db.execute(
        f"SELECT {CONNECTION_COLUMNS} WHERE c.channel = ? AND c.connection_id = ?",
        (channel, connection_id),
    ).fetchone()
    return None if row is None else _connection(row)


def list_connections(db: sqlite3.Connection, channel: str, now: float) -> list[ConnectionRecord]:
    """The channel's live connections with what they delivered, oldest first."""
    rows = db.execute(
        f"SELECT {CONNECTION_COLUMNS} WHERE c.channel = ? AND c.seen_at >= ?",
        (channel, now - CONNECTION_STALE_SECONDS),
    )
    return sorted((_connection(row) for row in rows), key=lambda r: r.connected_at)


def stale_connections(db: sqlite3.Connection, channel: str, now: float) -> list[ConnectionRecord]:
    """Connections not heard of for ``CONNECTION_STALE_SECONDS`` (their replica died)."""
    rows = db.execute(
        "SELECT record, seen_at FROM connections WHERE channel = ? AND seen_at < ?",
        (channel, now - CONNECTION_STALE_SECONDS),
    )
    return [_connection(row) for row in rows]
