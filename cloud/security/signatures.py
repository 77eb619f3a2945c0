"""``hmac``: a keyed hash of the raw body, sent in a header, in hex or base64.

The value may carry the algorithm as a prefix (``sha256=...``, GitHub's style). Several secrets
may be configured during a rotation; any of them may have signed the request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from webhook_connect.cloud.security.inbound import Check, InboundRequest, Services, unauthorized
from webhook_connect.shared.config.inbound import HmacConfig, secret_list

DIGESTS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}


def body_signature(secret: bytes, body: bytes, algorithm: str) -> bytes:
    """The raw HMAC of ``body``."""
    return hmac.new(secret, body, DIGESTS[algorithm]).digest()


def decode_signature(value: str, algorithm: str, encoding: str) -> bytes | None:
    """The signature bytes of a header value, or None when it is not well-formed."""
    value = value.strip()
    prefix = algorithm + "="
    if value[: len(prefix)].lower() == prefix:
        value = value[len(prefix) :]
    try:
        if encoding == "hex":
            return bytes.fromhex(value)
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        return None


def matches_any(given: bytes, expected: list[bytes]) -> bool:
    """Constant-time match against each candidate (every one is compared)."""
    found = False
    for candidate in expected:
        found |= hmac.compare_digest(given, candidate)
    return found


def build_hmac(config: HmacConfig, services: Services) -> Check:
    """Check ``config.header`` against the HMAC of the body with any configured secret."""
    secrets = [secret.encode() for secret in secret_list(config.secret)]

    async def check(request: InboundRequest) -> None:
        value = request.header(config.header)
        if not value:
            raise unauthorized(f"missing header {config.header}")
        given = decode_signature(value, config.algorithm, config.encoding)
        if given is None:
            raise unauthorized(f"header {config.header} is not a {config.encoding} signature")
        expected = [body_signature(secret, request.body, config.algorithm) for secret in secrets]
        if not matches_any(given, expected):
            raise unauthorized("signature does not match")

    return check
