"""``webhook-connect sink``: what it prints, what it records, what it answers.

The sink is the real peer of the end-to-end tests, so its record must be exact: the body
round-trips through base64 byte for byte, and headers keep their case and order.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import REPO, free_port, stop, wait_until
from webhook_connect.connector.sink import (
    MAX_BODY,
    MAX_HEAD,
    Received,
    encode_record,
    format_line,
    preview,
    serve_sink,
)


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- as a process, the way users run it --------------------------------------------------------


@dataclass
class SinkProcess:
    url: str
    process: subprocess.Popen[bytes]
    stdout: Path
    jsonl: Path


@pytest.fixture
def sink_process(tmp_path: Path) -> Iterator[SinkProcess]:
    port = free_port()
    jsonl, stdout = tmp_path / "requests.jsonl", tmp_path / "stdout.txt"
    code = (
        "from webhook_connect.connector.sink import run_sink; "
        f"run_sink('127.0.0.1', {port}, jsonl_path={str(jsonl)!r})"
    )
    with stdout.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=out)
    try:
        wait_until(lambda: socket.create_connection(("127.0.0.1", port), 1).close() is None)
        yield SinkProcess(f"http://127.0.0.1:{port}", process, stdout, jsonl)
    finally:
        stop(process)


def test_sink_prints_records_and_answers(sink_process: SinkProcess) -> None:
    body = bytes(range(256))
    with httpx.Client() as client:
        response = client.post(
            f"{sink_process.url}/hooks/github?a=1&b=%2F&a=2",
            content=body,
            headers=[("Content-Type", "application/octet-stream"), ("X-MiXeD", "v1")],
        )
        assert (response.status_code, response.json()) == (200, {"received": True})
        client.post(
            f"{sink_process.url}/text",
            content=b'{"event": "push"}',
            headers={"Content-Type": "application/json"},
        )

    # Flushed before the answer was sent: no waiting needed.
    lines = sink_process.stdout.read_text().splitlines()
    assert len(lines) == 2
    assert (
        " POST /hooks/github?a=1&b=%2F&a=2 application/octet-stream 256 B hex 00 01 02" in lines[0]
    )
    assert lines[1].endswith(' POST /text application/json 17 B {"event": "push"}')

    first, second = read_records(sink_process.jsonl)
    assert base64.b64decode(first["body_b64"]) == body
    assert (first["method"], first["path"], first["query"]) == (
        "POST",
        "/hooks/github",
        "a=1&b=%2F&a=2",
    )
    names = [name for name, _ in first["headers"]]
    assert names.index("Content-Type") + 1 == names.index("X-MiXeD")  # as sent: order, case
    assert ["X-MiXeD", "v1"] in first["headers"]
    assert isinstance(first["time"], float)
    assert base64.b64decode(second["body_b64"]) == b'{"event": "push"}'

    stop(sink_process.process, signal.SIGTERM)
    assert sink_process.process.returncode == 0


def test_sink_exits_cleanly_on_sigint(sink_process: SinkProcess) -> None:
    stop(sink_process.process, signal.SIGINT)
    assert sink_process.process.returncode == 0


# -- in process, for the edge cases ------------------------------------------------------------


@dataclass
class Sink:
    url: str
    host: str
    port: int
    jsonl: Path

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.jsonl)

    async def raw(self, data: bytes) -> bytes:
        """Send raw bytes on a new connection; everything received until the sink closes."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(data)
            sending = asyncio.ensure_future(writer.drain())
            answer = await asyncio.wait_for(reader.read(), 10)
            with contextlib.suppress(ConnectionError):
                await sending
            return answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture(params=[200])
async def sink(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Sink]:
    port = free_port()
    jsonl = tmp_path / "requests.jsonl"
    ready = asyncio.Event()
    task = asyncio.create_task(
        serve_sink("127.0.0.1", port, request.param, str(jsonl), quiet=True, ready=ready.set)
    )
    try:
        await asyncio.wait_for(ready.wait(), 5)
        yield Sink(f"http://127.0.0.1:{port}", "127.0.0.1", port, jsonl)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_keep_alive_and_exact_records(sink: Sink) -> None:
    bodies = [bytes([i]) * i for i in range(50)]
    async with httpx.AsyncClient() as client:
        for body in bodies:
            response = await client.put(f"{sink.url}/p?i=1", content=body)
            assert response.status_code == 200
    records = sink.records()
    assert [base64.b64decode(r["body_b64"]) for r in records] == bodies
    assert {r["method"] for r in records} == {"PUT"}


@pytest.mark.parametrize("sink", [503], indirect=True)
async def test_configured_status_is_answered(sink: Sink) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(sink.url, content=b"x")
    assert response.status_code == 503
    assert len(sink.records()) == 1


@pytest.mark.parametrize("sink", [204], indirect=True)
async def test_no_content_status_has_no_body(sink: Sink) -> None:
    answer = await sink.raw(
        b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    assert answer == b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"


async def test_pipelined_requests_are_answered_in_order(sink: Sink) -> None:
    request = b"POST /%d HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n%d"
    last = b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = await sink.raw(b"".join(request % (i, i) for i in range(5)) + last)
    assert answer.count(b"HTTP/1.1 200 OK") == 6
    assert answer.endswith(b"Connection: close\r\n\r\n" + b'{"received":true}')
    assert [r["path"] for r in sink.records()] == ["/0", "/1", "/2", "/3", "/4", "/last"]


async def test_chunked_request_body_is_recorded_whole(sink: Sink) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"hello ", b"chunked ", b"world"):
            yield part

    async with httpx.AsyncClient() as client:
        response = await client.post(sink.url, content=chunks())
    assert response.status_code == 200
    assert base64.b64decode(sink.records()[0]["body_b64"]) == b"hello chunked world"


async def test_bad_http_gets_400_and_close(sink: Sink) -> None:
    answer = await sink.raw(b"NOT HTTP AT ALL\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Connection: close\r\n" in answer
    assert not sink.jsonl.exists() or sink.records() == []


async def test_body_over_the_limit_gets_413(sink: Sink) -> None:
    declared = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
    assert (await sink.raw(declared)).startswith(b"HTTP/1.1 413 ")

    # Chunked: the size is only known while reading; the sink stops reading at the limit.
    chunk = b"x" * (1024 * 1024)
    chunked = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked += b"%x\r\n%s\r\n" % (len(chunk), chunk) * 17
    answer = await sink.raw(chunked)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert not sink.jsonl.exists() or sink.records() == []


async def test_endless_request_head_gets_431(sink: Sink) -> None:
    answer = await sink.raw(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (MAX_HEAD + 100_000))
    assert answer.startswith(b"HTTP/1.1 431 ")


async def test_head_request_gets_headers_only(sink: Sink) -> None:
    answer = await sink.raw(b"HEAD /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.endswith(b"Content-Length: 17\r\nConnection: close\r\n\r\n")


# -- the pure parts ----------------------------------------------------------------------------


def test_preview() -> None:
    assert preview(b"") == ""
    assert preview(b'{"a":\n 1}') == '{"a":  1}'
    assert preview(b"\x00\x01\xfe") == "hex 00 01 fe"
    assert preview(b"x" * 100) == "x" * 60 + "..."
    # A multi-byte character cut at the preview's edge is still text.
    assert preview("é".encode() * 200).startswith("éé")
    assert preview(b"\x1b[31m red") == "hex 1b 5b 33 31 6d 20 72 65 64"


def test_format_line_and_record() -> None:
    request = Received(
        time=1700000000.25,
        method="POST",
        url=b"/hook?x=%2F",
        headers=[(b"Content-Type", b"text/plain"), (b"X-Latin", b"caf\xe9")],
        body=b"hi",
    )
    line = format_line(request)
    assert line.endswith(".250 POST /hook?x=%2F text/plain 2 B hi")
    assert json.loads(encode_record(request)) == {
        "time": 1700000000.25,
        "method": "POST",
        "path": "/hook",
        "query": "x=%2F",
        "headers": [["Content-Type", "text/plain"], ["X-Latin", "caf\u00e9"]],
        "body_b64": "aGk=",
    }
