"""Redis SIGKILLed and started again (same port, same append-only directory) while webhooks
arrive at 500 a second: 503 with Retry-After while it is down, 202 again as soon as it is back,
nothing accepted lost (``appendfsync always``: a 202 is on Redis's disk).

Bound on duplicates: the cloud's sessions break with Redis; what a session held comes back
and the connector skips what it already delivered. One disruption: the in-flight window.
"""

from __future__ import annotations

import signal
import time
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
from tests.faults.test_connector_link import delivered_more
from tests.faults.test_storage_link import acceptance_after, refusal_after
from tests.servers import Cloud, RedisServer, Sink, running, wait_until

RATE = 500


def test_redis_killed_and_restarted_under_load_loses_nothing(
    tmp_path: Path, sink: Sink, connectors: StartConnector, request: pytest.FixtureRequest
) -> None:
    started = time.monotonic()
    with running(RedisServer(tmp_path / "redis")) as redis_server:  # appendfsync always
        with running(Cloud(redis_server.url, write_webhooks(tmp_path), tmp_path)) as cloud:
            connectors(cloud.url, sink)
            with LoadDriver([cloud.url], RATE) as driver:
                wait_until(delivered_more(sink, RATE), 30, "deliveries under way")
                killed = time.monotonic()
                redis_server.stop(signal.SIGKILL)
                wait_until(refusal_after(driver, killed), 30, "503s while Redis is down")
                restarted = time.monotonic()
                redis_server.start()  # same port, same directory: the AOF is read back
                wait_until(acceptance_after(driver, restarted), 30, "202s once it is back")
                wait_until(delivered_more(sink, RATE), 30, "deliveries after the restart")
            deliveries = settle(driver, sink)
    result = tally("redis-sigkill-restart", driver, deliveries, started, sink)
    report(result, request, tmp_path)
    assert_bounds(result, WINDOW)
    assert set(result.refused) <= {"503"}, f"only 202 or 503: {result.refused}"
    assert driver.missing_retry_after == 0, "every 503 carries Retry-After"
    assert result.refused.get("503", 0) > 0
