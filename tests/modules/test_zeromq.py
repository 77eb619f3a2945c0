"""``zeromq`` against real in-process pyzmq peers (PULL, SUB, ROUTER, REP) on loopback TCP."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import zmq
import zmq.asyncio
from pydantic import ValidationError

from tests.servers import free_port
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.modules.base import Message, Pools, Transient
from webhook_connect.shared.modules.zeromq import ZeroMQConfig, ZeroMQModule

JSON_BODY = b'{"event": "push", "ref": "refs/heads/main"}'
BINARY_BODY = b"\x00\xff\xfe binary \x80\x81 not utf-8"
HEADERS = (("Content-Type", "application/json"), ("X-Hub-Signature-256", "sha256=abc"))


def message(body: bytes, message_id: str = "1700000000000-0") -> Message:
    envelope = Envelope("ch", "github", 1700000000.5, "POST", "/hook", "a=1", HEADERS, body)
    return Message.of(message_id, 1, envelope)


class Peers:
    """The test's pyzmq peers, in a context of their own (as another process would have)."""

    def __init__(self) -> None:
        self.context = zmq.asyncio.Context()
        self.sockets: list[zmq.asyncio.Socket] = []

    def open(self, kind: int, port: int, bind: bool = True) -> zmq.asyncio.Socket:
        sock = self.context.socket(kind)
        self.sockets.append(sock)
        sock.setsockopt(zmq.LINGER, 0)
        if bind:
            sock.bind(f"tcp://127.0.0.1:{port}")
        else:
            sock.connect(f"tcp://127.0.0.1:{port}")
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)
        self.context.term()


@pytest.fixture
def peers() -> Iterator[Peers]:
    opened = Peers()
    yield opened
    opened.close()


async def started(pools: Pools, **config: Any) -> ZeroMQModule:
    module = ZeroMQModule(ZeroMQConfig.model_validate(config), None, pools)
    await module.start()
    return module


async def receive(sock: zmq.asyncio.Socket) -> list[bytes]:
    async with asyncio.timeout(5):
        return list(await sock.recv_multipart())


async def test_push_sends_metadata_and_exact_body(peers: Peers, pools: Pools) -> None:
    port = free_port()
    pull = peers.open(zmq.PULL, port)
    module = await started(pools, endpoint=f"tcp://127.0.0.1:{port}", socket_type="push")
    await module.deliver(message(BINARY_BODY))
    await module.deliver(message(JSON_BODY, "2-0"))

    metadata, body = await receive(pull)
    assert body == BINARY_BODY
    meta = orjson.loads(metadata)
    assert meta["message_id"] == "1700000000000-0" and meta["webhook_id"] == "github"
    assert meta["headers"] == [list(pair) for pair in HEADERS]
    assert meta["query_string"] == "a=1" and meta["received_at"] == 1700000000.5
    metadata, body = await receive(pull)
    assert body == JSON_BODY and orjson.loads(metadata)["message_id"] == "2-0"


async def test_pub_binds_and_prefixes_the_topic(peers: Peers, pools: Pools) -> None:
    port = free_port()
    module = await started(pools, endpoint=f"tcp://127.0.0.1:{port}", bind=True)  # PUB
    sub = peers.open(zmq.SUB, port, bind=False)
    sub.setsockopt(zmq.SUBSCRIBE, b"github")
    # PUB drops what it sends before the subscription arrives: publish until one gets through.
    async with asyncio.timeout(5):
        while not await sub.poll(50):
            await module.deliver(message(BINARY_BODY))
    topic, metadata, body = await receive(sub)
    assert (topic, body) == (b"github", BINARY_BODY)
    assert orjson.loads(metadata)["webhook_id"] == "github"

    raw = await started(
        pools, endpoint=f"tcp://127.0.0.1:{port}", bind=True, topic="github.raw", format="raw"
    )  # shares the bound socket
    await raw.deliver(message(JSON_BODY))
    async with asyncio.timeout(5):
        while (received := await receive(sub))[0] != b"github.raw":
            pass
    assert received == [b"github.raw", JSON_BODY]


async def test_dealer_reaches_a_router(peers: Peers, pools: Pools) -> None:
    port = free_port()
    router = peers.open(zmq.ROUTER, port)
    module = await started(pools, endpoint=f"tcp://127.0.0.1:{port}", socket_type="DEALER")
    await module.deliver(message(BINARY_BODY))
    identity, metadata, body = await receive(router)
    assert identity and body == BINARY_BODY and orjson.loads(metadata)["channel"] == "ch"


async def test_req_waits_for_the_reply(peers: Peers, pools: Pools) -> None:
    port = free_port()
    rep = peers.open(zmq.REP, port)
    endpoint = f"tcp://127.0.0.1:{port}"
    module = await started(pools, endpoint=endpoint, socket_type="REQ", timeout=0.5)

    async def answer(reply: bool) -> list[bytes]:
        request = await receive(rep)
        if reply:
            await rep.send(b"ok")
        return request

    delivered, request = await asyncio.gather(
        module.deliver(message(BINARY_BODY)), answer(reply=True)
    )
    assert request[1] == BINARY_BODY

    unanswered = asyncio.create_task(answer(reply=False))
    with pytest.raises(Transient, match="no reply within 0.5s"):
        await module.deliver(message(JSON_BODY))
    await unanswered
    await rep.send(b"late")  # REP must answer before it may receive again; REQ drops it

    _, request = await asyncio.gather(module.deliver(message(JSON_BODY, "3-0")), answer(True))
    assert orjson.loads(request[0])["message_id"] == "3-0"


async def test_no_peer_then_peer_without_recreating_the_module(peers: Peers, pools: Pools) -> None:
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    module = await started(pools, endpoint=endpoint, socket_type="PUSH", format="raw", timeout=0.3)
    with pytest.raises(Transient, match="no peer took the message within 0.3s"):
        await module.deliver(message(b"lost"))

    pull = peers.open(zmq.PULL, port)
    await module.deliver(message(b"first"))
    assert await receive(pull) == [b"first"]  # not b"lost": a timed-out send is withdrawn

    pull.close(linger=0)
    with pytest.raises(Transient):
        async with asyncio.timeout(5):
            while True:  # until ZeroMQ notices the peer is gone, sends may still be queued
                await module.deliver(message(b"maybe lost"))

    pull = peers.open(zmq.PULL, port)
    await module.deliver(message(b"second"))
    async with asyncio.timeout(5):
        while (received := await receive(pull)) != [b"second"]:
            assert received == [b"maybe lost"]


def test_config_is_validated() -> None:
    for endpoint in ("http://host:1", "tcp://host", "inproc://x", "tcp://h:1 x"):
        with pytest.raises(ValidationError, match="should match pattern"):
            ZeroMQConfig.model_validate({"endpoint": endpoint})
    with pytest.raises(ValidationError, match="'PUB', 'PUSH', 'DEALER' or 'REQ'"):
        ZeroMQConfig.model_validate({"endpoint": "tcp://h:1", "socket_type": "SUB"})
    with pytest.raises(ValidationError, match='"topic" applies to "socket_type": "PUB" only'):
        ZeroMQConfig.model_validate({"endpoint": "tcp://h:1", "socket_type": "PUSH", "topic": "t"})
    config = ZeroMQConfig.model_validate({"endpoint": "tcp://*:5555", "socket_type": "push"})
    assert config.socket_type == "PUSH" and not config.bind
