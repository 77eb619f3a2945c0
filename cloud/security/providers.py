"""``provider``: the signature schemes of well-known senders, over the exact raw body.

=====================  ==================================================  =========
provider               header(s)                                           timestamp
=====================  ==================================================  =========
``github``             ``X-Hub-Signature-256: sha256=<hex>``               no
``stripe``             ``Stripe-Signature: t=<ts>,v1=<hex>[,v1=...]``      yes
``slack``              ``X-Slack-Signature: v0=<hex>``, ``...-Timestamp``  yes
``shopify``            ``X-Shopify-Hmac-Sha256: <base64>``                 no
``standard_webhooks``  ``webhook-{id,timestamp,signature}`` (or ``svix-``)  yes
=====================  ==================================================  =========

All are HMAC-SHA256. Several secrets may be configured during a rotation; any may have signed
the request. A timestamped scheme is refused when its timestamp is further than the tolerance
from now, in either direction: a stale one may be a replay, a future one lets a replay live on.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass

from webhook_connect.cloud.security.inbound import Check, InboundRequest, Services, unauthorized
from webhook_connect.cloud.security.signatures import matches_any

PROVIDERS = ("github", "stripe", "slack", "shopify", "standard_webhooks")
TIMESTAMP = re.compile(r"[0-9]{1,12}")
STANDARD_SECRET_PREFIX = "whsec_"


@dataclass(frozen=True)
class Presented:
    """What a request offers: its candidate signatures and the values they also cover."""

    signatures: list[str]
    timestamp: str = ""
    timestamp_header: str = ""
    message_id: str = ""


def signing_key(provider: str, secret: str) -> bytes:
    """The HMAC key of a configured secret; ``ValueError`` when it cannot be one."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}")
    if provider != "standard_webhooks":
        # Stripe's "whsec_..." is used as is, prefix included (its libraries do the same).
        return secret.encode()
    # Standard Webhooks: the key is the base64 after "whsec_"; senders often drop the padding.
    encoded = secret.removeprefix(STANDARD_SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError("a standard_webhooks secret is base64, after 'whsec_'") from None
    if not key:
        raise ValueError("a standard_webhooks secret must not be empty")
    return key


def _hmac(key: bytes, content: bytes) -> bytes:
    return hmac.new(key, content, hashlib.sha256).digest()


def _sign(provider: str, key: bytes, body: bytes, timestamp: str, message_id: str) -> str:
    if provider == "github":
        return "sha256=" + _hmac(key, body).hex()
    if provider == "stripe":
        return _hmac(key, f"{timestamp}.".encode() + body).hex()
    if provider == "slack":
        return "v0=" + _hmac(key, f"v0:{timestamp}:".encode() + body).hex()
    if provider == "shopify":
        return base64.b64encode(_hmac(key, body)).decode()
    return base64.b64encode(_hmac(key, f"{message_id}.{timestamp}.".encode() + body)).decode()


def expected_signature(
    provider: str, secret: str, body: bytes, *, timestamp: str = "", message_id: str = ""
) -> str:
    """The signature ``secret`` gives ``body``, written as the provider's header carries one
    value (``sha256=<hex>``, a ``v1`` hex, ``v0=<hex>``, base64, a ``v1,`` base64)."""
    return _sign(provider, signing_key(provider, secret), body, timestamp, message_id)


def _required(request: InboundRequest, name: str) -> str:
    value = request.header(name)
    if not value:
        raise unauthorized(f"missing header {name}")
    return value


def _stripe(request: InboundRequest) -> Presented:
    timestamp = ""
    signatures: list[str] = []
    for item in _required(request, "Stripe-Signature").split(","):
        name, _, value = item.strip().partition("=")
        if name == "t" and not timestamp:
            timestamp = value
        elif name == "v1":  # v0 is Stripe's test-mode scheme, never valid in live mode
            signatures.append(value)
    if not timestamp:
        raise unauthorized("malformed Stripe-Signature header: no timestamp")
    return Presented(signatures, timestamp, "Stripe-Signature")


def _standard(request: InboundRequest) -> Presented:
    # The same scheme under two prefixes: Standard Webhooks' own, and Svix's older one.
    svix = request.header("svix-signature") and not request.header("webhook-signature")
    prefix = "svix-" if svix else "webhook-"
    header = _required(request, prefix + "signature")
    message_id = _required(request, prefix + "id")
    timestamp = _required(request, prefix + "timestamp")
    # Space-separated "version,value" pairs; other versions (v1a: asymmetric) are not ours.
    signatures = [
        value
        for version, _, value in (item.partition(",") for item in header.split(" "))
        if version == "v1"
    ]
    return Presented(signatures, timestamp, prefix + "timestamp", message_id)


def presented(provider: str, request: InboundRequest) -> Presented:
    """What ``request`` offers for ``provider``; a missing or malformed header is refused."""
    if provider == "github":
        return Presented([_required(request, "X-Hub-Signature-256")])
    if provider == "stripe":
        return _stripe(request)
    if provider == "slack":
        signature = _required(request, "X-Slack-Signature")
        header = "X-Slack-Request-Timestamp"
        return Presented([signature], _required(request, header), header)
    if provider == "shopify":
        return Presented([_required(request, "X-Shopify-Hmac-Sha256")])
    return _standard(request)


def check_timestamp(value: str, header: str, now: float, tolerance_seconds: int) -> None:
    """Refuse a timestamp (Unix seconds) that is not within ``tolerance_seconds`` of ``now``."""
    if not TIMESTAMP.fullmatch(value):
        raise unauthorized(f"malformed timestamp in {header}")
    if abs(now - int(value)) > tolerance_seconds:
        raise unauthorized(f"timestamp outside the {tolerance_seconds} s tolerance")


def verify(
    provider: str, keys: list[bytes], tolerance_seconds: int, request: InboundRequest
) -> None:
    """Raise :class:`Rejected` unless one of ``keys`` signed ``request`` as ``provider`` does."""
    given = presented(provider, request)
    if given.timestamp_header:
        check_timestamp(given.timestamp, given.timestamp_header, request.now, tolerance_seconds)
    expected = [
        _sign(provider, key, request.body, given.timestamp, given.message_id).encode()
        for key in keys
    ]
    found = False
    for signature in given.signatures:
        # Header values are latin-1 text here, so this is the bytes that were sent.
        found |= matches_any(signature.strip().encode("latin-1"), expected)
    if not found:
        raise unauthorized("signature does not match")


def build(provider: str, secrets: list[str], tolerance_seconds: int, services: Services) -> Check:
    """Check ``provider``'s signature with any of ``secrets``; a secret that cannot be a key
    for it, or an unknown provider, raises ``ValueError``."""
    keys = [signing_key(provider, secret) for secret in secrets]
    if not keys:
        raise ValueError("at least one secret is needed")

    async def check(request: InboundRequest) -> None:
        verify(provider, keys, tolerance_seconds, request)

    return check


def _json_string(request: InboundRequest, field: str) -> str | None:
    document = request.json()
    value = document.get(field) if isinstance(document, dict) else None
    return value if isinstance(value, str) and value else None


def delivery_id(provider: str, request: InboundRequest) -> str | None:
    """Which delivery ``request`` is, as ``provider`` names it, so that a retry is stored once;
    None when the request does not say."""
    if provider == "github":
        return request.header("X-GitHub-Delivery") or None
    if provider == "stripe":
        return _json_string(request, "id")  # the event id, "evt_..."; retries resend it
    if provider == "shopify":
        return request.header("X-Shopify-Webhook-Id") or None
    if provider == "slack":
        # Events API bodies carry event_id; slash commands and interactivity do not, so the
        # signature (over timestamp and body) names an exact replay of the signed request.
        event_id = _json_string(request, "event_id")
        if event_id is not None:
            return event_id
        signature = request.header("X-Slack-Signature")
        return f"sig:{signature}" if signature else None
    if provider == "standard_webhooks":
        return request.header("webhook-id") or request.header("svix-id") or None
    return None
