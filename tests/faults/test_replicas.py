"""Two cloud replicas on one Redis, one connector on each, webhooks to both; one replica is
SIGKILLed under load. What its connector held is delivered again through the survivor (the
channel's ack timeout gives it back), and nothing accepted is lost. The killed replica's
connector delivers through a 300 ms proxy to its sink, so its window is full when it dies.

Bound on duplicates: the killed replica's connector may have delivered its whole window to the
target without the acks reaching storage; the survivor's connector, with a state file of its
own, delivers those again. So at most one window (the killed side's) of duplicates.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.faults.conftest import StartConnector
from tests.faults.harness import (
    WINDOW,
    LoadDriver,
    assert_bounds,
    report,
    settle,
    tally,
    write_webhooks,
)
from tests.faults.proxy import FaultProxy
from tests.faults.test_connector_link import delivered_more
from tests.servers import Cloud, RedisServer, Sink, running, wait_until

RATE = 300


def delivered_by(connector_log: str) -> int:
    return connector_log.count(" -> ")


def redelivered(cloud: Cloud) -> int:
    """``webhook_connect_redelivered_total`` of the fault channel (from storage)."""
    text = httpx.get(f"{cloud.url}/metrics", timeout=5).text
    found = re.search(
        r'^webhook_connect_redelivered_total\{[^}]*"faults"[^}]*\} (\S+)$', text, re.M
    )
    return int(float(found.group(1))) if found else 0


def test_one_of_two_replicas_killed_under_load_loses_nothing(
    tmp_path: Path,
    sink: Sink,
    proxies: Callable[[int], FaultProxy],
    connectors: StartConnector,
    request: pytest.FixtureRequest,
) -> None:
    started = time.monotonic()
    webhooks = write_webhooks(tmp_path)
    with (
        running(RedisServer(tmp_path / "redis")) as redis_server,
        running(Cloud(redis_server.url, webhooks, tmp_path)) as doomed,
        running(Cloud(redis_server.url, webhooks, tmp_path)) as survivor,
        running(Sink(tmp_path)) as slow_sink,
    ):
        slow = proxies(slow_sink.port)
        slow.latency(300)
        target = {"url": f"http://{slow.url_host}/", "timeout_seconds": 5}
        on_doomed = connectors(doomed.url, sink, connector_id="on-doomed", default_target=target)
        on_survivor = connectors(survivor.url, sink, connector_id="on-survivor")
        with LoadDriver([doomed.url, survivor.url], RATE) as driver:
            wait_until(
                lambda: (
                    delivered_by(on_doomed.output()) > 100
                    and delivered_by(on_survivor.output()) > 100
                ),
                30,
                "both connectors delivering",
            )
            doomed.stop(signal.SIGKILL)
            driver.urls = [survivor.url]  # the load balancer takes the dead replica out
            # The ack timeout (5 s) gives back what the dead replica's connection held.
            wait_until(lambda: redelivered(survivor) > 0, 30, "redelivery through the survivor")
            wait_until(delivered_more(sink, RATE), 30, "deliveries after the kill")
        deliveries = settle(driver, sink, slow_sink)
        given_back = redelivered(survivor)
    result = tally("replica-sigkill", driver, deliveries, started, sink, slow_sink)
    result.notes = f"redelivered={given_back}"
    report(result, request, tmp_path)
    assert_bounds(result, WINDOW)
    assert given_back > 0, "what the killed replica's connector held came back to the group"
    # Only the requests on their way to the killed replica went unanswered.
    assert all(status.startswith("error:") for status in result.refused), result.refused
