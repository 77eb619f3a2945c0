"""The inbound security keys of a ``webhooks.json`` entry, in the Core Webhook Module's format.

Each model validates one key; the cloud's ``cloud/security`` package enforces them. Values that
can never work (an ``alg: none`` JWT, a malformed CIDR range, a remote ``$ref``) are refused here,
at start-up, rather than on the first webhook.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
JWT_ALGORITHMS = (
    *HMAC_ALGORITHMS,
    "RS256",
    "RS384",
    "RS512",
    "ES256",
    "ES384",
    "ES512",
    "PS256",
    "PS384",
    "PS512",
)
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
PARAMETER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
PROVIDERS = ("github", "stripe", "slack", "shopify", "standard_webhooks")

Secrets = str | list[str]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _header_name(value: str) -> str:
    if not HEADER_NAME.match(value):
        raise ValueError(f"{value!r} is not an HTTP header name")
    return value


def _secrets(value: Secrets) -> Secrets:
    values = [value] if isinstance(value, str) else value
    if not values or any(not item for item in values):
        raise ValueError("a secret must not be empty")
    return value


def secret_list(value: Secrets) -> list[str]:
    """One secret or several (rotation) as a list."""
    return [value] if isinstance(value, str) else list(value)


class BasicAuthConfig(Strict):
    username: str = Field(min_length=1)
    password: str = Field(min_length=1)
    realm: str = "webhook"


class JwtConfig(Strict):
    """``jwt``: a bearer JWT checked for signature, ``exp``/``nbf``, issuer and audience."""

    secret: str = Field(min_length=1)
    algorithm: str = "HS256"
    issuer: str | None = None
    audience: str | list[str] | None = None
    verify_exp: bool = True
    leeway: NonNegativeFloat = 0.0
    required_claims: list[str] = Field(default_factory=list)

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        if value.upper() not in JWT_ALGORITHMS:
            raise ValueError(f"must be one of {', '.join(JWT_ALGORITHMS)} ('none' is refused)")
        return value.upper()


class HmacConfig(Strict):
    """``hmac``: a signature of the raw body in a header; with ``provider``, only ``secret``."""

    secret: Secrets
    header: str = "X-Hub-Signature-256"
    algorithm: Literal["sha1", "sha256", "sha512"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"

    _check_secret = field_validator("secret")(_secrets)
    _check_header = field_validator("header")(_header_name)


class KeyConfig(Strict):
    api_key: str = Field(min_length=1)
    case_sensitive: bool = False


class QueryAuthConfig(KeyConfig):
    parameter_name: str = Field(default="api_key", pattern=PARAMETER_NAME.pattern)


class HeaderAuthConfig(KeyConfig):
    header_name: str = "X-API-Key"

    _check_header = field_validator("header_name")(_header_name)


class OAuth2Config(Strict):
    """``oauth2``: a bearer token checked by RFC 7662 introspection or as a JWT."""

    token_type: str = "Bearer"
    introspection_endpoint: str | None = Field(default=None, pattern=r"^https?://")
    client_id: str | None = None
    client_secret: str | None = None
    jwt_secret: str | None = None
    jwt_algorithms: list[str] = Field(default_factory=lambda: ["HS256", "RS256"])
    audience: str | list[str] | None = None
    issuer: str | None = None
    required_scope: list[str] = Field(default_factory=list)
    validate_token: bool = True
    verify_exp: bool = True
    leeway: NonNegativeFloat = 0.0
    timeout_seconds: PositiveFloat = 5.0

    @field_validator("jwt_algorithms")
    @classmethod
    def _known_algorithms(cls, value: list[str]) -> list[str]:
        upper = [item.upper() for item in value]
        unknown = [item for item in upper if item not in JWT_ALGORITHMS]
        if unknown or not upper:
            raise ValueError(f"must be some of {', '.join(JWT_ALGORITHMS)} ('none' is refused)")
        return upper

    @model_validator(mode="after")
    def _one_way(self) -> OAuth2Config:
        if self.validate_token and not (self.introspection_endpoint or self.jwt_secret):
            raise ValueError("set 'introspection_endpoint' or 'jwt_secret'")
        return self


class DigestAuthConfig(Strict):
    username: str = Field(min_length=1)
    password: str = Field(min_length=1)
    realm: str = "Webhook API"
    algorithm: Literal["MD5", "MD5-sess", "SHA-256", "SHA-256-sess"] = "MD5"
    qop: Literal["auth", ""] = "auth"
    nonce_lifetime_seconds: PositiveInt = 300

    @model_validator(mode="after")
    def _session_needs_qop(self) -> DigestAuthConfig:
        if self.algorithm.endswith("-sess") and not self.qop:
            raise ValueError(f"{self.algorithm} needs qop 'auth' (its session key uses a cnonce)")
        return self


class OAuth1Config(Strict):
    consumer_key: str = Field(min_length=1)
    consumer_secret: str = Field(min_length=1)
    token_secret: str = ""
    signature_method: Literal["HMAC-SHA1", "HMAC-SHA256", "PLAINTEXT"] = "HMAC-SHA1"
    verify_timestamp: bool = True
    timestamp_window: PositiveInt = 300
    # RFC 5849 signs form bodies only; with this, any other body must carry oauth_body_hash.
    require_body_hash: bool = False


class RecaptchaConfig(Strict):
    secret_key: str = Field(min_length=1)
    version: Literal["v2", "v3"] = "v3"
    token_source: Literal["header", "body"] = "header"
    token_field: str = "X-Recaptcha-Token"
    min_score: float = Field(default=0.5, ge=0.0, le=1.0)
    expected_action: str | None = None
    verify_url: str = Field(
        default="https://www.google.com/recaptcha/api/siteverify", pattern=r"^https?://"
    )
    timeout_seconds: PositiveFloat = 5.0


class RateLimitConfig(Strict):
    max_requests: PositiveInt
    window_seconds: PositiveFloat


class FailedAuthLimitConfig(Strict):
    """``failed_auth_limit``: past ``max_failures`` failed authentications from one source
    address in a window, that address is answered 429 until the window ends, before any
    signature is computed."""

    max_failures: PositiveInt = 20
    window_seconds: PositiveFloat = 60.0


class IdempotencyConfig(Strict):
    """Which part of a request names the delivery, so that a retry is stored once."""

    header: str | None = None
    json_path: str | None = Field(default=None, pattern=r"^\$?(\.?[A-Za-z0-9_-]+)+$")
    window_seconds: PositiveFloat = 86400.0

    _check_header = field_validator("header")(
        lambda value: None if value is None else _header_name(value)
    )


def _check_ip_networks(value: list[str]) -> list[str]:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR range") from None
    return value


def check_json_schema(schema: Any) -> None:
    """Refuse a schema that is invalid, or that would fetch a remote ``$ref``."""
    if not isinstance(schema, dict):
        raise ValueError("must be a JSON Schema object")
    for ref in _refs(schema):
        if not ref.startswith("#"):
            raise ValueError(f"remote $ref {ref!r} is not allowed; inline the schema")
    try:
        from jsonschema.exceptions import SchemaError
        from jsonschema.validators import validator_for
    except ImportError:  # a connector-only install: the cloud, which enforces it, checks it
        return
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema: {exc.message}") from None


def _refs(node: Any) -> list[str]:
    found: list[str] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key in ("$ref", "$dynamicRef") and isinstance(value, str):
                    found.append(value)
                else:
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
    return found


class InboundSecurity(BaseModel):
    """The inbound keys of one entry. Several methods on one webhook must all pass."""

    authorization: str | None = Field(default=None, min_length=1)
    basic_auth: BasicAuthConfig | None = None
    jwt: JwtConfig | None = None
    hmac: HmacConfig | None = None
    ip_whitelist: list[str] | None = None
    trusted_proxies: list[str] = Field(default_factory=list)
    # Which header names the client when the peer is a trusted proxy; the other is ignored.
    client_ip_header: Literal["x-forwarded-for", "x-real-ip"] = "x-forwarded-for"
    query_auth: QueryAuthConfig | None = None
    header_auth: HeaderAuthConfig | None = None
    oauth2: OAuth2Config | None = None
    digest_auth: DigestAuthConfig | None = None
    oauth1: OAuth1Config | None = None
    recaptcha: RecaptchaConfig | None = None
    provider: Literal["github", "stripe", "slack", "shopify", "standard_webhooks"] | None = None
    tolerance_seconds: PositiveInt = 300
    idempotency: IdempotencyConfig | None = None
    # Counts only requests that passed authentication, so strangers cannot spend it.
    rate_limit: RateLimitConfig | None = None
    # Every request from one source address (an IPv6 /64), counted before the body is read.
    source_rate_limit: RateLimitConfig | None = None
    # On by default; null turns it off.
    failed_auth_limit: FailedAuthLimitConfig | None = Field(default_factory=FailedAuthLimitConfig)
    json_schema: dict[str, Any] | None = None
    max_json_depth: PositiveInt = 64
    max_string_length: PositiveInt = 1024 * 1024
    max_headers: PositiveInt = 100
    max_header_size: PositiveInt = 32 * 1024

    _check_ip_whitelist = field_validator("ip_whitelist")(
        lambda value: None if value is None else _check_ip_networks(value)
    )
    _check_trusted_proxies = field_validator("trusted_proxies")(_check_ip_networks)

    @field_validator("client_ip_header", mode="before")
    @classmethod
    def _header_in_any_case(cls, value: Any) -> Any:
        # Header names are case-insensitive: "X-Real-IP" means the same header.
        return value.lower() if isinstance(value, str) else value

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_json_schema(value)
        return value

    @model_validator(mode="after")
    def _provider_needs_secret(self) -> InboundSecurity:
        if self.provider is not None and self.hmac is None:
            raise ValueError(
                f"provider {self.provider!r} needs 'hmac': {{'secret': ...}} for its signatures"
            )
        return self
