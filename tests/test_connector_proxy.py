"""The connector on corporate networks: through a real forward proxy, with a client certificate.

The proxy is a real tinyproxy (tests/proxies.py Tinyproxy) that logs every request. The cloud
is addressed by a name only the proxy resolves (``cloud.proxied.test``, bound over the proxy's
own ``/etc/hosts``): a connection of the connector that bypassed the proxy (the stream, a
poll, an ack) could not even resolve it, so the message would never be delivered and acked.
The client-certificate tests put the cloud behind nginx requiring one (``ssl_verify_client``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.proxies import (
    ClientCertificate,
    MutualTlsNginx,
    Tinyproxy,
    make_certificates,
    make_client_certificate,
)
from tests.servers import Cloud, ConnectorProcess, Sink, running, wait_until
from webhook_connect.cloud.buffers import open_buffer
from webhook_connect.connector.config import load_connector_settings
from webhook_connect.connector.proxy import (
    NoProxy,
    ProxyServer,
    environment_proxies,
    parse_proxy,
    policy,
)
from webhook_connect.shared.exceptions import ConfigError

TRANSPORTS = ("websocket", "sse", "long_poll")
CLOUD_NAME = "cloud.proxied.test"
TARGET_NAME = "target.proxied.test"
CREDENTIALS = ("corp", "pr0xy-secret")


def token(channel: str) -> str:
    return f"{channel}-token-0123456789"


def channel(name: str, *webhooks: str) -> dict[str, object]:
    config = {"channel": name, "channel_token": token(name), "retry_delay_seconds": 0.2}
    return {
        webhook: {"module": "webhook_connect", "data_type": "blob", "module-config": config}
        for webhook in webhooks or (name,)
    }


WEBHOOKS: dict[str, object] = {
    **{k: v for t in TRANSPORTS for k, v in channel(f"proxied-{t}").items()},
    **{k: v for t in TRANSPORTS for k, v in channel(f"mtls-{t}").items()},
    **{k: v for t in TRANSPORTS for k, v in channel(f"tunnel-{t}").items()},
    **channel("environment", "environment-local", "environment-remote"),
    **channel("no-proxy"),
    **channel("wrong-password"),
    **channel("no-certificate"),
}


# Pure rules --------------------------------------------------------------------------------


def test_a_proxy_url_and_its_credentials() -> None:
    proxy = parse_proxy("http://corp:p%40ss@proxy.example:3128")
    assert (proxy.host, proxy.port) == ("proxy.example", 3128)
    assert proxy.authorization == "Basic " + base64.b64encode(b"corp:p@ss").decode()
    assert parse_proxy("proxy.example") == ProxyServer("proxy.example", 80)
    assert parse_proxy("http://[::1]:8080").address == "[::1]:8080"
    for bad, reason in [
        ("socks5://proxy:1080", "socks5:// proxies are not supported"),
        ("https://proxy:443", "https:// proxies are not supported"),
        ("http://:3128", "no host"),
        ("http://proxy:99999", "bad port"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_proxy(bad)


def test_no_proxy_hosts_suffixes_ports_ranges_and_star() -> None:
    rules = NoProxy.parse("example.com, .corp.internal,*.lan,10.0.0.0/8, api.test:8443,[::1]")
    assert rules.excludes("example.com", 443)
    assert rules.excludes("www.example.com", 80)
    assert not rules.excludes("notexample.com", 443)
    assert rules.excludes("corp.internal", 80) and rules.excludes("git.corp.internal", 80)
    assert rules.excludes("printer.lan", 80)
    assert rules.excludes("10.2.3.4", 80) and not rules.excludes("11.2.3.4", 80)
    assert rules.excludes("api.test", 8443) and not rules.excludes("api.test", 443)
    assert rules.excludes("::1", 80)
    assert NoProxy.parse("*").excludes("anything", 1)
    assert not NoProxy.parse("").excludes("anything", 1)


def test_which_proxy_a_connection_takes() -> None:
    environ = {
        "HTTPS_PROXY": "http://upper:1",
        "https_proxy": "http://lower:2",  # the lower-case spelling wins
        "HTTP_PROXY": "http://plain:3",
        "NO_PROXY": "internal.example",
    }
    cloud = policy(None, environ, loopback_direct=False)
    assert cloud.choose("wss", "cloud.example", 443) == ProxyServer("lower", 2)
    assert cloud.choose("https", "cloud.example", 443) == ProxyServer("lower", 2)
    assert cloud.choose("http", "cloud.example", 80) == ProxyServer("plain", 3)
    assert cloud.choose("ws", "cloud.example", 80) == ProxyServer("plain", 3)
    assert cloud.choose("https", "api.internal.example", 443) is None
    assert cloud.choose("http", "127.0.0.1", 80) == ProxyServer("plain", 3)  # as configured
    targets = policy(None, environ, loopback_direct=True)
    for loopback in ("127.0.0.1", "localhost", "app.localhost", "::1", "127.0.0.9"):
        assert targets.choose("http", loopback, 3000) is None
    assert targets.choose("http", "app.example", 80) == ProxyServer("plain", 3)
    # The proxy key beats everything: environment, NO_PROXY, loopback.
    explicit = policy("http://key:4", environ, loopback_direct=True)
    assert explicit.choose("http", "127.0.0.1", 3000) == ProxyServer("key", 4)
    assert explicit.choose("https", "api.internal.example", 443) == ProxyServer("key", 4)
    assert policy(None, {}, loopback_direct=False).choose("https", "x", 443) is None
    with pytest.raises(ValueError, match="^HTTPS_PROXY: socks5:// proxies are not supported"):
        environment_proxies({"HTTPS_PROXY": "socks5://proxy:1080"})


# Bad input: one line, exit 2, before dialling --------------------------------------------------


def base_settings(workdir: Path, **extra: object) -> dict[str, object]:
    return {
        "cloud_url": "http://127.0.0.1:9",
        "channel": "bad",
        "token": "t" * 8,
        "state_dir": str(workdir / "state"),
        "default_target": {"url": "http://127.0.0.1:9/"},
        **extra,
    }


@pytest.mark.parametrize(
    ("extra", "environ", "expected"),
    [
        ({"proxy": "socks5://proxy:1080"}, {}, "json: proxy: socks5:// proxies are not supported"),
        ({}, {"HTTPS_PROXY": "socks4://proxy:1080"}, "HTTPS_PROXY: socks4:// proxies"),
        ({"client_cert": "/nonexistent/client.pem"}, {}, "client_cert: /nonexistent/client.pem"),
        ({"client_key": "/nonexistent/client.key"}, {}, "client_key: needs client_cert"),
        ({"ca_file": "/nonexistent/ca.pem"}, {}, "ca_file: /nonexistent/ca.pem: cannot read"),
    ],
)
def test_bad_proxy_urls_and_unreadable_certificates_are_refused_at_start(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    extra: dict[str, object],
    environ: dict[str, str],
    expected: str,
) -> None:
    for variable, value in environ.items():
        monkeypatch.setenv(variable, value)  # the connector process inherits it
    with running(ConnectorProcess(tmp_path, base_settings(tmp_path, **extra))) as connector:
        assert connector.wait() == 2
        lines = connector.output().strip().splitlines()
    assert len(lines) == 1, lines
    assert expected in lines[0], lines[0]


def test_a_certificate_file_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "client.pem"
    junk.write_text("not a certificate\n")
    path = tmp_path / "connector.json"
    path.write_text(json.dumps(base_settings(tmp_path, client_cert=str(junk))))
    with pytest.raises(ConfigError) as raised:
        load_connector_settings(path, {}, {})
    assert raised.value.key_path == "client_cert"
    assert "not a usable PEM file" in raised.value.reason


# Through a real proxy --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sink]:
    with running(Sink(tmp_path_factory.mktemp("sink"))) as server:
        yield server


@pytest.fixture(scope="module")
def auth_proxy(
    module_cloud: Cloud, sink: Sink, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tinyproxy]:
    """tinyproxy with Basic authentication, resolving the cloud's and the target's names."""
    proxy = Tinyproxy(
        tmp_path_factory.mktemp("auth-proxy"),
        connect_ports=[module_cloud.port, sink.port],
        credentials=CREDENTIALS,
        hosts={CLOUD_NAME: "127.0.0.1", TARGET_NAME: "127.0.0.1"},
    )
    with running(proxy):
        yield proxy


@pytest.fixture(scope="module")
def open_proxy(
    module_cloud: Cloud, sink: Sink, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tinyproxy]:
    """tinyproxy without authentication, as HTTP_PROXY / HTTPS_PROXY would name it."""
    proxy = Tinyproxy(
        tmp_path_factory.mktemp("open-proxy"),
        connect_ports=[module_cloud.port, sink.port],
        hosts={CLOUD_NAME: "127.0.0.1", TARGET_NAME: "127.0.0.1"},
    )
    with running(proxy):
        yield proxy


def settings_for(
    cloud_url: str, name: str, sink: Sink, workdir: Path, **extra: object
) -> dict[str, object]:
    return {
        "cloud_url": cloud_url,
        "channel": name,
        "token": token(name),
        "connector_id": f"proxy-test-{name}",
        "state_dir": str(workdir / "state"),
        "reconnect_delay_seconds": 0.2,
        "max_reconnect_delay_seconds": 1,
        "default_target": {"url": sink.url, "timeout_seconds": 5, "retry_max_attempts": 1},
        **extra,
    }


def post(cloud: Cloud, webhook: str, body: bytes) -> str:
    answer = httpx.post(f"{cloud.url}/webhook/{webhook}", content=body, timeout=10)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["message_id"])


def delivered(sink: Sink, message_id: str) -> list[dict[str, object]]:
    found = []
    for record in sink.records():
        headers = {str(k).lower(): v for k, v in record["headers"]}  # type: ignore[union-attr]
        if headers.get("x-webhook-connect-message-id") == message_id:
            found.append(record)
    return found


def settled(cloud: Cloud, name: str) -> bool:
    """Every message of the channel acked: none waiting, none in flight."""

    async def read() -> bool:
        store = open_buffer(cloud.storage)
        try:
            stats = await store.stats(name)
        finally:
            await store.aclose()
        return stats.in_flight == 0 and stats.counters.get("delivered", 0) >= 1

    return asyncio.run(read())


def relay_one(
    cloud: Cloud, sink: Sink, connector: ConnectorProcess, webhook: str, name: str
) -> dict[str, object]:
    """Post one webhook; wait until the sink has it and the cloud has its ack."""
    wait_until(lambda: "connected to" in connector.output(), 20, f"{name} to connect")
    body = f"through the proxy: {name}".encode()
    message_id = post(cloud, webhook, body)
    wait_until(lambda: delivered(sink, message_id), 20, f"{name}'s delivery")
    wait_until(lambda: settled(cloud, name), 20, f"{name}'s ack")
    [record] = delivered(sink, message_id)
    assert base64.b64decode(str(record["body_b64"])) == body
    return record


@pytest.mark.parametrize("protocol", TRANSPORTS)
def test_every_transport_goes_through_the_proxy_key_with_basic_auth(
    module_cloud: Cloud, sink: Sink, auth_proxy: Tinyproxy, tmp_path: Path, protocol: str
) -> None:
    name = f"proxied-{protocol}"
    cloud_url = f"http://{CLOUD_NAME}:{module_cloud.port}"
    settings = settings_for(
        cloud_url, name, sink, tmp_path, protocol=protocol, proxy=auth_proxy.url
    )
    before = len(auth_proxy.tunnels())
    with running(ConnectorProcess(tmp_path, settings)) as connector:
        relay_one(module_cloud, sink, connector, name, name)
        tunnels = auth_proxy.tunnels()[before:]
    # Everything went to the cloud's name through CONNECT; the sink (loopback) went direct.
    assert tunnels, auth_proxy.output()
    assert set(tunnels) == {f"{CLOUD_NAME}:{module_cloud.port}"}
    # The stream's and the acks' connections are apart on SSE and long-poll: both tunnelled.
    assert len(tunnels) >= (1 if protocol == "websocket" else 2), tunnels


def test_the_environment_proxy_takes_the_cloud_and_remote_targets_but_not_loopback(
    module_cloud: Cloud,
    sink: Sink,
    open_proxy: Tinyproxy,
    auth_proxy: Tinyproxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = "environment"
    remote = {"url": f"http://{TARGET_NAME}:{sink.port}/remote", "proxy": auth_proxy.url}
    settings = settings_for(
        f"http://{CLOUD_NAME}:{module_cloud.port}",
        name,
        sink,
        tmp_path,
        protocol="sse",
        targets={"environment-remote": remote},
    )
    monkeypatch.setenv("HTTP_PROXY", open_proxy.url)
    monkeypatch.setenv("NO_PROXY", "example.org")
    open_before, auth_before = len(open_proxy.tunnels()), len(auth_proxy.tunnels())
    with running(ConnectorProcess(tmp_path, settings)) as connector:
        local = relay_one(module_cloud, sink, connector, "environment-local", name)
        remote_record = relay_one(module_cloud, sink, connector, "environment-remote", name)
    assert (local["path"], remote_record["path"]) == ("/", "/remote")
    # The cloud through HTTP_PROXY; the loopback target direct although HTTP_PROXY is set.
    assert set(open_proxy.tunnels()[open_before:]) == {f"{CLOUD_NAME}:{module_cloud.port}"}
    # The remote target through its own proxy key, by a name only that proxy resolves.
    assert auth_proxy.tunnels()[auth_before:] == [f"{TARGET_NAME}:{sink.port}"]


def test_no_proxy_sends_the_cloud_direct(
    module_cloud: Cloud,
    sink: Sink,
    open_proxy: Tinyproxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = "no-proxy"
    settings = settings_for(module_cloud.url, name, sink, tmp_path, protocol="long_poll")
    monkeypatch.setenv("http_proxy", open_proxy.url)
    monkeypatch.setenv("no_proxy", "example.org, 127.0.0.1")
    before = len(open_proxy.requests())
    with running(ConnectorProcess(tmp_path, settings)) as connector:
        relay_one(module_cloud, sink, connector, name, name)
    assert open_proxy.requests()[before:] == []


def test_a_proxy_refusing_the_credentials_is_logged_and_retried(
    module_cloud: Cloud, sink: Sink, auth_proxy: Tinyproxy, tmp_path: Path
) -> None:
    name = "wrong-password"
    wrong = auth_proxy.url.replace(CREDENTIALS[1], "wrong")
    settings = settings_for(
        f"http://{CLOUD_NAME}:{module_cloud.port}", name, sink, tmp_path, proxy=wrong
    )
    with running(ConnectorProcess(tmp_path, settings)) as connector:
        refusal = f"proxy 127.0.0.1:{auth_proxy.port} refused CONNECT"
        wait_until(lambda: connector.output().count(refusal) >= 2, 20, "two refused attempts")
        assert connector.process is not None and connector.process.poll() is None
        # tinyproxy answers 401 (the standard is 407): either is the proxy's refusal.
        assert re.search(r"refused CONNECT \S+: 40[17] ", connector.output()), connector.output()
        assert "wrong" not in connector.output(), "the password is never logged"


# Client certificates to the cloud ------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls(
    module_cloud: Cloud, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[MutualTlsNginx, ClientCertificate]]:
    workdir = tmp_path_factory.mktemp("mtls")
    certs = make_certificates(workdir / "server")
    client = make_client_certificate(workdir / "client")
    upstream = f"127.0.0.1:{module_cloud.port}"
    with running(MutualTlsNginx(workdir / "nginx", certs, upstream, client)) as nginx:
        yield nginx, client


@pytest.mark.parametrize("protocol", TRANSPORTS)
def test_a_client_certificate_gets_through_a_proxy_that_requires_one(
    module_cloud: Cloud,
    sink: Sink,
    mtls: tuple[MutualTlsNginx, ClientCertificate],
    tmp_path: Path,
    protocol: str,
) -> None:
    nginx, client = mtls
    name = f"mtls-{protocol}"
    settings = settings_for(
        nginx.url,
        name,
        sink,
        tmp_path,
        protocol=protocol,
        ca_file=str(nginx.certs.ca_file),
        client_cert=str(client.cert_file),
        client_key=str(client.key_file),
    )
    with running(ConnectorProcess(tmp_path, settings)) as connector:
        relay_one(module_cloud, sink, connector, name, name)


@pytest.mark.parametrize("protocol", TRANSPORTS)
def test_without_the_client_certificate_the_connector_says_so_and_keeps_trying(
    module_cloud: Cloud,
    sink: Sink,
    mtls: tuple[MutualTlsNginx, ClientCertificate],
    tmp_path: Path,
    protocol: str,
) -> None:
    nginx, _ = mtls
    name = "no-certificate"
    settings = settings_for(
        nginx.url, name, sink, tmp_path, protocol=protocol, ca_file=str(nginx.certs.ca_file)
    )
    with running(ConnectorProcess(tmp_path, settings)) as connector:
        # nginx answers 400 "No required SSL certificate was sent": not fatal, retried.
        wait_until(lambda: connector.output().count("400") >= 2, 20, "two refused attempts")
        assert connector.process is not None and connector.process.poll() is None, (
            connector.output()
        )
        assert "connected to" not in connector.output()


@pytest.mark.parametrize("protocol", TRANSPORTS)
def test_tls_and_the_client_certificate_inside_the_proxy_tunnel(
    module_cloud: Cloud,
    sink: Sink,
    mtls: tuple[MutualTlsNginx, ClientCertificate],
    tmp_path: Path,
    protocol: str,
) -> None:
    """The corporate case in one: an https/wss cloud requiring a client certificate, reached
    only through the proxy (TLS end to end inside the CONNECT tunnel)."""
    nginx, client = mtls
    name = f"tunnel-{protocol}"
    proxy = Tinyproxy(tmp_path / "proxy", connect_ports=[nginx.port], credentials=CREDENTIALS)
    settings = settings_for(
        f"https://localhost:{nginx.port}",
        name,
        sink,
        tmp_path,
        protocol=protocol,
        proxy=proxy.url,
        ca_file=str(nginx.certs.ca_file),
        client_cert=str(client.pem_file),  # certificate and key in one file
    )
    with running(proxy), running(ConnectorProcess(tmp_path, settings)) as connector:
        relay_one(module_cloud, sink, connector, name, name)
        tunnels = proxy.tunnels()
    assert tunnels and set(tunnels) == {f"localhost:{nginx.port}"}, proxy.output()
