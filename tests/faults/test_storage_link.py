"""Faults on the link between the cloud and Redis: 503 with Retry-After while storage is out of
reach, never a 202 for something not stored, never a 500, and recovery without a restart.

A fault proxy sits between the cloud and a real redis-server (``appendonly yes``,
``appendfsync always``); a WebSocket connector drains the channel straight from the cloud.

Bound on duplicates: storage faults break the cloud's sessions too, and what a session held
comes back; the connector skips what it already delivered, so the bound is the in-flight
window per disruption (what one connection can have delivered without the ack stored).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

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

RATE = 150
# How long the first 503 may take after Redis is blackholed. The cloud's Redis client gives a
# connection up after 2.5 s without a byte while commands wait (resp.py REPLY_TIMEOUT), so a
# webhook waiting then is answered 503 about 2.5 s after the blackhole. 5 s is a correctness
# bound, not a speed figure: it has to stay below the 10 s a provider such as GitHub waits
# for an answer, or the sender sees its own timeout rather than a 503 with Retry-After.
FIRST_503 = 5.0
NOTICE = 30.0


def refusal_after(driver: LoadDriver, moment: float) -> Callable[[], bool]:
    return lambda: driver.last_refused_at > moment


def acceptance_after(driver: LoadDriver, moment: float) -> Callable[[], bool]:
    return lambda: driver.last_accepted_at > moment


def inject(fault: str, proxy: FaultProxy, driver: LoadDriver, sink: Sink) -> None:
    """Apply ``fault``, wait until ingest felt it (if it can), heal, wait for a 202 again."""
    dialled = proxy.connections_accepted
    if fault in ("cut", "reset"):
        broken = proxy.cut() if fault == "cut" else proxy.reset_mid_frame()
        assert broken > 0, "the cloud had its Redis connections open through the proxy"
        wait_until(lambda: proxy.connections_accepted > dialled, 30, "the cloud to dial again")
    elif fault == "latency":
        proxy.latency(200)
        wait_until(delivered_more(sink, RATE), 30, "deliveries through the latency")
    else:
        moment = time.monotonic()
        proxy.blackhole()
        wait_until(refusal_after(driver, moment), NOTICE, "503s while Redis is blackholed")
        noticed = driver.first_refused_after(moment) - moment
        print(f"first 503 {noticed:.1f} s after the blackhole")
        assert noticed < FIRST_503, f"first 503 {noticed:.1f} s after the blackhole"
        # Storage stays out of reach a while: every webhook meanwhile is refused, none lost.
        moment = time.monotonic()
        wait_until(refusal_after(driver, moment), NOTICE, "still 503s")
    healed = time.monotonic()
    proxy.pass_through()
    wait_until(acceptance_after(driver, healed), 30, "a 202 once Redis is reachable again")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault", ["cut", "blackhole", "latency", "reset"])
def test_a_faulty_link_to_redis_answers_503_and_recovers(
    fault: str,
    tmp_path: Path,
    sink: Sink,
    proxies: Callable[[int], FaultProxy],
    connectors: StartConnector,
    request: pytest.FixtureRequest,
) -> None:
    started = time.monotonic()
    with running(RedisServer(tmp_path / "redis")) as redis_server:
        proxy = proxies(redis_server.port)
        storage = f"redis://{proxy.url_host}/0"
        with running(Cloud(storage, write_webhooks(tmp_path), tmp_path)) as cloud:
            connectors(cloud.url, sink)
            with LoadDriver([cloud.url], RATE) as driver:
                wait_until(delivered_more(sink, RATE), 30, "deliveries under way")
                inject(fault, proxy, driver, sink)
                wait_until(delivered_more(sink, RATE), 30, "deliveries after the fault")
            deliveries = settle(driver, sink)
    result = tally(f"redis-link-{fault}", driver, deliveries, started, sink)
    report(result, request, tmp_path)
    assert_bounds(result, WINDOW)
    assert set(result.refused) <= {"503"}, f"only 202 or 503: {result.refused}"
    assert driver.missing_retry_after == 0, "every 503 carries Retry-After"
    if fault == "blackhole":
        assert result.refused.get("503", 0) > 0
