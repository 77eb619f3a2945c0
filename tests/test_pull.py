"""SSE, long-poll and POST /connect/ack: the seed frames, bad input, and acks across replicas."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import Cloud
from webhook_connect.cloud.buffers import open_buffer

TOKEN = "pull-token-0123456789"
OTHER_TOKEN = "pull-other-0123456789"
WEBHOOKS = {
    "dev": {
        "module": "webhook_connect",
        "data_type": "blob",
        "module-config": {
            "channel": "dev",
            "channel_token": TOKEN,
            "retry_delay_seconds": 0.2,
            "max_in_flight": 3,
        },
    },
    "other": {
        "module": "webhook_connect",
        "module-config": {"channel": "other", "channel_token": OTHER_TOKEN},
    },
}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def post(cloud: Cloud, body: bytes) -> str:
    answer = httpx.post(f"{cloud.url}/webhook/dev", content=body)
    assert answer.status_code == 202
    return str(answer.json()["message_id"])


def poll(cloud: Cloud, connection_id: str | None = None, **params: Any) -> httpx.Response:
    headers = dict(AUTH)
    if connection_id:
        headers["X-Connection-ID"] = connection_id
    params = {"timeout": 1, "max_messages": 10, **params}
    return httpx.get(
        f"{cloud.url}/connect/stream/dev/poll", params=params, headers=headers, timeout=70
    )


def ack(cloud: Cloud, connection_id: str, token: str = TOKEN, **body: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", "X-Connection-ID": connection_id}
    return httpx.post(f"{cloud.url}/connect/ack", json=body, headers=headers)


def sse_events(response: httpx.Response, count: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """The first ``count`` events of an SSE stream, as (event, data)."""
    event, seen = "message", 0
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            if event != "heartbeat":
                yield event, json.loads(line.split(":", 1)[1])
                seen += 1
            if seen == count:
                return


def test_seed_frames_over_sse_ack_and_nack(cloud: Cloud) -> None:
    """A Core Webhook Module connector over SSE: seed frames, acks and nacks by POST."""
    ids = [post(cloud, json.dumps({"n": i}).encode()) for i in range(3)]
    url = f"{cloud.url}/connect/stream/dev/sse"
    with httpx.stream("GET", url, params={"token": TOKEN}, timeout=30) as stream:
        events = sse_events(stream, 100)
        kind, hello = next(events)
        assert kind == "connected"
        connection_id = hello["connection_id"]
        webhooks = [next(events) for _ in range(3)]
        assert [(k, d["message_id"], d["payload"]) for k, d in webhooks] == [
            ("webhook", ids[i], {"n": i}) for i in range(3)
        ]
        assert ack(cloud, connection_id, message_id=ids[0]).status_code == 200
        dead = ack(cloud, connection_id, message_id=ids[1], status="nack", retry=False)
        assert dead.status_code == 200
        again = ack(cloud, connection_id, message_id=ids[2], status="nack", retry=True)
        assert again.status_code == 200
        kind, redelivered = next(e for e in events if e[0] == "webhook")
        assert redelivered["message_id"] == ids[2]  # after retry_delay_seconds
        assert ack(cloud, connection_id, message_id=ids[2]).status_code == 200
    # The stream closed: the connection is gone with it.
    assert ack(cloud, connection_id, message_id=ids[0]).status_code == 404

    async def stats() -> tuple[int, list[str]]:
        store = open_buffer(cloud.storage)
        try:
            letters = [d.message_id for d in await store.dead_letters("dev")]
            return (await store.stats("dev")).counters["delivered"], letters
        finally:
            await store.aclose()

    import asyncio

    assert asyncio.run(stats()) == (2, [ids[1]])


def test_long_poll_acks_nacks_and_keeps_its_connection(cloud: Cloud) -> None:
    ids = [post(cloud, f"m{i}".encode()) for i in range(4)]
    first = poll(cloud)
    assert first.status_code == 200
    body = first.json()
    connection_id = body["connection_id"]
    assert first.headers["x-connection-id"] == connection_id
    assert [m["message_id"] for m in body["messages"]] == ids[:3], "window of 3"
    assert [m["payload"] for m in body["messages"]] == ["m0", "m1", "m2"]
    assert poll(cloud, connection_id).status_code == 204, "window full until acks"
    assert ack(cloud, connection_id, message_id=ids[0]).json() == {"status": "acknowledged"}
    nack = ack(cloud, connection_id, message_id=ids[1], status="nack", retry=False, reason="bad")
    assert nack.json() == {"status": "nacked"}
    retry = ack(cloud, connection_id, message_id=ids[2], status="nack", retry=True)
    assert retry.status_code == 200
    # The ack that follows a poll is accepted: the connection outlives the poll.
    seen: list[str] = []
    while len(seen) < 2:
        again = poll(cloud, connection_id, timeout=5)
        seen += [m["message_id"] for m in again.json()["messages"]]
    assert sorted(seen) == sorted([ids[2], ids[3]])
    batch = ack(cloud, connection_id, message_ids=[ids[2], ids[3], "1-1"])
    assert batch.json() == {"status": "ok", "settled": 2, "unknown": ["1-1"]}
    assert poll(cloud, connection_id).status_code == 204


def test_native_long_poll_is_byte_exact(cloud: Cloud) -> None:
    import base64

    body = bytes(range(256))
    message_id = post(cloud, body)
    answer = poll(cloud, group="default")
    assert answer.status_code == 200
    native = httpx.get(
        f"{cloud.url}/connect/stream/dev/poll",
        params={"timeout": 1, "group": "raw"},
        headers={**AUTH, "X-Webhook-Connect-Protocol": "webhook-connect.v1"},
    )
    assert native.status_code == 204, "a new group starts after what is already there"
    post(cloud, body)
    native = httpx.get(
        f"{cloud.url}/connect/stream/dev/poll",
        params={"timeout": 5, "group": "raw"},
        headers={**AUTH, "X-Webhook-Connect-Protocol": "webhook-connect.v1"},
    )
    [message] = native.json()["messages"]
    assert base64.b64decode(message["body_b64"]) == body
    assert message["method"] == "POST" and message["path"] == "/webhook/dev"
    assert message_id != message["message_id"]


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"timeout": 0}, "timeout must be an integer from 1 to 60"),
        ({"timeout": 61}, "timeout must be an integer from 1 to 60"),
        ({"timeout": "x"}, "timeout"),
        ({"max_messages": 0}, "max_messages must be an integer from 1 to 100"),
        ({"max_messages": 1000}, "max_messages"),
        ({"group": "../etc"}, "invalid group name"),
    ],
)
def test_absurd_poll_parameters_are_refused(
    cloud: Cloud, params: dict[str, Any], detail: str
) -> None:
    answer = poll(cloud, **params)
    assert answer.status_code == 400
    assert detail in answer.json()["detail"]


def test_bad_acks_get_a_clear_4xx(cloud: Cloud) -> None:
    post(cloud, b"x")
    connection_id = poll(cloud).json()["connection_id"]
    url = f"{cloud.url}/connect/ack"
    headers = {**AUTH, "X-Connection-ID": connection_id}
    cases = [
        (httpx.post(url, content=b"{nope", headers=headers), 400, "bad_request"),
        (httpx.post(url, content=b"[]", headers=headers), 400, "bad_request"),
        (httpx.post(url, json={"status": "ack"}, headers=headers), 400, "bad_request"),
        (httpx.post(url, json={"message_id": 5}, headers=headers), 400, "bad_request"),
        (
            httpx.post(url, json={"message_id": "1", "status": "maybe"}, headers=headers),
            400,
            "bad_request",
        ),
        (httpx.post(url, content=b"x" * 300_000, headers=headers), 413, "body_too_large"),
        (httpx.post(url, json={"message_id": "1"}, headers=AUTH), 400, "bad_request"),
        (
            httpx.post(url, json={"message_id": "1"}, headers={"X-Connection-ID": connection_id}),
            401,
            "unauthorized",
        ),
        (ack(cloud, "f" * 32, message_id="1"), 404, "unknown_connection"),
        # A connection of channel "dev" is not reachable with the token of "other".
        (ack(cloud, connection_id, token=OTHER_TOKEN, message_id="1"), 404, "unknown_connection"),
        (ack(cloud, connection_id, message_id="123-4"), 404, "unknown_message"),
    ]
    for answer, status, error in cases:
        assert (answer.status_code, answer.json()["error"]) == (status, error), answer.text
    assert httpx.get(f"{cloud.url}/health").status_code == 200


def test_a_foreign_message_id_is_not_acked(cloud: Cloud) -> None:
    post(cloud, b"x")
    holder = poll(cloud).json()
    [message] = holder["messages"]
    # Other connectors (another X-Connector-ID: a poll without a connection id from the same
    # connector continues its connection) get nothing while it is held.
    other = poll(cloud, connector_id="other")
    assert other.status_code == 204
    intruder = poll(cloud, connector_id="intruder")
    assert intruder.status_code == 204
    stranger = intruder.headers["x-connection-id"]
    assert ack(cloud, stranger, message_id=message["message_id"]).status_code == 404
    assert ack(cloud, holder["connection_id"], message_id=message["message_id"]).status_code == 200


def test_an_ack_reaches_any_replica(redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    first = Cloud(redis_url, path, tmp_path)
    second = Cloud(redis_url, path, tmp_path)
    first.start()
    second.start()
    try:
        ids = [post(first, f"m{i}".encode()) for i in range(3)]
        answer = poll(first)
        connection_id = answer.json()["connection_id"]
        assert ack(second, connection_id, message_ids=ids).json()["settled"] == 3
        # The next poll, at the second replica, continues the same connection.
        post(first, b"m3")
        again = poll(second, connection_id, timeout=5)
        assert [m["payload"] for m in again.json()["messages"]] == ["m3"]

        async def depth() -> int:
            store = open_buffer(redis_url)
            try:
                await store.housekeep("dev")
                return (await store.stats("dev")).in_flight
            finally:
                await store.aclose()

        import asyncio

        assert asyncio.run(depth()) == 1
    finally:
        first.stop()
        second.stop()


def test_an_sse_client_that_never_reads_does_not_hurt_others(cloud: Cloud) -> None:
    for _ in range(30):
        post(cloud, b"y" * 200_000)
    url = f"{cloud.url}/connect/stream/dev/sse"
    with httpx.stream("GET", url, params={"token": TOKEN}, timeout=30):
        # This stream is never read; another connection still gets served.
        answer = poll(cloud, timeout=10)
        assert answer.status_code in (200, 204)
        assert httpx.get(f"{cloud.url}/health").status_code == 200
