"""Connector tokens: generated random, stored only as hashes, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from webhook_connect.cloud.buffers import Registry, TokenRecord

TOKEN_PREFIX = "wct_"
CONFIG_LABEL_PREFIX = "webhooks.json:"
MAX_TOKEN_LENGTH = 512


def new_token() -> str:
    """A fresh connector token with 256 bits of randomness."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of a token. Tokens are random, so a fast hash is enough here."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, token_hash: str) -> bool:
    """Constant-time comparison of a presented token with a stored hash."""
    return hmac.compare_digest(hash_token(token), token_hash)


async def authenticate_connector(
    buffer: Registry, channel: str, token: str | None, now: float
) -> TokenRecord | None:
    """The token's record if ``token`` opens ``channel`` now, else None.

    Isolation: a token opens exactly one channel; an expired token opens none.
    """
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    token_hash = hash_token(token)
    record = await buffer.find_token(token_hash)
    if record is None or not hmac.compare_digest(record.token_hash, token_hash):
        return None
    if record.channel != channel:
        return None
    if record.expires_at is not None and record.expires_at <= now:
        return None
    return record


def token_in_force(records: list[TokenRecord], token_id: str, now: float) -> bool:
    """Whether ``token_id`` is still among a channel's tokens and not past its expiry (a
    revoked token, or one whose rotation grace ended, closes the connections it opened)."""
    return any(
        record.token_id == token_id and (record.expires_at is None or record.expires_at > now)
        for record in records
    )


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None
