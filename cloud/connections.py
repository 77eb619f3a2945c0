"""Slow and idle client connections: a deadline for the request head, one for the body, and a
cap on the connections one process keeps open.

uvicorn times out neither a request head nor a body, and accepts connections until the process
runs out of file descriptors; then libuv closes every waiting connection unanswered, webhook
POSTs included, and nothing is logged. So, per connection:

* **head**: from connect (or from the first byte of a later request on a kept-alive connection)
  to the end of the request head, at most ``header_timeout`` seconds;
* **body**: from the end of the head to the end of the body, at most ``body_timeout`` seconds;
  an unanswered request then gets ``408``. A connection idle between requests is closed by
  uvicorn's keep-alive timeout. Once a request is read (a long poll, an SSE stream) or a
  WebSocket is accepted, neither deadline applies;
* **cap**: at most ``max_open`` connections per process. A new connection beyond it closes the
  oldest one that has no request in progress (nothing sent yet, half a head, idle kept-alive):
  a flood of silent sockets then costs a sender nothing. When every connection is busy the new
  one is answered ``503`` with ``Retry-After`` and closed.

The cap, the accept backlog and the descriptor limit are planned together (``plan_descriptors``)
so that accepting never fails: libuv accepts everything waiting in the backlog in one go, before
any of it can be refused, so cap + backlog + what the process opens itself must fit under
``RLIMIT_NOFILE``.

The decisions are pure (``plan_descriptors``, ``ConnectionTable``, ``LogGate``: they take
``now`` and are tested without a server); ``ConnectionGuard`` and the two protocol subclasses
wire them to the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from webhook_connect.cloud import metrics, stopping
from webhook_connect.cloud.config import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_OPEN,
)

logger = logging.getLogger("webhook_connect.connections")

# uvicorn's own default; the accept backlog only ever shrinks from it.
DEFAULT_BACKLOG = 2048
MIN_BACKLOG = 16
# Descriptors the process needs besides client connections: storage (SQLite and its journal,
# or a Redis pool), log and metrics files, outbound clients of direct delivery and checks.
RESERVED_DESCRIPTORS = 64
# A connection closed for being slow or refused at the cap is logged at most this often.
LOG_INTERVAL = 1.0

HEADER_TIMEOUT = "header_timeout"
BODY_TIMEOUT = "body_timeout"
EVICTED = "evicted"
CLOSE_REASONS = (HEADER_TIMEOUT, BODY_TIMEOUT, EVICTED)
RETRY_AFTER_SECONDS = 1

WHY = {
    HEADER_TIMEOUT: "no complete request head within {header}s",
    BODY_TIMEOUT: "no complete request body within {body}s",
    EVICTED: "no request in progress at the open-connection cap ({cap}): the oldest such goes",
}


@dataclass(frozen=True)
class ConnectionLimits:
    """The deadlines and the cap one process enforces (the cap already planned)."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_open: int = DEFAULT_MAX_OPEN

    @property
    def sweep_interval(self) -> float:
        """How often deadlines are checked: a tenth of the shorter one, within [50 ms, 500 ms]."""
        return min(0.5, max(0.05, min(self.header_timeout, self.body_timeout) / 10))


@dataclass(frozen=True)
class DescriptorPlan:
    """How many connections and pending accepts fit under the descriptor limit."""

    max_open: int
    backlog: int
    # The soft RLIMIT_NOFILE to run with: raised towards the hard limit if needed, never lowered.
    nofile: int
    lowered: bool  # max_open is below what was asked


def plan_descriptors(requested: int, soft: int, hard: int) -> DescriptorPlan | None:
    """Fit ``requested`` connections, a backlog and the reserve under the descriptor limit,
    raising the soft limit as far as the hard one allows; ``None`` when not even one fits.

    ``soft`` and ``hard`` may be ``resource.RLIM_INFINITY`` (-1).
    """
    if soft < 0:  # no limit at all
        return DescriptorPlan(requested, DEFAULT_BACKLOG, soft, lowered=False)
    wanted = requested + DEFAULT_BACKLOG + RESERVED_DESCRIPTORS
    ceiling = wanted if hard < 0 else min(hard, wanted)
    nofile = max(soft, ceiling)
    if nofile >= wanted:
        return DescriptorPlan(requested, DEFAULT_BACKLOG, nofile, lowered=False)
    room = nofile - RESERVED_DESCRIPTORS
    # A quarter of the room for the backlog at least, all that the connections leave at most.
    max_open = min(requested, room - max(MIN_BACKLOG, room // 4))
    if max_open < 1:
        return None
    backlog = min(DEFAULT_BACKLOG, room - max_open)
    return DescriptorPlan(max_open, backlog, nofile, lowered=max_open < requested)


def minimum_descriptors() -> int:
    """The smallest ``RLIMIT_NOFILE`` the cloud can run under (for the error message)."""
    return RESERVED_DESCRIPTORS + MIN_BACKLOG + 1


@dataclass
class LogGate:
    """Lets a line through at most once per ``interval`` and counts what it held back."""

    interval: float = LOG_INTERVAL
    _last: float = -math.inf
    _held: int = 0

    def allow(self, now: float) -> int | None:
        """``None``: stay quiet; otherwise log, saying how many lines were held back since."""
        if now - self._last < self.interval:
            self._held += 1
            return None
        held, self._held, self._last = self._held, 0, now
        return held


K = TypeVar("K")  # any hashable key: the protocol instances


@dataclass(frozen=True)
class Admission(Generic[K]):
    admitted: bool
    evict: K | None = None


@dataclass(slots=True)
class _Entry:
    busy: int = 0  # requests whose head arrived and whose answer is not complete
    stream: bool = False  # a WebSocket or an upgrade: never timed out or evicted
    due: float = math.inf  # when the running deadline ends (inf: none runs)
    why: str = ""  # which deadline runs
    idle: int = 0  # > 0: evictable, and the order in which it became so


@dataclass
class ConnectionTable(Generic[K]):
    """Which connections are open, which deadline each runs against, and whom the cap evicts.

    Pure: the event loop reports what happened with the time, and asks what has expired.
    Every request reports four steps, so each is a dict lookup and a few attribute writes; the
    rare questions (what expired, whom to evict at the cap) scan the table instead.
    """

    limits: ConnectionLimits
    _entries: dict[K, _Entry] = field(default_factory=dict)
    _ticks: int = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def _tick(self) -> int:
        self._ticks += 1
        return self._ticks

    def open(self, key: K, now: float) -> Admission[K]:
        """An HTTP connection was accepted; it must send its head within ``header_timeout``."""
        evict = None
        if len(self._entries) >= self.limits.max_open:
            idle = [(entry.idle, k) for k, entry in self._entries.items() if entry.idle]
            if not idle:
                return Admission(admitted=False)
            evict = min(idle, key=lambda pair: pair[0])[1]
            self.closed(evict)
        self._entries[key] = _Entry(
            due=now + self.limits.header_timeout, why=HEADER_TIMEOUT, idle=self._tick()
        )
        return Admission(admitted=True, evict=evict)

    def open_stream(self, key: K) -> None:
        """A WebSocket: counted against the cap, never timed out or evicted."""
        self._entries[key] = _Entry(busy=1, stream=True)

    def message_begun(self, key: K, now: float) -> None:
        """The first byte of a request arrived. On a fresh connection the head's deadline has
        run since connect; on a kept-alive one it starts now."""
        entry = self._entries.get(key)
        if entry is not None and entry.due == math.inf and not entry.stream:
            entry.due, entry.why = now + self.limits.header_timeout, HEADER_TIMEOUT

    def head_complete(self, key: K, now: float, *, upgrade: bool = False) -> None:
        """The request head is complete: the body's deadline starts (none for an upgrade)."""
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.busy += 1
        entry.idle = 0
        if upgrade:
            entry.stream = True
            entry.due = math.inf
        else:
            entry.due, entry.why = now + self.limits.body_timeout, BODY_TIMEOUT

    def message_complete(self, key: K) -> None:
        """The whole body arrived: no deadline until the next request begins."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.due = math.inf

    def response_complete(self, key: K) -> None:
        """An answer was sent in full; with none outstanding the connection may be evicted."""
        entry = self._entries.get(key)
        if entry is None or entry.stream:
            return
        entry.busy = max(0, entry.busy - 1)
        if entry.busy == 0:
            entry.idle = self._tick()

    def closed(self, key: K) -> None:
        """The connection is gone (or handed over): forget it."""
        self._entries.pop(key, None)

    def expired(self, now: float) -> list[tuple[K, str]]:
        """Connections past their deadline, with the deadline's name; they stay in the table
        until :meth:`closed`."""
        return [(key, entry.why) for key, entry in self._entries.items() if entry.due <= now]


class Guarded(Protocol):
    """What the guard asks of a connection it closes."""

    def expire(self, reason: str) -> None: ...

    def describe(self) -> str: ...


class ConnectionGuard:
    """The process's table on the event loop: checks deadlines, closes, counts and logs."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.table: ConnectionTable[Guarded] = ConnectionTable(limits)
        self._gates = {reason: LogGate() for reason in (*CLOSE_REASONS, "refused")}
        self._sweeper: asyncio.TimerHandle | None = None

    def admit(self, connection: Guarded, loop: asyncio.AbstractEventLoop) -> bool:
        """Register a new HTTP connection; ``False``: refuse it (the cap is full of busy ones)."""
        now = time.monotonic()
        admission = self.table.open(connection, now)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.limits.sweep_interval, self._sweep, loop)
        if not admission.admitted:
            metrics.count_connection_refused()
            self._log("refused", connection, now)
            return False
        metrics.connection_opened()
        if admission.evict is not None:  # already out of the table
            metrics.connection_closed()
            self._close(admission.evict, EVICTED, now)
        return True

    def stream_opened(self, connection: Guarded) -> None:
        self.table.open_stream(connection)
        metrics.connection_opened()

    def closed(self, connection: Guarded) -> None:
        """The connection is gone; idempotent (a connection the guard closed reports it again)."""
        if connection in self.table:
            self.table.closed(connection)
            metrics.connection_closed()

    def handed_over(self, connection: Guarded) -> None:
        """An HTTP connection became a WebSocket, which registers itself."""
        self.closed(connection)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        # Rescheduled first: one connection failing to close must not end the sweeps.
        self._sweeper = loop.call_later(self.limits.sweep_interval, self._sweep, loop)
        now = time.monotonic()
        for connection, reason in self.table.expired(now):
            self.closed(connection)
            self._close(connection, reason, now)

    def _close(self, connection: Guarded, reason: str, now: float) -> None:
        metrics.count_connection_closed(reason)
        self._log(reason, connection, now)
        connection.expire(reason)

    def _log(self, reason: str, connection: Guarded, now: float) -> None:
        held = self._gates[reason].allow(now)
        if held is None:
            return
        limits = self.limits
        if reason == "refused":
            why = f"{len(self.table)} connections open, every one busy (--max-open-connections)"
            verb = "refused"
        else:
            why = WHY[reason].format(
                header=limits.header_timeout, body=limits.body_timeout, cap=limits.max_open
            )
            verb = "closed"
        more = f" ({held} more since the last such line)" if held else ""
        logger.warning("%s connection from %s: %s%s", verb, connection.describe(), why, more)


_process_guard: ConnectionGuard | None = None


def process_guard(limits: ConnectionLimits) -> ConnectionGuard:
    """The one guard of this process (each uvicorn worker has its own cap)."""
    global _process_guard
    if _process_guard is None:
        _process_guard = ConnectionGuard(limits)
    return _process_guard


def _raw_answer(status: bytes, error: str, extra: bytes = b"") -> bytes:
    body = b'{"error":"%s"}' % error.encode()
    head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s"
    return head % (status, len(body), extra) + b"connection: close\r\n\r\n" + body


REFUSED = _raw_answer(
    b"503 Service Unavailable",
    "too_many_connections",
    b"retry-after: " + str(RETRY_AFTER_SECONDS).encode() + b"\r\n",
)
TIMED_OUT = {
    HEADER_TIMEOUT: _raw_answer(b"408 Request Timeout", HEADER_TIMEOUT),
    BODY_TIMEOUT: _raw_answer(b"408 Request Timeout", BODY_TIMEOUT),
}


STOPPING_BODY = b'{"error":"shutting_down"}'


async def _answer_stopping(cycle: RequestResponseCycle) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(STOPPING_BODY)).encode()),
        (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
        (b"connection", b"close"),
    ]
    await cycle.send({"type": "http.response.start", "status": 503, "headers": headers})
    await cycle.send({"type": "http.response.body", "body": STOPPING_BODY, "more_body": False})


def describe(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "an unknown address"


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the guard told of every step of each request."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ConnectionLimits | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = process_guard(limits or ConnectionLimits())
        # Part of a request head has arrived (a timed-out one is then answered 408).
        self.partial_head = False

    def describe(self) -> str:
        return describe(self.client)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self, self.loop):
            transport.write(REFUSED)
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.guard.closed(self)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.partial_head = True
        self.guard.table.message_begun(self, time.monotonic())

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self.partial_head = False
        upgrade = bool(self.parser.should_upgrade()) and self._should_upgrade()
        self.guard.table.head_complete(self, time.monotonic(), upgrade=upgrade)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.guard.table.message_complete(self)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.guard.table.response_complete(self)

    def handle_websocket_upgrade(self) -> None:
        self.guard.handed_over(self)
        super().handle_websocket_upgrade()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown begins: waiting polls answer at once (cloud/stopping.py),
        and a request still unanswered when the graceful timeout cancels it is answered 503
        with Retry-After (the sender tries again, elsewhere or once restarted) instead of
        uvicorn's 500 for a failed application."""
        stopping.begin()
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.send_500_response = functools.partial(_answer_stopping, cycle)  # type: ignore[method-assign]
        super().shutdown()

    def expire(self, reason: str) -> None:
        """Closed by the guard: answer 408 where a request is waiting for one, then close."""
        if self.transport.is_closing():
            return
        cycle = self.cycle
        unanswered = cycle is not None and not cycle.response_started
        if reason == BODY_TIMEOUT and unanswered or reason == HEADER_TIMEOUT and self.partial_head:
            self.transport.write(TIMED_OUT[reason])
        if cycle is not None and not cycle.response_complete:
            # The application sees the client gone: a half-read webhook stores nothing.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()


class Inbox:
    """What uvicorn's WebSocket protocol asks of its ``asyncio.Queue`` of ASGI events, in far
    less memory: a list and, while the application waits, one future. (An ``asyncio.Queue``
    allocates three deques, about 2.3 KB, per connection; uvicorn stops reading the socket
    while an event is queued, so the list stays short.)"""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class Flag:
    """What uvicorn's WebSocket protocol asks of its ``asyncio.Event`` (``writable``), without
    the deque an ``asyncio.Event`` allocates up front (about 760 bytes per connection)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, counted against the cap and exempt from its deadlines.

    Lighter per connection than uvicorn's own, for thousands of idle connectors: a leaner
    queue and event (:class:`Inbox`, :class:`Flag`), and the handshake's request and response
    (headers and all) dropped once the upgrade is answered.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ConnectionLimits | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = process_guard(limits or ConnectionLimits())
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Flag()  # type: ignore[assignment]
        self.writable.set()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept":
            # Read only to answer the upgrade, which is done now.
            self.request = self.response = None  # type: ignore[assignment]

    def describe(self) -> str:
        return describe(self.client)

    def expire(self, reason: str) -> None:  # never timed out or evicted; here for the type
        self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.guard.stream_opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.guard.closed(self)
