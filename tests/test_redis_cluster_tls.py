"""The cloud on a Redis Cluster over TLS with an ACL user (``rediss+cluster://``).

One cluster for the module (3 masters, no replicas: what TLS changes is how every node is
reached, not failover, which tests/test_redis_cluster.py covers), started with ``tls-cluster``
and ``tls-replication`` so that the addresses it announces (``CLUSTER SLOTS``, ``MOVED``) are
TLS ports, its default user off. A real cloud process, a real connector and a real sink.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.certs import TLSFiles, make_tls_files
from tests.servers import ConnectorProcess, RedisServer, Sink, running, wait_until
from tests.test_redis_tls import (
    ADMIN_TOKEN,
    PASSWORD,
    TOKEN,
    WEBHOOKS,
    assert_unusable,
    body_received,
    cloud_on,
    post,
    ready_status,
)
from tests.test_relay import connector_settings
from tests.tlsredis import TLSRedisCluster
from webhook_connect.cloud.buffers.redis import channel_keys
from webhook_connect.cloud.buffers.resp import RespClient
from webhook_connect.cloud.buffers.resp_cluster import ClusterRespClient, key_slot
from webhook_connect.shared.exceptions import StorageUnavailable

USER = "wc-cluster"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("cluster-tls-certs"))


@pytest.fixture(scope="module")
def tls_cluster(
    files: TLSFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TLSRedisCluster]:
    directory = tmp_path_factory.mktemp("cluster-tls")
    cluster = TLSRedisCluster(directory, files, users={USER: PASSWORD})
    with running(cluster):
        yield cluster


@pytest.fixture
def webhooks(tmp_path: Path) -> Path:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    return path


def move_slot(cluster: TLSRedisCluster, key: str) -> int:
    """Hand the slot of ``key`` to another master, its keys with it (what ``redis-cli
    --cluster reshard`` does for one slot); the port of the new master."""
    slot = key_slot(key)
    source = cluster.master_of(key)
    target = next(n for n in cluster.nodes if n is not source)
    source_id = cluster.command(source, "CLUSTER", "MYID").strip()
    target_id = cluster.command(target, "CLUSTER", "MYID").strip()
    cluster.command(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
    cluster.command(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
    while keys := cluster.command(source, "CLUSTER", "GETKEYSINSLOT", str(slot), "100").split():
        # MIGRATE opens a connection of the source's own to the target: TLS (tls-cluster),
        # logged in as the cluster's user.
        cluster.command(
            source,
            *("MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000"),
            *("AUTH2", USER, PASSWORD, "KEYS", *keys),
        )
    for node in cluster.nodes:
        cluster.command(node, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
    wait_until(lambda: cluster.master_of(key).port == target.port, 10, "the slot handed over")
    return target.port


def moved_replies(cluster: TLSRedisCluster, node: RedisServer) -> int:
    """How many ``MOVED`` redirections ``node`` has answered (``INFO errorstats``)."""
    for line in cluster.command(node, "INFO", "errorstats").splitlines():
        if line.startswith("errorstat_MOVED:"):
            return int(line.partition("count=")[2].split(",")[0])
    return 0


def test_every_node_shares_one_tls_context(files: TLSFiles) -> None:
    """The URL is read once: the nodes listed, and those the cluster names later (a MOVED
    target, the client of an ASK), are reached with one SSLContext and the same login."""
    url = f"rediss+cluster://{USER}:pw@127.0.0.1:7000,127.0.0.1:7001?ssl_ca_certs={files.ca}"
    client = ClusterRespClient(url)
    endpoints = [client.client(node).endpoint for node in (("127.0.0.1", 7000), ("::1", 7005))]
    first, later = endpoints
    assert first.tls is not None and later.tls is first.tls
    assert (later.host, later.port, later.username, later.password) == ("::1", 7005, USER, "pw")


def test_rediss_cluster_relays_and_follows_a_moved_slot(
    tls_cluster: TLSRedisCluster, webhooks: Path, tmp_path: Path
) -> None:
    """Ingest, delivery and the admin API over TLS as the ACL user; then the channel's slot
    moves to another master: the cloud, whose slot table still names the old one, gets
    ``MOVED`` naming a TLS port and follows it on both its clients."""
    tls_cluster.flush()
    with (
        running(cloud_on(tls_cluster.url, webhooks, tmp_path)) as cloud,
        running(Sink(tmp_path)) as sink,
    ):
        wait_until(lambda: ready_status(cloud) == 200, 30, "/ready 200")
        settings = connector_settings(cloud, sink, tmp_path, "sse", token=TOKEN)
        connector = ConnectorProcess(tmp_path, settings)
        try:
            connector.start()
            wait_until(lambda: "connected to" in connector.output(), 30, "the connector")
            before = b"before the move"
            assert post(cloud, before).status_code == 202
            wait_until(lambda: body_received(sink, before), 30, "the first webhook relayed")

            stream = channel_keys("dev")[0]
            old = tls_cluster.master_of(stream)
            redirected = moved_replies(tls_cluster, old)
            assert move_slot(tls_cluster, stream) != old.port
            after = [f"after the move {i}".encode() for i in range(20)]
            for body in after:
                answer = post(cloud, body)
                assert answer.status_code == 202, (answer.text, cloud.log.read_text())
            for body in after:
                wait_until(functools.partial(body_received, sink, body), 30, "relayed after it")
            assert moved_replies(tls_cluster, old) > redirected, "the old master redirected"
            shown = httpx.get(
                f"{cloud.url}/admin/channels/dev",
                headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                timeout=15,
            )
            assert shown.status_code == 200, shown.text
            assert shown.json()["channel"]["name"] == "dev"
            assert ready_status(cloud) == 200
        except TimeoutError as exc:
            output = f"{connector.output()}\n{cloud.log.read_text()}"
            raise AssertionError(f"{exc}\n{output}") from None
        finally:
            connector.stop(signal.SIGKILL)
        log = cloud.log.read_text()
        assert PASSWORD not in log
        # The change notifications' subscription (redis-py, on one node) held over TLS too.
        assert "change notifications lost" not in log


@pytest.mark.parametrize(
    ("option", "reason"),
    [("wrong CA", "CERTIFICATE_VERIFY_FAILED"), ("wrong password", "WRONGPASS")],
)
def test_a_cluster_that_cannot_be_used_makes_ready_and_ingest_503(
    option: str,
    reason: str,
    tls_cluster: TLSRedisCluster,
    files: TLSFiles,
    webhooks: Path,
    tmp_path: Path,
) -> None:
    """The cloud starts (nodes it cannot use are not judged at start-up), answers ``/ready``
    and webhooks 503 with Retry-After, never 200/202 or a 500, and logs why."""
    if option == "wrong CA":
        url = tls_cluster.url_with(user=USER, password=PASSWORD, ssl_ca_certs=files.wrong_ca)
    else:
        url = tls_cluster.url_with(user=USER, password="nope", ssl_ca_certs=files.ca)
    with running(cloud_on(url, webhooks, tmp_path)) as cloud:
        assert_unusable(cloud, reason)


def test_a_tls_cluster_announcing_plain_ports_says_so(
    files: TLSFiles, webhooks: Path, tmp_path: Path
) -> None:
    """Nodes on a TLS port and a plain one with a plain bus (``tls-cluster no``) announce their
    plain ports, where the cloud's TLS handshakes go unanswered: ``/ready`` and ingest answer
    503, and what the admin sees says what to change, not only that a node is unreachable."""
    cluster = TLSRedisCluster(
        tmp_path / "cluster", files, users={USER: PASSWORD}, tls_cluster=False
    )
    with running(cluster), running(cloud_on(cluster.url, webhooks, tmp_path)) as cloud:
        ready = httpx.get(
            f"{cloud.url}/ready", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60
        )
        assert ready.status_code == 503, ready.text
        assert "tls-cluster yes" in ready.json()["detail"], ready.json()
        answer = httpx.post(f"{cloud.url}/webhook/raw", content=b"refused", timeout=60)
        assert answer.status_code == 503 and answer.headers["retry-after"].isdigit()
        assert "tls-cluster yes" in cloud.log.read_text()


async def test_the_hot_path_reaches_a_node_it_learns_of_over_tls(
    tls_cluster: TLSRedisCluster,
) -> None:
    """Seeded with one node only, the cluster client reads the layout over TLS and reaches
    every master at the TLS port the cluster announced."""
    seed = tls_cluster.nodes[0].port
    url = tls_cluster.url.replace(
        ",".join(f"127.0.0.1:{n.port}" for n in tls_cluster.nodes), f"127.0.0.1:{seed}"
    )
    client = ClusterRespClient(url)
    try:
        table = await client.refresh()
        assert sorted(port for _, port in table.primaries()) == sorted(
            n.port for n in tls_cluster.nodes
        )
        await client.check()
        replies = await asyncio.gather(
            *(client.execute("SET", f"{{k{i}}}", str(i)) for i in range(30))
        )
        assert replies == [b"OK"] * 30
    finally:
        await client.aclose()


async def test_a_tls_handshake_that_never_finishes_is_named(files: TLSFiles) -> None:
    """A node that takes the connection and never answers the TLS handshake (a plain Redis
    port reached over TLS waits for the end of a line that never comes): the error says it
    timed out, rather than naming the address and nothing after it."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RespClient(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={files.ca}")
    try:
        with pytest.raises(StorageUnavailable) as caught:
            await client.execute("PING")
        assert str(caught.value) == f"redis unreachable at 127.0.0.1:{port}: TimeoutError"
        assert accepted, "the connection was made; the handshake is what never ended"
    finally:
        await client.aclose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
