"""``POST /webhook/{webhook_id}``: receive, check, store durably, then answer ``202``.

Raw ASGI on purpose: this is the hot path, and the body must be streamed so that an oversized
upload is refused as soon as it crosses the limit instead of being buffered whole.

Order of the checks (docs/CONFIGURATION.md): unknown webhook 404, method 405,
header limits 431, sender address 403, the source address's limits 429 (locked out after
failed authentications, ``source_rate_limit``), body size 413, authentication 401, rate limits
429, body rules 400/422, then storage (503 when full or down). ``rate_limit`` is counted after
authentication on purpose: counted before, anyone who knows a webhook's URL could spend the
real sender's quota and have its deliveries refused. A retried delivery that was stored
already is answered 202 with the original message id.

Every refusal is a :class:`Rejected` answered in one place, where it is counted by its error
code (``cloud/metrics.py``: an in-memory add, no storage round trip) and logged with the 202s.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.types import Receive, Scope, Send

from webhook_connect.cloud import logs, metrics
from webhook_connect.cloud.buffers import Buffer
from webhook_connect.cloud.responses import refusal_response, send_json
from webhook_connect.cloud.security.guard import Guard, RateLimit
from webhook_connect.cloud.security.inbound import InboundRequest, Rejected
from webhook_connect.cloud.security.lockout import Lockouts, source_key
from webhook_connect.cloud.security.network import client_address
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.exceptions import ChannelFull, StorageError

logger = logging.getLogger("webhook_connect.ingest")

PREFIX = "/webhook/"
STORAGE_LOG_INTERVAL = 5.0  # an outage under load: one line per interval, not per request
RETRY_FULL = [(b"retry-after", b"5")]
RETRY_UNAVAILABLE = [(b"retry-after", b"2")]
CLOSE = [(b"connection", b"close")]
# Answered, never raised: a raised instance would keep the frames of its last raise.
UNKNOWN_WEBHOOK = Rejected(404, "unknown_webhook", "no webhook with this id")


@dataclass(frozen=True, slots=True)
class BodyTooLarge(Exception):
    """The body crossed ``limit`` bytes while streaming in."""

    limit: int


class ClientGone(Exception):
    """The client disconnected before the body was complete: store nothing."""


class IngestEndpoint:
    """Stores each accepted webhook in its channel and answers only once it is durable."""

    def __init__(self, guards: Mapping[str, Guard], buffer: Buffer) -> None:
        # Replaced whole on a configuration reload; a request keeps the guard it started with.
        self.guards = guards
        self._buffer = buffer
        self.is_ready = False
        self._lockouts = Lockouts()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guard = self.guards.get(scope["path"][len(PREFIX) :])
        if guard is None:
            # Counted without the id: a stranger's made-up ids must not become label values.
            metrics.count_unknown_webhook()
            await refusal_response(UNKNOWN_WEBHOOK)(scope, receive, send)
            return
        started = time.perf_counter()
        webhook_id, channel = guard.webhook.webhook_id, guard.webhook.relay.channel
        metrics.count_received(channel)
        peer = scope.get("client")
        client = peer[0] if peer else ""
        try:
            request = self._inbound(guard, scope, client)
            client = request.client
            await self._admit(guard, request, receive)
            message_id, is_new = await self._store(guard, request)
        except (Rejected, StorageError) as exc:
            refused = exc if isinstance(exc, Rejected) else storage_refusal(exc)
            metrics.count_rejected(channel, refused.error)
            await refusal_response(refused)(scope, receive, send)
            metrics.observe_ingest(channel, refused.status, started)
            logs.log_ingest(webhook_id, channel, refused.status, refused.error, started, client)
            return
        except ClientGone:
            metrics.observe_ingest(channel, 499, started)
            logs.log_ingest(webhook_id, channel, 499, "client_gone", started, client)
            return
        answer: dict[str, object] = {"status": "accepted", "message_id": message_id}
        if not is_new:
            answer["duplicate"] = True
            metrics.count_duplicate(channel)
        await send_json(send, 202, answer)
        metrics.observe_ingest(channel, 202, started)
        logs.log_ingest(webhook_id, channel, 202, message_id, started, client)

    def _inbound(self, guard: Guard, scope: Scope, peer: str) -> InboundRequest:
        """The request as checks see it, once method and header limits allow it."""
        entry = guard.entry
        if scope["method"] not in entry.methods:
            allow = ", ".join(entry.methods)
            raise Rejected(405, "method_not_allowed", allow, [(b"allow", allow.encode())])
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if len(headers) > guard.max_headers or (
            sum(len(k) + len(v) for k, v in headers) > guard.max_header_size
        ):
            detail = f"at most {guard.max_headers} headers and {guard.max_header_size} bytes"
            raise Rejected(431, "headers_too_large", detail, CLOSE)
        request = InboundRequest(
            webhook_id=guard.webhook.webhook_id,
            method=scope["method"],
            scheme=scope.get("scheme", "http"),
            path=scope.get("raw_path", scope["path"].encode()).decode("latin-1"),
            query_string=scope["query_string"].decode("latin-1"),
            raw_headers=headers,
            body=b"",
            peer=peer,
            client=peer,
            now=time.time(),
        )
        if guard.trusted_proxies:
            request.client = client_address(
                peer, headers, guard.trusted_proxies, guard.client_ip_header
            )
        return request

    async def _admit(self, guard: Guard, request: InboundRequest, receive: Receive) -> None:
        """Run every check in order, reading the body when it is needed; raise Rejected."""
        if guard.ip_check is not None:
            await guard.ip_check(request)
        # Cheap refusals of one source, before the body is read or any signature computed.
        source = source_key(request.client)
        if guard.failed_auth_limit is not None:
            self._refuse_locked_out(guard.failed_auth_limit, source)
        if guard.source_rate_limit is not None:
            limit = guard.source_rate_limit
            await self._count(guard, limit, limit.key + source, "source_rate_limited")
        try:
            request.body = await read_body(receive, request.raw_headers, guard.entry.max_body_size)
        except BodyTooLarge as exc:
            detail = f"the body is larger than {exc.limit} bytes"
            raise Rejected(413, "body_too_large", detail, CLOSE) from None
        except ValueError as exc:
            raise Rejected(400, "bad_request", str(exc), CLOSE) from None
        try:
            for check in guard.checks:
                await check(request)
        except Rejected as exc:
            if guard.failed_auth_limit is not None and is_failure(exc, request):
                await self._count_failure(guard, guard.failed_auth_limit, source)
            raise
        for limit in guard.rate_limits:
            await self._count(guard, limit, limit.key)
        guard.payload.check(request.body)

    async def _count(
        self, guard: Guard, limit: RateLimit, key: str, error: str = "rate_limited"
    ) -> None:
        channel = guard.webhook.relay.channel
        wait = await self._buffer.hit_rate(channel, key, limit.max_requests, limit.window_seconds)
        if wait > 0:
            detail = f"more than {limit.max_requests} requests in {limit.window_seconds:g} s"
            raise Rejected(429, error, detail, retry_after(wait))

    def _refuse_locked_out(self, limit: RateLimit, source: str) -> None:
        wait = self._lockouts.remaining(limit.key + source, time.monotonic())
        if wait > 0:
            raise locked_out(limit, wait)

    async def _count_failure(self, guard: Guard, limit: RateLimit, source: str) -> None:
        """Count a failed authentication of ``source``; past the limit, lock it out here for
        the rest of the window and answer 429 instead of 401."""
        channel, key = guard.webhook.relay.channel, limit.key + source
        try:
            wait = await self._buffer.hit_rate(
                channel, key, limit.max_requests, limit.window_seconds
            )
        except StorageError:
            return  # the 401 stands: storage trouble must not change the answer
        if wait > 0:
            now = time.monotonic()
            self._lockouts.lock(key, now + wait, now)
            raise locked_out(limit, wait)

    async def _store(self, guard: Guard, request: InboundRequest) -> tuple[str, bool]:
        """Store the message durably; its id, and False for a provider's retry of one stored."""
        if not self.is_ready:
            raise Rejected(503, "not_ready", "storage is not provisioned yet", RETRY_UNAVAILABLE)
        webhook = guard.webhook
        envelope = Envelope(
            channel=webhook.relay.channel,
            webhook_id=webhook.webhook_id,
            received_at=request.now,
            method=request.method,
            path=request.path,
            query_string=request.query_string,
            headers=tuple(
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers
            ),
            body=request.body,
            client=request.client,
        )
        delivery = None if guard.delivery_key is None else guard.delivery_key(request)
        if delivery is None:
            return await self._buffer.append(envelope), True
        return await self._buffer.append_once(
            envelope, f"{webhook.webhook_id}:{delivery}", guard.idempotency_window
        )


def is_failure(exc: Rejected, request: InboundRequest) -> bool:
    """Whether a refusal counts as a failed authentication: a 401, except the challenges of
    HTTP Digest's handshake (no credentials yet, or a stale nonce), which every honest Digest
    sender receives."""
    if exc.status != 401:
        return False
    challenge = next((v for k, v in exc.headers if k == b"www-authenticate"), b"")
    if challenge[:6].lower() == b"digest":
        return request.header("authorization") is not None and b"stale=true" not in challenge
    return True


def locked_out(limit: RateLimit, wait: float) -> Rejected:
    """429 for a source past ``failed_auth_limit``, until its window ends."""
    detail = (
        f"more than {limit.max_requests} failed authentications from this address "
        f"in {limit.window_seconds:g} s"
    )
    return Rejected(429, "too_many_auth_failures", detail, retry_after(wait))


def retry_after(wait: float) -> list[tuple[bytes, bytes]]:
    return [(b"retry-after", str(max(1, math.ceil(wait))).encode())]


_storage_logged_at = -STORAGE_LOG_INTERVAL


def storage_refusal(exc: StorageError) -> Rejected:
    """503 with ``Retry-After``: connectors drain a full channel, storage comes back."""
    if isinstance(exc, ChannelFull):
        return Rejected(503, "channel_full", str(exc), RETRY_FULL)
    # The sender learns only that storage is down; what failed where (hosts, paths, driver
    # errors) is for the operator's log.
    global _storage_logged_at
    now = time.monotonic()
    if now - _storage_logged_at >= STORAGE_LOG_INTERVAL:
        _storage_logged_at = now
        logger.warning("webhooks answered 503, storage unavailable: %s", exc)
    return Rejected(503, "storage_unavailable", "storage unavailable", RETRY_UNAVAILABLE)


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
