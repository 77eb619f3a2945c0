"""Shared-secret checks: ``authorization``, ``basic_auth``, ``header_auth`` and ``query_auth``.

Every comparison is constant time over UTF-8 bytes (``hmac.compare_digest``), so the time an
answer takes says nothing about how much of a guess was right.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from webhook_connect.cloud.security.inbound import Check, InboundRequest, Services, unauthorized
from webhook_connect.shared.config.inbound import BasicAuthConfig, HeaderAuthConfig, QueryAuthConfig


def same(given: str, expected: str) -> bool:
    """Constant-time string equality."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode())


def build_authorization(expected: str, services: Services) -> Check:
    """``"authorization": "Bearer <token>"`` or any literal ``Authorization`` value."""
    scheme = expected.split(" ", 1)[0] if " " in expected else None
    challenge = f'{scheme} realm="webhook"' if scheme else None

    async def check(request: InboundRequest) -> None:
        given = request.header("authorization")
        if given is None:
            raise unauthorized("missing Authorization header", challenge)
        if not same(given, expected):
            raise unauthorized("invalid Authorization header", challenge)

    return check


def build_basic(config: BasicAuthConfig, services: Services) -> Check:
    """HTTP Basic (RFC 7617); credentials decoded as UTF-8, else latin-1."""
    challenge = f'Basic realm="{config.realm}", charset="UTF-8"'

    async def check(request: InboundRequest) -> None:
        scheme, _, encoded = (request.header("authorization") or "").partition(" ")
        if scheme.lower() != "basic" or not encoded:
            raise unauthorized("missing Basic credentials", challenge)
        try:
            raw = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise unauthorized("malformed Basic credentials", challenge) from None
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError:
            decoded = raw.decode("latin-1")
        username, colon, password = decoded.partition(":")
        # Both compared, always, so a wrong user name takes as long as a wrong password.
        user_ok = same(username, config.username)
        password_ok = same(password, config.password)
        if not (colon and user_ok and password_ok):
            raise unauthorized("invalid Basic credentials", challenge)

    return check


def _key_matches(given: str, config: HeaderAuthConfig | QueryAuthConfig) -> bool:
    if config.case_sensitive:
        return same(given, config.api_key)
    return same(given.lower(), config.api_key.lower())


def build_header(config: HeaderAuthConfig, services: Services) -> Check:
    """An API key in a named header."""

    async def check(request: InboundRequest) -> None:
        given = request.header(config.header_name)
        if not given:
            raise unauthorized(f"missing header {config.header_name}")
        if not _key_matches(given, config):
            raise unauthorized(f"invalid API key in header {config.header_name}")

    return check


def build_query(config: QueryAuthConfig, services: Services) -> Check:
    """An API key in a query parameter."""

    async def check(request: InboundRequest) -> None:
        values = request.query.get(config.parameter_name)
        if not values or not values[0]:
            raise unauthorized(f"missing query parameter {config.parameter_name}")
        if len(values) > 1 or not _key_matches(values[0], config):
            raise unauthorized(f"invalid API key in query parameter {config.parameter_name}")

    return check
