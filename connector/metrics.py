"""The connector's own ``/health`` and ``/metrics`` (``--metrics-port``, off by default).

Per message the runner only bumps plain ints (a dict entry, a histogram bucket found by
bisection): nothing is formatted until a scrape asks. prometheus_client is not used: its
counters take a lock per increment and it is not a dependency of the connector.

The endpoint is a few lines of asyncio rather than a web framework, because the connector's
extras have none and it answers two fixed GETs.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from dataclasses import dataclass, field

import orjson

from webhook_connect.shared.policy import Outcome

logger = logging.getLogger("webhook_connect.connector")

# Delivery latency buckets in seconds: a local target answers in milliseconds, a slow one or
# a retried delivery (backoff included) in seconds.
LATENCY_BOUNDS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
OUTCOMES = ("delivered", "retry", "rejected", "duplicate")
PREFIX = "webhook_connect_connector_"
REQUEST_TIMEOUT = 5.0


@dataclass(slots=True)
class Metrics:
    """What the runner counts as it goes; read by :func:`render` and :func:`health`."""

    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))
    latency_sum: float = 0.0
    in_flight: int = 0
    reconnects: int = 0
    connected: bool = False
    connected_since: float | None = None
    last_delivery: float | None = None
    last_outcome: str = ""
    last_status: int | None = None
    last_error: str = ""

    def delivery(
        self,
        outcome: Outcome,
        seconds: float,
        status: int | None,
        error: str,
        unmatched: bool = False,
    ) -> None:
        """One delivery ended (the runner calls this inline: keep it cheap). An unmatched
        message (routes, events) counts as ``unmatched``, from its first on, not as delivered."""
        name = "unmatched" if unmatched else outcome.value
        self.outcomes[name] = self.outcomes.get(name, 0) + 1
        self.buckets[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.latency_sum += seconds
        self.last_delivery = time.time()
        self.last_outcome = name
        self.last_status = status
        self.last_error = error

    def duplicate(self) -> None:
        self.outcomes["duplicate"] += 1

    def up(self) -> None:
        self.connected = True
        self.connected_since = time.time()

    def down(self) -> None:
        self.connected = False
        self.connected_since = None


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


def health(metrics: Metrics, cloud_url: str, channel: str) -> tuple[int, bytes]:
    """``GET /health``: 200 while connected to the cloud, 503 otherwise (pure)."""
    last = None
    if metrics.last_delivery is not None:
        last = {
            "time": _iso(metrics.last_delivery),
            "outcome": metrics.last_outcome,
            "status": metrics.last_status,
        }
        if metrics.last_error:
            last["error"] = metrics.last_error
    body = {
        "status": "ok" if metrics.connected else "disconnected",
        "connected": metrics.connected,
        "connected_since": _iso(metrics.connected_since),
        "cloud_url": cloud_url,
        "channel": channel,
        "in_flight": metrics.in_flight,
        "reconnects": metrics.reconnects,
        "last_delivery": last,
        "deliveries": dict(metrics.outcomes),
    }
    return (200 if metrics.connected else 503), orjson.dumps(body)


def render(metrics: Metrics) -> str:
    """``GET /metrics``: the Prometheus text exposition format, version 0.0.4 (pure)."""
    lines = [
        f"# HELP {PREFIX}deliveries_total Messages handled, by outcome (duplicate: already "
        "delivered, acked without a delivery).",
        f"# TYPE {PREFIX}deliveries_total counter",
    ]
    lines += [
        f'{PREFIX}deliveries_total{{outcome="{name}"}} {count}'
        for name, count in metrics.outcomes.items()
    ]
    name = f"{PREFIX}delivery_seconds"
    lines += [
        f"# HELP {name} Time to deliver a message, local retries included.",
        f"# TYPE {name} histogram",
    ]
    total = 0
    for bound, count in zip((*LATENCY_BOUNDS, float("inf")), metrics.buckets, strict=True):
        total += count
        label = "+Inf" if bound == float("inf") else repr(bound)
        lines.append(f'{name}_bucket{{le="{label}"}} {total}')
    lines += [f"{name}_sum {metrics.latency_sum!r}", f"{name}_count {total}"]
    gauges = (
        ("in_flight", "Deliveries in progress.", "gauge", metrics.in_flight),
        ("reconnects_total", "Times the connector dialled again.", "counter", metrics.reconnects),
        ("connected", "1 while connected to the cloud.", "gauge", int(metrics.connected)),
    )
    for suffix, text, kind, value in gauges:
        lines += [
            f"# HELP {PREFIX}{suffix} {text}",
            f"# TYPE {PREFIX}{suffix} {kind}",
            f"{PREFIX}{suffix} {value}",
        ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    content_type: str
    body: bytes


REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def answer(method: str, path: str, metrics: Metrics, cloud_url: str, channel: str) -> Answer:
    """The answer to one request line (pure)."""
    path = path.split("?", 1)[0]
    if path not in ("/health", "/metrics"):
        return Answer(404, "text/plain; charset=utf-8", b"not found: try /health or /metrics\n")
    if method not in ("GET", "HEAD"):
        return Answer(405, "text/plain; charset=utf-8", b"GET only\n")
    if path == "/health":
        status, body = health(metrics, cloud_url, channel)
        return Answer(status, "application/json", body)
    return Answer(200, "text/plain; version=0.0.4; charset=utf-8", render(metrics).encode())


class MetricsServer:
    """Serves :func:`answer` on ``host:port``, one request per connection."""

    def __init__(self, metrics: Metrics, host: str, port: int, cloud_url: str, channel: str):
        self._metrics = metrics
        self._host = host
        self._port = port
        self._cloud_url = cloud_url
        self._channel = channel
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        logger.info(
            "health and metrics on http://%s:%d/health and /metrics", self._host, self._port
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            method, path = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
            reply = answer(method, path, self._metrics, self._cloud_url, self._channel)
            body = b"" if method == "HEAD" else reply.body
            writer.write(
                f"HTTP/1.1 {reply.status} {REASONS[reply.status]}\r\n"
                f"Content-Type: {reply.content_type}\r\n"
                f"Content-Length: {len(reply.body)}\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ValueError, OSError, asyncio.IncompleteReadError):
            pass  # a half request or a client gone: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
