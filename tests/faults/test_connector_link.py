"""Faults on the link between connector and cloud, over each transport: nothing accepted is lost.

A fault proxy sits between the connector and the cloud (SQLite); webhooks go straight to the
cloud at a steady rate while the link is cut, blackholed, slowed, reset mid-frame or trickled.

Bound on duplicates: the connector records each delivered id before it acks and skips a
redelivered one, so a broken link should duplicate nothing at the target; the bound asserted
is the in-flight window (what one connection can have delivered without the cloud hearing the
ack) per disruption, a slowed link counting as one (its acks may miss the ack timeout).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.conftest import StartConnector
from tests.faults.harness import (
    ACK_TIMEOUT,
    RECONNECT_MAX,
    WINDOW,
    LoadDriver,
    assert_bounds,
    delivered_ids,
    report,
    settle,
    tally,
    write_webhooks,
)
from tests.faults.proxy import FaultProxy
from tests.servers import Cloud, ConnectorProcess, Sink, running, wait_until

RATE = 150  # webhooks a second, straight to the cloud
# Liveness bounds of the connector (connector/transports): WebSocket pings every 5 s and gives
# up 10 s later, SSE calls 20 s without a heartbeat a dead link, and a long poll waits for its
# 25 s answer plus 15 s. A blackholed link must be noticed within these.
NOTICE_BLACKHOLE = {"websocket": 30.0, "sse": 35.0, "long_poll": 55.0}
# Once the link works again, deliveries go on as soon as the connector has dialled again, except
# for what the broken connection was given and never acknowledged (a poll answer or acks lost
# on the way): that is due again after the ack timeout, and a connection whose window it
# filled reads nothing new before then (docs/FAULTS.md). SLACK: a loaded machine schedules
# the processes late.
SLACK = 15.0
RESUME_WITHIN = RECONNECT_MAX + ACK_TIMEOUT + SLACK


def reconnections(connector: ConnectorProcess) -> int:
    return connector.output().count("connected to")


def delivered_more(sink: Sink, count: int) -> Callable[[], bool]:
    """A condition: ``count`` more deliveries than now."""
    target = sum(delivered_ids(sink).values()) + count
    return lambda: sum(delivered_ids(sink).values()) >= target


def redial(proxy: FaultProxy, fault: Callable[[], int], sink: Sink) -> None:
    """Break the open connections with ``fault``; wait for the connector to dial again and
    deliveries to go on. (A long-poll connector keeps its connection id across a broken TCP
    connection, so a new TCP connection, not a new "connected to" line, is the sign.)"""
    before = proxy.connections_accepted
    assert fault() > 0, "the connector had a connection open through the proxy"
    wait_until(lambda: proxy.connections_accepted > before, 30, "the connector to dial again")
    wait_until(delivered_more(sink, 50), RESUME_WITHIN, "deliveries after the fault")


def inject(
    fault: str, proxy: FaultProxy, connector: ConnectorProcess, sink: Sink, protocol: str
) -> int:
    """Apply ``fault`` until the relay has felt it, heal the link; return the disruptions."""
    if fault == "cut":
        for _ in range(2):
            redial(proxy, proxy.cut, sink)
        return 2
    if fault == "blackhole":
        lost_before = connector.output().count("connection lost")
        proxy.blackhole()
        wait_until(
            lambda: connector.output().count("connection lost") > lost_before,
            NOTICE_BLACKHOLE[protocol],
            "the connector to notice the blackhole",
        )
        before = reconnections(connector)
        proxy.pass_through()
        wait_until(lambda: reconnections(connector) > before, 30, "a reconnection after it")
        return 1
    if fault == "reset":
        redial(proxy, proxy.reset_mid_frame, sink)
        return 1
    if fault == "latency":
        proxy.latency(200)
    else:
        proxy.trickle(2048, 0.02)  # about 100 KB/s each way
    wait_until(delivered_more(sink, RATE), 30, f"deliveries through the {fault}")
    proxy.pass_through()
    return 1


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault", ["cut", "blackhole", "latency", "reset", "trickle"])
@pytest.mark.parametrize("protocol", ["websocket", "sse", "long_poll"])
def test_a_faulty_link_to_the_cloud_loses_nothing(
    protocol: str,
    fault: str,
    tmp_path: Path,
    sink: Sink,
    proxies: Callable[[int], FaultProxy],
    connectors: StartConnector,
    request: pytest.FixtureRequest,
) -> None:
    started = time.monotonic()
    storage = f"sqlite:///{tmp_path / 'buffer.db'}"
    with running(Cloud(storage, write_webhooks(tmp_path), tmp_path)) as cloud:
        proxy = proxies(cloud.port)
        connector = connectors(f"http://{proxy.url_host}", sink, protocol)
        with LoadDriver([cloud.url], RATE) as driver:
            wait_until(delivered_more(sink, RATE), 30, "deliveries under way")
            disruptions = inject(fault, proxy, connector, sink, protocol)
            wait_until(delivered_more(sink, RATE), RESUME_WITHIN, "deliveries after the fault")
        deliveries = settle(driver, sink)
    result = tally(f"link-{protocol}-{fault}", driver, deliveries, started, sink)
    report(result, request, tmp_path)
    assert_bounds(result, WINDOW * disruptions)
    assert result.refused == {}, "ingest does not pass the proxy: every webhook is accepted"
