"""What the soak and scale benchmarks share: the cloud with any options, its RSS, a sampler.

Processes are started here on 127.0.0.1 and stopped by their PID (``bench.ingest.servers``).
"""

from __future__ import annotations

import csv
import http.client
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from bench.ingest.servers import HOST, REPO, free_port, stop, wait_until

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def start_cloud(
    storage: str,
    webhooks: Path,
    log_path: Path,
    extra: Sequence[str] = (),
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
    entry: Sequence[str] = ("-m", "webhook_connect"),
) -> tuple[subprocess.Popen[bytes], int]:
    """``python -m webhook_connect cloud`` with ``extra`` options; waits until /health is 200.

    ``entry`` replaces ``-m webhook_connect`` (``tracedcloud.py``, the same CLI under
    tracemalloc).
    """
    port = port or free_port()
    args = [
        sys.executable,
        *entry,
        "cloud",
        "--host",
        HOST,
        "--port",
        str(port),
        "--webhooks",
        str(webhooks),
        "--storage",
        storage,
        "--log-level",
        "warning",
        *extra,
    ]
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            args, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT
        )

    def healthy() -> bool:
        connection = http.client.HTTPConnection(HOST, port, timeout=1)
        try:
            connection.request("GET", "/health")
            return connection.getresponse().status == 200
        except http.client.HTTPException:
            return False
        finally:
            connection.close()

    try:
        wait_until(healthy, f"cloud on port {port}", process)
    except BaseException:
        stop(process)
        print(log_path.read_text(errors="replace")[-2000:], file=sys.stderr)
        raise
    return process, port


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (uvicorn's worker processes, their helpers)."""
    found = [pid]
    index = 0
    while index < len(found):
        parent = found[index]
        index += 1
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            found.extend(int(child) for child in children)
    return found


def rss_kb(pid: int, *, tree: bool = True) -> int:
    """Resident memory of ``pid`` (and of its descendants), in KiB; 0 for a process gone.

    From ``/proc/PID/statm`` (the resident page count; the same figure as VmRSS in
    ``/proc/PID/status``, cheaper to read every second).
    """
    total = 0
    for each in descendants(pid) if tree else [pid]:
        try:
            total += int(Path(f"/proc/{each}/statm").read_text().split()[1]) * PAGE_KB
        except (OSError, IndexError, ValueError):
            continue
    return total


class Sampler:
    """Samples the RSS of named processes every ``interval`` seconds, in a thread, into a CSV.

    ``rows`` keeps every sample: ``(seconds since start, {name: KiB})``.
    """

    def __init__(self, pids: dict[str, int], csv_path: Path, interval: float = 1.0) -> None:
        self.pids = pids
        self.csv_path = csv_path
        self.interval = interval
        self.rows: list[tuple[float, dict[str, int]]] = []
        self.notes: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def latest(self, name: str) -> int:
        return self.rows[-1][1][name] if self.rows else 0

    def _run(self) -> None:
        with self.csv_path.open("w", newline="") as handle:
            out = csv.writer(handle)
            out.writerow(["seconds", *(f"{name}_rss_kb" for name in self.pids)])
            next_at = time.monotonic()
            while not self._stop.is_set():
                now = time.monotonic()
                sample = {name: rss_kb(pid) for name, pid in self.pids.items()}
                self.rows.append((now - self.started, sample))
                out.writerow([f"{now - self.started:.1f}", *sample.values()])
                handle.flush()
                next_at += self.interval
                self._stop.wait(max(0.0, next_at - time.monotonic()))
