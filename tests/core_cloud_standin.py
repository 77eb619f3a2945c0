"""A stand-in for the Core Webhook Module's cloud, written from its documentation (its docs/ and
the wire behaviour its connector shows), for testing our connector against it.

What it speaks, and nothing more:

* ``POST /webhook/{webhook_id}``: the body is kept *parsed* (JSON, else text) with the request
  headers as an object, answered ``200 {"status": "accepted", "message_id": "msg_…"}``.
* ``GET /connect/stream/{channel}`` (WebSocket): token from ``Authorization: Bearer`` or
  ``?token=``; a bad token closes with 4001 before the upgrade, an unknown channel with 4002;
  no subprotocol is ever chosen. Frames: ``connected``, ``webhook``, ``heartbeat``; the client
  sends ``ack`` / ``nack`` (``retry``) with one ``message_id`` each, and ``heartbeat``.
* ``GET /connect/stream/{channel}/sse``: the same events as SSE (``event:`` and ``data:``); a
  bad token is ``401``.
* ``GET /connect/stream/{channel}/poll``: the next message in a ``messages`` list, or ``204``;
  the connection is forgotten as the answer leaves.
* ``POST /connect/ack?message_id=…&status=ack|nack&retry=true|false`` with ``Authorization``
  and ``X-Connection-ID``; the body is not read. A missing ``message_id`` or connection header
  is ``422``; an unknown connection or a message it does not hold is ``404``.

The ``webhook`` frame is flat (``type, message_id, sequence, webhook_id, timestamp, headers,
payload``: what its cloud sends) or, with ``--shape nested``, has the request under ``data``
(the form its specification draws, with an SSE ``id:`` line). No query string, no method, no
attempt count: it has none.

``GET /standin/events`` lists what connectors did (connections, acks, nacks, heartbeats) and
``GET /standin/state`` what is queued, in flight and dead-lettered, for the tests to poll.

Run: ``python -m tests.core_cloud_standin --port 8000 --channel dev --token secret``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from tests.servers import REPO, free_port, stop, wait_until

MAX_IN_FLIGHT = 100


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class Connection:
    connection_id: str
    protocol: str
    in_flight: set[str] = field(default_factory=set)


@dataclass
class Standin:
    """The stand-in's whole state: one channel, its queue, its connections."""

    channel: str
    token: str
    shape: str
    heartbeat: float
    queue: deque[dict[str, Any]] = field(default_factory=deque)
    held: dict[str, dict[str, Any]] = field(default_factory=dict)
    connections: dict[str, Connection] = field(default_factory=dict)
    dead: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    sequence: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def token_ok(self, authorization: str | None, query_token: str | None) -> bool:
        token = (authorization or "").replace("Bearer ", "").strip() or (query_token or "")
        return token == self.token

    def open(self, protocol: str) -> Connection:
        prefix = {"websocket": "wsc", "sse": "sse"}.get(protocol, "poll")
        connection = Connection(f"{prefix}_{uuid.uuid4().hex[:12]}", protocol)
        self.connections[connection.connection_id] = connection
        self.events.append({"kind": "connected", "connection_id": connection.connection_id})
        return connection

    def close(self, connection: Connection) -> None:
        """What the connection held goes back to the queue, as its cloud does on disconnect."""
        for message_id in sorted(connection.in_flight):
            self.queue.appendleft(self.held.pop(message_id))
        connection.in_flight.clear()
        self.connections.pop(connection.connection_id, None)
        self.events.append({"kind": "closed", "connection_id": connection.connection_id})
        self.arrived.set()

    async def next_for(self, connection: Connection, within: float) -> dict[str, Any] | None:
        """The next message for ``connection`` within ``within`` seconds, now in flight."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not self.queue or len(connection.in_flight) >= MAX_IN_FLIGHT:
            self.arrived.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), remaining)
        message = self.queue.popleft()
        connection.in_flight.add(message["message_id"])
        self.held[message["message_id"]] = message
        return message

    def settle(
        self, connection: Connection, message_id: str, ack: bool, retry: bool, via: str, **seen: Any
    ) -> bool:
        self.events.append(
            {
                "kind": "ack" if ack else "nack",
                "via": via,
                "connection_id": connection.connection_id,
                "message_id": message_id,
                "retry": retry,
                "held": message_id in connection.in_flight,
                **seen,
            }
        )
        if message_id not in connection.in_flight:
            return False
        connection.in_flight.discard(message_id)
        message = self.held.pop(message_id)
        if not ack:
            if retry:
                self.queue.append(message)
                self.arrived.set()
            else:
                self.dead.append(message_id)
        return True

    def frame(self, message: dict[str, Any]) -> dict[str, Any]:
        if "raw" in message:  # a frame a test wrote by hand, sent as it is
            return dict(message["raw"])
        request = {key: message[key] for key in ("webhook_id", "timestamp", "headers", "payload")}
        head = {"type": "webhook", "message_id": message["message_id"]}
        head["sequence"] = message["sequence"]
        if self.shape == "nested":
            return {**head, "data": request}
        return {**head, **request}


async def ingest(request: Request) -> Response:
    state: Standin = request.app.state.standin
    raw = await request.body()
    try:
        payload: Any = json.loads(raw)
    except ValueError:
        payload = raw.decode("utf-8", "replace")
    message = {
        "message_id": f"msg_{uuid.uuid4().hex[:16]}",
        "sequence": next(state.sequence),
        "webhook_id": request.path_params["webhook_id"],
        "timestamp": now_iso(),
        "headers": dict(request.headers),
        "payload": payload,
    }
    state.queue.append(message)
    state.arrived.set()
    return JSONResponse({"status": "accepted", "message_id": message["message_id"]})


async def stream(websocket: WebSocket) -> None:
    state: Standin = websocket.app.state.standin
    authorization = websocket.headers.get("authorization")
    if not state.token_ok(authorization, websocket.query_params.get("token")):
        await websocket.close(code=4001, reason="Invalid channel token")
        return
    if websocket.path_params["channel"] != state.channel:
        await websocket.close(code=4002, reason="Channel not found")
        return
    await websocket.accept()  # never a subprotocol
    connection = state.open("websocket")
    hello = {"type": "connected", "connection_id": connection.connection_id}
    await websocket.send_json({**hello, "channel": state.channel, "timestamp": now_iso()})
    jobs = (_ws_send, _ws_beat, _ws_receive)
    tasks = [asyncio.create_task(job(state, websocket, connection)) for job in jobs]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        state.close(connection)


async def _ws_send(state: Standin, websocket: WebSocket, connection: Connection) -> None:
    while True:
        message = await state.next_for(connection, 3600)
        if message is not None:
            await websocket.send_json(state.frame(message))


async def _ws_beat(state: Standin, websocket: WebSocket, connection: Connection) -> None:
    while True:
        await asyncio.sleep(state.heartbeat)
        beat = {"type": "heartbeat", "timestamp": now_iso(), "server_time": now_iso()}
        await websocket.send_json(beat)


async def _ws_receive(state: Standin, websocket: WebSocket, connection: Connection) -> None:
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            data = await websocket.receive_json()
            kind = data.get("type")
            if kind in ("ack", "nack"):
                message_id = str(data.get("message_id"))
                retry = bool(data.get("retry", True))
                state.settle(connection, message_id, kind == "ack", retry, "websocket", frame=data)
            elif kind == "heartbeat":
                state.events.append(
                    {"kind": "heartbeat", "connection_id": connection.connection_id}
                )


async def sse(request: Request) -> Response:
    state: Standin = request.app.state.standin
    authorization = request.headers.get("authorization")
    if not state.token_ok(authorization, request.query_params.get("token")):
        return JSONResponse({"detail": "Invalid channel token"}, status_code=401)
    if request.path_params["channel"] != state.channel:
        return JSONResponse({"detail": "Channel not found"}, status_code=404)
    connection = state.open("sse")
    return StreamingResponse(
        _sse_events(state, connection),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


async def _sse_events(state: Standin, connection: Connection) -> AsyncIterator[str]:
    try:
        hello = {"connection_id": connection.connection_id, "channel": state.channel}
        yield f"event: connected\ndata: {json.dumps(hello)}\n\n"
        while True:
            message = await state.next_for(connection, state.heartbeat)
            if message is None:
                yield f"event: heartbeat\ndata: {json.dumps({'timestamp': now_iso()})}\n\n"
                continue
            frame = state.frame(message)
            if state.shape == "nested":  # as its specification draws it: an id line, no type
                frame.pop("type", None)
                yield f"event: webhook\nid: {message['message_id']}\ndata: {json.dumps(frame)}\n\n"
            else:
                yield f"event: webhook\ndata: {json.dumps(frame)}\n\n"
    finally:
        state.close(connection)


async def poll(request: Request) -> Response:
    """Long-poll as its cloud serves it: seed messages, and the connection forgotten as the
    answer leaves (what it held stays in flight, so no ack can ever settle it)."""
    state: Standin = request.app.state.standin
    authorization = request.headers.get("authorization")
    if not state.token_ok(authorization, request.query_params.get("token")):
        return JSONResponse({"detail": "Invalid channel token"}, status_code=401)
    connection = state.open("long_poll")
    state.connections.pop(connection.connection_id)
    wait = float(request.query_params.get("timeout", "30"))
    message = await state.next_for(connection, wait)
    if message is None:
        return Response(status_code=204)
    body = {"messages": [state.frame(message)], "connection_id": connection.connection_id}
    return JSONResponse({**body, "channel": state.channel, "timestamp": now_iso()})


async def ack(request: Request) -> Response:
    state: Standin = request.app.state.standin
    body = (await request.body()).decode("utf-8", "replace")
    fields = {
        "message_id": request.query_params.get("message_id"),
        "x-connection-id": request.headers.get("x-connection-id"),
        "authorization": request.headers.get("authorization"),
    }
    missing = [name for name, value in fields.items() if not value]
    if missing:  # what FastAPI answers for a required query parameter or header
        state.events.append({"kind": "refused_ack", "missing": missing, "body": body})
        return JSONResponse({"detail": [{"loc": missing, "msg": "field required"}]}, 422)
    connection = state.connections.get(str(fields["x-connection-id"]))
    if connection is None:
        return JSONResponse({"detail": "Connection not found"}, status_code=404)
    if not state.token_ok(fields["authorization"], None):
        return JSONResponse({"detail": "Invalid token"}, status_code=401)
    message_id = str(fields["message_id"])
    is_ack = request.query_params.get("status", "ack") == "ack"
    retry = request.query_params.get("retry", "true").lower() in ("true", "1", "yes", "on")
    seen = {"query": request.url.query, "body": body}
    if not state.settle(connection, message_id, is_ack, retry, "http", **seen):
        return JSONResponse({"detail": "Message not in flight"}, status_code=404)
    return JSONResponse({"status": "ok", "message_id": message_id})


async def raw(request: Request) -> Response:
    """Test hook: queue a ``webhook`` frame exactly as given (a malformed one, say); it stays
    in flight under a key of the stand-in's own, since it may have no id to be acked by."""
    state: Standin = request.app.state.standin
    key = f"raw_{uuid.uuid4().hex[:8]}"
    state.queue.append({"message_id": key, "raw": await request.json()})
    state.arrived.set()
    return JSONResponse({"key": key})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "healthy"})


async def events(request: Request) -> Response:
    state: Standin = request.app.state.standin
    return JSONResponse(state.events)


async def snapshot(request: Request) -> Response:
    state: Standin = request.app.state.standin
    return JSONResponse(
        {
            "queued": [m["message_id"] for m in state.queue],
            "in_flight": sorted(state.held),
            "dead": state.dead,
            "connections": sorted(state.connections),
        }
    )


def build_app(state: Standin) -> Starlette:
    app = Starlette(
        routes=[
            Route("/webhook/{webhook_id}", ingest, methods=["POST"]),
            WebSocketRoute("/connect/stream/{channel}", stream),
            Route("/connect/stream/{channel}/sse", sse),
            Route("/connect/stream/{channel}/poll", poll),
            Route("/connect/ack", ack, methods=["POST"]),
            Route("/health", health),
            Route("/standin/raw", raw, methods=["POST"]),
            Route("/standin/events", events),
            Route("/standin/state", snapshot),
        ]
    )
    app.state.standin = state
    return app


class CoreCloudStandin:
    """The stand-in as a real process on a loopback port (stopped by PID)."""

    def __init__(
        self,
        workdir: Path,
        channel: str,
        token: str,
        *,
        shape: str = "flat",
        heartbeat: float = 1.0,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.args = ["--channel", channel, "--token", token, "--shape", shape]
        self.args += ["--heartbeat", str(heartbeat)]
        self.log = workdir / f"standin-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [sys.executable, "-m", "tests.core_cloud_standin", "--port", str(self.port)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*args, *self.args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        wait_until(self._healthy, timeout=20, what=f"stand-in on port {self.port}")

    def _healthy(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"stand-in exited: {self.log.read_text()}")
        return httpx.get(f"{self.url}/health", timeout=1).status_code == 200

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            stop(self.process, sig)
            self.process = None

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = httpx.get(f"{self.url}/standin/events", timeout=5).json()
        return [event for event in found if kind is None or event["kind"] == kind]

    def state(self) -> dict[str, list[str]]:
        answer: dict[str, list[str]] = httpx.get(f"{self.url}/standin/state", timeout=5).json()
        return answer

    def post_raw(self, frame: dict[str, Any]) -> None:
        answer = httpx.post(f"{self.url}/standin/raw", json=frame)
        assert answer.status_code == 200, answer.text

    def post(self, webhook_id: str, body: bytes, headers: dict[str, str]) -> str:
        answer = httpx.post(f"{self.url}/webhook/{webhook_id}", content=body, headers=headers)
        assert answer.status_code == 200, answer.text
        return str(answer.json()["message_id"])


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--shape", choices=("flat", "nested"), default="flat")
    parser.add_argument("--heartbeat", type=float, default=30.0)
    options = parser.parse_args()
    state = Standin(options.channel, options.token, options.shape, options.heartbeat)
    uvicorn.run(
        build_app(state),
        host="127.0.0.1",
        port=options.port,
        log_level="warning",
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
