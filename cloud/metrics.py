"""``GET /metrics``: the cloud's figures in the Prometheus text format.

Each figure is read where it is true for the whole deployment, so every uvicorn worker of every
replica answers a scrape correctly:

* **Storage figures**, per channel: accepted, delivered, redelivered, dead-lettered and expired
  counts, queue depth, messages in flight, dead letters held, oldest-message age, connected
  connectors. The buffer keeps them for every process already; they are read from storage when
  Prometheus scrapes and never kept here, so nothing is added to the paths that change them.
  A deployment of several replicas should therefore ``max by (channel)`` them, not ``sum``.
* **Process figures**: requests received, rejected by reason, duplicates, ack latency. Only the
  process that served the request sees them. Keeping them in storage would add a round trip to
  every rejected request (the cheapest answers, and the ones a flood consists of) and to every
  ack; a prometheus_client counter is an in-memory add. With several workers,
  prometheus_client's multiprocess mode keeps each worker's values in a memory-mapped file under
  ``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory ``cloud/server.py`` makes for each run) and a
  scrape sums every worker's file. Replicas are summed by Prometheus: ``sum by (channel)``.
* **Ingest latency** (``ingest_duration_seconds``): from a webhook request reaching the cloud
  to its answer being sent, by channel and status class (2xx, 4xx, 5xx), summed over workers
  like the other process figures. Requests to unknown webhook ids are counted as
  ``rejected_total{channel="", reason="unknown_webhook"}``: the id itself is never a label,
  since anyone can make up ids and each would be a new series.
* **Build and process**: ``build_info{version, python}`` is 1; ``python_info`` and the standard
  ``process_*`` figures describe the whole server whichever worker answers: CPU seconds,
  memory and open descriptors are summed over uvicorn's supervisor and every worker, read from
  ``/proc`` at scrape time; start time and descriptor limit are the supervisor's.
* **Client connections** (``cloud/connections.py``), summed over workers: ``open_connections``
  (HTTP and WebSocket, a gauge of live workers), ``connections_closed_total{reason}`` (a
  deadline ran out: ``header_timeout``, ``body_timeout``; or ``evicted`` at the cap) and
  ``connections_refused_total`` (503 at the cap, every connection busy).

Ack latency is the time from sending a message to a connector to its ack arriving. A WebSocket
ack reaches the process that sent the message, so every ack is observed. An SSE or long-poll ack
is a separate ``POST /connect/ack`` that may reach another worker or replica, which does not
know when the message left: those acks are observed only where they reach the sending process.
Whether an ack lands there does not depend on its latency, so the histogram's quantiles stay
right; its count is a sample of ``delivered``, not equal to it.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from webhook_connect.cloud.buffers import Buffer, ConnectionRecord
from webhook_connect.cloud.buffers.base import COUNTERS, ChannelStats

logger = logging.getLogger("webhook_connect.metrics")

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# prometheus_client picks in-memory or memory-mapped values once, when it is imported.
MULTIPROCESS = MULTIPROCESS_ENV in os.environ
PREFIX = "webhook_connect_"
TRANSPORTS = ("websocket", "sse", "long_poll", "smee")
ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# An accepted webhook takes about a millisecond (one fsync on SQLite, one round trip on Redis);
# slow senders' large bodies and storage outages take seconds.
INGEST_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)
# Process figures the whole server adds up (the others are the supervisor's own).
SUMMED_PROCESS_FIGURES = frozenset(
    {
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
    }
)
SENT_TIMES_LIMIT = 100_000  # unacked pull deliveries remembered for ack latency

# Multiprocess mode has no ``_created`` series; a single process should not differ.
disable_created_metrics()  # type: ignore[no-untyped-call]
LOCAL = CollectorRegistry(auto_describe=True)
RECEIVED = Counter(
    PREFIX + "received", "Requests to a configured webhook.", ["channel"], registry=LOCAL
)
REJECTED = Counter(
    PREFIX + "rejected",
    "Requests refused, by the error code answered.",
    ["channel", "reason"],
    registry=LOCAL,
)
DUPLICATES = Counter(
    PREFIX + "duplicates",
    "Retried deliveries answered 202 with the original message id, not stored again.",
    ["channel"],
    registry=LOCAL,
)
ACK_LATENCY = Histogram(
    PREFIX + "ack_latency_seconds",
    "Time from sending a message to a connector to its ack.",
    ["channel"],
    buckets=ACK_BUCKETS,
    registry=LOCAL,
)

# Client connections (cloud/connections.py), per process; a scrape sums every worker's.
CONNECTIONS_CLOSED = Counter(
    PREFIX + "connections_closed",
    "Client connections the cloud closed: a deadline ran out, or evicted at the cap.",
    ["reason"],
    registry=LOCAL,
)
CONNECTIONS_REFUSED = Counter(
    PREFIX + "connections_refused",
    "Client connections answered 503 at the open-connection cap, every one busy.",
    registry=LOCAL,
)
OPEN_CONNECTIONS = Gauge(
    PREFIX + "open_connections",
    "Client connections open (HTTP and WebSocket).",
    registry=LOCAL,
    multiprocess_mode="livesum",
)
for _reason in ("header_timeout", "body_timeout", "evicted"):
    CONNECTIONS_CLOSED.labels(_reason)  # present at zero from the start

INGEST_DURATION = Histogram(
    PREFIX + "ingest_duration_seconds",
    "Time from a webhook request reaching the cloud to its answer (202, 4xx or 5xx).",
    ["channel", "status_class"],
    buckets=INGEST_BUCKETS,
    registry=LOCAL,
)

# Label lookups take a lock and build tuples: the hot path reuses each child.
_received: dict[str, Counter] = {}
_rejected: dict[tuple[str, str], Counter] = {}
_ack_latency: dict[str, Histogram] = {}
_ingest_duration: dict[tuple[str, int], Histogram] = {}
# Requests to webhook ids nobody configured: no channel, and never the id as a label (anyone
# can make up ids, and each would be a new series).
UNKNOWN_WEBHOOK = REJECTED.labels("", "unknown_webhook")


def count_received(channel: str) -> None:
    """A request reached a webhook of ``channel`` (whatever its answer)."""
    child = _received.get(channel)
    if child is None:
        child = _received[channel] = RECEIVED.labels(channel)
    child.inc()


def count_rejected(channel: str, reason: str) -> None:
    """A request was refused; ``reason`` is the error code answered."""
    child = _rejected.get((channel, reason))
    if child is None:
        child = _rejected[channel, reason] = REJECTED.labels(channel, reason)
    child.inc()


def count_unknown_webhook() -> None:
    """A request named a webhook id that is not configured (answered 404)."""
    UNKNOWN_WEBHOOK.inc()


def observe_ingest(channel: str, status: int, started: float) -> None:
    """A webhook request of ``channel`` was answered ``status``; it began at ``started``
    (``time.perf_counter()``)."""
    elapsed = time.perf_counter() - started
    key = (channel, status // 100)
    child = _ingest_duration.get(key)
    if child is None:
        child = _ingest_duration[key] = INGEST_DURATION.labels(channel, f"{status // 100}xx")
    child.observe(elapsed)


def count_duplicate(channel: str) -> None:
    """A provider's retry of a stored message was answered with the original id."""
    DUPLICATES.labels(channel).inc()


def connection_opened() -> None:
    OPEN_CONNECTIONS.inc()


def connection_closed() -> None:
    OPEN_CONNECTIONS.dec()


def count_connection_closed(reason: str) -> None:
    """The cloud closed a client connection; ``reason`` names the deadline or the cap."""
    CONNECTIONS_CLOSED.labels(reason).inc()


def count_connection_refused() -> None:
    CONNECTIONS_REFUSED.inc()


def observe_ack_latency(channel: str, seconds: Iterable[float]) -> None:
    """Acks arrived ``seconds`` after their messages were sent."""
    child = _ack_latency.get(channel)
    if child is None:
        child = _ack_latency[channel] = ACK_LATENCY.labels(channel)
    for value in seconds:
        child.observe(value)


@dataclass
class SentTimes:
    """When each pull delivery not yet settled was sent, keyed by consumer and message id.

    Bounded: messages that are never acked here (the ack went to another process, or the
    connector vanished) make room for new ones, oldest first.
    """

    limit: int = SENT_TIMES_LIMIT
    _sent: dict[tuple[str, str], float] = field(default_factory=dict)

    def sent(self, consumer: str, message_ids: Iterable[str], now: float) -> None:
        for message_id in message_ids:
            key = (consumer, message_id)
            self._sent.pop(key, None)  # a redelivery: its new time goes to the end
            self._sent[key] = now
        overflow = len(self._sent) - self.limit
        if overflow > 0:
            for key in list(islice(self._sent, overflow)):
                del self._sent[key]

    def settled(self, consumer: str, message_ids: Iterable[str], now: float) -> list[float]:
        """How long ago each known message was sent; forget them all."""
        ages = []
        for message_id in message_ids:
            sent = self._sent.pop((consumer, message_id), None)
            if sent is not None:
                ages.append(now - sent)
        return ages


@dataclass(frozen=True, slots=True)
class ChannelFigures:
    name: str
    stats: ChannelStats
    connections: list[ConnectionRecord]


def storage_families(figures: list[ChannelFigures], storage_up: bool) -> Iterator[Metric]:
    """The storage figures as Prometheus metric families (pure: tested without a server)."""
    up = GaugeMetricFamily(PREFIX + "storage_up", "1 when storage answered this scrape.")
    up.add_metric([], 1 if storage_up else 0)
    yield up
    names = list(COUNTERS)
    names += sorted({n for f in figures for n in f.stats.counters} - set(names))
    for name in names:
        counter = CounterMetricFamily(
            PREFIX + name, f"Messages {name.replace('_', ' ')}, from storage.", labels=["channel"]
        )
        for item in figures:
            counter.add_metric([item.name], item.stats.counters.get(name, 0))
        yield counter
    gauges = {
        "queue_depth": ("Messages retained and not yet delivered to every group.", "depth"),
        "in_flight": ("Messages sent to a connector and not yet settled.", "in_flight"),
        "dead_letters": ("Dead letters held.", "dead_letters"),
    }
    for name, (documentation, attribute) in gauges.items():
        gauge = GaugeMetricFamily(PREFIX + name, documentation, labels=["channel"])
        for item in figures:
            gauge.add_metric([item.name], getattr(item.stats, attribute))
        yield gauge
    age = GaugeMetricFamily(
        PREFIX + "oldest_message_age_seconds",
        "Age of the oldest retained message; 0 when the channel is empty.",
        labels=["channel"],
    )
    connectors = GaugeMetricFamily(
        PREFIX + "connectors", "Connected connectors.", labels=["channel", "transport"]
    )
    for item in figures:
        age.add_metric([item.name], item.stats.oldest_age_seconds or 0.0)
        found = [record.transport for record in item.connections]
        for transport in dict.fromkeys([*TRANSPORTS, *found]):
            connectors.add_metric([item.name, transport], found.count(transport))
    yield age
    yield connectors


async def read_figures(buffer: Buffer) -> list[ChannelFigures]:
    """Every channel's stats and connections, read concurrently; raise StorageError."""

    async def one(name: str) -> ChannelFigures:
        stats, connections = await asyncio.gather(buffer.stats(name), buffer.list_connections(name))
        return ChannelFigures(name, stats, connections)

    channels = await buffer.list_channels()
    return list(await asyncio.gather(*(one(spec.name) for spec in channels)))


def build_families(version: str, python: str) -> Iterator[Metric]:
    """``webhook_connect_build_info{version, python} 1``: which build answers (pure)."""
    info = GaugeMetricFamily(
        PREFIX + "build_info",
        "Always 1; the labels name the running version of webhook-connect and of Python.",
        labels=["version", "python"],
    )
    info.add_metric([version, python], 1)
    yield info


def package_version() -> str:
    try:
        return importlib.metadata.version("webhook-connect")
    except importlib.metadata.PackageNotFoundError:  # a bare source tree
        return "unknown"


def server_root(workers: int) -> int:
    """The process at the top of this server: with several workers, uvicorn's supervisor
    (each worker's parent); with one, the worker is the server."""
    return os.getpid() if workers == 1 else os.getppid()


def process_tree(root: int, proc: Path = Path("/proc")) -> list[int]:
    """``root`` and its child processes (workers, multiprocessing's helpers)."""
    try:
        children = (proc / str(root) / "task" / str(root) / "children").read_text().split()
    except OSError:  # a kernel without the children file: just the root
        children = []
    return [root, *(int(pid) for pid in children)]


class ProcessTree(Collector):
    """The standard ``process_*`` figures for the whole server, not just the worker that
    happens to answer a scrape: CPU time, memory and open descriptors summed over the
    supervisor and every worker; start time and descriptor limit are the supervisor's.

    prometheus_client's own ProcessCollector reads one PID; this runs it on each and adds up.
    A worker that restarts takes its CPU seconds with it, which Prometheus sees as a counter
    reset, as it would for a restarted process.
    """

    def __init__(self, root: int, proc: Path = Path("/proc")) -> None:
        self.root = root
        self.proc = proc

    def collect(self) -> Iterable[Metric]:
        families: list[Metric] = []
        totals: dict[str, float] = {}
        for pid in process_tree(self.root, self.proc):
            collector = ProcessCollector(pid=_fixed(pid), proc=str(self.proc), registry=None)
            found = list(collector.collect())
            if not families:
                families = found  # the root's: every figure, summed ones added to below
            for family in found:
                for sample in family.samples:
                    if sample.name in SUMMED_PROCESS_FIGURES:
                        totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        for family in families:
            family.samples = [
                sample._replace(value=totals.get(sample.name, sample.value))
                for sample in family.samples
            ]
        return families


def _fixed(pid: int) -> Callable[[], int]:
    return lambda: pid


class _Snapshot(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


class MetricsRoute:
    """Serves ``GET /metrics``; storage being down leaves the process figures and says so."""

    def __init__(self, buffer: Buffer, workers: int = 1) -> None:
        self.buffer = buffer
        self.process = ProcessTree(server_root(workers))
        # Fixed for the life of the process: built once.
        self.static = [
            *build_families(package_version(), platform.python_version()),
            *PlatformCollector(registry=None).collect(),
        ]

    async def scrape(self, request: Request) -> Response:
        try:
            figures, storage_up = await read_figures(self.buffer), True
        except Exception as exc:  # not every backend wraps a lost connection in StorageError
            # Still answer: the process figures (503s counted as storage_unavailable) matter most
            # exactly while storage is down.
            logger.warning("metrics: storage unreadable: %r", exc)
            figures, storage_up = [], False
        registry = CollectorRegistry(auto_describe=False)
        if MULTIPROCESS:
            # Every worker's values, summed.
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry.register(_Snapshot(list(LOCAL.collect())))
        registry.register(_Snapshot(list(storage_families(figures, storage_up))))
        registry.register(_Snapshot(self.static))
        registry.register(self.process)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
