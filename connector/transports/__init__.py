"""How the connector reaches the cloud: one module per transport behind one protocol."""

from __future__ import annotations

from webhook_connect.connector.config import ConnectorSettings
from webhook_connect.connector.transports.base import Disconnected, Refused, Transport


def open_transport(settings: ConnectorSettings) -> Transport:
    """A fresh, unconnected transport of the configured kind."""
    if settings.protocol == "sse":
        from webhook_connect.connector.transports.sse import SseTransport

        return SseTransport(settings)
    if settings.protocol == "long_poll":
        from webhook_connect.connector.transports.longpoll import LongPollTransport

        return LongPollTransport(settings)
    from webhook_connect.connector.transports.websocket import WebSocketTransport

    return WebSocketTransport(settings)


__all__ = ["Disconnected", "Refused", "Transport", "open_transport"]
