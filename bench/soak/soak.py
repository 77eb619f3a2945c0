"""Soak: a million messages through one cloud and one connector at a steady rate, with the
RSS of both sampled every second.

A redis-server (append-only, fsync every second) or an SQLite file, one cloud process, one
connector subprocess (``webhook-connect connector``, WebSocket unless ``--protocol``) and the
relay benchmark's sink (``bench/relay/sink.py``); an open-loop sender posts 1 KB JSON webhooks
at ``--rate`` per second until ``--messages`` were sent. The RSS of the cloud (with any worker
processes) and of the connector goes to a CSV every second. At the end it prints the RSS after
the warm-up, at the end, the change, and accepted / delivered / lost / duplicates (by message
id, at the sink).

    python bench/soak/soak.py [--messages 1000000] [--rate 3000] [--backend redis|sqlite]
                              [--protocol websocket] [--warm-up 60] [--csv soak-rss.csv]
                              [--tracemalloc]

It stops by itself: when every accepted message has arrived, or when nothing has arrived for
``--stall`` seconds. Whatever it started is stopped by PID, on Ctrl-C or a failure too.
``--tracemalloc`` runs the connector under tracemalloc (``tracedconnector.py``) and prints
what grew between the end of the warm-up and the end of the run: Python allocations by
traceback, gc-tracked objects by type and glibc's heap (in use against free), which tell kept
objects from a fragmented heap. Tracing slows the connector: its RSS is not the figure to
report. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.ingest.servers import HOST, REPO, free_port, start_redis, stop
from bench.relay.run import Offer, run_async
from bench.soak.idle import Snapshots
from bench.soak.rig import Sampler, start_cloud

HERE = Path(__file__).resolve().parent
SINK = REPO / "bench" / "relay" / "sink.py"
TOKEN = "soak-token-0123456789abcdef"


def sink_count(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/__count", timeout=10) as answer:
        return dict(json.loads(answer.read()))


class Soak:
    """The processes of one run, started in order and stopped in reverse, by PID."""

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.workdir = workdir
        self.args = args
        self.started: list[subprocess.Popen[bytes]] = []
        self.snapshots = Snapshots(workdir / "snapshot") if args.tracemalloc else None

    def start(self) -> tuple[int, int, int]:
        """Storage, cloud, sink and connector; returns (cloud pid, connector pid, cloud port)."""
        workdir, args = self.workdir, self.args
        if args.backend == "redis":
            redis, storage = start_redis(workdir, [])
            self.started.append(redis)
        else:
            storage = f"sqlite:///{workdir / 'soak.db'}"
        webhooks = workdir / "webhooks.json"  # webhook "bench": the path relay's Offer posts to
        module_config = {
            "channel": "soak",
            "channel_token": TOKEN,
            "max_queue_size": 10_000_000,
            "max_in_flight": args.max_in_flight,
        }
        webhooks.write_text(
            json.dumps({"bench": {"module": "webhook_connect", "module-config": module_config}})
        )
        cloud, self.cloud_port = start_cloud(storage, webhooks, workdir / "cloud.log")
        self.started.append(cloud)
        self.sink_port = free_port()
        sink = subprocess.Popen([sys.executable, str(SINK), str(self.sink_port)])
        self.started.append(sink)
        self.wait(lambda: bool(sink_count(self.sink_port) is not None), "sink", sink)
        connector = self.start_connector()
        return cloud.pid, connector.pid, self.cloud_port

    def start_connector(self) -> subprocess.Popen[bytes]:
        config = self.workdir / "connector.json"
        config.write_text(
            json.dumps(
                {
                    "cloud_url": f"http://{HOST}:{self.cloud_port}",
                    "protocol": self.args.protocol,
                    "channel": "soak",
                    "token": TOKEN,
                    "max_concurrent_requests": self.args.max_concurrent,
                    "state_dir": str(self.workdir / "state"),
                    "default_target": {"url": f"http://{HOST}:{self.sink_port}/"},
                }
            )
        )
        log_path = self.workdir / "connector.log"
        entry = ["-m", "webhook_connect"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if self.snapshots is not None:
            entry = [str(HERE / "tracedconnector.py")]
            env["WC_SNAPSHOT_PREFIX"] = str(self.snapshots.prefix)
        with log_path.open("ab") as log:
            connector = subprocess.Popen(
                [sys.executable, *entry, "connector", "--config", str(config)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started.append(connector)
        self.wait(lambda: "connected to" in log_path.read_text(), "connector", connector)
        return connector

    @staticmethod
    def wait(ready: Any, what: str, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                if ready():
                    return
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        for process in reversed(self.started):
            stop(process)


def wait_delivered(port: int, accepted: int, stall: float) -> dict[str, int]:
    """Sink counts once ``accepted`` unique messages arrived, or nothing came for ``stall`` s."""
    last, progress_at = -1, time.monotonic()
    while True:
        counts = sink_count(port)
        if counts["unique"] >= accepted:
            return counts
        if counts["unique"] != last:
            last, progress_at = counts["unique"], time.monotonic()
        elif time.monotonic() - progress_at > stall:
            return counts
        time.sleep(1)


def window(rows: list[tuple[float, dict[str, int]]], start: float, name: str) -> int:
    """Median RSS of ``name`` over the five samples from ``start`` seconds on."""
    values = [sample[name] for at, sample in rows if at >= start][:5]
    return int(statistics.median(values)) if values else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=3000)
    parser.add_argument("--backend", choices=("redis", "sqlite"), default="redis")
    parser.add_argument("--protocol", default="websocket")
    parser.add_argument(
        "--warm-up", type=float, default=60.0, help="seconds (at most 20%% of the run)"
    )
    parser.add_argument("--stall", type=float, default=120.0)
    parser.add_argument("--csv", default="soak-rss.csv")
    parser.add_argument("--max-concurrent", type=int, default=32)
    parser.add_argument("--max-in-flight", type=int, default=200)
    parser.add_argument("--tracemalloc", action="store_true", help="trace the connector")
    args = parser.parse_args()
    duration = args.messages / args.rate
    warm_up = min(args.warm_up, duration * 0.2)
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        run = Soak(Path(tmp), args)
        try:
            cloud_pid, connector_pid, port = run.start()
            csv_path = Path(args.csv).resolve()
            with Sampler({"cloud": cloud_pid, "connector": connector_pid}, csv_path) as sampler:
                print(
                    f"soak: {args.messages:,} messages at {args.rate:,.0f}/s ({duration:.0f} s), "
                    f"{args.backend}, {args.protocol}; RSS every second to {csv_path}",
                    flush=True,
                )
                offer = Offer(port)
                sending_started = time.monotonic() - sampler.started
                traced: list[Path] = []
                if run.snapshots is not None:
                    snapshots = run.snapshots
                    timer = threading.Timer(
                        warm_up, lambda: traced.append(snapshots.take(connector_pid))
                    )
                    timer.start()
                run_async(offer.at_rate(args.rate, duration))
                sent_for = time.monotonic() - sampler.started - sending_started
                counts = wait_delivered(run.sink_port, offer.accepted, args.stall)
                finished = time.monotonic() - sampler.started
                time.sleep(5)  # five samples after the last delivery
            report(args, offer, counts, sampler, sending_started, warm_up, sent_for, finished)
            if run.snapshots is not None and traced:
                print_growth(traced[0], run.snapshots.take(connector_pid))
        finally:
            run.stop()


def print_growth(before: Path, after: Path, top: int = 15) -> None:
    """What the traced connector grew between two snapshots: Python allocations by
    traceback (the innermost frames), gc-tracked objects by type, glibc's heap."""
    import tracemalloc

    print("  connector from the warm-up to the end:")
    if before.stat().st_size and after.stat().st_size:  # empty: WC_TRACE_FRAMES=0
        old = tracemalloc.Snapshot.load(str(before))
        new = tracemalloc.Snapshot.load(str(after))
        stats = new.compare_to(old, "traceback")
        total = sum(stat.size_diff for stat in stats)
        print(f"    traced Python memory {total / 1024:+.0f} KiB; largest changes:")
        for stat in sorted(stats, key=lambda stat: -abs(stat.size_diff))[:top]:
            print(f"    {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+8d} blocks")
            for frame in list(stat.traceback)[-6:]:  # the innermost frames
                where = frame.filename.replace(str(REPO) + "/", "").split("site-packages/")[-1]
                print(f"        {where}:{frame.lineno}")
    first = json.loads(Path(f"{before}.json").read_text())
    last = json.loads(Path(f"{after}.json").read_text())
    names = set(first["objects"]) | set(last["objects"])
    grown = sorted(
        ((last["objects"].get(n, 0) - first["objects"].get(n, 0), n) for n in names), reverse=True
    )
    print("    gc-tracked objects: " + ", ".join(f"{n} {d:+,}" for d, n in grown[:8] if d))
    blocks = last["pymalloc_blocks"] - first["pymalloc_blocks"]
    print(f"    Python memory blocks in use: {last['pymalloc_blocks']:,} ({blocks:+,})")
    for key in last["heap"]:
        change = (last["heap"][key] - first["heap"][key]) / 1024
        print(f"    glibc heap {key}: {last['heap'][key] / 1024:,.0f} KiB ({change:+,.0f})")


def report(
    args: argparse.Namespace,
    offer: Offer,
    counts: dict[str, int],
    sampler: Sampler,
    sending_started: float,
    warm_up: float,
    sent_for: float,
    finished: float,
) -> None:
    rows = sampler.rows
    figures: dict[str, Any] = {
        "messages": args.messages,
        "rate": args.rate,
        "backend": args.backend,
        "protocol": args.protocol,
        "sent": offer.sent,
        "accepted": offer.accepted,
        "delivered": counts["unique"],
        "lost": offer.accepted - counts["unique"],
        "duplicates": counts["duplicates"],
        "achieved_rate": round(offer.answered / max(sent_for, 1e-9)),
        "delivered_by_s": round(finished - sending_started, 1),
    }
    for name in ("cloud", "connector"):
        warm = window(rows, sending_started + warm_up, name)
        end = window(rows, finished, name)
        peak = max(sample[name] for _, sample in rows)
        figures[name] = {
            "rss_after_warm_up_kb": warm,
            "rss_end_kb": end,
            "change_pct": round((end - warm) / warm * 100, 1) if warm else None,
            "rss_max_kb": peak,
        }
        print(
            f"  {name:9s} RSS after warm-up ({warm_up:.0f} s) {warm / 1024:.1f} MiB, "
            f"end {end / 1024:.1f} MiB ({figures[name]['change_pct']:+.1f} %), "
            f"max {peak / 1024:.1f} MiB"
        )
    print(
        f"  sent {offer.sent:,}, accepted {offer.accepted:,} ({figures['achieved_rate']:,}/s "
        f"answered), delivered {counts['unique']:,}, lost {figures['lost']:,}, "
        f"duplicates {counts['duplicates']:,}; all delivered {figures['delivered_by_s']} s "
        "after the first send"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
