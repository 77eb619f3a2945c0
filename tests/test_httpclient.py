"""The connector's HTTP client against real local servers (byte-exact relay, retry rules).

``ScriptedServer`` is a small asyncio HTTP/1.1 server whose answers each test scripts: it
records every request's raw bytes and counts the connections it accepted and saw closed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.servers import free_port
from webhook_connect.connector.httpclient import (
    ConnectError,
    HttpClient,
    InvalidRequest,
    ProtocolError,
    RequestTimeout,
    Response,
    encode_head,
    split_url,
)
from webhook_connect.connector.sink import serve_sink

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# An answer for the n-th request on a connection (1-based): bytes to send, optionally ending
# in CLOSE to close the connection after them, or NEVER to keep it open without answering.
CLOSE = b"<close>"
NEVER = b"<never>"
Script = Callable[[int], bytes]


def always(answer: bytes) -> Script:
    return lambda n: answer


class ScriptedServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.accepted = 0
        self.closed = 0
        self.open_now = 0
        self.open_max = 0
        self.handlers: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.accepted += 1
        self.open_now += 1
        self.open_max = max(self.open_max, self.open_now)
        try:
            for n in range(1, 1_000_000):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.requests.append(head + await reader.readexactly(length))
                answer = self.script(n)
                if answer == NEVER:
                    await reader.read()  # until the client gives up and closes
                    return
                writer.write(answer.removesuffix(CLOSE))
                await writer.drain()
                if answer.endswith(CLOSE):
                    return
        finally:
            self.open_now -= 1
            self.closed += 1
            writer.close()


@asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer(script)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@asynccontextmanager
async def http_client(**options: Any) -> AsyncIterator[HttpClient]:
    client = HttpClient(**options)
    try:
        yield client
    finally:
        await client.aclose()


async def wait_for(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def post(client: HttpClient, url: str, body: bytes = b"{}", within: float = 5) -> Response:
    return await client.request("POST", url, [("Content-Type", "application/json")], body, within)


# -- the request on the wire -------------------------------------------------------------------


async def test_request_arrives_byte_exact() -> None:
    body = bytes(range(256))
    headers = [
        ("X-Hub-Signature-256", "sha256=abc"),
        ("content-type", "application/octet-stream"),
        ("X-MiXeD-CaSe", "  spaced value "),
        ("X-Dup", "1"),
        ("X-Dup", "2"),
        ("Content-Length", "999"),  # replaced: the body is sent whole
        ("Transfer-Encoding", "chunked"),  # dropped for the same reason
    ]
    async with scripted(always(OK)) as server, http_client() as client:
        url = f"{server.url}/hooks/github?a=1&b=%2F&a=2&empty=&plus=a+b"
        response = await client.request("PUT", url, headers, body, 5)
    assert response.status == 200
    assert server.requests == [
        b"PUT /hooks/github?a=1&b=%2F&a=2&empty=&plus=a+b HTTP/1.1\r\n"
        + f"Host: 127.0.0.1:{server.port}\r\n".encode()
        + b"X-Hub-Signature-256: sha256=abc\r\n"
        b"content-type: application/octet-stream\r\n"
        b"X-MiXeD-CaSe:   spaced value \r\n"
        b"X-Dup: 1\r\n"
        b"X-Dup: 2\r\n"
        b"Content-Length: 256\r\n\r\n" + body
    ]


async def test_the_sink_records_what_the_client_sent(tmp_path: Path) -> None:
    jsonl, port, ready = tmp_path / "sink.jsonl", free_port(), asyncio.Event()
    sink = asyncio.create_task(
        serve_sink("127.0.0.1", port, jsonl_path=str(jsonl), quiet=True, ready=ready.set)
    )
    try:
        await asyncio.wait_for(ready.wait(), 5)
        async with http_client() as client:
            headers = [("X-Signature", "sha256=00"), ("content-TYPE", "application/x")]
            body = bytes(range(256)) * 3
            url = f"http://127.0.0.1:{port}/in?a=1&b=%2F&a=2"
            response = await client.request("PATCH", url, headers, body, 5)
    finally:
        sink.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sink
    assert (response.status, response.body) == (200, b'{"received":true}')
    [record] = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert (record["method"], record["path"], record["query"]) == ("PATCH", "/in", "a=1&b=%2F&a=2")
    assert record["headers"] == [
        ["Host", f"127.0.0.1:{port}"],
        ["X-Signature", "sha256=00"],
        ["content-TYPE", "application/x"],
        ["Content-Length", "768"],
    ]
    assert base64.b64decode(record["body_b64"]) == body


async def test_given_host_header_is_kept_and_empty_path_becomes_slash() -> None:
    async with scripted(always(OK)) as server, http_client() as client:
        await client.request("GET", f"{server.url}?q=1", [("host", "example.test")], b"", 5)
    assert server.requests == [
        b"GET /?q=1 HTTP/1.1\r\nhost: example.test\r\nContent-Length: 0\r\n\r\n"
    ]


async def test_spellings_of_one_origin_share_its_pool() -> None:
    async with scripted(always(OK)) as server, http_client() as client:
        for url in (server.url, f"HTTP://user:secret@127.0.0.1:{server.port}"):
            await client.request("GET", url, [], b"", 5)
    assert server.accepted == 1
    host = f"Host: 127.0.0.1:{server.port}\r\n".encode()
    assert all(host in request for request in server.requests)  # never the userinfo


def test_encode_head_refuses_header_injection() -> None:
    with pytest.raises(InvalidRequest):
        encode_head("POST", "/", [("X-A", "1\r\nX-Injected: 1")], "h", 0)
    with pytest.raises(InvalidRequest):
        encode_head("POST", "/", [("X-A\n", "1")], "h", 0)
    with pytest.raises(InvalidRequest):
        encode_head("POST", "/", [("X-A", "snowman \u2603")], "h", 0)
    with pytest.raises(InvalidRequest):
        encode_head("GET /x HTTP/1.1\r\n", "/", [], "h", 0)


def test_split_url_keeps_the_target_raw() -> None:
    assert split_url("HTTP://h:1/p/%7E?x=%2f&y") == ("http", "h:1", "/p/%7E?x=%2f&y")
    assert split_url("https://u:p@h/a#frag") == ("https", "u:p@h", "/a")
    for bad in ("ftp://h/", "/relative", "http://h/a b", "http://h/?a\r\n"):
        with pytest.raises(InvalidRequest):
            split_url(bad)


async def test_bad_port_is_an_invalid_request() -> None:
    async with http_client() as client:
        with pytest.raises(InvalidRequest):
            await post(client, "http://127.0.0.1:99999/")


# -- the response ------------------------------------------------------------------------------


async def test_response_status_headers_and_body() -> None:
    answer = b"HTTP/1.1 201 Created\r\nX-Trace: abc\r\nContent-Length: 5\r\n\r\nhello"
    async with scripted(always(answer)) as server, http_client() as client:
        response = await post(client, server.url)
    assert (response.status, response.body) == (201, b"hello")
    assert response.headers == [("X-Trace", "abc"), ("Content-Length", "5")]
    assert response.header("x-trace") == "abc"
    assert response.header("missing") is None


async def test_chunked_response_keeps_the_connection() -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    async with scripted(always(answer)) as server, http_client() as client:
        first = await post(client, server.url)
        second = await post(client, server.url)
    assert first.body == second.body == b"hello world"
    assert server.accepted == 1


async def test_close_delimited_response_is_read_to_eof() -> None:
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end" + CLOSE
    async with scripted(always(answer)) as server, http_client() as client:
        first = await post(client, server.url)
        second = await post(client, server.url)
    assert first.body == second.body == b"until the end"
    assert server.accepted == 2  # the first connection was not reused


async def test_connection_close_header_discards_the_connection() -> None:
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with scripted(always(answer)) as server, http_client() as client:
        for _ in range(3):
            assert (await post(client, server.url)).body == b"ok"
    assert server.accepted == 3


async def test_interim_100_continue_is_skipped() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\n" + OK
    async with scripted(always(answer)) as server, http_client() as client:
        response = await post(client, server.url)
        assert (response.status, response.body) == (200, b"ok")
        assert (await post(client, server.url)).body == b"ok"
    assert server.accepted == 1


async def test_head_response_has_no_body() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    async with scripted(always(answer)) as server, http_client() as client:
        response = await client.request("HEAD", server.url, [], b"", 5)
    assert (response.status, response.body, response.header("content-length")) == (
        200,
        b"",
        "1000",
    )


async def test_oversized_response_is_truncated_and_the_connection_closed() -> None:
    big = b"x" * 100_000
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + big
    async with scripted(always(answer)) as server, http_client(max_response_body=1000) as client:
        first = await post(client, server.url)
        second = await post(client, server.url)
    assert first.body == second.body == big[:1000]
    assert server.accepted == 2


async def test_default_limit_is_one_mebibyte() -> None:
    size = 3 * 1024 * 1024
    answer = f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode() + b"y" * size
    async with scripted(always(answer)) as server, http_client() as client:
        response = await post(client, server.url)
    assert response.body == b"y" * (1024 * 1024)


async def test_endless_response_head_is_a_protocol_error() -> None:
    answer = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
    async with scripted(always(answer)) as server, http_client() as client:
        with pytest.raises(ProtocolError):
            await post(client, server.url)


async def test_garbage_response_is_a_protocol_error() -> None:
    async with scripted(always(b"SSH-2.0-OpenSSH_9.6\r\n")) as server, http_client() as client:
        with pytest.raises(ProtocolError):
            await post(client, server.url)


# -- connections -------------------------------------------------------------------------------


async def test_sequential_requests_share_one_connection() -> None:
    async with scripted(always(OK)) as server, http_client() as client:
        for _ in range(100):
            assert (await post(client, server.url)).status == 200
    assert server.accepted == 1
    assert len(server.requests) == 100


async def test_unsolicited_bytes_discard_the_connection() -> None:
    async with scripted(lambda n: OK + OK if n == 1 else OK) as server, http_client() as client:
        assert (await post(client, server.url)).body == b"ok"
        await wait_for(lambda: server.closed == 1)
        assert (await post(client, server.url)).body == b"ok"
    assert server.accepted == 2


async def test_idle_connections_expire() -> None:
    async with scripted(always(OK)) as server, http_client(keepalive_expiry=0) as client:
        await post(client, server.url)
        await post(client, server.url)
    assert server.accepted == 2


async def test_stale_keep_alive_connection_is_retried_once_on_a_fresh_one() -> None:
    # Each connection answers its first request only, then closes without a byte: the client
    # cannot know in advance, exactly like a keep-alive timeout racing the next request.
    async with scripted(lambda n: OK if n == 1 else CLOSE) as server, http_client() as client:
        assert (await post(client, server.url)).status == 200
        assert (await post(client, server.url, b"second")).status == 200
    assert server.accepted == 2
    assert [r.endswith(b"second") for r in server.requests] == [False, True, True]


async def test_no_second_retry_and_no_retry_on_a_fresh_connection() -> None:
    async with scripted(always(CLOSE)) as server, http_client() as client:
        with pytest.raises(ConnectError):
            await post(client, server.url)
        assert server.accepted == 1  # a fresh connection is not retried

    async with scripted(lambda n: OK if n == 1 else CLOSE) as server, http_client() as client:
        await post(client, server.url)
        server.script = always(CLOSE)
        with pytest.raises(ConnectError):
            await post(client, server.url)
        assert server.accepted == 2  # one retry after the stale connection, not more


async def test_connection_closed_mid_response_is_a_connect_error() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort" + CLOSE
    async with scripted(always(answer)) as server, http_client() as client:
        with pytest.raises(ConnectError):
            await post(client, server.url)
        assert server.accepted == 1  # a response had begun: not retried


async def test_timeout_when_the_target_never_answers() -> None:
    async with scripted(always(NEVER)) as server, http_client() as client:
        started = time.monotonic()
        with pytest.raises(RequestTimeout) as caught:
            await post(client, server.url, within=0.2)
        assert 0.19 <= time.monotonic() - started < 2  # uvloop: a millisecond clock
        assert isinstance(caught.value, TimeoutError)
        await wait_for(lambda: server.closed == 1)  # the client closed that connection
        # A timed-out connection is never reused.
        server.script = always(OK)
        assert (await post(client, server.url)).status == 200
        assert server.accepted == 2


async def test_connection_refused_is_a_connect_error() -> None:
    async with http_client() as client:
        with pytest.raises(ConnectError) as caught:
            await post(client, f"http://127.0.0.1:{free_port()}/")
    assert isinstance(caught.value, ConnectionError)


async def test_concurrent_requests_stay_within_the_pool() -> None:
    async with scripted(always(OK)) as server, http_client(max_connections_per_host=8) as client:
        responses = await asyncio.gather(
            *(post(client, f"{server.url}/{i}", str(i).encode()) for i in range(200))
        )
    assert [r.status for r in responses] == [200] * 200
    assert len(server.requests) == 200
    assert server.open_max <= 8
    assert server.accepted <= 8


async def test_pool_wait_counts_against_the_timeout() -> None:
    async with scripted(always(NEVER)) as server, http_client(max_connections_per_host=1) as client:
        hanging = asyncio.ensure_future(post(client, server.url, within=5))
        await wait_for(lambda: len(server.requests) == 1)
        with pytest.raises(RequestTimeout):
            await post(client, server.url, within=0.1)
        hanging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hanging
        # The cancelled request's connection was closed, and its slot is free again.
        await wait_for(lambda: server.closed == 1)
        server.script = always(OK)
        assert (await post(client, server.url)).status == 200


async def test_closed_client_refuses_requests() -> None:
    async with scripted(always(OK)) as server:
        client = HttpClient()
        await post(client, server.url)
        await client.aclose()
        await wait_for(lambda: server.closed == 1)
        with pytest.raises(RuntimeError):
            await post(client, server.url)


async def test_a_connection_made_after_aclose_is_closed_not_pooled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aclose() while a request is still connecting: the connection, once made, is closed and
    the request fails. It used to be sent on and then kept idle in a pool aclose() had already
    dropped, open until the garbage collector found it."""
    async with scripted(always(OK)) as server:
        client = HttpClient()
        loop = asyncio.get_running_loop()
        connect, go = loop.create_connection, asyncio.Event()

        async def held_connect(*args: Any, **kwargs: Any) -> Any:
            await go.wait()
            return await connect(*args, **kwargs)

        monkeypatch.setattr(loop, "create_connection", held_connect)
        request = asyncio.create_task(post(client, server.url))
        await asyncio.sleep(0.05)  # the request is now connecting
        await client.aclose()
        go.set()
        with pytest.raises(ConnectError, match="closed"):
            await request
        await wait_for(lambda: server.accepted == 1 and server.closed == 1)
        assert server.requests == []
