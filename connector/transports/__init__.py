"""How the connector reaches the cloud: one module per transport behind one protocol."""

from __future__ import annotations

from connector.config import ConnectorSettings
from connector.transports.base import Disconnected, Refused, Transport


def open_transport(settings: ConnectorSettings) -> Transport:
    """A fresh, unconnected transport of the configured kind."""
    if settings.protocol == "websocket":
        from connector.transports.websocket import WebSocketTransport

        return WebSocketTransport(settings)
    raise Refused(f"protocol {settings.protocol!r} is not available in this version yet")


__all__ = ["Disconnected", "Refused", "Transport", "open_transport"]
