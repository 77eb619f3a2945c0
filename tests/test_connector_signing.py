"""Signed deliveries end to end: a real cloud, the real connector, a real sink, and each
provider's own library verifying what the sink received.

``sign`` adds Standard Webhooks headers of the connector's own; ``resign`` replaces the
provider's signature with a fresh one made with the target's secret, so a message sent hours
ago (as a replay from history is) still verifies at a target with a five-minute tolerance,
where the same message relayed as it was does not.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import standardwebhooks
import stripe

from tests.servers import REPO, Cloud, ConnectorProcess, Sink, running, wait_until

TOKEN = "signing-token-0123456789"
CHANNEL = {"channel": "dev", "channel_token": TOKEN, "ack_timeout_seconds": 5}
KINDS = ("stripe", "github", "standard")
WEBHOOKS = {
    name: {"module": "webhook_connect", "module-config": CHANNEL}
    for kind in KINDS
    for name in (kind, f"{kind}-plain")
} | {"signed": {"module": "webhook_connect", "module-config": CHANNEL}}
VERIFY_GITHUB = REPO / "tests" / "smee" / "verify-github.mjs"
TOLERANCE = 300
HOURS_AGO = 3 * 3600


def standard_secret(seed: bytes) -> str:
    return "whsec_" + base64.b64encode(hashlib.sha256(seed).digest()[:24]).decode()


# What the provider signed with, and what the local target checks with.
PROVIDER = {"stripe": "whsec_provider", "github": "gh-provider", "standard": standard_secret(b"p")}
LOCAL = {"stripe": "whsec_local", "github": "gh-local", "standard": standard_secret(b"l")}
SIGN = standard_secret(b"connector")
RESIGN = {"stripe": "stripe", "github": "github", "standard": "standard_webhooks"}
BODY = json.dumps(
    {"id": "evt_1", "type": "charge.succeeded", "action": "opened", "text": "caf\u00e9"},
    ensure_ascii=False,
).encode()


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    with running(Cloud(f"sqlite:///{tmp_path / 'buffer.db'}", path, tmp_path)) as server:
        yield server


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    with running(Sink(tmp_path)) as server:
        yield server


@pytest.fixture
def connector(cloud: Cloud, sink: Sink, tmp_path: Path) -> Iterator[ConnectorProcess]:
    plain = {"url": sink.url, "timeout_seconds": 5}
    targets: dict[str, object] = {"signed": {**plain, "sign": {"secret": SIGN}}}
    for kind in KINDS:
        targets[kind] = {**plain, "resign": {"provider": RESIGN[kind], "secret": LOCAL[kind]}}
        targets[f"{kind}-plain"] = plain
    config = {
        "cloud_url": cloud.url,
        "channel": "dev",
        "token": TOKEN,
        "state_dir": str(tmp_path / "state"),
        "targets": targets,
    }
    process = ConnectorProcess(tmp_path, config)
    try:
        process.start()
        wait_until(lambda: "connected to" in process.output(), 20, "the connector to connect")
        yield process
    finally:
        process.stop(signal.SIGKILL)


def provider_headers(kind: str, sent_at: int) -> dict[str, str]:
    """The headers each provider sent, ``sent_at`` (its own library where there is one)."""
    if kind == "stripe":
        header = stripe.WebhookSignature.generate_signature_header(
            BODY.decode(), PROVIDER["stripe"], timestamp=sent_at
        )
        return {"Stripe-Signature": str(header)}
    if kind == "github":
        digest = hmac.new(PROVIDER["github"].encode(), BODY, hashlib.sha256).hexdigest()
        return {"X-GitHub-Event": "issues", "X-Hub-Signature-256": f"sha256={digest}"}
    when = datetime.fromtimestamp(sent_at, UTC)
    signature = standardwebhooks.Webhook(PROVIDER["standard"]).sign(
        "msg_provider", when, BODY.decode()
    )
    return {
        "webhook-id": "msg_provider",
        "webhook-timestamp": str(sent_at),
        "webhook-signature": signature,
    }


def post(cloud: Cloud, webhook: str, headers: dict[str, str]) -> str:
    answer = httpx.post(
        f"{cloud.url}/webhook/{webhook}",
        content=BODY,
        headers={"Content-Type": "application/json", **headers},
        timeout=10,
    )
    assert answer.status_code == 202, answer.text
    return str(answer.json()["message_id"])


def received(sink: Sink, message_id: str) -> tuple[dict[str, str], bytes]:
    """The headers (names lower-cased, each once) and the exact body the sink got."""
    for record in sink.records():
        pairs = [(str(k).lower(), str(v)) for k, v in record["headers"]]  # type: ignore[union-attr]
        headers = dict(pairs)
        if headers.get("x-webhook-connect-message-id") == message_id:
            assert len(headers) == len(pairs), f"a header twice: {pairs}"
            return headers, base64.b64decode(str(record["body_b64"]))
    raise LookupError(message_id)


def verifies(kind: str, secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The provider's own library, as a target enforcing a five-minute tolerance runs it."""
    try:
        if kind == "stripe":
            stripe.Webhook.construct_event(body, headers["stripe-signature"], secret, TOLERANCE)
        elif kind == "standard":
            standardwebhooks.Webhook(secret).verify(body, headers)  # five minutes, built in
        else:
            node = shutil.which("node")
            assert node is not None, "node is missing: scripts/test installs it"
            signature = headers["x-hub-signature-256"]
            done = subprocess.run(
                [node, str(VERIFY_GITHUB), secret, signature],
                input=body,
                capture_output=True,
                timeout=30,
                check=False,
            )
            assert done.returncode in (0, 1), done.stderr.decode()
            return done.returncode == 0
    except (stripe.SignatureVerificationError, standardwebhooks.WebhookVerificationError):
        return False
    return True


def test_sign_adds_standard_webhooks_headers_the_library_verifies(
    cloud: Cloud, sink: Sink, connector: ConnectorProcess
) -> None:
    message_id = post(cloud, "signed", {"webhook-signature": "v1,forged"})
    wait_until(lambda: received(sink, message_id), 20, "the signed delivery")
    headers, body = received(sink, message_id)
    assert body == BODY
    assert headers["webhook-id"] == message_id
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    standardwebhooks.Webhook(SIGN).verify(body, headers)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(standard_secret(b"other")).verify(body, headers)


@pytest.mark.parametrize("kind", KINDS)
def test_resign_makes_a_message_sent_hours_ago_verify_at_a_five_minute_target(
    cloud: Cloud, sink: Sink, connector: ConnectorProcess, kind: str
) -> None:
    sent = provider_headers(kind, int(time.time()) - HOURS_AGO)
    resigned = post(cloud, kind, sent)
    relayed = post(cloud, f"{kind}-plain", sent)
    wait_until(lambda: received(sink, resigned) and received(sink, relayed), 20, "both")
    headers, body = received(sink, resigned)
    assert body == BODY
    assert verifies(kind, LOCAL[kind], headers, body)
    if kind == "standard":
        assert headers["webhook-id"] == "msg_provider", "the event's id is kept"
    # As relayed, the provider's signature is hours old (and by another secret).
    plain_headers, plain_body = received(sink, relayed)
    assert plain_body == BODY
    assert not verifies(kind, LOCAL[kind], plain_headers, plain_body)
    if kind != "github":  # GitHub signs no time: its old signature stays valid for its secret
        assert not verifies(kind, PROVIDER[kind], plain_headers, plain_body)


ADMIN = "signing-admin-token-0123456789"


def test_a_dead_letter_replayed_hours_later_verifies_because_of_resign(tmp_path: Path) -> None:
    """The replay path as an operator meets it: the target refused a Stripe event, which was
    dead-lettered; once the target is fixed, the event is replayed from the dead letters, its
    Stripe-Signature hours old, and resign makes it pass a five-minute tolerance."""
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    storage = f"sqlite:///{tmp_path / 'buffer.db'}"
    refusing, fixed = Sink(tmp_path, status=400), Sink(tmp_path)
    cloud = Cloud(storage, path, tmp_path, "--admin-token", ADMIN)
    started: list[ConnectorProcess] = []
    try:
        for server in (cloud, refusing, fixed):
            server.start()

        def connector(name: str, target: dict[str, object]) -> ConnectorProcess:
            config = {
                "cloud_url": cloud.url,
                "channel": "dev",
                "token": TOKEN,
                "state_dir": str(tmp_path / name),
                "targets": {"stripe": {"timeout_seconds": 5, **target}},
            }
            process = ConnectorProcess(tmp_path, config, name)
            started.append(process)
            process.start()
            wait_until(lambda: "connected to" in process.output(), 20, f"{name} to connect")
            return process

        before = connector("before", {"url": refusing.url})
        first = post(cloud, "stripe", provider_headers("stripe", int(time.time()) - HOURS_AGO))
        admin = {"Authorization": f"Bearer {ADMIN}"}
        letters = f"{cloud.url}/admin/channels/dev/dead-letters"

        def dead() -> list[str]:
            answer = httpx.get(letters, headers=admin, timeout=5).json()
            return [str(letter["message_id"]) for letter in answer["dead_letters"]]

        wait_until(lambda: dead() == [first], 20, "the dead letter")
        before.stop()
        resign = {"provider": "stripe", "secret": LOCAL["stripe"]}
        connector("after", {"url": fixed.url, "resign": resign})
        replayed = httpx.post(f"{letters}/replay", headers=admin, json={"all": True}, timeout=5)
        assert replayed.json() == {"replayed": 1}
        wait_until(lambda: len(fixed.records()) == 1, 20, "the replayed delivery")
        [record] = fixed.records()
        headers = {str(k).lower(): str(v) for k, v in record["headers"]}  # type: ignore[union-attr]
        body = base64.b64decode(str(record["body_b64"]))
        assert body == BODY
        assert verifies("stripe", LOCAL["stripe"], headers, body)
        # Relayed as stored, the refusing target saw a signature hours old.
        [refused] = refusing.records()
        stale = {str(k).lower(): str(v) for k, v in refused["headers"]}  # type: ignore[union-attr]
        assert not verifies("stripe", PROVIDER["stripe"], stale, body)
    finally:
        for process in started:
            process.stop(signal.SIGKILL)
        for server in (fixed, refusing, cloud):
            server.stop()
