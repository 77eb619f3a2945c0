"""The ``aws_sqs`` module against moto's standalone SQS server, read back with boto3."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import boto3
import pytest
from pydantic import ValidationError

from tests.modules.cloud_peers import BINARY_BODY, JSON_BODY, MotoServer, make_message
from tests.servers import running
from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.modules.base import Message, Permanent, Pools, Transient
from webhook_connect.shared.modules.registry import module_class
from webhook_connect.shared.modules.sqs import MAX_BATCH_BYTES, SQSConfig, SQSModule, batches


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with running(MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")) as server:
        yield server


@pytest.fixture
def sqs(moto: MotoServer) -> Iterator[Any]:
    """An independent client; every test starts with empty queues."""
    client = boto3.client(
        "sqs",
        endpoint_url=moto.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    for url in client.list_queues().get("QueueUrls", []):
        client.delete_queue(QueueUrl=url)
    yield client
    client.close()


def create_queue(client: Any, name: str, **attributes: str) -> str:
    if name.endswith(".fifo"):
        attributes["FifoQueue"] = "true"
    return str(client.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"])


def receive(client: Any, url: str, count: int, timeout: float = 10) -> list[dict[str, Any]]:
    """Exactly ``count`` messages from the queue, then check nothing more is there."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        answer = client.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
            VisibilityTimeout=60,
        )
        got += answer.get("Messages", [])
    assert len(got) == count
    assert client.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages", []) == []
    return got


def attributes(received: dict[str, Any]) -> dict[str, str]:
    return {k: v["StringValue"] for k, v in received.get("MessageAttributes", {}).items()}


def body_bytes(received: dict[str, Any]) -> bytes:
    """What a consumer reconstructs, following the ``body-encoding`` attribute."""
    encoding = attributes(received).get("body-encoding")
    if encoding == "base64":
        return base64.b64decode(received["Body"])
    if encoding == "empty":
        return b""
    return str(received["Body"]).encode()


@pytest.fixture
async def make_module(moto: MotoServer) -> AsyncIterator[Callable[..., SQSModule]]:
    pools = Pools()
    connection = ConnectionEntry.model_validate({"type": "aws_sqs", **moto.connection()})
    made: list[SQSModule] = []

    def make(**config: Any) -> SQSModule:
        made.append(SQSModule(SQSConfig.model_validate(config), connection, pools))
        return made[-1]

    yield make
    for module in made:
        await module.aclose()
    await pools.aclose()


@pytest.mark.parametrize(
    ("body", "encoding"),
    [(JSON_BODY, None), (BINARY_BODY, "base64"), (b"ctl\x01char", "base64"), (b"", "empty")],
)
async def test_each_body_comes_back_byte_exact(
    sqs: Any, make_module: Callable[..., SQSModule], body: bytes, encoding: str | None
) -> None:
    url = create_queue(sqs, "webhooks")
    module = make_module(queue_url=url)
    await module.start()
    await module.deliver(make_message("m-1", body))

    [received] = receive(sqs, url, 1)
    assert body_bytes(received) == body
    values = attributes(received)
    assert values.get("body-encoding") == encoding
    assert values["message-id"] == "m-1"
    assert values["webhook-id"] == "stripe"
    assert values["channel"] == "payments"
    assert values["received-at"] == "2026-08-28T14:05:33.123456Z"
    assert json.loads(values["headers"])[-2:] == [["X-Seen", "one"], ["X-Seen", "two"]]


async def test_concurrent_delivers_all_arrive_intact(
    sqs: Any, make_module: Callable[..., SQSModule]
) -> None:
    url = create_queue(sqs, "busy")
    module = make_module(queue_name="busy", include_headers=False)
    sent = {f"m-{i}": f'{{"n": {i}}}'.encode() + bytes([i]) for i in range(120)}
    await asyncio.gather(*(module.deliver(make_message(k, v)) for k, v in sent.items()))

    received = receive(sqs, url, len(sent))
    assert {attributes(r)["message-id"]: body_bytes(r) for r in received} == sent
    assert all("headers" not in attributes(r) for r in received)


def test_batches_respect_the_count_and_size_limits() -> None:
    def entry(size: int) -> dict[str, Any]:
        return {"MessageBody": "x" * size, "MessageAttributes": {}}

    small = [entry(10)] * 25
    assert [len(group) for group in batches(small)] == [10, 10, 5]
    big = MAX_BATCH_BYTES // 2
    assert batches([entry(big), entry(big), entry(10), entry(MAX_BATCH_BYTES * 3)]) == [
        [0, 1],
        [2],
        [3],
    ]


async def test_fifo_uses_the_message_id_and_drops_a_redelivery(
    sqs: Any, make_module: Callable[..., SQSModule]
) -> None:
    url = create_queue(sqs, "orders.fifo")
    module = make_module(queue_url=url)
    await module.deliver(make_message("m-9", BINARY_BODY))
    await module.deliver(make_message("m-9", BINARY_BODY))

    [received] = receive(sqs, url, 1)
    assert body_bytes(received) == BINARY_BODY
    assert received["Attributes"]["MessageGroupId"] == "m-9"
    assert received["Attributes"]["MessageDeduplicationId"] == "m-9"

    grouped = make_module(queue_url=url, message_group_id="stripe-events")
    await grouped.deliver(make_message("m-10"))
    [received] = receive(sqs, url, 1)
    assert received["Attributes"]["MessageGroupId"] == "stripe-events"


async def test_a_message_the_queue_refuses_is_permanent_and_spares_its_batch(
    sqs: Any, make_module: Callable[..., SQSModule]
) -> None:
    url = create_queue(sqs, "small", MaximumMessageSize="1024")
    module = make_module(queue_url=url, include_headers=False)
    messages: list[Message] = [make_message(f"ok-{i}", b"fits") for i in range(5)]
    messages.insert(2, make_message("too-big", b"x" * 2000))
    outcomes = await asyncio.gather(*(module.deliver(m) for m in messages), return_exceptions=True)

    assert isinstance(outcomes[2], Permanent)
    assert [o for i, o in enumerate(outcomes) if i != 2] == [None] * 5
    assert sorted(attributes(r)["message-id"] for r in receive(sqs, url, 5)) == [
        f"ok-{i}" for i in range(5)
    ]


async def test_a_missing_queue_is_transient(
    sqs: Any, make_module: Callable[..., SQSModule]
) -> None:
    module = make_module(queue_name="not-there")
    with pytest.raises(Transient, match="NonExistentQueue|QueueDoesNotExist"):
        await module.start()
    with pytest.raises(Transient):
        await module.deliver(make_message())
    url = create_queue(sqs, "not-there")
    await module.deliver(make_message("late"))
    assert attributes(receive(sqs, url, 1)[0])["message-id"] == "late"


def test_the_registry_loads_the_module() -> None:
    assert module_class("aws_sqs") is SQSModule


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({}, "exactly one of queue_url and queue_name"),
        ({"queue_name": "a", "queue_url": "http://q/a"}, "exactly one"),
        ({"queue_name": "bad name"}, "queue_name"),
        ({"queue_name": "q.fifo", "delay_seconds": 5}, "per-message delay"),
        ({"queue_name": "q", "delay_seconds": 901}, "delay_seconds"),
        ({"queue_name": "q", "message_deduplication_id": "x"}, "deduplication id"),
        ({"queue_name": "q", "bucket": "x"}, "Extra inputs"),
    ],
)
def test_a_bad_module_config_is_refused(config: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        SQSConfig.model_validate(config)


def test_core_webhook_module_nulls_are_accepted() -> None:
    config = SQSConfig.model_validate(
        {
            "queue_url": "http://q/1/a.fifo",
            "message_group_id": None,
            "message_deduplication_id": None,
        }
    )
    assert config.is_fifo


async def test_server_down_is_transient_and_a_restart_needs_no_new_module(
    moto: MotoServer, sqs: Any, make_module: Callable[..., SQSModule]
) -> None:
    url = create_queue(sqs, "webhooks")
    module = make_module(queue_name="webhooks")
    await module.deliver(make_message("before"))
    moto.stop()
    try:
        with pytest.raises(Transient):
            await module.deliver(make_message("during"))
    finally:
        moto.start()
    assert create_queue(sqs, "webhooks") == url  # moto restarts empty

    await module.deliver(make_message("after", BINARY_BODY))
    [received] = receive(sqs, url, 1)
    assert body_bytes(received) == BINARY_BODY
