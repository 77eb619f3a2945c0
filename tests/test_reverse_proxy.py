"""The cloud behind real reverse proxies, configured as ``deploy/`` and docs/DEPLOY.md say.

nginx, Caddy and HAProxy (Debian packages) terminate TLS with a certificate of a test CA in
front of one real cloud. Through each, a webhook travels to the real connector over
WebSocket, SSE and long-poll (HTTPS, the connector trusting the CA through ``ca_file``) and on
to a real sink, byte for byte. Through nginx, Caddy and HAProxy, a sender's forged
``X-Forwarded-For`` / ``X-Real-IP`` never passes ``ip_whitelist``, and the address stored with a
message is the sender's real one.

The sender posts from 127.0.0.5, the proxies reach the cloud from 127.0.0.1: on loopback both
would otherwise share one address, and a trusted proxy's address is skipped as a hop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.proxies import Caddy, Certificates, HAProxy, Nginx, Proxy, make_certificates
from tests.servers import REPO, Cloud, ConnectorProcess, Sink, running, wait_until
from webhook_connect.cloud.security.network import client_address, header_list, parse_networks
from webhook_connect.shared.config import load_webhooks
from webhook_connect.shared.frames import NATIVE_SUBPROTOCOL, decode_native_batch

SENDER = "127.0.0.5"  # the webhook sender's own loopback address
FORGED = "198.51.100.7"  # what a forger claims to be (TEST-NET-2)
PROXY_HOPS = ["127.0.0.1"]  # where every proxy of these tests connects to the cloud from
TRANSPORTS = ("websocket", "sse", "long_poll")
# Which header each proxy's committed configuration sets for the cloud.
CLIENT_IP_HEADER = {"nginx": "x-real-ip", "caddy": "x-forwarded-for", "haproxy": "x-forwarded-for"}


def token(channel: str) -> str:
    return f"{channel}-token-0123456789"


def entry(channel: str, proxy: str, **keys: object) -> dict[str, object]:
    """A webhook of its own channel, behind ``proxy`` as its configuration guide says."""
    return {
        "module": "webhook_connect",
        "data_type": "blob",
        "trusted_proxies": PROXY_HOPS,
        "client_ip_header": CLIENT_IP_HEADER[proxy],
        "module-config": {"channel": channel, "channel_token": token(channel)},
        **keys,
    }


WEBHOOKS: dict[str, object] = {
    **{
        f"relay-{proxy}-{transport}": entry(f"relay-{proxy}-{transport}", proxy)
        for proxy in CLIENT_IP_HEADER
        for transport in TRANSPORTS
    },
    # Allows only the forged address: a request must never get in.
    **{f"forged-{p}": entry(f"forged-{p}", p, ip_whitelist=[FORGED]) for p in CLIENT_IP_HEADER},
    # Allows only the real sender: gets in, and stores the sender's address.
    **{f"sender-{p}": entry(f"sender-{p}", p, ip_whitelist=[SENDER]) for p in CLIENT_IP_HEADER},
    **{f"prefix-{t}": entry(f"prefix-{t}", "nginx") for t in TRANSPORTS},
    # The cloud's default max_body_size, which the proxies' limit matches.
    **{f"size-{p}": entry(f"size-{p}", p) for p in CLIENT_IP_HEADER},
}
MAX_BODY = 1024 * 1024

# What a forger sends: the address it claims, in either header, on one line or several.
FORGERIES = {
    "x-forwarded-for": [("X-Forwarded-For", FORGED)],
    "x-real-ip": [("X-Real-IP", FORGED)],
    "both": [("X-Forwarded-For", FORGED), ("X-Real-IP", FORGED)],
    "two x-forwarded-for lines": [("X-Forwarded-For", FORGED), ("X-Forwarded-For", FORGED)],
    "two x-real-ip lines": [("X-Real-IP", FORGED), ("X-Real-IP", FORGED)],
    "a chain": [("X-Forwarded-For", f"{FORGED}, 127.0.0.1")],
}


# The pure function ---------------------------------------------------------------------------

TRUSTED = parse_networks(["10.0.0.0/8"])
PROXY = "10.0.0.2"
XFF, XRI = b"x-forwarded-for", b"x-real-ip"


def test_repeated_lines_are_one_list_in_order() -> None:
    headers = [(XFF, b"1.1.1.1, 2.2.2.2"), (b"host", b"x"), (XFF, b" 3.3.3.3 ,, ")]
    assert header_list(headers, "X-Forwarded-For") == ["1.1.1.1", "2.2.2.2", "3.3.3.3"]
    assert header_list(headers, "x-real-ip") == []


def test_a_proxy_line_after_the_forged_one_names_the_client() -> None:
    # HAProxy's `option forwardfor` adds its own line after the sender's.
    headers = [(XFF, FORGED.encode()), (XFF, b"203.0.113.9")]
    assert client_address(PROXY, headers, TRUSTED) == "203.0.113.9"


def test_forged_entries_left_of_the_trusted_hops_do_not_count() -> None:
    headers = [(XFF, f"{FORGED}, 203.0.113.9".encode()), (XFF, b"10.0.0.7")]
    assert client_address(PROXY, headers, TRUSTED) == "203.0.113.9"
    everything_ours = [(XFF, b"10.0.0.8, 10.0.0.7")]
    assert client_address(PROXY, everything_ours, TRUSTED) == "10.0.0.8"


def test_a_duplicated_x_real_ip_is_read_from_the_right() -> None:
    headers = [(XRI, FORGED.encode()), (XRI, b"203.0.113.9")]
    assert client_address(PROXY, headers, TRUSTED, "x-real-ip") == "203.0.113.9"


def test_only_the_configured_header_counts() -> None:
    # An nginx that sets only X-Real-IP passes the sender's X-Forwarded-For untouched.
    headers = [(XFF, FORGED.encode()), (XRI, b"203.0.113.9")]
    assert client_address(PROXY, headers, TRUSTED, "x-real-ip") == "203.0.113.9"
    assert client_address(PROXY, [(XRI, FORGED.encode())], TRUSTED) == PROXY
    assert client_address(PROXY, [(XFF, FORGED.encode())], TRUSTED, "x-real-ip") == PROXY


def test_headers_from_an_untrusted_peer_are_ignored() -> None:
    headers = [(XFF, FORGED.encode()), (XRI, FORGED.encode())]
    assert client_address("203.0.113.9", headers, TRUSTED) == "203.0.113.9"
    assert client_address("203.0.113.9", headers, TRUSTED, "x-real-ip") == "203.0.113.9"
    assert client_address(PROXY, headers, ()) == PROXY


def test_garbage_and_ipv6_in_the_chain() -> None:
    assert client_address(PROXY, [(XFF, b"203.0.113.9, junk")], TRUSTED) == PROXY
    assert client_address(PROXY, [(XFF, b"junk, 203.0.113.9")], TRUSTED) == "203.0.113.9"
    assert client_address(PROXY, [(XFF, b"[2001:db8::1]:443")], TRUSTED) == "2001:db8::1"
    assert client_address(f"::ffff:{PROXY}", [(XFF, b"203.0.113.9")], TRUSTED) == "203.0.113.9"


# Configuration -------------------------------------------------------------------------------


def run_cloud_config(tmp_path: Path, value: str) -> subprocess.CompletedProcess[str]:
    webhooks = tmp_path / "webhooks.json"
    webhook = entry("c", "nginx")
    webhook["client_ip_header"] = value
    webhooks.write_text(json.dumps({"hook": webhook}))
    args = [
        sys.executable,
        "-m",
        "webhook_connect",
        "cloud",
        "--webhooks",
        str(webhooks),
        "--storage",
        f"sqlite:///{tmp_path / 'b.db'}",
        "--port",
        "1",
    ]
    return subprocess.run(
        args,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_an_unknown_client_ip_header_is_a_configuration_error(tmp_path: Path) -> None:
    result = run_cloud_config(tmp_path, "x-client-ip")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "hook.client_ip_header" in lines[0] and "x-real-ip" in lines[0]


def test_client_ip_header_is_read_in_any_case(tmp_path: Path) -> None:
    path = tmp_path / "webhooks.json"
    webhook = entry("c", "nginx")
    webhook["client_ip_header"] = "X-Real-IP"
    path.write_text(json.dumps({"hook": webhook}))
    assert load_webhooks(path)["hook"].entry.client_ip_header == "x-real-ip"
    del webhook["client_ip_header"]
    path.write_text(json.dumps({"hook": webhook}))
    assert load_webhooks(path)["hook"].entry.client_ip_header == "x-forwarded-for"


# Through the proxies -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def proxy_in_front(
    kind: type[Proxy], cloud: Cloud, certs: Certificates, factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    with running(kind(factory.mktemp(kind.name), certs, f"127.0.0.1:{cloud.port}")) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def nginx(
    module_cloud: Cloud, certs: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    yield from proxy_in_front(Nginx, module_cloud, certs, tmp_path_factory)


@pytest.fixture(scope="module")
def caddy(
    module_cloud: Cloud, certs: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    yield from proxy_in_front(Caddy, module_cloud, certs, tmp_path_factory)


@pytest.fixture(scope="module")
def haproxy(
    module_cloud: Cloud, certs: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    yield from proxy_in_front(HAProxy, module_cloud, certs, tmp_path_factory)


@pytest.fixture(scope="module")
def module_sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sink]:
    with running(Sink(tmp_path_factory.mktemp("sink"))) as server:
        yield server


def sender(certs: Certificates) -> httpx.Client:
    """An HTTPS client posting from the sender's own address and trusting the test CA."""
    transport = httpx.HTTPTransport(local_address=SENDER, verify=certs.client_context())
    return httpx.Client(transport=transport, timeout=10)


def body_received(sink: Sink, body: bytes) -> dict[str, object] | None:
    encoded = base64.b64encode(body).decode()
    return next((r for r in sink.records() if r["body_b64"] == encoded), None)


def relay_through(
    base_url: str, channel: str, transport: str, certs: Certificates, sink: Sink, workdir: Path
) -> None:
    """Two webhooks posted to ``base_url`` reach ``sink`` through a connector of ``channel``
    that dials ``base_url`` over ``transport``, trusting the test CA: exact bytes and query."""
    settings = {
        "cloud_url": base_url,
        "channel": channel,
        "token": token(channel),
        "protocol": transport,
        "ca_file": str(certs.ca_file),
        "connector_id": channel,
        "state_dir": str(workdir / "state"),
        "reconnect_delay_seconds": 0.2,
        "max_reconnect_delay_seconds": 1,
        "default_target": {"url": sink.url, "timeout_seconds": 5},
    }
    connector = ConnectorProcess(workdir, settings)
    connector.start()
    try:
        with sender(certs) as client:
            # The first waits in the channel until the connector is in; the second is sent
            # while it is connected, so a proxy that buffered the stream would hold it back.
            for n in (1, 2):
                body = f"{channel} #{n}\r\n".encode() + bytes(range(256))
                answer = client.post(f"{base_url}/webhook/{channel}?n={n}", content=body)
                assert answer.status_code == 202, answer.text
                try:
                    wait_until(lambda body=body: body_received(sink, body), 30)  # type: ignore[misc]
                except TimeoutError:
                    raise AssertionError(f"message {n} lost: {connector.output()}") from None
                record = body_received(sink, body)
                assert record is not None
                assert base64.b64decode(str(record["body_b64"])) == body
                assert record["query"] == f"n={n}"
        assert "connected to" in connector.output()
    finally:
        connector.stop(signal.SIGKILL)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("proxy_name", ["nginx", "caddy", "haproxy"])
def test_a_webhook_reaches_the_sink_through_the_proxy(
    proxy_name: str,
    transport: str,
    request: pytest.FixtureRequest,
    certs: Certificates,
    module_sink: Sink,
    tmp_path: Path,
) -> None:
    proxy: Proxy = request.getfixturevalue(proxy_name)
    channel = f"relay-{proxy_name}-{transport}"
    relay_through(proxy.url, channel, transport, certs, module_sink, tmp_path)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_cloud_under_a_path_prefix(
    transport: str, nginx: Nginx, certs: Certificates, module_sink: Sink, tmp_path: Path
) -> None:
    # cloud_url https://host/hooks: every request of the connector keeps the /hooks prefix.
    relay_through(
        nginx.prefixed_url, f"prefix-{transport}", transport, certs, module_sink, tmp_path
    )


@pytest.mark.parametrize("proxy_name", ["nginx", "haproxy", "caddy"])
def test_the_body_limit_agrees_with_the_cloud(
    proxy_name: str, request: pytest.FixtureRequest, certs: Certificates
) -> None:
    proxy: Proxy = request.getfixturevalue(proxy_name)
    url = f"{proxy.url}/webhook/size-{proxy_name}"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while streaming
        for _ in range(20):
            yield b"c" * 65536

    with sender(certs) as client:
        assert client.post(url, content=b"a" * MAX_BODY).status_code == 202
        assert client.post(url, content=b"b" * (MAX_BODY + 1)).status_code == 413
        try:
            assert client.post(url, content=chunks()).status_code == 413
        except httpx.RemoteProtocolError:
            # HAProxy limits by Content-Length only: the cloud cuts the stream at its own
            # limit, answers 413 and closes, and HAProxy may pass on only the close.
            assert proxy_name == "haproxy"


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
@pytest.mark.parametrize("proxy_name", ["nginx", "haproxy", "caddy"])
def test_a_forged_client_address_never_passes(
    proxy_name: str, forgery: str, request: pytest.FixtureRequest, certs: Certificates
) -> None:
    proxy: Proxy = request.getfixturevalue(proxy_name)
    with sender(certs) as client:
        answer = client.post(
            f"{proxy.url}/webhook/forged-{proxy_name}", content=b"{}", headers=FORGERIES[forgery]
        )
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"] == "forbidden"


async def stored_clients(cloud: Cloud, channel: str, count: int) -> list[str]:
    """The client address stored with each of the first ``count`` messages of ``channel``, as
    a connector receives them (the native protocol's ``client``); nothing is acked."""
    url = f"ws://127.0.0.1:{cloud.port}/connect/stream/{channel}"
    headers = {"Authorization": f"Bearer {token(channel)}"}
    clients: list[str] = []
    async with connect(url, additional_headers=headers, subprotocols=[NATIVE_SUBPROTOCOL]) as ws:  # type: ignore[list-item]
        async with asyncio.timeout(20):
            while len(clients) < count:
                frame = await ws.recv()
                if isinstance(frame, bytes):
                    clients += [m.envelope.client for m in decode_native_batch(frame)]
    return clients


@pytest.mark.parametrize("proxy_name", ["nginx", "haproxy", "caddy"])
def test_the_real_sender_address_is_stored(
    proxy_name: str, request: pytest.FixtureRequest, certs: Certificates, module_cloud: Cloud
) -> None:
    proxy: Proxy = request.getfixturevalue(proxy_name)
    with sender(certs) as client:
        for forgery in sorted(FORGERIES):
            answer = client.post(
                f"{proxy.url}/webhook/sender-{proxy_name}",
                content=forgery.encode(),
                headers=FORGERIES[forgery],
            )
            assert answer.status_code == 202, f"{forgery}: {answer.text}"
    clients = asyncio.run(stored_clients(module_cloud, f"sender-{proxy_name}", len(FORGERIES)))
    assert clients == [SENDER] * len(FORGERIES)


def test_the_caddyfile_is_as_caddy_fmt_writes_it() -> None:
    # Caddy warns at every start about a file it would format differently.
    path = REPO / "deploy" / "caddy" / "Caddyfile"
    result = subprocess.run(
        [Caddy.binary, "fmt", str(path)], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout == path.read_text()
