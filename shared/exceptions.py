"""The exception tree of Webhook Connect.

WebhookConnectError
├── ConfigError              bad configuration file, flag or environment variable (exit 2)
├── HttpRefusal              an HTTP request refused: status, error code, detail, headers
│                            (ingest's checks, the admin API, /docs; cloud/responses.py answers)
├── StorageError              anything the storage backend reports
│   ├── StorageUnavailable   the backend cannot be reached (ingest answers 503)
│   ├── ChannelFull          max_queue_size reached (ingest answers 503)
│   └── UnknownChannel       the channel is not provisioned
├── ConnectorProtocolError    the cloud–connector protocol (``docs/PROTOCOL.md``)
│   ├── FrameError           a frame that does not parse (shared/frames.py; also a ValueError)
│   └── ConnectorRefusal     the cloud refuses or ends a connector connection: the HTTP status
│                            (SSE, long-poll, acks) and the WebSocket close code that say why
├── ModuleError              an output module (shared/modules)
│   ├── DeliveryError        a message not delivered (modules/base.py); ``retry`` says if worth it
│   │   ├── Transient        the server is unreachable, busy or timed out: retried
│   │   └── Permanent        the message itself was refused: not retried
│   ├── UnknownModule        no module has this name (modules/registry.py)
│   ├── MissingDriver        the module's driver is not installed (modules/registry.py)
│   └── ModuleProtocolError  a server spoke its protocol wrongly or answered an error:
│                            ClickHouseError, StompError, StompFrameError, PeerClosed (websocket)
└── AdminClientError          the admin command-line clients could not do what was asked
    ├── CloudUnreachable     no HTTP answer from the cloud (refused, timed out, bad URL)
    └── AdminApiError        the admin API answered an error (status_code, error, detail)
"""

from __future__ import annotations

import json
from collections.abc import Sequence


class WebhookConnectError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(WebhookConnectError):
    """A configuration source is wrong; ``str()`` names file, key path and reason."""

    def __init__(self, source: str, key_path: str, reason: str) -> None:
        self.source = source
        self.key_path = key_path
        self.reason = reason
        where = f"{source}: {key_path}" if key_path else source
        super().__init__(f"{where}: {reason}")


class HttpRefusal(WebhookConnectError):
    """An HTTP request refused: answer ``status`` with ``{"error": error, "detail": detail}``.

    ``headers`` are raw ASGI pairs sent with it (``Retry-After``, ``WWW-Authenticate``,
    ``Allow``, ``Connection: close``), kept as pairs because a challenge may be repeated.
    ``cloud/responses.py``'s :func:`refusal_response` is the one place that answers it.
    """

    def __init__(
        self,
        status: int,
        error: str,
        detail: object = None,
        headers: Sequence[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(
            f"{status} {error}: {detail}" if detail is not None else f"{status} {error}"
        )
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = list(headers or ())

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case) sent with the refusal, or None."""
        return next((value for key, value in self.headers if key == name), None)


class StorageError(WebhookConnectError):
    """The storage backend refused or failed an operation."""

    retry_after: int = 1


class StorageUnavailable(StorageError):
    """The backend cannot be reached right now; the caller should retry."""


class ChannelFull(StorageError):
    """The channel holds ``max_queue_size`` messages; the sender should retry later.

    ``group`` is the consumer group with the largest backlog (``backlog`` messages it has not
    acked), named so the operator sees at once which one holds the channel full.
    """

    def __init__(self, channel: str, limit: int, group: str = "", backlog: int = 0) -> None:
        self.channel = channel
        self.limit = limit
        self.group = group
        self.backlog = backlog
        text = f"channel {channel!r} is full ({limit} messages)"
        if group:
            text += f"; group {group!r} holds the backlog ({backlog} messages not acked)"
        super().__init__(text)


class UnknownChannel(StorageError):
    """The channel has not been provisioned."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        super().__init__(f"unknown channel {channel!r}")


class ConnectorProtocolError(WebhookConnectError):
    """Something about the cloud–connector protocol: a bad frame, a refused connection."""


class FrameError(ConnectorProtocolError, ValueError):
    """A frame that does not parse; the connection is closed with this reason."""


class ConnectorRefusal(ConnectorProtocolError):
    """The cloud refuses a connector's connection, or ends it.

    One exception for every transport: SSE, long-poll and ``POST /connect/ack`` answer
    ``status`` with ``{"error": error, "detail": reason}``; a WebSocket closes with
    ``close_code`` and ``reason``.
    """

    def __init__(self, status: int, close_code: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.close_code = close_code
        self.error = error
        self.reason = reason

    def as_http(self) -> HttpRefusal:
        """The answer over HTTP (SSE, long-poll, acks): a 401 asks for a bearer token, and a
        429 or 503 says when to try again."""
        headers: list[tuple[bytes, bytes]] = []
        if self.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="webhook-connect"'))
        elif self.status in (429, 503):
            headers.append((b"retry-after", b"5"))
        return HttpRefusal(self.status, self.error, self.reason, headers)


class ModuleError(WebhookConnectError):
    """Something an output module (``shared/modules``) could not do."""


class ModuleProtocolError(ModuleError):
    """A server a module talks to answered an error or broke its protocol; the module turns
    it into a :class:`~webhook_connect.shared.modules.base.Transient` or ``Permanent``."""


class AdminClientError(WebhookConnectError):
    """The admin API client (``webhook-connect channels|dlq``) could not do what was asked."""


class CloudUnreachable(AdminClientError):
    """No HTTP answer from the cloud at ``url``."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot reach the cloud at {url}: {reason}")


class AdminApiError(AdminClientError):
    """The admin API answered ``status_code`` with ``{"error": error, "detail": detail}``."""

    def __init__(
        self, status_code: int, error: str, detail: object = None, retry_after: str | None = None
    ) -> None:
        self.status_code = status_code
        self.error = error
        self.detail = detail
        self.retry_after = retry_after
        text = f"{status_code} {error}"
        if detail not in (None, ""):
            # The API's detail is usually a sentence; a structured one is shown as JSON.
            text += f": {detail if isinstance(detail, str) else json.dumps(detail)}"
        if retry_after:
            text += f" (retry after {retry_after} s)"
        super().__init__(text)
