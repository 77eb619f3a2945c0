from __future__ import annotations

import gc
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from tests.servers import Cloud, RabbitMQServer, RedisCluster, RedisServer, Sink, running
from webhook_connect.cloud.buffers import Buffer, open_buffer


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect garbage after each test, so an unclosed socket or transport is reported (a
    ResourceWarning, an error in this suite) by the test that left it open, not by whichever
    later test the collector happened to run in."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server per test session, with append-only persistence."""
    with running(RedisServer(tmp_path_factory.mktemp("redis"))) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session's Redis, flushed for this test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


# A Redis Cluster (docs/STORAGE-REDIS-CLUSTER.md) runs the suites of CLUSTER_SUITES only.
BACKENDS = ["sqlite", "redis", "redis-cluster", "rabbitmq"]
CLUSTER_SUITES = frozenset({"test_buffers.py", "test_relay.py"})

# RabbitMQ (docs/STORAGE-RABBITMQ.md) runs in the suites of RABBITMQ_SUITES, the relay suite
# over WebSocket only; with WC_TEST_RABBITMQ=1, in every suite that takes a storage URL and
# over every transport (about ten minutes more at -n 3 on 2 cores).
RABBITMQ_EVERYWHERE = bool(os.environ.get("WC_TEST_RABBITMQ"))
RABBITMQ_SUITES = frozenset({"test_buffers.py", "test_rabbitmq_buffer.py", "test_relay.py"})
# Tests of what the RabbitMQ backend does not keep (docs/STORAGE-RABBITMQ.md): skipped on it,
# naming the semantic (tests/test_buffers.py marks its own with not_kept_by_rabbitmq).
RABBITMQ_NOT_KEPT = {
    "test_history_is_replayed_from_a_point_in_time": "history replay",
    "test_seed_frames_over_sse_ack_and_nack": "counters every replica shares (another buffer "
    "reads them here; they are each replica's own)",
    "test_seed_frames_ack_and_nack_like_the_core_webhook_module": "counters every replica "
    "shares (another buffer reads them here; they are each replica's own)",
}


def _rabbitmq_dropped(item: pytest.Item, chosen: dict[str, object]) -> bool:
    """Whether a test's rabbitmq variant stays out of this run (see RABBITMQ_SUITES)."""
    if RABBITMQ_EVERYWHERE:
        return False
    if item.path.name not in RABBITMQ_SUITES:
        return True
    return chosen.get("protocol", "websocket") != "websocket"


def _rabbitmq_not_kept(item: pytest.Item) -> str:
    params = getattr(item, "callspec", None)
    if params is None or params.params.get("storage_url") != "rabbitmq":
        return ""
    return RABBITMQ_NOT_KEPT.get(getattr(item, "originalname", ""), "")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One real Redis Cluster (3 masters, 3 replicas) per test session, every node stopped
    by PID."""
    with running(RedisCluster(tmp_path_factory.mktemp("redis-cluster"))) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def rabbitmq_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQServer]:
    """One private rabbitmq-server node per test session, stopped by PID."""
    server = RabbitMQServer(tmp_path_factory.mktemp("rabbitmq"))
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(params=BACKENDS)
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each backend in turn: a fresh SQLite file, the session's flushed Redis, the session's
    flushed Redis Cluster, or the session's RabbitMQ under names of this test's own (its
    registry a fresh SQLite file)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'buffer.db'}"
    if request.param == "redis-cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        return cluster.url
    if request.param == "rabbitmq":
        server: RabbitMQServer = request.getfixturevalue("rabbitmq_server")
        registry = quote(f"sqlite:///{tmp_path / 'registry.db'}", safe="")
        return f"{server.url}?registry={registry}&prefix=t{uuid.uuid4().hex[:12]}"
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
async def buffer(storage_url: str) -> AsyncIterator[Buffer]:
    store = open_buffer(storage_url)
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture
def cloud(storage_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cloud]:
    """The cloud under uvicorn, serving the ``WEBHOOKS`` of the requesting test module."""
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(request.module.WEBHOOKS))
    with running(Cloud(storage_url, path, tmp_path)) as server:
        yield server


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    """``webhook-connect sink`` recording what it receives."""
    with running(Sink(tmp_path)) as server:
        yield server


@pytest.fixture(scope="module")
def module_cloud(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cloud]:
    """One cloud on SQLite for the whole test module, serving its ``WEBHOOKS``; for checks
    that do not depend on the storage backend, so the module pays for one start-up."""
    workdir = tmp_path_factory.mktemp("cloud")
    path = workdir / "webhooks.json"
    path.write_text(json.dumps(request.module.WEBHOOKS))
    with running(Cloud(f"sqlite:///{workdir / 'buffer.db'}", path, workdir)) as server:
        yield server


# Files whose tests share one server started per file (a database, a broker, a cloud): with
# ``--dist loadgroup`` each runs on one xdist worker, so the server starts once, not per worker.
SHARED_SERVER_FILES = frozenset(
    {
        "test_postgresql.py",
        "test_mysql.py",
        "test_clickhouse.py",
        "test_rabbitmq.py",
        "test_activemq.py",
        "test_mqtt.py",
        "test_s3.py",
        "test_sqs.py",
        "test_kafka.py",
        "test_gcp_pubsub.py",
        "test_module_mode.py",
    }
)


# The heaviest end-to-end scenarios (thousands of messages, killed processes) run every
# transport on SQLite but only WebSocket on Redis: the buffer conformance suite already holds
# both backends to the same rules, and the transports do not touch storage differently.
SLIM_MATRIX = frozenset(
    {
        "test_sigkill_of_the_connector_loses_nothing_and_duplicates_stay_in_the_window",
        "test_the_connector_rides_out_a_cloud_crash",
        "test_messages_sent_while_offline_arrive_when_the_connector_starts",
        "test_one_group_shares_and_two_groups_each_get_everything",
    }
)


def _slimmed(item: pytest.Item) -> bool:
    params = getattr(item, "callspec", None)
    if params is None:
        return False
    chosen = params.params
    if chosen.get("storage_url") == "redis-cluster" and item.path.name not in CLUSTER_SUITES:
        return True
    if chosen.get("storage_url") == "rabbitmq" and _rabbitmq_dropped(item, chosen):
        return True
    if getattr(item, "originalname", "") not in SLIM_MATRIX:
        return False
    redis = ("redis", "redis-cluster")
    return chosen.get("storage_url") in redis and chosen.get("protocol") != "websocket"


@pytest.hookimpl(tryfirst=True)  # before xdist turns the groups into scheduling keys
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    dropped = [item for item in items if _slimmed(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not _slimmed(item)]
    for item in items:
        if item.path.name in SHARED_SERVER_FILES:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
        not_kept = _rabbitmq_not_kept(item)
        if not_kept:
            item.add_marker(pytest.mark.skip(reason=f"RabbitMQ does not keep {not_kept}"))
