"""``gcp_pubsub``: each webhook becomes one Pub/Sub message; concurrent delivers share a publish.

Spoken over Pub/Sub's REST API (``topics/{topic}:publish``) with httpx, so the module needs no
gRPC stack. The message data is the exact body; ids and headers are attributes. The server
returning a message id for it is the confirmation. ``PUBSUB_EMULATOR_HOST`` (or a connection
``endpoint``) points it at an emulator, unauthenticated; otherwise a service-account key file
provides OAuth tokens.
"""

from __future__ import annotations

import asyncio
import base64
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from webhook_connect.shared.coalescer import Coalescer
from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.config.loading import config_error_from
from webhook_connect.shared.exceptions import ConfigError
from webhook_connect.shared.modules import attributes
from webhook_connect.shared.modules.base import (
    DeliveryError,
    Message,
    Module,
    Permanent,
    Pools,
    Transient,
)
from webhook_connect.shared.modules.gcp_auth import (
    ServiceAccount,
    TokenSource,
    load_service_account,
)

DEFAULT_ENDPOINT = "https://pubsub.googleapis.com"
SCOPE = "https://www.googleapis.com/auth/pubsub"
# Pub/Sub limits: 1000 messages and 10 MB a publish request, 10 MB a message, 100 attributes,
# 256-byte keys and 1024-byte values, 1 KB ordering keys.
MAX_MESSAGES = 1000
MAX_REQUEST_BYTES = 10_000_000
MAX_VALUE_BYTES = 1024
# Room for the request's own JSON around the messages.
REQUEST_OVERHEAD = 64


def is_transient_status(status: int) -> bool:
    """Whether a publish answered with ``status`` may succeed later.

    Besides overload and server faults, a missing topic (404) and refused credentials (401,
    403) are for an operator to fix; only a rejected message (400, 413) is permanent.
    """
    return status >= 500 or status in (401, 403, 404, 408, 429)


def pubsub_message(message: Message, config: PubSubConfig) -> dict[str, Any]:
    """The ``PubsubMessage`` JSON for ``message``: its exact body, and attributes."""
    values = {**config.attributes, **attributes.message_attributes(message)}
    if config.include_headers:
        values.update(attributes.fitting_headers(message, MAX_VALUE_BYTES, "Pub/Sub 1 KB limit"))
    size = len(message.body) + sum(len(k.encode()) + len(v.encode()) for k, v in values.items())
    if size > MAX_REQUEST_BYTES:
        raise Permanent(f"gcp_pubsub: the message is {size} bytes, over Pub/Sub's 10 MB limit")
    out: dict[str, Any] = {"data": base64.b64encode(message.body).decode(), "attributes": values}
    if config.ordering_key:
        out["orderingKey"] = config.ordering_key
    return out


def requests(encoded: list[bytes]) -> list[list[int]]:
    """Indices of the encoded messages grouped into publish requests within the limits."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index, item in enumerate(encoded):
        if current and (
            len(current) == MAX_MESSAGES or total + len(item) > MAX_REQUEST_BYTES - REQUEST_OVERHEAD
        ):
            groups.append(current)
            current, total = [], 0
        current.append(index)
        total += len(item) + 1
    if current:
        groups.append(current)
    return groups


class PubSubSettings(BaseModel):
    """The keys of a ``gcp_pubsub`` connection in ``connections.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    project_id: str | None = None
    credentials_path: str | None = None
    # An emulator, a regional endpoint ("https://europe-west1-pubsub.googleapis.com"), a proxy.
    endpoint: str | None = Field(None, pattern=r"^https?://[^/]+/?$")
    timeout_seconds: float = Field(30.0, gt=0)


class PubSubConfig(BaseModel):
    """``module-config`` of ``gcp_pubsub``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: str = Field(pattern=r"^(projects/[^/]+/topics/)?[A-Za-z][A-Za-z0-9._~+%-]{2,254}$")
    project_id: str | None = None
    # Fixed attributes added to every message.
    attributes: dict[str, str] = Field(default_factory=dict, max_length=90)
    ordering_key: str | None = Field(None, min_length=1)
    include_headers: bool = True

    @field_validator("attributes")
    @classmethod
    def _check_attributes(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not key or len(key.encode()) > 256 or key.startswith("goog"):
                raise ValueError(f"attribute {key!r}: keys are 1-256 bytes, not starting goog")
            if len(item.encode()) > MAX_VALUE_BYTES:
                raise ValueError(f"attribute {key!r}: values are at most 1024 bytes")
        return value

    @field_validator("ordering_key")
    @classmethod
    def _check_ordering_key(cls, value: str | None) -> str | None:
        if value is not None and len(value.encode()) > 1024:
            raise ValueError("ordering keys are at most 1024 bytes")
        return value


@dataclass
class Publisher:
    """One HTTP client (and token source) per endpoint and credentials, shared by topics."""

    endpoint: str
    client: httpx.AsyncClient
    tokens: TokenSource | None

    async def publish(self, topic: str, messages: list[bytes]) -> list[str]:
        """Publish pre-encoded messages in one request; the server's message ids, in order."""
        headers = {"Content-Type": "application/json"}
        token = await self.tokens.token() if self.tokens else None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        body = b'{"messages":[' + b",".join(messages) + b"]}"
        url = f"{self.endpoint}/v1/{topic}:publish"
        try:
            response = await self.client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise Transient(f"gcp_pubsub {topic}: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 200:
            try:
                ids = response.json()["messageIds"]
            except (ValueError, KeyError, TypeError):
                ids = []
            if not isinstance(ids, list) or len(ids) != len(messages):
                raise Transient(f"gcp_pubsub {topic}: no message id for each message: {ids!r}")
            return [str(i) for i in ids]
        if response.status_code == 401 and token and self.tokens:
            self.tokens.invalidate(token)
        kind = Transient if is_transient_status(response.status_code) else Permanent
        raise kind(f"gcp_pubsub {topic}: {response.status_code} {response.text[:300]}")

    async def aclose(self) -> None:
        await self.client.aclose()


class PubSubModule(Module[PubSubConfig]):
    """Publish each message to one topic; confirmed when Pub/Sub returns its message id."""

    name: ClassVar[str] = "gcp_pubsub"
    Config: ClassVar[type[BaseModel]] = PubSubConfig
    connection_types: ClassVar[frozenset[str]] = frozenset({"gcp_pubsub"})

    def __init__(
        self, config: PubSubConfig, connection: ConnectionEntry | None, pools: Pools
    ) -> None:
        super().__init__(config, connection, pools)
        try:
            self._settings = PubSubSettings.model_validate(self.connection_settings)
        except ValidationError as exc:
            raise config_error_from(exc, "connections.json", "") from None
        self._endpoint, self._account = self._resolve_access()
        project = config.project_id or self._settings.project_id
        if project is None and self._account is not None:
            project = self._account.project_id
        if config.topic.startswith("projects/"):
            self._topic = config.topic
        elif project is None:
            raise ConfigError("webhooks.json", "module-config.project_id", "no project_id given")
        else:
            self._topic = f"projects/{project}/topics/{config.topic}"
        self._pool_key = f"gcp_pubsub:{self._endpoint}|{self._settings.credentials_path}"
        self._batcher: Coalescer[bytes, str] = Coalescer(self._flush, max_batch=MAX_MESSAGES)

    def _resolve_access(self) -> tuple[str, ServiceAccount | None]:
        """Where to publish, and with which account (None: unauthenticated, an emulator)."""
        settings = self._settings
        emulator = os.environ.get("PUBSUB_EMULATOR_HOST")
        if settings.endpoint is None and emulator:
            return f"http://{emulator}", None
        endpoint = (settings.endpoint or DEFAULT_ENDPOINT).rstrip("/")
        path = settings.credentials_path
        if path is None and settings.endpoint is None:
            path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
            if path is None:
                reason = "no credentials_path (or GOOGLE_APPLICATION_CREDENTIALS) to publish with"
                raise ConfigError("connections.json", "credentials_path", reason)
        if path is None:
            return endpoint, None
        try:
            return endpoint, load_service_account(path)
        except ValueError as exc:
            raise ConfigError("connections.json", "credentials_path", str(exc)) from None

    async def _publisher(self) -> Publisher:
        return await self.pools.get(self._pool_key, self._open_publisher, Publisher.aclose)

    async def _open_publisher(self) -> Publisher:
        timeout = httpx.Timeout(self._settings.timeout_seconds, connect=5.0)
        client = httpx.AsyncClient(timeout=timeout)
        tokens = TokenSource(self._account, SCOPE, client) if self._account else None
        return Publisher(self._endpoint, client, tokens)

    async def start(self) -> None:
        await self._publisher()

    async def deliver(self, message: Message) -> None:
        await self._batcher.submit(orjson.dumps(pubsub_message(message, self.config)))

    async def aclose(self) -> None:
        await self._batcher.aclose()

    async def _flush(self, encoded: list[bytes]) -> list[str | Exception]:
        publisher = await self._publisher()
        results: list[str | Exception] = [Transient("not published")] * len(encoded)

        async def publish(indices: list[int]) -> None:
            chosen = [encoded[i] for i in indices]
            try:
                outcomes: list[str | Exception] = [*await publisher.publish(self._topic, chosen)]
            except Permanent as exc:
                if len(chosen) == 1:
                    outcomes = [exc]
                else:  # One bad message fails the request: publish one by one to find it.
                    outcomes = list(
                        await asyncio.gather(*(self._one(publisher, m) for m in chosen))
                    )
            except DeliveryError as exc:
                outcomes = [exc] * len(chosen)
            for index, outcome in zip(indices, outcomes, strict=True):
                results[index] = outcome

        await asyncio.gather(*(publish(group) for group in requests(encoded)))
        return results

    async def _one(self, publisher: Publisher, message: bytes) -> str | Exception:
        try:
            [message_id] = await publisher.publish(self._topic, [message])
        except DeliveryError as exc:
            return exc
        return message_id
