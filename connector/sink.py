"""``webhook-connect sink``: a local target that shows and records every request it receives.

A debugging aid for users (see what the connector delivers) and the target of the benchmarks and
end-to-end tests, so it is a raw asyncio protocol on httptools that sustains thousands of
requests per second on one core. For each request it prints one line, optionally appends the
exact request — raw path and query, headers as received, body in base64 — to a JSON-lines file,
and answers ``status`` with ``{"received":true}``.

The record is flushed before the response is sent: whoever has seen the answer can read it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, cast

import httptools
import orjson

MAX_BODY = 16 * 1024 * 1024
MAX_HEAD = 1024 * 1024  # bytes received while a request head is incomplete
RESPONSE_BODY = b'{"received":true}'
PREVIEW_CHARS = 60
PREVIEW_BYTES = 24
READ_BUFFER_SIZE = 256 * 1024
LINGER_SECONDS = 2.0


@dataclass(slots=True)
class Received:
    """One request exactly as it arrived."""

    time: float
    method: str
    url: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    @property
    def path(self) -> str:
        return self.url.partition(b"?")[0].decode("latin-1")

    @property
    def query(self) -> str:
        return self.url.partition(b"?")[2].decode("latin-1")


def find_header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (given in lower case), or None."""
    for key, value in headers:
        if len(key) == len(name) and key.lower() == name:
            return value
    return None


def preview(body: bytes) -> str:
    """The start of ``body`` on one line: text if it is printable UTF-8, else hex."""
    if not body:
        return ""
    head = body[: PREVIEW_CHARS * 4]
    try:
        text = head.decode()
    except UnicodeDecodeError as exc:
        # A multi-byte character cut by the slice above is still text.
        is_cut = len(head) < len(body) and exc.start >= len(head) - 3 and exc.end == len(head)
        text = head[: exc.start].decode() if is_cut else "\x00"
    flat = text.replace("\r\n", " ").replace("\n", " ").replace("\t", " ")
    if flat.isprintable():
        more = len(flat) > PREVIEW_CHARS or len(head) < len(body)
        return flat[:PREVIEW_CHARS] + ("..." if more else "")
    more = len(body) > PREVIEW_BYTES
    return "hex " + body[:PREVIEW_BYTES].hex(" ") + (" ..." if more else "")


def format_line(request: Received) -> str:
    """The human line printed for each request."""
    clock = time.strftime("%H:%M:%S", time.localtime(request.time))
    millis = int(request.time * 1000) % 1000
    content_type = (find_header(request.headers, b"content-type") or b"-").decode("latin-1")
    url = request.url.decode("latin-1")
    size = f"{len(request.body)} B"
    line = (
        f"{clock}.{millis:03d} {request.method} {url} {content_type} {size} {preview(request.body)}"
    )
    return line.rstrip()  # no preview for an empty body


def encode_record(request: Received) -> bytes:
    """The JSON line recorded for each request, byte-exact through latin-1 and base64."""
    record = {
        "time": request.time,
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in request.headers],
        "body_b64": base64.b64encode(request.body).decode("ascii"),
    }
    return orjson.dumps(record) + b"\n"


def encode_response(status: int, keep_alive: bool, with_body: bool) -> bytes:
    """The sink's answer; no body for HEAD, 204 and 304 (RFC 9110 §6.4.1)."""
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    lines = [f"HTTP/1.1 {status} {reason}"]
    body = b""
    if status not in (204, 304):
        body = RESPONSE_BODY if status < 400 else b'{"received":false}'
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if not keep_alive:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if with_body else head


class _Recorder:
    """Where requests go: a line on stdout (unless quiet) and a JSON line (if a file is given)."""

    def __init__(self, out: IO[str] | None, jsonl: IO[bytes] | None) -> None:
        self.out = out
        self.jsonl = jsonl

    def record(self, request: Received) -> None:
        if self.out is not None:
            self.out.write(format_line(request) + "\n")
        if self.jsonl is not None:
            self.jsonl.write(encode_record(request))

    def note(self, text: str) -> None:
        if self.out is not None:
            clock = time.strftime("%H:%M:%S")
            self.out.write(f"{clock} {text}\n")

    def flush(self) -> None:
        if self.out is not None:
            self.out.flush()
        if self.jsonl is not None:
            self.jsonl.flush()


class _SinkProtocol(asyncio.BufferedProtocol):
    """One client connection: parse requests, record them, answer each in order."""

    def __init__(
        self,
        recorder: _Recorder,
        status: int,
        connections: set[_SinkProtocol],
        read_buffer: memoryview,
    ) -> None:
        self.recorder = recorder
        self.read_buffer = read_buffer
        self.status = status
        self.connections = connections
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.replies: list[bytes] = []
        self.is_closing = False
        self.linger: asyncio.TimerHandle | None = None
        self.in_head = False
        self.head_size = 0
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.body_size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        if self.linger is not None:
            self.linger.cancel()

    def pause_writing(self) -> None:
        # A client that sends without reading answers: stop reading until it catches up.
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        # Shared by all connections: each read is parsed before the next one starts.
        return self.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.is_closing:
            return
        try:
            self.parser.feed_data(self.read_buffer[:nbytes])
        except httptools.HttpParserUpgrade:
            self.is_closing = True  # answered as a plain request; no protocol switch here
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _StopParsing):
                raise  # our bug or a failing record file: not the client's fault
        except httptools.HttpParserError as exc:
            self.reject(400, f"bad request: {exc}")
        if self.in_head and not self.is_closing:
            self.head_size += nbytes
            if self.head_size > MAX_HEAD:
                self.reject(431, f"request head over {MAX_HEAD} bytes")
        assert self.transport is not None
        if self.replies:
            self.recorder.flush()  # the record is readable before the answer is
            replies = self.replies
            self.transport.write(replies[0] if len(replies) == 1 else b"".join(replies))
            replies.clear()
        if self.is_closing:
            # Lingering close: closing with the client's data unread sends a reset, which can
            # destroy our answer (a 413 mid-body) before the client reads it. So half-close,
            # discard what still comes, and close at the client's EOF or after a grace time.
            self.transport.write_eof()
            self.linger = asyncio.get_running_loop().call_later(
                LINGER_SECONDS, self.transport.close
            )

    def reject(self, status: int, reason: str) -> None:
        self.recorder.note(f"{status} {reason}")
        self.replies.append(encode_response(status, keep_alive=False, with_body=True))
        self.is_closing = True

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_size = 0
        self.url = b""
        self.headers = []
        self.body = []
        self.body_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        length = find_header(self.headers, b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            self._reject_body()
        if (find_header(self.headers, b"expect") or b"").lower() == b"100-continue":
            assert self.transport is not None  # curl waits for this before a large body
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > MAX_BODY:
            self._reject_body()
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        method = self.parser.get_method().decode("ascii")
        self.recorder.record(Received(time.time(), method, self.url, self.headers, body))
        keep_alive = self.parser.should_keep_alive()
        self.replies.append(encode_response(self.status, keep_alive, method != "HEAD"))
        if not keep_alive:
            self.is_closing = True
            raise _StopParsing

    def _reject_body(self) -> None:
        self.reject(413, f"request body over {MAX_BODY} bytes")
        raise _StopParsing  # stop parsing: the rest of the body is discarded


class _StopParsing(Exception):
    """Raised from a callback to stop feeding; the connection is closing."""


async def serve_sink(
    host: str,
    port: int,
    status: int = 200,
    jsonl_path: str | None = None,
    quiet: bool = False,
    ready: Callable[[], None] | None = None,
) -> None:
    """Serve until cancelled; call ``ready()`` once the port accepts connections."""
    if not 200 <= status <= 599:
        raise ValueError(f"status must be 200..599, not {status}")
    loop = asyncio.get_running_loop()
    jsonl = open(jsonl_path, "ab") if jsonl_path else None  # noqa: ASYNC230 - once, at start
    recorder = _Recorder(None if quiet else sys.stdout, jsonl)
    connections: set[_SinkProtocol] = set()
    read_buffer = memoryview(bytearray(READ_BUFFER_SIZE))
    try:
        server = await loop.create_server(
            lambda: _SinkProtocol(recorder, status, connections, read_buffer), host, port
        )
        try:
            if not quiet:
                print(
                    f"sink: listening on http://{host}:{port}, answering {status}", file=sys.stderr
                )
            if ready is not None:
                ready()
            await loop.create_future()  # until cancelled
        finally:
            server.close()
            for connection in list(connections):
                if connection.transport is not None:
                    connection.transport.abort()
            await server.wait_closed()
    finally:
        if jsonl is not None:
            jsonl.close()


def run_sink(
    host: str = "127.0.0.1",
    port: int = 9000,
    status: int = 200,
    jsonl_path: str | None = None,
    quiet: bool = False,
) -> None:
    """Run the sink until SIGINT or SIGTERM, then return normally (exit status 0)."""

    async def main() -> None:
        task = asyncio.ensure_future(serve_sink(host, port, status, jsonl_path, quiet))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # Windows: KeyboardInterrupt below
                loop.add_signal_handler(signum, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # cancelled from outside, not by a signal

    with contextlib.suppress(KeyboardInterrupt), _runner() as runner:
        runner.run(main())


def _runner() -> asyncio.Runner:
    """uvloop when it is installed (it comes with uvicorn[standard]), else the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)
