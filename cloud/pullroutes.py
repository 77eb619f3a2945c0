"""``GET .../sse``, ``GET .../poll`` and ``POST /connect/ack``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from webhook_connect.cloud import logs, metrics
from webhook_connect.cloud.buffers import Buffer
from webhook_connect.cloud.pull import Puller
from webhook_connect.cloud.sessions import (
    NATIVE_HEADER,
    Connection,
    Refusal,
    close_connection,
    find_connection,
    open_connection,
    request_token,
    unavailable,
)
from webhook_connect.shared.exceptions import StorageError
from webhook_connect.shared.frames import (
    MAX_ACK_IDS,
    NATIVE_SUBPROTOCOL,
    WireMessage,
    iso_time,
    native_json,
    seed_message,
)

logger = logging.getLogger("webhook_connect.pull")

HEARTBEAT_SECONDS = 5.0
SSE_BATCH = 100
MAX_ACK_BODY = 256 * 1024
POLL_TIMEOUT_RANGE = (1, 60)
ACK_CACHE_SECONDS = 1.0
ACK_CACHE_SIZE = 10_000
POLL_MAX_MESSAGES_RANGE = (1, 100)


def json_response(status: int, content: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status, headers, media_type="application/json")


def refused(refusal: Refusal) -> Response:
    headers = (
        {"WWW-Authenticate": 'Bearer realm="webhook-connect"'} if refusal.status == 401 else None
    )
    if refusal.status in (429, 503):
        headers = {"Retry-After": "5"}
    return json_response(
        refusal.status, {"error": refusal.error, "detail": refusal.reason}, headers
    )


def is_native(request: Request) -> bool:
    return request.headers.get(NATIVE_HEADER) == NATIVE_SUBPROTOCOL


def message_json(message: WireMessage, native: bool) -> dict[str, Any]:
    return native_json(message) if native else seed_message(message)


def sse_event(event: str, data: bytes, event_id: str | None = None) -> bytes:
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "")
    return head.encode() + b"data: " + data + b"\n\n"


class PullRoutes:
    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer
        self._ack_cache: dict[tuple[str, str], tuple[float, Connection]] = {}
        self._sent = metrics.SentTimes()

    def _sending(self, connection: Connection, messages: list[WireMessage]) -> None:
        """Note when messages left, for the ack latency of acks that come back here."""
        self._sent.sent(connection.consumer, (m.message_id for m in messages), time.monotonic())
        logs.log_redeliveries(connection.group, connection.consumer, messages)

    # SSE -------------------------------------------------------------------------------

    async def sse(self, request: Request) -> Response:
        channel = request.path_params["channel"]
        native = is_native(request)
        try:
            connection = await open_connection(self.buffer, request, channel, "sse")
        except Refusal as refusal:
            return refused(refusal)
        if last := request.headers.get("last-event-id"):
            # At-least-once: what the old stream held was given back when it closed and comes
            # again now; the connector's delivered log skips what it already handled.
            logger.info("connector %s resumes after %s", connection.consumer, last[:64])
        return StreamingResponse(
            self._events(connection, native),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                     "X-Connection-ID": connection.consumer},
        )  # fmt: skip

    async def _events(self, connection: Connection, native: bool) -> AsyncIterator[bytes]:
        puller = Puller(self.buffer, connection)
        try:
            hello = {
                "type": "connected", "connection_id": connection.consumer,
                "channel": connection.channel, "timestamp": iso_time(time.time()),
                "group": connection.group, "max_in_flight": connection.window,
                "protocol": "native" if native else "seed",
            }  # fmt: skip
            yield sse_event("connected", orjson.dumps(hello))
            beat_at = time.monotonic() + HEARTBEAT_SECONDS
            while True:
                messages = await puller.next_batch(SSE_BATCH, beat_at)
                if messages:
                    self._sending(connection, messages)
                    yield b"".join(
                        sse_event("webhook", orjson.dumps(message_json(m, native)), m.message_id)
                        for m in messages
                    )
                if time.monotonic() >= beat_at:
                    beat = {"type": "heartbeat", "timestamp": iso_time(time.time())}
                    yield sse_event("heartbeat", orjson.dumps(beat))
                    beat_at = time.monotonic() + HEARTBEAT_SECONDS
        except Refusal as refusal:
            error = {"type": "error", "error": refusal.error, "detail": refusal.reason}
            yield sse_event("error", orjson.dumps(error))
        finally:
            with anyio.CancelScope(shield=True):
                await close_connection(self.buffer, connection)

    # Long-poll ---------------------------------------------------------------------------

    async def poll(self, request: Request) -> Response:
        params = request.query_params
        try:
            timeout = _bounded(params.get("timeout", "30"), POLL_TIMEOUT_RANGE, "timeout")
            max_messages = _bounded(
                params.get("max_messages", "10"), POLL_MAX_MESSAGES_RANGE, "max_messages"
            )
        except ValueError as exc:
            return json_response(400, {"error": "bad_request", "detail": str(exc)})
        channel = request.path_params["channel"]
        connection_id = request.headers.get("x-connection-id") or params.get("connection_id")
        try:
            if connection_id:
                connection = await find_connection(self.buffer, request, connection_id)
                if connection.channel != channel:
                    raise Refusal(404, 0, "unknown_connection", "no such connection here")
            else:
                connection = await open_connection(self.buffer, request, channel, "long_poll")
            puller = Puller(self.buffer, connection)
            # The connection lives across polls: each poll counts as a sign of life.
            waiting = asyncio.ensure_future(
                puller.next_batch(max_messages, time.monotonic() + timeout)
            )
            gone = asyncio.ensure_future(_disconnected(request))
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not waiting.done():
                # The client left mid-poll: nothing was read for it, nothing is lost.
                waiting.cancel()
                return Response(status_code=499)
            messages = waiting.result()
        except Refusal as refusal:
            return refused(refusal)
        headers = {"X-Connection-ID": connection.consumer}
        if not messages:
            return Response(status_code=204, headers=headers)
        self._sending(connection, messages)
        native = is_native(request)
        return json_response(
            200,
            {
                "messages": [message_json(m, native) for m in messages],
                "connection_id": connection.consumer,
                "channel": connection.channel,
                "count": len(messages),
            },
            headers,
        )

    # Acks ----------------------------------------------------------------------------------

    async def ack(self, request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_ACK_BODY:
                return json_response(413, {"error": "body_too_large", "detail": MAX_ACK_BODY})
        try:
            frame = AckRequest.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return json_response(
                400, {"error": "bad_request", "detail": f"{where}: {first['msg']}"}
            )
        ids = frame.ids()
        if not ids:
            return json_response(400, {"error": "bad_request", "detail": "no message_id given"})
        try:
            connection = await self._ack_connection(request)
            done = await self._settle(connection, frame, ids)
        except Refusal as refusal:
            return refused(refusal)
        unknown = [i for i, ok in zip(ids, done, strict=True) if not ok]
        if frame.message_id is not None and not frame.message_ids:
            if unknown:
                detail = "not in flight on this connection (unknown, foreign, or redelivered)"
                return json_response(404, {"error": "unknown_message", "detail": detail})
            return json_response(
                200, {"status": "acknowledged" if frame.status == "ack" else "nacked"}
            )
        return json_response(
            200, {"status": "ok", "settled": len(ids) - len(unknown), "unknown": unknown}
        )

    async def _ack_connection(self, request: Request) -> Connection:
        """The connection an ack names, remembered for a moment: a connector acks a batch
        every few milliseconds, and looking up token and connection each time cost more than
        the acks. Acks are idempotent and checked per consumer, so a second of staleness after
        a revocation cannot settle anything the connection does not hold."""
        connection_id = request.headers.get("x-connection-id") or ""
        key = (request_token(request) or "", connection_id)
        now = time.monotonic()
        cached = self._ack_cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        connection = await find_connection(self.buffer, request, connection_id)
        if len(self._ack_cache) > ACK_CACHE_SIZE:
            self._ack_cache.clear()
        self._ack_cache[key] = (now + ACK_CACHE_SECONDS, connection)
        return connection

    async def _settle(
        self, connection: Connection, frame: AckRequest, ids: list[str]
    ) -> list[bool]:
        buffer = self.buffer
        channel, group, consumer = connection.channel, connection.group, connection.consumer
        retry, reason = frame.retry, frame.reason or ("nack_retry" if frame.retry else "nack")
        try:
            if frame.status == "ack":
                calls = [buffer.ack(channel, group, i, consumer) for i in ids]
            else:
                calls = [
                    buffer.nack(channel, group, i, retry=retry, consumer=consumer, reason=reason)
                    for i in ids
                ]
            # Pipelined: the acks of one POST share round trips.
            done = await asyncio.gather(*calls)
        except StorageError as exc:
            raise unavailable(exc) from exc
        settled = list(zip(ids, done, strict=True))
        if frame.status == "ack":
            acked = [i for i, ok in settled if ok]
            ages = self._sent.settled(consumer, acked, time.monotonic())
            metrics.observe_ack_latency(channel, ages)
        else:
            self._sent.settled(consumer, ids, time.monotonic())  # a retry is timed when resent
        logs.log_settled(
            channel, group, consumer, settled,
            ack=frame.status == "ack", retry=retry, reason=reason,
        )  # fmt: skip
        buffer.wake(channel)  # a stream of this replica may be waiting for room in its window
        return list(done)


class AckRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    message_id: str | None = Field(default=None, max_length=200)
    message_ids: list[str] = Field(default_factory=list, max_length=MAX_ACK_IDS)
    status: Literal["ack", "nack"] = "ack"
    retry: bool = True
    reason: str = Field(default="", max_length=500)

    def ids(self) -> list[str]:
        return [*self.message_ids, *([self.message_id] if self.message_id else [])]


async def _disconnected(request: Request) -> None:
    """Return when the client of a body-less request goes away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _bounded(text: str, bounds: tuple[int, int], name: str) -> int:
    low, high = bounds
    if not text.isdigit() or not low <= int(text) <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}")
    return int(text)
