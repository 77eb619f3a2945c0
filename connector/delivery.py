"""HTTP mode: relay a message byte-exact to its target, retrying what is worth retrying.

The request carries the original method (unless the target fixes one), the original raw query
string, every original header except hop-by-hop ones, ``Host`` and ``Content-Length`` (which
describe the new hop), and the exact body bytes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)

from webhook_connect.connector.config import ConnectorSettings, Target
from webhook_connect.connector.httpclient import HttpClient, HttpClientError, InvalidRequest
from webhook_connect.shared.frames import WireMessage
from webhook_connect.shared.policy import (
    HOP_BY_HOP,
    Outcome,
    classify_status,
    parse_retry_after,
    retry_delay,
)

RELAY_PREFIX = "x-webhook-connect-"


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    outcome: Outcome
    target: str
    status: int | None = None
    error: str = ""
    attempts: int = 0
    seconds: float = 0.0

    @property
    def reason(self) -> str:
        """Short reason for a nack, as stored with a dead letter."""
        if self.status is not None:
            return f"http_{self.status}"
        return self.error or self.outcome.value


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes


def build_request(message: WireMessage, target: Target, attempt: int) -> HttpRequest:
    """The request for ``target`` (pure: no I/O)."""
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
    return HttpRequest(target.method or envelope.method, url, headers, envelope.body)


class _Retryable(Exception):
    def __init__(self, status: int | None, error: str, retry_after: float | None) -> None:
        super().__init__(error or f"HTTP {status}")
        self.status = status
        self.error = error
        self.retry_after = retry_after


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

    async def start(self) -> None:
        """Nothing to set up: the HTTP client connects on demand."""

    async def aclose(self) -> None:
        """The client is closed by its owner."""

    async def deliver(self, message: WireMessage) -> DeliveryResult:
        target = self._settings.target_for(message.envelope.webhook_id)
        started = time.monotonic()
        if target is None:
            return DeliveryResult(Outcome.REJECTED, "-", error="no_target")
        attempts = target.retry_max_attempts if target.retry_enabled else 1
        # The cloud's attempt count continues across local retries, so a target can tell.
        first_attempt = (message.attempt - 1) * attempts
        try:
            try:
                # Fast path: most deliveries succeed at once; tenacity only for retries.
                status = await self._send(message, target, first_attempt + 1)
                tries = 1
            except _Retryable as first_failure:
                if attempts == 1:
                    raise
                status, tries = await self._retry(
                    message, target, first_attempt, attempts, first_failure
                )
        except _Retryable as exc:
            tries = attempts
            return DeliveryResult(
                Outcome.RETRY, target.url, exc.status, exc.error, tries, time.monotonic() - started
            )
        except InvalidRequest as exc:
            return DeliveryResult(
                Outcome.REJECTED,
                target.url,
                None,
                f"invalid_request: {exc}",
                1,
                time.monotonic() - started,
            )
        return DeliveryResult(
            classify_status(status), target.url, status, "", tries, time.monotonic() - started
        )

    async def _retry(
        self,
        message: WireMessage,
        target: Target,
        first_attempt: int,
        attempts: int,
        first_failure: _Retryable,
    ) -> tuple[int, int]:
        """Attempts 2..N with backoff (honouring Retry-After); raises the last failure."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts - 1),
            wait=lambda state: _wait(state, target),
            retry=retry_if_exception_type(_Retryable),
            reraise=True,
        )
        await asyncio.sleep(_delay_after(first_failure, 1, target))
        tries = status = 0
        async for attempt in retrying:
            with attempt:
                tries = attempt.retry_state.attempt_number + 1
                status = await self._send(message, target, first_attempt + tries)
        return status, tries

    async def _send(self, message: WireMessage, target: Target, attempt: int) -> int:
        request = build_request(message, target, attempt)
        try:
            response = await self._client.request(
                request.method, request.url, request.headers, request.body, target.timeout_seconds
            )
        except InvalidRequest:
            raise
        except (HttpClientError, OSError) as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else "connection_error"
            raise _Retryable(None, kind, None) from exc
        if classify_status(response.status) is Outcome.RETRY:
            retry_after = parse_retry_after(response.header("retry-after"), time.time())
            raise _Retryable(response.status, "", retry_after)
        return response.status


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
