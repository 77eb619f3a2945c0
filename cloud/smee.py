"""``GET /smee/{channel}``: the smee.io event stream, so the stock ``smee-client`` is a connector.

smee-client forwards each ``message`` event as a POST to its target: every top-level key but
``body``, ``query`` and ``timestamp`` becomes a header, and ``body`` is re-serialised as JSON.
So only real request headers go there, as strings, without hop-by-hop ones. It never acks: a
message counts as delivered once it has been on the wire for ``ACK_LAG`` seconds; whatever a
stream held for less when it broke is sent again to the next stream of the group, except what
the client names with ``Last-Event-ID`` (event ids are buffer positions).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from webhook_connect.cloud.buffers import Buffer
from webhook_connect.cloud.pull import Puller
from webhook_connect.cloud.pullroutes import refused
from webhook_connect.cloud.session import remote_plan
from webhook_connect.cloud.sessions import Connection, close_connection, open_connection, settle
from webhook_connect.shared.exceptions import ConnectorRefusal
from webhook_connect.shared.frames import Settlement, WireMessage, sse_event

WINDOW = 1000
ACK_LAG = 1.0
PING_SECONDS = 10.0
# Laid out by kind (hop-by-hop headers, then the keys smee-client reads itself), not one a line.
EXCLUDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "expect",
        "te",
        "trailer",
        "host",
        "content-length",
        "body",
        "query",
        "timestamp",
    }
)


def smee_payload(message: WireMessage) -> dict[str, Any]:
    """The JSON of a smee.io ``message`` event for one stored webhook."""
    envelope = message.envelope
    payload: dict[str, Any] = {}
    for name, value in envelope.headers:
        key = name.lower()
        if key in EXCLUDED:
            continue
        payload[key] = f"{payload[key]}, {value}" if key in payload else value
    try:
        body: Any = orjson.loads(envelope.body) if envelope.body else {}
    except orjson.JSONDecodeError:
        body = envelope.body.decode("utf-8", "replace")
    payload["body"] = body
    payload["query"] = dict(parse_qsl(envelope.query_string, keep_blank_values=True))
    payload["timestamp"] = int(envelope.received_at * 1000)
    return payload


def position(message_id: str) -> tuple[int, ...]:
    """Buffer position of an id (``ms-seq``), for comparing with ``Last-Event-ID``."""
    try:
        return tuple(int(part) for part in message_id.split("-"))
    except ValueError:
        return ()


class SmeeRoute:
    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer

    async def stream(self, request: Request) -> Response:
        channel = request.path_params["channel"]
        try:
            connection = await open_connection(self.buffer, request, channel, "smee")
        except ConnectorRefusal as refusal:
            return refused(refusal)
        connection = Connection(connection.record, connection.spec, WINDOW)
        seen = position(request.headers.get("last-event-id", ""))
        return StreamingResponse(
            self._events(connection, seen),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events(self, connection: Connection, seen: tuple[int, ...]) -> AsyncIterator[bytes]:
        puller = Puller(self.buffer, connection, PING_SECONDS)
        session = puller.session
        sent: deque[tuple[float, list[str]]] = deque()
        try:
            yield sse_event("ready", b"{}")
            while True:
                deadline = min(session.beat_at, time.monotonic() + ACK_LAG)
                messages = await puller.next_batch(100, deadline)
                # What the client says it has (Last-Event-ID after a reconnect) is done.
                old = [m.message_id for m in messages if seen and position(m.message_id) <= seen]
                await self._ack(connection, old)
                fresh = [m for m in messages if m.message_id not in old]
                if fresh:
                    yield b"".join(
                        sse_event("message", orjson.dumps(smee_payload(m)), m.message_id)
                        for m in fresh
                    )
                    sent.append((time.monotonic(), [m.message_id for m in fresh]))
                while sent and sent[0][0] < time.monotonic() - ACK_LAG:
                    await self._ack(connection, sent.popleft()[1])
                if session.heartbeat_due(time.monotonic()):
                    yield sse_event("ping", b"{}")
                    session.heartbeat_sent(time.monotonic())
        except ConnectorRefusal as refusal:
            yield sse_event("error", orjson.dumps({"error": refusal.error}))
        finally:
            with anyio.CancelScope(shield=True):
                await close_connection(self.buffer, connection)

    async def _ack(self, connection: Connection, message_ids: list[str]) -> None:
        if not message_ids:
            return
        plan = remote_plan(Settlement(tuple(message_ids)))
        with contextlib.suppress(ConnectorRefusal):  # storage down: not acked, sent again later
            await settle(self.buffer, connection, plan)
