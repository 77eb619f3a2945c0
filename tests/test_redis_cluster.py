"""The cloud on a real Redis Cluster (docs/STORAGE-REDIS-CLUSTER.md): slot routing, start-up
refusals, and relays that go on through a slot migration and a master failover with nothing
lost. The buffer conformance suite and the relay suite run on the cluster too (conftest.py's
``redis-cluster`` backend); this file holds what only a cluster has.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import (
    REPO,
    Cloud,
    ConnectorProcess,
    RedisCluster,
    RedisServer,
    Sink,
    free_port,
    running,
    wait_until,
)
from tests.test_relay import WEBHOOKS, connector_settings, message_ids
from webhook_connect.cloud.buffers import ChannelSpec, open_buffer
from webhook_connect.cloud.buffers.redis import channel_keys
from webhook_connect.cloud.buffers.resp_cluster import (
    SLOTS,
    key_slot,
    parse_cluster_url,
)
from webhook_connect.shared.envelope import Envelope

# Pure logic ------------------------------------------------------------------------------


def test_key_slots_are_redis_clusters_own() -> None:
    # Values from the Redis Cluster specification and CLUSTER KEYSLOT.
    assert key_slot("123456789") == 0x31C3 % SLOTS
    assert key_slot("foo") == 12182
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")
    assert key_slot("foo{}{bar}") == key_slot(b"foo{}{bar}")
    assert key_slot("foo{}{bar}") != key_slot("bar")
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")
    assert len({key_slot(key) for key in channel_keys("orders")}) == 1


def test_cluster_urls_are_read_and_bad_ones_refused() -> None:
    url = parse_cluster_url("rediss+cluster://u:p%40ss@10.0.0.1:7000,[::1]:7001/?ssl_ca_certs=/ca")
    assert url.nodes == (("10.0.0.1", 7000), ("::1", 7001))
    assert (url.username, url.password) == ("u", "p@ss")
    assert url.node_url(("10.0.0.2", 7002)) == (
        "rediss://u:p%40ss@10.0.0.2:7002/0?ssl_ca_certs=/ca"
    )
    assert parse_cluster_url("redis+cluster://secret@h:1").password == "secret"
    assert url.wait_replicas == 1
    waitless = parse_cluster_url("redis+cluster://h:1?wait_replicas=0&db=0")
    assert (waitless.wait_replicas, waitless.query) == (0, "db=0")
    for bad in (
        "redis+cluster://h",
        "redis+cluster://h:1,",
        "redis+cluster://h:1/3",
        "redis+cluster://h:1?wait_replicas=one",
    ):
        with pytest.raises(ValueError):
            parse_cluster_url(bad)


# Against a real cluster -----------------------------------------------------------------


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A cluster of this test's own, for the tests that kill or reshape it."""
    with running(RedisCluster(tmp_path / "cluster")) as cluster:
        yield cluster


def envelope(channel: str, body: bytes) -> Envelope:
    return Envelope(
        channel=channel,
        webhook_id="shop",
        received_at=time.time(),
        method="POST",
        path="/webhook/shop",
        query_string="",
        headers=(("content-type", "application/json"),),
        body=body,
        client="127.0.0.1",
    )


async def test_channels_spread_over_masters_and_any_replica_is_woken(
    redis_cluster: RedisCluster,
) -> None:
    redis_cluster.flush()
    names = [f"ch{i}" for i in range(12)]
    assert len({redis_cluster.master_of(channel_keys(n)[0]).port for n in names}) == 3
    first, second = open_buffer(redis_cluster.url), open_buffer(redis_cluster.url)
    try:
        for name in names:
            await first.provision(ChannelSpec(name))
        assert [s.name for s in await second.list_channels()] == sorted(names)
        ids = await asyncio.gather(*(first.append(envelope(n, n.encode())) for n in names))
        for name, message_id in zip(names, ids, strict=True):
            [delivery] = await second.read(name, "default", "c", 10)
            assert (delivery.message_id, delivery.envelope.body) == (message_id, name.encode())
        # An append on one replica wakes a reader waiting on another (PUBLISH reaches every
        # node of the cluster).
        since = second.change_version("ch3")
        waiting = asyncio.create_task(second.wait_for_change("ch3", since, 20))
        deadline = time.monotonic() + 20
        while not waiting.done():
            await first.append(envelope("ch3", b"again"))
            await asyncio.wait({waiting}, timeout=0.2)
            assert time.monotonic() < deadline, "no wake-up from the other replica"
        assert second.change_version("ch3") > since
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_slot_in_migration_is_followed_through_ask_tryagain_and_moved(
    redis_cluster: RedisCluster,
) -> None:
    redis_cluster.flush()
    store = open_buffer(redis_cluster.url)
    cluster = redis_cluster
    try:
        await store.provision(ChannelSpec("moving"))
        first = await store.append(envelope("moving", b"before"))
        [held] = await store.read("moving", "default", "c1", 10)
        stream = channel_keys("moving")[0]
        slot = key_slot(stream)
        source = cluster.master_of(stream)
        target = next(
            n for n in cluster.live() if n.port in cluster.masters_now(n) and n is not source
        )
        source_id, target_id = node_id(cluster, source), node_id(cluster, target)
        cluster.command(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
        cluster.command(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
        keys = cluster.command(source, "CLUSTER", "GETKEYSINSLOT", str(slot), "100").split()
        cluster.command(
            source, "MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", *keys
        )
        # Every key is on the target, the slot not yet handed over: the source answers ASK.
        # A one-key command is served by the target after ASKING.
        assert await store.pending_count("moving", "default", "c1", 10) == 1
        # A script names keys the channel never created (its dead letters, say), which the
        # importing node cannot vouch for: TRYAGAIN until the slot is handed over, then MOVED.
        appending = asyncio.ensure_future(store.append(envelope("moving", b"during")))
        await asyncio.sleep(0.5)
        assert not appending.done()
        for node in (target, source):
            cluster.command(node, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
        second = await asyncio.wait_for(appending, 10)
        assert await store.ack("moving", "default", held.message_id, "c1")
        [later] = await store.read("moving", "default", "c1", 10)
        assert (later.message_id, held.message_id) == (second, first)
        assert cluster.master_of(stream).port == target.port
    finally:
        await store.aclose()


def start_cloud(storage: str, workdir: Path) -> subprocess.CompletedProcess[bytes]:
    """Run ``webhook-connect cloud`` expecting it to stop at start-up; its outcome."""
    webhooks = workdir / "webhooks.json"
    webhooks.write_text(json.dumps(WEBHOOKS))
    args = [sys.executable, "-m", "webhook_connect", "cloud", "--port", str(free_port())]
    args += ["--webhooks", str(webhooks), "--storage", storage]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(args, cwd=workdir, env=env, capture_output=True, timeout=60)


def test_a_cluster_url_naming_a_plain_redis_exits_2_with_one_line(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    done = start_cloud(f"redis+cluster://127.0.0.1:{redis_server.port}", tmp_path)
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "--storage" in lines[0] and "cluster support disabled" in lines[0]


def test_a_node_list_naming_two_clusters_exits_2_with_one_line(
    redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    # A cluster-enabled node that never met the others is a cluster of its own.
    with running(RedisServer(tmp_path / "lonely", cluster_node_timeout_ms=2000)) as lonely:
        done = start_cloud(f"{redis_cluster.url},127.0.0.1:{lonely.port}", tmp_path)
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "different clusters" in lines[0] and str(lonely.port) in lines[0]


class Sender(threading.Thread):
    """Posts ``count`` distinct webhooks at a steady pace while the test does its harm; a
    503 (or a broken connection) is sent again, as a provider does. ``accepted`` holds the
    message id of every 202; ``statuses`` counts every answer."""

    def __init__(self, url: str, count: int, pace: float = 0.004) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.count = count
        self.pace = pace
        self.accepted: list[str] = []
        self.statuses: Counter[int] = Counter()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._send_all())
        except BaseException as exc:  # reported by the test thread
            self.error = exc

    async def _send_all(self) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            pending: set[asyncio.Task[None]] = set()
            for i in range(self.count):
                pending.add(asyncio.create_task(self._send(client, i)))
                await asyncio.sleep(self.pace)
                pending = {task for task in pending if not task.done()}
            await asyncio.gather(*pending)

    async def _send(self, client: httpx.AsyncClient, i: int) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                answer = await client.post(f"{self.url}/webhook/raw", content=f"m{i}".encode())
            except httpx.TransportError:
                await asyncio.sleep(0.1)
                continue
            self.statuses[answer.status_code] += 1
            if answer.status_code == 202:
                self.accepted.append(str(answer.json()["message_id"]))
                return
            assert answer.status_code == 503, answer.text
            assert answer.headers.get("retry-after"), "a 503 without Retry-After"
            await asyncio.sleep(0.1)
        raise AssertionError(f"m{i} never accepted")


@pytest.fixture
def cluster_cloud(own_cluster: RedisCluster, tmp_path: Path) -> Iterator[Cloud]:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    with running(Cloud(own_cluster.url, path, tmp_path)) as cloud:
        wait_until(lambda: httpx.get(f"{cloud.url}/ready").status_code == 200, 30, "ready")
        yield cloud


@pytest.fixture
def connector(cluster_cloud: Cloud, sink: Sink, tmp_path: Path) -> Iterator[ConnectorProcess]:
    settings = connector_settings(cluster_cloud, sink, tmp_path, "websocket")
    process = ConnectorProcess(tmp_path, settings)
    try:
        process.start()
        wait_until(lambda: "connected to" in process.output(), 20, "the connector to connect")
        yield process
    finally:
        process.stop(signal.SIGKILL)


def finish(sender: Sender, sink: Sink, window: int) -> Counter[str]:
    """Wait for the sender, then for every accepted message at the sink; the deliveries."""
    sender.join(180)
    assert not sender.is_alive(), "the sender did not finish"
    if sender.error is not None:
        raise sender.error
    accepted = set(sender.accepted)
    assert len(accepted) == sender.count
    wait_until(lambda: set(message_ids(sink)) >= accepted, 120, "every accepted message")
    counts = Counter(message_ids(sink))
    duplicates = sum(n - 1 for n in counts.values())
    assert duplicates <= window, f"{duplicates} duplicates exceed the window of {window}"
    return counts


def node_id(cluster: RedisCluster, node: RedisServer) -> str:
    return cluster.command(node, "CLUSTER", "MYID").strip()


def test_moving_the_channels_slot_while_messages_flow_loses_nothing(
    own_cluster: RedisCluster, cluster_cloud: Cloud, sink: Sink, connector: ConnectorProcess
) -> None:
    stream = channel_keys("dev")[0]
    source = own_cluster.master_of(stream)
    target = next(
        n for n in own_cluster.live() if n is not source and n.port in own_cluster.masters_now(n)
    )
    slot = key_slot(stream)
    sender = Sender(cluster_cloud.url, 1500)
    sender.start()
    wait_until(lambda: len(sink.records()) >= 200, 60, "deliveries to be under way")
    # What redis-cli --cluster reshard does for one slot, for exactly the channel's slot
    # (reshard itself picks a node's first slots): IMPORTING, MIGRATING, every key moved with
    # MIGRATE, then the new owner announced.
    target_id, source_id = node_id(own_cluster, target), node_id(own_cluster, source)
    own_cluster.command(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
    own_cluster.command(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
    moved = 0
    while keys := own_cluster.command(source, "CLUSTER", "GETKEYSINSLOT", str(slot), "10").split():
        # One key at a time, while ingest and deliveries go on: scripts meanwhile get ASK or
        # TRYAGAIN and the cloud follows.
        own_cluster.command(
            source, "MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", keys[0]
        )
        moved += 1
    for node in (target, source):
        own_cluster.command(node, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
    assert moved >= 3, "the channel's keys were not in the slot"
    assert own_cluster.master_of(stream).port == target.port
    counts = finish(sender, sink, window=100)
    assert sender.statuses[500] == 0
    assert len(counts) >= 1500


def test_reshard_with_redis_cli_while_messages_flow_loses_nothing(
    own_cluster: RedisCluster, cluster_cloud: Cloud, sink: Sink, connector: ConnectorProcess
) -> None:
    stream = channel_keys("dev")[0]
    source = own_cluster.master_of(stream)
    target = next(
        n for n in own_cluster.live() if n is not source and n.port in own_cluster.masters_now(n)
    )
    sender = Sender(cluster_cloud.url, 1500)
    sender.start()
    wait_until(lambda: len(sink.records()) >= 200, 60, "deliveries to be under way")
    # Every slot of the channel's master up to the channel's own moves to another master.
    first = min(
        int(spec.partition("-")[0])
        for line in own_cluster.command(source, "CLUSTER", "NODES").splitlines()
        if "myself" in line.split()[2]
        for spec in line.split()[8:]
    )
    count = key_slot(stream) - first + 1
    subprocess.run(
        [own_cluster.cli, "--cluster", "reshard", f"127.0.0.1:{source.port}"]
        + ["--cluster-from", node_id(own_cluster, source)]
        + ["--cluster-to", node_id(own_cluster, target)]
        + ["--cluster-slots", str(count), "--cluster-yes"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert own_cluster.master_of(stream).port == target.port
    finish(sender, sink, window=100)
    assert sender.statuses[500] == 0


def test_a_master_killed_during_a_relay_fails_over_with_nothing_lost(
    own_cluster: RedisCluster, cluster_cloud: Cloud, sink: Sink, connector: ConnectorProcess
) -> None:
    master = own_cluster.master_of(channel_keys("dev")[0])
    sender = Sender(cluster_cloud.url, 1500)
    sender.start()
    wait_until(lambda: len(sender.accepted) >= 300, 60, "ingest to be under way")
    assert master.process is not None
    master.process.send_signal(signal.SIGKILL)
    master.process.wait(10)
    master.process = None
    # Its replica takes over (cluster-node-timeout 2 s, then an election).
    wait_until(
        lambda: own_cluster.master_of(channel_keys("dev")[0]).port != master.port,
        60,
        "the replica to take over",
    )
    # The ack timeout (5 s) redelivers what was in flight when acks could not be stored.
    finish(sender, sink, window=200)
    assert sender.statuses[500] == 0
    wait_until(lambda: httpx.get(f"{cluster_cloud.url}/ready").status_code == 200, 30, "ready")


def test_a_cluster_without_quorum_is_not_ready_and_ingest_answers_503(
    own_cluster: RedisCluster, cluster_cloud: Cloud
) -> None:
    assert httpx.post(f"{cluster_cloud.url}/webhook/raw", content=b"before").status_code == 202
    # The channel's master and one more: two of three masters gone, no majority to elect.
    first = own_cluster.master_of(channel_keys("dev")[0])
    second = next(
        n for n in own_cluster.live() if n is not first and n.port in own_cluster.masters_now(n)
    )
    for node in (first, second):
        node.stop(signal.SIGKILL)
    statuses: Counter[int] = Counter()

    def refused() -> bool:
        answer = httpx.post(f"{cluster_cloud.url}/webhook/raw", content=b"during", timeout=30)
        statuses[answer.status_code] += 1
        assert answer.status_code in (202, 503), answer.text
        return answer.status_code == 503 and bool(answer.headers.get("retry-after"))

    wait_until(refused, 30, "ingest to answer 503 with Retry-After")
    ready = httpx.get(f"{cluster_cloud.url}/ready", timeout=30)
    assert ready.status_code == 503 and ready.headers.get("retry-after")
    assert statuses[500] == 0
    # Until the cluster itself says so, the remaining master still answers for its slots;
    # once it has, every answer stays 503.
    wait_until(
        lambda: (
            "cluster_state:fail" in own_cluster.command(own_cluster.live()[0], "CLUSTER", "INFO")
        ),
        30,
        "the cluster to see it lost its quorum",
    )
    for _ in range(3):
        assert refused()
