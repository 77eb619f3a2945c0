"""A long poll open when the cloud is told to stop is answered 204 ("poll again"), never 500
(uvicorn answers 500 to a request its graceful timeout cancels before it answered)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx

from tests.faults.harness import CHANNEL, TOKEN, write_webhooks
from tests.servers import Cloud, running, wait_until


def test_a_poll_open_at_sigterm_is_answered_poll_again(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'cloud.db'}"
    answers: list[int] = []
    with running(Cloud(storage, write_webhooks(tmp_path), tmp_path)) as cloud:
        url = f"{cloud.url}/connect/stream/{CHANNEL}/poll"
        headers = {"Authorization": f"Bearer {TOKEN}"}

        def long_poll() -> None:
            try:
                answer = httpx.get(url, params={"timeout": 60}, headers=headers, timeout=70)
                answers.append(answer.status_code)
            except httpx.HTTPError:
                answers.append(0)

        poller = threading.Thread(target=long_poll, daemon=True)
        poller.start()
        # The poll is open once the cloud counts the connection it opened (the series is
        # there, at 0, before: waiting for the name alone sent SIGTERM before the poll).
        wait_until(lambda: _open_polls(cloud) > 0, 20, "the poll to be open")
        assert cloud.process is not None
        cloud.process.send_signal(signal.SIGTERM)
        poller.join(30)
    assert answers == [204], f"the open poll was answered {answers}"


def _open_polls(cloud: Cloud) -> float:
    """The long-poll connections the cloud counts on the channel (0 if it does not answer)."""
    try:
        text = httpx.get(f"{cloud.url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return 0
    series = f'{{channel="{CHANNEL}",transport="long_poll"}} '
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if series in line)
