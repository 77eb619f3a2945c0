"""Issue 12, defects 4 and 6, through the real cloud, connector and CLI: quotas spent only by
authenticated senders, floods refused per source address, and the smaller defects (an OAuth 1
timestamp of 5,000 digits, a deeply nested webhooks.json, two channels with one token, log
masking, a target's configured headers, numbers beyond a double).

Several source addresses on one machine: the whole 127.0.0.0/8 is loopback on Linux, so a
client bound to 127.0.0.2 and one bound to 127.0.0.3 are two senders to the cloud.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from oauthlib.oauth1 import Client as OAuth1Client

from tests.servers import REPO, Cloud, ConnectorProcess, Sink, running, wait_until
from webhook_connect.cloud.security.inbound import InboundRequest, Rejected, unauthorized

TOKEN = "hardening-channel-token"
RELAY = {"channel": "dev", "channel_token": TOKEN}
SECRET = "hardening-hmac-secret"
QUERY_KEY = "Query-Key-Hardening-1"
CONSUMER_KEY, CONSUMER_SECRET = "consumer-hardening", "consumer-secret-hardening"
BODY = b'{"event": "push"}'
HOUR = 3600  # fixed windows aligned to the epoch: long ones, so no test straddles two


def relay(**entry: object) -> dict[str, object]:
    return {"module": "webhook_connect", "module-config": RELAY, **entry}


WEBHOOKS = {
    # failed_auth_limit left at its default: 20 failures a minute per source address.
    "signed": relay(
        hmac={"secret": SECRET}, rate_limit={"max_requests": 5, "window_seconds": HOUR}
    ),
    "oauth1": relay(oauth1={"consumer_key": CONSUMER_KEY, "consumer_secret": CONSUMER_SECRET}),
    "json": relay(),
    "idempotent": relay(idempotency={"json_path": "$.id"}),
}


def sign(body: bytes) -> str:
    return "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


def client_from(address: str) -> httpx.Client:
    """An HTTP client whose requests come from ``address`` (a loopback address)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10)


# --- Defect 4: strangers spend a sender's quota -------------------------------------------------


@pytest.fixture
def quota_cloud(storage_url: str, tmp_path: Path) -> Iterator[Cloud]:
    path = tmp_path / "webhooks.json"
    channel = {**RELAY, "rate_limit": {"max_requests": 8, "window_seconds": HOUR}}
    webhooks = {**WEBHOOKS, "signed": {**WEBHOOKS["signed"], "module-config": channel}}
    # A channel's limits are one: every webhook of it must carry the same.
    for name in ("oauth1", "json", "idempotent"):
        webhooks[name] = {**WEBHOOKS[name], "module-config": channel}
    path.write_text(json.dumps(webhooks))
    with running(Cloud(storage_url, path, tmp_path)) as cloud:
        yield cloud


def test_an_unsigned_flood_leaves_the_signed_senders_quota_untouched(quota_cloud: Cloud) -> None:
    url = f"{quota_cloud.url}/webhook/signed"
    with client_from("127.0.0.2") as stranger:
        flood = [stranger.post(url, content=BODY) for _ in range(1000)]
    # The stranger is refused by its address once its failures pass the limit: 401 for the
    # first 20 (up to 40 if the flood straddled two one-minute windows), then 429 before any
    # signature work.
    statuses = [answer.status_code for answer in flood]
    assert set(statuses) == {401, 429}
    assert 20 <= statuses.index(429) <= 40
    assert statuses.count(401) <= 40
    refused = flood[statuses.index(429)]
    assert refused.json()["error"] == "too_many_auth_failures"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    # The signed sender, from its own address, still has its whole quota of 5 ...
    with client_from("127.0.0.3") as sender:
        answers = [
            sender.post(url, content=BODY, headers={"X-Hub-Signature-256": sign(BODY)})
            for _ in range(6)
        ]
    assert [a.status_code for a in answers] == [202] * 5 + [429]
    # ... which its own requests, and only they, spent.
    assert answers[5].json()["error"] == "rate_limited"


def test_the_channel_quota_counts_only_authenticated_requests(quota_cloud: Cloud) -> None:
    """The channel's rate_limit (8) is not spent by the flood on one of its webhooks either."""
    with client_from("127.0.0.4") as stranger:
        for _ in range(30):
            stranger.post(f"{quota_cloud.url}/webhook/signed", content=BODY)
    with client_from("127.0.0.5") as sender:
        statuses = [
            sender.post(f"{quota_cloud.url}/webhook/json", content=BODY).status_code
            for _ in range(9)
        ]
    assert statuses == [202] * 8 + [429]


def test_source_rate_limit_refuses_one_address_and_not_the_others(tmp_path: Path) -> None:
    limited = relay(source_rate_limit={"max_requests": 3, "window_seconds": HOUR})
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps({"per_source": limited}))
    with running(Cloud(f"sqlite:///{tmp_path / 'b.db'}", path, tmp_path)) as cloud:
        url = f"{cloud.url}/webhook/per_source"
        with client_from("127.0.0.6") as busy:
            answers = [busy.post(url, content=BODY) for _ in range(4)]
        with client_from("127.0.0.7") as other:
            elsewhere = other.post(url, content=BODY)
    assert [a.status_code for a in answers] == [202, 202, 202, 429]
    assert answers[3].json()["error"] == "source_rate_limited"
    assert elsewhere.status_code == 202


def test_only_failed_credentials_count_not_a_digest_challenge() -> None:
    from webhook_connect.cloud.ingest import is_failure

    request = InboundRequest("w", "POST", "http", "/", "", [], b"", "1.2.3.4", "1.2.3.4", 0.0)
    signed = InboundRequest(
        "w", "POST", "http", "/", "", [(b"authorization", b"Digest x")], b"", "", "", 0.0
    )
    assert is_failure(unauthorized("bad signature"), request)
    assert not is_failure(Rejected(403, "insufficient_scope", ""), request)
    assert not is_failure(unauthorized("credentials needed", 'Digest realm="r"'), request)
    assert is_failure(unauthorized("wrong", 'Digest realm="r"'), signed)
    assert not is_failure(unauthorized("expired", 'Digest realm="r", stale=true'), signed)


def test_lockouts_expire_and_stay_bounded() -> None:
    from webhook_connect.cloud.security.lockout import Lockouts, source_key

    lockouts = Lockouts(capacity=2)
    lockouts.lock("a", until=10.0, now=0.0)
    assert lockouts.remaining("a", 4.0) == 6.0
    assert lockouts.remaining("a", 10.0) == 0.0
    for key in ("b", "c", "d"):
        lockouts.lock(key, until=10.0, now=0.0)
    assert lockouts.remaining("b", 1.0) == 0.0  # the oldest was forgotten to stay at 2
    assert lockouts.remaining("d", 1.0) == 9.0
    assert source_key("2001:db8::1") == source_key("2001:db8::ffff") == "2001:db8::/64"
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"


# --- Defect 6: the smaller ones -----------------------------------------------------------------


def test_an_oauth1_timestamp_of_5000_digits_is_401(module_cloud: Cloud) -> None:
    url = f"{module_cloud.url}/webhook/oauth1"
    signer = OAuth1Client(CONSUMER_KEY, client_secret=CONSUMER_SECRET, timestamp="9" * 5000)
    uri, headers, _ = signer.sign(
        url, http_method="POST", body=BODY.decode(), headers={"Content-Type": "application/json"}
    )
    answer = httpx.post(uri, content=BODY, headers=headers, timeout=10)
    assert answer.status_code == 401
    assert "future" in answer.json()["detail"]


def test_a_number_beyond_a_double_is_valid_json_stored_as_sent(module_cloud: Cloud) -> None:
    for body in (b'{"a":1e400}', b"[-1e400, 1" + b"0" * 5000 + b"]"):
        answer = httpx.post(f"{module_cloud.url}/webhook/json", content=body, timeout=10)
        assert answer.status_code == 202, answer.text
    # The delivery id is read from such a body too: a retry is stored once.
    event = b'{"id": "evt-1e400", "n": 1e400}'
    first = httpx.post(f"{module_cloud.url}/webhook/idempotent", content=event, timeout=10)
    again = httpx.post(f"{module_cloud.url}/webhook/idempotent", content=event, timeout=10)
    assert first.status_code == again.status_code == 202
    assert again.json() == {**first.json(), "duplicate": True}
    # Not every orjson refusal is let through: JSON's grammar still rules.
    for body in (b'{"a": NaN}', b"[Infinity]", b"\xff"):
        answer = httpx.post(f"{module_cloud.url}/webhook/json", content=body, timeout=10)
        assert answer.status_code == 400
        assert answer.json()["error"] == "invalid_json"


def cloud_cli(tmp_path: Path, webhooks: Path) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable,
        "-m",
        "webhook_connect",
        "cloud",
        "--port",
        "1",
        "--webhooks",
        str(webhooks),
        "--storage",
        f"sqlite:///{tmp_path / 'b.db'}",
    ]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, check=False)


def test_a_deeply_nested_webhooks_json_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "webhooks.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    result = cloud_cli(tmp_path, path)
    assert result.returncode == 2, result.stderr[-500:]
    assert result.stderr.strip().splitlines() == [
        f"webhook-connect: configuration error: {path}: nested deeper than 100 levels"
    ]


def test_two_channels_with_one_token_are_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "webhooks.json"
    same = "one-token-for-two-channels"
    path.write_text(
        json.dumps(
            {
                "a": {
                    "module": "webhook_connect",
                    "module-config": {"channel": "alpha", "channel_token": same},
                },
                "b": {
                    "module": "webhook_connect",
                    "module-config": {"channel": "beta", "channel_token": same},
                },
            }
        )
    )
    result = cloud_cli(tmp_path, path)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "b.module-config.channel_token" in line
    assert "'alpha'" in line and "'beta'" in line
    assert same not in line


def test_the_reload_watcher_survives_a_deeply_nested_file(tmp_path: Path) -> None:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps({"first": relay()}))
    with running(Cloud(f"sqlite:///{tmp_path / 'b.db'}", path, tmp_path)) as cloud:
        path.write_text("[" * 100_000 + "]" * 100_000)
        wait_until(lambda: "not reloaded" in cloud.log.read_text(), 20, "the refusal logged")
        assert "nested deeper than 100 levels" in cloud.log.read_text()
        assert httpx.post(f"{cloud.url}/webhook/first", content=BODY).status_code == 202
        # A later valid file still takes effect: the watcher kept running.
        path.write_text(json.dumps({"first": relay(), "second": relay()}))
        wait_until(
            lambda: httpx.post(f"{cloud.url}/webhook/second", content=BODY).status_code == 202,
            20,
            "the valid file reloaded",
        )


def test_log_masking_covers_case_configured_and_encoded_names(tmp_path: Path) -> None:
    webhooks = {
        "code": relay(query_auth={"parameter_name": "code", "api_key": QUERY_KEY}),
        "key": relay(query_auth={"api_key": QUERY_KEY}),
    }
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(webhooks))
    storage = f"sqlite:///{tmp_path / 'b.db'}"
    sent = {
        # the configured key in other letter case (accepted: case_sensitive is false)
        "code": [("code", QUERY_KEY.upper()), ("CODE", "a-wrong-guess-1")],
        # a percent-encoded and a capitalised fixed name
        "key": [("api%5Fkey", "a-wrong-guess-2"), ("Api_Key", "a-wrong-guess-3")],
    }
    with running(Cloud(storage, path, tmp_path, "--log-level", "debug")) as cloud:
        for webhook, pairs in sent.items():
            for name, value in pairs:
                url = f"{cloud.url}/webhook/{webhook}?{name}={value}&page=2"
                httpx.post(url, content=BODY, timeout=10)
        wait_until(lambda: cloud.log.read_text().count("/webhook/") >= 4, 10, "access lines")
    log = cloud.log.read_text()
    assert "page=2" in log  # access lines were written, other parameters left alone
    leaked = [value for pairs in sent.values() for _, value in pairs if value in log]
    assert leaked == []
    assert QUERY_KEY.upper() not in log.upper()


def test_a_targets_headers_replace_the_senders(cloud: Cloud, sink: Sink, tmp_path: Path) -> None:
    """Connector HTTP mode: the configured header is the only one of its name (any case)."""
    settings = {
        "cloud_url": cloud.url,
        "channel": "dev",
        "token": TOKEN,
        "state_dir": str(tmp_path / "state"),
        "reconnect_delay_seconds": 0.2,
        "default_target": {
            "url": sink.url,
            "headers": {"Authorization": "Bearer local-target", "X-Tag": "ours"},
        },
    }
    connector = ConnectorProcess(tmp_path, settings)
    try:
        connector.start()
        answer = httpx.post(
            f"{cloud.url}/webhook/json",
            content=BODY,
            headers={"authorization": "Bearer from-the-sender", "x-tag": "theirs"},
        )
        assert answer.status_code == 202
        wait_until(sink.records, 20, "the delivery")
    finally:
        connector.stop(signal.SIGKILL)
    headers = [(n.lower(), v) for n, v in sink.records()[0]["headers"]]  # type: ignore[union-attr]
    assert [v for n, v in headers if n == "authorization"] == ["Bearer local-target"]
    assert [v for n, v in headers if n == "x-tag"] == ["ours"]


def test_http_webhook_headers_replace_the_senders(tmp_path: Path, sink: Sink) -> None:
    """The cloud's direct delivery with ``http_webhook``, forwarding the sender's headers."""
    webhooks: dict[str, Any] = {
        "forward": {
            "module": "http_webhook",
            "module-config": {
                "url": sink.url,
                "allowed_hosts": ["127.0.0.1"],
                "forward_headers": True,
                "headers": {"X-Tag": "ours", "Content-Type": "application/vnd.ours+json"},
            },
        }
    }
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(webhooks))
    with running(Cloud(f"sqlite:///{tmp_path / 'b.db'}", path, tmp_path)) as cloud:
        answer = httpx.post(
            f"{cloud.url}/webhook/forward",
            content=BODY,
            headers={"x-tag": "theirs", "content-type": "application/json", "x-other": "kept"},
        )
        assert answer.status_code == 202
        wait_until(sink.records, 20, "the delivery")
    headers = [(n.lower(), v) for n, v in sink.records()[0]["headers"]]  # type: ignore[union-attr]
    assert [v for n, v in headers if n == "x-tag"] == ["ours"]
    assert [v for n, v in headers if n == "content-type"] == ["application/vnd.ours+json"]
    assert ("x-other", "kept") in headers


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ({"failed_auth_limit": {"max_failures": 0}}, "gh.failed_auth_limit.max_failures"),
        (
            {"source_rate_limit": {"max_requests": 5, "window_seconds": -1}},
            "gh.source_rate_limit.window_seconds",
        ),
    ],
)
def test_a_bad_flood_limit_is_one_line_and_exit_2(
    tmp_path: Path, entry: dict[str, object], key: str
) -> None:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps({"gh": relay(**entry)}))
    result = cloud_cli(tmp_path, path)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert f"{path}: {key}: " in line
