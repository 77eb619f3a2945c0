"""``jwt``: a bearer JSON Web Token (RFC 7519, RFC 6750) checked for signature, lifetime, issuer
and audience.

The verification key is loaded once, when the check is built, and the key alone decides which
algorithms it verifies (RFC 8725 §2.1, §3.1): a shared secret only ever verifies HS*, a PEM
public key only the asymmetric algorithms of its own type. A token therefore cannot choose how it
is checked, so ``alg: none`` and an HS256 token "signed" with the RSA public key both fail as
"algorithm not allowed".

Signatures: HS256/384/512 are verified here (the standard library's HMAC over the token's first
two segments, constant-time compare), which costs a tenth of a PyJWT decode on the ingest hot
path; PyJWT verifies the asymmetric families, where the public-key operation dominates anyway.
Claims are checked here for both, by one function: issuer, audience and required claims, and
the time claims (``exp``, ``nbf``, ``iat``) against ``request.now``, never a clock.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import jwt
import orjson
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from cryptography.x509 import load_pem_x509_certificate
from jwt.algorithms import AllowedPublicKeys
from jwt.types import Options

from webhook_connect.cloud.security.inbound import Check, InboundRequest, Services, unauthorized
from webhook_connect.shared.config.inbound import JwtConfig

logger = logging.getLogger(__name__)

REALM = "webhook"
PEM_MARKER = "-----BEGIN "
HMAC_DIGESTS = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
SEGMENT = re.compile(r"^[A-Za-z0-9_-]*$")


class TokenError(Exception):
    """A token to refuse. ``reason`` is safe to show: it never quotes the token."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class VerificationKey:
    """A loaded key and the algorithms it may verify, all of one family."""

    key: str | AllowedPublicKeys
    algorithms: tuple[str, ...]


def load_key(material: str, algorithms: Sequence[str]) -> VerificationKey:
    """Load ``material`` (a shared secret, or a PEM public key or certificate) and keep those of
    ``algorithms`` that it can verify; ValueError, naming the problem, when none is left."""
    if material.lstrip().startswith(PEM_MARKER):
        key: str | AllowedPublicKeys = _public_key(material)
        candidates = [name for name in algorithms if not name.startswith("HS")]
        if not candidates:
            raise ValueError(
                f"{', '.join(algorithms)} needs a shared secret, but a PEM key was given "
                "(a public key must never be used as an HMAC secret)"
            )
    else:
        key = material
        candidates = [name for name in algorithms if name.startswith("HS")]
        if not candidates:
            raise ValueError(f"{', '.join(algorithms)} needs a PEM public key or certificate")
    usable: list[str] = []
    problems: list[str] = []
    for name in candidates:
        algorithm = jwt.get_algorithm_by_name(name)
        try:
            prepared = algorithm.prepare_key(key)
        except (jwt.InvalidKeyError, TypeError, ValueError) as exc:
            problems.append(f"{name}: {exc}")
            continue
        usable.append(name)
        if weakness := algorithm.check_key_length(prepared):
            logger.warning("jwt key for %s is weak: %s", name, weakness)
    if not usable:
        raise ValueError(f"the key cannot verify {'; '.join(problems)}")
    return VerificationKey(key, tuple(usable))


def _public_key(pem: str) -> AllowedPublicKeys:
    data = pem.strip().encode("ascii", "replace")
    try:
        loaded: object = load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        try:
            loaded = load_pem_x509_certificate(data).public_key()
        except ValueError:
            raise ValueError("the PEM is neither a public key nor a certificate") from None
    # Whether its type suits the algorithm is for PyJWT's prepare_key() to say, in load_key().
    return cast("AllowedPublicKeys", loaded)


def decode_bearer_jwt(
    token: str,
    key: VerificationKey,
    *,
    now: float,
    issuer: str | None = None,
    audience: str | Iterable[str] | None = None,
    verify_exp: bool = True,
    leeway: float = 0.0,
    required_claims: Sequence[str] = (),
) -> dict[str, Any]:
    """The claims of ``token`` once its signature, issuer, audience, required claims and (at
    instant ``now``) lifetime all hold; TokenError otherwise."""
    if isinstance(key.key, str):
        claims = _verify_hmac(token, key.key.encode(), key.algorithms)
    else:
        claims = _verify_public_key(token, key)
    check_claims(claims, issuer=issuer, audience=audience, required=required_claims)
    check_lifetime(claims, now=now, verify_exp=verify_exp, leeway=leeway)
    return claims


def _segment(text: str) -> bytes:
    if not SEGMENT.match(text):
        raise TokenError("malformed token")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("malformed token") from None


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise TokenError("malformed token") from None
    if not isinstance(value, dict):
        raise TokenError("malformed token")
    return value


def _verify_hmac(token: str, secret: bytes, algorithms: Sequence[str]) -> dict[str, Any]:
    """RFC 7515 compact serialisation with an HMAC: header, claims, signature."""
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("malformed token")
    header = _json_object(_segment(parts[0]))
    algorithm = header.get("alg")
    if algorithm not in algorithms:
        raise TokenError("algorithm not allowed")
    if "crit" in header or "b64" in header:  # extensions we do not implement (RFC 7515 §4.1.11)
        raise TokenError("invalid token")
    signed = f"{parts[0]}.{parts[1]}".encode("ascii")
    expected = hmac.new(secret, signed, HMAC_DIGESTS[str(algorithm)]).digest()
    if not hmac.compare_digest(_segment(parts[2]), expected):
        raise TokenError("bad signature")
    return _json_object(_segment(parts[1]))


def _verify_public_key(token: str, key: VerificationKey) -> dict[str, Any]:
    options: Options = {
        "verify_signature": True,
        # Every claim is checked by check_claims() and check_lifetime().
        "verify_exp": False,
        "verify_nbf": False,
        "verify_iat": False,
        "verify_iss": False,
        "verify_aud": False,
    }
    try:
        # The key's length was judged (and logged) once in load_key(); PyJWT would warn again
        # on every request. No await inside, so no other coroutine runs under this filter.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
            claims: dict[str, Any] = jwt.decode(
                token, key.key, algorithms=list(key.algorithms), options=options
            )
    except jwt.PyJWTError as exc:
        raise TokenError(_reason(exc, None)) from None
    return claims


def check_claims(
    claims: Mapping[str, Any],
    *,
    issuer: str | None,
    audience: str | Iterable[str] | None,
    required: Sequence[str] = (),
) -> None:
    """Required claims present, issuer equal, audience shared (RFC 7519 §4.1.1, §4.1.3)."""
    for name in required:
        if name not in claims:
            raise TokenError(f"token lacks the {name!r} claim")
    if issuer is not None:
        if "iss" not in claims:
            raise TokenError("token lacks the 'iss' claim")
        if claims["iss"] != issuer:
            raise TokenError("wrong issuer")
    given = claims.get("aud")
    if audience is None:
        # When no audience is configured we are not any: a token naming one is not for us.
        if given is not None:
            raise TokenError("token names an unexpected audience")
        return
    if given is None:
        raise TokenError("token lacks the 'aud' claim")
    given_set = {given} if isinstance(given, str) else given
    if not isinstance(given_set, list | set) or not all(isinstance(a, str) for a in given_set):
        raise TokenError("wrong audience")
    wanted = {audience} if isinstance(audience, str) else set(audience)
    if not wanted.intersection(given_set):
        raise TokenError("wrong audience")


def _reason(exc: jwt.PyJWTError, audience: object) -> str:
    # Fixed words only: PyJWT's messages are safe today, but the detail goes back to the sender.
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "algorithm not allowed"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad signature"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token lacks the {exc.claim!r} claim"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "wrong issuer"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "wrong audience" if audience is not None else "token names an unexpected audience"
    if isinstance(exc, jwt.DecodeError):
        return "malformed token"
    return "invalid token"


def check_lifetime(
    claims: Mapping[str, Any], *, now: float, verify_exp: bool, leeway: float
) -> None:
    """Refuse, at instant ``now``, an expired, not yet valid or future-issued token."""
    if verify_exp and "exp" in claims and _numeric_date(claims, "exp") <= now - leeway:
        raise TokenError("token expired")
    if "nbf" in claims and _numeric_date(claims, "nbf") > now + leeway:
        raise TokenError("token not yet valid")
    if "iat" in claims and _numeric_date(claims, "iat") > now + leeway:
        raise TokenError("token issued in the future")


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    # RFC 7519 §2: a JSON number of seconds, fractions allowed; true is not a date.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TokenError(f"claim {name!r} is not a NumericDate")
    return float(value)


def credentials(request: InboundRequest, scheme: str) -> str | None:
    """The token of ``Authorization: <scheme> <token>`` (scheme in any case), or None."""
    value = request.header("authorization")
    if value is None:
        return None
    given, _, token = value.strip().partition(" ")
    token = token.strip()
    if given.lower() != scheme.lower() or not token:
        return None
    return token


def challenge(scheme: str, error: str | None = None, **params: str) -> str:
    """A ``WWW-Authenticate`` value; RFC 6750 §3.1: no error code when no token was sent."""
    parts = [f'realm="{REALM}"']
    if error is not None:
        parts.append(f'error="{error}"')
    parts.extend(f'{name}="{value}"' for name, value in params.items())
    return f"{scheme} {', '.join(parts)}"


def build(config: JwtConfig, services: Services) -> Check:
    """The ``jwt`` check; ValueError when the key cannot verify ``config.algorithm``."""
    key = load_key(config.secret, [config.algorithm])

    async def check(request: InboundRequest) -> None:
        token = credentials(request, "Bearer")
        if token is None:
            raise unauthorized("missing bearer token", challenge("Bearer"))
        try:
            decode_bearer_jwt(
                token,
                key,
                now=request.now,
                issuer=config.issuer,
                audience=config.audience,
                verify_exp=config.verify_exp,
                leeway=config.leeway,
                required_claims=config.required_claims,
            )
        except TokenError as exc:
            raise unauthorized(exc.reason, challenge("Bearer", "invalid_token")) from None

    return check
