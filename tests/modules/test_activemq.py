"""``activemq`` against a real ActiveMQ broker (STOMP connector on a free port), read back with a
raw STOMP subscriber; and the STOMP frame codec on its own."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.servers import free_port, freeze, running, stop, wait_until
from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.modules.activemq import ActiveMQConfig, ActiveMQModule
from webhook_connect.shared.modules.base import Message, Permanent, Pools, Transient
from webhook_connect.shared.modules.stomp import Frame, FrameParser, StompFrameError, encode

BINARY = b"\x00\xff\xfe binary \x80\x81\r\n\x00"
JSON = b'{"event": "paid", "amount": 12.5, "name": "Zo\xc3\xab"}'
ACTIVEMQ_HOME = Path("/usr/share/activemq")
# Authenticated producers may write to ok.* only: anything else is refused per SEND.
BROKER_XML = """\
<beans xmlns="http://www.springframework.org/schema/beans"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xsi:schemaLocation="http://www.springframework.org/schema/beans
    http://www.springframework.org/schema/beans/spring-beans.xsd
    http://activemq.apache.org/schema/core
    http://activemq.apache.org/schema/core/activemq-core.xsd">
  <broker xmlns="http://activemq.apache.org/schema/core" brokerName="test" useJmx="false"
          dataDirectory="{data}" schedulerSupport="false" advisorySupport="false">
    <plugins>
      <simpleAuthenticationPlugin>
        <users><authenticationUser username="writer" password="secret" groups="writers"/></users>
      </simpleAuthenticationPlugin>
      <authorizationPlugin><map><authorizationMap><authorizationEntries>
        <authorizationEntry queue="ok.>" read="writers" write="writers" admin="writers"/>
        <authorizationEntry topic="ok.>" read="writers" write="writers" admin="writers"/>
      </authorizationEntries></authorizationMap></map></authorizationPlugin>
    </plugins>
    <transportConnectors>
      <transportConnector name="stomp" uri="stomp://127.0.0.1:{port}"/>
    </transportConnectors>
  </broker>
</beans>
"""


class ActiveMQServer:
    """The Debian activemq broker in a JVM of our own, with a KahaDB store in ``directory``."""

    def __init__(self, directory: Path) -> None:
        java = shutil.which("java")
        if java is None or not (ACTIVEMQ_HOME / "bin" / "activemq.jar").exists():
            raise RuntimeError("activemq is not installed: run scripts/test (it installs it)")
        self.java = java
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def connection(self, password: str = "secret") -> ConnectionEntry:
        return ConnectionEntry(
            type="activemq",
            host="127.0.0.1",
            port=self.port,
            username="writer",
            password=password,
            connect_timeout=3,
        )

    def start(self) -> None:
        conf = self.directory / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        xml = conf / "activemq.xml"
        data = self.directory / "data"
        xml.write_text(BROKER_XML.format(data=data, port=self.port))
        args = [
            self.java,
            "-Xms64m",
            "-Xmx256m",
            "-XX:TieredStopAtLevel=1",
            "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            f"-Dactivemq.home={ACTIVEMQ_HOME}",
            f"-Dactivemq.base={self.directory}",
            f"-Dactivemq.conf={conf}",
            f"-Dactivemq.data={data}",
            f"-Djava.io.tmpdir={self.directory}",
            "-jar",
            str(ACTIVEMQ_HOME / "bin" / "activemq.jar"),
            "start",
            f"xbean:file:{xml}",
        ]
        with (self.directory / "broker.log").open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._answers, timeout=60, what=f"activemq on port {self.port}")

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"activemq exited, see {self.directory / 'broker.log'}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(
                b"CONNECT\naccept-version:1.2\nhost:x\nlogin:writer\npasscode:secret\n\n\x00"
            )
            return sock.recv(16).startswith(b"CONNECTED")

    def stop(self) -> None:
        """Kill the JVM: what it acknowledged is in its journal, a restart recovers it."""
        if self.process is not None:
            stop(self.process, signal.SIGKILL)
            self.process = None


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ActiveMQServer]:
    with running(ActiveMQServer(tmp_path_factory.mktemp("activemq"))) as server:
        yield server


def message(body: bytes, number: int = 1, *extra: tuple[str, str]) -> Message:
    headers = (("Content-Type", "application/json"), ("X-Trace", "a:b"), *extra)
    envelope = Envelope(
        "orders", "stripe", 1_700_000_000.25, "POST", "/webhook/stripe", "a=1", headers, body
    )
    return Message.of(f"msg-{number}", 1, envelope)


def module(server: ActiveMQServer, pools: Pools, **config: object) -> ActiveMQModule:
    return ActiveMQModule(ActiveMQConfig.model_validate(config), server.connection(), pools)


def unescape(value: str) -> str:
    names = {"c": ":", "n": "\n", "r": "\r", "\\": "\\"}
    return re.sub(r"\\(.)", lambda match: names[match.group(1)], value)


class Subscriber:
    """A raw STOMP consumer, written apart from the module's codec on purpose."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, server: ActiveMQServer, destination: str) -> Subscriber:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"CONNECT\naccept-version:1.2\nhost:x\nlogin:writer\npasscode:secret\n\n\x00")
        writer.write(f"SUBSCRIBE\nid:0\ndestination:{destination}\nreceipt:s\n\n\x00".encode())
        subscriber = cls(reader, writer)
        assert (await subscriber.frame())[0] == "CONNECTED"
        assert (await subscriber.frame())[0] == "RECEIPT"
        return subscriber

    async def frame(self) -> tuple[str, dict[str, str], bytes]:
        head = (await self.reader.readuntil(b"\n\n")).decode().lstrip("\n")
        command, *lines = head.strip("\n").split("\n")
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers.setdefault(unescape(name), unescape(value))
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
            assert await self.reader.readexactly(1) == b"\x00"
        else:
            body = (await self.reader.readuntil(b"\x00"))[:-1]
        return command, headers, body

    async def messages(self, count: int, close: bool = True) -> list[tuple[dict[str, str], bytes]]:
        got: list[tuple[dict[str, str], bytes]] = []
        async with asyncio.timeout(10):
            while len(got) < count:
                command, headers, body = await self.frame()
                assert command == "MESSAGE", (command, body)
                got.append((headers, body))
        if close:
            self.writer.close()
        return got


async def test_bodies_arrive_byte_exact_with_metadata(broker: ActiveMQServer, pools: Pools) -> None:
    sender = module(broker, pools, destination="ok.exact")
    await sender.start()
    await sender.deliver(message(BINARY, 1))
    await sender.deliver(message(JSON, 2))

    subscriber = await Subscriber.open(broker, "/queue/ok.exact")
    (first, first_body), (second, second_body) = await subscriber.messages(2)
    assert (first_body, second_body) == (BINARY, JSON)
    assert first["persistent"] == "true"
    assert first["content-type"] == "application/json"
    assert first["webhook-connect-message-id"] == "msg-1"
    assert second["webhook-id"] == "stripe"
    assert second["channel"] == "orders"
    assert second["received-at"] == "2023-11-14T22:13:20.250000Z"
    assert json.loads(second["headers"]) == [
        ["Content-Type", "application/json"],
        ["X-Trace", "a:b"],
    ]


async def test_a_topic(broker: ActiveMQServer, pools: Pools) -> None:
    subscriber = await Subscriber.open(broker, "/topic/ok.events")
    await module(broker, pools, destination="ok.events", destination_type="topic").deliver(
        message(JSON)
    )
    [(headers, body)] = await subscriber.messages(1)
    assert (headers["destination"], body) == ("/topic/ok.events", JSON)


async def test_a_refused_send_is_permanent_and_the_session_goes_on(
    broker: ActiveMQServer, pools: Pools
) -> None:
    with pytest.raises(Permanent, match="not authorized to write"):
        await module(broker, pools, destination="secret").deliver(message(JSON, 1))
    await module(broker, pools, destination="ok.after").deliver(message(JSON, 2))
    [(headers, _)] = await (await Subscriber.open(broker, "/queue/ok.after")).messages(1)
    assert headers["webhook-connect-message-id"] == "msg-2"


async def test_oversized_original_headers_are_left_out(
    broker: ActiveMQServer, pools: Pools
) -> None:
    big = message(JSON, 1, ("Cookie", "c" * 20_000))
    await module(broker, pools, destination="ok.big").deliver(big)
    [(headers, body)] = await (await Subscriber.open(broker, "/queue/ok.big")).messages(1)
    assert body == JSON
    assert "headers" not in headers
    assert "ActiveMQ header line limit" in headers["headers-omitted"]


async def test_a_refused_login_is_transient(broker: ActiveMQServer, pools: Pools) -> None:
    config = ActiveMQConfig(destination="ok.login")
    sender = ActiveMQModule(config, broker.connection(password="wrong"), pools)
    await sender.start()  # logs, does not raise
    with pytest.raises(Transient, match="refused the session"):
        await sender.deliver(message(JSON))


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({}, "destination"),
        ({"destination": "a b"}, "destination"),
        ({"destination": "q", "destination_type": "exchange"}, "destination_type"),
        ({"destination": "q", "queue_name": "q"}, "queue_name"),
    ],
)
def test_a_bad_module_config_is_refused(config: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        ActiveMQConfig.model_validate(config)


async def test_broker_down_is_transient_and_the_module_reconnects(
    broker: ActiveMQServer, pools: Pools
) -> None:
    sender = module(broker, pools, destination="ok.survivor")
    await sender.deliver(message(BINARY, 1))  # persistent: in the journal before the receipt
    broker.stop()
    late = module(broker, Pools(), destination="ok.survivor")
    try:
        with pytest.raises(Transient):
            await sender.deliver(message(JSON, 2))
        await late.start()  # a broker down at start-up is not an error
        with pytest.raises(Transient):
            await late.deliver(message(JSON, 3))
    finally:
        broker.start()
    await sender.deliver(message(JSON, 4))
    await late.deliver(message(JSON, 5))
    await late.pools.aclose()
    got = await (await Subscriber.open(broker, "/queue/ok.survivor")).messages(3)
    assert [(h["webhook-connect-message-id"], body) for h, body in got] == [
        ("msg-1", BINARY),
        ("msg-4", JSON),
        ("msg-5", JSON),
    ]


async def test_an_overdue_receipt_is_transient(broker: ActiveMQServer, pools: Pools) -> None:
    sender = module(broker, pools, destination="ok.frozen", timeout_seconds=0.5)
    await sender.deliver(message(JSON, 1))
    assert broker.process is not None
    freeze(broker.process.pid)  # alive, silent
    try:
        with pytest.raises(Transient):
            await sender.deliver(message(JSON, 2))
    finally:
        broker.process.send_signal(signal.SIGCONT)
    await sender.deliver(message(JSON, 3))  # on a new session
    subscriber = await Subscriber.open(broker, "/queue/ok.frozen")
    seen: set[str] = set()
    while not {"msg-1", "msg-3"} <= seen:  # msg-2 may have made it too, in any order
        [(headers, _)] = await subscriber.messages(1, close=False)
        seen.add(headers["webhook-connect-message-id"])
    subscriber.writer.close()


# The frame codec, without a broker.


def test_frames_are_parsed_whatever_the_chunking() -> None:
    wire = (
        b"\n\r\nCONNECTED\nversion:1.2\nserver:x:y\n\n\x00\n"  # heart-beats, a raw colon
        b"RECEIPT\nreceipt-id:7\n\n\x00"
        b"MESSAGE\ncontent-length:4\nx-h:a\\cb\\\\\\n\n\n\x00\x01\x00\xff\x00"
        b"ERROR\r\nmessage:no\r\n\r\nbecause\x00"
    )
    for size in (1, 2, 3, len(wire)):
        parser = FrameParser()
        frames = [f for i in range(0, len(wire), size) for f in parser.feed(wire[i : i + size])]
        assert frames == [
            Frame("CONNECTED", (("version", "1.2"), ("server", "x:y"))),
            Frame("RECEIPT", (("receipt-id", "7"),)),
            Frame("MESSAGE", (("content-length", "4"), ("x-h", "a:b\\\n")), b"\x00\x01\x00\xff"),
            Frame("ERROR", (("message", "no"),), b"because"),
        ]


def test_send_frames_escape_headers_and_keep_the_body() -> None:
    frame = Frame("SEND", (("x:h", "a\nb\\c\r"), ("content-length", "2")), b"\x00\n")
    assert encode(frame) == b"SEND\nx\\ch:a\\nb\\\\c\\r\ncontent-length:2\n\n\x00\n\x00"
    assert FrameParser().feed(encode(frame)) == [frame]
    connect = Frame("CONNECT", (("passcode", "a:b"),))
    assert encode(connect) == b"CONNECT\npasscode:a:b\n\n\x00"


@pytest.mark.parametrize(
    "wire",
    [
        b"MESSAGE\nx:\\t\n\n\x00",  # undefined escape
        b"MESSAGE\ncontent-length:1\n\nab\x00",  # no NUL where content-length says
        b"MESSAGE\ncontent-length:x\n\n\x00",
        b"MESSAGE\nno colon\n\n\x00",
        b"MESSAGE\nx:\xff\n\n\x00",  # not UTF-8
    ],
)
def test_malformed_frames_are_refused(wire: bytes) -> None:
    with pytest.raises(StompFrameError):
        FrameParser().feed(wire)
