"""The ingest endpoint under real uvicorn, on both backends (docs/CONFIGURATION.md)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import Cloud, RedisServer
from webhook_connect.cloud.buffers import Delivery, open_buffer

TOKEN = "test-token-0123456789"
WEBHOOKS = {
    "json": {
        "module": "webhook_connect",
        "module-config": {"channel": "dev", "channel_token": TOKEN},
    },
    "blob": {
        "module": "webhook_connect",
        "data_type": "blob",
        "methods": ["POST", "PUT", "PATCH"],
        "max_body_size": 1048576,
        "module-config": {"channel": "dev", "channel_token": TOKEN},
    },
    "tiny": {
        "module": "webhook_connect",
        "data_type": "blob",
        "module-config": {"channel": "tiny", "channel_token": TOKEN + "-tiny", "max_queue_size": 3},
    },
}


def write_webhooks(directory: Path, webhooks: dict[str, object] = WEBHOOKS) -> Path:
    path = directory / "webhooks.json"
    path.write_text(json.dumps(webhooks))
    return path


def read_all(storage_url: str, channel: str = "dev", group: str = "default") -> list[Delivery]:
    async def read() -> list[Delivery]:
        store = open_buffer(storage_url)
        try:
            return await store.read(channel, group, "test-reader", 100000)
        finally:
            await store.aclose()

    return asyncio.run(read())


def test_an_accepted_webhook_is_stored_exactly_as_sent(cloud: Cloud) -> None:
    body = b'{"action": "opened", "n": 1}'
    answer = httpx.post(
        f"{cloud.url}/webhook/json?x=1&y=%2F&x=2",
        content=body,
        headers={"Content-Type": "application/json", "X-GitHub-Event": "push", "X-Dup": "a"},
    )
    assert answer.status_code == 202
    assert answer.json()["status"] == "accepted"
    [stored] = read_all(cloud.storage)
    assert stored.message_id == answer.json()["message_id"]
    envelope = stored.envelope
    assert (envelope.method, envelope.path, envelope.query_string) == (
        "POST",
        "/webhook/json",
        "x=1&y=%2F&x=2",
    )
    assert envelope.body == body
    assert ("x-github-event", "push") in envelope.headers
    assert envelope.webhook_id == "json"
    assert envelope.client == "127.0.0.1"


@pytest.mark.parametrize(
    "body",
    [
        bytes(range(256)) * 4,
        b"",
        b"\xff\xfe not utf-8",
        b"a=1&b=%C3%A9",
        b"<?xml version='1.0'?><a/>",
    ],
    ids=["every-byte", "empty", "non-utf8", "form", "xml"],
)
def test_blob_webhooks_keep_any_body_byte_exact(cloud: Cloud, body: bytes) -> None:
    answer = httpx.put(f"{cloud.url}/webhook/blob", content=body)
    assert answer.status_code == 202
    [stored] = read_all(cloud.storage)
    assert stored.envelope.body == body
    assert stored.envelope.method == "PUT"


def test_refusals_name_their_reason(cloud: Cloud) -> None:
    cases = [
        (httpx.post(f"{cloud.url}/webhook/nope", content=b"{}"), 404, "unknown_webhook"),
        (httpx.post(f"{cloud.url}/webhook/" + "x" * 10240, content=b"{}"), 404, "unknown_webhook"),
        (httpx.put(f"{cloud.url}/webhook/json", content=b"{}"), 405, "method_not_allowed"),
        (httpx.post(f"{cloud.url}/webhook/json", content=b"{nope"), 400, "invalid_json"),
        (httpx.post(f"{cloud.url}/webhook/json", content=b""), 400, "invalid_json"),
        (httpx.post(f"{cloud.url}/webhook/json", content=b'"\xff"'), 400, "invalid_json"),
    ]
    for answer, status, error in cases:
        assert (answer.status_code, answer.json()["error"]) == (status, error)
    assert read_all(cloud.storage) == []


def test_an_oversized_body_is_refused_while_it_streams(cloud: Cloud) -> None:
    ten_mb = b"x" * (10 * 1024 * 1024)
    declared = httpx.post(f"{cloud.url}/webhook/blob", content=ten_mb)
    assert declared.status_code == 413

    def chunks() -> Iterator[bytes]:
        for _ in range(160):
            yield b"y" * 65536

    streamed = httpx.post(f"{cloud.url}/webhook/blob", content=chunks())
    assert streamed.status_code == 413
    assert read_all(cloud.storage) == []
    assert httpx.post(f"{cloud.url}/webhook/blob", content=b"ok").status_code == 202


def test_a_gigabyte_upload_is_never_read_whole(cloud: Cloud) -> None:
    with socket.create_connection(("127.0.0.1", cloud.port)) as sock:
        sock.sendall(
            b"POST /webhook/blob HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n"
        )
        sock.sendall(b"z" * 65536)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413")


def test_too_many_headers_are_refused(cloud: Cloud) -> None:
    headers = [(f"x-h{i}", "v") for i in range(5000)]
    try:
        status = httpx.post(f"{cloud.url}/webhook/blob", content=b"a", headers=headers).status_code
    except httpx.RemoteProtocolError:
        status = 0  # the server may drop such a request outright; it must stay up
    assert status in (0, 400, 431)
    assert read_all(cloud.storage) == []
    assert httpx.get(f"{cloud.url}/health").status_code == 200


def raw_request(port: int, data: bytes, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        if not read:
            return b""
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def test_an_upload_that_stops_halfway_stores_nothing(cloud: Cloud) -> None:
    head = b"POST /webhook/blob HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    raw_request(cloud.port, head + b"a" * 500, read=False)
    raw_request(cloud.port, head + b"b" * 500)  # half-closed: the body can never complete
    assert httpx.get(f"{cloud.url}/health").status_code == 200
    assert read_all(cloud.storage) == []


def test_a_content_length_that_lies_short_stores_exactly_what_it_declared(cloud: Cloud) -> None:
    head = b"POST /webhook/blob HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
    with socket.create_connection(("127.0.0.1", cloud.port), timeout=5) as sock:
        sock.sendall(head + b"12345")
        assert read_response(sock).startswith(b"HTTP/1.1 202")
        sock.sendall(b"GARBAGE-NOT-HTTP\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 400")
    # All at once: the parser may refuse the connection before answering the first request,
    # but whatever it stored is exactly the declared body.
    answer = raw_request(cloud.port, head + b"67890GARBAGE-NOT-HTTP\r\n\r\n")
    assert b" 400 " in answer
    assert [d.envelope.body for d in read_all(cloud.storage)] in ([b"12345"], [b"12345", b"67890"])


def test_a_bad_content_length_is_a_bad_request(cloud: Cloud) -> None:
    head = b"POST /webhook/blob HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"
    assert raw_request(cloud.port, head + b"abc").startswith(b"HTTP/1.1 400")
    assert read_all(cloud.storage) == []


def test_a_full_channel_answers_503_with_retry_after(cloud: Cloud) -> None:
    for _ in range(3):
        assert httpx.post(f"{cloud.url}/webhook/tiny", content=b"x").status_code == 202
    full = httpx.post(f"{cloud.url}/webhook/tiny", content=b"x")
    assert full.status_code == 503
    assert full.json()["error"] == "channel_full"
    assert int(full.headers["retry-after"]) > 0
    assert len(read_all(cloud.storage, "tiny")) == 3


def test_channels_are_provisioned_at_start_up(cloud: Cloud) -> None:
    async def names() -> list[str]:
        store = open_buffer(cloud.storage)
        try:
            return [c.name for c in await store.list_channels()]
        finally:
            await store.aclose()

    assert asyncio.run(names()) == ["dev", "tiny"]
    assert httpx.get(f"{cloud.url}/ready").status_code == 200


def test_refused_uploads_do_not_grow_memory(cloud: Cloud) -> None:
    assert cloud.process is not None
    status = Path(f"/proc/{cloud.process.pid}/status")

    def rss_kb() -> int:
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS"))
        return int(line.split()[1])

    with httpx.Client() as client:
        client.post(f"{cloud.url}/webhook/blob", content=b"x" * (2 * 1024 * 1024))
        before = rss_kb()
        for _ in range(30):
            answer = client.post(f"{cloud.url}/webhook/blob", content=b"x" * (2 * 1024 * 1024))
            assert answer.status_code == 413
    assert rss_kb() - before < 30 * 1024


def test_storage_down_answers_503_and_recovers(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    cloud = Cloud(redis_server.url, write_webhooks(tmp_path), tmp_path)
    try:
        cloud.start()
        assert httpx.post(f"{cloud.url}/webhook/blob", content=b"1").status_code == 202
        redis_server.stop()
        down = httpx.post(f"{cloud.url}/webhook/blob", content=b"2", timeout=30)
        assert down.status_code == 503
        assert down.json()["error"] == "storage_unavailable"
        assert "retry-after" in down.headers
        assert httpx.get(f"{cloud.url}/ready").status_code == 503
        redis_server.start()
        deadline = time.monotonic() + 15
        while httpx.post(f"{cloud.url}/webhook/blob", content=b"3").status_code != 202:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert [d.envelope.body for d in read_all(redis_server.url)] == [b"1", b"3"]
    finally:
        cloud.stop()
        redis_server.stop()
