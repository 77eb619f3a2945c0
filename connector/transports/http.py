"""What the SSE and long-poll transports share: addressing, credentials, acks over HTTP."""

from __future__ import annotations

import asyncio
from urllib.parse import urlencode

import orjson

from webhook_connect.connector.config import ConnectorSettings
from webhook_connect.connector.httpclient import HttpClient, HttpClientError, Response
from webhook_connect.connector.refusal import token_refusal
from webhook_connect.connector.transports.base import (
    Disconnected,
    Refused,
    cloud_proxies,
    tls_context,
)
from webhook_connect.shared.frames import NATIVE_SUBPROTOCOL

ACK_TIMEOUT = 10.0


class HttpSide:
    """Requests to the cloud on behalf of one connection (``X-Connection-ID``)."""

    def __init__(self, settings: ConnectorSettings) -> None:
        self.settings = settings
        base = settings.cloud_url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
        self.base = base
        self.client = HttpClient(
            max_connections_per_host=8,
            ssl_context=tls_context(settings),
            proxies=cloud_proxies(settings),
        )
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

    async def post_ack(self, payload: dict[str, object], query: str = "") -> None:
        """POST /connect/ack; a lost ack only means a redelivery, which the log skips."""
        try:
            response = await self.client.request(
                "POST",
                f"{self.base}/connect/ack{query}",
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
    """Refused on the cloud's explicit refusal of the token only (connector/refusal.py)."""
    reason = token_refusal(response.status, response.body)
    if reason is not None:
        raise Refused(f"the cloud refused the token: {reason}")
    if response.status == 404 and b"unknown_connection" in response.body:
        raise Disconnected("the cloud forgot this connection")


async def ack_all(side: HttpSide, message_ids: list[str], *, seed: bool = False) -> None:
    if not seed:
        await side.post_ack({"message_ids": message_ids, "status": "ack"})
        return
    await asyncio.gather(
        *(seed_settle(side, message_id, {"status": "ack"}) for message_id in message_ids)
    )


async def nack_one(
    side: HttpSide, message_id: str, *, retry: bool, reason: str, seed: bool = False
) -> None:
    if seed:
        fields = {"status": "nack", "retry": "true" if retry else "false"}
        await seed_settle(side, message_id, fields, reason)
        return
    await side.post_ack(
        {"message_id": message_id, "status": "nack", "retry": retry, "reason": reason}
    )


async def seed_settle(
    side: HttpSide, message_id: str, fields: dict[str, str], reason: str = ""
) -> None:
    """One ack or nack the way the Core Webhook Module's cloud reads it: its ack route takes
    ``message_id``, ``status`` and ``retry`` from the query string, one message per request.
    The same fields go in a JSON body too, the form its specification draws."""
    query = urlencode({"message_id": message_id, **fields})
    body: dict[str, object] = {"message_id": message_id, **fields}
    if "retry" in fields:
        body["retry"] = fields["retry"] == "true"
    if reason:
        body["reason"] = reason
    await side.post_ack(body, f"?{query}")
