"""HTTP Digest (RFC 7616) and OAuth 1.0 (RFC 5849): the pure functions, each check on its own,
and end to end through the real cloud with requests signed by httpx and oauthlib."""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from oauthlib.oauth1 import (
    SIGNATURE_HMAC_SHA1,
    SIGNATURE_HMAC_SHA256,
    SIGNATURE_PLAINTEXT,
    Client,
)
from oauthlib.oauth1.rfc5849 import signature as oauthlib_signature

from tests.servers import Cloud
from webhook_connect.cloud.security import digest, oauth1
from webhook_connect.cloud.security.inbound import Check, InboundRequest, Rejected, Services
from webhook_connect.shared.config.inbound import DigestAuthConfig, OAuth1Config

TOKEN = "test-token-0123456789"
USER, PASSWORD = "hook-sender", "correct horse battery staple"
CONSUMER_KEY, CONSUMER_SECRET, TOKEN_SECRET = "consumer-1", "consumer secret&=1", "token/secret"
NOW = 1_700_000_000.0
JSON = b'{"event": "ping", "n": 1}'
FORM = "application/x-www-form-urlencoded"


def webhook(key: str, config: dict[str, object], data_type: str = "json") -> dict[str, object]:
    return {
        "module": "webhook_connect",
        "data_type": data_type,
        "module-config": {"channel": "dev", "channel_token": TOKEN},
        key: config,
    }


DIGEST = {"username": USER, "password": PASSWORD, "realm": "Webhook API"}
WEBHOOKS = {
    "digest-md5": webhook("digest_auth", {**DIGEST, "algorithm": "MD5"}),
    "digest-md5-sess": webhook("digest_auth", {**DIGEST, "algorithm": "MD5-sess"}),
    "digest-sha256": webhook("digest_auth", {**DIGEST, "algorithm": "SHA-256"}),
    "digest-sha256-sess": webhook("digest_auth", {**DIGEST, "algorithm": "SHA-256-sess"}),
    "digest-no-qop": webhook("digest_auth", {**DIGEST, "qop": ""}),
    "oauth1-sha1": webhook(
        "oauth1", {"consumer_key": CONSUMER_KEY, "consumer_secret": CONSUMER_SECRET}
    ),
    "oauth1-sha256": webhook(
        "oauth1",
        {
            "consumer_key": CONSUMER_KEY,
            "consumer_secret": CONSUMER_SECRET,
            "token_secret": TOKEN_SECRET,
            "signature_method": "HMAC-SHA256",
        },
    ),
    "oauth1-plaintext": webhook(
        "oauth1",
        {
            "consumer_key": CONSUMER_KEY,
            "consumer_secret": CONSUMER_SECRET,
            "signature_method": "PLAINTEXT",
        },
    ),
    "oauth1-form": webhook(
        "oauth1", {"consumer_key": CONSUMER_KEY, "consumer_secret": CONSUMER_SECRET}, "blob"
    ),
}


class Memory:
    """An in-process replay store for the unit tests (the real ones are tested elsewhere)."""

    def __init__(self) -> None:
        self.keys: dict[str, float] = {}

    async def remember(self, key: str, ttl: float) -> bool:
        if key in self.keys:
            return False
        self.keys[key] = ttl
        return True


def inbound(
    method: str,
    url: str,
    headers: dict[str, str] | httpx.Headers,
    body: bytes = b"",
    now: float = NOW,
) -> InboundRequest:
    """What ingest would hand a check for this request."""
    parts = urllib.parse.urlsplit(url)
    raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    if not any(name == b"host" for name, _ in raw):
        raw.append((b"host", parts.netloc.encode()))
    return InboundRequest(
        webhook_id="test",
        method=method,
        scheme=parts.scheme,
        path=parts.path,
        query_string=parts.query,
        raw_headers=raw,
        body=body,
        peer="127.0.0.1",
        client="127.0.0.1",
        now=now,
    )


async def rejection(check: Check, request: InboundRequest) -> Rejected:
    with pytest.raises(Rejected) as caught:
        await check(request)
    assert caught.value.status == 401
    return caught.value


def challenge_of(rejected: Rejected) -> str:
    (value,) = [value for name, value in rejected.headers if name == b"www-authenticate"]
    return value.decode()


# --- Digest: pure functions -------------------------------------------------------------------

KEY = digest.nonce_key(PASSWORD, "Webhook API")
SALT = b"12345678"


def test_a_nonce_is_valid_for_its_lifetime_then_expired() -> None:
    nonce = digest.create_nonce(KEY, NOW, SALT)
    assert digest.check_nonce(KEY, nonce, NOW, 300) is digest.NonceState.VALID
    assert digest.check_nonce(KEY, nonce, NOW + 300, 300) is digest.NonceState.VALID
    assert digest.check_nonce(KEY, nonce, NOW + 301, 300) is digest.NonceState.EXPIRED


def test_any_replica_with_the_same_configuration_accepts_a_nonce() -> None:
    nonce = digest.create_nonce(digest.nonce_key(PASSWORD, "Webhook API"), NOW, SALT)
    assert digest.check_nonce(KEY, nonce, NOW + 1, 300) is digest.NonceState.VALID
    other = digest.nonce_key("another password", "Webhook API")
    assert digest.check_nonce(other, nonce, NOW, 300) is digest.NonceState.INVALID
    other_realm = digest.nonce_key(PASSWORD, "Other")
    assert digest.check_nonce(other_realm, nonce, NOW, 300) is digest.NonceState.INVALID


def test_a_nonce_from_the_future_is_invalid() -> None:
    nonce = digest.create_nonce(KEY, NOW + 60, SALT)
    assert digest.check_nonce(KEY, nonce, NOW, 300) is digest.NonceState.INVALID
    # Replica clocks differ a little: a nonce a second ahead is still fine.
    assert digest.check_nonce(KEY, digest.create_nonce(KEY, NOW + 1, SALT), NOW, 300) is (
        digest.NonceState.VALID
    )


@pytest.mark.parametrize(
    "nonce", ["", "abc", "!!!!", "é" * 64, "A" * 54, "A" * 64, "A" * 200, "dGVzdA", "dGVzdA=="]
)
def test_a_malformed_nonce_is_invalid(nonce: str) -> None:
    assert digest.check_nonce(KEY, nonce, NOW, 300) is digest.NonceState.INVALID


def test_no_two_challenges_share_a_nonce() -> None:
    assert digest.create_nonce(KEY, NOW, SALT) != digest.create_nonce(KEY, NOW, b"87654321")
    with pytest.raises(ValueError, match="8 bytes"):
        digest.create_nonce(KEY, NOW, b"short")


def test_a_tampered_nonce_is_invalid() -> None:
    nonce = digest.create_nonce(KEY, NOW, SALT)
    for index in range(len(nonce)):
        flipped = "B" if nonce[index] == "A" else "A"
        tampered = nonce[:index] + flipped + nonce[index + 1 :]
        assert digest.check_nonce(KEY, tampered, NOW, 300) is digest.NonceState.INVALID


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ],
)
def test_the_response_matches_the_rfc_7616_examples(algorithm: str, expected: str) -> None:
    # RFC 7616 §3.9.1.
    assert expected == digest.compute_response(
        algorithm,
        username="Mufasa",
        realm="http-auth@example.org",
        password="Circle of Life",
        method="GET",
        uri="/dir/index.html",
        nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
        qop="auth",
        nc="00000001",
        cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
    )


def test_the_response_matches_the_rfc_2617_example() -> None:
    # RFC 2617 §3.5.
    assert "6629fae49393a05397450978507c4ef1" == digest.compute_response(
        "MD5",
        username="Mufasa",
        realm="testrealm@host.com",
        password="Circle Of Life",
        method="GET",
        uri="/dir/index.html",
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
        qop="auth",
        nc="00000001",
        cnonce="0a4f113b",
    )


def test_authorization_parameters_are_parsed_strictly() -> None:
    assert digest.parse_credentials(
        'Digest username="a \\"b\\", c", realm="r", nc=00000001, qop=auth'
    ) == {"username": 'a "b", c', "realm": "r", "nc": "00000001", "qop": "auth"}
    assert digest.parse_credentials("DIGEST Username=x") == {"username": "x"}
    assert digest.parse_credentials("Basic dXNlcjpwYXNz") is None
    assert digest.parse_credentials('Digest username="a", username="b"') is None
    assert digest.parse_credentials('Digest username="a", Username="b"') is None
    assert digest.parse_credentials('Digest username="a" junk') is None
    assert digest.parse_credentials('Digest username="unterminated') is None


def test_the_challenge_offers_what_is_configured() -> None:
    config = DigestAuthConfig(username=USER, password=PASSWORD, algorithm="SHA-256-sess")
    assert digest.challenge(config, "n0nce", "0paque") == (
        'Digest realm="Webhook API", qop="auth", algorithm=SHA-256-sess, nonce="n0nce", '
        'opaque="0paque"'
    )
    no_qop = DigestAuthConfig(username=USER, password=PASSWORD, realm='a "b"', qop="")
    assert digest.challenge(no_qop, "n", "o", stale=True) == (
        'Digest realm="a \\"b\\"", algorithm=MD5, nonce="n", opaque="o", stale=true'
    )


# --- Digest: the check, signed by httpx.DigestAuth ---------------------------------------------


def digest_check(memory: Memory | None = None, **options: object) -> Check:
    config = DigestAuthConfig.model_validate({**DIGEST, **options})
    return digest.build(config, Services(remember=(memory or Memory()).remember))


class DigestClient:
    """httpx.DigestAuth's own flow, driven without a network: challenge in, header out."""

    def __init__(self, username: str = USER, password: str = PASSWORD) -> None:
        self.auth = httpx.DigestAuth(username, password)

    def sign(self, challenge: str, method: str, url: str) -> str:
        request = httpx.Request(method, url, content=JSON)
        flow = self.auth.sync_auth_flow(request)
        next(flow)
        answer = httpx.Response(401, headers={"www-authenticate": challenge}, request=request)
        return flow.send(answer).headers["authorization"]


async def signed(
    check: Check, url: str, client: DigestClient | None = None, now: float = NOW
) -> InboundRequest:
    """A request to ``url`` answering the challenge ``check`` gives at ``now``."""
    rejected = await rejection(check, inbound("POST", url, {}, JSON, now))
    authorization = (client or DigestClient()).sign(challenge_of(rejected), "POST", url)
    return inbound("POST", url, {"authorization": authorization}, JSON, now)


URL = "http://127.0.0.1:8000/webhook/digest?b=2&a=%2F"


@pytest.mark.parametrize("algorithm", ["MD5", "MD5-sess", "SHA-256", "SHA-256-sess"])
@pytest.mark.parametrize("qop", ["auth", ""])
async def test_a_digest_signed_by_httpx_passes(algorithm: str, qop: str) -> None:
    if algorithm.endswith("-sess") and not qop:
        with pytest.raises(ValueError, match="needs qop 'auth'"):
            digest_check(algorithm=algorithm, qop=qop)
        return
    check = digest_check(algorithm=algorithm, qop=qop)
    rejected = await rejection(check, inbound("POST", URL, {}, JSON))
    assert rejected.detail == "digest credentials required"
    value = challenge_of(rejected)
    assert value.startswith('Digest realm="Webhook API", ')
    assert f"algorithm={algorithm}," in value and "stale" not in value
    assert ('qop="auth"' in value) == (qop == "auth")
    await check(await signed(check, URL))


async def test_the_next_request_with_the_same_nonce_passes_and_a_replay_does_not() -> None:
    check = digest_check()
    client = DigestClient()
    first = await signed(check, URL, client)
    await check(first)
    # httpx answers its next request with the same challenge, and nc 2.
    second_header = next(client.auth.sync_auth_flow(httpx.Request("POST", URL))).headers[
        "authorization"
    ]
    assert "nc=00000002" in second_header
    await check(inbound("POST", URL, {"authorization": second_header}, JSON))
    rejected = await rejection(check, first)
    assert rejected.detail == "digest nonce count replayed"
    assert "stale" not in challenge_of(rejected)


async def test_an_expired_nonce_with_a_right_digest_is_stale() -> None:
    check = digest_check(nonce_lifetime_seconds=60)
    request = await signed(check, URL)
    request.now = NOW + 61
    rejected = await rejection(check, request)
    assert rejected.detail == "digest nonce expired"
    assert challenge_of(rejected).endswith(", stale=true")
    # The client retries with the nonce of that challenge, without asking its user again.
    retried = DigestClient().sign(challenge_of(rejected), "POST", URL)
    await check(inbound("POST", URL, {"authorization": retried}, JSON, NOW + 61))


async def test_an_expired_nonce_with_a_wrong_digest_is_not_stale() -> None:
    check = digest_check(nonce_lifetime_seconds=60)
    request = await signed(check, URL, DigestClient(password="wrong"))
    request.now = NOW + 61
    rejected = await rejection(check, request)
    assert "stale" not in challenge_of(rejected)


async def test_a_nonce_issued_in_the_future_is_refused() -> None:
    check = digest_check()
    request = await signed(check, URL, now=NOW + 3600)
    request.now = NOW
    assert (await rejection(check, request)).detail == "invalid digest nonce"


@pytest.mark.parametrize(
    ("client", "detail"),
    [
        (DigestClient(password="wrong password"), "invalid digest credentials"),
        (DigestClient(username="someone-else"), "invalid digest credentials"),
        (DigestClient(username=USER.upper()), "invalid digest credentials"),
    ],
)
async def test_wrong_credentials_are_refused(client: DigestClient, detail: str) -> None:
    memory = Memory()
    check = digest_check(memory)
    rejected = await rejection(check, await signed(check, URL, client))
    assert rejected.detail == detail
    assert "stale" not in challenge_of(rejected)
    assert memory.keys == {}  # nothing remembered for a failed attempt


@pytest.mark.parametrize(
    "other_url",
    [
        "http://127.0.0.1:8000/webhook/digest?b=2&a=%2f",
        "http://127.0.0.1:8000/webhook/digest?b=2",
        "http://127.0.0.1:8000/webhook/digest",
        "http://127.0.0.1:8000/webhook/other?b=2&a=%2F",
    ],
)
async def test_a_digest_for_another_uri_is_refused(other_url: str) -> None:
    check = digest_check()
    request = await signed(check, URL)
    moved = inbound("POST", other_url, {"authorization": request.headers["authorization"]}, JSON)
    assert (await rejection(check, moved)).detail == "digest uri does not match the request"
    # Rewriting uri= to match the new target breaks the response hash instead.
    authorization = request.headers["authorization"]
    target = other_url.removeprefix("http://127.0.0.1:8000")
    rewritten = authorization.replace('uri="/webhook/digest?b=2&a=%2F"', f'uri="{target}"')
    assert rewritten != authorization
    forged = inbound("POST", other_url, {"authorization": rewritten}, JSON)
    assert (await rejection(check, forged)).detail == "invalid digest credentials"
    await check(request)  # the refusals did not use up the genuine request


@pytest.mark.parametrize(
    ("edit", "detail"),
    [
        (lambda h: h.replace('realm="Webhook API"', 'realm="Other"'), "wrong realm"),
        (lambda h: h.replace("algorithm=MD5", "algorithm=SHA-256"), "algorithm must be MD5"),
        (lambda h: h.replace(", algorithm=MD5", ""), None),  # MD5 is the default: fine
        (lambda h: h.replace("qop=auth", "qop=auth-int"), "qop must be 'auth'"),
        (lambda h: h.replace("nc=00000001", "nc=1"), "nc must be 8 hex digits"),
        (lambda h: h.replace('opaque="', 'opaque="x'), "wrong opaque"),
        (lambda h: h.replace('cnonce="', 'junk="'), "missing cnonce"),
        (lambda h: h.replace('response="', 'response="0'), ""),
    ],
)
async def test_a_tampered_authorization_is_refused(edit: object, detail: str | None) -> None:
    check = digest_check()
    request = await signed(check, URL)
    header = edit(request.headers["authorization"])  # type: ignore[operator]
    assert header != request.headers["authorization"]
    tampered = inbound("POST", URL, {"authorization": header}, JSON)
    if detail is None:
        await check(tampered)
        return
    rejected = await rejection(check, tampered)
    assert rejected.detail == f"invalid digest credentials: {detail}".removesuffix(": ")


async def test_other_schemes_get_the_challenge() -> None:
    check = digest_check()
    for header in ("Basic aG9vay1zZW5kZXI6eA==", "Digest", 'Digest username="x" y'):
        rejected = await rejection(check, inbound("POST", URL, {"authorization": header}, JSON))
        assert challenge_of(rejected).startswith("Digest ")


# --- OAuth 1.0: pure functions ----------------------------------------------------------------


def test_the_base_string_matches_rfc_5849() -> None:
    # RFC 5849 §3.4.1.1, the request of its example.
    header = (
        'OAuth realm="Example", oauth_consumer_key="9djdj82h48djs9d2", '
        'oauth_token="kkk9d7dh3k39sjv7", oauth_signature_method="HMAC-SHA1", '
        'oauth_timestamp="137131201", oauth_nonce="7d8f3e4a", '
        'oauth_signature="bYT5CMsGcbgUdFHObYMEfcx6bsw%3D"'
    )
    oauth = oauth1.parse_authorization(header)
    assert oauth is not None and oauth["oauth_signature"] == "bYT5CMsGcbgUdFHObYMEfcx6bsw="
    parameters = oauth1.request_parameters(
        "b5=%3D%253D&a3=a&c%40=&a2=r%20b", oauth, FORM, b"c2&a3=2+q"
    )
    uri = oauth1.base_string_uri("http", "example.com", "/request")
    assert oauth1.signature_base_string("post", uri, parameters) == (
        "POST&http%3A%2F%2Fexample.com%2Frequest&a2%3Dr%2520b%26a3%3D2%2520q"
        "%26a3%3Da%26b5%3D%253D%25253D%26c%2540%3D%26c2%3D%26oauth_consumer_key%3D9dj"
        "dj82h48djs9d2%26oauth_nonce%3D7d8f3e4a%26oauth_signature_method%3DHMAC-SHA1"
        "%26oauth_timestamp%3D137131201%26oauth_token%3Dkkk9d7dh3k39sjv7"
    )


@pytest.mark.parametrize(
    ("query", "body"), [("a=%FF", b""), ("", b"a=%FF"), ("", "a=\u00e9".encode()), ("\u0100", b"")]
)
def test_parameters_that_are_not_utf_8_are_refused(query: str, body: bytes) -> None:
    with pytest.raises(oauth1.Invalid, match="not percent-encoded UTF-8"):
        oauth1.request_parameters(query, {}, FORM, body)


def test_a_body_of_another_type_is_not_a_parameter_source() -> None:
    parameters = oauth1.request_parameters("", {}, "application/json", b"a=1")
    assert parameters == []
    charset = oauth1.request_parameters("", {}, f"{FORM.upper()}; charset=utf-8", b"a=1")
    assert charset == [("a", "1")]


@pytest.mark.parametrize(
    ("scheme", "host", "path", "expected"),
    [
        ("HTTP", "Example.COM:80", "/r%20v/X", "http://example.com/r%20v/X"),
        ("https", "www.example.net:8080", "/", "https://www.example.net:8080/"),
        ("https", "example.net:443", "", "https://example.net/"),
        ("https", "example.net:80", "/a", "https://example.net:80/a"),
        ("http", "127.0.0.1:8000", "/webhook/x", "http://127.0.0.1:8000/webhook/x"),
        ("http", "[::1]:80", "/", "http://[::1]/"),
        ("http", "[::1]", "/", "http://[::1]/"),
        ("http", "[::1]:8080", "/", "http://[::1]:8080/"),
    ],
)
def test_the_base_string_uri(scheme: str, host: str, path: str, expected: str) -> None:
    assert oauth1.base_string_uri(scheme, host, path) == expected


@pytest.mark.parametrize(
    ("method", "reference"),
    [
        ("HMAC-SHA1", oauthlib_signature.sign_hmac_sha1_with_client),
        ("HMAC-SHA256", oauthlib_signature.sign_hmac_sha256_with_client),
        ("PLAINTEXT", oauthlib_signature.sign_plaintext_with_client),
    ],
)
def test_signatures_agree_with_oauthlib(method: str, reference: object) -> None:
    base_string = "POST&http%3A%2F%2Fexample.com%2F&a%3D%25C3%25A9"
    client = Client(CONSUMER_KEY, client_secret=CONSUMER_SECRET, resource_owner_secret=TOKEN_SECRET)
    ours = oauth1.sign(method, base_string, CONSUMER_SECRET, TOKEN_SECRET)
    assert ours == reference(base_string, client)  # type: ignore[operator]


def test_timestamps_are_accepted_within_the_window_only() -> None:
    oauth1.check_timestamp(str(int(NOW) - 300), NOW, 300)
    oauth1.check_timestamp(str(int(NOW) + 300), NOW, 300)
    with pytest.raises(oauth1.Invalid, match="too old"):
        oauth1.check_timestamp(str(int(NOW) - 301), NOW, 300)
    with pytest.raises(oauth1.Invalid, match="future"):
        oauth1.check_timestamp(str(int(NOW) + 301), NOW, 300)
    for garbage in ("", "-5", "1.5", "abc", "\u0661\u0662"):
        with pytest.raises(oauth1.Invalid, match="number of seconds"):
            oauth1.check_timestamp(garbage, NOW, 300)


def test_the_authorization_header_is_percent_decoded_and_strict() -> None:
    assert oauth1.parse_authorization('OAuth oauth_a="x%2By+z", oauth%5Fb="%E2%9C%93"') == {
        "oauth_a": "x+y+z",
        "oauth_b": "\u2713",
    }
    assert oauth1.parse_authorization('oauth oauth_a="1"') == {"oauth_a": "1"}
    assert oauth1.parse_authorization('Bearer oauth_a="1"') is None
    assert oauth1.parse_authorization('OAuth oauth_a="1", oauth_a="2"') is None
    assert oauth1.parse_authorization('OAuth oauth_a="1", oauth%5Fa="2"') is None
    assert oauth1.parse_authorization('OAuth oauth_a="1" x') is None


# --- OAuth 1.0: the check, signed by oauthlib --------------------------------------------------


def oauth_check(memory: Memory | None = None, **options: object) -> Check:
    config = OAuth1Config.model_validate(
        {"consumer_key": CONSUMER_KEY, "consumer_secret": CONSUMER_SECRET, **options}
    )
    return oauth1.build(config, Services(remember=(memory or Memory()).remember))


def oauth_signed(
    url: str,
    body: bytes = JSON,
    content_type: str = "application/json",
    method: str = SIGNATURE_HMAC_SHA1,
    secret: str = CONSUMER_SECRET,
    now: float = NOW,
    **client: str,
) -> tuple[str, dict[str, str], bytes]:
    """(url, headers, body) signed by oauthlib at ``now``."""
    signer = Client(
        CONSUMER_KEY,
        client_secret=secret,
        signature_method=method,
        timestamp=str(int(now)),
        **client,
    )
    uri, headers, signed_body = signer.sign(
        url, http_method="POST", body=body.decode(), headers={"Content-Type": content_type}
    )
    return uri, headers, signed_body.encode() if isinstance(signed_body, str) else body


OAUTH_URL = "http://127.0.0.1:8000/webhook/oauth?b=2&a=r%20b&a=%2F&empty="


def oauth_inbound(signed: tuple[str, dict[str, str], bytes], now: float = NOW) -> InboundRequest:
    url, headers, body = signed
    return inbound("POST", url, headers, body, now)


@pytest.mark.parametrize(
    ("method", "options", "client"),
    [
        (SIGNATURE_HMAC_SHA1, {}, {}),
        (SIGNATURE_HMAC_SHA256, {"signature_method": "HMAC-SHA256"}, {}),
        (SIGNATURE_PLAINTEXT, {"signature_method": "PLAINTEXT"}, {}),
        (
            SIGNATURE_HMAC_SHA1,
            {"token_secret": TOKEN_SECRET},
            {"resource_owner_key": "tok", "resource_owner_secret": TOKEN_SECRET},
        ),
    ],
)
async def test_a_request_signed_by_oauthlib_passes(
    method: str, options: dict[str, Any], client: dict[str, Any]
) -> None:
    check = oauth_check(**options)
    await check(oauth_inbound(oauth_signed(OAUTH_URL, method=method, **client)))
    form = oauth_signed(OAUTH_URL, b"x=1&y=%C3%A9+z&x=0", FORM, method, **client)
    await check(oauth_inbound(form))


async def test_the_signature_covers_method_host_path_query_and_form_body() -> None:
    check = oauth_check()
    url, headers, body = oauth_signed(OAUTH_URL, b"x=1&y=2", FORM)
    variants = [
        inbound("PUT", url, headers, body),
        inbound("POST", url.replace("127.0.0.1:8000", "127.0.0.1:8001"), headers, body),
        inbound("POST", url.replace("/webhook/oauth", "/webhook/other"), headers, body),
        inbound("POST", url.replace("b=2", "b=3"), headers, body),
        inbound("POST", url, headers, b"x=1&y=3"),
        inbound("POST", url.replace("http:", "https:"), headers, body),
    ]
    for request in variants:
        assert (await rejection(check, request)).detail == "invalid OAuth signature"
    await check(inbound("POST", url, headers, body))


async def test_a_json_body_is_covered_by_the_body_hash() -> None:
    check = oauth_check()
    url, headers, body = oauth_signed(OAUTH_URL)
    assert "oauth_body_hash=" in headers["Authorization"]
    changed = inbound("POST", url, headers, body.replace(b"1", b"2"))
    assert (await rejection(check, changed)).detail == "oauth_body_hash does not match the body"
    await check(inbound("POST", url, headers, body))


async def test_a_body_without_its_hash_is_refused_when_the_hash_is_required() -> None:
    # Signed as a body-less request, so oauthlib adds no oauth_body_hash; then a body is sent.
    signer = Client(CONSUMER_KEY, client_secret=CONSUMER_SECRET, timestamp=str(int(NOW)))
    url, headers, _ = signer.sign(OAUTH_URL, http_method="POST")
    plain = inbound("POST", url, {**headers, "Content-Type": "application/json"}, JSON)
    await oauth_check()(plain)  # RFC 5849 alone: the JSON body is not covered
    strict = oauth_check(require_body_hash=True)
    assert (await rejection(strict, plain)).detail.startswith("oauth_body_hash required")
    await strict(oauth_inbound(oauth_signed(OAUTH_URL)))  # with the hash: fine
    form = oauth_signed(OAUTH_URL, b"x=1", FORM)
    await strict(oauth_inbound(form))  # a form body is signed by RFC 5849 itself


@pytest.mark.parametrize(
    ("signing", "options", "detail"),
    [
        (dict(secret="wrong"), {}, "invalid OAuth signature"),
        (dict(method=SIGNATURE_HMAC_SHA256), {}, "oauth_signature_method must be HMAC-SHA1"),
        (dict(now=NOW - 301), {}, "oauth_timestamp is too old"),
        (dict(now=NOW + 301), {}, "oauth_timestamp is in the future"),
        (dict(), {"consumer_key": "consumer-2"}, "unknown consumer key"),
        (dict(), {"token_secret": "expected"}, "invalid OAuth signature"),
    ],
)
async def test_a_wrong_signature_is_refused(
    signing: dict[str, Any], options: dict[str, Any], detail: str
) -> None:
    memory = Memory()
    check = oauth_check(memory, **options)
    request = oauth_inbound(oauth_signed(OAUTH_URL, **signing))
    rejected = await rejection(check, request)
    assert rejected.detail == detail
    assert challenge_of(rejected) == 'OAuth realm="webhook"'
    assert memory.keys == {}  # a refused request does not use up its nonce


async def test_an_old_timestamp_passes_when_timestamps_are_not_verified() -> None:
    check = oauth_check(verify_timestamp=False)
    await check(oauth_inbound(oauth_signed(OAUTH_URL, now=NOW - 86400)))


async def test_a_nonce_is_used_once_and_only_after_the_signature_verified() -> None:
    memory = Memory()
    check = oauth_check(memory)
    url, headers, body = oauth_signed(OAUTH_URL, nonce="n-1")
    forged_headers = {
        **headers,
        "Authorization": headers["Authorization"].replace(
            'oauth_signature="', 'oauth_signature="x'
        ),
    }
    assert (await rejection(check, inbound("POST", url, forged_headers, body))).detail == (
        "invalid OAuth signature"
    )
    await check(inbound("POST", url, headers, body))
    assert memory.keys == {f"oauth1:{CONSUMER_KEY}:{int(NOW)}:n-1": 600.0}
    rejected = await rejection(check, inbound("POST", url, headers, body, NOW + 1))
    assert rejected.detail == "OAuth nonce already used"


@pytest.mark.parametrize(
    ("edit", "detail"),
    [
        (lambda h: "Bearer abc", "OAuth signature required"),
        (lambda h: h + ', oauth_nonce="again"', "OAuth signature required"),
        (
            lambda h: h.replace('oauth_version="1.0"', 'oauth_version="2.0"'),
            "oauth_version must be 1.0",
        ),
        (lambda h: h.replace("oauth_nonce=", "x_nonce="), "missing oauth_nonce"),
        (lambda h: h.replace("oauth_signature=", "x="), "missing oauth_signature"),
    ],
)
async def test_a_malformed_authorization_is_refused(edit: object, detail: str) -> None:
    check = oauth_check()
    url, headers, body = oauth_signed(OAUTH_URL)
    headers["Authorization"] = edit(headers["Authorization"])  # type: ignore[operator]
    assert (await rejection(check, inbound("POST", url, headers, body))).detail == detail
    headers.pop("Authorization")
    assert (await rejection(check, inbound("POST", url, headers, body))).detail == (
        "OAuth signature required"
    )


async def test_plaintext_without_timestamp_and_nonce_when_timestamps_are_not_verified() -> None:
    memory = Memory()
    check = oauth_check(memory, signature_method="PLAINTEXT", verify_timestamp=False)
    secret = urllib.parse.quote(urllib.parse.quote(CONSUMER_SECRET, safe="~") + "&", safe="~")
    header = (
        f'OAuth oauth_consumer_key="{CONSUMER_KEY}", oauth_signature_method="PLAINTEXT", '
        f'oauth_signature="{secret}"'
    )
    await check(inbound("POST", OAUTH_URL, {"Authorization": header}, JSON))
    assert memory.keys == {}
    strict = oauth_check(signature_method="PLAINTEXT")
    rejected = await rejection(strict, inbound("POST", OAUTH_URL, {"Authorization": header}, JSON))
    assert rejected.detail == "missing oauth_timestamp, oauth_nonce"


# --- End to end through the real cloud --------------------------------------------------------


def refused(answer: httpx.Response, detail: str, challenge: str) -> None:
    assert answer.status_code == 401, answer.text
    assert answer.json()["detail"] == detail
    assert answer.headers["www-authenticate"].startswith(challenge)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


@pytest.mark.parametrize(
    "webhook_id",
    ["digest-md5", "digest-md5-sess", "digest-sha256", "digest-sha256-sess", "digest-no-qop"],
)
def test_httpx_digest_auth_is_accepted(
    module_cloud: Cloud, http: httpx.Client, webhook_id: str
) -> None:
    url = f"{module_cloud.url}/webhook/{webhook_id}?source=test&path=%2Fa"
    auth = httpx.DigestAuth(USER, PASSWORD)
    # The first answers a challenge; later ones reuse its nonce with the next nc (without qop, a
    # nonce is single-use, so the cloud challenges again and httpx answers that).
    for _ in range(3):
        answer = http.post(url, content=JSON, auth=auth)
        assert answer.status_code == 202, answer.text
    refused(
        http.post(url, content=JSON), "digest credentials required", 'Digest realm="Webhook API"'
    )


@pytest.mark.parametrize(
    ("username", "password"), [(USER, "wrong password"), ("someone-else", PASSWORD)]
)
def test_httpx_digest_auth_with_wrong_credentials_is_refused(
    module_cloud: Cloud, http: httpx.Client, username: str, password: str
) -> None:
    url = f"{module_cloud.url}/webhook/digest-sha256"
    answer = http.post(url, content=JSON, auth=httpx.DigestAuth(username, password))
    refused(answer, "invalid digest credentials", "Digest ")
    assert "Authorization" in answer.request.headers  # it did answer the challenge
    assert "stale" not in answer.headers["www-authenticate"]


def test_a_replayed_digest_is_refused(module_cloud: Cloud, http: httpx.Client) -> None:
    url = f"{module_cloud.url}/webhook/digest-md5"
    answer = http.post(url, content=JSON, auth=httpx.DigestAuth(USER, PASSWORD))
    assert answer.status_code == 202
    captured = answer.request.headers["authorization"]
    replayed = http.post(url, content=JSON, headers={"Authorization": captured})
    refused(replayed, "digest nonce count replayed", "Digest ")
    assert "stale" not in replayed.headers["www-authenticate"]


def test_a_digest_for_another_uri_is_refused_by_the_cloud(
    module_cloud: Cloud, http: httpx.Client
) -> None:
    url = f"{module_cloud.url}/webhook/digest-md5?n=1"
    challenge = http.post(url, content=JSON).headers["www-authenticate"]
    authorization = DigestClient().sign(challenge, "POST", url)
    moved = http.post(
        url.replace("n=1", "n=2"), content=JSON, headers={"Authorization": authorization}
    )
    refused(moved, "digest uri does not match the request", "Digest ")
    assert http.post(url, content=JSON, headers={"Authorization": authorization}).status_code == 202


OAUTH_CASES = [
    ("oauth1-sha1", SIGNATURE_HMAC_SHA1, {}),
    (
        "oauth1-sha256",
        SIGNATURE_HMAC_SHA256,
        {"resource_owner_key": "t", "resource_owner_secret": TOKEN_SECRET},
    ),
    ("oauth1-plaintext", SIGNATURE_PLAINTEXT, {}),
]


def send(http: httpx.Client, signed: tuple[str, dict[str, str], bytes]) -> httpx.Response:
    url, headers, body = signed
    return http.post(url, headers=headers, content=body)


@pytest.mark.parametrize(("webhook_id", "method", "client"), OAUTH_CASES)
def test_oauthlib_signed_webhooks_are_accepted_once(
    module_cloud: Cloud, http: httpx.Client, webhook_id: str, method: str, client: dict[str, Any]
) -> None:
    url = f"{module_cloud.url}/webhook/{webhook_id}?b=2&a=r%20b&a=%2F"
    signed = oauth_signed(url, method=method, now=time.time(), **client)
    accepted = send(http, signed)
    assert accepted.status_code == 202, accepted.text
    refused(send(http, signed), "OAuth nonce already used", 'OAuth realm="webhook"')


@pytest.mark.parametrize(("webhook_id", "method", "client"), OAUTH_CASES)
def test_oauthlib_signed_webhooks_with_a_wrong_secret_are_refused(
    module_cloud: Cloud, http: httpx.Client, webhook_id: str, method: str, client: dict[str, Any]
) -> None:
    url = f"{module_cloud.url}/webhook/{webhook_id}"
    signed = oauth_signed(url, method=method, secret="not the secret", now=time.time(), **client)
    refused(send(http, signed), "invalid OAuth signature", 'OAuth realm="webhook"')


@pytest.mark.parametrize(
    ("offset", "detail"),
    [(-3600, "oauth_timestamp is too old"), (3600, "oauth_timestamp is in the future")],
)
def test_oauth_timestamps_outside_the_window_are_refused(
    module_cloud: Cloud, http: httpx.Client, offset: float, detail: str
) -> None:
    url = f"{module_cloud.url}/webhook/oauth1-sha1"
    refused(send(http, oauth_signed(url, now=time.time() + offset)), detail, "OAuth ")


def test_a_form_body_changed_by_one_byte_is_refused(
    module_cloud: Cloud, http: httpx.Client
) -> None:
    url = f"{module_cloud.url}/webhook/oauth1-form"
    signed_url, headers, body = oauth_signed(url, b"event=ping&amount=100", FORM, now=time.time())
    changed = http.post(signed_url, headers=headers, content=body.replace(b"100", b"900"))
    refused(changed, "invalid OAuth signature", "OAuth ")
    assert http.post(signed_url, headers=headers, content=body).status_code == 202


def test_a_json_body_changed_under_its_body_hash_is_refused(
    module_cloud: Cloud, http: httpx.Client
) -> None:
    url = f"{module_cloud.url}/webhook/oauth1-sha1"
    signed_url, headers, body = oauth_signed(url, now=time.time())
    changed = http.post(signed_url, headers=headers, content=body.replace(b"1", b"2"))
    refused(changed, "oauth_body_hash does not match the body", "OAuth ")
    assert http.post(signed_url, headers=headers, content=body).status_code == 202
