"""``oauth2``: a bearer access token, checked by RFC 7662 introspection or as a JWT.

Introspection asks the authorization server on the request path, so its answers are kept briefly
(at most ``CACHE_SECONDS``, never past the token's ``exp``) and concurrent requests carrying the
same token share one call. When the server cannot answer, the webhook is refused with 503 and
``Retry-After``: the sender did nothing wrong and should try again, which a 401 would not say.

The token is never a cache key nor logged: only its SHA-256 is.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import urllib.parse
from collections.abc import Mapping
from typing import Any

from webhook_connect.cloud.security.inbound import (
    Check,
    InboundRequest,
    RawHeaders,
    Rejected,
    Services,
)
from webhook_connect.cloud.security.jwt import (
    TokenError,
    VerificationKey,
    challenge,
    check_lifetime,
    credentials,
    decode_bearer_jwt,
    load_key,
)
from webhook_connect.cloud.security.outbound import post_form
from webhook_connect.shared.config.inbound import OAuth2Config

CACHE_SECONDS = 30.0
CACHE_ENTRIES = 1024


def token_hash(token: str) -> str:
    """What the cache knows a token by: its SHA-256, never the token itself."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class IntrospectionCache:
    """Active introspection answers by token hash, until ``CACHE_SECONDS`` pass or the token's
    ``exp``, whichever is first; at most ``max_entries``, the oldest dropped first."""

    def __init__(self, max_entries: int = CACHE_ENTRIES, ttl: float = CACHE_SECONDS) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._entries: dict[str, tuple[float, dict[str, Any]]] = {}

    def get(self, key: str, now: float) -> dict[str, Any] | None:
        """The answer kept for ``key`` and still fresh at ``now``, or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry[0]:
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: str, answer: dict[str, Any], now: float) -> None:
        """Keep ``answer`` if it is active and not already expired at ``now``."""
        if answer.get("active") is not True:
            return
        until = now + self.ttl
        expires = answer.get("exp")
        if isinstance(expires, int | float) and not isinstance(expires, bool):
            until = min(until, float(expires))
        if until <= now:
            return
        self._entries.pop(key, None)
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (until, answer)


class Introspector:
    """RFC 7662 calls for one configuration, through the cache and shared while in flight."""

    def __init__(self, config: OAuth2Config, services: Services) -> None:
        assert config.introspection_endpoint is not None
        self.url = config.introspection_endpoint
        self.config = config
        self.services = services
        self.cache = IntrospectionCache()
        self.headers: dict[str, str] = {"Accept": "application/json"}
        self.form: dict[str, str] = {"token_type_hint": "access_token"}
        if config.client_id is not None and config.client_secret is not None:
            # RFC 6749 §2.3.1: each part form-encoded, then HTTP Basic.
            parts = (config.client_id, config.client_secret)
            pair = ":".join(urllib.parse.quote_plus(part) for part in parts)
            basic = base64.b64encode(pair.encode()).decode("ascii")
            self.headers["Authorization"] = f"Basic {basic}"
        elif config.client_id is not None:
            self.form["client_id"] = config.client_id  # a public client (RFC 6749 §2.3)
        self._inflight: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def introspect(self, token: str, now: float) -> dict[str, Any]:
        """The server's answer about ``token``: cached, joined to a call in flight, or asked."""
        key = token_hash(token)
        cached = self.cache.get(key, now)
        if cached is not None:
            return cached
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._ask(token, key, now))
            self._inflight[key] = pending
            pending.add_done_callback(lambda done: self._settled(key, done))
        # Shielded: one waiter going away (a dropped connection) must not cancel the call that
        # the others wait on.
        return await asyncio.shield(pending)

    def _settled(self, key: str, done: asyncio.Future[dict[str, Any]]) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]
        if not done.cancelled():
            done.exception()  # retrieved, even when every waiter has gone

    async def _ask(self, token: str, key: str, now: float) -> dict[str, Any]:
        answer = await post_form(
            self.services.http,
            self.url,
            {**self.form, "token": token},
            timeout_seconds=self.config.timeout_seconds,
            headers=self.headers,
            what="token introspection",
        )
        self.cache.put(key, answer, now)
        return answer


def scopes_of(claims: Mapping[str, Any]) -> set[str]:
    """Granted scopes: ``scope`` as a space-separated string (RFC 7662, RFC 9068) or ``scp`` as
    a list (or string), as some servers issue them."""
    granted: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            granted.update(value.split())
        elif isinstance(value, list):
            granted.update(item for item in value if isinstance(item, str))
    return granted


def _audiences(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, list):
        return {item for item in value if isinstance(item, str)}
    return set()


def check_introspection(answer: Mapping[str, Any], config: OAuth2Config, now: float) -> None:
    """Refuse, at instant ``now``, a token the introspection ``answer`` does not vouch for."""
    if answer.get("active") is not True:
        raise TokenError("token is not active")
    check_lifetime(answer, now=now, verify_exp=config.verify_exp, leeway=config.leeway)
    if config.issuer is not None and answer.get("iss") != config.issuer:
        raise TokenError("wrong issuer")
    if config.audience is not None:
        wanted = _audiences(config.audience)
        if not wanted & _audiences(answer.get("aud")):
            raise TokenError("wrong audience")


def build(config: OAuth2Config, services: Services) -> Check:
    """The ``oauth2`` check; ValueError when ``jwt_secret`` cannot verify any of
    ``jwt_algorithms``. With both ways configured, introspection decides."""
    scheme = config.token_type
    required = set(config.required_scope)
    # Built now, so that a value a header cannot carry is a configuration error, not a 500.
    missing_token = _header(challenge(scheme))
    invalid_token = _header(challenge(scheme, "invalid_token"))
    scope = " ".join(sorted(required))
    insufficient = _header(challenge(scheme, "insufficient_scope", scope=scope))
    introspector: Introspector | None = None
    key: VerificationKey | None = None
    if config.validate_token and config.introspection_endpoint is not None:
        introspector = Introspector(config, services)
    elif config.validate_token and config.jwt_secret is not None:
        key = load_key(config.jwt_secret, config.jwt_algorithms)

    async def claims_of(token: str, now: float) -> Mapping[str, Any]:
        if introspector is not None:
            answer = await introspector.introspect(token, now)
            check_introspection(answer, config, now)
            return answer
        assert key is not None
        return decode_bearer_jwt(
            token,
            key,
            now=now,
            issuer=config.issuer,
            audience=config.audience,
            verify_exp=config.verify_exp,
            leeway=config.leeway,
        )

    async def check(request: InboundRequest) -> None:
        token = credentials(request, scheme)
        if token is None:
            raise Rejected(401, "unauthorized", f"missing {scheme} token", missing_token)
        if not config.validate_token:
            return
        try:
            claims = await claims_of(token, request.now)
        except TokenError as exc:
            raise Rejected(401, "unauthorized", exc.reason, invalid_token) from None
        lacking = required - scopes_of(claims)
        if lacking:
            # RFC 6750 §3.1: a valid token without the scope the resource needs is a 403.
            detail = f"token lacks the scope {' '.join(sorted(lacking))}"
            raise Rejected(403, "forbidden", detail, insufficient)

    return check


def _header(challenge: str) -> RawHeaders:
    try:
        return [(b"www-authenticate", challenge.encode("latin-1"))]
    except UnicodeEncodeError:
        raise ValueError("token_type and required_scope must be Latin-1 text") from None
