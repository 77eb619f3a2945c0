"""Redis output modules: ``redis_rq`` queues a python-rq job, ``redis_publish`` PUBLISHes or XADDs.

Both write with ``redis.asyncio`` over one client per connection settings (shared through
:class:`Pools`) and coalesce concurrent deliveries into one pipelined round trip.

``redis_rq`` writes the job exactly as ``rq``'s ``Queue.enqueue`` does (the ``rq:job:<id>`` hash,
the id pushed on ``rq:queue:<name>``, the queue added to ``rq:queues``), so a stock
``rq worker <queue>`` runs it, without making ``rq`` and its synchronous client a dependency.
The job id is derived from the channel and message id: a redelivery finds the job already there
and does not queue it twice, as long as rq keeps it (``result_ttl``, 500 s by default).
"""

from __future__ import annotations

import builtins
import logging
import pickle
import uuid
import zlib
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from webhook_connect.shared.coalescer import Coalescer
from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.modules import attributes
from webhook_connect.shared.modules.base import (
    ConfigT,
    DeliveryError,
    Message,
    Module,
    Permanent,
    Pools,
    Transient,
)

logger = logging.getLogger("webhook_connect.modules.redis")

# rq's key layout (``RQ_KEY_PREFIX`` "rq") and timestamp format.
RQ_JOB_KEY = "rq:job:{}"
RQ_QUEUE_KEY = "rq:queue:{}"
RQ_QUEUES_KEY = "rq:queues"
RQ_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
# rq's default serializer is pickle; protocol 4 is readable by any Python 3.4+ worker.
PICKLE_PROTOCOL = 4
JOB_ID_NAMESPACE = uuid.UUID("6f1c1d2e-8f0a-4a51-9c1b-3e6a7d2b9f40")
# A dotted import path, as an rq worker resolves it. A bare name (the Core Webhook Module's
# examples use one) is accepted as written, with a warning (shared/config/aliases.py), unless
# it names a builtin: an rq worker resolves a bare name only among builtins, and "eval" or
# "exec" would run the payload.
FUNCTION_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
# Error replies that mean "busy or failing over, try later"; any other refusal is permanent.
# NOSCRIPT: the server restarted between the pipeline's SCRIPT LOAD and its EVALSHA.
TRANSIENT_REPLIES = ("BUSY", "MISCONF", "NOREPLICAS")
TRANSIENT_REPLY_TYPES = (
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
    ClusterDownError,
    NoScriptError,
)

# Atomic enqueue. KEYS: job hash, queue list, set of queues. ARGV: job id, field, value, ...
# The push comes before the hash so a queue of the wrong type fails before anything is written.
ENQUEUE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[3], KEYS[2])
return 1
"""


class RedisSettings(BaseModel):
    """A ``connections.json`` entry of type ``redis``: a ``url``, or host, port, db ..."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = Field(default=None, pattern=r"^(redis|rediss|unix)://")
    host: str = "localhost"
    port: int = Field(default=6379, ge=1, le=65535)
    db: int = Field(default=0, ge=0)
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    timeout: float = Field(default=5.0, gt=0, description="connect and reply timeout, seconds")

    def open(self) -> Redis:
        """A client that connects on first use (a server down now is not an error)."""
        # One immediate retry: a pooled connection the server dropped (restart) is replaced.
        options: dict[str, Any] = {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "retry": Retry(NoBackoff(), 1),
        }
        if self.url is not None:
            return Redis.from_url(self.url, **options)
        return Redis(
            host=self.host,
            port=self.port,
            db=self.db,
            username=self.username,
            password=self.password,
            ssl=self.ssl,
            **options,
        )


def failure(exc: Exception) -> DeliveryError:
    """What a Redis error means for the message: refused for good, or worth another try."""
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, ResponseError) and not (
        isinstance(exc, TRANSIENT_REPLY_TYPES) or str(exc).startswith(TRANSIENT_REPLIES)
    ):
        return Permanent(f"Redis refused the write: {exc}")
    return Transient(f"Redis unavailable: {type(exc).__name__}: {exc}")


def job_id(message: Message) -> str:
    """The rq job id of a message: stable across redeliveries, unique across channels (the
    same message id may exist in two channels)."""
    return str(uuid.uuid5(JOB_ID_NAMESPACE, f"{message.channel}/{message.message_id}"))


def body_payload(message: Message) -> Any:
    """The body parsed as JSON, or the exact bytes when it is not JSON."""
    try:
        return message.json()
    except Permanent:
        return message.body


async def redis_client(module: Module[Any], settings: RedisSettings) -> Redis:
    """The client shared by every module using these connection settings."""

    async def open_client() -> Redis:
        return settings.open()

    async def close(client: Redis) -> None:
        await client.aclose()

    return await module.pools.get(f"redis:{settings!r}", open_client, close)


class RedisModule(Module[ConfigT]):
    """What both Redis modules share: the pooled client and the coalesced pipeline."""

    connection_types: ClassVar[frozenset[str]] = frozenset({"redis"})
    needs_connection = True

    def __init__(self, config: ConfigT, connection: ConnectionEntry | None, pools: Pools) -> None:
        super().__init__(config, connection, pools)
        self.settings = RedisSettings.model_validate(self.connection_settings)
        self._batches: Coalescer[Message, None] = Coalescer(self._flush)

    async def start(self) -> None:
        client = await redis_client(self, self.settings)
        try:
            await client.ping()
        except RedisError as exc:  # not an error: deliver raises Transient until it is back
            logger.warning("%s: Redis not reachable yet: %s", self.name, exc)

    async def deliver(self, message: Message) -> None:
        await self._batches.submit(message)

    async def aclose(self) -> None:
        await self._batches.aclose()

    async def _flush(self, messages: list[Message]) -> list[None | Exception]:
        """One pipelined round trip for every message queued meanwhile."""
        client = await redis_client(self, self.settings)
        try:
            async with client.pipeline(transaction=False) as pipe:
                for message in messages:
                    await self._queue_command(client, pipe, message)
                replies = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            return [failure(exc)] * len(messages)
        return [
            failure(reply) if isinstance(reply, Exception) else self._check(reply)
            for reply in replies
        ]

    async def _queue_command(self, client: Redis, pipe: Any, message: Message) -> None:
        """Add the command writing ``message`` to the pipeline (nothing is sent yet)."""
        raise NotImplementedError

    def _check(self, reply: Any) -> None | Exception:
        """An error for a successful reply that still means "not delivered"."""
        return None


class RQConfig(BaseModel):
    """``module-config`` of ``redis_rq`` (keys of the Core Webhook Module, plus job options)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    function: str = Field(pattern=FUNCTION_PATTERN, max_length=255)
    queue_name: str = Field(default="default", min_length=1, max_length=255)
    timeout: int = Field(default=180, ge=1, description="job timeout, seconds (rq's default)")
    result_ttl: int | None = Field(default=None, ge=-1)
    failure_ttl: int | None = Field(default=None, ge=-1)
    raw_body: bool = False  # True: the payload argument is always the exact body bytes

    @field_validator("function")
    @classmethod
    def _no_dunder(cls, function: str) -> str:
        if "__" in function:
            raise ValueError("must not name a dunder (__...__) module or attribute")
        if "." not in function and hasattr(builtins, function):
            raise ValueError(
                f"should match pattern 'module.function': the bare name {function!r} would "
                f"run builtins.{function}"
            )
        return function


class RedisRQModule(RedisModule[RQConfig]):
    """Queues ``function(payload, headers)`` for an rq worker; ``job.meta`` holds the ids."""

    name = "redis_rq"
    Config = RQConfig
    connection_types = frozenset({"redis", "redis-rq", "redis_rq"})

    def __init__(self, config: RQConfig, connection: ConnectionEntry | None, pools: Pools) -> None:
        super().__init__(config, connection, pools)
        self._script: AsyncScript | None = None

    def job_fields(self, message: Message, now: datetime) -> dict[str, bytes | str]:
        """The ``rq:job:<id>`` hash as ``rq``'s ``Job.to_dict`` writes it for a queued job."""
        config = self.config
        payload = message.body if config.raw_body else body_payload(message)
        call: tuple[str, None, tuple[Any, dict[str, str]], dict[str, Any]]
        call = (config.function, None, (payload, message.header_map), {})
        stamp = now.astimezone(UTC).strftime(RQ_TIME_FORMAT)
        fields: dict[str, bytes | str] = {
            "status": "queued",
            "created_at": stamp,
            "enqueued_at": stamp,
            "data": zlib.compress(pickle.dumps(call, protocol=PICKLE_PROTOCOL)),
            "origin": config.queue_name,
            "description": f"{config.function}(webhook {message.webhook_id!r}, "
            f"message {message.message_id!r})",
            "timeout": str(config.timeout),
            "meta": pickle.dumps(message.metadata(), protocol=PICKLE_PROTOCOL),
        }
        if config.result_ttl is not None:
            fields["result_ttl"] = str(config.result_ttl)
        if config.failure_ttl is not None:
            fields["failure_ttl"] = str(config.failure_ttl)
        return fields

    async def _queue_command(self, client: Redis, pipe: Any, message: Message) -> None:
        if self._script is None:
            self._script = client.register_script(ENQUEUE_SCRIPT)
        identity = job_id(message)
        queue_key = RQ_QUEUE_KEY.format(self.config.queue_name)
        arguments: list[bytes | str] = [identity]
        for field, value in self.job_fields(message, datetime.now(UTC)).items():
            arguments += [field, value]
        keys = [RQ_JOB_KEY.format(identity), queue_key, RQ_QUEUES_KEY]
        await self._script(keys=keys, args=arguments, client=pipe)


class PublishConfig(BaseModel):
    """``module-config`` of ``redis_publish``: ``channel`` is the pub/sub channel or stream key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: str = Field(min_length=1, max_length=1024)
    mode: Literal["publish", "stream"] = "publish"
    format: Literal["json", "raw"] = "json"  # publish mode: JSON envelope or the exact body
    require_subscriber: bool = False  # publish mode: no subscriber listening → Transient
    maxlen: int | None = Field(default=None, ge=1)  # stream mode: XADD MAXLEN
    approximate: bool = True  # stream mode: MAXLEN ~ (cheap trimming)

    @model_validator(mode="after")
    def _mode_options(self) -> PublishConfig:
        if self.mode == "publish" and self.maxlen is not None:
            raise ValueError('"maxlen" applies to "mode": "stream" only')
        if self.mode == "stream" and self.require_subscriber:
            raise ValueError('"require_subscriber" applies to "mode": "publish" only')
        if self.mode == "stream" and self.format != "json":
            raise ValueError('"format" applies to "mode": "publish" only (streams keep raw bytes)')
        return self


def stream_fields(message: Message) -> dict[str, bytes | str]:
    """A stream entry: the exact body in ``body``, beside the metadata every module with
    key/value attributes carries (``message-id``, ``webhook-id``, ``channel``, ``received-at``,
    ``headers``)."""
    return {
        "body": message.body,
        **attributes.message_attributes(message),
        attributes.HEADERS: attributes.headers_json(message),
    }


class RedisPublishModule(RedisModule[PublishConfig]):
    """PUBLISHes each webhook on a channel, or XADDs it to a stream (``"mode": "stream"``).

    PUBLISH is fire-and-forget: Redis answers with the number of subscribers that got the
    message, and zero is still "delivered" unless ``require_subscriber`` is set.
    """

    name = "redis_publish"
    Config = PublishConfig
    connection_types = frozenset({"redis", "redis-publish", "redis_publish"})

    async def _queue_command(self, client: Redis, pipe: Any, message: Message) -> None:
        config = self.config
        if config.mode == "stream":
            fields: Any = stream_fields(message)
            pipe.xadd(config.channel, fields, maxlen=config.maxlen, approximate=config.approximate)
        elif config.format == "raw":
            pipe.publish(config.channel, message.body)
        else:
            pipe.publish(config.channel, attributes.json_envelope(message))

    def _check(self, reply: Any) -> None | Exception:
        if self.config.require_subscriber and reply == 0:
            return Transient(f"no subscriber on Redis channel {self.config.channel!r}")
        return None
