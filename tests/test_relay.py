"""End to end: cloud under uvicorn, real connector processes, a real sink (issue: the relay).

Every test runs on both storage backends; Redis runs with append-only persistence.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import signal
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import Cloud, ConnectorProcess, Sink, wait_until
from webhook_connect.cloud.buffers import DeadLetter, open_buffer

TOKEN = "relay-token-0123456789"
SECRET = b"github-webhook-secret"
CHANNEL = {
    "channel": "dev",
    "channel_token": TOKEN,
    "ack_timeout_seconds": 5,
    "retry_delay_seconds": 0.2,
    "max_delivery_attempts": 50,
}
WEBHOOKS = {
    "github": {"module": "webhook_connect", "module-config": CHANNEL},
    "raw": {
        "module": "webhook_connect",
        "data_type": "blob",
        "methods": ["POST", "PUT", "PATCH"],
        "module-config": CHANNEL,
    },
}


@pytest.fixture(params=["websocket", "sse", "long_poll"])
def protocol(request: pytest.FixtureRequest) -> str:
    """Every end-to-end test runs over each transport."""
    return str(request.param)


def connector_settings(
    cloud: Cloud, sink: Sink, workdir: Path, protocol: str, **extra: object
) -> dict[str, object]:
    return {
        "protocol": protocol,
        "cloud_url": cloud.url,
        "channel": "dev",
        "token": TOKEN,
        "connector_id": "test-connector",
        "state_dir": str(workdir / "state"),
        "reconnect_delay_seconds": 0.2,
        "max_reconnect_delay_seconds": 1,
        "default_target": {
            "url": sink.url,
            "timeout_seconds": 5,
            "retry_max_attempts": 2,
            "retry_delay_seconds": 0.05,
        },
        **extra,
    }


class Fleet(list[ConnectorProcess]):
    """The connectors a test started, all on one transport; killed when the test ends."""

    def __init__(self, protocol: str) -> None:
        super().__init__()
        self.protocol = protocol


@pytest.fixture
def connectors(protocol: str) -> Iterator[Fleet]:
    started = Fleet(protocol)
    try:
        yield started
    finally:
        for process in started:
            process.stop(signal.SIGKILL)


def start_connector(
    connectors: Fleet,
    cloud: Cloud,
    sink: Sink,
    workdir: Path,
    name: str = "connector",
    **extra: object,
) -> ConnectorProcess:
    settings = connector_settings(cloud, sink, workdir, connectors.protocol, **extra)
    process = ConnectorProcess(workdir, settings, name)
    connectors.append(process)
    process.start()
    wait_until(lambda: "connected to" in process.output(), 20, f"{name} to connect")
    return process


async def post_many(url: str, count: int, webhook: str = "raw") -> list[str]:
    # Eight connections: httpx's pool slows down past a handful of concurrent requests (500
    # posts took 1.0 s on 4 connections, 4.1 s on 32, here).
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=8), timeout=30) as client:
        semaphore = asyncio.Semaphore(8)

        async def post(i: int) -> str:
            # As a provider would, send again when the connection broke before an answer
            # (a kept-alive connection the server closed as it was reused, on a loaded host).
            for retry in range(3):
                try:
                    async with semaphore:
                        answer = await client.post(
                            f"{url}/webhook/{webhook}", content=f"m{i}".encode()
                        )
                    break
                except (httpx.ReadError, httpx.RemoteProtocolError):
                    if retry == 2:
                        raise
            assert answer.status_code == 202, answer.text
            return str(answer.json()["message_id"])

        return list(await asyncio.gather(*(post(i) for i in range(count))))


def message_ids(sink: Sink, records: list[dict[str, object]] | None = None) -> list[str]:
    ids = []
    for record in sink.records() if records is None else records:
        headers = {str(k).lower(): v for k, v in record["headers"]}  # type: ignore[union-attr]
        ids.append(str(headers["x-webhook-connect-message-id"]))
    return ids


def body_of(record: dict[str, object]) -> bytes:
    return base64.b64decode(str(record["body_b64"]))


CASES = [
    ("github", "POST", "application/json", b'{"action":"opened","n":[1,2.50,"\\u00e9"]}'),
    ("raw", "POST", "application/x-www-form-urlencoded", b"a=1&b=%C3%A9+x&c="),
    ("raw", "PUT", "application/xml", b"<?xml version='1.0'?><order id='1'>caf\xc3\xa9</order>"),
    ("raw", "PATCH", "application/octet-stream", bytes(range(256)) * 3),
    ("raw", "POST", "text/plain", b""),
]


def test_bodies_headers_and_queries_arrive_byte_exact(
    cloud: Cloud, sink: Sink, connectors: Fleet, tmp_path: Path
) -> None:
    start_connector(connectors, cloud, sink, tmp_path)
    sent = []
    for i, (webhook, method, content_type, body) in enumerate(CASES):
        signature = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        headers = [
            ("Content-Type", content_type),
            ("X-Hub-Signature-256", signature),
            ("X-Custom-Thing", f"value {i}"),
            ("X-Repeated", "one"),
            ("X-Repeated", "two"),
        ]
        query = f"case={i}&redirect=%2Fhome%3Fa%3Db&empty="
        answer = httpx.request(
            method, f"{cloud.url}/webhook/{webhook}?{query}", content=body, headers=headers
        )
        assert answer.status_code == 202, answer.text
        sent.append((method, query, headers, body, answer.json()["message_id"]))
    wait_until(lambda: len(sink.records()) >= len(CASES), 20, "all cases at the sink")
    records = sink.records()
    received = dict(zip(message_ids(sink, records), records, strict=True))
    for method, query, headers, body, message_id in sent:
        record = received[message_id]
        assert record["method"] == method
        assert record["query"] == query
        assert body_of(record) == body
        got = [(str(k), str(v)) for k, v in record["headers"]]  # type: ignore[union-attr]
        lowered = [(k.lower(), v) for k, v in got]
        for name, value in headers:
            assert (name.lower(), value) in lowered
        assert [v for k, v in lowered if k == "x-repeated"] == ["one", "two"]
        assert ("x-webhook-connect-channel", "dev") in lowered
        assert all(k not in ("transfer-encoding", "connection") for k, _ in lowered)
        # The provider's signature verifies at the local target.
        signature = dict(lowered)["x-hub-signature-256"]
        expected = "sha256=" + hmac.new(SECRET, body_of(record), hashlib.sha256).hexdigest()
        assert hmac.compare_digest(signature, expected)


def test_messages_sent_while_offline_arrive_when_the_connector_starts(
    cloud: Cloud, sink: Sink, connectors: Fleet, tmp_path: Path
) -> None:
    ids = asyncio.run(post_many(cloud.url, 1000))
    start_connector(connectors, cloud, sink, tmp_path)
    wait_until(lambda: len(set(message_ids(sink))) >= 1000, 60, "1,000 messages at the sink")
    assert set(message_ids(sink)) == set(ids)


def test_sigkill_of_the_connector_loses_nothing_and_duplicates_stay_in_the_window(
    cloud: Cloud, sink: Sink, connectors: Fleet, tmp_path: Path
) -> None:
    ids = asyncio.run(post_many(cloud.url, 2000))
    first = start_connector(connectors, cloud, sink, tmp_path)
    wait_until(lambda: len(sink.records()) >= 400, 60, "deliveries to be under way")
    first.stop(signal.SIGKILL)
    start_connector(connectors, cloud, sink, tmp_path, name="restarted")
    wait_until(lambda: set(message_ids(sink)) >= set(ids), 90, "all 2,000 messages")
    counts = Counter(message_ids(sink))
    duplicates = sum(n - 1 for n in counts.values())
    assert duplicates <= 100, f"{duplicates} duplicates exceed the in-flight window of 100"


def test_a_failing_target_is_retried_until_it_recovers(
    cloud: Cloud, connectors: Fleet, tmp_path: Path
) -> None:
    failing = Sink(tmp_path, status=500)
    failing.start()
    try:
        start_connector(connectors, cloud, failing, tmp_path)
        ids = asyncio.run(post_many(cloud.url, 20))
        wait_until(lambda: len(failing.records()) >= 40, 30, "several failed attempts")
    finally:
        failing.stop()
    recovered = Sink(tmp_path, status=200, port=failing.port)
    recovered.start()
    try:
        wait_until(lambda: set(message_ids(recovered)) >= set(ids), 60, "delivery after recovery")
    finally:
        recovered.stop()


def test_a_rejecting_target_dead_letters_the_message(
    cloud: Cloud, connectors: Fleet, tmp_path: Path
) -> None:
    rejecting = Sink(tmp_path, status=400)
    rejecting.start()
    try:
        start_connector(connectors, cloud, rejecting, tmp_path)
        [message_id] = asyncio.run(post_many(cloud.url, 1))

        async def dead() -> list[DeadLetter]:
            store = open_buffer(cloud.storage)
            try:
                return await store.dead_letters("dev")
            finally:
                await store.aclose()

        def reasons() -> list[tuple[str, str]]:
            return [(d.message_id, d.reason) for d in asyncio.run(dead())]

        wait_until(lambda: reasons() == [(message_id, "http_400")], 20, "dead letter")
        assert len(rejecting.records()) == 1, "a 400 is not retried"
        [letter] = asyncio.run(dead())
        [attempt] = letter.delivery_attempts
        assert (attempt.attempt, attempt.connector, attempt.status_code) == (
            1,
            "test-connector",
            400,
        )
        assert 0 < attempt.duration < 20
    finally:
        rejecting.stop()


def test_the_connector_rides_out_a_cloud_crash(
    cloud: Cloud, sink: Sink, connectors: Fleet, tmp_path: Path
) -> None:
    connector = start_connector(connectors, cloud, sink, tmp_path)
    before = asyncio.run(post_many(cloud.url, 300))
    cloud.stop(signal.SIGKILL)
    cloud.start()
    after = asyncio.run(post_many(cloud.url, 300))
    wait_until(lambda: set(message_ids(sink)) >= set(before + after), 60, "all 600 messages")
    assert connector.output().count("connected to") >= 2
    assert "connection lost" in connector.output()


def test_one_group_shares_and_two_groups_each_get_everything(
    cloud: Cloud, sink: Sink, connectors: Fleet, tmp_path: Path
) -> None:
    other = Sink(tmp_path)
    other.start()
    try:
        start_connector(connectors, cloud, sink, tmp_path, name="a1", max_in_flight=5)
        start_connector(connectors, cloud, sink, tmp_path, name="a2", max_in_flight=5)
        start_connector(connectors, cloud, other, tmp_path, name="b", group="analytics")
        ids = asyncio.run(post_many(cloud.url, 300))
        wait_until(lambda: len(message_ids(sink)) >= 300, 60, "group default")
        wait_until(lambda: len(message_ids(other)) >= 300, 60, "group analytics")
        assert sorted(message_ids(sink)) == sorted(ids), "each message to one of the group"
        assert sorted(message_ids(other)) == sorted(ids)
        a1 = connectors[0].output().count(" -> ")
        a2 = connectors[1].output().count(" -> ")
        assert a1 > 0 and a2 > 0 and a1 + a2 == 300
    finally:
        other.stop()


def test_a_refused_token_is_fatal_with_a_clear_line(
    cloud: Cloud, sink: Sink, tmp_path: Path, protocol: str
) -> None:
    process = ConnectorProcess(
        tmp_path, connector_settings(cloud, sink, tmp_path, protocol, token="wrong-token-123")
    )
    process.start()
    try:
        assert process.wait(20) == 1
    finally:
        process.stop(signal.SIGKILL)
    assert "refused" in process.output()


def test_sigterm_stops_the_connector_cleanly(
    cloud: Cloud, sink: Sink, connectors: Fleet, tmp_path: Path
) -> None:
    connector = start_connector(connectors, cloud, sink, tmp_path)
    asyncio.run(post_many(cloud.url, 50))
    wait_until(lambda: len(sink.records()) >= 50, 20, "deliveries")
    assert connector.stop(signal.SIGTERM) == 0
    assert "stopped" in connector.output()


def test_a_hanging_target_is_bounded_by_its_timeout(
    cloud: Cloud, connectors: Fleet, tmp_path: Path
) -> None:
    # A socket that never accepts: connections queue in the backlog and get no answer.
    with socket.socket() as hanging:
        hanging.bind(("127.0.0.1", 0))
        hanging.listen(64)
        port = hanging.getsockname()[1]
        placeholder = Sink(tmp_path, port=port)
        target = {"url": placeholder.url, "timeout_seconds": 0.3, "retry_max_attempts": 1}
        connector = start_connector(connectors, cloud, placeholder, tmp_path, default_target=target)
        [message_id] = asyncio.run(post_many(cloud.url, 1))
        wait_until(lambda: "timeout" in connector.output(), 20, "a timed-out delivery")
    # The message went back to the channel; once the target answers, it is delivered.
    placeholder.start()
    try:
        wait_until(lambda: message_id in message_ids(placeholder), 30, "delivery after hang")
    finally:
        placeholder.stop()


def test_ordered_mode_delivers_in_channel_order(
    cloud: Cloud, sink: Sink, connectors: Fleet, tmp_path: Path
) -> None:
    ids = []
    for i in range(30):
        answer = httpx.post(f"{cloud.url}/webhook/raw", content=f"m{i}".encode())
        ids.append(answer.json()["message_id"])
    start_connector(connectors, cloud, sink, tmp_path, ordered=True, max_concurrent_requests=8)
    wait_until(lambda: len(sink.records()) >= 30, 30, "30 ordered deliveries")
    assert message_ids(sink) == ids
    assert [body_of(r) for r in sink.records()] == [f"m{i}".encode() for i in range(30)]
