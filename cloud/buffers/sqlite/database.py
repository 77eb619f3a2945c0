"""The SQLite file: opening it, its schema, transactions, and the row helpers every concern uses.

Everything here runs on the buffer's database thread, on a ``sqlite3.Connection`` passed in;
nothing reads the clock (``now`` is an argument), so the rules built on it run on an in-memory
database in tests.
"""

from __future__ import annotations

import sqlite3
from importlib import resources

import orjson

from webhook_connect.cloud.buffers.base import ChannelSpec

# Columns added since the first release, for files created before them.
ADDED_COLUMNS = (
    ("pending", "delivered_at", "REAL NOT NULL DEFAULT 0"),
    ("pending", "log", "BLOB"),
    ("dead_letters", "log", "BLOB"),
    ("groups", "seen_at", "REAL NOT NULL DEFAULT 0"),
)
# Every table with a ``channel`` column: what deleting a channel clears. (Kept wrapped by
# length: one name a line would make a list of names the longest thing in the module.)
CHANNEL_TABLES = (
    "tokens",
    "messages",
    "groups",
    "pending",
    "dead_letters",
    "counters",
    "connections",
    "events",
    "history",
    "delivered_by",
)


def schema() -> str:
    """The ``CREATE … IF NOT EXISTS`` statements, package data next to this module."""
    return (
        resources.files("webhook_connect.cloud.buffers.sqlite").joinpath("schema.sql").read_text()
    )


def connect(path: str) -> sqlite3.Connection:
    """Open (or create) the database at ``path`` (``:memory:`` for tests), schema included."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 10000")
    db.execute("PRAGMA journal_mode = WAL")
    # At-least-once: a 202 promises the message survives a crash, so fsync every commit.
    db.execute("PRAGMA synchronous = FULL")
    db.executescript(schema())
    for table, column, declaration in ADDED_COLUMNS:
        if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
    return db


class Transaction:
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


def to_int(text: str) -> int:
    """An id from a caller as a row id; -1 (no row) when it is not a number."""
    try:
        return int(text)
    except ValueError:
        return -1


def message_id(received_at: float, seq: int | None) -> str:
    """Ids carry the time received, so a new database never reissues an id a connector saw."""
    return f"{int(received_at * 1000)}-{seq}"


def channel_spec(db: sqlite3.Connection, name: str) -> ChannelSpec | None:
    """The channel's limits, None if it does not exist."""
    row = db.execute("SELECT spec FROM channels WHERE name = ?", (name,)).fetchone()
    return None if row is None else ChannelSpec(**orjson.loads(row[0]))


def join_group(
    db: sqlite3.Connection, channel: str, group: str, now: float, *, from_start: bool
) -> None:
    """Create ``group`` (at the next message, or the first with ``from_start``), or mark it
    alive ``now`` if it exists."""
    cursor = 0
    if not from_start:
        row = db.execute("SELECT MAX(seq) FROM messages").fetchone()
        cursor = row[0] or 0
    db.execute(
        "INSERT INTO groups (channel, name, cursor, seen_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (channel, name) DO UPDATE SET seen_at = excluded.seen_at",
        (channel, group, cursor, now),
    )


def add_count(db: sqlite3.Connection, channel: str, name: str, amount: int = 1) -> None:
    """Add ``amount`` to one of the channel's counters."""
    db.execute(
        "INSERT INTO counters (channel, name, value) VALUES (?, ?, ?) "
        "ON CONFLICT (channel, name) DO UPDATE SET value = value + excluded.value",
        (channel, name, amount),
    )


def event(
    db: sqlite3.Connection,
    channel: str,
    now: float,
    kind: str,
    message_id: str,
    consumer: str = "",
) -> None:
    """One line of the channel's activity feed (trimmed by housekeeping)."""
    db.execute(
        "INSERT INTO events (channel, time, type, message_id, consumer) VALUES (?, ?, ?, ?, ?)",
        (channel, now, kind, message_id, consumer),
    )


def group_connections(db: sqlite3.Connection, channel: str) -> list[tuple[str, str, float]]:
    """``(connection id, group, seen_at)`` of every connection record of ``channel``."""
    rows = db.execute(
        "SELECT connection_id, record, seen_at FROM connections WHERE channel = ?", (channel,)
    ).fetchall()
    return [(cid, str(orjson.loads(record).get("group", "")), seen) for cid, record, seen in rows]
