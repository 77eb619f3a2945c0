"""``redis_rq`` and ``redis_publish`` against a real redis-server, read back by independent
clients: rq's own ``Queue``/``Job``/``SimpleWorker`` for jobs, a pub/sub subscriber, XRANGE."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio
from pydantic import ValidationError
from rq import Queue, SimpleWorker, get_current_job
from rq.job import Job, JobStatus

from tests.servers import RedisServer, running
from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.modules.base import Message, Module, Permanent, Pools, Transient
from webhook_connect.shared.modules.redis import (
    PublishConfig,
    RedisPublishModule,
    RedisRQModule,
    RedisSettings,
    RQConfig,
    job_id,
)

JSON_BODY = b'{"event": "push", "ref": "refs/heads/main", "n": 1}'
BINARY_BODY = b"\x00\xff\xfe binary \x80\x81 not utf-8"
HEADERS = (("Content-Type", "application/json"), ("X-Hub-Signature-256", "sha256=abc"))
FUNCTION = "tests.modules.test_redis_modules.record_call"


def record_call(payload: Any, headers: dict[str, str]) -> dict[str, Any]:
    """The job function an rq worker runs: returns what it was given."""
    job = get_current_job()
    assert job is not None
    return {"payload": payload, "headers": headers, "meta": job.meta}


class Worker(SimpleWorker):
    """rq's in-process worker without its pub/sub listener (remote commands, unused here).
    Stopping that listener sometimes hung for its 60 s wait on a loaded machine, and the jobs
    (``result_ttl`` 60) had expired by the time the test looked at them."""

    def subscribe(self) -> None:
        pass

    def unsubscribe(self) -> None:
        pass


def message(body: bytes, message_id: str = "1700000000000-0", channel: str = "ch") -> Message:
    envelope = Envelope(
        channel, "github", 1700000000.5, "POST", "/webhook/github", "a=1", HEADERS, body
    )
    return Message.of(message_id, 1, envelope)


def connection_to(url: str) -> ConnectionEntry:
    return ConnectionEntry.model_validate({"type": "redis", "url": url})


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


async def started(
    cls: type[Module[Any]], config: dict[str, Any], connection: ConnectionEntry, pools: Pools
) -> Any:
    module = cls(cls.Config.model_validate(config), connection, pools)
    await module.start()
    return module


async def test_rq_job_is_run_by_an_rq_worker(
    redis_url: str, pools: Pools, sync_redis: redis.Redis
) -> None:
    config = {"queue_name": "webhooks", "function": FUNCTION, "result_ttl": 60}
    module = await started(RedisRQModule, config, connection_to(redis_url), pools)
    json_message, binary_message = message(JSON_BODY, "1-0"), message(BINARY_BODY, "2-0")
    await module.deliver(json_message)
    await module.deliver(binary_message)
    await module.aclose()

    queue = Queue("webhooks", connection=sync_redis)
    assert queue.job_ids == [job_id(json_message), job_id(binary_message)]
    job = Job.fetch(job_id(binary_message), connection=sync_redis)
    assert job.func_name == FUNCTION
    assert job.args == (BINARY_BODY, json_message.header_map)
    assert job.get_status() == JobStatus.QUEUED
    assert job.timeout == 180 and job.result_ttl == 60 and job.origin == "webhooks"

    assert Worker([queue], connection=sync_redis).work(burst=True)
    first = Job.fetch(job_id(json_message), connection=sync_redis)
    assert first.get_status() == JobStatus.FINISHED
    result = first.return_value()
    assert result["payload"] == orjson.loads(JSON_BODY)
    assert result["headers"] == {
        "content-type": "application/json",
        "x-hub-signature-256": "sha256=abc",
    }
    assert result["meta"]["message_id"] == "1-0" and result["meta"]["webhook_id"] == "github"
    assert job.return_value(refresh=True)["payload"] == BINARY_BODY


async def test_rq_raw_body_and_redelivery(
    redis_url: str, pools: Pools, sync_redis: redis.Redis
) -> None:
    config = {"function": FUNCTION, "raw_body": True}
    module = await started(RedisRQModule, config, connection_to(redis_url), pools)
    await module.deliver(message(JSON_BODY))
    await module.deliver(message(JSON_BODY))  # a redelivery: rq still holds the job
    await module.deliver(message(JSON_BODY, channel="other"))  # same id, another channel
    queue = Queue("default", connection=sync_redis)
    assert queue.count == 2
    assert queue.jobs[0].args[0] == JSON_BODY


async def test_rq_concurrent_deliveries_share_round_trips(
    redis_url: str, pools: Pools, sync_redis: redis.Redis
) -> None:
    module = await started(RedisRQModule, {"function": FUNCTION}, connection_to(redis_url), pools)
    messages = [message(b"%d" % n, f"{n}-0") for n in range(300)]
    await asyncio.gather(*(module.deliver(m) for m in messages))
    queue = Queue("default", connection=sync_redis)
    assert queue.job_ids == [job_id(m) for m in messages]
    assert queue.jobs[299].args[0] == 299


async def test_rq_queue_of_the_wrong_type_is_permanent(
    redis_url: str, pools: Pools, sync_redis: redis.Redis
) -> None:
    sync_redis.set("rq:queue:broken", "not a list")
    config = {"function": FUNCTION, "queue_name": "broken"}
    module = await started(RedisRQModule, config, connection_to(redis_url), pools)
    with pytest.raises(Permanent, match="WRONGTYPE"):
        await module.deliver(message(JSON_BODY))
    assert not sync_redis.exists(f"rq:job:{job_id(message(JSON_BODY))}")


def test_rq_config_is_validated() -> None:
    with pytest.raises(ValidationError, match="function"):
        RQConfig.model_validate({"queue_name": "q"})
    for bad in ("eval", "os.system(1)", "a..b"):
        with pytest.raises(ValidationError, match="should match pattern"):
            RQConfig.model_validate({"function": bad})
    with pytest.raises(ValidationError, match="must not name a dunder"):
        RQConfig.model_validate({"function": "pkg.__import__"})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        RQConfig.model_validate({"function": "a.b", "queue": "typo"})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        RedisSettings.model_validate({"hostname": "localhost"})


async def subscribed(url: str, channel: str) -> Any:
    subscriber = redis.asyncio.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
    await subscriber.subscribe(channel)
    return subscriber


async def next_message(subscriber: Any) -> bytes:
    async with asyncio.timeout(5):
        while True:
            got = await subscriber.get_message(timeout=1)
            if got is not None:
                data: bytes = got["data"]
                return data


async def test_publish_json_envelope_and_raw_bytes(redis_url: str, pools: Pools) -> None:
    subscriber = await subscribed(redis_url, "events")
    try:
        json_module = await started(
            RedisPublishModule, {"channel": "events"}, connection_to(redis_url), pools
        )
        raw_module = await started(
            RedisPublishModule,
            {"channel": "events", "format": "raw"},
            connection_to(redis_url),
            pools,
        )
        await json_module.deliver(message(JSON_BODY))
        await json_module.deliver(message(BINARY_BODY))
        await raw_module.deliver(message(BINARY_BODY))

        envelope = orjson.loads(await next_message(subscriber))
        assert envelope["payload"] == orjson.loads(JSON_BODY)
        assert envelope["headers"]["x-hub-signature-256"] == "sha256=abc"
        assert envelope["message_id"] == "1700000000000-0" and envelope["webhook_id"] == "github"
        binary = orjson.loads(await next_message(subscriber))
        assert binary["payload"] is None
        assert binary["body_base64"] == "AP/+IGJpbmFyeSCAgSBub3QgdXRmLTg="
        assert await next_message(subscriber) == BINARY_BODY
    finally:
        await subscriber.aclose()


async def test_publish_without_subscriber(redis_url: str, pools: Pools) -> None:
    connection = connection_to(redis_url)
    fire_and_forget = await started(RedisPublishModule, {"channel": "nobody"}, connection, pools)
    await fire_and_forget.deliver(message(JSON_BODY))  # "delivered" to no one
    config = {"channel": "nobody", "require_subscriber": True}
    strict = await started(RedisPublishModule, config, connection, pools)
    with pytest.raises(Transient, match="no subscriber"):
        await strict.deliver(message(JSON_BODY))


async def test_stream_mode_keeps_bytes_and_metadata(
    redis_url: str, pools: Pools, sync_redis: redis.Redis
) -> None:
    config = {"channel": "hooks", "mode": "stream", "maxlen": 3, "approximate": False}
    module = await started(RedisPublishModule, config, connection_to(redis_url), pools)
    for n in range(5):
        await module.deliver(message(BINARY_BODY + b"%d" % n, f"{n}-0"))
    entries = sync_redis.xrange("hooks")
    assert len(entries) == 3
    fields = entries[-1][1]
    assert fields[b"body"] == BINARY_BODY + b"4"
    assert fields[b"message-id"] == b"4-0" and fields[b"webhook-id"] == b"github"
    assert orjson.loads(fields[b"headers"]) == [list(pair) for pair in HEADERS]
    assert fields[b"channel"] == b"ch"
    assert fields[b"received-at"] == b"2023-11-14T22:13:20.500000Z"


async def test_stream_of_the_wrong_type_is_permanent(
    redis_url: str, pools: Pools, sync_redis: redis.Redis
) -> None:
    sync_redis.set("hooks", "a string")
    config = {"channel": "hooks", "mode": "stream"}
    module = await started(RedisPublishModule, config, connection_to(redis_url), pools)
    with pytest.raises(Permanent, match="WRONGTYPE"):
        await module.deliver(message(JSON_BODY))


def test_publish_config_is_validated() -> None:
    with pytest.raises(ValidationError, match="channel"):
        PublishConfig.model_validate({})
    with pytest.raises(ValidationError, match='"maxlen" applies to "mode": "stream" only'):
        PublishConfig.model_validate({"channel": "c", "maxlen": 10})
    with pytest.raises(ValidationError, match="Input should be 'publish' or 'stream'"):
        PublishConfig.model_validate({"channel": "c", "mode": "list"})


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A server of this file's own, to stop and restart on the same port."""
    with running(RedisServer(tmp_path_factory.mktemp("redis-own"))) as server:
        yield server


async def test_server_down_then_back_without_recreating_modules(
    own_redis: RedisServer, pools: Pools, tmp_path: Path
) -> None:
    connection = ConnectionEntry.model_validate(
        {"type": "redis", "host": "127.0.0.1", "port": own_redis.port, "timeout": 2}
    )
    own_redis.stop()
    rq_module = await started(RedisRQModule, {"function": FUNCTION}, connection, pools)
    stream = await started(
        RedisPublishModule, {"channel": "s", "mode": "stream"}, connection, pools
    )
    for module in (rq_module, stream):
        with pytest.raises(Transient, match="Redis unavailable"):
            await module.deliver(message(JSON_BODY, "1-0"))

    own_redis.start()
    await rq_module.deliver(message(JSON_BODY, "2-0"))
    await stream.deliver(message(JSON_BODY, "2-0"))

    own_redis.stop()  # the pooled connections are now dead
    with pytest.raises(Transient):
        await stream.deliver(message(JSON_BODY, "3-0"))
    own_redis.start()
    await rq_module.deliver(message(JSON_BODY, "4-0"))
    await stream.deliver(message(JSON_BODY, "4-0"))

    check = redis.Redis(port=own_redis.port)
    try:
        assert Queue(connection=check).job_ids == [
            job_id(message(JSON_BODY, "2-0")),
            job_id(message(JSON_BODY, "4-0")),
        ]
        assert [fields[b"message-id"] for _, fields in check.xrange("s")] == [b"2-0", b"4-0"]
    finally:
        check.close()
