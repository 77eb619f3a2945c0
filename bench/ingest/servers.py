"""The processes under test: the cloud and a redis-server, on free loopback ports.

Each is started by us, waited on with a deadline, and stopped by its PID; nothing else.
:func:`foreign_cpu_seconds` tells how much CPU the rest of the machine took meanwhile.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
SERVER_CPU = 0
LOADGEN_CPU = 1
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def pin_processes() -> tuple[str, list[str], list[str]]:
    """Pin this process (the load generator) to LOADGEN_CPU.

    Return a description of the pinning and the command prefixes that put the cloud on
    SERVER_CPU (a core of its own: "one uvicorn worker") and redis-server beside the load
    generator on LOADGEN_CPU; all empty-handed when this machine cannot do it.
    """
    taskset = shutil.which("taskset")
    if {SERVER_CPU, LOADGEN_CPU} <= os.sched_getaffinity(0) and taskset is not None:
        os.sched_setaffinity(0, {LOADGEN_CPU})
        return (
            f"cloud on CPU {SERVER_CPU} (taskset); redis-server and the load generator "
            f"(wrk, python) on CPU {LOADGEN_CPU}",
            [taskset, "-c", str(SERVER_CPU)],
            [taskset, "-c", str(LOADGEN_CPU)],
        )
    return "none: needs CPUs 0 and 1 and taskset", [], []


def wait_until(condition: Callable[[], bool], what: str, process: subprocess.Popen[bytes]) -> None:
    """Poll ``condition`` until it holds; fail if ``process`` exits or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            if condition():
                return
        except OSError:  # not listening yet
            pass
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {START_TIMEOUT}s")
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a process we started, by its PID; kill it if it does not exit in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)


def start_redis(directory: Path, prefix: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    """Start redis-server with append-only persistence (fsync every second) in ``directory``."""
    port = free_port()
    args = [
        *prefix,
        "/usr/bin/redis-server",
        "--port",
        str(port),
        "--bind",
        HOST,
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--dir",
        str(directory),
        "--daemonize",
        "no",
        "--loglevel",
        "warning",
    ]
    with (directory / "redis.log").open("ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def answers() -> bool:
        with socket.create_connection((HOST, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    try:
        wait_until(answers, f"redis-server on port {port}", process)
    except BaseException:
        stop(process)
        raise
    return process, f"redis://{HOST}:{port}/0"


def start_redis_cluster(
    directory: Path, prefix: list[str], masters: int = 3, replicas: int = 1
) -> tuple[list[subprocess.Popen[bytes]], str]:
    """Start a Redis Cluster (``masters`` masters with ``replicas`` replicas each, the same
    persistence as :func:`start_redis`) joined by ``redis-cli --cluster create``; its
    processes (to stop) and its ``redis+cluster://`` URL."""
    processes: list[subprocess.Popen[bytes]] = []
    ports = []
    try:
        for index in range(masters * (1 + replicas)):
            node = directory / f"node-{index}"
            node.mkdir()
            port = free_port()
            args = [
                *prefix,
                "/usr/bin/redis-server",
                *("--port", str(port), "--bind", HOST, "--save", ""),
                *("--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(node)),
                *("--daemonize", "no", "--loglevel", "warning", "--cluster-enabled", "yes"),
                *("--cluster-config-file", str(node / "nodes.conf")),
                *("--cluster-port", str(free_port()), "--repl-diskless-sync-delay", "0"),
            ]
            with (node / "redis.log").open("ab") as log:
                process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
            processes.append(process)
            ports.append(port)

            def answers(port: int = port) -> bool:
                with socket.create_connection((HOST, port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    return sock.recv(64).startswith(b"+PONG")

            wait_until(answers, f"redis-server on port {port}", process)
        addresses = [f"{HOST}:{port}" for port in ports]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses]
            + ["--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )

        def settled() -> bool:
            for port in ports:
                info = subprocess.run(
                    ["redis-cli", "-p", str(port), "INFO", "replication"],
                    capture_output=True,
                    check=True,
                ).stdout
                state = subprocess.run(
                    ["redis-cli", "-p", str(port), "CLUSTER", "INFO"],
                    capture_output=True,
                    check=True,
                ).stdout
                if b"cluster_state:ok" not in state:
                    return False
                if b"role:master" not in info and b"master_link_status:up" not in info:
                    return False
            return True

        wait_until(settled, "the redis cluster", processes[0])
    except BaseException:
        for process in processes:
            stop(process)
        raise
    return processes, "redis+cluster://" + ",".join(addresses)


def start_cloud(
    storage: str, webhooks: Path, log_path: Path, prefix: list[str]
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``python -m webhook_connect cloud`` and wait until /health answers 200."""
    port = free_port()
    args = [
        *prefix,
        sys.executable,
        "-m",
        "webhook_connect",
        "cloud",
        "--host",
        HOST,
        "--port",
        str(port),
        "--webhooks",
        str(webhooks),
        "--storage",
        storage,
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log_path.open("ab") as log:
        process = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def healthy() -> bool:
        connection = http.client.HTTPConnection(HOST, port, timeout=1)
        try:
            connection.request("GET", "/health")
            return connection.getresponse().status == 200
        except http.client.HTTPException:  # e.g. a half-started server's garbled answer
            return False
        finally:
            connection.close()

    try:
        wait_until(healthy, f"cloud on port {port}", process)
    except BaseException:
        stop(process)
        tail = log_path.read_text(errors="replace")[-2000:]
        print(f"--- cloud log ({log_path}) ---\n{tail}", file=sys.stderr)
        raise
    return process, port


def foreign_cpu_seconds(pids: list[int]) -> float:
    """CPU time used so far, machine-wide, by processes other than us, our children and ``pids``.

    Read it before and after a measurement: other work on the machine competes with the cloud
    and the load generator, and skews the figures. Rough: the kernel charges part of the
    benchmark's own loopback traffic to interrupt time, counted here as foreign.
    """
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as stat:
        user, nice, system, _, _, irq, softirq = (int(f) for f in stat.readline().split()[1:8])
    ours = sum(os.times()[:4])  # this process and the children it waited for (wrk)
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        ours += (int(fields[11]) + int(fields[12])) / tick  # utime, stime of all its threads
    return (user + nice + system + irq + softirq) / tick - ours
