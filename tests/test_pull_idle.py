"""Idle SSE and long-poll connections: empty reads space out, and a new message still comes at
once.

Thousands of connectors idle on one cloud process; each reading storage every second would
cost thousands of reads a second. Reads are counted where they happen, at a real Redis
(``MONITOR``), while a real cloud serves one idle connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from tests.servers import Cloud, running
from webhook_connect.cloud.buffers import Buffer, ChannelSpec, ConnectionRecord, Delivery
from webhook_connect.cloud.buffers.scripts import load_scripts
from webhook_connect.cloud.pull import IdleReads, Puller
from webhook_connect.cloud.sessions import Connection
from webhook_connect.cloud.stream import IDLE_WAIT, IDLE_WAIT_MAX
from webhook_connect.shared.envelope import Envelope

TOKEN = "idle-pull-token-0123456789"
WEBHOOKS = {
    "idle": {
        "module": "webhook_connect",
        "module-config": {"channel": "idle", "channel_token": TOKEN},
    },
}
AUTH = {"Authorization": f"Bearer {TOKEN}", "X-Webhook-Connect-Protocol": "webhook-connect.v1"}
READ_SCRIPT = hashlib.sha1(load_scripts()["read"].encode()).hexdigest()
# Seconds an idle connection is watched. Reading every second, as before, makes 10 or 11
# reads in them; spaced out 1 s, 2 s, then 3 s (the heartbeat every 5 s ends a wait early),
# 5 or 6. A loaded machine only makes fewer.
WATCHED = 10.0
MOST_READS = 7


@pytest.fixture
def redis_cloud(redis_url: str, tmp_path: Path) -> Iterator[Cloud]:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    with running(Cloud(redis_url, path, tmp_path)) as server:
        yield server


@contextlib.asynccontextmanager
async def counted_reads(redis_url: str) -> AsyncIterator[list[float]]:
    """When (monotonic) the buffer's read script ran, as Redis's ``MONITOR`` saw it."""
    client = aioredis.Redis.from_url(redis_url)
    reads: list[float] = []
    watching = asyncio.Event()

    async def watch() -> None:
        async with client.monitor() as monitor:
            watching.set()
            async for command in monitor.listen():
                if str(command.get("command", "")).startswith(f"EVALSHA {READ_SCRIPT}"):
                    reads.append(time.monotonic())

    task = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(watching.wait(), 10)
        yield reads
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()


def test_empty_reads_space_out_and_an_announced_change_is_read_at_once() -> None:
    idle, reads, now = IdleReads(), [], 0.0
    while now < 15:
        if idle.is_due(7, now):
            reads.append(now)
            idle.found_nothing(7, now)
        now = round(now + 0.5, 1)
    assert reads == [0, 1, 3, 6, 9, 12]  # 1 s, 2 s, then every IDLE_WAIT_MAX (3 s)
    assert idle.wait == IDLE_WAIT_MAX
    assert idle.is_due(8, now), "a change announced since the empty read is read at once"
    idle.found_nothing(8, now)  # someone else took it: no longer wait, and no shorter
    assert idle.wait == IDLE_WAIT_MAX and not idle.is_due(8, now + 2.9)
    idle.found()
    assert idle.is_due(8, now) and idle.wait == IDLE_WAIT
    idle.found_nothing(8, now)
    assert not idle.is_due(8, now + 0.9) and idle.is_due(8, now + 1.0)


def within(reads: list[float], start: float, seconds: float) -> int:
    return sum(1 for t in reads if start <= t <= start + seconds)


async def test_an_idle_sse_stream_reads_storage_less_and_less(
    redis_cloud: Cloud, redis_url: str
) -> None:
    url = f"{redis_cloud.url}/connect/stream/idle/sse"
    async with counted_reads(redis_url) as reads, httpx.AsyncClient(timeout=30) as client:
        async with client.stream("GET", url, headers=AUTH) as stream:
            assert stream.status_code == 200
            lines = stream.aiter_lines()
            while "connected" not in await anext(lines):
                pass
            start = time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WATCHED + 0.5):
                    async for _ in lines:  # heartbeats, until the watch ends
                        pass
    assert 2 <= within(reads, start - 1, WATCHED + 1) <= MOST_READS + 1, reads
    assert within(reads, start, WATCHED) <= MOST_READS, [t - start for t in reads]


async def test_an_idle_long_poll_reads_storage_less_and_less(
    redis_cloud: Cloud, redis_url: str
) -> None:
    poll = f"{redis_cloud.url}/connect/stream/idle/poll"
    async with counted_reads(redis_url) as reads, httpx.AsyncClient(timeout=60) as client:
        first = await client.get(poll, params={"timeout": 1}, headers=AUTH)
        assert first.status_code == 204
        headers = {**AUTH, "X-Connection-ID": first.headers["x-connection-id"]}
        start = time.monotonic()
        answer = await client.get(poll, params={"timeout": int(WATCHED)}, headers=headers)
        assert answer.status_code == 204
    assert within(reads, start, WATCHED) <= MOST_READS, [t - start for t in reads]


def envelope(body: bytes) -> Envelope:
    return Envelope(
        channel="idle",
        webhook_id="idle",
        received_at=time.time(),
        method="POST",
        path="/webhook/idle",
        query_string="",
        headers=(("content-type", "application/json"),),
        body=body,
    )


class EmptyReadSeen:
    """The buffer under test, telling when a read found nothing."""

    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer
        self.empty = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.buffer, name)

    async def read(self, channel: str, group: str, consumer: str, count: int) -> list[Delivery]:
        found = await self.buffer.read(channel, group, consumer, count)
        if not found:
            self.empty.set()
        return found


async def test_a_message_wakes_a_backed_off_pull_at_once(buffer: Buffer) -> None:
    """However far the empty reads have spaced out, an append is announced and read at once;
    and a read that finds something starts the spacing over."""
    await buffer.provision(ChannelSpec("idle"))
    record = ConnectionRecord("conn-idle", "idle", "default")
    assert await buffer.add_connection(record, 10)
    seen = EmptyReadSeen(buffer)
    connection = Connection(record, ChannelSpec("idle"), 10)
    puller = Puller(seen, connection, idle=IdleReads(longest=60, wait=60))  # a long idle spell
    started = time.monotonic()
    batch = asyncio.create_task(puller.next_batch(10, started + 120))
    await asyncio.wait_for(seen.empty.wait(), 10)  # the pull now waits up to 60 s
    message_id = await buffer.append(envelope(b"wake"))
    [message] = await asyncio.wait_for(batch, 30)
    assert message.message_id == message_id
    assert time.monotonic() - started < 30, "woken by the append, not by the 60 s wait"
    assert puller.idle.wait == IDLE_WAIT
