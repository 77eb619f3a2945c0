"""The inbound checks of each webhook, compiled once from ``webhooks.json``.

A :class:`Guard` holds, in the order ingest applies them: header limits, the sender's address
(``ip_whitelist``, 403), the source address's own limits (429: ``failed_auth_limit``,
``source_rate_limit``), then — once the body is in — every configured authentication method
(all must pass, 401), the webhook's and channel's ``rate_limit`` (429, counting only requests
that passed authentication), the body rules (400/422), and how to recognise a retried
delivery. Methods are imported only when configured, so a webhook without JWT never
loads PyJWT.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from webhook_connect.cloud.security.idempotency import DeliveryKey, build_delivery_key
from webhook_connect.cloud.security.inbound import Check, Services
from webhook_connect.cloud.security.network import ClientIpHeader, Network, parse_networks
from webhook_connect.cloud.security.payload import PayloadRules
from webhook_connect.shared.config import Webhook, WebhookEntry
from webhook_connect.shared.config.inbound import RateLimitConfig, secret_list
from webhook_connect.shared.exceptions import ConfigError

# Key of webhooks.json → "module:function" building its check from (config, services).
METHODS = {
    "authorization": "webhook_connect.cloud.security.keys:build_authorization",
    "basic_auth": "webhook_connect.cloud.security.keys:build_basic",
    "header_auth": "webhook_connect.cloud.security.keys:build_header",
    "query_auth": "webhook_connect.cloud.security.keys:build_query",
    "hmac": "webhook_connect.cloud.security.signatures:build_hmac",
    "jwt": "webhook_connect.cloud.security.jwt:build",
    "oauth2": "webhook_connect.cloud.security.oauth2:build",
    "digest_auth": "webhook_connect.cloud.security.digest:build",
    "oauth1": "webhook_connect.cloud.security.oauth1:build",
    "recaptcha": "webhook_connect.cloud.security.recaptcha:build",
}
# What OpenAPI and logs call each method.
SCHEMES = {
    "authorization": "authorization header",
    "basic_auth": "HTTP Basic",
    "header_auth": "API key in a header",
    "query_auth": "API key in the query",
    "hmac": "HMAC body signature",
    "jwt": "JWT bearer token",
    "oauth2": "OAuth 2.0 bearer token",
    "digest_auth": "HTTP Digest",
    "oauth1": "OAuth 1.0 signature",
    "recaptcha": "reCAPTCHA",
    "ip_whitelist": "IP allow-list",
}


@dataclass(frozen=True)
class RateLimit:
    """One counter: per webhook, per channel or (``key`` a prefix) per source address, shared
    by every replica through storage."""

    key: str
    max_requests: int
    window_seconds: float


@dataclass(frozen=True)
class Guard:
    """Everything ingest checks for one webhook."""

    webhook: Webhook
    max_headers: int
    max_header_size: int
    trusted_proxies: tuple[Network, ...]
    ip_check: Check | None
    rate_limits: tuple[RateLimit, ...]
    checks: tuple[Check, ...]
    schemes: tuple[str, ...]
    payload: PayloadRules
    delivery_key: DeliveryKey | None
    idempotency_window: float
    # Per source address: every request, and failed authentications (None: not counted).
    source_rate_limit: RateLimit | None = None
    failed_auth_limit: RateLimit | None = None
    client_ip_header: ClientIpHeader = "x-forwarded-for"

    @property
    def entry(self) -> WebhookEntry:
        return self.webhook.entry


def _resolve(target: str) -> Callable[..., Check]:
    module, _, name = target.partition(":")
    builder: Callable[..., Check] = getattr(importlib.import_module(module), name)
    return builder


def build_guard(webhook: Webhook, services: Services) -> Guard:
    """Compile ``webhook``'s checks; a value no check can use raises ``ValueError`` naming it
    (as ``"<key>: <reason>"``)."""
    entry = webhook.entry
    checks: list[Check] = []
    schemes: list[str] = []
    for key, target in METHODS.items():
        config: Any = getattr(entry, key)
        if config is None or (key == "hmac" and entry.provider is not None):
            continue
        try:
            checks.append(_resolve(target)(config, services))
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from exc
        schemes.append(key)
    if entry.provider is not None:
        from webhook_connect.cloud.security import providers

        assert entry.hmac is not None  # the config model insists
        secrets = secret_list(entry.hmac.secret)
        try:
            checks.append(
                providers.build(entry.provider, secrets, entry.tolerance_seconds, services)
            )
        except ValueError as exc:
            raise ValueError(f"hmac.secret: {exc}") from exc
        schemes.append(f"provider:{entry.provider}")
    ip_check = None
    if entry.ip_whitelist is not None:
        from webhook_connect.cloud.security.network import build_ip_whitelist

        ip_check = build_ip_whitelist(entry.ip_whitelist, services)
        schemes.insert(0, "ip_whitelist")
    delivery_key, window = build_delivery_key(entry)
    return Guard(
        webhook=webhook,
        max_headers=entry.max_headers,
        max_header_size=entry.max_header_size,
        trusted_proxies=parse_networks(entry.trusted_proxies),
        ip_check=ip_check,
        rate_limits=_rate_limits(webhook),
        checks=tuple(checks),
        schemes=tuple(schemes),
        payload=PayloadRules(
            require_json=entry.data_type == "json",
            max_depth=entry.max_json_depth,
            max_string_length=entry.max_string_length,
            schema=entry.json_schema,
        ),
        delivery_key=delivery_key,
        idempotency_window=window,
        source_rate_limit=(
            None
            if entry.source_rate_limit is None
            else RateLimit(
                f"source:{webhook.webhook_id}:",
                entry.source_rate_limit.max_requests,
                entry.source_rate_limit.window_seconds,
            )
        ),
        # Without an authentication method nothing can fail, and nothing is counted.
        failed_auth_limit=(
            None
            if entry.failed_auth_limit is None or not checks
            else RateLimit(
                f"auth-failures:{webhook.webhook_id}:",
                entry.failed_auth_limit.max_failures,
                entry.failed_auth_limit.window_seconds,
            )
        ),
        client_ip_header=entry.client_ip_header,
    )


def _rate_limits(webhook: Webhook) -> tuple[RateLimit, ...]:
    limits: list[tuple[str, RateLimitConfig | None]] = [
        (f"webhook:{webhook.webhook_id}", webhook.entry.rate_limit),
        ("channel", webhook.relay.rate_limit),
    ]
    return tuple(
        RateLimit(key, config.max_requests, config.window_seconds)
        for key, config in limits
        if config is not None
    )


def build_guards(
    webhooks: Mapping[str, Webhook], services: Services, source: str = "webhooks.json"
) -> dict[str, Guard]:
    """Compile every webhook; the first problem is a :class:`ConfigError` naming its key."""
    guards: dict[str, Guard] = {}
    for webhook_id, webhook in webhooks.items():
        try:
            guards[webhook_id] = build_guard(webhook, services)
        except ValueError as exc:
            key, _, reason = str(exc).partition(": ")
            raise ConfigError(source, f"{webhook_id}.{key}", reason) from exc
    return guards


async def _never_seen(key: str, ttl: float) -> bool:
    return True


# For validating a configuration before anything runs (the CLI): checks are built, not used.
OFFLINE = Services(remember=_never_seen)
