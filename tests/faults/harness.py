"""What every fault scenario shares: a steady load driver, the count at the sink, one report line.

The driver sends webhooks at a steady rate, each body naming a unique id, and records every
answer: a ``202`` makes the id *accepted*; anything else is counted by status (or by the
client error when no answer came). The sink (``tests/servers.Sink``, a real HTTP server
writing every request to a file) tells what was *delivered*. From the two:

- ``lost``: accepted and never delivered (must be 0: a 202 is a promise);
- ``duplicated``: deliveries beyond the first of an id (bounded by the in-flight window);
- ``unaccepted``: delivered although the sender never saw a 202 (storage took it, the answer
  was lost): allowed, the sender retries and the provider's delivery id dedups it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.servers import Sink, wait_until
from webhook_connect.connector.httpclient import HttpClient

CHANNEL = "faults"
TOKEN = "fault-token-0123456789"
WEBHOOK = "load"
# The window each connector asks for: what one broken connection can have had delivered to
# the target without the cloud hearing the ack, so the most one disruption can duplicate.
WINDOW = 50
# The channel's ack timeout: what a connection was given and never acknowledged (a poll
# answer or acks lost in a fault) is due again this long after it was given.
ACK_TIMEOUT = 5.0
# The longest a connector waits before it dials again.
RECONNECT_MAX = 1.0


def webhooks(**channel: object) -> dict[str, object]:
    """A ``webhooks.json`` with one blob webhook on the fault channel. A short ack timeout
    brings back what a dead connection held within seconds; many attempts, so a message
    caught by several faults is never dead-lettered."""
    config = {
        "channel": CHANNEL,
        "channel_token": TOKEN,
        "ack_timeout_seconds": ACK_TIMEOUT,
        "retry_delay_seconds": 0.2,
        "max_delivery_attempts": 1000,
        **channel,
    }
    return {WEBHOOK: {"module": "webhook_connect", "data_type": "blob", "module-config": config}}


def write_webhooks(directory: Path, **channel: object) -> Path:
    path = directory / "webhooks.json"
    path.write_text(json.dumps(webhooks(**channel)))
    return path


def connector_settings(
    cloud_url: str, sink: Sink, workdir: Path, protocol: str = "websocket", **extra: object
) -> dict[str, object]:
    """A connector on the fault channel, reconnecting fast, delivering to ``sink``."""
    name = str(extra.get("connector_id", "fault-connector"))
    return {
        "protocol": protocol,
        "cloud_url": cloud_url,
        "channel": CHANNEL,
        "token": TOKEN,
        "connector_id": name,
        "state_dir": str(workdir / f"state-{name}"),
        "max_in_flight": WINDOW,
        "reconnect_delay_seconds": 0.2,
        "max_reconnect_delay_seconds": RECONNECT_MAX,
        "default_target": {
            "url": sink.url,
            "timeout_seconds": 5,
            "retry_max_attempts": 2,
            "retry_delay_seconds": 0.05,
        },
        **extra,
    }


class LoadDriver:
    """POSTs webhooks at ``rate`` per second from a thread of its own (with its own event loop,
    so the test thread can inject faults meanwhile), until :meth:`stop`.

    ``urls`` are the clouds' base URLs, used in turn; a test may replace the list (a replica
    died). ``padding`` bytes are added to each body (to fill a disk sooner).
    """

    def __init__(
        self,
        urls: list[str],
        rate: float,
        *,
        prefix: str = "m",
        padding: int = 0,
        concurrency: int = 32,
        timeout: float = 30.0,
    ) -> None:
        self.urls = list(urls)
        self.rate = rate
        self.prefix = prefix
        self.padding = b"p" * padding
        self.concurrency = concurrency
        self.timeout = timeout
        self.accepted: set[str] = set()
        self.refused: Counter[str] = Counter()
        self.sent = 0
        self.missing_retry_after = 0
        self.last_accepted_at = 0.0
        self.last_refused_at = 0.0
        self.refusal_times: list[float] = []
        self.started_at = 0.0
        self.stopped_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def start(self) -> LoadDriver:
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 10)
        self.stopped_at = time.monotonic()

    def __enter__(self) -> LoadDriver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def achieved_rate(self) -> float:
        end = self.stopped_at or time.monotonic()
        return self.sent / max(end - self.started_at, 1e-9)

    def accepted_count(self) -> int:
        with self._lock:
            return len(self.accepted)

    def refused_count(self, status: str | None = None) -> int:
        with self._lock:
            return self.refused[status] if status else sum(self.refused.values())

    def first_refused_after(self, moment: float) -> float:
        """When the first answer other than 202 after ``moment`` came (``inf`` if none)."""
        with self._lock:
            return next((t for t in self.refusal_times if t > moment), float("inf"))

    def _run(self) -> None:
        asyncio.run(self._drive())

    async def _drive(self) -> None:
        client = HttpClient(max_connections_per_host=self.concurrency)
        slots = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        begin = loop.time()
        n = 0
        try:
            while not self._stop.is_set():
                # Steady pace: the n-th request leaves at begin + n / rate, whatever the
                # answers took (a full set of slots holds it back: the rate is then lower).
                delay = begin + n / self.rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await slots.acquire()
                url = self.urls[n % len(self.urls)]
                task = asyncio.create_task(self._post(client, slots, url, f"{self.prefix}-{n}"))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
            if tasks:
                await asyncio.wait(tasks)
        finally:
            await client.aclose()

    async def _post(
        self, client: HttpClient, slots: asyncio.Semaphore, url: str, message_id: str
    ) -> None:
        body = json.dumps({"id": message_id}).encode() + self.padding
        try:
            response = await client.request(
                "POST",
                f"{url}/webhook/{WEBHOOK}",
                [("Content-Type", "application/octet-stream")],
                body,
                self.timeout,
            )
            outcome = str(response.status)
            if response.status == 503 and response.header("retry-after") is None:
                self.missing_retry_after += 1
        except Exception as exc:  # no answer at all: refused, reset, timed out
            outcome = f"error:{type(exc).__name__}"
        finally:
            slots.release()
        with self._lock:
            self.sent += 1
            if outcome == "202":
                self.accepted.add(message_id)
                self.last_accepted_at = time.monotonic()
            else:
                self.refused[outcome] += 1
                self.last_refused_at = time.monotonic()
                self.refusal_times.append(self.last_refused_at)


def longest_gap(*sinks: Sink) -> float:
    """The longest time between two deliveries in a row: how long a fault stalled the relay
    (the load never pauses, so a healthy relay delivers every few milliseconds)."""
    times = sorted(float(str(r["time"])) for sink in sinks for r in sink.records())
    return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


def delivered_ids(*sinks: Sink) -> Counter[str]:
    """How many times each load id reached the sinks."""
    counts: Counter[str] = Counter()
    for record in (record for sink in sinks for record in sink.records()):
        body = base64.b64decode(str(record["body_b64"]))
        end = body.find(b"}") + 1
        counts[str(json.loads(body[:end])["id"])] += 1
    return counts


@dataclass
class Tally:
    """The figures of one scenario."""

    scenario: str
    accepted: int
    delivered: int
    lost: int
    duplicated: int
    unaccepted: int
    refused: dict[str, int] = field(default_factory=dict)
    rate: float = 0.0
    seconds: float = 0.0
    stall: float = 0.0  # longest_gap at the sinks
    notes: str = ""  # what else the scenario measured, as ``key=value`` words

    def line(self) -> str:
        refused = ",".join(f"{k}:{v}" for k, v in sorted(self.refused.items())) or "0"
        return (
            f"scenario={self.scenario} accepted={self.accepted} delivered={self.delivered} "
            f"lost={self.lost} duplicated={self.duplicated} unaccepted={self.unaccepted} "
            f"refused={refused} rate={self.rate:.0f}/s seconds={self.seconds:.1f} "
            f"stall={self.stall:.1f}s" + (f" {self.notes}" if self.notes else "")
        )


def settle(driver: LoadDriver, *sinks: Sink, timeout: float = 60.0) -> Counter[str]:
    """Wait (bounded) until every accepted id reached the sinks; return the delivery counts
    either way, so a loss is reported with figures rather than as a time-out."""
    try:
        wait_until(lambda: driver.accepted <= set(delivered_ids(*sinks)), timeout, "deliveries")
    except TimeoutError:
        pass
    return delivered_ids(*sinks)


def tally(
    scenario: str, driver: LoadDriver, deliveries: Counter[str], started: float, *sinks: Sink
) -> Tally:
    """The figures of a scenario from what the driver saw and ``deliveries`` (``settle``);
    ``sinks`` give the longest stall."""
    delivered = set(deliveries)
    return Tally(
        scenario=scenario,
        accepted=len(driver.accepted),
        delivered=len(delivered & driver.accepted),
        lost=len(driver.accepted - delivered),
        duplicated=sum(n - 1 for n in deliveries.values()),
        unaccepted=len(delivered - driver.accepted),
        refused=dict(driver.refused),
        rate=driver.achieved_rate,
        seconds=time.monotonic() - started,
        stall=longest_gap(*sinks),
    )


def report(result: Tally, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Print the scenario's line (seen with ``pytest -s``), attach it to the test's report
    (``user_properties``, shown in the terminal summary) and write it under the tmp dir."""
    line = result.line()
    print(f"\n{line}")
    request.node.user_properties.append(("fault", line))
    (tmp_path / "fault-report.txt").write_text(line + "\n")
    with (tmp_path.parent / "faults.txt").open("a") as file:  # every scenario of the run
        file.write(line + "\n")


def assert_bounds(result: Tally, duplicates_allowed: int) -> None:
    """Nothing accepted lost; duplicates within the stated bound."""
    assert result.lost == 0, f"{result.lost} accepted messages never delivered: {result.line()}"
    assert result.duplicated <= duplicates_allowed, (
        f"{result.duplicated} duplicates exceed the bound of {duplicates_allowed}: {result.line()}"
    )
