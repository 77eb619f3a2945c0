"""Many idle connectors in one process: the client side of ``bench/soak/idle.py``.

Each connection speaks exactly what ``webhook-connect connector`` speaks on the wire, nothing
more, as a bare asyncio protocol (no task per connection), so 10,000 of them cost this process
little and the cloud's memory is what is measured:

* ``websocket``: the upgrade with ``Sec-WebSocket-Protocol: webhook-connect.v1``, the bearer
  token and ``X-Connector-ID``; pongs for the cloud's pings; a ping every 5 s of its own (the
  connector's ``ping_interval``); the cloud's heartbeats read and dropped;
* ``sse``: ``GET .../sse`` with the native header, the stream read and dropped;
* ``long_poll``: a first ``poll?timeout=1`` opens the connection, then ``poll?timeout=25``
  with ``X-Connection-ID`` again and again on one kept-alive HTTP connection.

    python bench/soak/idleclient.py TRANSPORT PORT CHANNELS.json SOURCES [OPENING]

``CHANNELS.json`` is ``[[channel, token], ...]``; connection *i* uses entry *i* mod its
length and source address ``127.0.0.(2 + i mod SOURCES)`` (10,000 connections to one port
from one address would use a third of the ephemeral ports). Commands on stdin: ``open N``
(bring the number opened up to N), ``close`` (close them all); end of input ends the process.
A JSON status line on stdout every second and after each command.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httptools

HOST = "127.0.0.1"
PING_SECONDS = 5
POLL_SECONDS = 25
# Connections being opened at once. (Before cloud/buffers/redispy.py waited for a free
# redis-py connection, more than 100 concurrent connects made the cloud answer some 4503.)
OPENING_AT_ONCE = 200


class Pool:
    """The connections of this process and their counts."""

    def __init__(
        self, transport: str, port: int, channels: list[list[str]], sources: int, opening: int
    ) -> None:
        self.transport = transport
        self.port = port
        self.channels = channels
        self.sources = sources
        self.connections: list[Client] = []
        self.connected = 0
        self.closed = 0
        self.errors: Counter[str] = Counter()
        self.opening = asyncio.Semaphore(opening)

    def status(self) -> dict[str, Any]:
        return {
            "opened": len(self.connections),
            "connected": self.connected,
            "closed": self.closed,  # by the cloud, after connecting
            "errors": dict(self.errors),
        }

    async def open(self, count: int) -> None:
        kind = CLIENTS[self.transport]
        loop = asyncio.get_running_loop()
        pending = []
        while len(self.connections) < count:
            index = len(self.connections)
            channel, token = self.channels[index % len(self.channels)]
            client = kind(self, channel, token, f"idle-{index}")
            self.connections.append(client)
            await self.opening.acquire()
            source = f"127.0.0.{2 + index % self.sources}"
            pending.append(
                loop.create_task(self._connect(loop, client, source), name=f"open-{index}")
            )
        await asyncio.gather(*pending)

    async def _connect(self, loop: asyncio.AbstractEventLoop, client: Client, source: str) -> None:
        try:
            await loop.create_connection(lambda: client, HOST, self.port, local_addr=(source, 0))
        except OSError as exc:
            self.errors[f"connect: {exc.strerror or exc}"] += 1
            client.done()

    def close(self) -> None:
        """Close every connection (not counted as closed by the cloud)."""
        for client in self.connections:
            if not client.ended:
                client.ended = True
                self.connected -= client.is_connected
            client.finish()
        self.connections.clear()

    async def pinger(self) -> None:
        """A ping from each WebSocket every PING_SECONDS, spread over the interval."""
        tick = 0
        while True:
            await asyncio.sleep(PING_SECONDS / 10)
            tick += 1
            for client in self.connections[tick % 10 :: 10]:
                client.ping()


class Client(asyncio.Protocol):
    """One connector's connection; ``done`` releases its opening slot exactly once."""

    def __init__(self, pool: Pool, channel: str, token: str, name: str) -> None:
        self.pool = pool
        self.channel = channel
        self.token = token
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.is_connected = False
        self.released = False
        self.ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.start()

    def start(self) -> None:
        raise NotImplementedError

    def ping(self) -> None:
        """Only the WebSocket pings."""

    def connected(self) -> None:
        if not self.is_connected:
            self.is_connected = True
            self.pool.connected += 1
            self.done()

    def done(self) -> None:
        if not self.released:
            self.released = True
            self.pool.opening.release()

    def fail(self, why: str) -> None:
        self.pool.errors[why] += 1
        self.finish()

    def finish(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.done()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended:
            self.ended = True
            if self.is_connected:
                self.pool.connected -= 1
                self.pool.closed += 1
        self.done()

    def head(self, path: str, extra: str = "") -> bytes:
        return (
            f"GET {path} HTTP/1.1\r\nHost: {HOST}:{self.pool.port}\r\n"
            f"Authorization: Bearer {self.token}\r\nX-Connector-ID: {self.name}\r\n{extra}\r\n"
        ).encode()


def masked(opcode: int, payload: bytes) -> bytes:
    """A client frame (FIN set, masked, payload under 126 bytes)."""
    mask = os.urandom(4)
    key = (mask * (len(payload) // 4 + 1))[: len(payload)]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(
        len(payload), "big"
    )
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + body


def refused(status: int, body: bytes) -> str:
    """``HTTP 503 storage_unavailable``: the status and the error the cloud named, if any."""
    try:
        error = json.loads(body).get("error", "")
    except (ValueError, AttributeError):
        error = ""
    return f"HTTP {status} {error}".rstrip()


class WebSocketClient(Client):
    def start(self) -> None:
        assert self.transport is not None
        key = base64.b64encode(os.urandom(16)).decode()
        extra = (
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: webhook-connect.v1\r\n"
        )
        self.upgraded = False
        self.buffer = b""
        self.transport.write(self.head(f"/connect/stream/{self.channel}?group=default", extra))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            status = buffer[: buffer.find(b"\r\n")]
            if b" 101 " not in status:
                self.fail(status.decode(errors="replace"))
                return
            self.upgraded = True
            buffer = buffer[end + 4 :]
        while len(buffer) >= 2:
            opcode, length, start = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
            if length == 126:
                if len(buffer) < 4:
                    break
                (length,), start = struct.unpack_from(">H", buffer, 2), 4
            elif length == 127:
                if len(buffer) < 10:
                    break
                (length,), start = struct.unpack_from(">Q", buffer, 2), 10
            if len(buffer) < start + length:
                break
            payload = buffer[start : start + length]
            buffer = buffer[start + length :]
            self.frame(opcode, payload)
        self.buffer = buffer

    def frame(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        if opcode == 0x9:
            self.transport.write(masked(0xA, payload))
        elif opcode == 0x1 and not self.is_connected and b'"connected"' in payload:
            self.connected()
        elif opcode == 0x8:
            code = struct.unpack_from(">H", payload)[0] if len(payload) >= 2 else 1005
            self.fail(f"websocket close {code}")

    def ping(self) -> None:
        if self.is_connected and self.transport is not None and not self.transport.is_closing():
            self.transport.write(masked(0x9, os.urandom(4)))


class SseClient(Client):
    def start(self) -> None:
        assert self.transport is not None
        self.parser = httptools.HttpResponseParser(self)
        self.refusal = b""
        extra = "Accept: text/event-stream\r\nX-Webhook-Connect-Protocol: webhook-connect.v1\r\n"
        self.transport.write(self.head(f"/connect/stream/{self.channel}/sse?group=default", extra))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(f"bad answer: {exc}")

    def on_body(self, body: bytes) -> None:
        if self.parser.get_status_code() != 200:
            self.refusal += body
        elif not self.is_connected and b"event: connected" in body:
            self.connected()

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        self.fail(refused(status, self.refusal) if status != 200 else "stream ended")


class LongPollClient(Client):
    def start(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.connection_id = ""
        self.refusal = b""
        self.poll(1)

    def poll(self, seconds: int) -> None:
        assert self.transport is not None
        path = (
            f"/connect/stream/{self.channel}/poll?timeout={seconds}&max_messages=100&group=default"
        )
        extra = "X-Webhook-Connect-Protocol: webhook-connect.v1\r\n"
        if self.connection_id:
            extra += f"X-Connection-ID: {self.connection_id}\r\n"
        self.transport.write(self.head(path, extra))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(f"bad answer: {exc}")

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-connection-id":
            self.connection_id = value.decode()

    def on_body(self, body: bytes) -> None:
        if self.parser.get_status_code() not in (200, 204):
            self.refusal += body

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status not in (200, 204) or not self.connection_id:
            self.fail(refused(status, self.refusal))
            return
        if self.transport is not None and not self.transport.is_closing():
            self.poll(POLL_SECONDS)
            self.connected()  # a poll of the live connection is waiting in the cloud


CLIENTS: dict[str, type[Client]] = {
    "websocket": WebSocketClient,
    "sse": SseClient,
    "long_poll": LongPollClient,
}


def say(pool: Pool, **more: Any) -> None:
    print(json.dumps({**pool.status(), **more}), flush=True)


async def main(transport: str, port: int, channels_path: str, sources: int, opening: int) -> None:
    channels = json.loads(Path(channels_path).read_text())  # noqa: ASYNC240 - before serving
    pool = Pool(transport, port, channels, sources, opening)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    background = [loop.create_task(pool.pinger())] if transport == "websocket" else []
    background.append(loop.create_task(report(pool)))
    try:
        while line := (await reader.readline()).decode().split():
            if line[0] == "open":
                await pool.open(int(line[1]))
                say(pool, done=line)
            elif line[0] == "close":
                pool.close()
                say(pool, done=line)
    finally:
        for task in background:
            task.cancel()
        pool.close()


async def report(pool: Pool) -> None:
    while True:
        await asyncio.sleep(1)
        say(pool)


if __name__ == "__main__":
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    opening = int(sys.argv[5]) if len(sys.argv) > 5 else OPENING_AT_ONCE
    arguments = (sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), opening)
    try:
        import uvloop

        uvloop.run(main(*arguments))
    except ImportError:
        asyncio.run(main(*arguments))
