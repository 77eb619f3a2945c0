"""``websocket`` against a real in-process ``websockets`` server that records what it receives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

import orjson
import pytest
from pydantic import ValidationError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from tests.servers import free_port
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.modules.base import Message, Permanent, Pools, Transient
from webhook_connect.shared.modules.websocket import WebSocketConfig, WebSocketModule

JSON_BODY = b'{"event": "push", "caf\xc3\xa9": [1, 2]}'
BINARY_BODY = b"\x00\xff\xfe binary \x80\x81 not utf-8"
HEADERS = (("Content-Type", "application/json"), ("X-Hub-Signature-256", "sha256=abc"))


def message(body: bytes, message_id: str = "1700000000000-0") -> Message:
    envelope = Envelope("ch", "github", 1700000000.5, "POST", "/hook", "", HEADERS, body)
    return Message.of(message_id, 1, envelope)


class Peer:
    """A WebSocket server recording each message and, optionally, answering it."""

    def __init__(self, port: int, answer: bytes | None = None, max_size: int = 2**20) -> None:
        self.port, self.answer, self.max_size = port, answer, max_size
        self.received: list[str | bytes] = []
        self.handshakes: list[Request] = []
        self.refuse: HTTPStatus | None = None
        self.server: Server | None = None
        self._arrived = asyncio.Event()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/hooks"

    async def start(self) -> None:
        self.server = await serve(
            self._handle,
            "127.0.0.1",
            self.port,
            max_size=self.max_size,
            process_request=self._check,
        )

    def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        self.handshakes.append(request)
        if self.refuse is not None:
            return connection.respond(self.refuse, "refused\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        async for data in ws:
            self.received.append(data)
            self._arrived.set()
            if self.answer is not None:
                await ws.send(self.answer)

    async def wait_for(self, count: int) -> None:
        """Wait until ``count`` messages have arrived."""
        async with asyncio.timeout(5):
            while len(self.received) < count:
                self._arrived.clear()
                await self._arrived.wait()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    server = Peer(free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def module(pools: Pools, **config: Any) -> WebSocketModule:
    return WebSocketModule(WebSocketConfig.model_validate(config), None, pools)


async def test_raw_bytes_in_binary_and_text_frames(peer: Peer, pools: Pools) -> None:
    binary = module(pools, url=peer.url, format="raw", headers={"Authorization": "Bearer t"})
    text = module(pools, url=peer.url, format="raw", frame="text")
    await binary.deliver(message(BINARY_BODY))
    await text.deliver(message(JSON_BODY))
    await text.deliver(message(BINARY_BODY))  # not UTF-8: stays binary, bytes exact
    await peer.wait_for(3)
    assert peer.received == [BINARY_BODY, JSON_BODY.decode(), BINARY_BODY]
    assert [r.headers.get("Authorization") for r in peer.handshakes] == ["Bearer t", None]


async def test_json_envelope(peer: Peer, pools: Pools) -> None:
    sender = module(pools, url=peer.url, include_headers=True)
    await sender.deliver(message(JSON_BODY))
    await sender.deliver(message(BINARY_BODY, "2-0"))
    await peer.wait_for(2)
    first, second = (orjson.loads(data) for data in peer.received)
    assert all(isinstance(data, str) for data in peer.received)
    assert first["payload"] == orjson.loads(JSON_BODY)
    assert first["headers"]["x-hub-signature-256"] == "sha256=abc"
    assert first["message_id"] == "1700000000000-0" and first["webhook_id"] == "github"
    assert second["payload"] is None and second["message_id"] == "2-0"
    assert second["body_base64"] == "AP/+IGJpbmFyeSCAgSBub3QgdXRmLTg="


async def test_concurrent_deliveries_share_one_connection(peer: Peer, pools: Pools) -> None:
    senders = [module(pools, url=peer.url, format="raw") for _ in range(2)]
    bodies = [b"%d" % n for n in range(200)]
    await asyncio.gather(*(senders[n % 2].deliver(message(b)) for n, b in enumerate(bodies)))
    await peer.wait_for(200)
    assert sorted(peer.received) == sorted(bodies)
    assert len(peer.handshakes) == 1


async def test_wait_for_response(pools: Pools) -> None:
    answering = Peer(free_port(), answer=b"ok")
    silent = Peer(free_port())
    await answering.start()
    await silent.start()
    try:
        confirmed = module(pools, url=answering.url, format="raw", wait_for_response=True)
        await asyncio.gather(*(confirmed.deliver(message(b"%d" % n)) for n in range(20)))
        assert len(answering.received) == 20  # every one arrived before deliver returned

        unanswered = module(pools, url=silent.url, wait_for_response=True, timeout=0.3)
        with pytest.raises(Transient, match="no answer"):
            await unanswered.deliver(message(JSON_BODY))
    finally:
        await answering.stop()
        await silent.stop()


async def test_refusals_are_permanent(pools: Pools) -> None:
    small = Peer(free_port(), answer=b"ok", max_size=16)
    await small.start()
    try:
        sender = module(pools, url=small.url, format="raw", wait_for_response=True)
        await sender.deliver(message(b"short"))
        with pytest.raises(Permanent, match="code 1009"):  # message too big
            await sender.deliver(message(BINARY_BODY))
        await sender.deliver(message(b"short again"))  # reconnected

        small.refuse = HTTPStatus.FORBIDDEN
        forbidden = module(pools, url=small.url.replace("/hooks", "/other"))
        with pytest.raises(Permanent, match="HTTP 403"):
            await forbidden.deliver(message(JSON_BODY))
        small.refuse = HTTPStatus.SERVICE_UNAVAILABLE
        with pytest.raises(Transient, match="HTTP 503"):
            await forbidden.deliver(message(JSON_BODY))
    finally:
        await small.stop()


async def test_server_down_then_back_without_recreating_the_module(pools: Pools) -> None:
    peer = Peer(free_port())
    sender = module(pools, url=peer.url, format="raw")
    await sender.start()
    with pytest.raises(Transient, match="unavailable"):
        await sender.deliver(message(b"lost"))
    await peer.start()
    try:
        await sender.deliver(message(b"first"))
        await peer.wait_for(1)
        assert peer.received == [b"first"]
        await peer.stop()  # drops the open connection
        with pytest.raises(Transient):
            await sender.deliver(message(b"while down"))
        peer.received.clear()
        await peer.start()
        await sender.deliver(message(b"second"))
        await peer.wait_for(1)
        assert peer.received == [b"second"]
        assert len(peer.handshakes) == 2
    finally:
        await peer.stop()


def test_config_is_validated() -> None:
    with pytest.raises(ValidationError, match="should match pattern"):
        WebSocketConfig.model_validate({"url": "http://example.com/ws"})
    with pytest.raises(ValidationError, match="Field required"):
        WebSocketConfig.model_validate({})
    with pytest.raises(ValidationError, match='"frame" applies to "format": "raw" only'):
        WebSocketConfig.model_validate({"url": "ws://h/", "frame": "text"})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        WebSocketConfig.model_validate({"url": "ws://h/", "retries": 2})
