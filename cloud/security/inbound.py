"""What a check sees of one inbound webhook, and how it says no.

Checks are plain async callables ``check(request) -> None`` that raise :class:`Rejected`
(:class:`~webhook_connect.shared.exceptions.HttpRefusal`). The request carries ``now`` so that
time-dependent logic (timestamps, nonce lifetimes) never reads a clock itself and can be tested
with any instant.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from webhook_connect.cloud.security import jsondoc
from webhook_connect.shared.exceptions import HttpRefusal

Check = Callable[["InboundRequest"], Awaitable[None]]
RawHeaders = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class InboundRequest:
    """One received webhook: the request line, headers and the complete raw body."""

    webhook_id: str
    method: str
    scheme: str
    path: str  # as sent, percent-encoding kept
    query_string: str
    raw_headers: RawHeaders
    body: bytes
    peer: str  # the TCP peer
    client: str  # the sender, after trusted proxies
    now: float
    _headers: dict[str, str] | None = field(default=None, repr=False)
    _query: dict[str, list[str]] | None = field(default=None, repr=False)
    _json: Any = field(default=None, repr=False)
    _json_parsed: bool = field(default=False, repr=False)

    @property
    def headers(self) -> dict[str, str]:
        """Header names lower-cased; the first value of a repeated header."""
        if self._headers is None:
            headers: dict[str, str] = {}
            for name, value in self.raw_headers:
                headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
            self._headers = headers
        return self._headers

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), or None."""
        return self.headers.get(name.lower())

    @property
    def host(self) -> str:
        return self.headers.get("host", "")

    @property
    def query(self) -> dict[str, list[str]]:
        """The query string's parameters, blank values kept."""
        if self._query is None:
            self._query = urllib.parse.parse_qs(self.query_string, keep_blank_values=True)
        return self._query

    def json(self) -> Any:
        """The body as JSON, or None when it is not a JSON document."""
        if not self._json_parsed:
            self._json_parsed = True
            try:
                self._json = jsondoc.loads(self.body)
            except (ValueError, RecursionError):
                self._json = None
        return self._json


# What a check raises to refuse the request: the cloud's one HTTP refusal, under the name the
# checks have always used. Its headers are raw ASGI pairs (a challenge may be repeated).
Rejected = HttpRefusal


def unauthorized(detail: str, challenge: str | None = None) -> Rejected:
    """401, with a ``WWW-Authenticate`` challenge where the scheme has one."""
    headers = [] if challenge is None else [(b"www-authenticate", challenge.encode("latin-1"))]
    return Rejected(401, "unauthorized", detail, headers)


def forbidden(detail: str) -> Rejected:
    return Rejected(403, "forbidden", detail)


@dataclass(frozen=True)
class Services:
    """What checks may use beyond the request: a shared replay store and an HTTP client."""

    # Record a key for ``ttl`` seconds on every replica; False when it was seen already.
    remember: Callable[[str, float], Awaitable[bool]]
    # For token introspection and reCAPTCHA verification.
    http: Any = None
