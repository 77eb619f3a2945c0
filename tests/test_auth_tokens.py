"""Bearer JWTs, OAuth 2 access tokens and reCAPTCHA (issue 5).

Tokens are signed with PyJWT and real ``cryptography`` keys; the forged ones (``alg: none``, an
HS256 token keyed with the RSA public key) are built by hand, since PyJWT refuses to make them.
Introspection and siteverify are answered by a local HTTP server that implements them.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.parse
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.servers import Cloud, free_port, wait_until
from webhook_connect.cloud.security import jwt as jwt_check
from webhook_connect.cloud.security import oauth2, recaptcha
from webhook_connect.cloud.security.inbound import Check, InboundRequest, Rejected, Services
from webhook_connect.shared.config.inbound import JwtConfig, OAuth2Config, RecaptchaConfig

NOW = 1_700_000_000
CLIENT = "203.0.113.7"
HS_SECRET = "hs-secret-long-enough-for-hs512-" * 2  # 64 bytes: RFC 7518 §3.2 for HS512
ISSUER = "https://auth.example"
AUDIENCE = "webhook-connect"

# The local authorization server and reCAPTCHA verifier, on a port fixed now so that WEBHOOKS
# (read by the cloud when it starts) can name it.
AUTH_PORT = free_port()
AUTH_URL = f"http://127.0.0.1:{AUTH_PORT}"
CLIENT_ID = "webhook connect"  # a space, to see RFC 6749 §2.3.1 form-encoding
CLIENT_SECRET = "client-secret:with/odd&chars"
RECAPTCHA_SECRET = "recaptcha-secret"
FAR = 4_000_000_000  # an exp that real time will not reach during the tests

INTROSPECTION: dict[str, dict[str, Any]] = {
    "good": {
        "active": True,
        "scope": "webhooks:write read",
        "exp": NOW + 3600,
        "iss": ISSUER,
        "aud": [AUDIENCE, "other"],
        "client_id": "provider",
    },
    "read-only": {"active": True, "scope": "read", "exp": NOW + 3600},
    "expired": {"active": True, "scope": "webhooks:write", "exp": NOW - 10},
    "short-lived": {"active": True, "scope": "webhooks:write", "exp": NOW + 5},
    "no-exp": {"active": True, "scope": "webhooks:write"},
    "revoked": {"active": False},
    "stringly-active": {"active": "true", "scope": "webhooks:write"},
    "e2e-good": {"active": True, "scope": "webhooks:write", "exp": FAR},
    "e2e-inactive": {"active": False},
}
SITEVERIFY: dict[str, dict[str, Any]] = {
    "human": {"success": True, "score": 0.9, "action": "submit", "hostname": "example.com"},
    "borderline": {"success": True, "score": 0.5, "action": "submit"},
    "bot": {"success": True, "score": 0.1, "action": "submit"},
    "login-page": {"success": True, "score": 0.9, "action": "login"},
    "v2-checkbox": {"success": True, "hostname": "example.com"},
    "used": {"success": False, "error-codes": ["timeout-or-duplicate"]},
    "odd-codes": {"success": False, "error-codes": ["<script>", 7]},
}


class AuthServer(ThreadingHTTPServer):
    """RFC 7662 introspection and reCAPTCHA siteverify, recording every request it answers."""

    daemon_threads = True

    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), AuthHandler)
        self.calls: list[tuple[str, dict[str, str], dict[str, str]]] = []
        self.release = threading.Event()  # holds /slow until the server stops
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def count(self, path: str, **form: str) -> int:
        return sum(
            1
            for called, fields, _ in self.calls
            if called == path and all(fields.get(k) == v for k, v in form.items())
        )

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()
        self.thread.join(10)


class AuthHandler(BaseHTTPRequestHandler):
    server: AuthServer

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length).decode()
        form = {k: v[0] for k, v in urllib.parse.parse_qs(body, keep_blank_values=True).items()}
        self.server.calls.append((self.path, form, {k.lower(): v for k, v in self.headers.items()}))
        if self.path == "/introspect":
            self.introspect(form)
        elif self.path == "/siteverify":
            self.siteverify(form)
        elif self.path == "/slow":
            self.server.release.wait(30)  # never answers: the client has given up by then
        elif self.path == "/html":
            self.answer(200, b"<html>maintenance</html>", "text/html")
        else:
            self.answer(500, {"error": "server_error"})

    def introspect(self, form: dict[str, str]) -> None:
        basic = base64.b64encode(
            b"webhook+connect:client-secret%3Awith%2Fodd%26chars"  # both parts form-encoded
        ).decode()
        if self.headers.get("authorization") != f"Basic {basic}":
            self.answer(401, {"error": "invalid_client"})
            return
        self.answer(200, INTROSPECTION.get(form.get("token", ""), {"active": False}))

    def siteverify(self, form: dict[str, str]) -> None:
        if form.get("secret") != RECAPTCHA_SECRET:
            self.answer(200, {"success": False, "error-codes": ["invalid-input-secret"]})
            return
        default = {"success": False, "error-codes": ["invalid-input-response"]}
        self.answer(200, SITEVERIFY.get(form.get("response", ""), default))

    def answer(self, status: int, document: object, content_type: str = "") -> None:
        data = document if isinstance(document, bytes) else json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type or "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def auth_server() -> Iterator[AuthServer]:
    server = AuthServer(AUTH_PORT)
    server.thread.start()
    try:
        wait_until(lambda: httpx.post(f"{AUTH_URL}/ping").status_code == 500, what="auth server")
        yield server
    finally:
        server.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def _remember(key: str, ttl: float) -> bool:
    return True  # none of these checks keeps nonces


@pytest.fixture
def services(http: httpx.AsyncClient) -> Services:
    return Services(remember=_remember, http=http)


# -- keys and tokens ------------------------------------------------------------------------------


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEYS = {
    "ES256": ec.generate_private_key(ec.SECP256R1()),
    "ES384": ec.generate_private_key(ec.SECP384R1()),
    "ES512": ec.generate_private_key(ec.SECP521R1()),
}
RSA_PEM = pem(RSA_KEY)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**extra: Any) -> dict[str, Any]:
    base = {"sub": "provider", "iss": ISSUER, "aud": AUDIENCE, "iat": NOW, "exp": NOW + 300}
    return {name: value for name, value in {**base, **extra}.items() if value is not None}


def forge(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A compact JWS made by hand; HMAC-SHA256 with ``key``, or no signature at all."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    if key is None:
        return f"{signing_input}."
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def inbound(
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"{}",
    now: float = NOW,
) -> InboundRequest:
    return InboundRequest(
        webhook_id="hook",
        method="POST",
        scheme="http",
        path="/webhook/hook",
        query_string="",
        raw_headers=[(name.lower().encode(), value.encode()) for name, value in headers],
        body=body,
        peer=CLIENT,
        client=CLIENT,
        now=now,
    )


def bearer(token: str, scheme: str = "Bearer") -> list[tuple[str, str]]:
    return [("Authorization", f"{scheme} {token}")]


async def refused(check: Check, request: InboundRequest) -> Rejected:
    with pytest.raises(Rejected) as caught:
        await check(request)
    return caught.value


def header(rejection: Rejected, name: bytes) -> str | None:
    return next((v.decode() for k, v in rejection.headers if k == name), None)


INVALID = 'Bearer realm="webhook", error="invalid_token"'


# -- jwt ------------------------------------------------------------------------------------------

SIGNERS: list[tuple[str, Any, str]] = [
    ("HS256", HS_SECRET, HS_SECRET),
    ("HS384", HS_SECRET, HS_SECRET),
    ("HS512", HS_SECRET, HS_SECRET),
    ("RS256", RSA_KEY, RSA_PEM),
    ("RS512", RSA_KEY, RSA_PEM),
    ("PS256", RSA_KEY, RSA_PEM),
    ("PS384", RSA_KEY, RSA_PEM),
    *[(name, key, pem(key)) for name, key in EC_KEYS.items()],
]


def jwt_check_for(secret: str = HS_SECRET, **config: Any) -> Check:
    settings = {"issuer": ISSUER, "audience": AUDIENCE, **config}
    return jwt_check.build(JwtConfig(secret=secret, **settings), Services(remember=_remember))


@pytest.mark.parametrize(
    ("algorithm", "signing_key", "public"), SIGNERS, ids=[name for name, _, _ in SIGNERS]
)
async def test_jwt_signed_with_each_algorithm_passes(
    algorithm: str, signing_key: Any, public: str
) -> None:
    check = jwt_check_for(public, algorithm=algorithm)
    token = jwt.encode(claims(), signing_key, algorithm=algorithm)
    await check(inbound(bearer(token)))
    await check(inbound(bearer(token, "bearer")))  # RFC 7235: the scheme is case-insensitive


def test_jwt_public_key_may_be_given_as_a_certificate() -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(RSA_KEY.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .sign(RSA_KEY, hashes.SHA256())
    )
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
    key = jwt_check.load_key(certificate_pem, ["RS256"])
    token = jwt.encode(claims(), RSA_KEY, algorithm="RS256")
    assert jwt_check.decode_bearer_jwt(token, key, now=NOW, issuer=ISSUER, audience=AUDIENCE)


@pytest.mark.parametrize(
    ("token", "config", "reason"),
    [
        (jwt.encode(claims(), "another-secret-of-thirty-two-bytes!", "HS256"), {}, "bad signature"),
        (jwt.encode(claims(exp=NOW - 1), HS_SECRET, "HS256"), {}, "token expired"),
        (jwt.encode(claims(exp=NOW), HS_SECRET, "HS256"), {}, "token expired"),
        (jwt.encode(claims(nbf=NOW + 60), HS_SECRET, "HS256"), {}, "token not yet valid"),
        (jwt.encode(claims(iat=NOW + 60), HS_SECRET, "HS256"), {}, "token issued in the future"),
        (jwt.encode(claims(exp="tomorrow"), HS_SECRET, "HS256"), {}, "is not a NumericDate"),
        (jwt.encode(claims(exp=True), HS_SECRET, "HS256"), {}, "is not a NumericDate"),
        (jwt.encode(claims(iss="https://evil"), HS_SECRET, "HS256"), {}, "wrong issuer"),
        (jwt.encode(claims(iss=None), HS_SECRET, "HS256"), {}, "lacks the 'iss' claim"),
        (jwt.encode(claims(aud="someone-else"), HS_SECRET, "HS256"), {}, "wrong audience"),
        (jwt.encode(claims(), HS_SECRET, "HS256"), {"audience": None}, "unexpected audience"),
        (
            jwt.encode(claims(), HS_SECRET, "HS256"),
            {"required_claims": ["jti"]},
            "lacks the 'jti' claim",
        ),
        (jwt.encode(claims(), HS_SECRET, "HS512"), {}, "algorithm not allowed"),
        (forge({"alg": "none", "typ": "JWT"}, claims(), None), {}, "algorithm not allowed"),
        (forge({"alg": "None"}, claims(), None), {}, "algorithm not allowed"),
        (forge({"typ": "JWT"}, claims(), HS_SECRET.encode()), {}, "algorithm not allowed"),
        ("not-a-jwt", {}, "malformed token"),
        ("a.b.c", {}, "malformed token"),
    ],
    ids=lambda value: value if isinstance(value, str) and " " in value else "",
)
async def test_jwt_refusals_name_the_reason(
    token: str, config: dict[str, Any], reason: str
) -> None:
    rejection = await refused(jwt_check_for(**config), inbound(bearer(token)))
    assert rejection.status == 401
    assert reason in rejection.detail
    assert header(rejection, b"www-authenticate") == INVALID
    assert token not in rejection.detail and token not in str(rejection.headers)


async def test_jwt_tampered_payload_fails_the_signature() -> None:
    header_part, _, signature = jwt.encode(claims(), HS_SECRET, "HS256").split(".")
    forged = f"{header_part}.{b64url(json.dumps(claims(sub='admin')).encode())}.{signature}"
    assert (await refused(jwt_check_for(), inbound(bearer(forged)))).detail == "bad signature"


async def test_jwt_leeway_and_verify_exp() -> None:
    late = jwt.encode(claims(exp=NOW - 5, nbf=NOW + 5), HS_SECRET, "HS256")
    await jwt_check_for(leeway=10)(inbound(bearer(late)))
    assert (await refused(jwt_check_for(leeway=4), inbound(bearer(late)))).detail == (
        "token expired"
    )
    expired = jwt.encode(claims(iat=NOW - 7200, exp=NOW - 3600), HS_SECRET, "HS256")
    await jwt_check_for(verify_exp=False)(inbound(bearer(expired)))
    # The same token was good while it lasted: the outcome depends on request.now only.
    await jwt_check_for()(inbound(bearer(expired), now=NOW - 3601))


async def test_jwt_audience_list_accepts_any_of_its_members() -> None:
    token = jwt.encode(claims(aud=["other", AUDIENCE]), HS_SECRET, "HS256")
    await jwt_check_for(audience=["unrelated", AUDIENCE])(inbound(bearer(token)))


async def test_jwt_rsa_public_key_used_as_hmac_secret_is_refused() -> None:
    # The classic confusion: the attacker knows the public PEM and "signs" HS256 with it.
    token = forge({"alg": "HS256", "typ": "JWT"}, claims(), RSA_PEM.encode())
    rejection = await refused(jwt_check_for(RSA_PEM, algorithm="RS256"), inbound(bearer(token)))
    assert (rejection.status, rejection.detail) == (401, "algorithm not allowed")
    assert header(rejection, b"www-authenticate") == INVALID


async def test_jwt_signed_by_another_key_or_family_is_refused() -> None:
    check = jwt_check_for(RSA_PEM, algorithm="RS256")
    other = jwt.encode(claims(), OTHER_RSA_KEY, algorithm="RS256")
    assert (await refused(check, inbound(bearer(other)))).detail == "bad signature"
    ec_token = jwt.encode(claims(), EC_KEYS["ES256"], algorithm="ES256")
    assert (await refused(check, inbound(bearer(ec_token)))).detail == "algorithm not allowed"


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("Authorization", "Basic dXNlcjpwYXNz")],
        [("Authorization", "Bearer ")],
        [("Authorization", "Bearer")],
    ],
)
async def test_jwt_without_a_bearer_token_is_challenged(headers: list[tuple[str, str]]) -> None:
    rejection = await refused(jwt_check_for(), inbound(headers))
    assert (rejection.status, rejection.detail) == (401, "missing bearer token")
    # RFC 6750 §3.1: no error code when the request carried no token at all.
    assert header(rejection, b"www-authenticate") == 'Bearer realm="webhook"'


@pytest.mark.parametrize(
    ("secret", "algorithm", "problem"),
    [
        ("not a pem", "RS256", "needs a PEM public key"),
        (RSA_PEM, "HS256", "needs a shared secret"),
        (RSA_PEM, "ES256", "ES256"),
        (pem(EC_KEYS["ES384"]), "ES256", "curve"),
        (pem(EC_KEYS["ES256"]), "RS256", "RS256"),
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "RS256", "neither"),
    ],
    # Keys are generated per run: name the cases, so every test worker collects the same ids.
    ids=["not-pem", "rsa-as-hs256", "rsa-as-es256", "p384-as-es256", "ec-as-rs256", "bad-pem"],
)
def test_jwt_unusable_key_fails_at_build(secret: str, algorithm: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        jwt_check_for(secret, algorithm=algorithm)


async def test_jwt_short_hmac_secret_is_logged_once_not_warned_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="webhook_connect.cloud.security.jwt"):
        check = jwt_check_for("tiny-k3y")
    assert "weak" in caplog.text and "tiny-k3y" not in caplog.text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        token = jwt.encode(claims(), "tiny-k3y", "HS256")
    await check(inbound(bearer(token)))  # filterwarnings=error: any warning would fail here


def test_jwt_key_decides_the_algorithm_family() -> None:
    assert jwt_check.load_key(HS_SECRET, ["HS256", "RS256"]).algorithms == ("HS256",)
    assert jwt_check.load_key(RSA_PEM, ["HS256", "RS256", "PS256", "ES256"]).algorithms == (
        "RS256",
        "PS256",
    )


def test_jwt_lifetime_is_judged_at_the_given_instant() -> None:
    lifetime = {"exp": NOW + 10.5, "nbf": NOW - 1, "iat": NOW}
    jwt_check.check_lifetime(lifetime, now=NOW + 10.4, verify_exp=True, leeway=0)
    with pytest.raises(jwt_check.TokenError, match="expired"):
        jwt_check.check_lifetime(lifetime, now=NOW + 10.5, verify_exp=True, leeway=0)
    with pytest.raises(jwt_check.TokenError, match="not yet valid"):
        jwt_check.check_lifetime(lifetime, now=NOW - 2, verify_exp=True, leeway=0)


# -- oauth2: introspection ------------------------------------------------------------------------


def introspecting(services: Services, path: str = "/introspect", **config: Any) -> Check:
    settings: dict[str, Any] = {
        "introspection_endpoint": f"{AUTH_URL}{path}",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "required_scope": ["webhooks:write"],
        **config,
    }
    return oauth2.build(OAuth2Config(**settings), services)


async def test_introspection_accepts_an_active_token_with_the_scope(
    auth_server: AuthServer, services: Services
) -> None:
    check = introspecting(services, audience=AUDIENCE, issuer=ISSUER)
    await check(inbound(bearer("good")))
    path, form, headers = auth_server.calls[-1]
    assert (path, form) == ("/introspect", {"token": "good", "token_type_hint": "access_token"})
    assert headers["content-type"] == "application/x-www-form-urlencoded"


@pytest.mark.parametrize(
    ("token", "config", "reason"),
    [
        ("revoked", {}, "token is not active"),
        ("never-issued", {}, "token is not active"),
        ("stringly-active", {}, "token is not active"),
        ("expired", {}, "token expired"),
        ("good", {"issuer": "https://other"}, "wrong issuer"),
        ("no-exp", {"issuer": ISSUER}, "wrong issuer"),
        ("good", {"audience": ["someone", "else"]}, "wrong audience"),
        ("no-exp", {"audience": AUDIENCE}, "wrong audience"),
    ],
)
async def test_introspection_refusals(
    auth_server: AuthServer, services: Services, token: str, config: dict[str, Any], reason: str
) -> None:
    rejection = await refused(introspecting(services, **config), inbound(bearer(token)))
    assert (rejection.status, rejection.detail) == (401, reason)
    assert header(rejection, b"www-authenticate") == INVALID


async def test_introspection_without_the_scope_is_forbidden(
    auth_server: AuthServer, services: Services
) -> None:
    check = introspecting(services, required_scope=["webhooks:write", "read"])
    rejection = await refused(check, inbound(bearer("read-only")))
    assert (rejection.status, rejection.detail) == (403, "token lacks the scope webhooks:write")
    assert header(rejection, b"www-authenticate") == (
        'Bearer realm="webhook", error="insufficient_scope", scope="read webhooks:write"'
    )


async def test_introspection_expiry_can_be_ignored_or_given_leeway(
    auth_server: AuthServer, services: Services
) -> None:
    await introspecting(services, verify_exp=False)(inbound(bearer("expired")))
    await introspecting(services, leeway=11)(inbound(bearer("expired")))


@pytest.mark.parametrize(
    ("path", "config"),
    [
        ("/broken", {}),  # 500
        ("/html", {}),  # 200, but not JSON
        ("/introspect", {"client_secret": "wrong"}),  # 401 invalid_client
        ("/slow", {"timeout_seconds": 0.2}),
    ],
)
async def test_introspection_endpoint_in_trouble_is_503_with_retry_after(
    auth_server: AuthServer, services: Services, path: str, config: dict[str, Any]
) -> None:
    rejection = await refused(introspecting(services, path, **config), inbound(bearer("good")))
    assert (rejection.status, rejection.error) == (503, "auth_unavailable")
    assert header(rejection, b"retry-after") == "5"


async def test_introspection_endpoint_down_is_503(services: Services) -> None:
    settings = {"introspection_endpoint": f"http://127.0.0.1:{free_port()}/introspect"}
    check = oauth2.build(OAuth2Config(**settings), services)
    rejection = await refused(check, inbound(bearer("good")))
    assert (rejection.status, header(rejection, b"retry-after")) == (503, "5")


async def test_introspection_answers_are_cached_at_most_30_seconds(
    auth_server: AuthServer, services: Services
) -> None:
    token = "good"
    check = introspecting(services)
    before = auth_server.count("/introspect", token=token)
    for offset in (0, 1, 29.9):
        await check(inbound(bearer(token), now=NOW + offset))
    assert auth_server.count("/introspect", token=token) == before + 1
    await check(inbound(bearer(token), now=NOW + 30))
    assert auth_server.count("/introspect", token=token) == before + 2


async def test_introspection_cache_never_outlives_the_token(
    auth_server: AuthServer, services: Services
) -> None:
    check = introspecting(services)
    before = auth_server.count("/introspect", token="short-lived")
    await check(inbound(bearer("short-lived"), now=NOW))
    await check(inbound(bearer("short-lived"), now=NOW + 4))
    assert auth_server.count("/introspect", token="short-lived") == before + 1
    rejection = await refused(check, inbound(bearer("short-lived"), now=NOW + 5))
    assert rejection.detail == "token expired"
    assert auth_server.count("/introspect", token="short-lived") == before + 2


async def test_introspection_inactive_answers_are_not_cached(
    auth_server: AuthServer, services: Services
) -> None:
    check = introspecting(services)
    before = auth_server.count("/introspect", token="revoked")
    for _ in range(2):
        await refused(check, inbound(bearer("revoked")))
    assert auth_server.count("/introspect", token="revoked") == before + 2


async def test_introspection_burst_shares_one_call(
    auth_server: AuthServer, services: Services
) -> None:
    check = introspecting(services)
    before = auth_server.count("/introspect", token="no-exp")
    await asyncio.gather(*(check(inbound(bearer("no-exp"))) for _ in range(20)))
    assert auth_server.count("/introspect", token="no-exp") == before + 1


async def test_introspection_burst_against_a_broken_endpoint_is_503_for_all(
    auth_server: AuthServer, services: Services
) -> None:
    check = introspecting(services, "/broken")
    before = auth_server.count("/broken", token="good")
    outcomes = await asyncio.gather(
        *(check(inbound(bearer("good"))) for _ in range(5)), return_exceptions=True
    )
    assert [getattr(outcome, "status", None) for outcome in outcomes] == [503] * 5
    assert auth_server.count("/broken", token="good") == before + 1


def test_introspection_cache_bounds() -> None:
    cache = oauth2.IntrospectionCache(max_entries=2, ttl=30)
    cache.put("a", {"active": True}, NOW)
    cache.put("b", {"active": True, "exp": NOW + 10}, NOW)
    cache.put("inactive", {"active": False}, NOW)
    cache.put("gone", {"active": True, "exp": NOW}, NOW)
    assert (cache.get("inactive", NOW), cache.get("gone", NOW)) == (None, None)
    assert cache.get("b", NOW + 9.9) is not None and cache.get("b", NOW + 10) is None
    cache.put("c", {"active": True}, NOW)
    cache.put("d", {"active": True}, NOW)  # full: the oldest, "a", goes
    assert cache.get("a", NOW) is None and cache.get("d", NOW) is not None


async def test_oauth2_token_type_and_presence_only(services: Services) -> None:
    check = oauth2.build(OAuth2Config(token_type="Token", validate_token=False), services)
    await check(inbound(bearer("anything", "token")))
    rejection = await refused(check, inbound(bearer("anything")))  # "Bearer", not "Token"
    assert rejection.status == 401
    assert header(rejection, b"www-authenticate") == 'Token realm="webhook"'


# -- oauth2: JWT access tokens --------------------------------------------------------------------


def jwt_oauth2(secret: str, **config: Any) -> Check:
    settings = {"jwt_secret": secret, "required_scope": ["webhooks:write"], **config}
    return oauth2.build(OAuth2Config(**settings), Services(remember=_remember))


async def test_oauth2_jwt_scopes_from_scope_or_scp() -> None:
    check = jwt_oauth2(HS_SECRET, audience=AUDIENCE)
    await check(inbound(bearer(jwt.encode(claims(scope="webhooks:write x"), HS_SECRET, "HS256"))))
    rsa_check = jwt_oauth2(RSA_PEM, audience=AUDIENCE, issuer=ISSUER)
    token = jwt.encode(claims(scp=["webhooks:write"]), RSA_KEY, algorithm="RS256")
    await rsa_check(inbound(bearer(token)))
    narrow = jwt.encode(claims(scp=["read"]), RSA_KEY, algorithm="RS256")
    assert (await refused(rsa_check, inbound(bearer(narrow)))).status == 403


async def test_oauth2_jwt_default_algorithms_cannot_be_confused() -> None:
    # jwt_algorithms defaults to HS256 and RS256; with an RSA key only RS256 may verify.
    check = jwt_oauth2(RSA_PEM, audience=AUDIENCE)
    token = forge({"alg": "HS256"}, claims(scope="webhooks:write"), RSA_PEM.encode())
    rejection = await refused(check, inbound(bearer(token)))
    assert (rejection.status, rejection.detail) == (401, "algorithm not allowed")
    expired = jwt.encode(claims(scope="webhooks:write", exp=NOW - 1), RSA_KEY, algorithm="RS256")
    assert (await refused(check, inbound(bearer(expired)))).detail == "token expired"


def test_oauth2_jwt_secret_of_the_wrong_family_fails_at_build() -> None:
    with pytest.raises(ValueError, match="needs a PEM public key"):
        jwt_oauth2(HS_SECRET, jwt_algorithms=["RS256", "ES256"])


# -- recaptcha ------------------------------------------------------------------------------------


def captcha(services: Services, **config: Any) -> Check:
    settings = {"secret_key": RECAPTCHA_SECRET, "verify_url": f"{AUTH_URL}/siteverify", **config}
    return recaptcha.build(RecaptchaConfig(**settings), services)


async def test_recaptcha_v3_human_passes_and_the_verifier_sees_the_sender(
    auth_server: AuthServer, services: Services
) -> None:
    await captcha(services, expected_action="submit")(inbound([("X-Recaptcha-Token", "human")]))
    path, form, _ = auth_server.calls[-1]
    assert (path, form) == (
        "/siteverify",
        {"secret": RECAPTCHA_SECRET, "response": "human", "remoteip": CLIENT},
    )


@pytest.mark.parametrize(
    ("token", "config", "reason"),
    [
        ("bot", {}, "reCAPTCHA score too low"),
        ("borderline", {"min_score": 0.51}, "reCAPTCHA score too low"),
        ("login-page", {"expected_action": "submit"}, "reCAPTCHA action does not match"),
        ("v2-checkbox", {}, "reCAPTCHA answer has no score"),
        ("used", {}, "reCAPTCHA verification failed (timeout-or-duplicate)"),
        ("odd-codes", {}, "reCAPTCHA verification failed"),
        ("made-up", {"version": "v2"}, "reCAPTCHA verification failed (invalid-input-response)"),
        ("human", {"secret_key": "wrong"}, "reCAPTCHA verification failed (invalid-input-secret)"),
    ],
)
async def test_recaptcha_refusals(
    auth_server: AuthServer, services: Services, token: str, config: dict[str, Any], reason: str
) -> None:
    rejection = await refused(captcha(services, **config), inbound([("X-Recaptcha-Token", token)]))
    assert (rejection.status, rejection.detail) == (401, reason)


async def test_recaptcha_thresholds(auth_server: AuthServer, services: Services) -> None:
    await captcha(services)(inbound([("X-Recaptcha-Token", "borderline")]))  # 0.5 >= 0.5
    await captcha(services, min_score=0.0)(inbound([("X-Recaptcha-Token", "bot")]))
    await captcha(services, version="v2")(inbound([("X-Recaptcha-Token", "v2-checkbox")]))


@pytest.mark.parametrize(
    ("field", "body", "content_type"),
    [
        ("captcha", b'{"captcha": "human", "event": "signup"}', "application/json"),
        ("captcha", b'{"recaptcha_token": "human"}', "application/json"),
        ("captcha", b'{"g-recaptcha-response": "human"}', "application/json"),
        ("captcha", b"name=a&g-recaptcha-response=human", "application/x-www-form-urlencoded"),
        ("captcha", b"captcha=human", "application/x-www-form-urlencoded; charset=utf-8"),
    ],
)
async def test_recaptcha_token_from_the_body(
    auth_server: AuthServer, services: Services, field: str, body: bytes, content_type: str
) -> None:
    check = captcha(services, token_source="body", token_field=field)
    await check(inbound([("Content-Type", content_type)], body))


@pytest.mark.parametrize(
    ("source", "headers", "body"),
    [
        ("header", [], b"{}"),
        ("header", [("X-Recaptcha-Token", " ")], b"{}"),
        ("body", [], b'{"recaptcha": 12}'),
        ("body", [], b"[1, 2]"),
        ("body", [("Content-Type", "text/plain")], b"recaptcha=human"),
    ],
)
async def test_recaptcha_missing_token_is_401(
    services: Services, source: str, headers: list[tuple[str, str]], body: bytes
) -> None:
    rejection = await refused(captcha(services, token_source=source), inbound(headers, body))
    assert (rejection.status, rejection.detail) == (401, "missing reCAPTCHA token")


async def test_recaptcha_verifier_down_is_503(services: Services) -> None:
    check = captcha(services, verify_url=f"http://127.0.0.1:{free_port()}/siteverify")
    rejection = await refused(check, inbound([("X-Recaptcha-Token", "human")]))
    assert (rejection.status, header(rejection, b"retry-after")) == (503, "5")


# -- end to end, through the cloud ----------------------------------------------------------------

CHANNEL = {"channel": "dev", "channel_token": "auth-tokens-channel-token"}
WEBHOOKS = {
    "jwt": {
        "module": "webhook_connect",
        "module-config": CHANNEL,
        "jwt": {"secret": RSA_PEM, "algorithm": "RS256", "issuer": ISSUER, "audience": AUDIENCE},
    },
    "oauth2": {
        "module": "webhook_connect",
        "module-config": CHANNEL,
        "oauth2": {
            "introspection_endpoint": f"{AUTH_URL}/introspect",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "required_scope": ["webhooks:write"],
        },
    },
    "oauth2-down": {
        "module": "webhook_connect",
        "module-config": CHANNEL,
        "oauth2": {"introspection_endpoint": f"{AUTH_URL}/broken"},
    },
    "recaptcha": {
        "module": "webhook_connect",
        "module-config": CHANNEL,
        "recaptcha": {
            "secret_key": RECAPTCHA_SECRET,
            "verify_url": f"{AUTH_URL}/siteverify",
            "expected_action": "submit",
        },
    },
}


@pytest.fixture(scope="module")
def guarded_cloud(auth_server: AuthServer, module_cloud: Cloud) -> Cloud:
    """The module's cloud, started after the auth server that its WEBHOOKS point at."""
    return module_cloud


def post(cloud: Cloud, webhook: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{cloud.url}/webhook/{webhook}", json={"event": "ping"}, headers=headers)


def test_e2e_jwt(guarded_cloud: Cloud) -> None:
    now = int(time.time())
    good = jwt.encode(claims(iat=now, exp=now + 300), RSA_KEY, algorithm="RS256")
    assert post(guarded_cloud, "jwt", {"Authorization": f"Bearer {good}"}).status_code == 202
    expired = jwt.encode(claims(iat=now - 600, exp=now - 300), RSA_KEY, algorithm="RS256")
    answer = post(guarded_cloud, "jwt", {"Authorization": f"Bearer {expired}"})
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == INVALID
    assert expired not in answer.text
    confused = forge({"alg": "HS256"}, claims(iat=now, exp=now + 300), RSA_PEM.encode())
    assert post(guarded_cloud, "jwt", {"Authorization": f"Bearer {confused}"}).status_code == 401
    assert post(guarded_cloud, "jwt", {}).status_code == 401


def test_e2e_oauth2_introspection(guarded_cloud: Cloud, auth_server: AuthServer) -> None:
    good = post(guarded_cloud, "oauth2", {"Authorization": "Bearer e2e-good"})
    assert good.status_code == 202
    assert auth_server.count("/introspect", token="e2e-good") == 1
    inactive = post(guarded_cloud, "oauth2", {"Authorization": "Bearer e2e-inactive"})
    assert inactive.status_code == 401
    assert inactive.headers["www-authenticate"] == INVALID
    down = post(guarded_cloud, "oauth2-down", {"Authorization": "Bearer e2e-good"})
    assert (down.status_code, down.headers.get("retry-after")) == (503, "5")


def test_e2e_recaptcha_v3(guarded_cloud: Cloud, auth_server: AuthServer) -> None:
    human = post(guarded_cloud, "recaptcha", {"X-Recaptcha-Token": "human"})
    assert human.status_code == 202
    assert auth_server.calls[-1][1]["remoteip"] == "127.0.0.1"
    assert post(guarded_cloud, "recaptcha", {"X-Recaptcha-Token": "bot"}).status_code == 401
    assert post(guarded_cloud, "recaptcha", {}).status_code == 401
