"""``s3``: each webhook becomes one S3 object holding exactly the bytes received.

The key comes from a pattern over the message (``{prefix}/{yyyy}/{mm}/{dd}/{hh}/{filename}`` by
default, as the Core Webhook Module lays it out). Dates are those of *receipt*, not of delivery,
and the default file name is the message id, so a redelivered message overwrites its own object
instead of adding a copy. Ids and headers go into the object's user metadata (``x-amz-meta-*``).
PutObject answering 200 is the confirmation.
"""

from __future__ import annotations

import re
import string
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import quote

from aiobotocore.session import get_session
from pydantic import BaseModel, ConfigDict, Field, model_validator

from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.modules import attributes
from webhook_connect.shared.modules.aws import (
    AWS_ERRORS,
    aws_settings,
    client_arguments,
    close_client,
    delivery_error,
    pool_key,
)
from webhook_connect.shared.modules.base import Message, Module, Permanent, Pools

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

# S3 rules: keys up to 1024 bytes; user metadata up to 2 KB, counted as the UTF-8 bytes of
# every key and value.
MAX_KEY_BYTES = 1024
MAX_METADATA_BYTES = 2048
BUCKET_NAME = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
# Literal characters a pattern may hold: S3's "safe characters", plus "=" for Hive partitions.
SAFE_LITERAL = re.compile(r"^[A-Za-z0-9!_.*'()=/-]*$")
PLACEHOLDERS = frozenset(
    {"webhook_id", "message_id", "channel", "date", "yyyy", "mm", "dd", "hh", "timestamp", "uuid"}
)
# A message for rendering patterns at configuration time, so a bad pattern fails at start-up.
_SAMPLE = {name: "x" for name in PLACEHOLDERS}


def check_pattern(pattern: str) -> None:
    """Refuse unknown placeholders, format specs and unsafe literal characters."""
    for literal, field, spec, conversion in string.Formatter().parse(pattern):
        if not SAFE_LITERAL.match(literal):
            raise ValueError(
                f"{pattern!r} holds characters outside A-Z a-z 0-9 ! _ . * ' ( ) = / -"
            )
        if field is None:
            continue
        if field not in PLACEHOLDERS:
            known = ", ".join("{" + name + "}" for name in sorted(PLACEHOLDERS))
            raise ValueError(f"unknown placeholder {{{field}}} in {pattern!r} (known: {known})")
        if spec or conversion:
            raise ValueError(f"placeholder {{{field}}} in {pattern!r} takes no format")


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be used as an object key (no traversal, no control bytes), or None."""
    if len(key.encode()) > MAX_KEY_BYTES:
        return f"the key is longer than {MAX_KEY_BYTES} bytes"
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in key):
        return "the key holds control characters"
    if any(segment in ("", ".", "..") for segment in key.split("/")):
        return "the key has an empty, '.' or '..' path segment"
    return None


def key_values(message: Message) -> dict[str, str]:
    """The placeholder values for ``message``; times are the receipt's, in UTC."""
    received = datetime.fromtimestamp(message.envelope.received_at, UTC)
    return {
        "webhook_id": message.webhook_id,
        "message_id": message.message_id,
        "channel": message.channel,
        "date": received.strftime("%Y-%m-%d"),
        "yyyy": received.strftime("%Y"),
        "mm": received.strftime("%m"),
        "dd": received.strftime("%d"),
        "hh": received.strftime("%H"),
        "timestamp": received.strftime("%Y-%m-%dT%H-%M-%S.%f"),
        "uuid": str(uuid.uuid4()),
    }


def object_metadata(message: Message, include_headers: bool) -> dict[str, str]:
    """User metadata for the object: ids always, headers as JSON when they fit in 2 KB."""
    metadata = {
        name: value if value.isascii() else quote(value, safe="")
        for name, value in attributes.message_attributes(message).items()
    }
    if not include_headers:
        return metadata
    used = sum(len(name) + len(value) for name, value in metadata.items())
    room = MAX_METADATA_BYTES - used - len(attributes.HEADERS)
    metadata.update(attributes.fitting_headers(message, room, "S3 2 KB metadata limit"))
    return metadata


class S3Config(BaseModel):
    """``module-config`` of ``s3``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bucket: str = Field(pattern=BUCKET_NAME)
    prefix: str = "webhooks"
    filename_pattern: str = Field("webhook_{message_id}", min_length=1)
    # The whole key, replacing prefix/yyyy/mm/dd/hh/filename.
    key_pattern: str | None = Field(None, min_length=1)
    include_headers: bool = True
    # None: the webhook's own Content-Type, else application/octet-stream.
    content_type: str | None = Field(None, pattern=r"^[\x21-\x7e][\x20-\x7e]*$")

    @model_validator(mode="after")
    def _check_key(self) -> S3Config:
        if self.key_pattern is not None and self.model_fields_set & {"prefix", "filename_pattern"}:
            raise ValueError("key_pattern replaces prefix and filename_pattern: give only one")
        if "/" in self.filename_pattern:
            raise ValueError("filename_pattern is a file name: put directories in prefix")
        check_pattern(self.template)
        problem = key_problem(self.template.format(**_SAMPLE))
        if problem:
            raise ValueError(f"{self.template!r}: {problem}")
        return self

    @property
    def template(self) -> str:
        """The full key pattern."""
        if self.key_pattern is not None:
            return self.key_pattern
        prefix = self.prefix.strip("/")
        layout = "{yyyy}/{mm}/{dd}/{hh}/" + self.filename_pattern
        return f"{prefix}/{layout}" if prefix else layout


class S3Module(Module[S3Config]):
    """Write each message as one object; confirmed when PutObject answers 200."""

    name: ClassVar[str] = "s3"
    Config: ClassVar[type[BaseModel]] = S3Config
    connection_types: ClassVar[frozenset[str]] = frozenset({"s3", "aws"})

    def __init__(self, config: S3Config, connection: ConnectionEntry | None, pools: Pools) -> None:
        super().__init__(config, connection, pools)
        self._settings = aws_settings(self.connection_settings)
        self._pool_key = pool_key("s3", self._settings)

    async def _client(self) -> S3Client:
        return await self.pools.get(self._pool_key, self._open_client, close_client)

    async def _open_client(self) -> S3Client:
        creator = get_session().create_client("s3", **client_arguments(self._settings))
        return await creator.__aenter__()

    async def start(self) -> None:
        # Creating the client opens no connection; the bucket is first touched by a deliver.
        await self._client()

    def object_key(self, message: Message) -> str:
        """The key ``message`` is written under; :class:`Permanent` when it is not a valid key."""
        key = self.config.template.format(**key_values(message))
        problem = key_problem(key)
        if problem:
            raise Permanent(f"s3: cannot write {key[:200]!r}: {problem}")
        return key

    async def deliver(self, message: Message) -> None:
        key = self.object_key(message)
        content_type = self.config.content_type or message.header_map.get("content-type", "")
        if not content_type.isascii() or not content_type.strip():
            content_type = "application/octet-stream"
        client = await self._client()
        try:
            await client.put_object(
                Bucket=self.config.bucket,
                Key=key,
                Body=message.body,
                ContentType=content_type,
                Metadata=object_metadata(message, self.config.include_headers),
            )
        except AWS_ERRORS as exc:
            raise delivery_error(exc, f"s3 PutObject {self.config.bucket}/{key}") from exc
