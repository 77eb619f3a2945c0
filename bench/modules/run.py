"""Module benchmark: a backlog in the cloud -> one connector in module mode -> a real server.

For each module: the cloud (Redis storage) holds N messages (1 KB JSON), then one connector
starts with ``webhooks_config`` naming that module and drains them; the figure is messages per
second until the server holds all N (counted there: rows, queue depth, stream length, files),
and the connector's CPU time per message.

    python bench/modules/run.py [--modules postgresql,rabbitmq,redis,file] [--messages 20000]
                                [--concurrency 100]

Servers are started here on free loopback ports (the same classes the tests use) and stopped
by PID. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.ingest.servers import start_cloud, start_redis, stop  # noqa: E402
from bench.relay.run import TOKEN, Offer, cpu_seconds, run_async  # noqa: E402

HOST = "127.0.0.1"


@contextmanager
def postgresql(workdir: Path) -> Iterator[tuple[dict[str, Any], Callable[[], int]]]:
    import asyncpg

    from tests.modules.test_postgresql import PostgresServer

    server = PostgresServer()
    server.start()
    settings = {
        "type": "postgresql",
        "host": HOST,
        "port": server.port,
        "user": "postgres",
        "database": "postgres",
        "pool_max_size": 8,
    }

    async def count() -> int:
        connection = await asyncpg.connect(host=HOST, port=server.port, user="postgres")
        try:
            return int(await connection.fetchval("SELECT count(*) FROM webhook_events"))
        except asyncpg.UndefinedTableError:
            return 0
        finally:
            await connection.close()

    try:
        yield (
            {
                "connection": settings,
                "module": "postgresql",
                "module-config": {"table": "webhook_events"},
            },
            lambda: asyncio.run(count()),
        )
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


@contextmanager
def rabbitmq(workdir: Path) -> Iterator[tuple[dict[str, Any], Callable[[], int]]]:
    import aio_pika

    from tests.servers import RabbitMQServer

    server = RabbitMQServer(workdir / "rabbitmq")
    server.start()

    async def count() -> int:
        connection = await aio_pika.connect(server.url)
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue("webhooks", durable=True, passive=True)
            return int(queue.declaration_result.message_count or 0)
        except aio_pika.exceptions.ChannelClosed:
            return 0
        finally:
            await connection.close()

    try:
        yield (
            {
                "connection": {"type": "rabbitmq", "host": HOST, "port": server.port},
                "module": "rabbitmq",
                "module-config": {"queue_name": "webhooks"},
            },
            lambda: asyncio.run(count()),
        )
    finally:
        server.close()


@contextmanager
def redis(workdir: Path) -> Iterator[tuple[dict[str, Any], Callable[[], int]]]:
    import redis as redis_client

    (workdir / "redis-target").mkdir()
    process, url = start_redis(workdir / "redis-target", [])
    client = redis_client.Redis.from_url(url)
    try:
        yield (
            {
                "connection": {"type": "redis", "url": url},
                "module": "redis_publish",
                "module-config": {"channel": "webhooks", "mode": "stream"},
            },
            lambda: int(client.xlen("webhooks")),
        )
    finally:
        client.close()
        stop(process)


@contextmanager
def file(workdir: Path) -> Iterator[tuple[dict[str, Any], Callable[[], int]]]:
    target = workdir / "files"
    yield (
        {"connection": None, "module": "save_to_disk", "module-config": {"path": str(target)}},
        lambda: sum(1 for _ in target.iterdir()) if target.exists() else 0,
    )


TARGETS = {"postgresql": postgresql, "rabbitmq": rabbitmq, "redis": redis, "file": file}


def drain(name: str, messages: int, concurrency: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"wc-bench-{name}-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        redis_process, url = start_redis(workdir, [])
        processes.append(redis_process)
        webhooks = workdir / "webhooks.json"
        channel = {
            "channel": "bench",
            "channel_token": TOKEN,
            "max_queue_size": 10_000_000,
            "max_in_flight": max(concurrency * 2, 100),
        }
        webhooks.write_text(
            json.dumps({"bench": {"module": "webhook_connect", "module-config": channel}})
        )
        cloud, port = start_cloud(url, webhooks, workdir / "cloud.log", [])
        processes.append(cloud)
        offer = Offer(port)
        run_async(offer.as_fast_as_possible(messages))
        assert offer.accepted == messages, f"only {offer.accepted} of {messages} accepted"
        with TARGETS[name](workdir) as (step, count):
            connection = step.pop("connection")
            if connection is not None:
                (workdir / "connections.json").write_text(json.dumps({"target": connection}))
                step["connection"] = "target"
            (workdir / "hooks.json").write_text(json.dumps({"bench": step}))
            settings = {
                "cloud_url": f"http://{HOST}:{port}",
                "channel": "bench",
                "token": TOKEN,
                "max_concurrent_requests": concurrency,
                "state_dir": str(workdir / "state"),
                "webhooks_config": "hooks.json",
            }
            if connection is not None:
                settings["connections_config"] = "connections.json"
            (workdir / "connector.json").write_text(json.dumps(settings))
            log = (workdir / "connector.log").open("ab")
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            connector = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "webhook_connect",
                    "connector",
                    "--config",
                    str(workdir / "connector.json"),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            processes.append(connector)
            started = time.time()
            deadline = started + 300
            held = 0
            while held < messages:
                if time.time() > deadline or connector.poll() is not None:
                    tail = (workdir / "connector.log").read_text()[-2000:]
                    raise RuntimeError(f"{name}: {held} of {messages} stored\n{tail}")
                time.sleep(0.1)
                held = count()
            elapsed = time.time() - started
            cpu = cpu_seconds(connector.pid)
            stop(connector)
            processes.remove(connector)
        return {
            "messages": held,
            "msg_per_s": held / elapsed,
            "connector_cpu_us_per_msg": cpu / held * 1e6,
        }
    finally:
        for process in reversed(processes):
            stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", default="postgresql,rabbitmq,redis,file")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument(
        "--concurrency", type=int, default=100, help="the connector's max_concurrent_requests"
    )
    args = parser.parse_args()
    print(
        f"module drain: {args.messages} messages of ~1 KB JSON, one connector (websocket), "
        f"max_concurrent_requests {args.concurrency}, cloud on Redis"
    )
    for name in args.modules.split(","):
        result = drain(name, args.messages, args.concurrency)
        rate, cpu = result["msg_per_s"], result["connector_cpu_us_per_msg"]
        print(f"  {name:<11} {rate:>7.0f} msg/s   connector CPU {cpu:.0f} us/msg", flush=True)


if __name__ == "__main__":
    main()
