"""A long-poll answer lost on the way (its TCP connection cut as it carried a full window) does
not stall the connection: what it held is due again after the ack timeout, and the next poll
of the same connection gets it.

The long-poll connection outlives its TCP connections, so nothing gives back what it held
when one breaks; only the ack timeout does. This pins down, on each backend, the case the
long-poll cut scenario of ``test_connector_link`` can hit at random.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.faults.harness import CHANNEL, TOKEN, WEBHOOK, write_webhooks
from tests.servers import Cloud, running

WINDOW = 20
HEADERS = {
    "Authorization": f"Bearer {TOKEN}",
    "X-Connector-ID": "lost-poll",
    "X-Webhook-Connect-Protocol": "webhook-connect.v1",
}


def test_a_lost_poll_answer_comes_back_to_the_same_connection(
    storage_url: str, tmp_path: Path
) -> None:
    webhooks = write_webhooks(tmp_path, ack_timeout_seconds=1)
    with running(Cloud(storage_url, webhooks, tmp_path)) as cloud, httpx.Client() as client:
        for i in range(WINDOW):
            answer = client.post(f"{cloud.url}/webhook/{WEBHOOK}", content=f'{{"id":"{i}"}}')
            assert answer.status_code == 202
        poll = f"{cloud.url}/connect/stream/{CHANNEL}/poll?max_messages=100&max_in_flight={WINDOW}"
        first = client.get(f"{poll}&timeout=1", headers=HEADERS, timeout=10)
        assert first.status_code == 200
        held = first.json()
        assert held["count"] == WINDOW  # the whole window, and this answer is "lost"
        again = client.get(
            f"{poll}&timeout=10",
            headers={**HEADERS, "X-Connection-ID": held["connection_id"]},
            timeout=20,
        )
        assert again.status_code == 200, "the next poll gets what the lost answer held"
        ids = {m["message_id"] for m in again.json()["messages"]}
        assert ids == {m["message_id"] for m in held["messages"]}
        assert json.loads(again.text)["connection_id"] == held["connection_id"]
