"""``oauth1``: a request signed with OAuth 1.0 (RFC 5849) in the ``Authorization`` header.

Verification is ours, written from the RFC: the signature base string (§3.4.1) is rebuilt from
what the request carries, signed with the configured secrets and compared in constant time. A
nonce is recorded only after its signature verified, so unauthenticated traffic cannot burn the
nonces of a legitimate sender. A body that is not form-encoded is covered only when the sender
adds ``oauth_body_hash`` (oauthlib does); without it, RFC 5849 leaves such a body unsigned.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import urllib.parse

from webhook_connect.cloud.security.authparams import parse_parameters
from webhook_connect.cloud.security.inbound import Check, InboundRequest, Services, unauthorized
from webhook_connect.shared.config.inbound import OAuth1Config

CHALLENGE = 'OAuth realm="webhook"'
HMAC_HASHES = {"HMAC-SHA1": "sha1", "HMAC-SHA256": "sha256"}
DEFAULT_PORTS = {"http": "80", "https": "443"}
FORM = "application/x-www-form-urlencoded"
# §3.1: a signed request carries these; timestamp and nonce "MAY be omitted" only for PLAINTEXT.
REQUIRED = ("oauth_consumer_key", "oauth_signature_method", "oauth_signature")
REPLAY_PARAMETERS = ("oauth_timestamp", "oauth_nonce")
MAX_TIMESTAMP_DIGITS = 20

Parameters = list[tuple[str, str]]


class Invalid(Exception):
    """Why a request's OAuth parameters cannot be accepted."""


def encode(value: str) -> str:
    """RFC 5849 §3.6: UTF-8, then every byte but the unreserved characters percent-encoded."""
    return urllib.parse.quote(value, safe="~")


def parse_authorization(header: str) -> dict[str, str] | None:
    """The percent-decoded parameters of ``OAuth k="v", ...`` (§3.5.1), or None."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "oauth":
        return None
    raw = parse_parameters(rest)
    if raw is None:
        return None
    decoded = {
        urllib.parse.unquote(name): urllib.parse.unquote(value) for name, value in raw.items()
    }
    return decoded if len(decoded) == len(raw) else None


def base_string_uri(scheme: str, host: str, path: str) -> str:
    """§3.4.1.2: scheme and host lower-cased, the default port dropped, no query."""
    scheme, host = scheme.lower(), host.lower()
    name, colon, port = host.rpartition(":")
    # A bare IPv6 literal ("[::1]") has colons but no port after its closing bracket.
    if colon and not port.endswith("]") and port == DEFAULT_PORTS.get(scheme):
        host = name
    return f"{scheme}://{host}{path or '/'}"


def request_parameters(
    query_string: str, oauth: dict[str, str], content_type: str | None, body: bytes
) -> Parameters:
    """§3.4.1.3.1: query, ``Authorization`` (less realm and signature) and a form body."""
    media_type = (content_type or "").partition(";")[0].strip().lower()
    form = body if media_type == FORM else b""
    try:
        # Decoded strictly: a lossy decode would sign different bytes than the sender did.
        parameters = decode_form(query_string.encode("latin-1")) + decode_form(form)
    except UnicodeError:
        raise Invalid("query or form body is not percent-encoded UTF-8") from None
    parameters += [
        (name, value) for name, value in oauth.items() if name not in ("realm", "oauth_signature")
    ]
    return parameters


def decode_form(data: bytes) -> Parameters:
    """``application/x-www-form-urlencoded`` pairs, blank values kept, ``+`` a space."""
    text = data.decode("ascii")
    return urllib.parse.parse_qsl(text, keep_blank_values=True, errors="strict")


def normalize_parameters(parameters: Parameters) -> str:
    """§3.4.1.3.2: encode each name and value, sort by name then value, join with ``&``."""
    encoded = sorted((encode(name), encode(value)) for name, value in parameters)
    return "&".join(f"{name}={value}" for name, value in encoded)


def signature_base_string(method: str, uri: str, parameters: Parameters) -> str:
    """§3.4.1.1: ``METHOD&enc(base string URI)&enc(normalised parameters)``."""
    return "&".join((method.upper(), encode(uri), encode(normalize_parameters(parameters))))


def sign(method: str, base_string: str, consumer_secret: str, token_secret: str) -> str:
    """The ``oauth_signature`` (decoded) for ``base_string`` (§3.4.2, §3.4.4)."""
    key = f"{encode(consumer_secret)}&{encode(token_secret)}"
    if method == "PLAINTEXT":
        return key
    mac = hmac.new(key.encode(), base_string.encode(), HMAC_HASHES[method]).digest()
    return base64.b64encode(mac).decode("ascii")


def body_hash(body: bytes) -> str:
    """``oauth_body_hash``: base64 of the body's SHA-1, as the extension defines it."""
    return base64.b64encode(hashlib.sha1(body).digest()).decode("ascii")


def check_fields(config: OAuth1Config, oauth: dict[str, str]) -> None:
    """Refuse parameters that cannot belong to a request from the configured consumer."""
    missing = [name for name in REQUIRED if name not in oauth]
    if config.signature_method != "PLAINTEXT" or config.verify_timestamp:
        missing += [name for name in REPLAY_PARAMETERS if name not in oauth]
    if missing:
        raise Invalid(f"missing {', '.join(missing)}")
    key = oauth["oauth_consumer_key"].encode()
    if not hmac.compare_digest(key, config.consumer_key.encode()):
        raise Invalid("unknown consumer key")
    if oauth["oauth_signature_method"] != config.signature_method:
        raise Invalid(f"oauth_signature_method must be {config.signature_method}")
    if oauth.get("oauth_version", "1.0") != "1.0":
        raise Invalid("oauth_version must be 1.0")


def check_timestamp(timestamp: str, now: float, window: float) -> None:
    """§3.3: the timestamp is a positive integer of seconds, here no further than ``window``."""
    if not timestamp.isascii() or not timestamp.isdigit():
        raise Invalid("oauth_timestamp is not a number of seconds")
    # Python refuses to convert more than 4,300 digits (a ValueError, which was a 500 here);
    # 20 digits outlast any clock, so anything longer is simply in the future.
    seconds = int(timestamp) if len(timestamp) <= MAX_TIMESTAMP_DIGITS else math.inf
    if seconds > now + window:
        raise Invalid("oauth_timestamp is in the future")
    if seconds < now - window:
        raise Invalid("oauth_timestamp is too old")


def verify(config: OAuth1Config, request: InboundRequest) -> dict[str, str]:
    """The request's OAuth parameters once its signature and timestamp are right."""
    header = request.header("authorization")
    oauth = None if header is None else parse_authorization(header)
    if oauth is None:
        raise Invalid("OAuth signature required")
    check_fields(config, oauth)
    uri = base_string_uri(request.scheme, request.host, request.path)
    parameters = request_parameters(
        request.query_string, oauth, request.header("content-type"), request.body
    )
    base_string = signature_base_string(request.method, uri, parameters)
    expected = sign(
        config.signature_method, base_string, config.consumer_secret, config.token_secret
    )
    if not hmac.compare_digest(oauth["oauth_signature"].encode(), expected.encode()):
        raise Invalid("invalid OAuth signature")
    # RFC 5849 signs a form body's parameters but no other body; the body hash extension
    # (draft-eaton-oauth-bodyhash §3.2) covers the rest, and the signature covers the hash.
    is_form = (request.header("content-type") or "").split(";")[0].strip().lower() == FORM
    if config.require_body_hash and "oauth_body_hash" not in oauth and not is_form:
        raise Invalid("oauth_body_hash required: the body is not covered by the signature")
    if "oauth_body_hash" in oauth and not hmac.compare_digest(
        oauth["oauth_body_hash"].encode(), body_hash(request.body).encode()
    ):
        raise Invalid("oauth_body_hash does not match the body")
    if config.verify_timestamp:
        check_timestamp(oauth["oauth_timestamp"], request.now, config.timestamp_window)
    return oauth


def build(config: OAuth1Config, services: Services) -> Check:
    """A check that accepts requests signed with the configured consumer (and token) secret."""
    replay_ttl = float(2 * config.timestamp_window)

    async def check(request: InboundRequest) -> None:
        try:
            oauth = verify(config, request)
        except Invalid as exc:
            raise unauthorized(str(exc), CHALLENGE) from None
        if "oauth_nonce" not in oauth:
            return  # PLAINTEXT without timestamp checks: nothing to replay-protect by
        # §3.3: a timestamp and nonce pair is used once. The window bounds how long to remember.
        timestamp, nonce = oauth.get("oauth_timestamp", ""), oauth["oauth_nonce"]
        if not await services.remember(
            f"oauth1:{config.consumer_key}:{timestamp}:{nonce}", replay_ttl
        ):
            raise unauthorized("OAuth nonce already used", CHALLENGE)

    return check
