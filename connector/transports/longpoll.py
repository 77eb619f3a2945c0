"""Long-poll transport: ``GET .../poll`` in a loop on one connection id, acks by POST."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import quote, urlsplit

import orjson

from webhook_connect.connector.causes import describe
from webhook_connect.connector.config import ConnectorSettings
from webhook_connect.connector.httpclient import HttpClientError
from webhook_connect.connector.refusal import not_a_refusal
from webhook_connect.connector.transports.base import Disconnected, Refused
from webhook_connect.connector.transports.http import HttpSide, ack_all, check_refused, nack_one
from webhook_connect.shared.frames import FrameError, WireMessage, decode_native_json

POLL_SECONDS = 25
POLL_BATCH = 100
# The Core Webhook Module's cloud answers polls in the seed dialect and forgets the connection
# as it answers, so an ack can never reach it and every message would come back forever.
SEED_POLL = (
    "the cloud answers polls in the seed dialect (the Core Webhook Module's cloud), whose "
    "long-poll cannot take acks: use protocol websocket or sse with it"
)


class LongPollTransport:
    def __init__(self, settings: ConnectorSettings) -> None:
        self._side = HttpSide(settings)
        self._first: list[WireMessage] = []
        self._path = f"/connect/stream/{quote(settings.channel)}/poll"

    @property
    def connection_id(self) -> str:
        return self._side.connection_id

    async def _poll(self, seconds: int) -> list[WireMessage]:
        side = self._side
        url = f"{side.base}{self._path}?timeout={seconds}&max_messages={POLL_BATCH}&{side.query()}"
        try:
            response = await side.client.request("GET", url, side.headers(), b"", seconds + 15)
        except (HttpClientError, OSError) as exc:
            cause = describe(exc, urlsplit(side.base).hostname or "", seconds + 15)
            raise Disconnected(f"poll failed: {cause}") from exc
        check_refused(response)
        if response.status == 204:
            side.connection_id = response.header("x-connection-id") or side.connection_id
            return []
        if response.status != 200:
            kind = response.header("content-type") or ""
            raise Disconnected(f"poll: {not_a_refusal(response.status, response.body, kind)}")
        try:
            data = orjson.loads(response.body)
            if any(isinstance(m, dict) and "body_b64" not in m for m in data["messages"]):
                raise Refused(SEED_POLL)
            side.connection_id = str(data["connection_id"])
            return [decode_native_json(m) for m in data["messages"]]
        except (orjson.JSONDecodeError, KeyError, TypeError, FrameError) as exc:
            raise Disconnected(f"bad poll answer: {exc}") from exc

    async def connect(self) -> None:
        # The cloud opens the connection with the first poll and names it in its answer.
        self._first = await self._poll(1)
        if not self._side.connection_id:
            raise Disconnected("the cloud did not name the connection")

    async def messages(self) -> AsyncIterator[WireMessage]:
        batch, self._first = self._first, []
        while True:
            for message in batch:
                yield message
            batch = await self._poll(POLL_SECONDS)

    async def ack(self, message_ids: list[str]) -> None:
        await ack_all(self._side, message_ids)

    async def nack(self, message_id: str, *, retry: bool, reason: str = "") -> None:
        await nack_one(self._side, message_id, retry=retry, reason=reason)

    async def aclose(self) -> None:
        await self._side.aclose()
