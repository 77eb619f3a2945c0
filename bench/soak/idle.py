"""Idle connectors: the cloud's memory per open connection, by transport.

For each transport (WebSocket, SSE, long-poll): a redis-server (append-only) and one cloud
process; a warm-up of a few connections opened and closed (so imports, caches and pools are
paid for); the cloud's RSS as the baseline; then idle connectors opened up to each count
(1,000 then 10,000 by default) from one separate client process (``idleclient.py``, bare
asyncio protocols that speak what the connector speaks), held for ``--settle`` seconds
(pings, heartbeats, liveness checks and re-polls run meanwhile), and the cloud's RSS again.
Prints KB per connection, how many the cloud dropped, and the cloud's CPU while they idle.

    python bench/soak/idle.py [--counts 1000,10000] [--transports websocket,sse,long_poll]
                              [--per-channel 100] [--settle 15] [--opening 50] [--tracemalloc]
                              [--keep]

Connectors are spread over channels of ``--per-channel`` each (one token per channel, as
deployments have); ``--per-channel 10000`` puts them all on one. ``--tracemalloc`` runs the
cloud under tracemalloc (``tracedcloud.py``) and prints where the memory went (slower, and
its RSS is not the figure to report); ``--keep`` keeps each run's directory (the cloud's and
the client's logs) and prints where. Everything listens on 127.0.0.1 and is stopped by PID.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.ingest.servers import REPO, start_redis, stop
from bench.soak.rig import rss_kb, start_cloud

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")
SOURCES = 8  # client source addresses 127.0.0.2-9
WARM_UP = 200


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class IdleClients:
    """The client process: commands in, a status line per second out."""

    def __init__(
        self, transport: str, port: int, channels: Path, log: Path, opening: int = 200
    ) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "idleclient.py"),
                transport,
                str(port),
                str(channels),
                str(SOURCES),
                str(opening),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("ab"),
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.status: dict[str, Any] = {"connected": 0, "opened": 0, "closed": 0, "errors": {}}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.status = json.loads(line)

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()

    def wait_connected(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.status["connected"] < count:
            if self.process.poll() is not None:
                raise RuntimeError(f"the client process exited: {self.status}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{count} connectors not connected in {timeout:.0f} s: {self.status}"
                )
            time.sleep(0.2)

    def wait_closed(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.status["opened"] or self.status["connected"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"connectors not closed: {self.status}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            stop(self.process)


def steady_rss(pid: int, seconds: float) -> tuple[int, float]:
    """The cloud's RSS (KiB, median of the last five samples a second apart) after
    ``seconds``, and its CPU share meanwhile."""
    cpu_before, started = cpu_seconds(pid), time.monotonic()
    samples = []
    while True:
        samples.append(rss_kb(pid))
        if time.monotonic() - started >= seconds:
            break
        time.sleep(1)
    share = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - started)
    return int(statistics.median(samples[-5:])), share


def write_webhooks(directory: Path, channels: int, per_channel: int) -> Path:
    """``channels`` channels, one token each, room for ``per_channel`` live connections."""
    webhooks, tokens = {}, []
    for number in range(channels):
        name, token = f"idle{number}", f"idle-token-{number:05d}-0123456789"
        webhooks[name] = {
            "module": "webhook_connect",
            "module-config": {
                "channel": name,
                "channel_token": token,
                "max_connections": per_channel + 100,
            },
        }
        tokens.append([name, token])
    (directory / "webhooks.json").write_text(json.dumps(webhooks))
    (directory / "channels.json").write_text(json.dumps(tokens))
    return directory / "webhooks.json"


class Snapshots:
    """tracemalloc snapshots of the traced cloud, taken on SIGUSR1."""

    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self.taken = 0

    def take(self, pid: int) -> Path:
        path = Path(f"{self.prefix}.{self.taken}")
        self.taken += 1
        os.kill(pid, 10)  # SIGUSR1
        deadline = time.monotonic() + 120
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("no tracemalloc snapshot")
            time.sleep(0.2)
        return path


def print_growth(before: Path, after: Path, count: int, top: int = 25) -> None:
    import tracemalloc

    old = tracemalloc.Snapshot.load(str(before))
    new = tracemalloc.Snapshot.load(str(after))
    stats = new.compare_to(old, "lineno")
    total = sum(s.size_diff for s in stats)
    files: dict[str, int] = {}
    for stat in stats:
        name = stat.traceback[0].filename.replace(str(REPO) + "/", "").split("site-packages/")[-1]
        files[name] = files.get(name, 0) + stat.size_diff
    biggest = sorted(files.items(), key=lambda item: -item[1])[:12]
    print("    by file: " + ", ".join(f"{name} {size / count:.0f} B" for name, size in biggest))
    print(f"    traced Python memory: +{total / count:.0f} B per connection; largest:")
    for stat in stats[:top]:
        frame = stat.traceback[0]
        where = f"{frame.filename.replace(str(REPO) + '/', '')}:{frame.lineno}"
        print(
            f"      {stat.size_diff / count:8.0f} B {stat.count_diff / count:6.2f} blocks  {where}"
        )


def run_transport(transport: str, args: argparse.Namespace) -> dict[str, Any]:
    counts = [int(c) for c in args.counts.split(",")]
    most = max(counts)
    channels = max(1, -(-most // args.per_channel))
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as scratch:
        if args.keep:
            directory = Path(tempfile.mkdtemp(prefix=f"bench-idle-{transport}-"))
            print(f"{transport}: logs kept in {directory}", flush=True)
        else:
            directory = Path(
                scratch.enter_context(
                    tempfile.TemporaryDirectory(prefix=f"bench-idle-{transport}-")
                )
            )
        started: list[subprocess.Popen[bytes]] = []
        clients: IdleClients | None = None
        try:
            redis, storage = start_redis(directory, [])
            started.append(redis)
            webhooks = write_webhooks(directory, channels, args.per_channel)
            entry: tuple[str, ...] = ("-m", "webhook_connect")
            env = {}
            snapshots = None
            if args.tracemalloc:
                entry = (str(HERE / "tracedcloud.py"),)
                env["WC_SNAPSHOT_PREFIX"] = str(directory / "snapshot")
                snapshots = Snapshots(directory / "snapshot")
            cloud, port = start_cloud(
                storage,
                webhooks,
                directory / "cloud.log",
                ["--max-open-connections", str(most + 1000)],
                env=env,
                entry=entry,
            )
            started.append(cloud)
            # Under tracemalloc the cloud is several times slower: open fewer at once.
            opening = 20 if args.tracemalloc else args.opening
            clients = IdleClients(
                transport, port, directory / "channels.json", directory / "client.log", opening
            )
            clients.send(f"open {WARM_UP}")
            clients.wait_connected(WARM_UP, 60)
            clients.send("close")
            clients.wait_closed()
            base, idle_cpu = steady_rss(cloud.pid, args.settle / 2)
            baseline = snapshots.take(cloud.pid) if snapshots else None
            print(
                f"{transport}: cloud RSS after warm-up {base / 1024:.1f} MiB "
                f"(CPU {idle_cpu:.0%}); {channels} channels of up to {args.per_channel}",
                flush=True,
            )
            for count in counts:
                began = time.monotonic()
                clients.send(f"open {count}")
                clients.wait_connected(count, 60 + count / 20)
                opened_in = time.monotonic() - began
                rss, cpu = steady_rss(cloud.pid, args.settle)
                status = clients.status
                per = (rss - base) / count
                results[str(count)] = {
                    "rss_kb": rss,
                    "kb_per_connection": round(per, 1),
                    "connected": status["connected"],
                    "dropped": status["closed"],
                    "errors": status["errors"],
                    "open_seconds": round(opened_in, 1),
                    "cloud_cpu_idle": round(cpu, 3),
                }
                print(
                    f"  {count:6d} idle: cloud RSS {rss / 1024:.1f} MiB, "
                    f"{per:.1f} KB per connection; still connected {status['connected']}, "
                    f"dropped {status['closed']}, errors {status['errors']}; "
                    f"opened in {opened_in:.1f} s; cloud CPU while idle {cpu:.0%}",
                    flush=True,
                )
                if snapshots and baseline:
                    print_growth(baseline, snapshots.take(cloud.pid), count)
        finally:
            if clients is not None:
                clients.stop()
            for process in reversed(started):
                stop(process)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1000,10000")
    parser.add_argument("--transports", default="websocket,sse,long_poll")
    parser.add_argument("--per-channel", type=int, default=100)
    parser.add_argument("--settle", type=float, default=15.0)
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument(
        "--keep", action="store_true", help="keep each run's directory (cloud and client logs)"
    )
    # Each connect costs the cloud a few storage round trips; on a busy 2-core machine more at
    # once than this starve the cloud's other work (and some connectors are refused 4503).
    parser.add_argument("--opening", type=int, default=50, help="connections opened at once")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the cloud
    everything = {}
    for transport in args.transports.split(","):
        everything[transport] = run_transport(transport, args)
    print(json.dumps(everything))


if __name__ == "__main__":
    main()
