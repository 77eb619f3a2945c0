"""Targets over HTTPS and redirects: what the connector does when a local target redirects,
presents a certificate of its own CA, demands a client certificate or is not there.

Real uvicorn targets (tests/targets.py) with certificates of a CA made here; the connector's
own HttpDeliverer delivers to them, and one end-to-end run goes through the real connector
process and cloud to see the dead letter's reason and the warning line.
"""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.proxies import (
    Certificates,
    ClientCertificate,
    make_certificates,
    make_client_certificate,
)
from tests.servers import Cloud, ConnectorProcess, running, wait_until
from tests.targets import TargetServer
from webhook_connect.cloud.buffers import DeadLetter, open_buffer
from webhook_connect.connector.config import ConnectorSettings, Target
from webhook_connect.connector.delivery import (
    DeliveryResult,
    HttpDeliverer,
    redirect_location,
    target_proxies,
)
from webhook_connect.connector.httpclient import HttpClient
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.frames import WireMessage
from webhook_connect.shared.policy import Outcome

TOKEN = "targets-token-0123456789"
WEBHOOKS = {
    "raw": {
        "module": "webhook_connect",
        "data_type": "blob",
        "module-config": {
            "channel": "targets",
            "channel_token": TOKEN,
            "retry_delay_seconds": 0.2,
        },
    }
}
BODY = b'{"order": 42, "note": "caf\xc3\xa9"}'


# Pure rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "status", "location", "expected"),
    [
        ("http://a/x", 307, "/y", ("http://a/y", "")),
        ("http://a/x", 308, "https://b/y", ("https://b/y", "")),
        ("https://a/x", 307, "https://a:8443/y?q=1", ("https://a:8443/y?q=1", "")),
        ("https://a/x", 308, "http://a/y", (None, "not followed from https to http")),
        ("http://a/x", 307, "ftp://a/y", (None, "not an http(s) URL")),
        ("http://a/x", 302, "/login", (None, "redirect 302 to http://a/login")),
        ("http://a/x", 301, "https://b/", (None, "redirect 301 to https://b/")),
        ("http://a/x", 303, "/done", (None, "redirect 303 to http://a/done")),
        ("http://a/x", 307, None, (None, "redirect 307 without a Location")),
    ],
)
def test_which_redirects_are_followed(
    url: str, status: int, location: str | None, expected: tuple[str | None, str]
) -> None:
    next_url, why = redirect_location(url, status, location)
    assert next_url == expected[0]
    assert expected[1] in why
    assert (why == "") == (next_url is not None)


def test_the_nack_reason_keeps_the_short_word_and_adds_the_cause() -> None:
    def result(**keys: Any) -> DeliveryResult:
        return DeliveryResult(Outcome.RETRY, "http://t/", **keys)

    assert result(status=400).reason == "http_400"
    assert result(status=503).reason == "http_503"
    refused = result(error="connection refused", code="connection_error")
    assert refused.reason == "connection_error: connection refused"
    assert result(status=302, error="redirect 302 to http://t/x").reason == (
        "http_302: redirect 302 to http://t/x"
    )
    assert result(error="no_target").reason == "no_target"  # module mode's words, unchanged
    assert len(result(error="x" * 900, code="timeout").reason) == 500  # the cloud's limit


# Real targets ------------------------------------------------------------------------------


@dataclass
class Tls:
    certs: Certificates  # the CA the targets' certificates come from
    other: Certificates  # a CA nobody trusts
    client: ClientCertificate  # what the mTLS target demands


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    base = tmp_path_factory.mktemp("tls")
    return Tls(
        make_certificates(base / "ca"),
        make_certificates(base / "other"),
        make_client_certificate(base / "client"),
    )


@dataclass
class Targets:
    plain: TargetServer
    secure: TargetServer  # a certificate of tls.certs
    untrusted: TargetServer  # a certificate of tls.other
    mutual: TargetServer  # tls.certs, and requires a client certificate of tls.client


@pytest.fixture(scope="module")
def targets(tls: Tls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Targets]:
    workdir = tmp_path_factory.mktemp("targets")
    cert = (tls.certs.cert_file, tls.certs.key_file)
    with (
        running(TargetServer(workdir)) as plain,
        running(TargetServer(workdir, cert=cert)) as secure,
        running(TargetServer(workdir, cert=(tls.other.cert_file, tls.other.key_file))) as bad,
        running(TargetServer(workdir, cert=cert, client_ca=tls.client.ca_file)) as mutual,
    ):
        yield Targets(plain, secure, bad, mutual)


def message(body: bytes = BODY, method: str = "POST") -> WireMessage:
    envelope = Envelope(
        channel="targets",
        webhook_id="raw",
        received_at=0.0,
        method=method,
        path="/webhook/raw",
        query_string="",
        headers=(("Content-Type", "application/json"), ("X-Test", "kept")),
        body=body,
    )
    return WireMessage("1700000000000-0", 1, 1, "targets", envelope)


@pytest.fixture
async def deliver() -> AsyncIterator[Any]:
    """Deliver one message to a target given by its keys; returns the DeliveryResult."""
    clients: list[HttpClient] = []
    deliverers: list[HttpDeliverer] = []

    async def run(wire: WireMessage | None = None, **target: Any) -> DeliveryResult:
        target.setdefault("retry_max_attempts", 1)
        settings = ConnectorSettings(
            cloud_url="http://127.0.0.1:9",
            channel="targets",
            token="t",
            default_target=Target(**target),
        )
        client = HttpClient(proxies=target_proxies())
        deliverer = HttpDeliverer(settings, client)
        clients.append(client)
        deliverers.append(deliverer)
        await deliverer.start()
        return await deliverer.deliver(wire or message())

    yield run
    for deliverer in deliverers:
        await deliverer.aclose()
    for client in clients:
        await client.aclose()


def since(server: TargetServer, before: int) -> list[dict[str, Any]]:
    return server.records()[before:]


async def test_a_307_and_a_308_are_followed_with_method_and_body(
    targets: Targets, tls: Tls, deliver: Any
) -> None:
    plain, secure = targets.plain, targets.secure
    before, before_secure = len(plain.records()), len(secure.records())
    # 307 on the same server, PUT kept.
    result = await deliver(message(method="PUT"), url=f"{plain.url}/redirect/307?to=/moved")
    assert (result.outcome, result.status) == (Outcome.DELIVERED, 200)
    [moved] = since(plain, before)
    assert (moved["method"], moved["path"]) == ("PUT", "/moved")
    assert base64.b64decode(moved["body_b64"]) == BODY
    assert ["X-Test", "kept"] in [[k.title(), v] for k, v in moved["headers"]]
    # 308 from http to https, the https target checked against ca_file.
    to = quote(f"{secure.url}/secured", safe="")
    result = await deliver(url=f"{plain.url}/redirect/308?to={to}", ca_file=str(tls.certs.ca_file))
    assert (result.outcome, result.status) == (Outcome.DELIVERED, 200)
    [arrived] = since(secure, before_secure)
    assert (arrived["method"], arrived["scheme"], arrived["path"]) == ("POST", "https", "/secured")
    assert base64.b64decode(arrived["body_b64"]) == BODY


async def test_five_hops_are_followed_and_a_sixth_is_not(targets: Targets, deliver: Any) -> None:
    plain = targets.plain
    before = len(plain.records())
    result = await deliver(url=f"{plain.url}/chain/5")
    assert result.outcome is Outcome.DELIVERED
    assert [r["path"] for r in since(plain, before)] == ["/chain/0"]
    before = len(plain.records())
    result = await deliver(url=f"{plain.url}/chain/6")
    assert (result.outcome, result.status) == (Outcome.REJECTED, 307)
    assert "more than 5 redirects" in result.error
    assert since(plain, before) == []


async def test_https_to_http_is_not_followed(targets: Targets, tls: Tls, deliver: Any) -> None:
    plain = targets.plain
    before = len(plain.records())
    to = quote(f"{plain.url}/downgraded", safe="")
    result = await deliver(
        url=f"{targets.secure.url}/redirect/307?to={to}", ca_file=str(tls.certs.ca_file)
    )
    assert (result.outcome, result.status) == (Outcome.REJECTED, 307)
    assert "not followed from https to http" in result.error
    assert since(plain, before) == []


@pytest.mark.parametrize("status", [301, 302, 303])
async def test_301_302_303_are_permanent_failures_naming_the_location(
    targets: Targets, deliver: Any, status: int
) -> None:
    plain = targets.plain
    before = len(plain.records())
    to = quote("https://example.test/login?next=/hook", safe="")
    result = await deliver(url=f"{plain.url}/redirect/{status}?to={to}", retry_max_attempts=3)
    assert (result.outcome, result.status, result.attempts) == (Outcome.REJECTED, status, 1)
    assert result.error == f"redirect {status} to https://example.test/login?next=/hook"
    assert result.reason == f"http_{status}: {result.error}"
    assert since(plain, before) == []


async def test_a_target_of_an_unknown_ca_fails_with_the_tls_cause(
    targets: Targets, tls: Tls, deliver: Any
) -> None:
    untrusted = targets.untrusted
    result = await deliver(url=f"{untrusted.url}/hook")
    assert result.outcome is Outcome.RETRY
    assert result.error.startswith("TLS: certificate verify failed for localhost"), result.error
    assert result.reason.startswith("connection_error: TLS: certificate verify failed")
    # Trusting its CA, or not checking at all, gets it through.
    before = len(untrusted.records())
    trusted = await deliver(url=f"{untrusted.url}/hook", ca_file=str(tls.other.ca_file))
    unchecked = await deliver(url=f"{untrusted.url}/hook", verify_tls=False)
    assert (trusted.outcome, unchecked.outcome) == (Outcome.DELIVERED, Outcome.DELIVERED)
    assert len(since(untrusted, before)) == 2


async def test_a_target_requiring_a_client_certificate(
    targets: Targets, tls: Tls, deliver: Any
) -> None:
    mutual = targets.mutual
    before = len(mutual.records())
    ca = str(tls.certs.ca_file)
    without = await deliver(url=f"{mutual.url}/hook", ca_file=ca)
    assert without.outcome is Outcome.RETRY
    # Python's TLS server closes without sending its alert: the cause is the closed connection.
    assert without.reason.startswith("connection_error: "), without.reason
    assert since(mutual, before) == []
    split = await deliver(
        url=f"{mutual.url}/hook",
        ca_file=ca,
        client_cert=str(tls.client.cert_file),
        client_key=str(tls.client.key_file),
    )
    together = await deliver(
        url=f"{mutual.url}/hook", ca_file=ca, client_cert=str(tls.client.pem_file)
    )
    assert (split.outcome, together.outcome) == (Outcome.DELIVERED, Outcome.DELIVERED)
    assert len(since(mutual, before)) == 2


async def test_connection_refused_and_timeout_say_so(deliver: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        refused = await deliver(url=f"http://127.0.0.1:{port}/")
        sock.listen()  # accepts connections, never answers
        hanging = await deliver(url=f"http://127.0.0.1:{port}/", timeout_seconds=0.5)
    assert (refused.outcome, refused.error) == (Outcome.RETRY, "connection refused")
    assert refused.reason == "connection_error: connection refused"
    assert (hanging.outcome, hanging.error) == (Outcome.RETRY, "timeout after 0.5 s")
    assert hanging.reason == "timeout: timeout after 0.5 s"


# Through the real connector ------------------------------------------------------------------


def dead_letters(cloud: Cloud) -> list[DeadLetter]:
    async def read() -> list[DeadLetter]:
        store = open_buffer(cloud.storage)
        try:
            return await store.dead_letters("targets")
        finally:
            await store.aclose()

    return asyncio.run(read())


def test_the_connector_warns_about_an_unchecked_target_and_dead_letters_a_302_by_its_location(
    module_cloud: Cloud, targets: Targets, tmp_path: Path
) -> None:
    to = quote("https://sso.example.test/login", safe="")
    settings = {
        "cloud_url": module_cloud.url,
        "channel": "targets",
        "token": TOKEN,
        "connector_id": "targets-test",
        "state_dir": str(tmp_path / "state"),
        "reconnect_delay_seconds": 0.2,
        "default_target": {"url": f"{targets.plain.url}/redirect/302?to={to}"},
        "targets": {
            "unchecked": {"url": f"{targets.untrusted.url}/hook", "verify_tls": False},
        },
    }
    with running(ConnectorProcess(tmp_path, settings)) as connector:
        wait_until(lambda: "connected to" in connector.output(), 20, "the connector to connect")
        warnings = [
            line for line in connector.output().splitlines() if "verify_tls is false" in line
        ]
        assert len(warnings) == 1, connector.output()
        assert "targets.unchecked" in warnings[0] and targets.untrusted.url in warnings[0]
        answer = httpx.post(f"{module_cloud.url}/webhook/raw", content=BODY, timeout=10)
        assert answer.status_code == 202, answer.text
        message_id = answer.json()["message_id"]
        wait_until(lambda: dead_letters(module_cloud), 20, "the dead letter")
        [letter] = dead_letters(module_cloud)
        assert letter.message_id == message_id
        assert letter.reason == "http_302: redirect 302 to https://sso.example.test/login"


def test_an_unreadable_target_certificate_stops_the_connector_before_dialling(
    tmp_path: Path,
) -> None:
    settings = {
        "cloud_url": "http://127.0.0.1:9",
        "channel": "targets",
        "token": TOKEN,
        "default_target": {"url": "https://localhost:1/", "ca_file": str(tmp_path / "nope.pem")},
    }
    with running(ConnectorProcess(tmp_path, settings)) as connector:
        assert connector.wait() == 2
        lines = connector.output().strip().splitlines()
    assert len(lines) == 1, lines
    assert "default_target.ca_file" in lines[0] and "nope.pem: cannot read" in lines[0]
