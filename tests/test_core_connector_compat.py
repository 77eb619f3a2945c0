"""The Core Webhook Module's connector against this cloud, over SSE and long-poll.

``CoreClient`` does on the wire what that project's connector does (its ``SSEClient`` and
``LongPollClient``), nothing more:

* SSE: ``GET /connect/stream/{channel}/sse`` with ``Authorization``, optional
  ``X-Connector-ID``, ``Accept: text/event-stream`` and ``Cache-Control: no-cache``; it keeps
  the ``connection_id`` of the ``connected`` event and hands each ``webhook`` event on.
* Long-poll: ``GET /connect/stream/{channel}/poll?timeout=30&max_messages=10`` with
  ``Authorization`` and optional ``X-Connector-ID``, never ``X-Connection-ID``; it keeps the
  ``connection_id`` of the last ``200`` body (it does not read the ``204``'s header).
* Acks and nacks: ``POST /connect/ack?message_id=…&status=ack`` (nack:
  ``&status=nack&retry=true|false``), no body, no reason, with ``Authorization`` and
  ``X-Connection-ID`` set to the id it kept, or empty before it has one. Its processing is
  asynchronous, so an ack may follow the next poll: it names the id of the latest poll.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import Cloud, running

TOKEN = "core-compat-token-0123456789"
ADMIN = "admin-token-0123456789"
WEBHOOKS = {
    "hook": {
        "module": "webhook_connect",
        "data_type": "json",
        "module-config": {
            "channel": "dev",
            "channel_token": TOKEN,
            "retry_delay_seconds": 0.2,
            "max_connections": 10,
        },
    }
}


@pytest.fixture
def cloud(storage_url: str, tmp_path: Path) -> Iterator[Cloud]:
    """The cloud on each backend, with the admin API on to list connections and dead letters."""
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    with running(Cloud(storage_url, path, tmp_path, "--admin-token", ADMIN)) as server:
        yield server


class CoreClient:
    """What the Core Webhook Module's connector sends and reads, over SSE and long-poll."""

    def __init__(self, cloud: Cloud, connector_id: str | None = None) -> None:
        self.base = cloud.url
        self.connector_id = connector_id
        self.connection_id: str | None = None
        self.http = httpx.Client(timeout=40)  # one session, as its aiohttp ClientSession

    def close(self) -> None:
        self.http.close()

    def headers(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        if self.connector_id:
            headers["X-Connector-ID"] = self.connector_id
        return headers

    def _settle(self, params: dict[str, str]) -> httpx.Response:
        headers = {"Authorization": f"Bearer {TOKEN}", "X-Connection-ID": self.connection_id or ""}
        return self.http.post(f"{self.base}/connect/ack", params=params, headers=headers)

    def ack(self, message_id: str) -> httpx.Response:
        return self._settle({"message_id": message_id, "status": "ack"})

    def nack(self, message_id: str, retry: bool) -> httpx.Response:
        params = {"message_id": message_id, "status": "nack", "retry": str(retry).lower()}
        return self._settle(params)

    def poll(self) -> list[dict[str, Any]]:
        answer = self.http.get(
            f"{self.base}/connect/stream/dev/poll",
            params={"timeout": 30, "max_messages": 10},
            headers=self.headers(),
        )
        if answer.status_code == 204:
            return []
        assert answer.status_code == 200, answer.text
        data = answer.json()
        if "connection_id" in data:
            self.connection_id = data["connection_id"]
        return list(data.get("messages", []))

    @contextmanager
    def sse(self) -> Iterator[Iterator[dict[str, Any]]]:
        """The ``webhook`` events of one SSE stream, parsed as that connector parses them."""
        headers = {**self.headers(), "Accept": "text/event-stream", "Cache-Control": "no-cache"}
        url = f"{self.base}/connect/stream/dev/sse"
        with self.http.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200, response.read()
            yield self._webhooks(response)

    def _webhooks(self, response: httpx.Response) -> Iterator[dict[str, Any]]:
        event, data = "message", ""
        for line in response.iter_lines():
            line = line.rstrip("\r")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = f"{data}\n{line[5:].strip()}" if data else line[5:].strip()
            elif line == "" and data:
                if event == "connected":
                    self.connection_id = json.loads(data).get("connection_id")
                elif event == "webhook":
                    yield json.loads(data)
                event, data = "message", ""


@pytest.fixture
def core(cloud: Cloud) -> Iterator[CoreClient]:
    client = CoreClient(cloud)
    try:
        yield client
    finally:
        client.close()


def post(cloud: Cloud, n: int) -> str:
    answer = httpx.post(f"{cloud.url}/webhook/hook", json={"n": n})
    assert answer.status_code == 202, answer.text
    return str(answer.json()["message_id"])


def admin(cloud: Cloud, path: str) -> Any:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    answer = httpx.get(f"{cloud.url}/admin/channels/dev{path}", headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def settled(cloud: Cloud) -> tuple[int, int]:
    """(messages delivered, messages in flight) of the channel."""
    stats = admin(cloud, "")["stats"]
    return stats["counters"].get("delivered", 0), stats["in_flight"]


def dead_reasons(cloud: Cloud) -> list[tuple[str, str]]:
    letters = admin(cloud, "/dead-letters")["dead_letters"]
    return [(d["message_id"], d["reason"]) for d in letters]


ACKED = {"status": "acknowledged"}
NACKED = {"status": "nacked"}


def test_sse_delivers_fifty_once_each_and_its_query_acks_settle(
    cloud: Cloud, core: CoreClient
) -> None:
    ids = [post(cloud, n) for n in range(50)]
    seen: list[str] = []
    with core.sse() as webhooks:
        for message in webhooks:
            assert message["payload"] == {"n": len(seen)}
            seen.append(message["message_id"])
            answer = core.ack(message["message_id"])
            assert (answer.status_code, answer.json()) == (200, ACKED), answer.text
            if len(seen) == 50:
                break
        # Settled while the stream is still open: nothing is held, nothing will come again.
        assert settled(cloud) == (50, 0)
    assert seen == ids


def test_sse_nack_with_and_without_retry(cloud: Cloud, core: CoreClient) -> None:
    dropped, retried = post(cloud, 0), post(cloud, 1)
    with core.sse() as webhooks:
        first, second = next(webhooks), next(webhooks)
        assert [first["message_id"], second["message_id"]] == [dropped, retried]
        answer = core.nack(dropped, retry=False)
        assert (answer.status_code, answer.json()) == (200, NACKED)
        answer = core.nack(retried, retry=True)
        assert (answer.status_code, answer.json()) == (200, NACKED)
        again = next(webhooks)  # after the channel's retry delay
        assert again["message_id"] == retried
        assert core.ack(retried).json() == ACKED
        assert settled(cloud) == (1, 0)
    # Its nacks carry no reason: the dead letter says what it asked for.
    assert dead_reasons(cloud) == [(dropped, "nack")]


def test_long_poll_delivers_fifty_once_each_with_acks_after_the_next_poll(
    cloud: Cloud, core: CoreClient
) -> None:
    ids = [post(cloud, n) for n in range(50)]
    seen: list[str] = []
    unacked: list[str] = []
    while len(seen) < 50:
        batch = [m["message_id"] for m in core.poll()]
        assert batch, "a backlog is waiting: the poll answers at once"
        # Its processing acks while it polls again: the acks of the previous batch name the
        # connection id of this poll.
        for message_id in unacked:
            assert core.ack(message_id).json() == ACKED
        seen += batch
        unacked = batch
    for message_id in unacked:
        assert core.ack(message_id).json() == ACKED
    assert seen == ids
    assert settled(cloud) == (50, 0)
    [connection] = admin(cloud, "/connections")["connections"]
    assert (connection["transport"], connection["delivered"]) == ("long_poll", 50)


def test_thirty_long_polls_keep_one_connection(cloud: Cloud, core: CoreClient) -> None:
    for n in range(30):
        message_id = post(cloud, n)
        [message] = core.poll()
        assert message["message_id"] == message_id
        assert core.ack(message_id).json() == ACKED
    connections = admin(cloud, "/connections")["connections"]
    assert [(c["connection_id"], c["delivered"]) for c in connections] == [(core.connection_id, 30)]


def test_long_poll_nack_with_and_without_retry(cloud: Cloud, core: CoreClient) -> None:
    dropped, retried = post(cloud, 0), post(cloud, 1)
    assert [m["message_id"] for m in core.poll()] == [dropped, retried]
    assert core.nack(dropped, retry=False).json() == NACKED
    assert core.nack(retried, retry=True).json() == NACKED
    again: list[dict[str, Any]] = []
    while not again:  # each poll waits up to its 30 s for the retry delay to pass
        again = core.poll()
    assert [m["message_id"] for m in again] == [retried]
    assert core.ack(retried).json() == ACKED
    assert settled(cloud) == (1, 0)
    assert dead_reasons(cloud) == [(dropped, "nack")]
    assert len(admin(cloud, "/connections")["connections"]) == 1


def test_connectors_with_their_own_ids_get_their_own_connections(cloud: Cloud) -> None:
    for n in range(30):
        post(cloud, n)
    first, second = CoreClient(cloud, "agent-a"), CoreClient(cloud, "agent-b")
    try:
        taken = [first.poll(), second.poll(), first.poll()]
        assert [len(batch) for batch in taken] == [10, 10, 10]
        for client, batch in zip((first, second, first), taken, strict=True):
            for message in batch:
                assert client.ack(message["message_id"]).json() == ACKED
        connections = admin(cloud, "/connections")["connections"]
        assert sorted((c["connector_id"], c["delivered"]) for c in connections) == [
            ("agent-a", 20),
            ("agent-b", 10),
        ]
        assert first.connection_id != second.connection_id
    finally:
        first.close()
        second.close()


def test_bad_acks_in_its_form_get_the_same_4xx_as_ours(cloud: Cloud, core: CoreClient) -> None:
    message_id = post(cloud, 0)
    core.poll()
    url = f"{cloud.url}/connect/ack"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    named = {**auth, "X-Connection-ID": core.connection_id or ""}
    # Each ack is sent in its form (query) and in ours (JSON body): same status, same error.
    cases: list[tuple[dict[str, str], dict[str, str]]] = [
        (named, {"status": "ack"}),  # no id
        (named, {"message_id": ""}),  # an empty id
        (named, {"message_id": "x" * 201}),  # an id too long to be one
        (named, {"message_id": "1-1", "status": "maybe"}),
        (named, {"message_id": "1-1", "status": "nack", "retry": "perhaps"}),
        (named, {"message_id": "123-4"}),  # not held by this connection
        ({**auth, "X-Connection-ID": ""}, {"message_id": message_id}),  # before it has an id
        ({"X-Connection-ID": core.connection_id or ""}, {"message_id": message_id}),  # no token
    ]
    for headers, params in cases:
        by_query = httpx.post(url, params=params, headers=headers)
        by_body = httpx.post(url, json=params, headers=headers)
        assert by_query.status_code in (400, 401, 404), by_query.text
        assert (by_query.status_code, by_query.json()["error"]) == (
            by_body.status_code,
            by_body.json()["error"],
        ), (params, by_query.text, by_body.text)
    twice = httpx.post(f"{url}?message_id={message_id}&message_id=1-1", headers=named)
    assert (twice.status_code, twice.json()["error"]) == (400, "bad_request")
    assert "more than once" in twice.json()["detail"]
    # None of that settled anything; the ack in its form still does.
    assert core.ack(message_id).json() == ACKED
    assert settled(cloud) == (1, 0)
