"""Signed deliveries: the headers a target's ``sign`` and ``resign`` settings add to a request.

Pure logic, no I/O: the caller passes the time. Each header is computed over the exact body the
target receives, at each attempt, so the timestamp is that of the attempt.

- ``sign``: Standard Webhooks headers of the connector's own (``webhook-id`` = the message id),
  so a local app can tell a request came through its connector.
- ``resign``: the provider's own signature header, recomputed with the target's secret and the
  current time. A message replayed from history hours later then verifies at a target that
  enforces the provider's usual five-minute tolerance. The connector vouches for the body it
  relays: the cloud's inbound check is what established that the provider sent it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Provider = Literal["stripe", "github", "standard_webhooks"]
Headers = list[tuple[str, str]]

STANDARD_PREFIX = "whsec_"
# Headers each setting writes; the sender's headers of these names are dropped, any case.
STANDARD_HEADERS = frozenset({"webhook-id", "webhook-timestamp", "webhook-signature"})
PROVIDER_HEADERS: dict[str, frozenset[str]] = {
    "stripe": frozenset({"stripe-signature"}),
    "github": frozenset({"x-hub-signature-256", "x-hub-signature"}),
    "standard_webhooks": frozenset({"webhook-timestamp", "webhook-signature"}),
}


def standard_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (``whsec_`` + base64); ValueError if not."""
    if not secret.startswith(STANDARD_PREFIX):
        raise ValueError("a Standard Webhooks secret starts with 'whsec_'")
    try:
        key = base64.b64decode(secret[len(STANDARD_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the part after 'whsec_' is not base64") from None
    if len(key) < 16:
        raise ValueError("the secret is shorter than 16 bytes once decoded")
    return key


class SignConfig(BaseModel):
    """A target's ``sign``: add Standard Webhooks headers made with ``secret``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: str = Field(repr=False)

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, value: str) -> str:
        standard_key(value)
        return value


class ResignConfig(BaseModel):
    """A target's ``resign``: replace ``provider``'s signature with a fresh one by ``secret``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Provider
    secret: str = Field(min_length=1, repr=False)

    @model_validator(mode="after")
    def _check_secret(self) -> ResignConfig:
        if self.provider == "standard_webhooks":
            try:
                standard_key(self.secret)
            except ValueError as exc:
                raise ValueError(f"secret: {exc}") from None
        return self


def standard_signature(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` (Standard Webhooks)."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def stripe_signature(secret: str, timestamp: int, body: bytes) -> str:
    """``t=<timestamp>,v1=<hex HMAC-SHA256 of "timestamp.body">``, keyed by the secret as is."""
    signed = f"{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def github_signature(secret: str, body: bytes, algorithm: str = "sha256") -> str:
    """``sha256=<hex HMAC of the body>`` (``X-Hub-Signature-256``; sha1 for the old header)."""
    return f"{algorithm}=" + hmac.new(secret.encode(), body, algorithm).hexdigest()


class Signer:
    """The ``sign`` and ``resign`` of one target, compiled once (the key decoded)."""

    def __init__(self, sign: SignConfig | None, resign: ResignConfig | None) -> None:
        self._sign_key = standard_key(sign.secret) if sign is not None else None
        self._resign = resign
        self._resign_key = (
            standard_key(resign.secret)
            if resign is not None and resign.provider == "standard_webhooks"
            else None
        )
        dropped: set[str] = set()
        if sign is not None:
            dropped |= STANDARD_HEADERS
        if resign is not None:
            dropped |= PROVIDER_HEADERS[resign.provider]
        self.dropped = frozenset(dropped)

    def apply(self, headers: Headers, message_id: str, body: bytes, now: int) -> Headers:
        """``headers`` without the ones this target's signing replaces, plus the new ones."""
        kept = [(name, value) for name, value in headers if name.lower() not in self.dropped]
        resign = self._resign
        if resign is not None:
            kept += self._resigned(resign, headers, message_id, body, now)
        if self._sign_key is not None:
            kept += [
                ("webhook-id", message_id),
                ("webhook-timestamp", str(now)),
                ("webhook-signature", standard_signature(self._sign_key, message_id, now, body)),
            ]
        return kept

    def _resigned(
        self, resign: ResignConfig, original: Headers, message_id: str, body: bytes, now: int
    ) -> Headers:
        if resign.provider == "stripe":
            return [("Stripe-Signature", stripe_signature(resign.secret, now, body))]
        if resign.provider == "github":
            fresh = [("X-Hub-Signature-256", github_signature(resign.secret, body))]
            # The old sha1 header would still carry the provider's secret: recompute it too.
            if _header(original, "x-hub-signature") is not None:
                fresh.append(("X-Hub-Signature", github_signature(resign.secret, body, "sha1")))
            return fresh
        assert self._resign_key is not None
        # The sender's webhook-id is the event's id (receivers deduplicate on it): keep it.
        webhook_id = _header(original, "webhook-id") or message_id
        return [
            ("webhook-timestamp", str(now)),
            ("webhook-signature", standard_signature(self._resign_key, webhook_id, now, body)),
        ] + ([] if _header(original, "webhook-id") else [("webhook-id", webhook_id)])


def _header(headers: Sequence[tuple[str, str]], lower_name: str) -> str | None:
    for name, value in headers:
        if name.lower() == lower_name:
            return value
    return None
