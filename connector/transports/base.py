"""The transport protocol the connector's runner drives."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Protocol

from webhook_connect.connector.config import ConnectorSettings
from webhook_connect.shared.exceptions import WebhookConnectError
from webhook_connect.shared.frames import WireMessage


class TransportError(WebhookConnectError):
    """Root of transport failures."""


class Refused(TransportError):
    """The cloud refused us for good (bad token, unknown channel): retrying will not help."""


class Disconnected(TransportError):
    """The connection failed or dropped; reconnect with backoff."""


class Transport(Protocol):
    @property
    def connection_id(self) -> str:
        """The cloud's name for this connection, once connected."""

    async def connect(self) -> None:
        """Open the connection; :class:`Refused` or :class:`Disconnected` if it fails."""

    def messages(self) -> AsyncIterator[WireMessage]:
        """Messages as they arrive; ends by raising :class:`Disconnected`."""

    async def ack(self, message_ids: list[str]) -> None:
        """Acknowledge delivered messages (a lost ack means a redelivery, never a loss)."""

    async def nack(self, message_id: str, *, retry: bool, reason: str = "") -> None: ...

    async def aclose(self) -> None: ...


def tls_context(settings: ConnectorSettings) -> ssl.SSLContext | None:
    """The TLS settings of ``connector.json`` as a context (None: library defaults)."""
    if settings.verify_tls and settings.ca_file is None:
        return None
    context = ssl.create_default_context(cafile=settings.ca_file)
    if not settings.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
