"""The SQLite buffer's limits: replay keys (nonces) and fixed-window rate counters.

Written without an fsync (``durable=False``): a process crash keeps them, only a power cut could
lose one window's worth, and they must not cost a disk flush per webhook. Functions over a
connection, ``now`` an argument (see queue.py).
"""

from __future__ import annotations

import sqlite3

from webhook_connect.cloud.buffers.sqlite.database import Transaction


def remember(db: sqlite3.Connection, key: str, ttl_seconds: float, now: float) -> bool:
    """Record ``key`` until ``now + ttl_seconds``; False if it is recorded already."""
    with Transaction(db, durable=False):
        row = db.execute("SELECT expires_at FROM seen WHERE key = ?", ("r:" + key,)).fetchone()
        if row is not None and row[0] > now:
            return False
        db.execute(
            "INSERT OR REPLACE INTO seen (key, value, expires_at) VALUES (?, '', ?)",
            ("r:" + key, now + ttl_seconds),
        )
        return True


def hit_rate(
    db: sqlite3.Connection, channel: str, key: str, limit: int, window_seconds: float, now: float
) -> float:
    """Count one hit in the current window; 0 while within ``limit``, else the seconds left."""
    start = now - now % window_seconds
    name = f"{channel}\0{key}"
    with Transaction(db, durable=False):
        row = db.execute("SELECT window_start, hits FROM rates WHERE key = ?", (name,)).fetchone()
        hits = row[1] + 1 if row is not None and row[0] == start else 1
        db.execute(
            "INSERT OR REPLACE INTO rates (key, window_start, hits) VALUES (?, ?, ?)",
            (name, start, hits),
        )
    return 0.0 if hits <= limit else start + window_seconds - now
