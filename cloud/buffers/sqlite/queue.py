"""The queue rules of the SQLite buffer, as functions over a connection and a clock reading.

What is due (unread, or past its ack timeout, or past its retry delay), when a message is
dead-lettered (attempts), when it expires (TTL), when it leaves storage (every group done with
it) and when a channel is full (``max_queue_size``): the semantics of cloud/buffers/base.py,
each step one transaction. ``now`` is always an argument, so tests drive these on an in-memory
database with a clock of their own (tests/test_sqlite_queue.py).

Tables: ``messages`` (one row per message, ``seq`` its order), ``groups`` (a ``cursor``, the
last ``seq`` each group was handed), ``pending`` (what a group handed out and has not settled:
held by a consumer until ``due_at``, or waiting for a retry with no consumer).
"""

from __future__ import annotations

import sqlite3

import orjson

from webhook_connect.cloud.buffers.base import (
    ACK_TIMEOUT,
    CONNECTION_CLOSED,
    EVENTS_KEPT,
    ChannelSpec,
    Delivery,
    DeliveryAttempt,
    decode_attempts,
    encode_attempts,
)
from webhook_connect.cloud.buffers.sqlite.database import (
    Transaction,
    add_count,
    channel_spec,
    event,
    message_id,
    to_int,
)
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.exceptions import ChannelFull, UnknownChannel

# What the appender batches: an envelope, and its idempotency key and window, if any.
ToAppend = tuple[Envelope, str | None, float]
# What the acker batches: channel, group, message id, consumer ("" for any).
ToAck = tuple[str, str, str, str]


def append_many(
    db: sqlite3.Connection, items: list[ToAppend], now: float
) -> list[tuple[str, bool] | Exception]:
    """Store a batch in one transaction (one fsync): per item ``(message id, stored)``, the
    original id for an idempotent repeat, or the refusal (unknown or full channel)."""
    results: list[tuple[str, bool] | Exception] = []
    room: dict[str, int] = {}  # per channel: how many more fit, -1 if there is no channel
    history: dict[str, bool] = {}  # per channel: whether it keeps a copy of every message
    accepted: dict[str, int] = {}
    full: dict[str, ChannelFull] = {}
    with Transaction(db):
        for envelope, once, window in items:
            channel = envelope.channel
            once_key = None if once is None else f"o:{channel}\0{once}"
            original = None if once_key is None else _stored_once(db, once_key, now)
            if original is not None:
                results.append((original, False))
                continue
            if channel not in room:
                room[channel] = _room(db, channel)
            if room[channel] < 0:
                results.append(UnknownChannel(channel))
            elif room[channel] == 0:
                full[channel] = full.get(channel) or full_refusal(db, channel)
                results.append(full[channel])
            else:
                room[channel] -= 1
                accepted[channel] = accepted.get(channel, 0) + 1
                keep = history.setdefault(channel, _keeps_history(db, channel))
                results.append((_insert(db, envelope, keep, once_key, window, now), True))
        for channel, amount in accepted.items():
            add_count(db, channel, "accepted", amount)
    return results


def _stored_once(db: sqlite3.Connection, once_key: str, now: float) -> str | None:
    """The id stored under an idempotency key still in its window, if any."""
    row = db.execute(
        "SELECT value FROM seen WHERE key = ? AND expires_at > ?", (once_key, now)
    ).fetchone()
    return None if row is None else str(row[0])


def _room(db: sqlite3.Connection, channel: str) -> int:
    """How many messages ``channel`` takes before ``max_queue_size``; -1 if it does not exist.
    Only a channel at its limit pays for trimming what every group is done with."""
    spec = channel_spec(db, channel)
    if spec is None:
        return -1
    if depth(db, channel) >= spec.max_queue_size:
        trim(db, channel)
    return spec.max_queue_size - depth(db, channel)


def _keeps_history(db: sqlite3.Connection, channel: str) -> bool:
    spec = channel_spec(db, channel)
    return spec is not None and spec.history_seconds > 0


def _insert(
    db: sqlite3.Connection,
    envelope: Envelope,
    keep_history: bool,
    once_key: str | None,
    window: float,
    now: float,
) -> str:
    channel = envelope.channel
    row = db.execute(
        "INSERT INTO messages (channel, received_at, meta, body) VALUES (?, ?, ?, ?)",
        (channel, envelope.received_at, envelope.encode_meta(), envelope.body),
    )
    new_id = message_id(envelope.received_at, row.lastrowid)
    event(db, channel, now, "received", new_id)
    if keep_history:
        db.execute(
            "INSERT INTO history (seq, channel, received_at, meta, body) "
            "SELECT seq, channel, received_at, meta, body FROM messages WHERE seq = ?",
            (row.lastrowid,),
        )
    if once_key is not None:
        db.execute(
            "INSERT OR REPLACE INTO seen (key, value, expires_at) VALUES (?, ?, ?)",
            (once_key, new_id, now + window),
        )
    return new_id


def depth(db: sqlite3.Connection, channel: str) -> int:
    """Messages the channel retains (what ``max_queue_size`` counts)."""
    sql = "SELECT COUNT(*) FROM messages WHERE channel = ?"
    return int(db.execute(sql, (channel,)).fetchone()[0])


def group_rows(db: sqlite3.Connection, channel: str) -> list[tuple[str, int, int, float | None]]:
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


def full_refusal(db: sqlite3.Connection, channel: str) -> ChannelFull:
    """The refusal of a full channel, naming the group with the most messages not acked."""
    spec = channel_spec(db, channel)
    limit = spec.max_queue_size if spec else 0
    rows = group_rows(db, channel)
    if not rows:
        return ChannelFull(channel, limit)
    name, backlog, _, _ = max(rows, key=lambda row: row[1])
    return ChannelFull(channel, limit, name, backlog)


def read(
    db: sqlite3.Connection, channel: str, group: str, consumer: str, count: int, now: float
) -> list[Delivery]:
    """Hand ``consumer`` up to ``count`` messages of ``group``: first those due again (past
    their ack timeout or retry delay), then unread ones. Nothing if the group does not exist."""
    with Transaction(db):
        spec = channel_spec(db, channel)
        if spec is None:
            raise UnknownChannel(channel)
        joined = db.execute(
            "SELECT cursor FROM groups WHERE channel = ? AND name = ?", (channel, group)
        ).fetchone()
        if joined is None:  # dropped (or never joined): reading must not bring it back
            return []
        out = _redeliver(db, spec, group, consumer, count, now)
        if len(out) < count:
            out += _read_unread(db, spec, group, consumer, joined[0], count - len(out), now)
        return out


def _redeliver(
    db: sqlite3.Connection, spec: ChannelSpec, group: str, consumer: str, count: int, now: float
) -> list[Delivery]:
    """Messages due again, handed to ``consumer``; on the way, those past their TTL expire and
    those past ``max_delivery_attempts`` are dead-lettered instead."""
    channel = spec.name
    cutoff = now - spec.ttl_seconds
    due_at = now + spec.ack_timeout_seconds
    out: list[Delivery] = []
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
            add_count(db, channel, "expired")
        elif attempts > spec.max_delivery_attempts:
            reason = "max_delivery_attempts"
            _dead_letter_now(db, channel, group, seq, attempts - 1, reason, now, log)
        else:
            db.execute(
                "UPDATE pending SET attempts = ?, consumer = ?, due_at = ?, "
                "delivered_at = ?, log = ? WHERE channel = ? AND grp = ? AND seq = ?",
                (attempts, consumer, due_at, now, log, channel, group, seq),
            )
            add_count(db, channel, "redelivered")
            envelope = Envelope.decode(meta, body)
            out.append(Delivery(message_id(received_at, seq), attempts, envelope))
    return out


def _read_unread(
    db: sqlite3.Connection,
    spec: ChannelSpec,
    group: str,
    consumer: str,
    cursor: int,
    count: int,
    now: float,
) -> list[Delivery]:
    """Messages after the group's cursor, handed to ``consumer`` (attempt 1); those past their
    TTL are counted expired and skipped, as are replays meant for another group."""
    channel = spec.name
    cutoff = now - spec.ttl_seconds
    out: list[Delivery] = []
    fresh = db.execute(
        "SELECT seq, received_at, only_group, meta, body FROM messages "
        "WHERE channel = ? AND seq > ? ORDER BY seq LIMIT ?",
        (channel, cursor, count),
    ).fetchall()
    for seq, received_at, only_group, meta, body in fresh:
        cursor = seq
        if received_at < cutoff:
            add_count(db, channel, "expired")
        elif only_group is None or only_group == group:
            db.execute(
                "INSERT INTO pending (channel, grp, seq, consumer, attempts, due_at, delivered_at) "
                "VALUES (?, ?, ?, ?, 1, ?, ?)",
                (channel, group, seq, consumer, now + spec.ack_timeout_seconds, now),
            )
            out.append(Delivery(message_id(received_at, seq), 1, Envelope.decode(meta, body)))
    db.execute(
        "UPDATE groups SET cursor = ? WHERE channel = ? AND name = ?", (cursor, channel, group)
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
    add_count(db, channel, "dead_lettered")
    row = db.execute("SELECT received_at FROM messages WHERE seq = ?", (seq,)).fetchone()
    if row is not None:
        event(db, channel, now, "dead_lettered", message_id(row[0], seq))


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


def _pending_row(
    db: sqlite3.Connection, channel: str, group: str, message_id: str, consumer: str
) -> tuple[int, int, str, float, bytes | None] | None:
    """``(seq, attempts, holder, delivered_at, log)`` of a message in flight (for ``consumer``)."""
    seq = to_int(message_id.rpartition("-")[2])
    row = db.execute(
        "SELECT attempts, consumer, delivered_at, log FROM pending "
        "WHERE channel = ? AND grp = ? AND seq = ?",
        (channel, group, seq),
    ).fetchone()
    if row is None or (consumer and row[1] != consumer):
        return None
    return seq, row[0], row[1], row[2], row[3]


def ack_many(db: sqlite3.Connection, acks: list[ToAck], now: float) -> list[bool | Exception]:
    """Settle a batch of acks in one transaction; per ack, whether it was in flight (for its
    consumer)."""
    results: list[bool | Exception] = []
    with Transaction(db):
        for channel, group, acked_id, consumer in acks:
            found = _pending_row(db, channel, group, acked_id, consumer)
            if found is not None:
                _settle(db, channel, group, found[0])
                add_count(db, channel, "delivered")
                event(db, channel, now, "delivered", acked_id, consumer)
                if consumer:
                    db.execute(
                        "INSERT INTO delivered_by (channel, connection_id, n) VALUES (?, ?, 1) "
                        "ON CONFLICT (channel, connection_id) DO UPDATE SET n = n + 1",
                        (channel, consumer),
                    )
            results.append(found is not None)
    return results


def nack(
    db: sqlite3.Connection,
    channel: str,
    group: str,
    nacked_id: str,
    consumer: str,
    retry: bool,
    reason: str,
    now: float,
) -> bool:
    """Give a message in flight back: due again after the retry delay (capped at the ack
    timeout), or dead-lettered. False if it was not in flight (for ``consumer``)."""
    with Transaction(db):
        found = _pending_row(db, channel, group, nacked_id, consumer)
        spec = channel_spec(db, channel)
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


def release(db: sqlite3.Connection, channel: str, group: str, consumer: str, now: float) -> int:
    """Make everything ``consumer`` holds due at once (it disconnected); returns how many."""
    with Transaction(db):
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


def pending_count(
    db: sqlite3.Connection, channel: str, group: str, consumer: str, limit: int, now: float
) -> int:
    """How many messages ``consumer`` holds, counted up to ``limit``. One past its ack timeout
    is not held any more but due again: counted, it could fill the window of a connection that
    lost it (a long-poll answer cut off) for good, as only a read hands it out again."""
    row = db.execute(
        "SELECT COUNT(*) FROM pending WHERE channel = ? AND grp = ? AND consumer = ? "
        "AND due_at > ?",
        (channel, group, consumer, now),
    ).fetchone()
    return min(int(row[0]), limit)


def trim(db: sqlite3.Connection, channel: str) -> int:
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


def expire(db: sqlite3.Connection, spec: ChannelSpec, now: float) -> int:
    """Expire, for every group, what is past the TTL, in flight or unread; returns how many."""
    channel = spec.name
    cutoff = now - spec.ttl_seconds
    expired = db.execute(
        "DELETE FROM pending WHERE channel = ? AND seq IN "
        "(SELECT seq FROM messages WHERE channel = ? AND received_at < ?)",
        (channel, channel, cutoff),
    ).rowcount
    groups = db.execute("SELECT name, cursor FROM groups WHERE channel = ?", (channel,)).fetchall()
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
        add_count(db, channel, "expired", expired)
    return expired


def housekeep(db: sqlite3.Connection, channel: str, now: float) -> int:
    """Expire what is past the TTL, drop what every group is done with, and forget replay
    keys, history, activity and rate windows past their time. Returns how many expired."""
    with Transaction(db):
        spec = channel_spec(db, channel)
        if spec is None:
            return 0
        expired = expire(db, spec, now)
        trim(db, channel)
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
