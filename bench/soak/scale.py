"""Scale: ingest and relay drain with one cloud process, with ``--workers 2``, and with two cloud
processes on one Redis, in one run.

For each layout: a fresh redis-server (append-only, fsync every second); the cloud; a closed
loop of ``--messages`` 1 KB JSON POSTs over 64 keep-alive connections (split between the two
processes in the last layout) gives the ingest rate; then two connectors (one group; in the last
layout one per process) drain that backlog into the relay benchmark's sink, which gives the
drain rate. Prints a table, then the figures as JSON.

    python bench/soak/scale.py [--messages 20000] [--layouts one,workers2,two_processes]

Everything shares the machine's cores: on 2 cores a second worker competes with Redis, the load
generator, the connectors and the sink. Everything is started here on 127.0.0.1 and stopped by
PID. A benchmark, not a test.
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
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.ingest.servers import HOST, REPO, free_port, start_redis, stop
from bench.relay.run import Offer, run_async
from bench.soak.rig import start_cloud
from bench.soak.soak import SINK, Soak, sink_count, wait_delivered

TOKEN = "scale-token-0123456789abcdef"
LAYOUTS = {
    "one": "one process",
    "workers2": "--workers 2",
    "two_processes": "two processes, one Redis",
}
CONNECTORS = 2
CONCURRENCY = 64


async def ingest(ports: list[int], messages: int) -> Offer:
    """Closed loop against every port at once; returns the offers' counts merged."""
    offers = [Offer(port) for port in ports]
    share = messages // len(ports)
    await asyncio.gather(
        *(offer.as_fast_as_possible(share, CONCURRENCY // len(ports)) for offer in offers)
    )
    total = offers[0]
    for other in offers[1:]:
        total.sent += other.sent
        total.accepted += other.accepted
        total.answered += other.answered
    return total


def start_connector(workdir: Path, name: str, port: int, sink_port: int) -> subprocess.Popen[bytes]:
    config = workdir / f"{name}.json"
    config.write_text(
        json.dumps(
            {
                "cloud_url": f"http://{HOST}:{port}",
                "protocol": "websocket",
                "channel": "scale",
                "token": TOKEN,
                "connector_id": name,
                "max_concurrent_requests": 32,
                "state_dir": str(workdir / f"state-{name}"),
                "default_target": {"url": f"http://{HOST}:{sink_port}/"},
            }
        )
    )
    with (workdir / f"{name}.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "webhook_connect", "connector", "--config", str(config)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def run_layout(layout: str, messages: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-scale-{layout}-") as tmp:
        workdir = Path(tmp)
        started: list[subprocess.Popen[bytes]] = []
        try:
            redis, storage = start_redis(workdir, [])
            started.append(redis)
            webhooks = workdir / "webhooks.json"
            config = {"channel": "scale", "channel_token": TOKEN, "max_queue_size": 10_000_000}
            webhooks.write_text(
                json.dumps({"bench": {"module": "webhook_connect", "module-config": config}})
            )
            ports = []
            processes = 2 if layout == "two_processes" else 1
            extra = ["--workers", "2"] if layout == "workers2" else []
            for number in range(processes):
                cloud, port = start_cloud(storage, webhooks, workdir / f"cloud{number}.log", extra)
                started.append(cloud)
                ports.append(port)
            sink_port = free_port()
            sink = subprocess.Popen([sys.executable, str(SINK), str(sink_port)])
            started.append(sink)
            Soak.wait(lambda: sink_count(sink_port) is not None, "sink", sink)

            began = time.monotonic()
            offer = run_async(ingest(ports, messages))
            ingest_seconds = time.monotonic() - began

            began = time.monotonic()
            for number in range(CONNECTORS):
                name = f"scale-{number}"
                started.append(
                    start_connector(workdir, name, ports[number % len(ports)], sink_port)
                )
            counts = wait_delivered(sink_port, offer.accepted, stall=60)
            drain_seconds = time.monotonic() - began
        finally:
            for process in reversed(started):
                stop(process)
    return {
        "layout": layout,
        "accepted": offer.accepted,
        "ingest_per_s": round(offer.answered / ingest_seconds),
        "delivered": counts["unique"],
        "duplicates": counts["duplicates"],
        "drain_per_s": round(counts["unique"] / drain_seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    args = parser.parse_args()
    results = []
    print(
        f"scale: {args.messages:,} POSTs closed loop ({CONCURRENCY} connections), then "
        f"{CONNECTORS} connectors drain them (Redis storage, 1 KB JSON)"
    )
    print(f"  {'layout':28s} {'ingest req/s':>12s} {'drain msg/s':>12s}  delivered / accepted")
    for layout in args.layouts.split(","):
        result = run_layout(layout, args.messages)
        results.append(result)
        print(
            f"  {LAYOUTS[layout]:28s} {result['ingest_per_s']:12,d} {result['drain_per_s']:12,d}  "
            f"{result['delivered']:,} / {result['accepted']:,} "
            f"(duplicates {result['duplicates']})",
            flush=True,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
