"""connector/signing.py: headers made here verify with each provider's own library."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest
import standardwebhooks
import stripe
from pydantic import ValidationError

from webhook_connect.connector.signing import ResignConfig, SignConfig, Signer

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
BODY = '{"type":"charge.succeeded","text":"caf\u00e9"}'.encode()


def as_dict(headers: list[tuple[str, str]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in headers:
        assert name.lower() not in found, f"{name} twice"
        found[name.lower()] = value
    return found


def test_sign_adds_standard_webhooks_headers_that_verify() -> None:
    signer = Signer(SignConfig(secret=SECRET), None)
    sender = [("Content-Type", "application/json"), ("Webhook-Signature", "v1,stale")]
    headers = as_dict(signer.apply(sender, "msg-1", BODY, int(time.time())))
    assert headers["webhook-id"] == "msg-1"
    assert headers["content-type"] == "application/json"
    standardwebhooks.Webhook(SECRET).verify(BODY, headers)


def test_resign_stripe_verifies_with_construct_event_at_five_minutes_tolerance() -> None:
    secret = "whsec_target_secret"
    signer = Signer(None, ResignConfig(provider="stripe", secret=secret))
    stale = [("stripe-signature", "t=1,v1=00")]
    headers = as_dict(signer.apply(stale, "m", BODY, int(time.time())))
    event = stripe.Webhook.construct_event(BODY, headers["stripe-signature"], secret, 300)
    assert event["type"] == "charge.succeeded"
    old = as_dict(signer.apply(stale, "m", BODY, int(time.time()) - 3600))
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(BODY, old["stripe-signature"], secret, 300)


def test_resign_standard_webhooks_keeps_the_senders_id() -> None:
    signer = Signer(None, ResignConfig(provider="standard_webhooks", secret=SECRET))
    sender = [("webhook-id", "evt_1"), ("webhook-timestamp", "1"), ("webhook-signature", "v1,x")]
    headers = as_dict(signer.apply(sender, "msg-1", BODY, int(time.time())))
    assert headers["webhook-id"] == "evt_1"
    standardwebhooks.Webhook(SECRET).verify(BODY, headers)


def test_resign_github_recomputes_both_signature_headers() -> None:
    signer = Signer(None, ResignConfig(provider="github", secret="gh"))
    sender = [("X-Hub-Signature", "sha1=00"), ("X-Hub-Signature-256", "sha256=00")]
    headers = as_dict(signer.apply(sender, "m", b"{}", 0))
    # GitHub's scheme: the hex HMAC of the raw body (tests/test_connector_signing.py checks
    # it with @octokit/webhooks end to end).
    assert (
        headers["x-hub-signature-256"] == "sha256=" + hmac.new(b"gh", b"{}", "sha256").hexdigest()
    )
    assert headers["x-hub-signature"] == "sha1=" + hmac.new(b"gh", b"{}", hashlib.sha1).hexdigest()


@pytest.mark.parametrize(
    ("model", "data", "reason"),
    [
        (SignConfig, {"secret": "abc"}, "starts with 'whsec_'"),
        (SignConfig, {"secret": "whsec_***"}, "not base64"),
        (SignConfig, {"secret": "whsec_YWJj"}, "shorter than 16 bytes"),
        (ResignConfig, {"provider": "paypal", "secret": "x"}, "'stripe', 'github' or"),
        (ResignConfig, {"provider": "standard_webhooks", "secret": "x"}, "whsec_"),
        (ResignConfig, {"provider": "github", "secret": ""}, "at least 1"),
    ],
)
def test_bad_secrets_and_providers_are_refused(
    model: type[SignConfig] | type[ResignConfig], data: dict[str, str], reason: str
) -> None:
    with pytest.raises(ValidationError, match=reason.replace("*", r"\*")):
        model.model_validate(data)


def test_secrets_stay_out_of_reprs() -> None:
    assert SECRET not in repr(SignConfig(secret=SECRET))
    assert "gh-secret" not in repr(ResignConfig(provider="github", secret="gh-secret"))
