"""``rabbitmq`` against a private rabbitmq-server node, read back with an independent consumer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from datetime import UTC, datetime

import aio_pika
import aiormq.exceptions
import pytest
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from tests.servers import RABBITMQ_MAX_MESSAGE_SIZE, RabbitMQServer, freeze
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.modules.amqp import PublishedProperties
from webhook_connect.shared.modules.base import Message, Permanent, Pools, Transient
from webhook_connect.shared.modules.rabbitmq import RabbitMQConfig, RabbitMQModule, amqp_properties

BINARY = b"\x00\xff\xfe binary \x80\x81\r\n\x00"
JSON = b'{"event": "paid", "amount": 12.5, "name": "Zo\xc3\xab"}'
MAX_MESSAGE_SIZE = RABBITMQ_MAX_MESSAGE_SIZE


@pytest.fixture(scope="module")
def rabbit(rabbitmq_server: RabbitMQServer) -> RabbitMQServer:
    """The session's node (tests/conftest.py), shared with the storage backend's tests."""
    return rabbitmq_server


def message(body: bytes, number: int = 1, content_type: str = "application/json") -> Message:
    headers = (("Content-Type", content_type), ("X-Trace", "a"), ("X-Trace", "b\xe9"))
    envelope = Envelope(
        "orders", "stripe", 1_700_000_000.25, "POST", "/webhook/stripe", "a=1", headers, body
    )
    return Message.of(f"msg-{number}", 1, envelope)


def module(server: RabbitMQServer, pools: Pools, **config: object) -> RabbitMQModule:
    return RabbitMQModule(RabbitMQConfig.model_validate(config), server.connection(), pools)


async def consume(url: str, queue: str, count: int) -> list[AbstractIncomingMessage]:
    """Read ``count`` messages from ``queue`` with a connection of our own."""
    got: list[AbstractIncomingMessage] = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        source = await channel.declare_queue(queue, passive=True)
        deadline = time.monotonic() + 10
        while len(got) < count and time.monotonic() < deadline:
            incoming = await source.get(no_ack=True, fail=False)
            if incoming is None:
                await asyncio.sleep(0.02)
            else:
                got.append(incoming)
    return got


async def deliver_retrying(sender: RabbitMQModule, message: Message) -> None:
    """What the connector does with Transient: try again (here at once, a few times)."""
    for _ in range(3):
        try:
            return await sender.deliver(message)
        except Transient:
            continue
    await sender.deliver(message)


async def depth(server: RabbitMQServer, queue: str) -> int:
    connection = await aio_pika.connect(server.url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


async def test_bodies_arrive_byte_exact_with_metadata(rabbit: RabbitMQServer, pools: Pools) -> None:
    sender = module(rabbit, pools, queue_name="exact")
    await sender.start()
    await sender.deliver(message(BINARY, 1, "application/octet-stream"))
    await sender.deliver(message(JSON, 2))

    first, second = await consume(rabbit.url, "exact", 2)
    assert (first.body, second.body) == (BINARY, JSON)
    assert (first.message_id, second.message_id) == ("msg-1", "msg-2")
    assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert (first.content_type, second.content_type) == (
        "application/octet-stream",
        "application/json",
    )
    headers = second.headers
    assert headers["message-id"] == "msg-2"
    assert headers["webhook-id"] == "stripe"
    assert headers["channel"] == "orders"
    assert headers["received-at"] == "2023-11-14T22:13:20.250000Z"
    assert second.timestamp is not None and second.timestamp.timestamp() == 1_700_000_000
    assert json.loads(str(headers["headers"])) == [
        ["Content-Type", "application/json"],
        ["X-Trace", "a"],
        ["X-Trace", "b\xe9"],
    ]


async def test_the_queue_is_declared_durable(rabbit: RabbitMQServer, pools: Pools) -> None:
    await module(rabbit, pools, queue_name="durable").start()
    connection = await aio_pika.connect(rabbit.url)
    async with connection:
        channel = await connection.channel()
        # Redeclaring with other properties is refused: the queue is durable.
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await channel.declare_queue("durable", durable=False)


async def test_exchange_and_routing_key(rabbit: RabbitMQServer, pools: Pools) -> None:
    connection = await aio_pika.connect(rabbit.url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange("events", aio_pika.ExchangeType.TOPIC, durable=True)
    sender = module(rabbit, pools, exchange="events", routing_key="orders.paid", queue_name="paid")
    await sender.deliver(message(JSON))
    [got] = await consume(rabbit.url, "paid", 1)
    assert (got.body, got.exchange, got.routing_key) == (JSON, "events", "orders.paid")


async def test_an_unroutable_message_is_permanent(rabbit: RabbitMQServer, pools: Pools) -> None:
    connection = await aio_pika.connect(rabbit.url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange("nowhere", aio_pika.ExchangeType.DIRECT)
    sender = module(rabbit, pools, exchange="nowhere", routing_key="no.binding")
    with pytest.raises(Permanent, match="refused"):
        await sender.deliver(message(JSON))


async def test_a_missing_exchange_is_permanent(rabbit: RabbitMQServer, pools: Pools) -> None:
    sender = module(rabbit, pools, exchange="does-not-exist", routing_key="x")
    await sender.start()  # logs, does not raise
    for _ in range(2):  # the closed channel is reopened, and refused again
        with pytest.raises(Permanent, match="NOT_FOUND"):
            await sender.deliver(message(JSON))


async def test_an_oversized_message_is_permanent_and_only_it(
    rabbit: RabbitMQServer, pools: Pools
) -> None:
    sender = module(rabbit, pools, queue_name="sizes")
    await sender.start()
    small = [message(JSON, n) for n in range(20)]
    big = message(b"x" * (MAX_MESSAGE_SIZE + 1), 99)
    outcomes = await asyncio.gather(
        *(sender.deliver(m) for m in [*small[:10], big, *small[10:]]), return_exceptions=True
    )
    assert isinstance(outcomes[10], Permanent)
    # The broker closed the channel under the big one: the others may be asked to retry (at
    # least once: one may be stored already), never dead-lettered.
    others = dict(zip(small, outcomes[:10] + outcomes[11:], strict=True))
    assert all(isinstance(outcome, Transient) for outcome in others.values() if outcome)
    for again in [m for m, outcome in others.items() if outcome]:
        await deliver_retrying(sender, again)
    got = await consume(rabbit.url, "sizes", await depth(rabbit, "sizes"))
    assert {m.message_id for m in got} == {m.message_id for m in small}


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({}, "set queue_name"),
        ({"queue_name": "amq.gen-1"}, "queue_name"),
        ({"queue_name": "a b"}, "queue_name"),
        ({"queue_name": "q", "durable": False}, "durable"),
        ({"queue_name": "q", "timeout_seconds": 0}, "timeout_seconds"),
    ],
)
def test_a_bad_module_config_is_refused(config: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        RabbitMQConfig.model_validate(config)


async def test_thousands_of_messages_a_second(rabbit: RabbitMQServer, pools: Pools) -> None:
    sender = module(rabbit, pools, queue_name="bulk")
    await sender.start()
    total, concurrency = 3000, 50
    pending = [message(JSON, n) for n in range(total)]

    async def worker() -> None:
        while pending:
            await sender.deliver(pending.pop())

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    rate = total / (time.perf_counter() - began)
    assert await depth(rabbit, "bulk") == total
    print(f"rabbitmq: {rate:.0f} confirmed messages/s")
    # Far below what one connector reaches here (see the printed rate); catches a regression to
    # one publish at a time without flaking on a loaded machine.
    assert rate > 500


async def test_an_overdue_confirm_is_transient(rabbit: RabbitMQServer, pools: Pools) -> None:
    sender = module(rabbit, pools, queue_name="frozen", timeout_seconds=0.5)
    await sender.deliver(message(JSON, 1))
    vm = int((rabbit.directory / "vm.pid").read_text())
    freeze(vm)  # alive, silent
    try:
        with pytest.raises(Transient):
            await sender.deliver(message(JSON, 2))
    finally:
        os.kill(vm, signal.SIGCONT)
    await sender.deliver(message(JSON, 3))
    got = await consume(rabbit.url, "frozen", await depth(rabbit, "frozen"))
    assert {m.message_id for m in got} >= {"msg-1", "msg-3"}  # msg-2 may have made it too


async def test_broker_down_is_transient_and_the_module_reconnects(
    rabbit: RabbitMQServer, pools: Pools
) -> None:
    sender = module(rabbit, pools, queue_name="survivor")
    await sender.deliver(message(BINARY, 1))  # persistent, in a durable queue
    rabbit.stop()
    try:
        with pytest.raises(Transient):
            await sender.deliver(message(JSON, 2))
        late = module(rabbit, Pools(), queue_name="survivor")
        await late.start()  # a broker down at start-up is not an error
        with pytest.raises(Transient):
            await late.deliver(message(JSON, 3))
    finally:
        rabbit.start()
    await sender.deliver(message(JSON, 4))
    await late.deliver(message(JSON, 5))
    await late.pools.aclose()
    got = await consume(rabbit.url, "survivor", 3)
    assert [(m.message_id, m.body) for m in got] == [
        ("msg-1", BINARY),
        ("msg-4", JSON),
        ("msg-5", JSON),
    ]


STAMP = datetime.fromtimestamp(1_700_000_000.9999996, UTC)  # rounds up to the next second


@pytest.mark.parametrize(
    "properties",
    [
        {"content_type": "text/plain; charset=\xe9", "headers": {"b": "\xe9\u20ac", "a": ""}},
        {"content_type": "", "message_id": "", "delivery_mode": 1, "timestamp": STAMP},
        {"headers": {}, "timestamp": datetime(2024, 1, 2, 3, 4, 5)},  # naive: pamqp takes it as UTC
        {"headers": {"n": 1, "t": True, "nested": {"x": "y"}, "k" * 200: "v"}},
        {"priority": 5, "app_id": "x", "message_id": "m", "headers": {"a": "b"}},
        {},
    ],
)
def test_properties_encode_as_pamqp_does(properties: dict[str, object]) -> None:
    fast = PublishedProperties(**properties)  # type: ignore[arg-type]
    assert fast.marshal() == aiormq.spec.Basic.Properties(**properties).marshal()  # type: ignore[arg-type]


def test_published_properties_encode_as_pamqp_does() -> None:
    for sent in (message(b"\xff", 1, "application/octet-stream"), message(b"{}", 2, "x" * 300)):
        fast = amqp_properties(sent)
        plain = aiormq.spec.Basic.Properties(**{k: getattr(fast, k) for k in fast.__slots__})
        assert type(fast) is PublishedProperties
        assert fast.marshal() == plain.marshal()


def test_properties_pamqp_refuses_are_refused_alike() -> None:
    with pytest.raises(TypeError, match="255"):
        aiormq.spec.Basic.Properties(message_id="m" * 256).marshal()
    with pytest.raises(TypeError, match="255"):
        PublishedProperties(message_id="m" * 256).marshal()
