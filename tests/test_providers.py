"""Provider signature presets, signed by each provider's own library (GitHub's from Node).

Shopify publishes no Python signer, so its signature is computed here the way Shopify's docs
state it: the base64 of the HMAC-SHA256 of the raw body, keyed with the app's client secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import subprocess
import time
from datetime import UTC, datetime

import httpx
import pytest
import slack_sdk.signature
import standardwebhooks
import stripe
import svix.webhooks

from tests.servers import REPO, Cloud
from webhook_connect.cloud.security import providers
from webhook_connect.cloud.security.inbound import Check, InboundRequest, Rejected, Services

TOKEN = "providers-token-0123456789"
SIGN_GITHUB = REPO / "tests" / "smee" / "sign-github.mjs"
TOLERANCE = 300
PROVIDERS = ("github", "stripe", "slack", "shopify", "standard_webhooks")
TIMED = ("stripe", "slack", "standard_webhooks")


def standard_secret(seed: bytes) -> str:
    return "whsec_" + base64.b64encode(hashlib.sha256(seed).digest()[:24]).decode()


# Per provider: two secrets configured together (a rotation) and one that is not configured.
SECRETS = {
    "github": ("gh-secret-old", "gh-secret-new", "gh-secret-unknown"),
    "stripe": ("whsec_stripe_old", "whsec_stripe_new", "whsec_stripe_unknown"),
    "slack": ("slack-secret-old", "slack-secret-new", "slack-secret-unknown"),
    "shopify": ("shopify-secret-old", "shopify-secret-new", "shopify-secret-unknown"),
    "standard_webhooks": tuple(standard_secret(seed) for seed in (b"old", b"new", b"unknown")),
}
# The header whose absence each provider refuses first.
SIGNATURE_HEADERS = {
    "github": "X-Hub-Signature-256",
    "stripe": "Stripe-Signature",
    "slack": "X-Slack-Signature",
    "shopify": "X-Shopify-Hmac-Sha256",
    "standard_webhooks": "webhook-signature",
}
TIMESTAMP_HEADERS = {
    "stripe": "Stripe-Signature",
    "slack": "X-Slack-Request-Timestamp",
    "standard_webhooks": "webhook-timestamp",
}


def event_body(provider: str, n: int = 1) -> bytes:
    """A body as each provider would send it (Stripe's and Slack's carry their event ids)."""
    document: dict[str, object] = {"action": "opened", "n": n, "title": "caf\u00e9"}
    if provider == "stripe":
        document = {"id": f"evt_{n:024d}", "object": "event", "type": "charge.succeeded"}
    elif provider == "slack":
        document = {"type": "event_callback", "event_id": f"Ev{n:08d}", "team_id": "T1"}
    return json.dumps(document, ensure_ascii=False).encode()


# --- the official signers ------------------------------------------------------------------


def github_signature(secret: str, body: bytes) -> str:
    """``X-Hub-Signature-256`` as @octokit/webhooks computes it."""
    node = shutil.which("node")
    assert node is not None, "node is missing: scripts/test installs it"
    done = subprocess.run(
        [node, str(SIGN_GITHUB), secret], input=body, capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().strip()


def stripe_header(secret: str, body: bytes, timestamp: int) -> str:
    """``Stripe-Signature`` from stripe-python, proven by its own ``construct_event``."""
    header = stripe.WebhookSignature.generate_signature_header(
        body.decode(), secret, timestamp=timestamp
    )
    # tolerance=0 turns stripe's staleness check off: this proves the signature only, so that
    # stale and future headers can be built here too.
    stripe.Webhook.construct_event(body, header, secret, tolerance=0)
    return str(header)


def slack_signature(secret: str, body: bytes, timestamp: int) -> str:
    verifier = slack_sdk.signature.SignatureVerifier(secret)
    signature = verifier.generate_signature(timestamp=str(timestamp), body=body)
    assert signature is not None
    return signature


def shopify_signature(secret: str, body: bytes) -> str:
    # Shopify's documented scheme (no official Python signer exists): base64(HMAC-SHA256(body)).
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def standard_signature(secret: str, message_id: str, body: bytes, timestamp: int) -> str:
    """``v1,<base64>`` from the standardwebhooks library."""
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return standardwebhooks.Webhook(secret).sign(message_id, moment, body.decode())


def signed_headers(provider: str, secret: str, body: bytes, timestamp: int) -> dict[str, str]:
    """The headers ``provider`` sends with ``body``, signed with ``secret`` at ``timestamp``."""
    if provider == "github":
        signature = github_signature(secret, body)
        return {"X-Hub-Signature-256": signature, "X-GitHub-Delivery": "d-1"}
    if provider == "stripe":
        return {"Stripe-Signature": stripe_header(secret, body, timestamp)}
    if provider == "slack":
        return {
            "X-Slack-Signature": slack_signature(secret, body, timestamp),
            "X-Slack-Request-Timestamp": str(timestamp),
        }
    if provider == "shopify":
        return {"X-Shopify-Hmac-Sha256": shopify_signature(secret, body)}
    return {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(timestamp),
        "webhook-signature": standard_signature(secret, "msg_1", body, timestamp),
    }


# --- unit tests: the check alone -------------------------------------------------------------


async def _never_seen(key: str, ttl: float) -> bool:
    return True


SERVICES = Services(remember=_never_seen)


def inbound(headers: dict[str, str], body: bytes, now: float) -> InboundRequest:
    return InboundRequest(
        webhook_id="hook",
        method="POST",
        scheme="https",
        path="/webhook/hook",
        query_string="",
        raw_headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
        body=body,
        peer="127.0.0.1",
        client="127.0.0.1",
        now=now,
    )


def check_for(provider: str, secrets: tuple[str, ...] | None = None) -> Check:
    configured = list(secrets or SECRETS[provider][:2])
    return providers.build(provider, configured, TOLERANCE, SERVICES)


async def refusal(check: Check, request: InboundRequest) -> Rejected:
    with pytest.raises(Rejected) as caught:
        await check(request)
    assert caught.value.status == 401
    return caught.value


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("which", [0, 1], ids=["old-secret", "new-secret"])
async def test_either_rotated_secret_is_accepted(provider: str, which: int) -> None:
    now = int(time.time())
    body = event_body(provider)
    headers = signed_headers(provider, SECRETS[provider][which], body, now)
    await check_for(provider)(inbound(headers, body, now))


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_an_unknown_secret_is_refused_without_echoing_the_signature(provider: str) -> None:
    now = int(time.time())
    body = event_body(provider)
    headers = signed_headers(provider, SECRETS[provider][2], body, now)
    refused = await refusal(check_for(provider), inbound(headers, body, now))
    assert refused.detail == "signature does not match"
    for value in headers.values():
        assert value not in str(refused) and value not in repr(refused.headers)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_body_changed_by_one_byte_is_refused(provider: str) -> None:
    now = int(time.time())
    body = event_body(provider)
    headers = signed_headers(provider, SECRETS[provider][0], body, now)
    tampered = body.replace(b"1", b"2", 1)
    assert tampered != body and len(tampered) == len(body)
    refused = await refusal(check_for(provider), inbound(headers, tampered, now))
    assert refused.detail == "signature does not match"


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_missing_signature_header_is_named(provider: str) -> None:
    now = int(time.time())
    body = event_body(provider)
    header = SIGNATURE_HEADERS[provider]
    headers = signed_headers(provider, SECRETS[provider][0], body, now)
    del headers[header]
    refused = await refusal(check_for(provider), inbound(headers, body, now))
    assert refused.detail == f"missing header {header}"


async def test_a_missing_timestamp_header_is_named() -> None:
    now = int(time.time())
    body = event_body("slack")
    headers = signed_headers("slack", SECRETS["slack"][0], body, now)
    del headers["X-Slack-Request-Timestamp"]
    refused = await refusal(check_for("slack"), inbound(headers, body, now))
    assert refused.detail == "missing header X-Slack-Request-Timestamp"
    headers = signed_headers("standard_webhooks", SECRETS["standard_webhooks"][0], body, now)
    del headers["webhook-id"]
    refused = await refusal(check_for("standard_webhooks"), inbound(headers, body, now))
    assert refused.detail == "missing header webhook-id"


@pytest.mark.parametrize("provider", TIMED)
@pytest.mark.parametrize("offset", [-TOLERANCE - 1, TOLERANCE + 1], ids=["stale", "future"])
async def test_a_timestamp_outside_the_tolerance_is_refused(provider: str, offset: int) -> None:
    now = int(time.time())
    body = event_body(provider)
    headers = signed_headers(provider, SECRETS[provider][0], body, now + offset)
    refused = await refusal(check_for(provider), inbound(headers, body, now))
    assert refused.detail == "timestamp outside the 300 s tolerance"


@pytest.mark.parametrize("provider", TIMED)
@pytest.mark.parametrize("offset", [-TOLERANCE, TOLERANCE], ids=["oldest", "newest"])
async def test_a_timestamp_at_the_tolerance_is_accepted(provider: str, offset: int) -> None:
    now = int(time.time())
    body = event_body(provider)
    headers = signed_headers(provider, SECRETS[provider][0], body, now + offset)
    await check_for(provider)(inbound(headers, body, now))


async def test_stripe_refuses_a_stale_event_as_its_own_library_does() -> None:
    now = int(time.time())
    secret = SECRETS["stripe"][0]
    body = event_body("stripe")
    header = stripe_header(secret, body, now - TOLERANCE - 1)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body, header, secret)
    refused = await refusal(check_for("stripe"), inbound({"Stripe-Signature": header}, body, now))
    assert refused.detail == "timestamp outside the 300 s tolerance"


@pytest.mark.parametrize(
    ("provider", "headers", "detail"),
    [
        (
            "slack",
            {"X-Slack-Signature": "v0=00", "X-Slack-Request-Timestamp": "soon"},
            "malformed timestamp in X-Slack-Request-Timestamp",
        ),
        (
            "stripe",
            {"Stripe-Signature": "v1=00"},
            "malformed Stripe-Signature header: no timestamp",
        ),
        ("stripe", {"Stripe-Signature": "t=-5,v1=00"}, "malformed timestamp in Stripe-Signature"),
        (
            "standard_webhooks",
            {"webhook-id": "m", "webhook-timestamp": "1e9", "webhook-signature": "v1,AA=="},
            "malformed timestamp in webhook-timestamp",
        ),
    ],
)
async def test_a_malformed_timestamp_is_refused(
    provider: str, headers: dict[str, str], detail: str
) -> None:
    refused = await refusal(check_for(provider), inbound(headers, b"{}", time.time()))
    assert refused.detail == detail


async def test_stripe_accepts_any_v1_and_ignores_v0() -> None:
    now = int(time.time())
    secret = SECRETS["stripe"][1]
    body = event_body("stripe")
    good = providers.expected_signature("stripe", secret, body, timestamp=str(now))
    check = check_for("stripe")
    header = f"t={now},v1={'0' * 64},v1={good},v0={'1' * 64}"
    stripe.Webhook.construct_event(body, header, secret)  # stripe-python agrees
    await check(inbound({"Stripe-Signature": header}, body, now))
    # A v0 (test-mode) signature alone is not enough, even when it is right.
    v0_only = f"t={now},v0={good}"
    refused = await refusal(check, inbound({"Stripe-Signature": v0_only}, body, now))
    assert refused.detail == "signature does not match"


async def test_standard_webhooks_accepts_any_v1_and_ignores_other_versions() -> None:
    now = int(time.time())
    secret = SECRETS["standard_webhooks"][0]
    body = event_body("standard_webhooks")
    good = standard_signature(secret, "msg_1", body, now)
    check = check_for("standard_webhooks")
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now)}
    value = f"v1a,{good[3:]} v1,{'A' * 44} {good}"
    standardwebhooks.Webhook(secret).verify(body, {**headers, "webhook-signature": value})
    await check(inbound({**headers, "webhook-signature": value}, body, now))
    only_other = {**headers, "webhook-signature": f"v1a,{good[3:]}"}
    refused = await refusal(check, inbound(only_other, body, now))
    assert refused.detail == "signature does not match"


async def test_svix_headers_signed_by_svix_are_accepted() -> None:
    now = int(time.time())
    secret = SECRETS["standard_webhooks"][1]
    body = event_body("standard_webhooks")
    signature = svix.webhooks.Webhook(secret).sign(
        "msg_svix", datetime.fromtimestamp(now, tz=UTC), body.decode()
    )
    headers = {"svix-id": "msg_svix", "svix-timestamp": str(now), "svix-signature": signature}
    svix.webhooks.Webhook(secret).verify(body, headers)
    check = check_for("standard_webhooks")
    await check(inbound(headers, body, now))
    refused = await refusal(check, inbound({**headers, "svix-id": "msg_other"}, body, now))
    assert refused.detail == "signature does not match"


async def test_a_standard_webhooks_secret_may_lack_its_prefix_and_padding() -> None:
    now = int(time.time())
    secret = SECRETS["standard_webhooks"][0]
    body = event_body("standard_webhooks")
    headers = signed_headers("standard_webhooks", secret, body, now)
    bare = secret.removeprefix("whsec_").rstrip("=")
    check = providers.build("standard_webhooks", [bare], TOLERANCE, SERVICES)
    await check(inbound(headers, body, now))


def test_secrets_and_providers_that_cannot_work_are_refused_when_built() -> None:
    with pytest.raises(ValueError, match="base64"):
        providers.build("standard_webhooks", ["whsec_not base64!"], TOLERANCE, SERVICES)
    with pytest.raises(ValueError, match="unknown provider"):
        providers.build("gitlab", ["x"], TOLERANCE, SERVICES)
    with pytest.raises(ValueError, match="secret"):
        providers.build("github", [], TOLERANCE, SERVICES)


async def test_a_signature_header_that_is_not_ascii_is_refused_not_crashed() -> None:
    headers = {"X-Hub-Signature-256": "sha256=caf\u00e9"}
    refused = await refusal(check_for("github"), inbound(headers, b"{}", time.time()))
    assert refused.detail == "signature does not match"


# --- the pure signature function against each official library ------------------------------


def test_expected_signature_is_what_each_official_library_signs() -> None:
    body = event_body("github")
    ts = 1_700_000_000
    expected = providers.expected_signature
    assert expected("github", "s", body) == github_signature("s", body)
    stripe_v1 = stripe_header("whsec_s", body, ts).split("v1=")[1]
    assert expected("stripe", "whsec_s", body, timestamp=str(ts)) == stripe_v1
    assert expected("slack", "s", body, timestamp=str(ts)) == slack_signature("s", body, ts)
    assert expected("shopify", "s", body) == shopify_signature("s", body)
    secret = SECRETS["standard_webhooks"][0]
    assert "v1," + expected(
        "standard_webhooks", secret, body, timestamp=str(ts), message_id="msg_9"
    ) == standard_signature(secret, "msg_9", body, ts)


def test_the_timestamp_check_takes_now() -> None:
    providers.check_timestamp("1000", "h", now=1300, tolerance_seconds=300)
    providers.check_timestamp("1300", "h", now=1000, tolerance_seconds=300)
    for value, now in (("1000", 1301), ("1301", 1000)):
        with pytest.raises(Rejected, match="outside the 300 s tolerance"):
            providers.check_timestamp(value, "h", now=now, tolerance_seconds=300)


# --- delivery ids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "headers", "body", "expected"),
    [
        ("github", {"X-GitHub-Delivery": "72d3162e"}, b"{}", "72d3162e"),
        ("github", {}, b"{}", None),
        ("stripe", {}, b'{"id": "evt_1", "data": {"id": "ch_1"}}', "evt_1"),
        ("stripe", {}, b"[1]", None),
        ("stripe", {}, b"not json", None),
        ("shopify", {"X-Shopify-Webhook-Id": "b54557e4"}, b"{}", "b54557e4"),
        ("standard_webhooks", {"webhook-id": "msg_a", "svix-id": "msg_b"}, b"{}", "msg_a"),
        ("standard_webhooks", {"svix-id": "msg_b"}, b"{}", "msg_b"),
        ("slack", {"X-Slack-Signature": "v0=ab"}, b'{"event_id": "Ev1"}', "Ev1"),
        ("slack", {"X-Slack-Signature": "v0=ab"}, b"command=%2Fdeploy", "sig:v0=ab"),
        ("slack", {}, b"command=%2Fdeploy", None),
    ],
)
def test_delivery_id(
    provider: str, headers: dict[str, str], body: bytes, expected: str | None
) -> None:
    assert providers.delivery_id(provider, inbound(headers, body, 0)) == expected


# --- end to end: through the real cloud ------------------------------------------------------

WEBHOOKS = {
    provider: {
        "module": "webhook_connect",
        "provider": provider,
        "hmac": {"secret": list(SECRETS[provider][:2])},
        "module-config": {"channel": "dev", "channel_token": TOKEN},
    }
    for provider in PROVIDERS
}


def post(cloud: Cloud, provider: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{cloud.url}/webhook/{provider}",
        content=body,
        headers={"content-type": "application/json", **headers},
    )


@pytest.mark.parametrize("provider", PROVIDERS)
def test_end_to_end_a_signed_webhook_is_accepted_and_a_tampered_one_refused(
    module_cloud: Cloud, provider: str
) -> None:
    body = event_body(provider, n=2)
    headers = signed_headers(provider, SECRETS[provider][1], body, int(time.time()))
    good = post(module_cloud, provider, body, headers)
    assert good.status_code == 202, good.text
    tampered = post(module_cloud, provider, body.replace(b"2", b"3", 1), headers)
    assert tampered.status_code == 401, tampered.text
    assert tampered.json()["detail"] == "signature does not match"


def redelivery(provider: str, n: int) -> tuple[bytes, dict[str, str]]:
    """Delivery ``n`` of ``provider``, signed now: a retry of it is signed afresh."""
    body = event_body(provider, n)
    headers = signed_headers(provider, SECRETS[provider][0], body, int(time.time()))
    if provider == "github":
        headers["X-GitHub-Delivery"] = f"5f1c0a3e-0000-4000-8000-{n:012d}"
    return body, headers


@pytest.mark.parametrize("provider", ["github", "stripe"])
def test_end_to_end_a_redelivery_is_stored_once(module_cloud: Cloud, provider: str) -> None:
    first = post(module_cloud, provider, *redelivery(provider, 7))
    assert first.status_code == 202, first.text
    again = post(module_cloud, provider, *redelivery(provider, 7))
    assert again.status_code == 202, again.text
    assert again.json()["message_id"] == first.json()["message_id"]
    other = post(module_cloud, provider, *redelivery(provider, 8))
    assert other.status_code == 202, other.text
    assert other.json()["message_id"] != first.json()["message_id"]
