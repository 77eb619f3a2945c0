"""Relay benchmark: POST to the cloud (Redis storage) -> one connector -> a local sink.

Measures, on this machine:
  * drain: how fast one connector empties a backlog of N messages (sustained throughput);
  * fixed rates: latency from the POST being sent to the sink receiving the message, at a
    steady offered load (open loop), and the rate actually delivered;
  * the connector's CPU time per message (from /proc, user + system).

    python bench/relay/run.py [--backlog 20000] [--rates 2000,3000] [--duration 15]
                              [--backends redis,redis-cluster,rabbitmq]

``redis-cluster`` is a Redis Cluster of 3 masters with a replica each
(docs/STORAGE-REDIS-CLUSTER.md); ``rabbitmq`` a private rabbitmq-server node holding the
messages, with a redis-server as its registry (docs/STORAGE-RABBITMQ.md).

Everything listens on 127.0.0.1, is started here and stopped by PID. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.ingest.servers import (  # noqa: E402
    free_port,
    start_cloud,
    start_redis,
    start_redis_cluster,
    stop,
)

HOST = "127.0.0.1"
TOKEN = "bench-relay-token-0123456789"
PAD = "x" * 900
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class _Poster(asyncio.Protocol):
    """One keep-alive connection with at most one request outstanding."""

    def __init__(self, owner: Offer) -> None:
        self.owner = owner
        self.carry = b""
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.owner.ready(self)

    def post(self) -> None:
        self.busy = True
        body = b'{"sent":%.6f,"pad":"%s"}' % (time.time(), PAD.encode())
        self.transport.write(self.owner.head % len(body) + body)

    def data_received(self, data: bytes) -> None:
        data = self.carry + data
        answers = data.count(b"HTTP/1.1 ")
        self.owner.accepted += data.count(b"HTTP/1.1 202")
        self.carry = data[-16:]
        if answers:
            self.carry = b""
            self.busy = False
            self.owner.answered += answers
            self.owner.ready(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.lost(self)


class Offer:
    """Sends POSTs on a schedule (rate) or as fast as answers come (rate None)."""

    def __init__(self, port: int, max_connections: int = 128) -> None:
        self.port = port
        self.head = (
            f"POST /webhook/bench HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        ).encode()
        self.max_connections = max_connections
        self.idle: list[_Poster] = []
        self.connections: set[_Poster] = set()
        self.opening = 0
        self.backlog = 0
        self.sent = self.answered = self.accepted = 0
        self.closed_loop_left = 0

    def ready(self, poster: _Poster) -> None:
        self.connections.add(poster)
        if self.closed_loop_left > 0:
            self.closed_loop_left -= 1
            self.sent += 1
            poster.post()
        elif self.backlog > 0:
            self.backlog -= 1
            self.sent += 1
            poster.post()
        else:
            self.idle.append(poster)

    def lost(self, poster: _Poster) -> None:
        self.connections.discard(poster)
        if poster in self.idle:
            self.idle.remove(poster)

    def submit(self) -> None:
        if self.idle:
            self.sent += 1
            self.idle.pop().post()
            return
        self.backlog += 1
        if len(self.connections) + self.opening < self.max_connections:
            self.opening += 1
            asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: _Poster(self), HOST, self.port
            )
        finally:
            self.opening -= 1

    async def at_rate(self, rate: float, duration: float) -> None:
        start = time.perf_counter()
        total = int(rate * duration)
        submitted = 0
        while submitted < total:
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            while submitted < due:
                self.submit()
                submitted += 1
            await asyncio.sleep(0.001)
        await self.settle(total)

    async def as_fast_as_possible(self, count: int, concurrency: int = 64) -> None:
        self.closed_loop_left = count
        for _ in range(min(concurrency, count)):
            self.closed_loop_left -= 1
            self.backlog += 1
            self.opening += 1
            asyncio.get_running_loop().create_task(self._open())
        await self.settle(count)

    async def settle(self, total: int) -> None:
        deadline = time.monotonic() + 60
        while self.answered < total and time.monotonic() < deadline:  # noqa: ASYNC110 - polled by design: cheap, bounded
            await asyncio.sleep(0.01)
        for poster in list(self.connections):
            poster.transport.close()


def run_async(coroutine: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def sink_stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/__stats", timeout=10) as answer:
        return dict(json.loads(answer.read()))


def wait_for_sink(port: int, count: int, timeout: float = 120) -> dict[str, Any]:
    """Collect sink figures until ``count`` unique messages arrived (or time runs out)."""
    deadline = time.monotonic() + timeout
    total: dict[str, Any] = {}
    while True:
        stats = sink_stats(port)
        if not total:
            total = stats
        elif stats["count"]:
            total["count"] += stats["count"]
            total["unique"] += stats["unique"]
            total["duplicates"] += stats["duplicates"]
            total["last"] = stats["last"]
            total.setdefault("batches", []).append(stats)
        if total["unique"] >= count or time.monotonic() > deadline:
            return total
        time.sleep(0.2)


class Rig:
    def __init__(
        self,
        workdir: Path,
        max_concurrent: int,
        max_in_flight: int,
        protocol: str = "websocket",
        backend: str = "redis",
    ) -> None:
        self.protocol = protocol
        self.backend = backend
        self.workdir = workdir
        self.max_concurrent = max_concurrent
        self.max_in_flight = max_in_flight
        self.processes: list[subprocess.Popen[bytes]] = []
        self.connector: subprocess.Popen[bytes] | None = None
        self.broker: Any = None  # tests.servers.RabbitMQServer, for the rabbitmq backend

    def start(self) -> None:
        if self.backend == "redis-cluster":
            nodes, url = start_redis_cluster(self.workdir, [])
            self.processes.extend(nodes)
        elif self.backend == "rabbitmq":  # the messages in RabbitMQ, the registry in Redis
            from tests.servers import RabbitMQServer

            redis, registry = start_redis(self.workdir, [])
            self.processes.append(redis)
            self.broker = RabbitMQServer(self.workdir / "rabbitmq")
            self.broker.start()
            url = f"{self.broker.url}?registry={quote(registry, safe='')}"
        else:
            redis, url = start_redis(self.workdir, [])
            self.processes.append(redis)
        webhooks = self.workdir / "webhooks.json"
        module_config = {
            "channel": "bench",
            "channel_token": TOKEN,
            "max_queue_size": 10_000_000,
            "max_in_flight": self.max_in_flight,
        }
        webhooks.write_text(
            json.dumps({"bench": {"module": "webhook_connect", "module-config": module_config}})
        )
        cloud, self.cloud_port = start_cloud(url, webhooks, self.workdir / "cloud.log", [])
        self.processes.append(cloud)
        self.sink_port = free_port()
        sink = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("sink.py")), str(self.sink_port)]
        )
        self.processes.append(sink)
        deadline = time.monotonic() + 10
        while True:
            try:
                sink_stats(self.sink_port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def start_connector(self) -> None:
        config = self.workdir / "connector.json"
        config.write_text(
            json.dumps(
                {
                    "cloud_url": f"http://{HOST}:{self.cloud_port}",
                    "protocol": self.protocol,
                    "channel": "bench",
                    "token": TOKEN,
                    "max_concurrent_requests": self.max_concurrent,
                    "state_dir": str(self.workdir / "state"),
                    "default_target": {"url": f"http://{HOST}:{self.sink_port}/"},
                }
            )
        )
        log = (self.workdir / "connector.log").open("ab")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.connector = subprocess.Popen(
            [sys.executable, "-m", "webhook_connect", "connector", "--config", str(config)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while "connected to" not in (self.workdir / "connector.log").read_text():
            if time.monotonic() > deadline or self.connector.poll() is not None:
                raise RuntimeError("connector did not connect")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.connector is not None:
            stop(self.connector)
        for process in reversed(self.processes):
            stop(process)
        if self.broker is not None:
            self.broker.close()


def drain(rig: Rig, backlog: int) -> dict[str, Any]:
    offer = Offer(rig.cloud_port)
    run_async(offer.as_fast_as_possible(backlog))
    assert offer.accepted == backlog, f"only {offer.accepted} of {backlog} accepted"
    sink_stats(rig.sink_port)  # reset
    rig.start_connector()
    assert rig.connector is not None
    cpu_before = cpu_seconds(rig.connector.pid)
    started = time.time()
    stats = wait_for_sink(rig.sink_port, backlog)
    cpu = cpu_seconds(rig.connector.pid) - cpu_before
    elapsed = stats["last"] - started
    return {
        "messages": stats["unique"],
        "duplicates": stats["duplicates"],
        "msg_per_s": stats["unique"] / elapsed,
        "connector_cpu_us_per_msg": cpu / max(stats["unique"], 1) * 1e6,
    }


def steady(rig: Rig, rate: float, duration: float) -> dict[str, Any]:
    assert rig.connector is not None
    sink_stats(rig.sink_port)  # reset
    cpu_before = cpu_seconds(rig.connector.pid)
    offer = Offer(rig.cloud_port)
    run_async(offer.at_rate(rate, duration))
    stats = wait_for_sink(rig.sink_port, int(rate * duration), timeout=60)
    cpu = cpu_seconds(rig.connector.pid) - cpu_before
    batches = [stats, *stats.get("batches", [])]
    # Percentiles over the whole run: weight each batch's by its count (batches are few;
    # almost everything arrives in the first).
    main = max(batches, key=lambda b: b["count"])
    return {
        "offered_per_s": rate,
        "accepted": offer.accepted,
        "delivered": stats["unique"],
        "delivered_per_s": stats["unique"] / max(stats["last"] - stats["first"], 1e-9),
        "p50_ms": main["p50_ms"],
        "p99_ms": main["p99_ms"],
        "max_ms": max(b["max_ms"] for b in batches),
        "connector_cpu_us_per_msg": cpu / max(stats["unique"], 1) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=20000)
    parser.add_argument("--rates", default="2000,3000")
    parser.add_argument("--duration", type=float, default=15)
    parser.add_argument("--max-concurrent", type=int, default=32)
    parser.add_argument("--max-in-flight", type=int, default=200)
    parser.add_argument("--protocols", default="websocket,sse,long_poll")
    parser.add_argument("--backends", default="redis", help="redis, redis-cluster, rabbitmq")
    args = parser.parse_args()
    everything: dict[str, Any] = {}
    for protocol in args.protocols.split(","):
        for backend in args.backends.split(","):
            with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
                rig = Rig(Path(tmp), args.max_concurrent, args.max_in_flight, protocol, backend)
                try:
                    rig.start()
                    results: dict[str, Any] = {"drain": drain(rig, args.backlog)}
                    for rate in (float(r) for r in args.rates.split(",")):
                        results[f"steady_{int(rate)}"] = steady(rig, rate, args.duration)
                finally:
                    rig.stop()
            everything[f"{protocol}/{backend}"] = results
            report(protocol, results, args, backend)
    print(json.dumps(everything))


def report(
    protocol: str, results: dict[str, Any], args: argparse.Namespace, backend: str = "redis"
) -> None:
    print(
        f"relay benchmark over {protocol} ({backend} storage, one connector, "
        f"max_concurrent_requests={args.max_concurrent}, max_in_flight={args.max_in_flight}, "
        "1 KB JSON)"
    )
    d = results["drain"]
    print(
        f"  drain {d['messages']} msgs: {d['msg_per_s']:.0f} msg/s, "
        f"connector CPU {d['connector_cpu_us_per_msg']:.0f} us/msg, "
        f"duplicates {d['duplicates']}"
    )
    for key, r in results.items():
        if key.startswith("steady"):
            print(
                f"  offered {r['offered_per_s']:.0f}/s: delivered {r['delivered']} "
                f"({r['delivered_per_s']:.0f}/s), POST-sent->sink p50 {r['p50_ms']:.2f} ms, "
                f"p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.1f} ms, "
                f"connector CPU {r['connector_cpu_us_per_msg']:.0f} us/msg"
            )


if __name__ == "__main__":
    main()
