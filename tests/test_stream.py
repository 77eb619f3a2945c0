"""The WebSocket endpoint against hostile and broken connectors (issue: the relay, bad input)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.servers import Cloud
from webhook_connect.cloud.buffers import open_buffer
from webhook_connect.shared.frames import NATIVE_SUBPROTOCOL, decode_native_batch

TOKEN = "stream-token-0123456789"
OTHER_TOKEN = "other-token-0123456789"
WEBHOOKS = {
    "dev": {
        "module": "webhook_connect",
        "data_type": "blob",
        "module-config": {
            "channel": "dev",
            "channel_token": TOKEN,
            "max_connections": 3,
            "retry_delay_seconds": 0.2,
        },
    },
    "other": {
        "module": "webhook_connect",
        "data_type": "blob",
        "module-config": {"channel": "other", "channel_token": OTHER_TOKEN},
    },
}


def ws_url(cloud: Cloud, channel: str = "dev", token: str = TOKEN, **query: str) -> str:
    params = "&".join(f"{k}={v}" for k, v in {"token": token, **query}.items())
    return f"ws://127.0.0.1:{cloud.port}/connect/stream/{channel}?{params}"


def post(cloud: Cloud, body: bytes, webhook: str = "dev") -> str:
    answer = httpx.post(f"{cloud.url}/webhook/{webhook}", content=body)
    assert answer.status_code == 202
    return str(answer.json()["message_id"])


async def frames(ws: ClientConnection, count: int, wait: float = 10) -> list[dict[str, Any]]:
    """The next ``count`` webhook frames (seed dialect), skipping heartbeats."""
    out: list[dict[str, Any]] = []
    while len(out) < count:
        frame = json.loads(await asyncio.wait_for(ws.recv(), wait))
        if frame["type"] == "webhook":
            out.append(frame)
    return out


async def close_code(ws: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), 30)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def test_seed_frames_ack_and_nack_like_the_core_webhook_module(cloud: Cloud) -> None:
    ids = [post(cloud, f'{{"n": {i}}}'.encode()) for i in range(3)]
    async with connect(ws_url(cloud), additional_headers={"X-Connector-ID": "cwm"}) as ws:
        hello = json.loads(await ws.recv())
        assert (hello["type"], hello["channel"]) == ("connected", "dev")
        first = await frames(ws, 3)
        assert [f["message_id"] for f in first] == ids
        assert [f["payload"] for f in first] == [{"n": 0}, {"n": 1}, {"n": 2}]
        await ws.send(json.dumps({"type": "ack", "message_id": ids[0]}))
        await ws.send(json.dumps({"type": "nack", "message_id": ids[1], "retry": False}))
        await ws.send(json.dumps({"type": "nack", "message_id": ids[2], "retry": True}))
        await ws.send(json.dumps({"type": "heartbeat"}))
        [again] = await frames(ws, 1)  # retry_delay_seconds later
        assert again["message_id"] == ids[2]
        await ws.send(json.dumps({"type": "ack", "message_id": ids[2]}))
        await asyncio.sleep(0.2)

    store = open_buffer(cloud.storage)
    try:
        [letter] = await store.dead_letters("dev")
        assert letter.message_id == ids[1]
        stats = await store.stats("dev")
        assert (stats.depth, stats.counters["delivered"]) == (0, 2)
    finally:
        await store.aclose()


async def test_native_frames_carry_exact_bytes_and_batched_acks(cloud: Cloud) -> None:
    bodies = [bytes(range(256)), b"", b"\xff\x00"]
    ids = [post(cloud, body) for body in bodies]
    native: Any = [NATIVE_SUBPROTOCOL]
    async with connect(ws_url(cloud), subprotocols=native) as ws:
        assert json.loads(await ws.recv())["protocol"] == "native"
        received = []
        while len(received) < 3:
            frame = await asyncio.wait_for(ws.recv(), 10)
            if isinstance(frame, bytes):
                received += decode_native_batch(frame)
        assert [m.envelope.body for m in received] == bodies
        await ws.send(json.dumps({"type": "ack", "message_ids": ids}))
        await ws.send(json.dumps({"type": "ack", "message_ids": ["nope-1"]}))
        error = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert error == {"type": "error", "error": "unknown_message", "message_ids": ["nope-1"]}


@pytest.mark.parametrize(
    ("frame", "reason"),
    [("garbage", "malformed frame"), (b"\x00\x01", "binary frames"), ('{"type": 1}', "unknown")],
)
async def test_garbage_frames_close_that_connection_only(
    cloud: Cloud, frame: str | bytes, reason: str
) -> None:
    async with connect(ws_url(cloud)) as good, connect(ws_url(cloud)) as bad:
        await good.recv()
        await bad.recv()
        await bad.send(frame)
        code, text = await close_code(bad)
        assert code == 4400 and reason in text
        message_id = post(cloud, b"still flowing")
        [delivered] = await frames(good, 1)
        assert delivered["message_id"] == message_id


async def test_an_oversize_frame_is_refused(cloud: Cloud) -> None:
    async with connect(ws_url(cloud), max_size=None) as ws:
        await ws.recv()
        try:
            await ws.send("x" * (2 * 1024 * 1024))
            code, _ = await close_code(ws)
        except ConnectionClosed as closed:  # the close may overtake our own send
            assert closed.rcvd is not None
            code = closed.rcvd.code
        assert code == 1009


async def test_tokens_open_exactly_their_channel(cloud: Cloud) -> None:
    for url in (
        ws_url(cloud, token="wrong"),
        ws_url(cloud, token=OTHER_TOKEN),
        ws_url(cloud, channel="nope"),
        ws_url(cloud, token=""),
    ):
        async with connect(url) as ws:
            code, reason = await close_code(ws)
            assert (code, reason) == (4001, "invalid token or channel")
    bearer = {"Authorization": f"Bearer {OTHER_TOKEN}"}
    async with connect(ws_url(cloud, channel="other", token=""), additional_headers=bearer) as ws:
        assert json.loads(await ws.recv())["channel"] == "other"
    async with connect(ws_url(cloud)) as ws:
        await ws.recv()
    assert "token=***" in cloud.log.read_text()
    assert TOKEN not in cloud.log.read_text(), "tokens in query strings are masked in logs"


async def test_max_connections_is_enforced(cloud: Cloud) -> None:
    url = ws_url(cloud)
    async with connect(url) as a, connect(url) as b, connect(url) as c:
        for ws in (a, b, c):
            assert json.loads(await ws.recv())["type"] == "connected"
        async with connect(url) as d:
            code, reason = await close_code(d)
            assert (code, reason) == (4003, "too many connections to this channel")
    # The cloud frees a slot when it has finished with a closed connection, a moment after
    # the client's close handshake returns; a connector that reconnects at once may be
    # refused once, and its next attempt gets in.
    deadline = time.monotonic() + 10
    while True:
        async with connect(url) as e:
            try:
                assert json.loads(await e.recv())["type"] == "connected"
                break
            except ConnectionClosed as refused:
                assert refused.rcvd is not None and refused.rcvd.code == 4003
                assert time.monotonic() < deadline, "the slots were never freed"
        await asyncio.sleep(0.1)


async def test_a_disconnect_returns_in_flight_messages_at_once(cloud: Cloud) -> None:
    ids = [post(cloud, f"m{i}".encode()) for i in range(5)]
    async with connect(ws_url(cloud, max_in_flight="5")) as first:
        await first.recv()
        assert [f["message_id"] for f in await frames(first, 5)] == ids
    started = time.monotonic()
    async with connect(ws_url(cloud)) as second:
        await second.recv()
        assert [f["message_id"] for f in await frames(second, 5)] == ids
    assert time.monotonic() - started < 5, "not after the 30 s ack timeout"


async def test_the_in_flight_window_bounds_what_a_connection_holds(cloud: Cloud) -> None:
    ids = [post(cloud, f"m{i}".encode()) for i in range(6)]
    async with connect(ws_url(cloud, max_in_flight="2")) as ws:
        assert json.loads(await ws.recv())["max_in_flight"] == 2
        first = await frames(ws, 2)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(frames(ws, 1), 1.0)
        await ws.send(json.dumps({"type": "ack", "message_id": first[0]["message_id"]}))
        [third] = await frames(ws, 1)
        assert third["message_id"] == ids[2]


@pytest.mark.parametrize("storage_url", ["sqlite"], indirect=True)
async def test_a_connector_that_never_reads_is_evicted(cloud: Cloud) -> None:
    for _ in range(40):
        post(cloud, b"x" * 500_000)
    slow = connect(ws_url(cloud), max_queue=1, max_size=None)
    async with slow, connect(ws_url(cloud, max_in_flight="1")) as healthy:
        await healthy.recv()
        # `slow` never reads: its socket buffers fill, it stops answering pings, and the cloud
        # evicts it within seconds; what it held goes to the healthy connection.
        started = time.monotonic()
        [frame] = await frames(healthy, 1, wait=30)
        assert time.monotonic() - started < 30
        await healthy.send(json.dumps({"type": "ack", "message_id": frame["message_id"]}))
        store = open_buffer(cloud.storage)
        try:
            assert len(await store.list_connections("dev")) == 1
        finally:
            await store.aclose()
