"""The connector's delivered log over a long run: its memory stays flat once it is full.

A connector relays millions of messages through a log of fixed capacity; what the log holds
must not grow with what has passed through it, and no large transient may come and go (glibc
keeps the heap it grew: the process's memory steps up), neither a hash table rebuilt nor the
whole file built in memory to compact it.
Python allocations are counted with tracemalloc: exact bytes, not a clock or RSS.
"""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from webhook_connect.connector.dedup import DeliveredLog

CAPACITY = 20_000
BATCH = 10  # ids flushed together, as the runner's acks are


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def stream_ids() -> Iterator[str]:
    """Ids shaped as the Redis backend makes them (``<ms>-<seq>``), never repeated."""
    for number in itertools.count():
        yield f"{1_733_363_699_123 + number // 3}-{number % 3}"


def pass_through(log: DeliveredLog, ids: Iterator[str], count: int) -> None:
    for _ in range(count // BATCH):
        for message_id in itertools.islice(ids, BATCH):
            log.add(message_id)
        log.flush()


def test_a_full_log_holds_the_same_memory_after_ten_times_its_capacity(
    tmp_path: Path, traced: None
) -> None:
    log = DeliveredLog(tmp_path / "dev.delivered", capacity=CAPACITY)
    ids = stream_ids()
    pass_through(log, ids, CAPACITY)
    full = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    pass_through(log, ids, 10 * CAPACITY)
    after, peak = tracemalloc.get_traced_memory()
    # Before: one dict kept its deleted oldest entries until a resize, which doubled its
    # table once it wrapped (+32 % held; +3.8 MiB at the default capacity of 100,000) ...
    assert after - full < full * 0.03, (full, after)
    # ... and rebuilt it now and then, old and new table at once, with the file compacted
    # in memory besides (+138 % at the peak). A single set rebuilds too (+59 %).
    assert peak - full < full * 0.1, (full, peak)
    assert len(log) == CAPACITY
    log.close()


def test_compacting_the_file_does_not_build_it_in_memory(tmp_path: Path, traced: None) -> None:
    path = tmp_path / "dev.delivered"
    log = DeliveredLog(path, capacity=CAPACITY)
    ids = stream_ids()
    pass_through(log, ids, 2 * CAPACITY)  # the file holds 2 x capacity lines: one more compacts
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    last = next(ids)
    log.add(last)
    log.flush()
    peak = tracemalloc.get_traced_memory()[1]
    assert len(path.read_text().splitlines()) == CAPACITY, "compacted"
    # Before: every line as a string, then joined, then encoded: +1.8 MB over 2.2 MB held.
    assert peak - held < held * 0.1, (held, peak)
    log.close()
    again = DeliveredLog(path, capacity=CAPACITY)
    assert last in again and len(again) == CAPACITY
    again.close()
