"""HTTP mode: relay a message byte-exact to its target, retrying what is worth retrying.

The request carries the original method (unless the target fixes one), the original raw query
string, every original header except hop-by-hop ones, ``Host`` and ``Content-Length`` (which
describe the new hop), and the exact body bytes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urljoin, urlsplit

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)

from webhook_connect.connector.causes import describe
from webhook_connect.connector.config import ConnectorSettings, Target, named_targets
from webhook_connect.connector.httpclient import HttpClient, HttpClientError, InvalidRequest
from webhook_connect.connector.proxy import ProxyPolicy
from webhook_connect.connector.proxy import policy as proxy_policy
from webhook_connect.connector.tls import tls_context
from webhook_connect.shared.frames import WireMessage
from webhook_connect.shared.policy import (
    HOP_BY_HOP,
    Outcome,
    classify_status,
    parse_retry_after,
    retry_delay,
)

RELAY_PREFIX = "x-webhook-connect-"
MAX_REASON = 500  # what the cloud stores with a nack
MAX_REDIRECTS = 5
FOLLOWED_REDIRECTS = frozenset({307, 308})  # method and body kept, by definition
REFUSED_REDIRECTS = frozenset({301, 302, 303})  # a client may turn these into GET: not ours

logger = logging.getLogger("webhook_connect.connector")


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    outcome: Outcome
    target: str
    status: int | None = None
    error: str = ""
    attempts: int = 0
    seconds: float = 0.0
    # The short machine word for a failure without an HTTP status (``connection_error``,
    # ``timeout``, ``invalid_request``); ``error`` then says the cause in words.
    code: str = ""
    # No route, events filter or fallback took it (connector/router.py): acked or
    # dead-lettered without a delivery, counted apart in the metrics.
    unmatched: bool = False

    @property
    def reason(self) -> str:
        """Reason for a nack, as stored with a dead letter: the short machine word
        (``http_400``, ``connection_error``), then the cause in words when there is one
        (``connection_error: connection refused``, ``http_302: redirect 302 to https://…``)."""
        if self.status is not None:
            short = f"http_{self.status}"
        elif self.code:
            short = self.code
        else:
            return self.error or self.outcome.value
        return f"{short}: {self.error}"[:MAX_REASON] if self.error else short


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes


def build_request(
    message: WireMessage, target: Target, attempt: int, now: float | None = None
) -> HttpRequest:
    """The request for ``target`` (pure: no I/O; ``now`` is the signing time, default the
    clock's)."""
    envelope = message.envelope
    url = target.url
    if envelope.query_string:
        url += ("&" if "?" in url else "?") + envelope.query_string
    # A configured header replaces the sender's of the same name (any case): appended after
    # it, the target would see both, and most servers read the sender's first.
    configured = {name.lower() for name in target.headers}
    headers = [
        (name, value)
        for name, value in envelope.headers
        if name.lower() not in HOP_BY_HOP
        and not name.lower().startswith(RELAY_PREFIX)
        and name.lower() not in configured
    ]
    headers.extend(target.headers.items())
    headers += [
        ("X-Webhook-Connect-Message-Id", message.message_id),
        ("X-Webhook-Connect-Attempt", str(attempt)),
        ("X-Webhook-Connect-Channel", message.channel),
    ]
    signer = target.signer
    if signer is not None:
        # Signed at each attempt, over the exact body: a retry carries a fresh timestamp.
        signed_at = int(time.time() if now is None else now)
        headers = signer.apply(headers, message.message_id, envelope.body, signed_at)
    return HttpRequest(target.method or envelope.method, url, headers, envelope.body)


class _Retryable(Exception):
    def __init__(
        self, status: int | None, error: str, retry_after: float | None, code: str = ""
    ) -> None:
        super().__init__(error or f"HTTP {status}")
        self.status = status
        self.error = error
        self.retry_after = retry_after
        self.code = code


def redirect_location(url: str, status: int, location: str | None) -> tuple[str | None, str]:
    """Where a 3xx of ``url`` leads: ``(next_url, "")`` to follow it, else ``(None, why)``
    (pure). 307/308 are followed to the same scheme or from http to https, never to http
    from https; 301/302/303 are refused, naming where they point."""
    if not location:
        return None, f"redirect {status} without a Location"
    next_url = urljoin(url, location.strip())
    if status not in FOLLOWED_REDIRECTS:
        return None, f"redirect {status} to {next_url}"
    scheme, next_scheme = urlsplit(url).scheme.lower(), urlsplit(next_url).scheme.lower()
    if next_scheme not in ("http", "https"):
        return None, f"redirect {status} to {next_url}: not an http(s) URL"
    if scheme == "https" and next_scheme == "http":
        return None, f"redirect {status} to {next_url}: not followed from https to http"
    return next_url, ""


def target_tls(target: Target) -> tuple[object, ...]:
    """What makes a target need an HTTP client of its own (TLS settings, proxy)."""
    return (target.verify_tls, target.ca_file, target.client_cert, target.client_key, target.proxy)


DEFAULT_TLS = target_tls(Target(url="http://localhost/"))


class Deliverer(Protocol):
    """Delivers one message and says how it went: HTTP mode, or module mode."""

    async def start(self) -> None: ...

    async def deliver(self, message: WireMessage) -> DeliveryResult: ...

    async def aclose(self) -> None: ...


class HttpDeliverer:
    """Delivers messages to the targets of a connector configuration."""

    def __init__(self, settings: ConnectorSettings, client: HttpClient) -> None:
        self._settings = settings
        self._client = client
        # Targets with TLS or proxy settings of their own get a client of their own, made
        # once: id(target) -> (target, client); the target kept so an id is never reused.
        self._clients: dict[int, tuple[Target, HttpClient]] = {}
        self._own: dict[tuple[object, ...], HttpClient] = {}

    async def start(self) -> None:
        """Warn once about each target whose certificate is not checked."""
        for name, target in named_targets(self._settings):
            if not target.verify_tls:
                logger.warning(
                    "warning: %s (%s): verify_tls is false, its TLS certificate is not checked",
                    name,
                    target.url,
                )

    async def aclose(self) -> None:
        """Close the clients made here; the default one is closed by its owner."""
        for client in self._own.values():
            await client.aclose()
        self._own.clear()
        self._clients.clear()

    def _client_for(self, target: Target) -> HttpClient:
        entry = self._clients.get(id(target))
        if entry is not None and entry[0] is target:
            return entry[1]
        settings = target_tls(target)
        client = self._client
        if settings != DEFAULT_TLS:
            client = self._own.get(settings) or self._new_client(target)
            self._own[settings] = client
        self._clients[id(target)] = (target, client)
        return client

    def _new_client(self, target: Target) -> HttpClient:
        return HttpClient(
            max_connections_per_host=self._client.max_connections_per_host,
            ssl_context=tls_context(
                verify=target.verify_tls,
                ca_file=target.ca_file,
                client_cert=target.client_cert,
                client_key=target.client_key,
            ),
            proxies=target_proxies(target),
        )

    async def deliver(self, message: WireMessage) -> DeliveryResult:
        target = self._settings.target_for(message.envelope.webhook_id)
        if target is None:
            return DeliveryResult(Outcome.REJECTED, "-", error="no_target")
        return await self.deliver_to(message, target)

    async def deliver_to(self, message: WireMessage, target: Target) -> DeliveryResult:
        """Deliver to ``target`` (its retries included), whatever chose it: the webhook id,
        or a route (connector/router.py)."""
        started = time.monotonic()
        attempts = target.retry_max_attempts if target.retry_enabled else 1
        # The cloud's attempt count continues across local retries, so a target can tell.
        first_attempt = (message.attempt - 1) * attempts
        try:
            try:
                # Fast path: most deliveries succeed at once; tenacity only for retries.
                answer = await self._send(message, target, first_attempt + 1)
                tries = 1
            except _Retryable as first_failure:
                if attempts == 1:
                    raise
                answer, tries = await self._retry(
                    message, target, first_attempt, attempts, first_failure
                )
        except _Retryable as exc:
            tries = attempts
            seconds = time.monotonic() - started
            return DeliveryResult(
                Outcome.RETRY, target.url, exc.status, exc.error, tries, seconds, exc.code
            )
        except InvalidRequest as exc:
            seconds = time.monotonic() - started
            return DeliveryResult(
                Outcome.REJECTED, target.url, None, str(exc), 1, seconds, "invalid_request"
            )
        status, error = answer
        return DeliveryResult(
            classify_status(status), target.url, status, error, tries, time.monotonic() - started
        )

    async def _retry(
        self,
        message: WireMessage,
        target: Target,
        first_attempt: int,
        attempts: int,
        first_failure: _Retryable,
    ) -> tuple[tuple[int, str], int]:
        """Attempts 2..N with backoff (honouring Retry-After); raises the last failure."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts - 1),
            wait=lambda state: _wait(state, target),
            retry=retry_if_exception_type(_Retryable),
            reraise=True,
        )
        await asyncio.sleep(_delay_after(first_failure, 1, target))
        tries = 0
        answer = (0, "")
        async for attempt in retrying:
            with attempt:
                tries = attempt.retry_state.attempt_number + 1
                answer = await self._send(message, target, first_attempt + tries)
        return answer, tries

    async def _send(self, message: WireMessage, target: Target, attempt: int) -> tuple[int, str]:
        """The target's final status and, for a redirect not followed, why (else "")."""
        request = build_request(message, target, attempt)
        client = self._client_for(target)
        url = request.url
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = await client.request(
                    request.method, url, request.headers, request.body, target.timeout_seconds
                )
            except InvalidRequest:
                raise
            except (HttpClientError, OSError) as exc:
                kind = "timeout" if isinstance(exc, TimeoutError) else "connection_error"
                host = urlsplit(url).hostname or ""
                cause = describe(exc, host, target.timeout_seconds)
                raise _Retryable(None, cause, None, kind) from exc
            status = response.status
            if 300 <= status < 400:
                next_url, why = redirect_location(url, status, response.header("location"))
                if next_url is None:
                    return status, why
                url = next_url
                continue
            if classify_status(status) is Outcome.RETRY:
                retry_after = parse_retry_after(response.header("retry-after"), time.time())
                raise _Retryable(status, "", retry_after)
            return status, ""
        return status, f"more than {MAX_REDIRECTS} redirects, the last to {url}"


def _wait(state: RetryCallState, target: Target) -> float:
    outcome = state.outcome
    failure = outcome.exception() if outcome is not None else None
    # Attempt 1 happened before tenacity took over: its state counts from attempt 2.
    return _delay_after(failure, state.attempt_number + 1, target)


def _delay_after(failure: BaseException | None, attempt: int, target: Target) -> float:
    retry_after = failure.retry_after if isinstance(failure, _Retryable) else None
    return retry_delay(
        attempt,
        initial=target.retry_delay_seconds,
        multiplier=target.retry_backoff_multiplier,
        maximum=target.retry_max_delay_seconds,
        retry_after=retry_after,
    )


def target_proxies(target: Target | None = None) -> ProxyPolicy:
    """The proxy policy for a target (None: one with no ``proxy`` key): its ``proxy`` key,
    else the environment's proxies with ``NO_PROXY`` and loopback always direct."""
    explicit = target.proxy if target is not None else None
    return proxy_policy(explicit, os.environ, loopback_direct=True)
