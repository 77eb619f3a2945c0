"""``POST /webhook/{webhook_id}``: receive, check, store durably, then answer ``202``.

Raw ASGI on purpose: this is the hot path, and the body must be streamed so that an oversized
upload is refused as soon as it crosses the limit instead of being buffered whole.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import orjson
from starlette.types import Receive, Scope, Send

from cloud.buffers import Buffer
from cloud.responses import send_error, send_json
from shared.config import Webhook
from shared.envelope import Envelope
from shared.exceptions import ChannelFull, StorageError, StorageUnavailable, UnknownChannel

PREFIX = "/webhook/"
MAX_HEADER_COUNT = 100
MAX_HEADER_BYTES = 32 * 1024
RETRY_AFTER_FULL = b"5"
RETRY_AFTER_UNAVAILABLE = b"2"
CLOSE = [(b"connection", b"close")]


@dataclass(frozen=True, slots=True)
class BodyTooLarge(Exception):
    """The body crossed ``limit`` bytes while streaming in."""

    limit: int


class ClientGone(Exception):
    """The client disconnected before the body was complete: store nothing."""


class IngestEndpoint:
    """Stores each accepted webhook in its channel and answers only once it is durable."""

    def __init__(self, webhooks: Mapping[str, Webhook], buffer: Buffer) -> None:
        self._webhooks = webhooks
        self._buffer = buffer
        self.is_ready = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        webhook = self._webhooks.get(scope["path"][len(PREFIX) :])
        if webhook is None:
            await send_error(send, 404, "unknown_webhook", "no webhook with this id")
            return
        entry = webhook.entry
        if scope["method"] not in entry.methods:
            allow = ", ".join(entry.methods).encode()
            await send_error(send, 405, "method_not_allowed", None, [(b"allow", allow)])
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if len(headers) > MAX_HEADER_COUNT or (
            sum(len(k) + len(v) for k, v in headers) > MAX_HEADER_BYTES
        ):
            detail = f"at most {MAX_HEADER_COUNT} headers and {MAX_HEADER_BYTES} bytes"
            await send_error(send, 431, "headers_too_large", detail, CLOSE)
            return
        try:
            body = await read_body(receive, headers, entry.max_body_size)
        except BodyTooLarge as exc:
            detail = f"the body is larger than {exc.limit} bytes"
            await send_error(send, 413, "body_too_large", detail, CLOSE)
            return
        except ValueError as exc:
            await send_error(send, 400, "bad_request", str(exc), CLOSE)
            return
        except ClientGone:
            return
        if entry.data_type == "json":
            problem = json_problem(body)
            if problem:
                await send_error(send, 400, "invalid_json", problem)
                return
        await self._store(scope, send, webhook, headers, body)

    async def _store(
        self,
        scope: Scope,
        send: Send,
        webhook: Webhook,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        if not self.is_ready:
            await send_error(
                send, 503, "not_ready", "storage is not provisioned yet",
                [(b"retry-after", RETRY_AFTER_UNAVAILABLE)],
            )  # fmt: skip
            return
        client = scope.get("client")
        envelope = Envelope(
            channel=webhook.relay.channel,
            webhook_id=webhook.webhook_id,
            received_at=time.time(),
            method=scope["method"],
            path=scope.get("raw_path", scope["path"].encode()).decode("latin-1"),
            query_string=scope["query_string"].decode("latin-1"),
            headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers),
            body=body,
            client=client[0] if client else "",
        )
        try:
            message_id = await self._buffer.append(envelope)
        except ChannelFull as exc:
            await send_error(
                send, 503, "channel_full", str(exc), [(b"retry-after", RETRY_AFTER_FULL)]
            )
            return
        except (StorageUnavailable, UnknownChannel, StorageError) as exc:
            retry = [(b"retry-after", RETRY_AFTER_UNAVAILABLE)]
            await send_error(send, 503, "storage_unavailable", str(exc), retry)
            return
        await send_json(send, 202, {"status": "accepted", "message_id": message_id})


async def read_body(receive: Receive, headers: list[tuple[bytes, bytes]], limit: int) -> bytes:
    """Read the request body, refusing it as soon as it is known to exceed ``limit``."""
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit():
                raise ValueError("Content-Length is not a number")
            if int(value) > limit:
                raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def json_problem(body: bytes) -> str | None:
    """Why ``body`` is not a JSON document, or None if it is one."""
    if not body:
        return "the body is empty; this webhook expects JSON"
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return f"the body is not valid JSON: {exc}"
    return None
