"""What the SSE and long-poll transports share: addressing, credentials, acks over HTTP."""

from __future__ import annotations

import orjson

from webhook_connect.connector.config import ConnectorSettings
from webhook_connect.connector.httpclient import HttpClient, HttpClientError, Response
from webhook_connect.connector.transports.base import Disconnected, Refused, tls_context
from webhook_connect.shared.frames import NATIVE_SUBPROTOCOL

ACK_TIMEOUT = 10.0
REFUSING_STATUSES = (401, 403)


class HttpSide:
    """Requests to the cloud on behalf of one connection (``X-Connection-ID``)."""

    def __init__(self, settings: ConnectorSettings) -> None:
        self.settings = settings
        base = settings.cloud_url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
        self.base = base
        self.client = HttpClient(max_connections_per_host=8, ssl_context=tls_context(settings))
        self.connection_id = ""

    def headers(self) -> list[tuple[str, str]]:
        headers = [
            ("Authorization", f"Bearer {self.settings.token}"),
            ("X-Connector-ID", self.settings.connector_id),
            ("X-Webhook-Connect-Protocol", NATIVE_SUBPROTOCOL),
        ]
        if self.connection_id:
            headers.append(("X-Connection-ID", self.connection_id))
        return headers

    def query(self) -> str:
        query = f"group={self.settings.group}"
        if self.settings.window:
            query += f"&max_in_flight={self.settings.window}"
        return query

    async def post_ack(self, payload: dict[str, object]) -> None:
        """POST /connect/ack; a lost ack only means a redelivery, which the log skips."""
        try:
            response = await self.client.request(
                "POST",
                f"{self.base}/connect/ack",
                [*self.headers(), ("Content-Type", "application/json")],
                orjson.dumps(payload),
                ACK_TIMEOUT,
            )
        except (HttpClientError, OSError):
            return
        check_refused(response)

    async def aclose(self) -> None:
        await self.client.aclose()


def check_refused(response: Response) -> None:
    if response.status in REFUSING_STATUSES:
        raise Refused(f"the cloud refused the token (HTTP {response.status})")
    if response.status == 404 and b"unknown_connection" in response.body:
        raise Disconnected("the cloud forgot this connection")


async def ack_all(side: HttpSide, message_ids: list[str]) -> None:
    await side.post_ack({"message_ids": message_ids, "status": "ack"})


async def nack_one(side: HttpSide, message_id: str, *, retry: bool, reason: str) -> None:
    await side.post_ack(
        {"message_id": message_id, "status": "nack", "retry": retry, "reason": reason}
    )
