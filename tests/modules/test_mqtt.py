"""``mqtt`` against a real mosquitto, read back with an independent aiomqtt subscriber."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest
from pydantic import ValidationError

from tests.servers import free_port, freeze, running, stop, wait_until
from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.modules.base import Message, Permanent, Pools, Transient
from webhook_connect.shared.modules.mqtt import MQTTConfig, MQTTModule

BINARY = b"\x00\xff\xfe binary \x80\x81\r\n\x00"
JSON = b'{"event": "paid", "amount": 12.5, "name": "Zo\xc3\xab"}'


class MosquittoServer:
    """mosquitto on a free loopback port, no persistence; anonymous clients may use ok/# only."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise RuntimeError("mosquitto is not installed: run scripts/test (it installs it)")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def connection(self, version: str = "5") -> ConnectionEntry:
        return ConnectionEntry(
            type="mqtt",
            host="127.0.0.1",
            port=self.port,
            mqtt_version=version,
            connect_timeout=3,
            keepalive=5,
        )

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        acl = self.directory / "acl"
        acl.write_text("topic readwrite ok/#\n")
        config = self.directory / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"acl_file {acl}\n"
            # Stay root when started as root: the files above are readable by root only.
            "user root\nlog_dest stderr\n"
        )
        with (self.directory / "mosquitto.log").open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_until(self._answers, what=f"mosquitto on port {self.port}")

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"mosquitto exited, see {self.directory / 'mosquitto.log'}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            # CONNECT, MQTT 3.1.1, clean session, keepalive 5, client id "probe"
            sock.sendall(b"\x10\x11\x00\x04MQTT\x04\x02\x00\x05\x00\x05probe")
            return sock.recv(4) == b"\x20\x02\x00\x00"  # CONNACK accepted

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoServer]:
    with running(MosquittoServer(tmp_path_factory.mktemp("mosquitto"))) as server:
        yield server


def message(body: bytes, number: int = 1) -> Message:
    headers = (("Content-Type", "application/json"), ("X-Trace", "a"), ("X-Trace", "b\xe9"))
    envelope = Envelope(
        "orders", "stripe", 1_700_000_000.25, "POST", "/webhook/stripe", "a=1", headers, body
    )
    return Message.of(f"msg-{number}", 1, envelope)


def module(
    server: MosquittoServer, pools: Pools, version: str = "5", **config: object
) -> MQTTModule:
    return MQTTModule(MQTTConfig.model_validate(config), server.connection(version), pools)


@contextlib.asynccontextmanager
async def subscribed(server: MosquittoServer, topic: str) -> AsyncIterator[aiomqtt.Client]:
    """A subscriber of our own (MQTT 5, so user properties come through)."""
    client = aiomqtt.Client(
        "127.0.0.1", server.port, protocol=aiomqtt.ProtocolVersion.V5, timeout=5
    )
    async with client:
        await client.subscribe(topic, qos=2)
        yield client


async def receive(client: aiomqtt.Client, count: int) -> list[aiomqtt.Message]:
    got: list[aiomqtt.Message] = []
    async with asyncio.timeout(10):
        async for incoming in client.messages:
            got.append(incoming)
            if len(got) == count:
                break
    return got


def user_properties(incoming: aiomqtt.Message) -> dict[str, str]:
    assert incoming.properties is not None
    pairs: list[tuple[str, str]] = getattr(incoming.properties, "UserProperty", [])
    return dict(pairs)


@pytest.mark.parametrize("qos", [0, 1, 2])
async def test_bodies_arrive_byte_exact_with_user_properties(
    mosquitto: MosquittoServer, pools: Pools, qos: int
) -> None:
    sender = module(mosquitto, pools, topic=f"q{qos}", topic_prefix="ok", qos=qos)
    await sender.start()
    async with subscribed(mosquitto, f"ok/q{qos}") as client:
        await sender.deliver(message(BINARY, 1))
        await sender.deliver(message(JSON, 2))
        first, second = await receive(client, 2)
    assert (first.payload, second.payload) == (BINARY, JSON)
    assert (str(first.topic), first.qos, first.retain) == (f"ok/q{qos}", qos, False)
    properties = user_properties(second)
    assert properties["message-id"] == "msg-2"
    assert properties["webhook-id"] == "stripe"
    assert properties["channel"] == "orders"
    assert properties["received-at"] == "2023-11-14T22:13:20.250000Z"
    assert json.loads(properties["headers"]) == [
        ["Content-Type", "application/json"],
        ["X-Trace", "a"],
        ["X-Trace", "b\xe9"],
    ]
    assert getattr(second.properties, "ContentType", None) == "application/json"


async def test_mqtt_311_carries_the_body_alone(mosquitto: MosquittoServer, pools: Pools) -> None:
    async with subscribed(mosquitto, "ok/v311") as client:
        await module(mosquitto, pools, "3.1.1", topic="ok/v311").deliver(message(BINARY))
        [got] = await receive(client, 1)
    assert got.payload == BINARY
    assert got.properties is None or not getattr(got.properties, "UserProperty", None)


async def test_an_envelope_wraps_body_and_metadata(
    mosquitto: MosquittoServer, pools: Pools
) -> None:
    sender = module(mosquitto, pools, "3.1.1", topic="ok/envelope", envelope=True)
    async with subscribed(mosquitto, "ok/envelope") as client:
        await sender.deliver(message(JSON, 1))
        await sender.deliver(message(BINARY, 2))
        json_one, binary_one = await receive(client, 2)
    assert isinstance(json_one.payload, bytes) and isinstance(binary_one.payload, bytes)
    document = json.loads(json_one.payload)
    assert document["payload"] == json.loads(JSON)
    assert (document["message_id"], document["webhook_id"]) == ("msg-1", "stripe")
    assert document["headers"] == {"content-type": "application/json", "x-trace": "a, b\xe9"}
    assert base64.b64decode(json.loads(binary_one.payload)["body_base64"]) == BINARY


async def test_a_retained_message_reaches_later_subscribers(
    mosquitto: MosquittoServer, pools: Pools
) -> None:
    await module(mosquitto, pools, topic="ok/retained", retained=True).deliver(message(JSON))
    async with subscribed(mosquitto, "ok/retained") as client:
        [got] = await receive(client, 1)
    assert (got.payload, got.retain) == (JSON, True)


async def test_a_refused_publish_is_permanent(mosquitto: MosquittoServer, pools: Pools) -> None:
    # The broker's ACL denies the topic: MQTT 5 says so in the PUBACK's reason code.
    with pytest.raises(Permanent, match="Not authorized"):
        await module(mosquitto, pools, topic="secret/x", qos=1).deliver(message(JSON))
    async with subscribed(mosquitto, "ok/after") as client:  # the session goes on
        await module(mosquitto, pools, topic="ok/after").deliver(message(JSON))
        assert [m.payload for m in await receive(client, 1)] == [JSON]


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({}, "topic"),
        ({"topic": "a/+/b"}, "wildcards"),
        ({"topic": "a/#"}, "wildcards"),
        ({"topic": "$SYS/x"}, "reserved"),
        ({"topic": "ok", "topic_prefix": "#"}, "wildcards"),
        ({"topic": "ok", "qos": 3}, "qos"),
        ({"topic": "ok", "shelly_gen2_format": True}, "shelly_gen2_format"),
    ],
)
def test_a_bad_module_config_is_refused(config: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        MQTTConfig.model_validate(config)


def test_bad_connection_settings_are_refused(mosquitto: MosquittoServer) -> None:
    entry = ConnectionEntry(type="mqtt", host="127.0.0.1", mqtt_version="4")
    with pytest.raises(ValidationError, match="mqtt_version"):
        MQTTModule(MQTTConfig(topic="ok"), entry, Pools())


async def test_an_overdue_acknowledgement_is_transient(
    mosquitto: MosquittoServer, pools: Pools
) -> None:
    sender = module(mosquitto, pools, topic="ok/frozen", timeout_seconds=0.5)
    await sender.deliver(message(JSON, 1))
    assert mosquitto.process is not None
    freeze(mosquitto.process.pid)  # alive, silent
    try:
        with pytest.raises(Transient):
            await sender.deliver(message(JSON, 2))
    finally:
        mosquitto.process.send_signal(signal.SIGCONT)
    async with subscribed(mosquitto, "ok/frozen") as client:
        await sender.deliver(message(JSON, 3))  # on a new session
        [got] = await receive(client, 1)
    assert user_properties(got)["message-id"] == "msg-3"


async def test_broker_down_is_transient_and_the_module_reconnects(
    mosquitto: MosquittoServer, pools: Pools
) -> None:
    sender = module(mosquitto, pools, topic="ok/survivor")
    await sender.deliver(message(JSON, 1))
    mosquitto.stop()
    late = module(mosquitto, Pools(), topic="ok/survivor")
    try:
        with pytest.raises(Transient):
            await sender.deliver(message(JSON, 2))
        await late.start()  # a broker down at start-up is not an error
        with pytest.raises(Transient):
            await late.deliver(message(JSON, 3))
    finally:
        mosquitto.start()
    async with subscribed(mosquitto, "ok/survivor") as client:
        await sender.deliver(message(JSON, 4))
        await late.deliver(message(BINARY, 5))
        got = await receive(client, 2)
    await late.pools.aclose()
    assert [user_properties(m)["message-id"] for m in got] == ["msg-4", "msg-5"]
    assert [m.payload for m in got] == [JSON, BINARY]
