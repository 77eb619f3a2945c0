"""The transport protocol the connector's runner drives."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Protocol

from webhook_connect.connector.config import ConnectorSettings
from webhook_connect.connector.proxy import ProxyPolicy, open_tunnel
from webhook_connect.connector.proxy import policy as proxy_policy
from webhook_connect.connector.tls import tls_context as client_tls_context
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
    return client_tls_context(
        verify=settings.verify_tls,
        ca_file=settings.ca_file,
        client_cert=settings.client_cert,
        client_key=settings.client_key,
    )


def cloud_proxies(settings: ConnectorSettings) -> ProxyPolicy:
    """The proxy policy of the cloud connection: the ``proxy`` key, else the environment's."""
    return proxy_policy(settings.proxy, os.environ, loopback_direct=False)


async def open_socket(
    proxies: ProxyPolicy, scheme: str, host: str, port: int
) -> socket.socket | None:
    """A tunnel through the proxy the policy names for this origin, or None (dial directly)."""
    proxy = proxies.choose(scheme, host, port)
    if proxy is None:
        return None
    return await open_tunnel(proxy, host, port)
