"""The cloud's SQLite database on a disk that fills up under load: ingest answers 503
``storage_unavailable`` with Retry-After (not a 500, and never a 202 for a webhook it could not
store), and once space is freed it accepts again by itself; nothing accepted is lost.

The disk is a 16 MB tmpfs mounted for the test (root only), most of it taken by a ballast file
that the test deletes to free space. Without the rights to mount, the test is skipped.

Bound on duplicates: the connector starts after the disk was freed and is never disrupted,
so a duplicate has no cause here; the bound asserted is still the window, as elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
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
from tests.faults.test_storage_link import acceptance_after, refusal_after
from tests.servers import Cloud, Sink, running, wait_until

RATE = 200
PADDING = 2000  # bytes added to each body: the free megabyte goes in a few seconds
HEADROOM = 1024 * 1024  # what the ballast leaves free


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs at ``tmp_path/disk``, unmounted at the end whatever happened."""
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        # Lazy: a process of a failed test may still hold a file open there.
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Take all of ``disk`` but ``leave`` bytes with a ballast file."""
    ballast = disk / "ballast"
    stat = os.statvfs(disk)
    with ballast.open("wb") as file:
        file.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return ballast


def test_a_full_disk_answers_503_and_recovers_when_space_is_freed(
    tmp_path: Path,
    small_disk: Path,
    sink: Sink,
    connectors: StartConnector,
    request: pytest.FixtureRequest,
) -> None:
    started = time.monotonic()
    storage = f"sqlite:///{small_disk / 'buffer.db'}"
    with running(Cloud(storage, write_webhooks(tmp_path), tmp_path)) as cloud:
        ballast = fill(small_disk, HEADROOM)
        with LoadDriver([cloud.url], RATE, padding=PADDING) as driver:
            full = time.monotonic()
            wait_until(refusal_after(driver, full), 60, "503s once the disk is full")
            wait_until(lambda: driver.refused_count() >= 100, 30, "503s while it stays full")
            refused_while_full = driver.refused_count()
            accepted_before_freeing = driver.accepted_count()
            freed = time.monotonic()
            ballast.unlink()
            wait_until(acceptance_after(driver, freed), 30, "202s once space is freed")
            recovered = driver.accepted_count()
            wait_until(lambda: driver.accepted_count() >= recovered + RATE, 30, "steady 202s")
        # The load stops here: at this pace it fills the freed space again within seconds (a
        # run on a 6 MB disk went through 5 MB in about 550 webhooks of 2 KB: the WAL grows
        # by whole pages), and on a full disk a connector cannot even open its session (that
        # is a write too: the cloud closes it with 4503), so nothing would drain.
        connectors(cloud.url, sink)
        deliveries = settle(driver, sink)
    result = tally("sqlite-disk-full", driver, deliveries, started, sink)
    result.notes = f"accepted_before_freeing={accepted_before_freeing}"
    report(result, request, tmp_path)
    assert_bounds(result, WINDOW)
    assert refused_while_full >= 100
    assert set(result.refused) <= {"503"}, f"only 202 or 503: {result.refused}"
    assert driver.missing_retry_after == 0, "every 503 carries Retry-After"
