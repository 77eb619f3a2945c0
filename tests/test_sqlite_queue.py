"""The SQLite buffer's queue rules, driven on an in-memory database with a clock of the test's
own: what is due, redelivery after the ack timeout, attempts to dead letter, TTL expiry,
retention across groups and the ``max_queue_size`` count, with no thread and no waiting."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from webhook_connect.cloud.buffers.base import (
    ACK_TIMEOUT,
    CONNECTION_CLOSED,
    ChannelSpec,
    Delivery,
)
from webhook_connect.cloud.buffers.sqlite import archive, database, limits, queue, registry
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.exceptions import ChannelFull, UnknownChannel

T0 = 1_800_000_000.0  # the tests' clock starts here; every step names its own time


@pytest.fixture
def db() -> Iterator[sqlite3.Connection]:
    connection = database.connect(":memory:")
    try:
        yield connection
    finally:
        connection.close()


def envelope(body: bytes, at: float, channel: str = "orders") -> Envelope:
    return Envelope(
        channel=channel,
        webhook_id="shop",
        received_at=at,
        method="POST",
        path="/webhook/shop",
        query_string="",
        headers=(("content-type", "application/json"),),
        body=body,
        client="127.0.0.1",
    )


def append(db: sqlite3.Connection, body: bytes, at: float, channel: str = "orders") -> str:
    [result] = queue.append_many(db, [(envelope(body, at, channel), None, 0.0)], at)
    assert isinstance(result, tuple), result
    return result[0]


def read(
    db: sqlite3.Connection, at: float, consumer: str = "c1", group: str = "default"
) -> list[tuple[bytes, int]]:
    deliveries: list[Delivery] = queue.read(db, "orders", group, consumer, 10, at)
    return [(d.envelope.body, d.attempt) for d in deliveries]


def counters(db: sqlite3.Connection, at: float) -> dict[str, int]:
    return archive.stats(db, "orders", at).counters


def test_unread_messages_are_due_in_order_and_held_by_one_consumer(db: sqlite3.Connection) -> None:
    registry.provision(db, ChannelSpec("orders"), T0)
    for n in (b"1", b"2", b"3"):
        append(db, n, T0)
    assert read(db, T0 + 1) == [(b"1", 1), (b"2", 1), (b"3", 1)]
    assert read(db, T0 + 2, consumer="c2") == []
    assert queue.pending_count(db, "orders", "default", "c1", 2, T0 + 2) == 2


def test_a_message_is_due_again_exactly_at_its_ack_timeout(db: sqlite3.Connection) -> None:
    registry.provision(db, ChannelSpec("orders", ack_timeout_seconds=30), T0)
    message_id = append(db, b"m", T0)
    assert read(db, T0) == [(b"m", 1)]
    assert read(db, T0 + 29.999, consumer="c2") == []
    assert read(db, T0 + 30, consumer="c2") == [(b"m", 2)]
    # The first holder lost it: its ack no longer counts, the new holder's does.
    assert queue.ack_many(db, [("orders", "default", message_id, "c1")], T0 + 31) == [False]
    assert queue.ack_many(db, [("orders", "default", message_id, "c2")], T0 + 31) == [True]
    assert counters(db, T0 + 31)["redelivered"] == 1


def test_the_attempt_after_the_last_is_a_dead_letter_with_every_attempt_logged(
    db: sqlite3.Connection,
) -> None:
    spec = ChannelSpec("orders", ack_timeout_seconds=10, max_delivery_attempts=2)
    registry.provision(db, spec, T0)
    message_id = append(db, b"m", T0)
    assert read(db, T0) == [(b"m", 1)]
    assert read(db, T0 + 10) == [(b"m", 2)]
    assert read(db, T0 + 20) == []
    [letter] = archive.dead_letters(db, "orders", 10)
    assert (letter.message_id, letter.reason, letter.attempts) == (
        message_id,
        "max_delivery_attempts",
        2,
    )
    assert [(a.attempt, a.time, a.outcome, a.duration) for a in letter.delivery_attempts] == [
        (1, T0, ACK_TIMEOUT, 10.0),
        (2, T0 + 10, ACK_TIMEOUT, 10.0),
    ]
    assert counters(db, T0 + 20)["dead_lettered"] == 1


def test_a_nacked_message_waits_for_the_retry_delay_capped_at_the_ack_timeout(
    db: sqlite3.Connection,
) -> None:
    registry.provision(db, ChannelSpec("orders", ack_timeout_seconds=4, retry_delay_seconds=9), T0)
    message_id = append(db, b"m", T0)
    read(db, T0)
    assert queue.nack(db, "orders", "default", message_id, "c1", True, "http_503", T0 + 1)
    assert not queue.nack(db, "orders", "default", message_id, "c1", True, "again", T0 + 1)
    assert read(db, T0 + 4.999) == []
    assert read(db, T0 + 5) == [(b"m", 2)]


def test_a_nack_without_retry_dead_letters_at_once(db: sqlite3.Connection) -> None:
    registry.provision(db, ChannelSpec("orders"), T0)
    message_id = append(db, b"m", T0)
    read(db, T0)
    assert queue.nack(db, "orders", "default", message_id, "", False, "http_400", T0 + 2)
    [letter] = archive.dead_letters(db, "orders", 10)
    assert (letter.reason, letter.attempts, letter.dead_at) == ("http_400", 1, T0 + 2)
    assert archive.stats(db, "orders", T0 + 2).depth == 0


def test_a_release_makes_what_a_connection_held_due_at_once(db: sqlite3.Connection) -> None:
    registry.provision(db, ChannelSpec("orders", ack_timeout_seconds=30), T0)
    message_id = append(db, b"m", T0)
    read(db, T0, consumer="gone")
    assert queue.release(db, "orders", "default", "gone", T0 + 3) == 1
    assert read(db, T0 + 3, consumer="c2") == [(b"m", 2)]
    queue.nack(db, "orders", "default", message_id, "c2", False, "http_400", T0 + 4)
    [letter] = archive.dead_letters(db, "orders", 10)
    assert [a.outcome for a in letter.delivery_attempts] == [CONNECTION_CLOSED, "http_400"]


def test_messages_past_their_ttl_expire_unread_or_in_flight(db: sqlite3.Connection) -> None:
    registry.provision(db, ChannelSpec("orders", ttl_seconds=60, ack_timeout_seconds=5), T0)
    append(db, b"in flight", T0)
    assert read(db, T0) == [(b"in flight", 1)]
    append(db, b"unread", T0 + 1)
    append(db, b"fresh", T0 + 59)
    # Due again at T0 + 5, but past its TTL by then: counted expired, never handed out.
    assert read(db, T0 + 62) == [(b"fresh", 1)]
    assert counters(db, T0 + 62)["expired"] == 2


def test_housekeeping_expires_for_every_group_and_counts_each_once(
    db: sqlite3.Connection,
) -> None:
    registry.provision(db, ChannelSpec("orders", ttl_seconds=60), T0)
    registry.join(db, "orders", "analytics", T0)
    append(db, b"old", T0)
    read(db, T0)  # in flight for default, unread for analytics
    append(db, b"fresh", T0 + 30)
    assert queue.housekeep(db, "orders", T0 + 61) == 2
    assert queue.housekeep(db, "orders", T0 + 62) == 0
    assert read(db, T0 + 62, group="analytics") == [(b"fresh", 1)]
    stats = archive.stats(db, "orders", T0 + 62)
    assert (stats.depth, stats.counters["expired"]) == (1, 2)


def test_a_message_is_retained_until_every_group_is_done_with_it(db: sqlite3.Connection) -> None:
    registry.provision(db, ChannelSpec("orders"), T0)
    registry.join(db, "orders", "analytics", T0)
    message_id = append(db, b"m", T0)
    read(db, T0)
    queue.ack_many(db, [("orders", "default", message_id, "")], T0)
    assert queue.trim(db, "orders") == 0
    assert read(db, T0, group="analytics") == [(b"m", 1)]
    queue.ack_many(db, [("orders", "analytics", message_id, "")], T0)
    assert queue.trim(db, "orders") == 1


def test_a_group_joined_later_starts_at_the_next_message(db: sqlite3.Connection) -> None:
    registry.provision(db, ChannelSpec("orders"), T0)
    append(db, b"before", T0)
    registry.join(db, "orders", "late", T0 + 1)
    append(db, b"after", T0 + 2)
    assert read(db, T0 + 3, group="late") == [(b"after", 1)]
    assert read(db, T0 + 3) == [(b"before", 1), (b"after", 1)]
    assert queue.read(db, "orders", "never-joined", "c1", 10, T0 + 3) == []


def test_a_full_channel_counts_what_is_retained_and_names_the_group_holding_it(
    db: sqlite3.Connection,
) -> None:
    registry.provision(db, ChannelSpec("orders", max_queue_size=2), T0)
    registry.join(db, "orders", "slow", T0)
    first = append(db, b"1", T0)
    append(db, b"2", T0)
    batch: list[queue.ToAppend] = [
        (envelope(b"3", T0), None, 0.0),
        (envelope(b"4", T0, "nowhere"), None, 0.0),
    ]
    refused, unknown = queue.append_many(db, batch, T0)
    assert isinstance(refused, ChannelFull)
    assert (refused.limit, refused.group, refused.backlog) == (2, "default", 2)
    assert isinstance(unknown, UnknownChannel)
    # Acked by one group only: still retained, still full.
    read(db, T0)
    queue.ack_many(db, [("orders", "default", first, "")], T0)
    [still] = queue.append_many(db, [(envelope(b"3", T0), None, 0.0)], T0)
    assert isinstance(still, ChannelFull) and still.group == "slow"
    # Once every group is done with it, the next append trims it and fits.
    read(db, T0, group="slow")
    queue.ack_many(db, [("orders", "slow", first, "")], T0)
    assert append(db, b"3", T0)
    assert archive.stats(db, "orders", T0).depth == 2


def test_an_idempotent_append_stores_once_within_its_window(db: sqlite3.Connection) -> None:
    registry.provision(db, ChannelSpec("orders"), T0)
    item = (envelope(b"m", T0), "delivery-1", 60.0)
    [first] = queue.append_many(db, [item], T0)
    assert isinstance(first, tuple) and first[1]
    assert queue.append_many(db, [item], T0 + 59.9) == [(first[0], False)]
    [after_window] = queue.append_many(db, [item], T0 + 60)
    assert isinstance(after_window, tuple) and after_window[1]
    assert after_window[0] != first[0]


def test_history_is_replayed_to_one_group_within_its_window(db: sqlite3.Connection) -> None:
    registry.provision(db, ChannelSpec("orders", history_seconds=100), T0)
    for n, at in ((b"old", T0), (b"new", T0 + 50)):
        message_id = append(db, n, at)
        read(db, at)
        queue.ack_many(db, [("orders", "default", message_id, "")], at)
    registry.join(db, "orders", "audit", T0 + 60)
    assert archive.replay_history(db, "orders", "audit", 0.0, 100, T0 + 120) == 1
    assert read(db, T0 + 120, group="audit") == [(b"new", 1)]
    assert read(db, T0 + 120) == []


def test_replay_keys_and_rate_windows_follow_the_clock(db: sqlite3.Connection) -> None:
    assert limits.remember(db, "nonce", 10, T0)
    assert not limits.remember(db, "nonce", 10, T0 + 9.9)
    assert limits.remember(db, "nonce", 10, T0 + 10.1)
    window_start = T0 - T0 % 60
    waits = [limits.hit_rate(db, "orders", "k", 2, 60, window_start + 1) for _ in range(3)]
    assert waits == [0.0, 0.0, 59.0]
    assert limits.hit_rate(db, "orders", "k", 2, 60, window_start + 60) == 0.0
