"""A 202 is a promise: SIGKILL the cloud (or Redis) right after and nothing accepted is lost."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx

from tests.servers import Cloud, RedisServer
from tests.test_ingest import read_all, write_webhooks


async def post_many(url: str, count: int) -> dict[str, bytes]:
    """POST ``count`` distinct bodies concurrently; return message id -> body for each 202."""
    accepted: dict[str, bytes] = {}
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def post(i: int) -> None:
            body = f"message {i} ".encode() + bytes([i % 256]) * 64
            answer = await client.post(f"{url}/webhook/blob", content=body)
            if answer.status_code == 202:
                accepted[answer.json()["message_id"]] = body

        await asyncio.gather(*(post(i) for i in range(count)))
    return accepted


def assert_all_stored(storage_url: str, accepted: dict[str, bytes]) -> None:
    stored = {d.message_id: d.envelope.body for d in read_all(storage_url)}
    missing = set(accepted) - set(stored)
    assert not missing, f"{len(missing)} accepted messages lost"
    assert all(stored[i] == body for i, body in accepted.items())


def test_sigkill_of_the_cloud_after_202_loses_nothing(storage_url: str, tmp_path: Path) -> None:
    cloud = Cloud(storage_url, write_webhooks(tmp_path), tmp_path)
    cloud.start()
    try:
        accepted = asyncio.run(post_many(cloud.url, 500))
        assert len(accepted) == 500
        cloud.stop(signal.SIGKILL)
    finally:
        cloud.stop()
    assert_all_stored(storage_url, accepted)


def test_sigkill_of_redis_after_202_loses_nothing(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path / "redis")  # appendonly yes, appendfsync always
    redis_server.start()
    cloud = Cloud(redis_server.url, write_webhooks(tmp_path), tmp_path)
    try:
        cloud.start()
        accepted = asyncio.run(post_many(cloud.url, 300))
        redis_server.stop(signal.SIGKILL)
        redis_server.start()
        assert_all_stored(redis_server.url, accepted)
    finally:
        cloud.stop()
        redis_server.stop()
