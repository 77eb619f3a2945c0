"""A lean HTTP/1.1 load generator: raw asyncio protocols, prebuilt request bytes.

httpx and aiohttp spend tens of microseconds of Python per request, too slow to offer
5,000+ req/s from one core. Here every request is the same prebuilt bytes, and a response is
parsed only as far as its status line and its length.

Two modes share one connection pool:

- **open loop** (:func:`run_open_loop`): requests are sent on a fixed schedule whatever the
  server does. Latency counts from each request's *scheduled* time, so a stalled server is
  charged for the requests queued behind the stall (no coordinated omission, as in wrk2).
  A due request goes to an idle keep-alive connection; if none is idle, another is opened, up
  to ``max_connections``; past that it waits for the first connection to come free.
- **closed loop** (:func:`run_closed_loop`): ``connections`` keep-alive connections, each with
  one request outstanding, sending the next as soon as the answer arrives.

One outstanding request per connection, no pipelining. Times come from ``perf_counter``:
uvloop's ``loop.time()`` only has millisecond resolution.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

ACCEPTED = 202
DRAIN_TIMEOUT = 10.0  # seconds to wait for the answers still outstanding when sending stops
CONNECT_TIMEOUT = 5.0
TIMER_RESOLUTION = 0.001
SPIN_WINDOW = 0.002  # seconds before a due time when sleeping turns into yielding


def build_post(
    host: str,
    port: int,
    path: str,
    body: bytes,
    content_type: str,
    headers: dict[str, str] | None = None,
) -> bytes:
    """Return the bytes of one keep-alive HTTP/1.1 POST request."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def parse_response(buffer: bytearray) -> int | None:
    """Remove one complete response from the front of ``buffer``; return its status code.

    Return None while the response is incomplete. Only Content-Length and chunked bodies are
    understood, which is all a uvicorn application sends.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).lower()
    status = int(head[9:12])
    start = head.find(b"\r\ncontent-length:")
    if start >= 0:
        stop = head.find(b"\r\n", start + 2)
        length = int(head[start + 17 : stop if stop >= 0 else len(head)])
        total = end + 4 + length
    elif b"transfer-encoding: chunked" in head:
        last = buffer.find(b"0\r\n\r\n", end + 4)  # good enough for a terminal zero chunk
        if last < 0:
            return None
        total = last + 5
    else:
        total = end + 4
    if len(buffer) < total:
        return None
    del buffer[:total]
    return status


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (NaN when it is empty)."""
    if not ordered:
        return math.nan
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


@dataclass
class Result:
    """What one run measured. Times in seconds; ``latencies`` sorted ascending."""

    mode: str
    offered_rate: float | None
    duration: float
    sent: int = 0
    answered: int = 0
    non_202: int = 0
    failed: int = 0  # lost with a connection, or still unanswered after the drain timeout
    connections_opened: int = 0
    elapsed: float = 0.0  # from the first send to the last answer
    latencies: list[float] = field(default_factory=list, repr=False)
    send_lags: list[float] = field(default_factory=list, repr=False)  # open loop: sent - due

    @property
    def achieved_rate(self) -> float:
        return self.answered / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, fraction: float) -> float:
        """Nearest-rank percentile of the latencies, in seconds (NaN when there are none)."""
        return percentile(self.latencies, fraction)

    def summary(self) -> dict[str, Any]:
        """The figures as plain JSON-ready values, latencies in milliseconds."""

        def ms(value: float) -> float | None:
            return None if math.isnan(value) else round(value * 1000, 3)

        return {
            "mode": self.mode,
            "offered_rate": self.offered_rate,
            "duration_s": self.duration,
            "achieved_rate": round(self.achieved_rate, 1),
            "sent": self.sent,
            "answered": self.answered,
            "non_202": self.non_202,
            "failed": self.failed,
            "connections_opened": self.connections_opened,  # reopened ones count again
            "p50_ms": ms(self.percentile(0.50)),
            "p99_ms": ms(self.percentile(0.99)),
            "p999_ms": ms(self.percentile(0.999)),
            "max_ms": ms(self.latencies[-1] if self.latencies else math.nan),
            # The generator's own error: how late it sent what was due (open loop only).
            "send_lag_p99_ms": ms(percentile(self.send_lags, 0.99)),
        }


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying at most one request at a time."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.scheduled: float | None = None  # the outstanding request's scheduled send time

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, scheduled: float) -> None:
        assert self.transport is not None
        self.scheduled = scheduled
        self.transport.write(self.pool.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        status = parse_response(self.buffer)
        if status is None or self.scheduled is None:
            return
        scheduled, self.scheduled = self.scheduled, None
        self.pool.answered(self, scheduled, status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.lost(self)


class _Pool:
    """Connections, the requests waiting for one, and the tally of answers."""

    def __init__(
        self, host: str, port: int, request: bytes, result: Result, max_connections: int
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, self.port, self.request = host, port, request
        self.result = result
        self.max_connections = max_connections
        self.connections: set[_Connection] = set()
        self.idle: list[_Connection] = []
        self.waiting: deque[float] = deque()  # scheduled times of requests with no connection
        self.opening = 0
        self.measure_from = 0.0  # answers to requests scheduled before this are not counted
        self.last_answer = 0.0
        self.on_ready: Callable[[_Connection], None] = self.dispatch_waiting
        self.all_answered = asyncio.Event()
        self.sending_done = False
        self.tasks: set[asyncio.Task[None]] = set()

    # -- requests -------------------------------------------------------------------------

    def submit(self, scheduled: float) -> None:
        """Send a request now on an idle connection, or queue it and open another one."""
        if self.is_measured(scheduled):
            self.result.sent += 1
        if self.idle:
            self.idle.pop().send(scheduled)
            return
        self.waiting.append(scheduled)
        if len(self.connections) + self.opening < self.max_connections:
            self.open()

    def dispatch_waiting(self, connection: _Connection) -> None:
        if self.waiting:
            connection.send(self.waiting.popleft())
        else:
            self.idle.append(connection)

    def answered(self, connection: _Connection, scheduled: float, status: int) -> None:
        now = time.perf_counter()
        if self.is_measured(scheduled):
            self.result.answered += 1
            self.result.latencies.append(now - scheduled)
            if status != ACCEPTED:
                self.result.non_202 += 1
            self.last_answer = now
        self.on_ready(connection)
        self.check_done()

    def lost(self, connection: _Connection) -> None:
        self.connections.discard(connection)
        if connection in self.idle:
            self.idle.remove(connection)
        if connection.scheduled is not None:
            if self.is_measured(connection.scheduled):
                self.result.failed += 1
            connection.scheduled = None
            self.check_done()

    def is_measured(self, scheduled: float) -> bool:
        return scheduled >= self.measure_from

    def outstanding(self) -> list[float]:
        """Scheduled times of the requests sent or queued and not yet answered."""
        busy = [c.scheduled for c in self.connections if c.scheduled is not None]
        return busy + list(self.waiting)

    def check_done(self) -> None:
        if self.sending_done and not self.outstanding():
            self.all_answered.set()

    # -- connections ----------------------------------------------------------------------

    def open(self) -> None:
        self.opening += 1
        task = self.loop.create_task(self._open())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _open(self) -> None:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, connection = await self.loop.create_connection(
                    lambda: _Connection(self), self.host, self.port
                )
        except OSError:  # includes TimeoutError
            return  # a request still waiting will open another connection when it is due
        finally:
            self.opening -= 1
        self.result.connections_opened += 1
        self.connections.add(connection)
        self.on_ready(connection)

    async def drain(self) -> None:
        """Wait for the outstanding answers; count those that never came as failed."""
        self.sending_done = True
        self.check_done()
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await self.all_answered.wait()
        except TimeoutError:
            pass
        self.result.failed += sum(1 for t in self.outstanding() if self.is_measured(t))
        self.waiting.clear()
        for connection in list(self.connections):
            connection.scheduled = None
            if connection.transport is not None:
                connection.transport.close()
        for task in list(self.tasks):
            task.cancel()
        self.result.elapsed = max(0.0, self.last_answer - self.measure_from)
        self.result.latencies.sort()
        self.result.send_lags.sort()


async def run_open_loop(
    host: str,
    port: int,
    request: bytes,
    rate: float,
    duration: float,
    max_connections: int = 256,
    warmup: float = 2.0,
    spin: bool = False,
) -> Result:
    """Offer ``rate`` requests per second for ``warmup + duration`` seconds, whatever the answers.

    Only requests scheduled after the warm-up are counted. ``spin`` keeps to the schedule
    within microseconds instead of ~1 ms, but keeps a CPU busy: use it only when the
    generator has a CPU to itself.
    """
    result = Result("open", rate, duration)
    pool = _Pool(host, port, request, result, max_connections)
    total = int(rate * (warmup + duration))
    start = time.perf_counter()
    pool.measure_from = start + warmup
    sent = 0
    while sent < total:
        now = time.perf_counter()
        due = min(total, math.floor((now - start) * rate) + 1)
        while sent < due:
            scheduled = start + sent / rate
            if pool.is_measured(scheduled):
                result.send_lags.append(now - scheduled)
            pool.submit(scheduled)
            sent += 1
        delay = start + sent / rate - time.perf_counter()
        if spin:
            # Sleep until SPIN_WINDOW before the next due time, then only yield to the loop:
            # precise to microseconds, at the price of a busy CPU.
            await asyncio.sleep(delay - SPIN_WINDOW if delay > SPIN_WINDOW else 0)
        else:
            # Timers have a 1 ms resolution (libuv, epoll): shorter sleeps would spin, so
            # requests go out in batches up to ~1 ms late, as send_lags shows; the latencies
            # include it, since they count from the schedule.
            await asyncio.sleep(max(TIMER_RESOLUTION, delay))
    await pool.drain()
    return result


async def run_closed_loop(
    host: str,
    port: int,
    request: bytes,
    connections: int,
    duration: float,
    warmup: float = 2.0,
) -> Result:
    """Keep ``connections`` requests outstanding for ``warmup + duration`` seconds.

    Only requests sent after the warm-up are counted.
    """
    result = Result("closed", None, duration)
    pool = _Pool(host, port, request, result, connections)
    pool.measure_from = time.perf_counter() + warmup
    stop_at = pool.measure_from + duration

    def send_next(connection: _Connection) -> None:
        now = time.perf_counter()
        if now < stop_at:
            if now >= pool.measure_from:
                result.sent += 1
            connection.send(now)
        else:
            pool.idle.append(connection)

    pool.on_ready = send_next
    for _ in range(connections):
        pool.open()
    await asyncio.sleep(warmup + duration)
    await pool.drain()
    # Closed loop: the rate is what was answered within the measured window.
    result.elapsed = duration
    return result


def run(coroutine: Coroutine[Any, Any, Result]) -> Result:
    """Run a load coroutine on uvloop when it is installed, else on the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)
