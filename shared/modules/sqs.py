"""``aws_sqs``: each webhook becomes one SQS message; concurrent delivers share SendMessageBatch.

SQS bodies are text, so the body is sent as is when it is UTF-8 made of characters SQS accepts,
and as base64 otherwise, flagged by the ``body-encoding`` attribute. Ids and headers travel as
message attributes. On a FIFO queue the message id is the deduplication id, so a redelivery
within SQS's five-minute window is dropped by SQS itself.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from typing import TYPE_CHECKING, Any, ClassVar

from aiobotocore.session import get_session
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from webhook_connect.shared.coalescer import Coalescer
from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.modules import attributes
from webhook_connect.shared.modules.aws import (
    AWS_ERRORS,
    aws_settings,
    client_arguments,
    close_client,
    delivery_error,
    is_transient,
    pool_key,
)
from webhook_connect.shared.modules.base import (
    DeliveryError,
    Message,
    Module,
    Permanent,
    Pools,
    Transient,
)

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

MAX_BATCH_ENTRIES = 10
# A batch may not exceed the maximum message size in total; 256 KiB is that limit on every SQS
# (and the default of older queues), so a batch never fails where single sends would pass.
MAX_BATCH_BYTES = 256 * 1024
# Characters outside what SQS accepts in a body (#x9 #xA #xD #x20-#xD7FF #xE000-#xFFFD
# #x10000-#x10FFFF); strict UTF-8 decoding already excludes surrogates.
FORBIDDEN_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
QUEUE_NAME = r"^([A-Za-z0-9_-]{1,75}\.fifo|[A-Za-z0-9_-]{1,80})$"


def message_body(body: bytes) -> tuple[str, str | None]:
    """The SQS body for ``body`` and its ``body-encoding`` (None: the bytes as UTF-8 text).

    SQS refuses an empty body, so an empty one is sent as ``-`` with encoding ``empty``.
    """
    if not body:
        return "-", "empty"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(body).decode("ascii"), "base64"
    if FORBIDDEN_TEXT.search(text):
        return base64.b64encode(body).decode("ascii"), "base64"
    return text, None


def send_entry(message: Message, config: SQSConfig) -> dict[str, Any]:
    """The SendMessage arguments for ``message`` (without QueueUrl)."""
    body, encoding = message_body(message.body)
    values = attributes.message_attributes(message)
    if config.include_headers:
        values[attributes.HEADERS] = attributes.headers_json(message)
    if encoding is not None:
        values[attributes.BODY_ENCODING] = encoding
    entry: dict[str, Any] = {
        "MessageBody": body,
        # SQS refuses empty attribute values.
        "MessageAttributes": {
            name: {"DataType": "String", "StringValue": value}
            for name, value in values.items()
            if value
        },
    }
    if config.is_fifo:
        entry["MessageDeduplicationId"] = message.message_id
        entry["MessageGroupId"] = config.message_group_id or message.message_id
    elif config.message_group_id:
        entry["MessageGroupId"] = config.message_group_id
    if config.delay_seconds:
        entry["DelaySeconds"] = config.delay_seconds
    return entry


def entry_size(entry: dict[str, Any]) -> int:
    """Bytes SQS counts against the size limits: body plus attribute names, types, values."""
    size = len(entry["MessageBody"].encode())
    for name, value in entry["MessageAttributes"].items():
        size += len(name) + len(value["DataType"]) + len(value["StringValue"].encode())
    return size


def batches(entries: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of ``entries`` grouped into SendMessageBatch calls within SQS's limits."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index, entry in enumerate(entries):
        size = entry_size(entry)
        if current and (len(current) == MAX_BATCH_ENTRIES or total + size > MAX_BATCH_BYTES):
            groups.append(current)
            current, total = [], 0
        current.append(index)
        total += size
    if current:
        groups.append(current)
    return groups


def body_md5(body: str) -> str:
    return hashlib.md5(body.encode(), usedforsecurity=False).hexdigest()


class SQSConfig(BaseModel):
    """``module-config`` of ``aws_sqs``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    queue_url: str | None = Field(None, pattern=r"^https?://\S+$")
    queue_name: str | None = Field(None, pattern=QUEUE_NAME)
    # FIFO queues: the group of every message (default: its message id, i.e. no ordering).
    message_group_id: str | None = Field(None, pattern=r"^[\x21-\x7e]{1,128}$")
    # Kept for Core Webhook Module configurations, which write it as null.
    message_deduplication_id: None = None
    delay_seconds: int = Field(0, ge=0, le=900)
    include_headers: bool = True

    @field_validator("message_deduplication_id", mode="before")
    @classmethod
    def _no_fixed_deduplication(cls, value: object) -> object:
        if value is not None:
            raise ValueError("the message id is the deduplication id: leave this out or null")
        return value

    @model_validator(mode="after")
    def _check_queue(self) -> SQSConfig:
        if (self.queue_url is None) == (self.queue_name is None):
            raise ValueError("give exactly one of queue_url and queue_name")
        if self.is_fifo and self.delay_seconds:
            raise ValueError("FIFO queues take no per-message delay_seconds")
        return self

    @property
    def is_fifo(self) -> bool:
        return (self.queue_url or self.queue_name or "").endswith(".fifo")


class SQSModule(Module[SQSConfig]):
    """Send each message to one queue; confirmed when SQS returns its MessageId."""

    name: ClassVar[str] = "aws_sqs"
    Config: ClassVar[type[BaseModel]] = SQSConfig
    connection_types: ClassVar[frozenset[str]] = frozenset({"aws_sqs", "aws"})

    def __init__(self, config: SQSConfig, connection: ConnectionEntry | None, pools: Pools) -> None:
        super().__init__(config, connection, pools)
        self._settings = aws_settings(self.connection_settings)
        self._pool_key = pool_key("sqs", self._settings)
        self._queue_url = config.queue_url
        self._resolving = asyncio.Lock()
        self._batcher: Coalescer[dict[str, Any], None] = Coalescer(self._flush, max_batch=100)

    async def _client(self) -> SQSClient:
        return await self.pools.get(self._pool_key, self._open_client, close_client)

    async def _open_client(self) -> SQSClient:
        creator = get_session().create_client("sqs", **client_arguments(self._settings))
        return await creator.__aenter__()

    async def _url(self) -> str:
        """The queue URL, looked up once by name."""
        async with self._resolving:
            if self._queue_url is None:
                name = str(self.config.queue_name)
                client = await self._client()
                try:
                    found = await client.get_queue_url(QueueName=name)
                except AWS_ERRORS as exc:
                    raise delivery_error(exc, f"sqs GetQueueUrl {name}") from exc
                self._queue_url = found["QueueUrl"]
            return self._queue_url

    async def start(self) -> None:
        await self._url()

    async def deliver(self, message: Message) -> None:
        await self._batcher.submit(send_entry(message, self.config))

    async def aclose(self) -> None:
        await self._batcher.aclose()

    async def _flush(self, entries: list[dict[str, Any]]) -> list[None | Exception]:
        url = await self._url()
        client = await self._client()
        results: list[None | Exception] = [None] * len(entries)

        async def send(indices: list[int]) -> None:
            chosen = [entries[i] for i in indices]
            if len(chosen) == 1:
                outcomes = [await _send_one(client, url, chosen[0])]
            else:
                outcomes = await _send_batch(client, url, chosen)
            for index, outcome in zip(indices, outcomes, strict=True):
                results[index] = outcome

        await asyncio.gather(*(send(group) for group in batches(entries)))
        return results


async def _send_one(client: SQSClient, url: str, entry: dict[str, Any]) -> DeliveryError | None:
    try:
        sent = await client.send_message(QueueUrl=url, **entry)
    except AWS_ERRORS as exc:
        return delivery_error(exc, "sqs SendMessage")
    if sent.get("MD5OfMessageBody") != body_md5(entry["MessageBody"]):
        return Transient("sqs SendMessage: the body's MD5 does not match what was sent")
    return None


async def _send_batch(
    client: SQSClient, url: str, entries: list[dict[str, Any]]
) -> list[DeliveryError | None]:
    """Send up to ten entries in one call; each entry gets its own outcome."""
    request = [{"Id": str(i), **entry} for i, entry in enumerate(entries)]
    try:
        answer = await client.send_message_batch(QueueUrl=url, Entries=request)  # type: ignore[arg-type]
    except AWS_ERRORS as exc:
        error = delivery_error(exc, "sqs SendMessageBatch")
        if isinstance(error, Permanent):
            # The whole batch was refused (e.g. one entry too large): find which, one by one.
            return list(await asyncio.gather(*(_send_one(client, url, e) for e in entries)))
        return [error] * len(entries)
    outcomes: list[DeliveryError | None] = [
        Transient("sqs SendMessageBatch: no answer for this entry") for _ in entries
    ]
    for ok in answer.get("Successful", []):
        index = int(ok["Id"])
        if ok.get("MD5OfMessageBody") == body_md5(entries[index]["MessageBody"]):
            outcomes[index] = None
        else:
            outcomes[index] = Transient("sqs SendMessageBatch: the body's MD5 does not match")
    for failed in answer.get("Failed", []):
        code = failed.get("Code", "")
        status = 400 if failed.get("SenderFault") else 500
        kind = Transient if is_transient(status, code) else Permanent
        reason = f"sqs SendMessageBatch: {code}: {failed.get('Message', '')}"
        outcomes[int(failed["Id"])] = kind(reason)
    return outcomes
