"""What a connection was given and never acknowledged comes back to it after the ack timeout,
even when it fills the connection's window.

A long-poll answer can be lost on the way (its TCP connection cut as it carried messages), and
the acks of an SSE or long-poll connector can be lost the same way. The long-poll connection
outlives its TCP connections, so nothing gives back what a lost answer held; only the ack
timeout does. Past it, those messages are due again: they no longer count against the
connection's window, and the connection's next read gets them. (Until the fix they kept
counting, so a connection whose window they filled read nothing ever again while it kept
polling: the rare ``link-long_poll-cut`` stall of ``test_connector_link``.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults.harness import CHANNEL, TOKEN, WEBHOOK, write_webhooks
from tests.servers import Cloud, running

WINDOW = 20
ACK_TIMEOUT = 1
HEADERS = {
    "Authorization": f"Bearer {TOKEN}",
    "X-Connector-ID": "lost-poll",
    "X-Webhook-Connect-Protocol": "webhook-connect.v1",
}


def send_window(client: httpx.Client, cloud: Cloud) -> None:
    for i in range(WINDOW):
        answer = client.post(f"{cloud.url}/webhook/{WEBHOOK}", content=f'{{"id":"{i}"}}')
        assert answer.status_code == 202


@pytest.mark.parametrize("window_of", ["connector", "channel"])
def test_a_lost_poll_answer_comes_back_to_the_same_connection(
    window_of: str, storage_url: str, tmp_path: Path
) -> None:
    """``connector``: the first poll asks for a window of 20 (``max_in_flight``), the channel
    allows 100. ``channel``: the channel's own window is 20, the one every poll of the
    connection has; the lost answer fills it."""
    channel = {"max_in_flight": WINDOW} if window_of == "channel" else {}
    webhooks = write_webhooks(tmp_path, ack_timeout_seconds=ACK_TIMEOUT, **channel)
    asked = f"&max_in_flight={WINDOW}" if window_of == "connector" else ""
    with running(Cloud(storage_url, webhooks, tmp_path)) as cloud, httpx.Client() as client:
        send_window(client, cloud)
        poll = f"{cloud.url}/connect/stream/{CHANNEL}/poll?max_messages=100"
        first = client.get(f"{poll}{asked}&timeout=1", headers=HEADERS, timeout=10)
        assert first.status_code == 200
        held = first.json()
        assert held["count"] == WINDOW  # the whole window, and this answer is "lost"
        wanted = {m["message_id"] for m in held["messages"]}
        ids: set[str] = set()
        started = time.monotonic()
        # The next polls of the same connection get them back: in one answer (SQLite, Redis)
        # or a few (RabbitMQ gives back what expired as its housekeeping finds it).
        while not wanted <= ids and time.monotonic() - started < 15:
            again = client.get(
                f"{poll}&timeout=10",
                headers={**HEADERS, "X-Connection-ID": held["connection_id"]},
                timeout=20,
            )
            waited = time.monotonic() - started
            assert again.status_code == 200, f"the next poll got nothing in {waited:.1f} s"
            assert json.loads(again.text)["connection_id"] == held["connection_id"]
            ids |= {m["message_id"] for m in again.json()["messages"]}
        assert ids == wanted


def read_ids(lines: Iterator[str], count: int, deadline: float) -> list[str]:
    """The ids of the next ``count`` messages of an SSE stream's ``lines``; fewer if it ends
    or ``deadline`` (monotonic) passes first (heartbeats every 5 s bring the loop round)."""
    seen: list[str] = []
    for line in lines:
        if line.startswith("id:"):
            seen.append(line.partition(":")[2].strip())
        if len(seen) == count or time.monotonic() > deadline:
            break
    return seen


def stream_ended(lines: Iterator[str], deadline: float) -> bool:
    """Whether the stream ends (sends its last line) before ``deadline`` (monotonic)."""
    for _ in lines:
        if time.monotonic() > deadline:
            return False
    return True


def test_an_sse_stream_whose_messages_come_back_unacknowledged_ends(
    storage_url: str, tmp_path: Path
) -> None:
    """An SSE stream whose acks never arrive (a dead link the cloud still writes into, or acks
    lost on their way) ends once what it sent comes back to it after the ack timeout, instead
    of taking it again and again (each time a delivery attempt, until dead-lettered); the
    connector's next stream gets the whole window."""
    webhooks = write_webhooks(tmp_path, ack_timeout_seconds=ACK_TIMEOUT, max_in_flight=WINDOW)
    with running(Cloud(storage_url, webhooks, tmp_path)) as cloud, httpx.Client() as client:
        send_window(client, cloud)
        url = f"{cloud.url}/connect/stream/{CHANNEL}/sse"
        with client.stream("GET", url, headers=HEADERS, timeout=15) as stream:
            lines = stream.iter_lines()
            first = read_ids(lines, WINDOW, time.monotonic() + 10)
            assert len(set(first)) == WINDOW
            assert stream_ended(lines, time.monotonic() + 10), "the stream sent them again"
        with client.stream("GET", url, headers=HEADERS, timeout=15) as stream:
            again = read_ids(stream.iter_lines(), WINDOW, time.monotonic() + 10)
        assert set(again) == set(first)


def test_a_dead_sse_stream_does_not_keep_what_a_live_one_could_deliver(
    storage_url: str, tmp_path: Path
) -> None:
    """A blackholed SSE stream (the cloud's writes still succeed, nothing comes back) and the
    stream the connector opened again after noticing: the window the dead one held reaches the
    live one after the ack timeout. (Before the fix the dead stream took back what expired
    whenever it read first, a delivery attempt each time: in the link test's blackhole
    scenario 15 to 49 messages were dead-lettered that way in 6 of 6 runs. Here, with one
    window, the live stream won that race on the old code too.)"""
    webhooks = write_webhooks(
        tmp_path, ack_timeout_seconds=ACK_TIMEOUT, max_in_flight=WINDOW, max_delivery_attempts=3
    )
    with running(Cloud(storage_url, webhooks, tmp_path)) as cloud, httpx.Client() as client:
        send_window(client, cloud)
        url = f"{cloud.url}/connect/stream/{CHANNEL}/sse"
        live_headers = {**HEADERS, "X-Connector-ID": "live"}
        with client.stream("GET", url, headers=HEADERS, timeout=15) as dead:
            held = read_ids(dead.iter_lines(), WINDOW, time.monotonic() + 10)
            assert len(set(held)) == WINDOW
            with client.stream("GET", url, headers=live_headers, timeout=15) as live:
                got = read_ids(live.iter_lines(), WINDOW, time.monotonic() + 10)
        assert set(got) == set(held), f"{WINDOW - len(set(got))} never reached the live stream"
