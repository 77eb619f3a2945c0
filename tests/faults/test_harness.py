"""The tally can fail: accepted messages that never reach the sink are counted as lost."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.harness import LoadDriver, assert_bounds, settle, tally, write_webhooks
from tests.servers import Cloud, Sink, running, wait_until


def test_webhooks_nobody_drains_are_counted_lost(tmp_path: Path, sink: Sink) -> None:
    started = time.monotonic()
    storage = f"sqlite:///{tmp_path / 'buffer.db'}"
    with running(Cloud(storage, write_webhooks(tmp_path), tmp_path)) as cloud:
        with LoadDriver([cloud.url], 100) as driver:
            wait_until(lambda: driver.accepted_count() >= 20, 20, "some 202s")
    deliveries = settle(driver, sink, timeout=0.5)  # no connector: nothing arrives
    result = tally("no-connector", driver, deliveries, started, sink)
    assert result.accepted >= 20
    assert result.lost == result.accepted and result.delivered == 0
    with pytest.raises(AssertionError, match="never delivered"):
        assert_bounds(result, 0)
