"""``GET .../sse``, ``GET .../poll`` and ``POST /connect/ack``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from webhook_connect.cloud import logs, metrics, stopping
from webhook_connect.cloud.buffers import Buffer
from webhook_connect.cloud.pull import HEARTBEAT_SECONDS, Puller, Unacknowledged
from webhook_connect.cloud.responses import refusal_response
from webhook_connect.cloud.session import remote_plan
from webhook_connect.cloud.sessions import (
    NATIVE_HEADER,
    Connection,
    close_connection,
    find_connection,
    hello,
    open_connection,
    request_token,
    settle,
)
from webhook_connect.shared.exceptions import ConnectorRefusal, HttpRefusal
from webhook_connect.shared.frames import (
    NATIVE_SUBPROTOCOL,
    FrameError,
    WireMessage,
    ack_request_from_query,
    encode_error,
    encode_heartbeat,
    native_json,
    seed_message,
    sse_event,
)
from webhook_connect.shared.frames import (
    AckRequest as AckRequest,  # the body of POST /connect/ack, named here in the API spec
)

logger = logging.getLogger("webhook_connect.pull")

SSE_BATCH = 100
MAX_ACK_BODY = 256 * 1024
POLL_TIMEOUT_RANGE = (1, 60)
ACK_CACHE_SECONDS = 1.0
ACK_CACHE_SIZE = 10_000
POLL_MAX_MESSAGES_RANGE = (1, 100)


def json_response(status: int, content: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status, headers, media_type="application/json")


def refused(refusal: ConnectorRefusal) -> Response:
    """A refused connector request, answered like every refused HTTP request."""
    return refusal_response(refusal.as_http())


def bad_request(status: int, error: str, detail: object) -> Response:
    return refusal_response(HttpRefusal(status, error, detail))


def is_native(request: Request) -> bool:
    return request.headers.get(NATIVE_HEADER) == NATIVE_SUBPROTOCOL


def message_json(message: WireMessage, native: bool) -> dict[str, Any]:
    return native_json(message) if native else seed_message(message)


class PullRoutes:
    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer
        self._ack_cache: dict[tuple[str, str], tuple[float, Connection]] = {}
        self._sent = metrics.SentTimes()
        self._streams: dict[str, Puller] = {}  # this process's SSE streams by connection id

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
        except ConnectorRefusal as refusal:
            return refused(refusal)
        if last := request.headers.get("last-event-id"):
            # At-least-once: what the old stream held was given back when it closed and comes
            # again now; the connector's delivered log skips what it already handled.
            logger.info("connector %s resumes after %s", connection.consumer, last[:64])
        return StreamingResponse(
            self._events(connection, native),
            media_type="text/event-stream",
            headers={
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "X-Connection-ID": connection.consumer,
            },
        )

    async def _events(self, connection: Connection, native: bool) -> AsyncIterator[bytes]:
        puller = Puller(self.buffer, connection, HEARTBEAT_SECONDS, ends_on_own_redelivery=True)
        session = puller.session
        self._streams[connection.consumer] = puller
        try:
            yield sse_event("connected", hello(connection, native, time.time()))
            while True:
                messages = await puller.next_batch(SSE_BATCH, session.beat_at)
                if messages:
                    self._sending(connection, messages)
                    yield b"".join(
                        sse_event("webhook", orjson.dumps(message_json(m, native)), m.message_id)
                        for m in messages
                    )
                if session.heartbeat_due(time.monotonic()):
                    yield sse_event("heartbeat", encode_heartbeat(time.time()))
                    session.heartbeat_sent(time.monotonic())
        except ConnectorRefusal as refusal:
            yield sse_event("error", encode_error(refusal.error, detail=refusal.reason))
        except Unacknowledged as unacked:
            # Ending the stream gives back what it held (the message just read again
            # included) to whichever connection reads next: a live connector dials again.
            logger.warning(
                "connector %s acknowledged nothing of message %s within the ack timeout; "
                "ending its stream (a dead link, or its acks lost)",
                connection.consumer,
                unacked,
            )
        finally:
            self._streams.pop(connection.consumer, None)
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
            return bad_request(400, "bad_request", str(exc))
        channel = request.path_params["channel"]
        connection_id = request.headers.get("x-connection-id") or params.get("connection_id")
        try:
            if connection_id:
                connection = await find_connection(self.buffer, request, connection_id)
                if connection.channel != channel:
                    raise ConnectorRefusal(404, 0, "unknown_connection", "no such connection here")
            else:
                # A seed poll without an id may be the Core Webhook Module's connector, which
                # never sends one: continue its connection. The native connector always does.
                connection = await open_connection(
                    self.buffer, request, channel, "long_poll", resume=not is_native(request)
                )
            puller = Puller(self.buffer, connection)
            # The connection lives across polls: each poll counts as a sign of life.
            waiting = asyncio.ensure_future(
                puller.next_batch(max_messages, time.monotonic() + timeout)
            )
            gone = asyncio.ensure_future(_disconnected(request))
            # On shutdown a poll answers "poll again" (204) at once, before uvicorn's graceful
            # timeout cancels it: the connector polls again, elsewhere or once restarted.
            shutdown = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({waiting, gone, shutdown}, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            shutdown.cancel()
            if not waiting.done():
                # Nothing was read for this poll yet, so nothing is lost.
                waiting.cancel()
                if gone.done():  # the client left mid-poll
                    return Response(status_code=499)
                messages = []
            else:
                messages = waiting.result()
        except ConnectorRefusal as refusal:
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
                return bad_request(413, "body_too_large", MAX_ACK_BODY)
        try:
            # No body: the ack is in the query (the Core Webhook Module's connector acks so).
            if body:
                frame = AckRequest.model_validate_json(body)
            else:
                frame = ack_request_from_query(request.query_params.multi_items())
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return bad_request(400, "bad_request", f"{where}: {first['msg']}")
        except FrameError as exc:
            return bad_request(400, "bad_request", str(exc))
        ids = frame.ids()
        if not ids:
            return bad_request(400, "bad_request", "no message_id given")
        try:
            connection = await self._ack_connection(request)
            done = await self._settle(connection, frame)
        except ConnectorRefusal as refusal:
            return refused(refusal)
        unknown = [i for i, ok in zip(ids, done, strict=True) if not ok]
        if frame.message_id is not None and not frame.message_ids:
            if unknown:
                detail = "not in flight on this connection (unknown, foreign, or redelivered)"
                return bad_request(404, "unknown_message", detail)
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

    async def _settle(self, connection: Connection, frame: AckRequest) -> list[bool]:
        outcome = await settle(self.buffer, connection, remote_plan(frame.settlement()))
        consumer, now = connection.consumer, time.monotonic()
        if frame.status == "ack":
            acked = [i for i, ok in outcome.settled if ok]
            metrics.observe_ack_latency(
                connection.channel, self._sent.settled(consumer, acked, now)
            )
        else:
            self._sent.settled(consumer, frame.ids(), now)  # a retry is timed when resent
            if (stream := self._streams.get(consumer)) is not None:
                stream.nacked(frame.ids())  # its retry is no sign of a dead stream
        # A stream of this replica may be waiting for room in its window.
        self.buffer.wake(connection.channel)
        return [ok for _, ok in outcome.settled]


async def _disconnected(request: Request) -> None:
    """Return when the client of a body-less request goes away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _bounded(text: str, bounds: tuple[int, int], name: str) -> int:
    low, high = bounds
    if not text.isdigit() or not low <= int(text) <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}")
    return int(text)
