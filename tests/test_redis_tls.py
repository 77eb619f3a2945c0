"""TLS and ACL credentials to Redis, one behaviour on every code path (issue 16, part 2).

A real redis-server speaking only TLS (``--port 0 --tls-port P``) with a CA made by the
fixtures (tests/tlsredis.py), a real cloud process, a real connector and a real sink. Every
connection the cloud opens (the hot-path RespClient, redis-py for the cold path and pub/sub)
is built from one reading of the URL (cloud/buffers/redisurl.py), so they succeed or fail
together: when storage cannot be used, ``/ready`` and ingest both answer 503, never 200/202.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from tests.servers import REPO, Cloud, ConnectorProcess, RedisServer, Sink, running, wait_until
from tests.tlsredis import TLSFiles, TLSRedisServer, make_tls_files
from webhook_connect.cloud.buffers.redis import RedisBuffer
from webhook_connect.cloud.buffers.redisurl import RedisUrlError, parse_redis_url

TOKEN = "redis-tls-token-0123456789"
ADMIN_TOKEN = "redis-tls-admin-token-0123"
PASSWORD = "s3cret:/@ pass"  # characters a URL must escape
WEBHOOKS = {
    "raw": {
        "module": "webhook_connect",
        "data_type": "blob",
        "module-config": {"channel": "dev", "channel_token": TOKEN},
    },
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("redis-tls"))


@pytest.fixture
def webhooks(tmp_path: Path) -> Path:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    return path


def tls_redis(tmp_path: Path, files: TLSFiles, **options: object) -> TLSRedisServer:
    return TLSRedisServer(tmp_path / "redis", files, **options)  # type: ignore[arg-type]


def cloud_on(storage: str, webhooks: Path, tmp_path: Path) -> Cloud:
    return Cloud(storage, webhooks, tmp_path, "--admin-token", ADMIN_TOKEN)


def ready_status(cloud: Cloud) -> int:
    return httpx.get(f"{cloud.url}/ready", timeout=10).status_code


def post(cloud: Cloud, body: bytes) -> httpx.Response:
    return httpx.post(f"{cloud.url}/webhook/raw", content=body, timeout=15)


def body_received(sink: Sink, body: bytes) -> bool:
    encoded = base64.b64encode(body).decode()
    return any(record["body_b64"] == encoded for record in sink.records())


def assert_usable(cloud: Cloud) -> None:
    """Ready, and a webhook is stored (202)."""
    try:
        wait_until(lambda: ready_status(cloud) == 200, 30, "/ready 200")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{cloud.log.read_text()}") from None
    answer = post(cloud, b"stored")
    assert answer.status_code == 202, (answer.text, cloud.log.read_text())


def assert_unusable(cloud: Cloud, reason: str) -> None:
    """Not ready, and a webhook is refused 503 with Retry-After (never 202, never a 500),
    repeatedly (no crash loop), with ``reason`` in the cloud's log."""
    for _ in range(3):
        assert ready_status(cloud) == 503
        answer = post(cloud, b"refused")
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"].isdigit()
    assert httpx.get(f"{cloud.url}/health", timeout=5).status_code == 200
    wait_until(lambda: reason in cloud.log.read_text(), 10, f"{reason!r} in the cloud's log")


# The URL read once -----------------------------------------------------------------------


def test_one_reading_of_the_url_gives_both_clients_the_same_context(files: TLSFiles) -> None:
    """RespClient and redis-py are built from one endpoint: the same SSLContext object."""
    url = f"rediss://alice:{'p%40ss'}@127.0.0.1:6380/3?ssl_ca_certs={files.ca}"
    buffer = RedisBuffer(url)
    endpoint = buffer._resp.endpoint
    pool = buffer._redis.connection_pool
    assert (endpoint.host, endpoint.port, endpoint.db) == ("127.0.0.1", 6380, 3)
    assert (endpoint.username, endpoint.password) == ("alice", "p@ss")
    assert endpoint.tls is not None and pool.connection_kwargs["ssl_context"] is endpoint.tls
    assert endpoint.tls.verify_mode == ssl.CERT_REQUIRED and endpoint.tls.check_hostname
    assert pool.connection_kwargs["password"] == "p@ss"
    assert endpoint.handshake() == [("AUTH", "alice", "p@ss"), ("SELECT", 3)]
    assert "p@ss" not in repr(endpoint)


def test_a_cluster_reads_its_options_as_a_single_node_does(files: TLSFiles) -> None:
    """redis-py's RedisCluster takes no SSLContext: it gets the same settings, as redis-py's
    keyword options, from the same reading; each node's hot-path client gets the context."""
    from webhook_connect.cloud.buffers.redis_cluster import cold_path_client
    from webhook_connect.cloud.buffers.resp_cluster import parse_cluster_url

    url = f"rediss+cluster://bob:p%40ss@127.0.0.1:7000,127.0.0.1:7001?ssl_ca_certs={files.ca}"
    kwargs = cold_path_client(url).nodes_manager.connection_kwargs
    node = parse_redis_url(parse_cluster_url(url).node_url(("127.0.0.1", 7001)))
    assert node.tls_settings is not None and node.tls is not None
    for name, value in node.tls_settings.redis_py_options().items():
        if name != "ssl":
            assert kwargs[name] == value, name
    assert (
        (kwargs["username"], kwargs["password"])
        == ("bob", "p@ss")
        == (
            node.username,
            node.password,
        )
    )
    assert node.tls_settings.ca_certs == str(files.ca) and node.tls.check_hostname


def test_the_options_of_a_rediss_url(files: TLSFiles) -> None:
    loose = parse_redis_url("rediss://h:1?ssl_cert_reqs=none")
    assert loose.tls is not None
    assert (loose.tls.verify_mode, loose.tls.check_hostname) == (ssl.CERT_NONE, False)
    no_name = parse_redis_url(f"rediss://h?ssl_ca_certs={files.ca}&ssl_check_hostname=false")
    assert no_name.tls is not None and not no_name.tls.check_hostname and no_name.port == 6379
    plain = parse_redis_url("redis://:pw@h:2?db=4")
    assert (plain.tls, plain.db, plain.handshake()) == (None, 4, [("AUTH", "pw"), ("SELECT", 4)])
    unix = parse_redis_url("unix:///run/redis.sock?db=2")
    assert (unix.path, unix.db) == ("/run/redis.sock", 2)


@pytest.mark.parametrize(
    ("query", "key"),
    [
        ("ssl_ca_cert=/x", "ssl_ca_cert"),
        ("socket_timeout=3", "socket_timeout"),
        ("ssl_cert_reqs=sometimes", "ssl_cert_reqs"),
        ("ssl_ca_certs=/does/not/exist", "ssl_ca_certs"),
        ("ssl_keyfile=/x", "ssl_keyfile"),
        ("ssl_check_hostname=maybe", "ssl_check_hostname"),
        ("ssl_cert_reqs=none&ssl_check_hostname=true", "ssl_check_hostname"),
        ("db=1&db=2", "db"),
    ],
)
def test_a_bad_option_is_named(query: str, key: str) -> None:
    with pytest.raises(RedisUrlError) as caught:
        parse_redis_url(f"rediss://127.0.0.1:6379/0?{query}")
    assert caught.value.key == key


def test_tls_options_on_a_plain_url_are_refused(files: TLSFiles) -> None:
    with pytest.raises(RedisUrlError, match="rediss://") as caught:
        parse_redis_url(f"redis://127.0.0.1:6379/0?ssl_ca_certs={files.ca}")
    assert caught.value.key == "ssl_ca_certs"


@pytest.mark.parametrize(
    ("storage", "named"),
    [
        ("rediss://127.0.0.1:1/0?ssl_verify=yes", "ssl_verify"),
        ("rediss://u:hunter2@127.0.0.1:1/0?ssl_ca_certs=/nope.pem", "ssl_ca_certs"),
        ("redis://127.0.0.1:1/0?ssl_certfile=/x.pem", "ssl_certfile"),
        ("rediss+cluster://127.0.0.1:1,127.0.0.1:2?ssl_ca_cert=/x", "ssl_ca_cert"),
    ],
)
def test_a_bad_storage_url_stops_the_cloud_in_one_line(
    storage: str, named: str, tmp_path: Path, webhooks: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOK_CONNECT_")}
    args = [sys.executable, "-m", "webhook_connect", "cloud", "--port", "1"]
    done = subprocess.run(
        [*args, "--webhooks", str(webhooks), "--storage", storage],
        cwd=tmp_path,
        env=env | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--storage" in lines[0] and named in lines[0], lines
    assert "hunter2" not in done.stderr


# Against a real TLS redis-server ------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["websocket", "long_poll"])
def test_rediss_with_the_right_ca_relays_end_to_end(
    protocol: str, files: TLSFiles, webhooks: Path, tmp_path: Path
) -> None:
    """Stored over TLS (hot path), provisioned and read (cold path), and over long-poll the
    pub/sub notifier: a webhook reaches the sink byte for byte."""
    with (
        running(tls_redis(tmp_path, files)) as server,
        running(cloud_on(server.url(ssl_ca_certs=files.ca), webhooks, tmp_path)) as cloud,
        running(Sink(tmp_path)) as sink,
    ):
        assert_usable(cloud)
        settings = {
            "protocol": protocol,
            "cloud_url": cloud.url,
            "channel": "dev",
            "token": TOKEN,
            "connector_id": "tls-connector",
            "state_dir": str(tmp_path / "state"),
            "reconnect_delay_seconds": 0.2,
            "max_reconnect_delay_seconds": 1,
            "default_target": {"url": sink.url, "timeout_seconds": 5},
        }
        connector = ConnectorProcess(tmp_path, settings)
        try:
            connector.start()
            body = b"over tls\r\n" + bytes(range(256))
            try:
                wait_until(lambda: "connected to" in connector.output(), 30, "the connector")
                assert post(cloud, body).status_code == 202
                wait_until(lambda: body_received(sink, body), 30, "the relayed webhook")
                wait_until(lambda: body_received(sink, b"stored"), 30, "the first webhook")
            except TimeoutError as exc:
                output = f"{connector.output()}\n{cloud.log.read_text()}"
                raise AssertionError(f"{exc}\n{output}") from None
        finally:
            connector.stop(signal.SIGKILL)


def test_ready_answers_200_only_when_the_hot_path_works(files: TLSFiles, tmp_path: Path) -> None:
    """The issue as reported: with no channel to provision at start-up, /ready answered 200
    (redis-py honoured ssl_ca_certs) while every hot-path call failed CERTIFICATE_VERIFY_FAILED
    (the lean client verified against the system CAs). Now a 200 means a channel can be made."""
    empty = tmp_path / "no-webhooks.json"
    empty.write_text("{}")
    with (
        running(tls_redis(tmp_path, files)) as server,
        running(cloud_on(server.url(ssl_ca_certs=files.ca), empty, tmp_path)) as cloud,
    ):
        wait_until(lambda: ready_status(cloud) == 200, 30, "/ready 200")
        made = httpx.post(
            f"{cloud.url}/admin/channels",
            json={"name": "made-at-run-time"},
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=15,
        )
        assert made.status_code == 201, made.text


def test_a_wrong_ca_makes_ready_and_ingest_503(
    files: TLSFiles, webhooks: Path, tmp_path: Path
) -> None:
    with (
        running(tls_redis(tmp_path, files)) as server,
        running(cloud_on(server.url(ssl_ca_certs=files.wrong_ca), webhooks, tmp_path)) as cloud,
    ):
        assert_unusable(cloud, "CERTIFICATE_VERIFY_FAILED")


def test_the_system_cas_do_not_trust_a_private_ca(
    files: TLSFiles, webhooks: Path, tmp_path: Path
) -> None:
    """No ssl_ca_certs: both clients verify against the system CAs, and both refuse."""
    with (
        running(tls_redis(tmp_path, files)) as server,
        running(cloud_on(server.url(), webhooks, tmp_path)) as cloud,
    ):
        assert_unusable(cloud, "CERTIFICATE_VERIFY_FAILED")


@pytest.mark.parametrize("with_certificate", [True, False])
def test_a_server_that_demands_a_client_certificate(
    with_certificate: bool, files: TLSFiles, webhooks: Path, tmp_path: Path
) -> None:
    options: dict[str, Path] = {"ssl_ca_certs": files.ca}
    if with_certificate:
        options |= {"ssl_certfile": files.client_cert, "ssl_keyfile": files.client_key}
    with (
        running(tls_redis(tmp_path, files, auth_clients="yes")) as server,
        running(cloud_on(server.url(**options), webhooks, tmp_path)) as cloud,
    ):
        if with_certificate:
            assert_usable(cloud)
        else:
            assert_unusable(cloud, "CERTIFICATE_REQUIRED")


@pytest.mark.parametrize("password", [PASSWORD, "wrong"])
def test_an_acl_user_over_tls(
    password: str, files: TLSFiles, webhooks: Path, tmp_path: Path
) -> None:
    """The password reaches Redis intact (escaped in the URL) and never reaches the log."""
    users = {"alice": PASSWORD}
    with running(tls_redis(tmp_path, files, users=users)) as server:
        url = server.url(user="alice", password=password, ssl_ca_certs=files.ca)
        with running(cloud_on(url, webhooks, tmp_path)) as cloud:
            if password == PASSWORD:
                assert_usable(cloud)
            else:
                assert_unusable(cloud, "WRONGPASS")
        assert password not in cloud.log.read_text()


def test_an_acl_user_on_plain_tcp(
    redis_server: RedisServer, webhooks: Path, tmp_path: Path
) -> None:
    """``redis://user:pass@``: the hot path authenticates as that user too (an ACL user made
    on the session's plain Redis, removed after)."""
    admin = redis.Redis(port=redis_server.port)
    admin.acl_setuser(
        "wc-tls-test",
        enabled=True,
        passwords=["+" + PASSWORD],
        keys="*",
        channels="*",
        commands=["+@all"],
    )
    try:
        base = f"127.0.0.1:{redis_server.port}/0"
        escaped = "s3cret%3A%2F%40%20pass"
        right = f"redis://wc-tls-test:{escaped}@{base}"
        with running(cloud_on(right, webhooks, tmp_path)) as cloud:
            assert_usable(cloud)
        wrong = f"redis://wc-tls-test:nope@{base}"
        with running(cloud_on(wrong, webhooks, tmp_path)) as cloud:
            assert_unusable(cloud, "WRONGPASS")
    finally:
        admin.acl_deluser("wc-tls-test")
        admin.close()


def test_the_admin_cli_works_over_rediss(files: TLSFiles, webhooks: Path, tmp_path: Path) -> None:
    """``webhook-connect channels`` and ``dlq`` (through the admin API) create and read over
    TLS: the channel is in the TLS Redis."""
    with (
        running(tls_redis(tmp_path, files)) as server,
        running(cloud_on(server.url(ssl_ca_certs=files.ca), webhooks, tmp_path)) as cloud,
    ):
        assert_usable(cloud)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOK_CONNECT_")}
        env |= {
            "PYTHONPATH": str(REPO),
            "WEBHOOK_CONNECT_CLOUD_URL": cloud.url,
            "WEBHOOK_CONNECT_ADMIN_TOKEN": ADMIN_TOKEN,
        }

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            command = [sys.executable, "-m", "webhook_connect", *args]
            return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

        created = cli("channels", "create", "made-by-cli")
        assert created.returncode == 0, created.stderr
        shown = cli("channels", "show", "made-by-cli", "--json")
        assert shown.returncode == 0, shown.stderr
        listed = cli("dlq", "list", "dev")
        assert listed.returncode == 0, listed.stderr
        client = redis.Redis(
            port=server.port,
            ssl=True,
            ssl_ca_certs=str(files.ca),
            ssl_certfile=str(files.client_cert),
            ssl_keyfile=str(files.client_key),
        )
        try:
            assert client.sismember("wc:channels", "made-by-cli")
        finally:
            client.close()


def test_the_hot_path_client_alone_fails_on_a_wrong_ca(files: TLSFiles, tmp_path: Path) -> None:
    """In process: RedisBuffer.ping, what /ready calls, fails when only the hot-path client's
    handshake would (both clients share the context, so they cannot differ)."""

    async def ping(url: str) -> None:
        buffer = RedisBuffer(url)
        try:
            await buffer.ping()
        finally:
            await buffer.aclose()

    with running(tls_redis(tmp_path, files)) as server:
        asyncio.run(ping(server.url(ssl_ca_certs=files.ca)))
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            asyncio.run(ping(server.url(ssl_ca_certs=files.wrong_ca)))
