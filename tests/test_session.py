"""The consumer session (cloud/session.py) driven without sockets, servers or sleeps.

Like h11's tests wire two ends in memory, :class:`FakeQueue` stands for the storage calls a
session's plans turn into: it knows which consumer holds each message, and an ack timeout
hands a message to another consumer. Every time is a number the test passes in.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from webhook_connect.cloud.buffers import ChannelSpec, ConnectionRecord, Delivery, TokenRecord
from webhook_connect.cloud.session import (
    READ_BATCH,
    REMOVED,
    REVOKED,
    ConsumerSession,
    SettleOutcome,
    SettlePlan,
    liveness,
    remote_plan,
    settle_outcome,
)
from webhook_connect.cloud.sessions import Connection, check_liveness, settle, token_cache
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.exceptions import (
    ConnectorRefusal,
    StorageUnavailable,
    WebhookConnectError,
)
from webhook_connect.shared.frames import (
    AckFrame,
    AckRequest,
    NackFrame,
    Settlement,
    parse_client_frame,
)

CHANNEL = "orders"


def envelope(n: int) -> Envelope:
    return Envelope(CHANNEL, f"w{n}", 1000.0 + n, "POST", "/", "", (), b"{}")


@dataclass
class FakeQueue:
    """One group of one channel in memory: what is ready, and who holds what."""

    ready: list[str] = field(default_factory=list)
    held: dict[str, str] = field(default_factory=dict)  # message id -> consumer
    attempts: dict[str, int] = field(default_factory=dict)
    acked: list[str] = field(default_factory=list)
    nacked: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, count: int) -> None:
        start = len(self.attempts)
        for n in range(start, start + count):
            self.ready.append(f"m{n}")
            self.attempts[f"m{n}"] = 0

    def read(self, consumer: str, count: int) -> list[Delivery]:
        taken, self.ready = self.ready[:count], self.ready[count:]
        deliveries = []
        for message_id in taken:
            self.held[message_id] = consumer
            self.attempts[message_id] += 1
            n = int(message_id[1:])
            deliveries.append(Delivery(message_id, self.attempts[message_id], envelope(n)))
        return deliveries

    def time_out(self, message_id: str) -> None:
        """The ack timeout passed: the message is deliverable again, to anyone."""
        del self.held[message_id]
        self.ready.insert(0, message_id)

    def ack(self, message_id: str, consumer: str) -> bool:
        if self.held.get(message_id) != consumer:
            return False
        del self.held[message_id]
        self.acked.append(message_id)
        return True

    def nack(self, message_id: str, consumer: str, retry: bool, reason: str) -> bool:
        if self.held.get(message_id) != consumer:
            return False
        del self.held[message_id]
        self.nacked.append((message_id, retry, reason))
        if retry:
            self.ready.append(message_id)
        return True

    def execute(self, plan: SettlePlan, consumer: str, now: float) -> SettleOutcome:
        """What ``sessions.settle`` does with a plan, without the network."""
        s = plan.settlement
        results = [
            self.ack(i, consumer) if s.ack else self.nack(i, consumer, s.retry, s.reason)
            for i in s.ids
        ]
        return settle_outcome(plan, results, now)


def local(window: int = 10, now: float = 0.0) -> ConsumerSession:
    return ConsumerSession.local(CHANNEL, window, now=now, heartbeat_seconds=5.0)


def counted(window: int = 10, now: float = 0.0) -> ConsumerSession:
    return ConsumerSession.counted_in_storage(
        CHANNEL, window, now=now, heartbeat_seconds=5.0, check_seconds=5.0
    )


def pump(session: ConsumerSession, queue: FakeQueue, consumer: str, now: float) -> list[str]:
    """One turn of a transport's pump: read what the window has room for, send it."""
    count = session.read_size(READ_BATCH)
    return [m.message_id for m in session.sent(queue.read(consumer, count), now)] if count else []


def ack(*ids: str) -> Settlement:
    return AckFrame(type="ack", message_ids=ids).settlement()


# Sequence and sending --------------------------------------------------------------------------


def test_messages_are_numbered_across_batches_and_carry_their_attempt() -> None:
    queue, session = FakeQueue(), local(window=3)
    queue.add(5)
    first = session.sent(queue.read("a", 2), 1.0)
    second = session.sent(queue.read("a", 1), 2.0)
    assert [(m.message_id, m.sequence, m.attempt) for m in first + second] == [
        ("m0", 1, 1),
        ("m1", 2, 1),
        ("m2", 3, 1),
    ]
    assert all(m.channel == CHANNEL for m in first + second)
    assert session.in_flight == {"m0": 1.0, "m1": 1.0, "m2": 2.0}
    assert session.read_size() == 0  # window of 3 is full


# Settling: one path, known / unknown / stale ---------------------------------------------------


def test_an_ack_settles_in_storage_and_times_the_ack() -> None:
    queue, session = FakeQueue(), local()
    queue.add(2)
    pump(session, queue, "a", now=10.0)
    outcome = queue.execute(session.settle(ack("m0", "m1")), "a", now=10.25)
    assert outcome.settled == [("m0", True), ("m1", True)]
    assert outcome.latencies == [0.25, 0.25]
    assert outcome.rejected == []
    assert queue.acked == ["m0", "m1"] and session.in_flight == {}


def test_unknown_and_duplicate_acks_are_told_back_without_asking_storage() -> None:
    queue, session = FakeQueue(), local()
    queue.add(1)
    pump(session, queue, "a", now=0.0)
    plan = session.settle(ack("m0", "m0", "nope"))
    assert plan.settlement.ids == ("m0",)  # storage is asked about m0 once
    assert plan.unknown == ("m0", "nope")
    outcome = queue.execute(plan, "a", now=1.0)
    assert outcome.rejected == ["m0", "nope"]
    again = session.settle(ack("m0"))  # a second frame acking it again
    assert again.settlement.ids == () and again.unknown == ("m0",)
    assert queue.execute(again, "a", now=2.0).rejected == ["m0"]
    assert queue.acked == ["m0"]


def test_a_late_ack_after_redelivery_is_stale_and_the_new_holder_acks() -> None:
    queue, slow, other = FakeQueue(), local(), local()
    queue.add(1)
    assert pump(slow, queue, "slow", now=0.0) == ["m0"]
    queue.time_out("m0")  # the ack timeout passed: at-least-once hands it on
    [again] = other.sent(queue.read("other", 1), 31.0)
    assert (again.message_id, again.attempt) == ("m0", 2)
    late = queue.execute(slow.settle(ack("m0")), "slow", now=40.0)
    assert late.settled == [("m0", False)]
    assert late.rejected == ["m0"] and late.latencies == []  # no latency for what it lost
    assert slow.read_size() == 10  # the slot is free all the same
    fresh = queue.execute(other.settle(ack("m0")), "other", now=31.5)
    assert fresh.settled == [("m0", True)] and fresh.latencies == [0.5]


@pytest.mark.parametrize(
    ("frame", "stored"),
    [
        ('{"type":"nack","message_id":"m0"}', (True, "nack_retry")),
        ('{"type":"nack","message_id":"m0","retry":false}', (False, "nack")),
        ('{"type":"nack","message_id":"m0","retry":true,"reason":"http_503"}', (True, "http_503")),
        (
            '{"type":"nack","message_id":"m0","retry":false,"reason":"http_400"}',
            (False, "http_400"),
        ),
    ],
)
def test_a_nack_stores_the_connectors_reason_or_the_default(
    frame: str, stored: tuple[bool, str]
) -> None:
    queue, session = FakeQueue(), local()
    queue.add(1)
    pump(session, queue, "a", now=0.0)
    parsed = parse_client_frame(frame)
    assert isinstance(parsed, NackFrame)
    outcome = queue.execute(session.settle(parsed.settlement()), "a", now=1.0)
    retry, reason = stored
    assert queue.nacked == [("m0", retry, reason)]
    assert outcome.latencies == []  # a nack is not an ack: no ack latency
    assert queue.ready == (["m0"] if retry else [])


def test_the_ack_body_of_either_transport_is_one_settlement() -> None:
    over_post = AckRequest.model_validate_json(
        '{"message_ids":["m1"],"message_id":"m2","status":"nack","retry":false}'
    ).settlement()
    assert over_post == Settlement(("m1", "m2"), ack=False, retry=False, note="")
    assert over_post.reason == "nack"
    over_ws = parse_client_frame('{"type":"ack","message_ids":["m1"],"message_id":"m2"}')
    assert isinstance(over_ws, AckFrame)
    assert over_ws.settlement() == AckRequest(message_ids=["m1"], message_id="m2").settlement()


def test_a_counted_session_sends_every_id_to_storage() -> None:
    session = counted()
    plan = session.settle(ack("m0", "x"))
    assert plan == remote_plan(ack("m0", "x"))
    assert plan.settlement.ids == ("m0", "x") and plan.unknown == ()


# Refill ----------------------------------------------------------------------------------------


def test_a_full_window_refills_in_chunks_not_one_ack_at_a_time() -> None:
    queue, session = FakeQueue(), local(window=100)
    queue.add(300)
    assert len(pump(session, queue, "a", now=0.0)) == 100
    assert session.read_size() == 0
    queue.execute(session.settle(ack(*(f"m{n}" for n in range(24)))), "a", now=1.0)
    assert session.read_size() == 0  # 24 free: below the low water of 25
    queue.execute(session.settle(ack("m24")), "a", now=1.0)
    assert session.read_size() == 25
    assert pump(session, queue, "a", now=2.0) == [f"m{n}" for n in range(100, 125)]


def test_a_read_is_at_most_one_batch_and_an_empty_window_reads_any_room() -> None:
    session = local(window=1000)
    assert session.read_size(READ_BATCH) == READ_BATCH
    small = local(window=8)  # low water 2; with nothing in flight even one slot is read
    assert small.read_size(5) == 5


def test_ordered_mode_window_one_sends_the_next_only_after_the_ack() -> None:
    queue, session = FakeQueue(), local(window=1)
    queue.add(2)
    assert pump(session, queue, "a", now=0.0) == ["m0"]
    assert session.read_size() == 0
    queue.execute(session.settle(ack("m0")), "a", now=1.0)
    assert pump(session, queue, "a", now=1.0) == ["m1"]


def test_a_counted_window_recounts_only_when_it_may_be_half_full() -> None:
    session = counted(window=10)
    assert session.count_due()  # nothing known yet: assume full
    assert session.read_size(100) == 0
    session.counted_held(0)
    assert not session.count_due() and session.read_size(100) == 10
    queue = FakeQueue()
    queue.add(4)
    session.sent(queue.read("a", 4), 0.0)
    assert session.held == 4 and not session.count_due()
    queue.add(1)
    session.sent(queue.read("a", 1), 0.0)
    assert session.count_due()  # 5 of 10: ask storage, acks may have come to another replica
    session.counted_held(1)
    assert session.read_size(100) == 9


def test_a_counted_window_of_one_counts_before_every_read() -> None:
    session = counted(window=1)
    session.counted_held(0)
    assert session.count_due() and session.read_size(10) == 1
    session.counted_held(1)
    assert session.read_size(10) == 0


# Deadlines -------------------------------------------------------------------------------------


def test_a_heartbeat_is_due_every_interval() -> None:
    session = local(now=100.0)
    assert not session.heartbeat_due(104.9)
    assert session.heartbeat_due(105.0)
    session.heartbeat_sent(105.2)
    assert session.next_deadline() == 105.0  # the liveness check of that beat is still due
    session.checked(105.2)
    assert session.next_deadline() == 110.2
    assert not session.heartbeat_due(110.0) and session.heartbeat_due(110.2)


def test_a_websocket_checks_liveness_with_its_beat_a_pull_connection_at_once() -> None:
    ws, pull = local(now=0.0), counted(now=0.0)
    assert not ws.check_due(0.0) and ws.check_due(5.0)
    assert pull.check_due(0.0)  # a long-poll connection may have been removed between polls
    pull.checked(0.0)
    assert not pull.check_due(4.9) and pull.check_due(5.0)


def test_liveness_ends_a_removed_connection_and_a_revoked_or_expired_token() -> None:
    tokens = [
        TokenRecord("t1", CHANNEL, "h1", expires_at=None),
        TokenRecord("t2", CHANNEL, "h2", expires_at=1000.0),
    ]
    assert liveness(True, tokens, "t1", 5000.0) is None
    assert fields(liveness(False, tokens, "t1", 5000.0)) == REMOVED
    assert liveness(True, tokens, "t2", 999.9) is None
    assert fields(liveness(True, tokens, "t2", 1000.0)) == REVOKED  # expired at that moment
    assert fields(liveness(True, tokens, "gone", 0.0)) == REVOKED  # revoked: no longer listed
    assert liveness(True, [], "", 0.0) is None  # not opened with a stored token
    assert REMOVED[:3] == (410, 4002, "connection_closed")
    assert REVOKED[:3] == (401, 4001, "unauthorized")
    assert isinstance(liveness(False, [], "", 0.0), WebhookConnectError)


# The I/O helpers every transport uses, wired to the same fake ----------------------------------


@dataclass
class FakeBuffer:
    """The few buffer calls ``sessions.settle`` and ``sessions.check_liveness`` make."""

    queue: FakeQueue
    alive: bool = True
    tokens: list[TokenRecord] = field(default_factory=list)
    down: bool = False

    async def ack(self, channel: str, group: str, message_id: str, consumer: str = "") -> bool:
        if self.down:
            raise StorageUnavailable("down")
        return self.queue.ack(message_id, consumer)

    async def nack(
        self, channel: str, group: str, message_id: str, *, retry: bool, consumer: str, reason: str
    ) -> bool:
        return self.queue.nack(message_id, consumer, retry, reason)

    async def touch_connection(self, channel: str, connection_id: str) -> bool:
        if self.down:
            raise StorageUnavailable("down")
        return self.alive

    async def list_tokens(self, channel: str) -> list[TokenRecord]:
        return self.tokens


def fields(refusal: ConnectorRefusal | None) -> tuple[int, int, str, str] | None:
    if refusal is None:
        return None
    return (refusal.status, refusal.close_code, refusal.error, refusal.reason)


def connection(consumer: str = "a", token_id: str = "t1") -> Connection:
    record = ConnectionRecord(consumer, CHANNEL, "default", token_id=token_id)
    return Connection(record, ChannelSpec(CHANNEL), 10)


async def test_settle_executes_a_plan_in_storage_and_maps_storage_down_to_503() -> None:
    queue = FakeQueue()
    queue.add(2)
    session, buffer = local(), FakeBuffer(queue)
    pump(session, queue, "a", now=0.0)
    nack = NackFrame(type="nack", message_id="m0", retry=False).settlement()
    outcome = await settle(buffer, connection(), session.settle(nack))  # type: ignore[arg-type]
    assert outcome.settled == [("m0", True)] and queue.nacked == [("m0", False, "nack")]
    buffer.down = True
    with pytest.raises(ConnectorRefusal) as refused:
        await settle(buffer, connection(), session.settle(ack("m1")))  # type: ignore[arg-type]
    assert (refused.value.status, refused.value.close_code) == (503, 4503)


async def test_check_liveness_raises_the_refusal_that_ends_the_connection() -> None:
    buffer = FakeBuffer(FakeQueue(), tokens=[TokenRecord("t1", CHANNEL, "h")])
    await check_liveness(buffer, connection())  # type: ignore[arg-type]
    buffer.alive = False
    with pytest.raises(ConnectorRefusal) as removed:
        await check_liveness(buffer, connection())  # type: ignore[arg-type]
    assert fields(removed.value) == REMOVED
    buffer.alive, buffer.tokens = True, []
    token_cache.forget()  # the tokens read a moment ago are shared for a second
    with pytest.raises(ConnectorRefusal) as revoked:
        await check_liveness(buffer, connection())  # type: ignore[arg-type]
    assert fields(revoked.value) == REVOKED


async def test_liveness_checks_of_one_channel_share_one_token_read_a_second() -> None:
    """10,000 idle connectors check every 5 s: their channel's tokens are read once a second
    per process, not once per check; a failed read is not remembered."""
    token_cache.forget()
    buffer = CountingBuffer(FakeQueue(), tokens=[TokenRecord("t1", CHANNEL, "h")])
    checks = [check_liveness(buffer, connection(f"c{i}")) for i in range(50)]  # type: ignore[arg-type]
    await asyncio.gather(*checks)
    assert buffer.token_reads == 1
    buffer.fail_reads = True
    token_cache.forget()
    with pytest.raises(ConnectorRefusal):
        await check_liveness(buffer, connection())  # type: ignore[arg-type]
    buffer.fail_reads = False
    await check_liveness(buffer, connection())  # type: ignore[arg-type]
    assert buffer.token_reads == 3


@dataclass
class CountingBuffer(FakeBuffer):
    token_reads: int = 0
    fail_reads: bool = False

    async def list_tokens(self, channel: str) -> list[TokenRecord]:
        self.token_reads += 1
        await asyncio.sleep(0)
        if self.fail_reads:
            raise StorageUnavailable("down")
        return self.tokens
