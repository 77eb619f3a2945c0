"""Ingest benchmark: how fast the cloud answers its durable 202 to ``POST /webhook/bench``.

For each storage backend it starts its own cloud (and redis-server) on loopback, posts a
1 KiB JSON body, and prints:

1. max throughput: closed loop, ``--connections`` keep-alive connections with one request
   outstanding each, after a 2 s warm-up; measured by wrk, or by bench.loadgen without wrk —
   once per ``--auth`` method: none, an HMAC-SHA256 body signature (``hmac``) and an HS256
   JWT bearer token (``jwt``), with the cloud's CPU time per request, so the cost of each
   check shows next to the unauthenticated figure;
2. a fixed offered rate: open loop at ``--rate`` req/s with bench.loadgen, latency counted
   from each request's scheduled send time (no coordinated omission), unauthenticated.

    python bench/ingest/run.py --backends sqlite,redis --duration 10 --rate 5000 --connections 64

It is a benchmark, not a test: it asserts nothing beyond the cloud answering at all.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

if not __package__:  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import loadgen
from bench.ingest import servers

HERE = Path(__file__).resolve().parent
WEBHOOKS = HERE / "webhooks.json"
WRK_SCRIPT = HERE / "post.lua"
WRK = Path("/usr/bin/wrk")
BACKENDS = ("sqlite", "redis", "redis-cluster", "rabbitmq")
HOST = servers.HOST
AUTHS = ("none", "hmac", "jwt")
PATHS = {"none": "/webhook/bench", "hmac": "/webhook/bench_hmac", "jwt": "/webhook/bench_jwt"}
BODY_SIZE = 1024
WARMUP = 2  # seconds, before each measurement, not counted
MAX_CONNECTIONS = 256  # open loop: the pool's cap
COLUMNS = (
    "backend",
    "auth",
    "mode",
    "offered",
    "achieved req/s",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "max ms",
    "errors",
    "cloud CPU us/req",
    "other CPU s",
)


def make_body(size: int = BODY_SIZE) -> bytes:
    """A valid JSON document of exactly ``size`` bytes."""
    head, tail = b'{"event":"bench.ingest","id":"evt_000001","data":"', b'"}'
    body = head + b"x" * (size - len(head) - len(tail)) + tail
    json.loads(body)
    return body


def auth_headers(auth: str, body: bytes) -> dict[str, str]:
    """What a sender adds for ``auth``, with the secrets of bench/ingest/webhooks.json."""
    entries = json.loads(WEBHOOKS.read_text())
    if auth == "hmac":
        secret = entries["bench_hmac"]["hmac"]["secret"].encode()
        signature = hmac.new(secret, body, hashlib.sha256).hexdigest()
        return {"X-Hub-Signature-256": f"sha256={signature}"}
    if auth == "jwt":
        import jwt as pyjwt

        config = entries["bench_jwt"]["jwt"]
        claims = {"iss": config["issuer"], "aud": config["audience"], "sub": "bench"}
        claims["exp"] = int(time.time()) + 86400
        return {"Authorization": "Bearer " + pyjwt.encode(claims, config["secret"], "HS256")}
    return {}


def check_ingest(port: int, body: bytes, path: str, headers: dict[str, str]) -> None:
    """Fail early, with the cloud's answer, unless one POST is accepted."""
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json", **headers})
        response = connection.getresponse()
        answer = response.read()
    finally:
        connection.close()
    if response.status != loadgen.ACCEPTED:
        raise RuntimeError(f"POST {path} answered {response.status}: {answer[:500]!r}")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(
    port: int,
    connections: int,
    seconds: int,
    body_file: Path,
    path: str,
    headers: dict[str, str],
) -> dict[str, Any]:
    """Run wrk once and return the figures its ``done()`` hook prints (post.lua)."""
    args = [str(WRK), "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    args += ["--timeout", "10s", "-s", str(WRK_SCRIPT), f"http://{HOST}:{port}{path}"]
    env = {**os.environ, "BENCH_BODY_FILE": str(body_file)}
    env["BENCH_HEADERS"] = "\n".join(f"{name}: {value}" for name, value in headers.items())
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH "):
            return dict(json.loads(line.removeprefix("BENCH ")))
    raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")


def measure_max(
    port: int, cloud_pid: int, connections: int, duration: int, body_file: Path, auth: str
) -> dict[str, Any]:
    """Closed loop: the most the cloud answers with ``connections`` requests in flight."""
    path, headers = PATHS[auth], auth_headers(auth, body_file.read_bytes())
    if not WRK.exists():
        body = body_file.read_bytes()
        request = loadgen.build_post(HOST, port, path, body, "application/json", headers)
        coroutine = loadgen.run_closed_loop(HOST, port, request, connections, duration, WARMUP)
        return {"tool": "python", "connections": connections, **loadgen.run(coroutine).summary()}
    wrk(port, connections, WARMUP, body_file, path, headers)  # warm-up, discarded
    cpu_before = cpu_seconds(cloud_pid)
    figures = wrk(port, connections, duration, body_file, path, headers)
    cloud_cpu = cpu_seconds(cloud_pid) - cpu_before
    return {
        "tool": "wrk",
        "mode": "closed",
        "offered_rate": None,
        "duration_s": duration,
        "achieved_rate": round(figures["requests"] / (figures["duration_us"] / 1e6), 1),
        "sent": figures["requests"],
        "answered": figures["requests"],
        "non_202": figures["non_202"],
        "failed": figures["socket_errors"],
        "connections": connections,
        "cloud_cpu_us_per_request": round(cloud_cpu / max(figures["requests"], 1) * 1e6, 1),
        **{f"{key}_ms": figures[f"{key}_us"] / 1000 for key in ("p50", "p99", "p999", "max")},
    }


def measure_rate(port: int, rate: int, duration: int, body: bytes, spin: bool) -> dict[str, Any]:
    """Open loop: latency while ``rate`` req/s are offered whatever the answers."""
    request = loadgen.build_post(HOST, port, PATHS["none"], body, "application/json")
    coroutine = loadgen.run_open_loop(
        HOST, port, request, rate, duration, MAX_CONNECTIONS, warmup=WARMUP, spin=spin
    )
    return {"tool": "python", **loadgen.run(coroutine).summary()}


def bench_backend(
    backend: str,
    args: argparse.Namespace,
    prefixes: tuple[list[str], list[str]],
    body_file: Path,
) -> list[dict[str, Any]]:
    """Start a fresh cloud on ``backend``, measure it, stop everything that was started."""
    body = body_file.read_bytes()
    with tempfile.TemporaryDirectory(prefix=f"bench-ingest-{backend}-") as tmp:
        directory = Path(tmp)
        started: list[subprocess.Popen[bytes]] = []
        cleanup = contextlib.ExitStack()
        try:
            if backend == "redis":
                redis, storage = servers.start_redis(directory, prefixes[1])
                started.append(redis)
            elif backend == "redis-cluster":  # 3 masters + 3 replicas
                nodes, storage = servers.start_redis_cluster(directory, prefixes[1])
                started.extend(nodes)
            elif backend == "rabbitmq":  # the messages in RabbitMQ, the registry in Redis
                redis, registry = servers.start_redis(directory, prefixes[1])
                started.append(redis)
                broker = cleanup.enter_context(rabbitmq(directory, prefixes[1]))
                storage = f"{broker}?registry={quote(registry, safe='')}"
            else:
                storage = f"sqlite:///{directory / 'bench.db'}"
            cloud, port = servers.start_cloud(
                storage, WEBHOOKS, directory / "cloud.log", prefixes[0]
            )
            started.append(cloud)
            pids = [process.pid for process in started]
            rows = []
            for auth in args.auth:
                check_ingest(port, body, PATHS[auth], auth_headers(auth, body))
                print(
                    f"{backend}: closed loop, auth {auth}, {args.connections} connections, "
                    f"{args.duration} s"
                )
                before = servers.foreign_cpu_seconds(pids)
                rows.append(
                    measure_max(port, cloud.pid, args.connections, args.duration, body_file, auth)
                )
                rows[-1]["other_cpu_s"] = round(servers.foreign_cpu_seconds(pids) - before, 1)
                rows[-1]["auth"] = auth
            print(f"{backend}: open loop, {args.rate} req/s, {args.duration} s")
            before = servers.foreign_cpu_seconds(pids)
            # Spin for a precise schedule only when nothing shares the generator's CPU.
            spin = bool(prefixes[0]) and backend == "sqlite"
            rows.append(measure_rate(port, args.rate, args.duration, body, spin=spin))
            rows[-1]["other_cpu_s"] = round(servers.foreign_cpu_seconds(pids) - before, 1)
            rows[-1]["auth"] = "none"
            if cloud.poll() is not None:
                raise RuntimeError(f"the cloud exited during the run ({cloud.returncode})")
        finally:
            for process in reversed(started):
                servers.stop(process)
            cleanup.close()
    return [{"backend": backend, **row} for row in rows]


@contextlib.contextmanager
def rabbitmq(directory: Path, prefix: list[str]) -> Iterator[str]:
    """A private rabbitmq-server node (the test suite's), stopped by PID, on the CPU of
    redis-server and the load generator when ``prefix`` pins them; yields its URL."""
    from tests.servers import RabbitMQServer

    server = RabbitMQServer(directory / "rabbitmq")
    try:
        server.start()
        if prefix:  # [taskset, -c, CPU]: every thread of the Erlang VM, after the fact
            vm = (server.directory / "vm.pid").read_text().strip()
            subprocess.run(
                [prefix[0], "-a", "-p", "-c", prefix[-1], vm], check=True, stdout=subprocess.DEVNULL
            )
        yield server.url
    finally:
        server.close()


def format_table(rows: list[dict[str, Any]]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines: list[tuple[str, ...]] = [COLUMNS]
    for row in rows:
        offered = (
            f"{row['connections']} conn" if row["mode"] == "closed" else f"{row['offered_rate']}/s"
        )
        cpu = row.get("cloud_cpu_us_per_request")
        lines.append(
            (
                row["backend"],
                row["auth"],
                f"{row['mode']} ({row['tool']})",
                offered,
                f"{row['achieved_rate']:.0f}",
                ms(row["p50_ms"]),
                ms(row["p99_ms"]),
                ms(row["p999_ms"]),
                ms(row["max_ms"]),
                str(row["non_202"] + row["failed"]),
                "-" if cpu is None else f"{cpu:.0f}",
                f"{row['other_cpu_s']:.1f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--rate", type=int, default=5000, help="open loop: offered req/s")
    parser.add_argument("--connections", type=int, default=64, help="closed loop: in flight")
    parser.add_argument("--auth", default=",".join(AUTHS), help="closed loop: comma-separated")
    args = parser.parse_args(argv)
    args.auth = [name.strip() for name in args.auth.split(",") if name.strip()]
    if set(args.auth) - set(AUTHS):
        parser.error(f"unknown --auth; choose from {AUTHS}")
    args.backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(sorted(unknown))}; choose from {BACKENDS}")
    return args


def terminate(signum: int, frame: FrameType | None) -> None:
    """Handle SIGTERM as Ctrl-C, so the finally blocks stop the servers we started.

    Delegate to the current SIGINT handler: inside the event loop that is asyncio.Runner's,
    which cancels the main task; a KeyboardInterrupt raised in a protocol callback would be
    swallowed by the transport.
    """
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, terminate)
    pinning, cloud_prefix, redis_prefix = servers.pin_processes()
    prefix = cloud_prefix
    try:
        import uvloop  # noqa: F401
    except ImportError:
        event_loop = "asyncio"
    else:
        event_loop = "uvloop"
    # The open loop spins for a precise schedule only on a CPU of its own.
    timing = "spinning (sqlite), sleeping ~1 ms batches (redis)" if prefix else "sleeping"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"pinning: {pinning}")
    print(
        f"closed loop: {'wrk' if WRK.exists() else 'python'}; open loop: python on "
        f"{event_loop}, {timing}; body {BODY_SIZE} B JSON; warm-up {WARMUP} s"
    )
    print(f"load average before start: {load}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        body_file = Path(tmp) / "body.json"
        body_file.write_bytes(make_body())
        try:
            for backend in args.backends:
                rows += bench_backend(backend, args, (cloud_prefix, redis_prefix), body_file)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    print()
    print(format_table(rows))
    print("other CPU s: CPU time taken meanwhile by other processes; far from 0, it skews the row")
    summary = {"benchmark": "ingest", "body_bytes": BODY_SIZE, "warmup_s": WARMUP}
    summary |= {"pinning": pinning, "event_loop": event_loop, "open_loop_timing": timing}
    summary |= {"load_average": load, "results": rows}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
