"""Inbound security through the real cloud: shared-secret methods, HMAC, addresses, payload rules,
rate limits and idempotency in storage, live reload, OpenAPI, and secrets kept out of logs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import Cloud, running, wait_until
from webhook_connect.cloud.masking import SecretMasker
from webhook_connect.cloud.security.network import client_address, parse_networks

TOKEN = "inbound-connector-token"
RELAY = {"channel": "dev", "channel_token": TOKEN}
HMAC_SECRET = "hmac-secret-for-tests"
OLD_SECRET = "the-previous-hmac-secret"


def relay(**entry: object) -> dict[str, object]:
    return {"module": "webhook_connect", "module-config": RELAY, **entry}


WEBHOOKS = {
    "open": relay(),
    "bearer": relay(authorization="Bearer s3cret-bearer-token"),
    "literal": relay(authorization="let-me-in-literal"),
    "basic": relay(basic_auth={"username": "alice", "password": "wonder land"}),
    "header": relay(header_auth={"header_name": "X-API-Key", "api_key": "Header-Key-1"}),
    "header_cs": relay(
        header_auth={"header_name": "X-API-Key", "api_key": "Header-Key-1", "case_sensitive": True}
    ),
    "query": relay(query_auth={"parameter_name": "api_key", "api_key": "query-key-1"}),
    "hmac": relay(hmac={"secret": [HMAC_SECRET, OLD_SECRET], "header": "X-Hub-Signature-256"}),
    "hmac_b64": relay(
        data_type="blob",
        hmac={
            "secret": HMAC_SECRET,
            "header": "X-Sig",
            "algorithm": "sha512",
            "encoding": "base64",
        },
    ),
    "two": relay(
        authorization="Bearer two-methods-token",
        hmac={"secret": HMAC_SECRET, "header": "X-Signature", "algorithm": "sha1"},
    ),
    "local_only": relay(ip_whitelist=["127.0.0.0/8", "::1"]),
    "lan_only": relay(ip_whitelist=["10.1.0.0/16"]),
    "lan_via_proxy": relay(ip_whitelist=["10.1.0.0/16"], trusted_proxies=["127.0.0.1"]),
    "lan_via_real_ip": relay(
        ip_whitelist=["10.1.0.0/16"], trusted_proxies=["127.0.0.1"], client_ip_header="x-real-ip"
    ),
    "schema": relay(
        json_schema={
            "type": "object",
            "required": ["event"],
            "properties": {"event": {"type": "string"}, "n": {"$ref": "#/$defs/small"}},
            "$defs": {"small": {"type": "integer", "maximum": 10}},
        }
    ),
    "limits": relay(max_json_depth=3, max_string_length=8, max_headers=20, max_header_size=2048),
}
BODY = b'{"event": "push", "n": 1}'


def sign(secret: str, body: bytes, algorithm: str = "sha256") -> str:
    return hmac.new(secret.encode(), body, algorithm).hexdigest()


def post(cloud: Cloud, webhook: str, body: bytes = BODY, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{cloud.url}/webhook/{webhook}", content=body, timeout=10, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("webhook", "headers", "params", "status"),
    [
        ("open", {}, {}, 202),
        ("bearer", {"Authorization": "Bearer s3cret-bearer-token"}, {}, 202),
        ("bearer", {"Authorization": "Bearer s3cret-bearer-tokeN"}, {}, 401),
        ("bearer", {"Authorization": "bearer s3cret-bearer-token"}, {}, 401),
        ("bearer", {}, {}, 401),
        ("literal", {"Authorization": "let-me-in-literal"}, {}, 202),
        ("literal", {"Authorization": "let-me-in"}, {}, 401),
        ("header", {"X-API-Key": "header-key-1"}, {}, 202),
        ("header", {"x-api-key": "Header-Key-2"}, {}, 401),
        ("header", {}, {}, 401),
        ("header_cs", {"X-API-Key": "header-key-1"}, {}, 401),
        ("header_cs", {"X-API-Key": "Header-Key-1"}, {}, 202),
        ("query", {}, {"api_key": "query-key-1"}, 202),
        ("query", {}, {"api_key": "query-key-2"}, 401),
        ("query", {}, {"apikey": "query-key-1"}, 401),
        ("local_only", {}, {}, 202),
        ("lan_only", {}, {}, 403),
        # Spoofing through X-Forwarded-For from a peer that is not a trusted proxy.
        ("lan_only", {"X-Forwarded-For": "10.1.2.3"}, {}, 403),
        ("lan_via_proxy", {"X-Forwarded-For": "10.1.2.3"}, {}, 202),
        # Only the webhook's client_ip_header (X-Forwarded-For by default) names the client.
        ("lan_via_proxy", {"X-Real-IP": "10.1.2.3"}, {}, 403),
        ("lan_via_real_ip", {"X-Real-IP": "10.1.2.3"}, {}, 202),
        ("lan_via_real_ip", {"X-Forwarded-For": "10.1.2.3"}, {}, 403),
        # The proxy appends the real peer: a forged left part does not count.
        ("lan_via_proxy", {"X-Forwarded-For": "10.1.2.3, 192.0.2.7"}, {}, 403),
        ("lan_via_proxy", {}, {}, 403),
    ],
)
def test_shared_secrets_and_addresses(
    module_cloud: Cloud,
    webhook: str,
    headers: dict[str, str],
    params: dict[str, str],
    status: int,
) -> None:
    response = post(module_cloud, webhook, headers=headers, params=params)
    assert response.status_code == status, response.text
    if status == 401 and webhook == "bearer":
        assert response.headers["www-authenticate"] == 'Bearer realm="webhook"'
    if status == 403:
        assert response.json()["error"] == "forbidden"


def test_basic_auth(module_cloud: Cloud) -> None:
    url = f"{module_cloud.url}/webhook/basic"
    good = httpx.post(url, content=BODY, auth=("alice", "wonder land"))
    assert good.status_code == 202
    for user, password in [("alice", "wonder lan"), ("bob", "wonder land"), ("", "")]:
        bad = httpx.post(url, content=BODY, auth=(user, password))
        assert bad.status_code == 401
        assert bad.headers["www-authenticate"].startswith('Basic realm="webhook"')
    garbage = httpx.post(url, content=BODY, headers={"Authorization": "Basic %%%"})
    assert garbage.status_code == 401


def test_hmac_signatures(module_cloud: Cloud) -> None:
    good = sign(HMAC_SECRET, BODY)
    assert post(module_cloud, "hmac", headers={"X-Hub-Signature-256": good}).status_code == 202
    prefixed = "sha256=" + good
    assert post(module_cloud, "hmac", headers={"x-hub-signature-256": prefixed}).status_code == 202
    rotated = "sha256=" + sign(OLD_SECRET, BODY)
    assert post(module_cloud, "hmac", headers={"X-Hub-Signature-256": rotated}).status_code == 202
    # One byte of the body changed, a wrong secret, no header, not hex at all.
    changed = BODY.replace(b"push", b"pusH")
    for body, headers in [
        (changed, {"X-Hub-Signature-256": prefixed}),
        (BODY, {"X-Hub-Signature-256": "sha256=" + sign("wrong", BODY)}),
        (BODY, {}),
        (BODY, {"X-Hub-Signature-256": "sha256=zz"}),
    ]:
        response = post(module_cloud, "hmac", body, headers=headers)
        assert response.status_code == 401, headers
        assert good not in response.text

    blob = bytes(range(256))
    digest = hmac.new(HMAC_SECRET.encode(), blob, hashlib.sha512).digest()
    b64 = base64.b64encode(digest).decode()
    assert post(module_cloud, "hmac_b64", blob, headers={"X-Sig": b64}).status_code == 202
    assert post(module_cloud, "hmac_b64", blob[:-1], headers={"X-Sig": b64}).status_code == 401


def test_every_configured_method_must_pass(module_cloud: Cloud) -> None:
    signature = sign(HMAC_SECRET, BODY, "sha1")
    both = {"Authorization": "Bearer two-methods-token", "X-Signature": signature}
    assert post(module_cloud, "two", headers=both).status_code == 202
    assert post(module_cloud, "two", headers={"X-Signature": signature}).status_code == 401
    token_only = {"Authorization": "Bearer two-methods-token"}
    assert post(module_cloud, "two", headers=token_only).status_code == 401


@pytest.mark.parametrize(
    ("webhook", "body", "status", "error"),
    [
        ("schema", b'{"event": "push", "n": 3}', 202, None),
        ("schema", b'{"n": 3}', 422, "schema_violation"),
        ("schema", b'{"event": "push", "n": 11}', 422, "schema_violation"),
        ("schema", b'{"event": 5}', 422, "schema_violation"),
        ("schema", b'{"event": "push",', 400, "invalid_json"),
        ("limits", b'{"a": {"b": {"c": 1}}}', 202, None),
        ("limits", b'{"a": {"b": {"c": [1]}}}', 400, "payload_too_deep"),
        ("limits", b'{"a": "12345678"}', 202, None),
        ("limits", b'{"a": "123456789"}', 400, "string_too_long"),
        ("limits", b'{"123456789": 1}', 400, "string_too_long"),
        ("open", b"", 400, "invalid_json"),
    ],
)
def test_payload_rules(
    module_cloud: Cloud, webhook: str, body: bytes, status: int, error: str | None
) -> None:
    response = post(module_cloud, webhook, body)
    assert response.status_code == status, response.text
    if error:
        assert response.json()["error"] == error
    if error == "schema_violation":
        assert response.json()["detail"]  # names the failing place and why


def test_header_limits(module_cloud: Cloud) -> None:
    many = {f"X-Extra-{i}": "v" for i in range(25)}
    assert post(module_cloud, "limits", headers=many).status_code == 431
    big = {"X-Big": "v" * 3000}
    assert post(module_cloud, "limits", headers=big).status_code == 431
    assert post(module_cloud, "open", headers=many).status_code == 202


# Storage-backed features, on both backends ---------------------------------------------------

STORAGE_WEBHOOKS = {
    # Windows are fixed and aligned to the epoch: a long one, so no test straddles two.
    "limited": relay(rate_limit={"max_requests": 3, "window_seconds": 3600}),
    "idem_header": relay(idempotency={"header": "X-Delivery", "window_seconds": 60}),
    "idem_json": relay(idempotency={"json_path": "$.event.id"}),
}


@pytest.fixture
def storage_cloud(storage_url: str, tmp_path: Path) -> Iterator[Cloud]:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(STORAGE_WEBHOOKS))
    with running(Cloud(storage_url, path, tmp_path)) as server:
        yield server


def test_rate_limit_answers_429_with_retry_after(storage_cloud: Cloud) -> None:
    answers = [post(storage_cloud, "limited") for _ in range(5)]
    assert [a.status_code for a in answers] == [202, 202, 202, 429, 429]
    retry_after = int(answers[3].headers["retry-after"])
    assert 1 <= retry_after <= 3600
    assert answers[3].json()["error"] == "rate_limited"


def test_rate_limit_is_shared_by_replicas(redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(STORAGE_WEBHOOKS))
    with (
        running(Cloud(redis_url, path, tmp_path)) as one,
        running(Cloud(redis_url, path, tmp_path)) as two,
    ):
        statuses = [post(server, "limited").status_code for server in (one, two, one, two)]
    assert statuses == [202, 202, 202, 429]


def test_channel_rate_limit_spans_its_webhooks(tmp_path: Path) -> None:
    shared = {**RELAY, "rate_limit": {"max_requests": 2, "window_seconds": 3600}}
    webhooks = {
        "a": {"module": "webhook_connect", "module-config": shared},
        "b": {"module": "webhook_connect", "module-config": shared},
    }
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(webhooks))
    with running(Cloud(f"sqlite:///{tmp_path / 'b.db'}", path, tmp_path)) as cloud:
        statuses = [post(cloud, name).status_code for name in ("a", "b", "a", "b")]
    assert statuses == [202, 202, 429, 429]


def test_a_retried_delivery_is_stored_once(storage_cloud: Cloud) -> None:
    first = post(storage_cloud, "idem_header", headers={"X-Delivery": "d-1"})
    again = post(storage_cloud, "idem_header", headers={"X-Delivery": "d-1"})
    other = post(storage_cloud, "idem_header", headers={"X-Delivery": "d-2"})
    assert first.status_code == again.status_code == other.status_code == 202
    assert again.json() == {**first.json(), "duplicate": True}
    assert other.json()["message_id"] != first.json()["message_id"]

    event = b'{"event": {"id": "evt_42"}, "n": 1}'
    one = post(storage_cloud, "idem_json", event).json()
    two = post(storage_cloud, "idem_json", event.replace(b"1}", b"2}")).json()
    assert two["message_id"] == one["message_id"]
    assert httpx.get(f"{storage_cloud.url}/health").status_code == 200  # still serving


# Live reload ---------------------------------------------------------------------------------


def test_reload_on_file_change_and_refusal_of_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps({"first": relay(authorization="Bearer first-token-1")}))
    admin = "admin-token-for-reload-tests"
    storage = f"sqlite:///{tmp_path / 'b.db'}"
    with running(Cloud(storage, path, tmp_path, "--admin-token", admin)) as cloud:
        auth = {"Authorization": "Bearer first-token-1"}
        assert post(cloud, "first", headers=auth).status_code == 202
        assert post(cloud, "second").status_code == 404

        new = {
            "first": relay(authorization="Bearer first-token-2"),
            "second": relay(),
        }
        path.write_text(json.dumps(new))
        wait_until(lambda: post(cloud, "second").status_code == 202, what="reload by file")
        assert post(cloud, "first", headers=auth).status_code == 401

        # A broken file is refused; the running configuration stays.
        path.write_text('{"second": {"module": "webhook_connect", "module-config": {}}}')
        refused = httpx.post(
            f"{cloud.url}/admin/reload", headers={"Authorization": f"Bearer {admin}"}
        )
        assert refused.status_code == 422
        assert "second.module-config.channel" in refused.json()["detail"]
        time.sleep(1.5)  # let the watcher see the broken file too
        assert post(cloud, "second").status_code == 202
        assert "not reloaded" in cloud.log.read_text()

        # The admin endpoint applies a fixed file at once, and needs the admin token.
        path.write_text(json.dumps({"third": relay()}))
        no_token = httpx.post(f"{cloud.url}/admin/reload")
        assert no_token.status_code == 401
        connector_token = httpx.post(
            f"{cloud.url}/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert connector_token.status_code == 401
        done = httpx.post(f"{cloud.url}/admin/reload", headers={"Authorization": f"Bearer {admin}"})
        assert done.status_code == 200
        assert done.json()["webhooks"] == ["third"]
        assert post(cloud, "third").status_code == 202
        assert post(cloud, "second").status_code == 404


def test_reload_does_not_drop_requests(tmp_path: Path) -> None:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps({"busy": relay()}))
    storage = f"sqlite:///{tmp_path / 'b.db'}"
    statuses: list[int] = []
    done = threading.Event()

    def send_continuously(url: str) -> None:
        with httpx.Client() as client:
            while not done.is_set():
                statuses.append(client.post(url, content=BODY).status_code)

    with running(Cloud(storage, path, tmp_path)) as cloud:
        sender = threading.Thread(target=send_continuously, args=(f"{cloud.url}/webhook/busy",))
        sender.start()
        try:
            for round_ in range(3):
                marker = f"marker{round_}"
                path.write_text(json.dumps({"busy": relay(), marker: relay()}))
                wait_until(lambda m=marker: post(cloud, m).status_code == 202, what=marker)
        finally:
            done.set()
            sender.join()
    assert len(statuses) > 10
    assert set(statuses) == {202}
    assert cloud.log.read_text().count("webhooks.json reloaded") == 3


def test_admin_reload_is_off_without_an_admin_token(module_cloud: Cloud) -> None:
    response = httpx.post(f"{module_cloud.url}/admin/reload")
    assert response.status_code == 404
    assert response.json()["error"] == "admin_disabled"


# Secrets in logs -----------------------------------------------------------------------------


def test_secrets_never_reach_the_logs_and_reach_the_sink_unchanged(tmp_path: Path) -> None:
    secrets = {
        "bearer": "Bearer very-secret-bearer-1",
        "password": "very-secret-password-2",
        "query": "very-secret-query-key-3",
        "hmac": "very-secret-hmac-key-4",
    }
    webhooks = {
        "bearer": relay(authorization=secrets["bearer"]),
        "basic": relay(basic_auth={"username": "u", "password": secrets["password"]}),
        "query": relay(query_auth={"api_key": secrets["query"]}),
        "hmac": relay(hmac={"secret": secrets["hmac"]}),
    }
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(webhooks))
    storage = f"sqlite:///{tmp_path / 'b.db'}"
    signature = "sha256=" + sign(secrets["hmac"], BODY)
    with running(Cloud(storage, path, tmp_path, "--log-level", "trace")) as cloud:
        assert post(cloud, "bearer", headers={"Authorization": secrets["bearer"]}).is_success
        assert (
            post(cloud, "bearer", headers={"Authorization": "Bearer wrong-guess-5"}).status_code
            == 401
        )
        basic = httpx.post(
            f"{cloud.url}/webhook/basic", content=BODY, auth=("u", secrets["password"])
        )
        assert basic.status_code == 202
        assert post(cloud, "query", params={"api_key": secrets["query"]}).is_success
        assert post(cloud, "hmac", headers={"X-Hub-Signature-256": signature}).is_success
        stored = httpx.get(
            f"{cloud.url}/connect/stream/dev/poll?timeout=1&max_messages=10",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    log = cloud.log.read_text()
    assert "ASGI" in log  # trace logging was on, headers were printed
    basic_value = base64.b64encode(f"u:{secrets['password']}".encode()).decode()
    for leaked in [
        *secrets.values(),
        "very-secret-bearer-1",
        "wrong-guess-5",
        basic_value,
        signature.removeprefix("sha256="),
    ]:
        assert leaked not in log, leaked
    # What is relayed is not masked.
    relayed = json.dumps(stored.json())
    assert secrets["bearer"] in relayed
    assert signature in relayed


def test_masker_covers_the_usual_shapes() -> None:
    masker = SecretMasker(["literal-secret-value"])
    lines = {
        "Authorization: Basic dXNlcjpwYXNz": "Authorization: ***",
        "(b'x-hub-signature-256', b'sha256=abc')": "(b'x-hub-signature-256', b'***')",
        '{"stripe-signature": "t=1,v1=ab"}': '{"stripe-signature": "***"}',
        '"POST /webhook/x?token=abc&a=1 HTTP/1.1"': '"POST /webhook/x?token=***&a=1 HTTP/1.1"',
        "saw literal-secret-value here": "saw *** here",
    }
    for line, masked in lines.items():
        assert masker.mask(line) == masked


def test_client_address_believes_only_trusted_proxies() -> None:
    trusted = parse_networks(["10.0.0.0/8"])
    xff = b"x-forwarded-for"
    assert client_address("203.0.113.5", [(xff, b"1.2.3.4")], trusted) == "203.0.113.5"
    assert client_address("10.0.0.2", [(xff, b"1.2.3.4")], trusted) == "1.2.3.4"
    chain = [(xff, b"6.6.6.6, 1.2.3.4, 10.0.0.9")]
    assert client_address("10.0.0.2", chain, trusted) == "1.2.3.4"
    assert client_address("10.0.0.2", [(xff, b"junk")], trusted) == "10.0.0.2"
    assert client_address("10.0.0.2", [], trusted) == "10.0.0.2"
    real_ip = [(b"x-real-ip", b"1.2.3.4")]
    assert client_address("::ffff:10.0.0.2", real_ip, trusted, "x-real-ip") == "1.2.3.4"
    assert client_address("10.0.0.2", [(xff, b"1.2.3.4")], ()) == "10.0.0.2"
