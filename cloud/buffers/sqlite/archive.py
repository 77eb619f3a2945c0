"""What the SQLite buffer keeps beside the queue: dead letters, history, the activity feed and
the channel's counters, and the replays that put messages back into the queue.

Functions over a connection, ``now`` an argument (see queue.py).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from webhook_connect.cloud.buffers.base import (
    COUNTERS,
    EVENTS_KEPT,
    ChannelEvent,
    ChannelStats,
    DeadLetter,
    decode_attempts,
)
from webhook_connect.cloud.buffers.sqlite.database import (
    Transaction,
    add_count,
    channel_spec,
    join_group,
    to_int,
)
from webhook_connect.cloud.buffers.sqlite.queue import trim
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.exceptions import UnknownChannel

DEAD_LETTER_COLUMNS = "id, message_id, grp, reason, attempts, dead_at, meta, body, log"


def dead_letters(db: sqlite3.Connection, channel: str, limit: int) -> list[DeadLetter]:
    """The channel's dead letters, oldest first."""
    rows = db.execute(
        f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE channel = ? ORDER BY id LIMIT ?",
        (channel, limit),
    )
    return [_dead_letter(row) for row in rows]


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


def replay_dead_letters(
    db: sqlite3.Connection, channel: str, ids: list[str] | None, now: float
) -> int:
    """Put dead letters (all, or ``ids``) back, each for the group that gave up on it."""
    with Transaction(db):
        if ids is None:
            rows = db.execute(
                "SELECT id FROM dead_letters WHERE channel = ? ORDER BY id", (channel,)
            ).fetchall()
        else:
            sql = "SELECT id FROM dead_letters WHERE channel = ? AND id = ?"
            rows = [r for i in ids for r in db.execute(sql, (channel, to_int(i))).fetchall()]
        for (dead_id,) in rows:
            # A replay is a new message for the one group that gave up on it.
            db.execute(
                "INSERT INTO messages (channel, received_at, only_group, meta, body) "
                "SELECT channel, ?, grp, meta, body FROM dead_letters WHERE id = ?",
                (now, dead_id),
            )
            db.execute("DELETE FROM dead_letters WHERE id = ?", (dead_id,))
        if rows:
            add_count(db, channel, "replayed", len(rows))
        return len(rows)


def purge_dead_letters(db: sqlite3.Connection, channel: str, ids: list[str] | None) -> int:
    """Delete dead letters (all, or ``ids``); returns how many."""
    with Transaction(db):
        if ids is None:
            sql = "DELETE FROM dead_letters WHERE channel = ?"
            return db.execute(sql, (channel,)).rowcount
        sql = "DELETE FROM dead_letters WHERE channel = ? AND id = ?"
        return sum(db.execute(sql, (channel, to_int(i))).rowcount for i in ids)


def replay_history(
    db: sqlite3.Connection, channel: str, group: str, since: float, limit: int, now: float
) -> int:
    """Put the history since ``since`` (within ``history_seconds``) back for ``group`` only."""
    with Transaction(db):
        spec = channel_spec(db, channel)
        if spec is None:
            raise UnknownChannel(channel)
        join_group(db, channel, group, now, from_start=False)
        since = max(since, now - spec.history_seconds)
        # A replay is a new message for that one group, as a dead-letter replay is.
        replayed = db.execute(
            "INSERT INTO messages (channel, received_at, only_group, meta, body) "
            "SELECT channel, ?, ?, meta, body FROM history "
            "WHERE channel = ? AND received_at >= ? ORDER BY seq LIMIT ?",
            (now, group, channel, since, limit),
        ).rowcount
        if replayed:
            add_count(db, channel, "replayed", replayed)
        return replayed


def recent_events(db: sqlite3.Connection, channel: str, limit: int) -> list[ChannelEvent]:
    """The channel's activity feed, newest first."""
    rows = db.execute(
        "SELECT time, type, message_id, consumer FROM events WHERE channel = ? "
        "ORDER BY id DESC LIMIT ?",
        (channel, min(limit, EVENTS_KEPT)),
    )
    return [ChannelEvent(*row) for row in rows]


def stats(db: sqlite3.Connection, channel: str, now: float) -> ChannelStats:
    """Depth, in flight, dead letters, the oldest message's age and the counters."""
    with Transaction(db):
        trim(db, channel)
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
