"""``digest_auth``: HTTP Digest access authentication (RFC 7616), qop ``auth`` or none.

The server nonce is stateless so that any cloud replica can check a nonce another one issued:
it is ``base64url(issued_at || salt || HMAC(key, issued_at || salt))`` with a key derived from
the configured password and realm, and a random salt so that no two challenges share a nonce
(without qop, a nonce is all that tells one request from a replay of another). Its lifetime
bounds how long a captured nonce is worth anything; within that lifetime the shared replay
store refuses a second use of one (nonce, nc, cnonce) triple.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import os
import re
import struct

from webhook_connect.cloud.security.authparams import parse_parameters
from webhook_connect.cloud.security.inbound import (
    Check,
    InboundRequest,
    Rejected,
    Services,
    unauthorized,
)
from webhook_connect.shared.config.inbound import DigestAuthConfig

HASHES = {"MD5": "md5", "MD5-SESS": "md5", "SHA-256": "sha256", "SHA-256-SESS": "sha256"}
# Replicas' clocks differ a little; a nonce issued "in the future" by less than this is fine.
CLOCK_SKEW_SECONDS = 2
TIMESTAMP = struct.Struct(">Q")
SALT_SIZE = 8
MAC_SIZE = hashlib.sha256().digest_size
NONCE_SIZE = TIMESTAMP.size + SALT_SIZE + MAC_SIZE
NC = re.compile(r"^[0-9a-fA-F]{8}$")
REQUIRED = ("username", "realm", "nonce", "uri", "response")


class NonceState(enum.Enum):
    VALID = "valid"
    EXPIRED = "expired"  # genuine, but too old: the client may retry with a fresh one
    INVALID = "invalid"  # not ours, malformed, or from the future


def nonce_key(password: str, realm: str) -> bytes:
    """The key that signs nonces: the same on every replica with the same configuration."""
    message = b"webhook-connect digest nonce\x00" + realm.encode()
    return hmac.new(password.encode(), message, hashlib.sha256).digest()


def create_nonce(key: bytes, now: float, salt: bytes) -> str:
    """A nonce issued at ``now``: the time, ``salt`` and their MAC, base64url without padding."""
    if len(salt) != SALT_SIZE:
        raise ValueError(f"the salt must be {SALT_SIZE} bytes")
    issued = TIMESTAMP.pack(int(now)) + salt
    mac = hmac.new(key, issued, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(issued + mac).rstrip(b"=").decode("ascii")


def check_nonce(key: bytes, nonce: str, now: float, lifetime: float) -> NonceState:
    """Whether ``nonce`` was issued with ``key`` no more than ``lifetime`` seconds before now."""
    try:
        raw = base64.urlsafe_b64decode(nonce.encode("ascii") + b"=" * (-len(nonce) % 4))
    except (ValueError, UnicodeEncodeError):
        return NonceState.INVALID
    if len(raw) != NONCE_SIZE:
        return NonceState.INVALID
    issued, mac = raw[:-MAC_SIZE], raw[-MAC_SIZE:]
    if not hmac.compare_digest(mac, hmac.new(key, issued, hashlib.sha256).digest()):
        return NonceState.INVALID
    (issued_at,) = TIMESTAMP.unpack(issued[: TIMESTAMP.size])
    if issued_at > now + CLOCK_SKEW_SECONDS:
        return NonceState.INVALID
    if now - issued_at > lifetime:
        return NonceState.EXPIRED
    return NonceState.VALID


def compute_response(
    algorithm: str,
    *,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    qop: str = "",
    nc: str = "",
    cnonce: str = "",
) -> str:
    """The ``response`` value a client with these credentials sends (RFC 7616 §3.4.1)."""
    hash_name = HASHES[algorithm.upper()]

    def digest(*parts: str) -> str:
        return hashlib.new(hash_name, ":".join(parts).encode()).hexdigest()

    ha1 = digest(username, realm, password)
    if algorithm.upper().endswith("-SESS"):
        ha1 = digest(ha1, nonce, cnonce)
    ha2 = digest(method, uri)
    if qop:
        return digest(ha1, nonce, nc, cnonce, qop, ha2)
    return digest(ha1, nonce, ha2)  # RFC 2069 compatibility: no qop


def parse_credentials(header: str) -> dict[str, str] | None:
    """The parameters of ``Digest k=v, k="v", ...``, or None when it is not that."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "digest":
        return None
    return parse_parameters(rest, fold_case=True)


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def challenge(config: DigestAuthConfig, nonce: str, opaque: str, stale: bool = False) -> str:
    """The ``WWW-Authenticate`` value offering ``nonce``."""
    parts = [f"realm={quote(config.realm)}"]
    if config.qop:
        parts.append(f'qop="{config.qop}"')
    parts += [f"algorithm={config.algorithm}", f"nonce={quote(nonce)}", f"opaque={quote(opaque)}"]
    if stale:
        parts.append("stale=true")
    return "Digest " + ", ".join(parts)


def request_uri(request: InboundRequest) -> str:
    """The request-target the client must have put in ``uri``."""
    if request.query_string:
        return f"{request.path}?{request.query_string}"
    return request.path


def mismatch(config: DigestAuthConfig, opaque: str, fields: dict[str, str]) -> str | None:
    """Why ``fields`` cannot be a response to our challenge, or None when they can be."""
    missing = [name for name in REQUIRED if name not in fields]
    if config.qop:
        missing += [name for name in ("qop", "nc", "cnonce") if name not in fields]
    if missing:
        return f"missing {', '.join(missing)}"
    if fields["realm"] != config.realm:
        return "wrong realm"
    if fields.get("algorithm", "MD5").upper() != config.algorithm.upper():
        return f"algorithm must be {config.algorithm}"
    if fields.get("qop", "") != config.qop:
        return f"qop must be {config.qop!r}" if config.qop else "qop is not offered"
    if config.qop and not NC.match(fields["nc"]):
        return "nc must be 8 hex digits"
    if not hmac.compare_digest(fields.get("opaque", "").encode(), opaque.encode()):
        return "wrong opaque"
    return None


def build(config: DigestAuthConfig, services: Services) -> Check:
    """A check that answers 401 with a Digest challenge until the client proves the password.

    Raises ``ValueError`` for a ``-sess`` algorithm without qop: its session key needs the
    client's cnonce, which a client sends only with a qop (RFC 2617 §3.2.2).
    """
    if config.algorithm.upper().endswith("-SESS") and not config.qop:
        raise ValueError(f"algorithm {config.algorithm} needs qop 'auth'")
    key = nonce_key(config.password, config.realm)
    opaque = hmac.new(key, b"opaque", hashlib.sha256).hexdigest()[:32]
    username = config.username.encode()
    # A replayed triple only matters while its nonce is still accepted.
    replay_ttl = float(config.nonce_lifetime_seconds + CLOCK_SKEW_SECONDS)

    def refuse(request: InboundRequest, detail: str, stale: bool = False) -> Rejected:
        nonce = create_nonce(key, request.now, os.urandom(SALT_SIZE))
        return unauthorized(detail, challenge(config, nonce, opaque, stale))

    async def check(request: InboundRequest) -> None:
        header = request.header("authorization")
        if header is None:
            raise refuse(request, "digest credentials required")
        fields = parse_credentials(header)
        if fields is None:
            raise refuse(request, "digest credentials required")
        problem = mismatch(config, opaque, fields)
        if problem is not None:
            raise refuse(request, f"invalid digest credentials: {problem}")
        if fields["uri"] != request_uri(request):
            raise refuse(request, "digest uri does not match the request")
        state = check_nonce(key, fields["nonce"], request.now, config.nonce_lifetime_seconds)
        if state is NonceState.INVALID:
            raise refuse(request, "invalid digest nonce")
        expected = compute_response(
            config.algorithm,
            username=config.username,
            realm=config.realm,
            password=config.password,
            method=request.method,
            uri=fields["uri"],
            nonce=fields["nonce"],
            qop=fields.get("qop", ""),
            nc=fields.get("nc", ""),
            cnonce=fields.get("cnonce", ""),
        )
        # Both compared every time, so that timing does not tell a wrong name from a wrong password.
        right_name = hmac.compare_digest(fields["username"].encode(), username)
        right_response = hmac.compare_digest(fields["response"].encode(), expected.encode())
        if not (right_name and right_response):
            raise refuse(request, "invalid digest credentials")
        # RFC 7616 §3.3: stale only when the digest itself was right, so the client may retry
        # with the new nonce without asking its user again.
        if state is NonceState.EXPIRED:
            raise refuse(request, "digest nonce expired", stale=True)
        triple = f"digest:{fields['nonce']}:{fields.get('nc', '')}:{fields.get('cnonce', '')}"
        if not await services.remember(triple, replay_ttl):
            raise refuse(request, "digest nonce count replayed")

    return check
