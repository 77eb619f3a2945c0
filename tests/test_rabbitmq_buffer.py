"""What only the RabbitMQ backend has: its URL, its broker-side layout, a broker that is down.

The Buffer semantics themselves are the conformance suite's (tests/test_buffers.py: its
rabbitmq backend runs on the session's broker); docs/STORAGE-RABBITMQ.md has the design.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import aio_pika
import httpx
import pytest

from tests.servers import (
    Cloud,
    ConnectorProcess,
    RabbitMQServer,
    Sink,
    free_port,
    running,
    wait_until,
)
from webhook_connect.cloud.app import _safe_url
from webhook_connect.cloud.buffers import ChannelSpec, open_buffer
from webhook_connect.cloud.buffers.rabbitmq import (
    FAILURE_KEPT,
    READY_FRESH,
    REGISTRATION_MARGIN,
    Publishes,
    RabbitMQBuffer,
    split_url,
)
from webhook_connect.cloud.config import build_cloud_config
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.exceptions import ConfigError, StorageUnavailable


def envelope(body: bytes = b"{}") -> Envelope:
    return Envelope("orders", "shop", time.time(), "POST", "/webhook/shop", "", (), body)


def write_channel(tmp_path: Path, token: str) -> Path:
    """A webhooks.json with one webhook feeding channel ``dev`` (connector token ``token``)."""
    webhooks = tmp_path / "webhooks.json"
    channel = {"channel": "dev", "channel_token": token}
    webhooks.write_text(
        json.dumps({"raw": {"module": "webhook_connect", "module-config": channel}})
    )
    return webhooks


def url(broker: str, tmp_path: Path, prefix: str = "") -> str:
    registry = quote(f"sqlite:///{tmp_path / 'registry.db'}", safe="")
    prefix = prefix or f"t{uuid.uuid4().hex[:12]}"
    return f"{broker}?registry={registry}&prefix={prefix}"


@pytest.fixture
async def rabbit_buffer(
    rabbitmq_server: RabbitMQServer, tmp_path: Path
) -> AsyncIterator[RabbitMQBuffer]:
    store = open_buffer(url(rabbitmq_server.url, tmp_path, "layout"))
    assert isinstance(store, RabbitMQBuffer)
    try:
        yield store
    finally:
        await store.aclose()


def test_the_url_names_the_broker_the_registry_and_the_prefix() -> None:
    broker, registry, prefix = split_url(
        "amqp://u:p@127.0.0.1:5672/vh?heartbeat=30&registry=redis%3A%2F%2F127.0.0.1%2F0&prefix=p"
    )
    assert broker == "amqp://u:p@127.0.0.1:5672/vh?heartbeat=30"
    assert (registry, prefix) == ("redis://127.0.0.1/0", "p")
    assert split_url("amqp://h/?registry=sqlite:///r.db")[2] == "wc"


@pytest.mark.parametrize(
    "storage", ["amqp://127.0.0.1/", "amqp://h/?registry=", "amqp://h/?registry=amqp://x/"]
)
def test_an_amqp_url_without_a_usable_registry_is_refused_naming_the_key(storage: str) -> None:
    with pytest.raises(ConfigError) as refused:
        build_cloud_config(storage_url=storage, environ={})
    assert str(refused.value).startswith("--storage: registry: ")


async def test_each_group_is_a_durable_quorum_queue_bound_to_the_channels_exchange(
    rabbitmq_server: RabbitMQServer, rabbit_buffer: RabbitMQBuffer
) -> None:
    await rabbit_buffer.provision(ChannelSpec("orders", max_queue_size=7))
    await rabbit_buffer.join("orders", "audit")
    connection = await aio_pika.connect(rabbitmq_server.url)
    try:
        channel = await connection.channel()
        for group in ("default", "audit"):
            # Redeclaring with the same arguments succeeds only if they are what we expect.
            queue = await channel.declare_queue(
                f"layout:orders:g:{group}",
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-max-length": 7,
                    "x-overflow": "reject-publish",
                    "x-message-ttl": (86400 + 300) * 1000,
                },
            )
            assert queue.declaration_result.message_count == 0
        await rabbit_buffer.append(envelope())
        for group in ("default", "audit"):
            queue = await channel.declare_queue(f"layout:orders:g:{group}", passive=True)
            assert queue.declaration_result.message_count == 1, "the publish was confirmed"
    finally:
        await connection.close()


async def test_a_read_takes_what_was_ready_and_returns_while_more_keeps_arriving(
    rabbitmq_server: RabbitMQServer, rabbit_buffer: RabbitMQBuffer
) -> None:
    """A read under steady load returns what it found, instead of taking each new arrival
    one round trip at a time until the queue runs dry (which held the first messages back
    from the consumer: relay p50 ~100 ms at 1,000 msg/s). Here the arrivals outpace any
    reader: a publisher without confirms, until the read returns (at most 30,000)."""
    await rabbit_buffer.provision(ChannelSpec("flood", max_queue_size=1_000_000))
    ready = Envelope("flood", "shop", time.time(), "POST", "/webhook/shop", "", (), b"{}")
    for _ in range(5):
        await rabbit_buffer.append(ready)
    headers = {"x-wc-meta": ready.encode_meta().decode(), "x-wc-attempts": "0"}
    connection = await aio_pika.connect(rabbitmq_server.url)
    reading = asyncio.Event()
    published = 0

    async def flood() -> None:
        nonlocal published
        channel = await connection.channel(publisher_confirms=False)
        exchange = await channel.get_exchange("layout:flood")
        while published < 30_000 and (published < 1000 or reading.is_set()):
            message = aio_pika.Message(b"{}", headers=headers, message_id=uuid.uuid4().hex)
            await exchange.publish(message, routing_key="")
            published += 1
            await asyncio.sleep(0)  # the reader runs between two publishes
            if published == 1000:
                reading.set()

    flooding = asyncio.ensure_future(flood())
    try:
        await asyncio.wait_for(reading.wait(), 30)
        got = await rabbit_buffer.read("flood", "default", "c1", 1_000_000)
        reading.clear()  # the flood stops here
        assert not flooding.done(), f"the read outlasted all {published} publishes"
        assert 5 <= len(got) < published, (len(got), published)
    finally:
        reading.clear()
        await flooding
        await connection.close()
        await rabbit_buffer.delete_channel("flood")


async def test_a_replica_started_with_new_limits_keeps_the_queues_as_they_are(
    rabbitmq_server: RabbitMQServer, tmp_path: Path
) -> None:
    storage = url(rabbitmq_server.url, tmp_path)
    first = open_buffer(storage)
    try:
        await first.provision(ChannelSpec("orders", max_queue_size=7))
        kept = await first.append(envelope(b"kept"))
    finally:
        await first.aclose()
    second = open_buffer(storage)  # RabbitMQ refuses new queue arguments: no crash, no loss
    try:
        await second.provision(ChannelSpec("orders", max_queue_size=9, ttl_seconds=60))
        await second.join("orders", "audit")
        later = await second.append(envelope(b"later"))
        got = await second.read("orders", "default", "c1", 10)
        assert [d.message_id for d in got] == [kept, later]
    finally:
        await second.aclose()


async def test_a_broker_that_is_down_is_unavailable_never_an_accepted_message(
    tmp_path: Path,
) -> None:
    store = open_buffer(url(f"amqp://guest:guest@127.0.0.1:{free_port()}/", tmp_path))
    try:
        with pytest.raises(StorageUnavailable):
            await store.ping()
        with pytest.raises(StorageUnavailable):
            await store.provision(ChannelSpec("orders"))
        # The registry (the companion store) has the channel now; the broker still has none.
        with pytest.raises(StorageUnavailable):
            await store.append(envelope())
        with pytest.raises(StorageUnavailable):
            await store.read("orders", "default", "c1", 10)
        with pytest.raises(StorageUnavailable):
            await store.stats("orders")
        with pytest.raises(StorageUnavailable):
            await store.dead_letters("orders")
    finally:
        await store.aclose()


def test_a_cloud_on_a_broker_that_is_down_is_not_ready_and_answers_503(tmp_path: Path) -> None:
    webhooks = write_channel(tmp_path, "down-token-0123456789")
    storage = url(f"amqp://guest:guest@127.0.0.1:{free_port()}/", tmp_path)
    with running(Cloud(storage, webhooks, tmp_path)) as cloud:
        assert httpx.get(f"{cloud.url}/ready", timeout=10).status_code == 503
        answer = httpx.post(f"{cloud.url}/webhook/raw", content=b"{}", timeout=10)
        assert answer.status_code == 503, "never a 202 the broker did not confirm"
        assert int(answer.headers["retry-after"]) > 0


def test_a_broker_restart_answers_503_meanwhile_then_recovers_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """A broker of its own (the session's is shared): killed, then started on the same data."""
    webhooks = write_channel(tmp_path, "restart-token-0123456789")
    broker = RabbitMQServer(tmp_path / "rabbitmq")
    try:
        broker.start()
        cloud = Cloud(url(broker.url, tmp_path), webhooks, tmp_path)
        with running(cloud), running(Sink(tmp_path)) as sink:
            before = [f'{{"before": {i}}}'.encode() for i in range(5)]
            accepted = [
                httpx.post(f"{cloud.url}/webhook/raw", content=body, timeout=10) for body in before
            ]
            assert [a.status_code for a in accepted] == [202] * 5

            # The broker's own durability window: a quorum queue declared less than about a
            # second before a crash is lost (RabbitMQServer.is_durable). The backend waits it
            # out for the group queues, not for the /ready probe's (docs/STORAGE-RABBITMQ.md).
            wait_until(broker.is_durable, 10, "the broker to save its quorum queues")
            broker.stop()  # SIGKILL of the VM: nothing flushed on the way out
            wait_until(
                lambda: httpx.get(f"{cloud.url}/ready", timeout=10).status_code == 503,
                20,
                "/ready to say 503",
            )
            for _ in range(5):
                answer = httpx.post(f"{cloud.url}/webhook/raw", content=b'{"down": 1}', timeout=10)
                assert answer.status_code == 503, "never a 202 the broker did not confirm"
                assert int(answer.headers["retry-after"]) > 0

            broker.start()  # the same node, ports and data directory
            wait_until(
                lambda: httpx.get(f"{cloud.url}/ready", timeout=10).status_code == 200,
                30,
                "the cloud to reconnect by itself",
            )
            # The quorum queue recovers its log a moment after the node answers: until then a
            # webhook is refused with 503 (retried by its sender), never accepted unconfirmed.
            answers: list[int] = []

            def accepted() -> bool:
                answer = httpx.post(f"{cloud.url}/webhook/raw", content=b'{"after": 1}', timeout=20)
                answers.append(answer.status_code)
                return answer.status_code == 202

            wait_until(accepted, 60, "a webhook accepted after the restart")
            assert set(answers) <= {202, 503}, answers

            settings = {
                "protocol": "websocket",
                "cloud_url": cloud.url,
                "channel": "dev",
                "token": "restart-token-0123456789",
                "state_dir": str(tmp_path / "state"),
                "default_target": {"url": sink.url, "timeout_seconds": 5},
            }
            with running(ConnectorProcess(tmp_path, settings)):
                expected = {*before, b'{"after": 1}'}
                wait_until(lambda: bodies(sink) >= expected, 30, "every accepted message")
            assert b'{"down": 1}' not in bodies(sink)
    finally:
        broker.close()


def test_readiness_follows_the_last_publish_for_a_moment_then_asks_for_a_probe() -> None:
    publishes = Publishes()
    assert publishes.is_ready(100.0) is None, "nothing published yet: probe"
    publishes.answered(100.0)
    assert publishes.is_ready(100.0 + READY_FRESH / 2) is True
    assert publishes.is_ready(100.0 + READY_FRESH) is None
    publishes.failed(200.0, "rabbitmq: a publish was not confirmed within 10 s")
    assert publishes.is_ready(200.0 + FAILURE_KEPT / 2) is False
    assert publishes.failure == "rabbitmq: a publish was not confirmed within 10 s"
    assert publishes.is_ready(200.0 + FAILURE_KEPT) is None
    publishes.answered(201.0)  # a later publish went through: ready again at once
    assert publishes.is_ready(201.0) is True and publishes.failure == ""


def test_ready_is_503_while_the_broker_takes_no_publishes_and_200_once_it_does(
    tmp_path: Path,
) -> None:
    """A broker that answers but takes no publishes: its memory alarm blocks every connection
    that publishes (a full disk does the same). /ready follows the path ingest uses, not
    whether a channel is open. A broker of its own: the alarm is node-wide."""
    webhooks = write_channel(tmp_path, "alarm-token-0123456789")
    broker = RabbitMQServer(tmp_path / "rabbitmq")
    try:
        broker.start()
        with running(Cloud(url(broker.url, tmp_path), webhooks, tmp_path)) as cloud:
            answer = httpx.post(f"{cloud.url}/webhook/raw", content=b"{}", timeout=10)
            assert answer.status_code == 202
            assert httpx.get(f"{cloud.url}/ready", timeout=10).status_code == 200

            broker.ctl("set_vm_memory_high_watermark", "absolute", "1")
            try:
                wait_until(
                    lambda: httpx.get(f"{cloud.url}/ready", timeout=10).status_code == 503,
                    20,
                    "/ready to say 503 while publishes are blocked",
                )
                answer = httpx.post(f"{cloud.url}/webhook/raw", content=b"{}", timeout=30)
                assert answer.status_code == 503, "never a 202 the broker did not confirm"
                assert int(answer.headers["retry-after"]) > 0
                ready = httpx.get(f"{cloud.url}/ready", timeout=10)
                assert ready.status_code == 503
                assert ready.json() == {"status": "unavailable", "reason": "storage"}
            finally:
                broker.ctl("set_vm_memory_high_watermark", "0.4")

            wait_until(
                lambda: httpx.get(f"{cloud.url}/ready", timeout=10).status_code == 200,
                20,
                "/ready to say 200 once publishes go through",
            )
            answer = httpx.post(f"{cloud.url}/webhook/raw", content=b"{}", timeout=10)
            assert answer.status_code == 202
    finally:
        broker.close()


def bodies(sink: Sink) -> set[bytes]:
    return {base64.b64decode(str(record["body_b64"])) for record in sink.records()}


@pytest.mark.parametrize(
    ("storage", "shown"),
    [
        (
            "amqp://u:secret1@h:5672/vh?registry=redis%3A%2F%2Fr%3Asecret2%40r%3A6379%2F0&prefix=p",
            "amqp://***@h:5672/vh?registry=redis://***@r:6379/0&prefix=p",
        ),
        (
            "amqps://u:secret1@h/?registry=rediss://:secret2@r:6380/1",
            "amqps://***@h/?registry=rediss://***@r:6380/1",
        ),
        ("amqp://u:sec@ret1@h/?registry=sqlite:///r.db", "amqp://***@h/?registry=sqlite:///r.db"),
        ("redis://:secret1@h:6379/0", "redis://***@h:6379/0"),
        ("sqlite:///buffer.db", "sqlite:///buffer.db"),
    ],
)
def test_logs_and_answers_show_the_storage_url_without_any_password(
    storage: str, shown: str
) -> None:
    """The registry's URL inside an amqp:// one has a password of its own."""
    assert _safe_url(storage) == shown
    assert "secret" not in _safe_url(storage) and "ret1" not in _safe_url(storage)


@pytest.mark.parametrize("group", ["default", "joined"])
async def test_a_message_accepted_into_a_new_queue_survives_a_broker_crash(
    tmp_path: Path, group: str
) -> None:
    """A broker of its own, SIGKILLed the moment the first append into a new queue returns (a
    channel's, provisioned; a group's, joined), then started on the same data: the confirmed
    message is there. RabbitMQ 3.10 registers a new quorum queue durably about a second after
    declaring it; a queue that took publishes before that was lost with them on the crash
    (docs/STORAGE-RABBITMQ.md, "A new queue")."""
    broker = RabbitMQServer(tmp_path / "rabbitmq")
    storage = url(broker.url, tmp_path)
    try:
        broker.start()
        store = open_buffer(storage)
        try:
            await store.provision(ChannelSpec("orders"))
            if group != "default":
                await store.join("orders", group)  # returns at once: the append waits
            accepted = await store.append(envelope(b"first"))
            saved = broker.is_durable()
            broker.stop()  # SIGKILL of the VM: nothing flushed on the way out
        finally:
            await store.aclose()
        broker.start()
        after = open_buffer(storage)
        try:
            got: list[str] = []
            reason = ""
            deadline = time.monotonic() + 30
            while not got and time.monotonic() < deadline:
                try:
                    got = [d.message_id for d in await after.read("orders", group, "c1", 10)]
                except StorageUnavailable as exc:  # the node is still starting its queues
                    reason = str(exc)
                if not got:
                    await asyncio.sleep(0.2)
            assert got == [accepted], (
                f"the confirmed message is lost (queue registry saved at the kill: {saved}; "
                f"last error: {reason or 'none, the queue is empty'})"
            )
        finally:
            await after.aclose()
    finally:
        broker.close()


async def test_only_the_replica_that_creates_a_queue_waits_for_the_broker_to_save_it(
    rabbitmq_server: RabbitMQServer, tmp_path: Path
) -> None:
    """Provisioning a channel whose queue this replica creates returns REGISTRATION_MARGIN
    after the creation; another replica (or this one after a reconnect) that finds the queue
    existing provisions and appends at once."""
    storage = url(rabbitmq_server.url, tmp_path)
    first, second = open_buffer(storage), open_buffer(storage)
    try:
        started = time.monotonic()
        await first.provision(ChannelSpec("orders"))
        kept = [await first.append(envelope(b"waits"))]
        assert time.monotonic() - started >= REGISTRATION_MARGIN, "a new queue waits"
        started = time.monotonic()
        await second.provision(ChannelSpec("orders"))
        kept.append(await second.append(envelope(b"at once")))
        kept.append(await first.append(envelope(b"at once too")))
        # Milliseconds of round trips: only a wait for the broker could reach the margin.
        assert time.monotonic() - started < REGISTRATION_MARGIN, "an existing queue waits not"
        got = await first.read("orders", "default", "c1", 10)
        assert [d.message_id for d in got] == kept
    finally:
        await first.aclose()
        await second.aclose()


def test_a_cloud_with_several_new_channels_takes_webhooks_from_its_first_request(
    rabbitmq_server: RabbitMQServer, tmp_path: Path
) -> None:
    """Five channels whose queues are all new: each waits for the broker to save its queues
    (2 s), and the cloud serves once they are provisioned, so the first webhook to each is a
    202. Provisioned one after another they took 5 x 2 s, past the 3 s start-up waited for
    them, and the first webhooks were answered 503 not_ready."""
    config = {
        f"hook{i}": {
            "module": "webhook_connect",
            "module-config": {"channel": f"ch{i}", "channel_token": f"ch{i}-token-0123456789"},
        }
        for i in range(5)
    }
    webhooks = tmp_path / "webhooks.json"
    webhooks.write_text(json.dumps(config))
    with running(Cloud(url(rabbitmq_server.url, tmp_path), webhooks, tmp_path)) as cloud:
        for i in range(5):
            answer = httpx.post(f"{cloud.url}/webhook/hook{i}", content=b"{}", timeout=10)
            assert answer.status_code == 202, answer.text
