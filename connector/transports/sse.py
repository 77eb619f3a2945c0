"""SSE transport: one ``text/event-stream`` of native messages, acks by POST."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import quote

import httpx
import orjson

from connector.config import ConnectorSettings
from connector.transports.base import Disconnected, Refused, tls_context
from connector.transports.http import REFUSING_STATUSES, HttpSide, ack_all, nack_one
from shared.frames import FrameError, WireMessage, decode_native_json

SILENCE_LIMIT = 20.0  # the cloud sends a heartbeat every 5 s: this long without one is a dead link


class SseTransport:
    def __init__(self, settings: ConnectorSettings) -> None:
        self._side = HttpSide(settings)
        context = tls_context(settings)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, read=SILENCE_LIMIT),
            verify=context if context is not None else True,
        )
        self._response: httpx.Response | None = None
        self._lines: AsyncIterator[str] | None = None
        self._last_event_id = ""
        self._path = f"/connect/stream/{quote(settings.channel)}/sse"

    @property
    def connection_id(self) -> str:
        return self._side.connection_id

    async def connect(self) -> None:
        side = self._side
        headers = dict(side.headers())
        headers.pop("X-Connection-ID", None)
        headers["Accept"] = "text/event-stream"
        if self._last_event_id:
            headers["Last-Event-ID"] = self._last_event_id
        request = self._http.build_request(
            "GET", f"{side.base}{self._path}?{side.query()}", headers=headers
        )
        try:
            self._response = await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise Disconnected(f"cannot connect: {exc or type(exc).__name__}") from exc
        status = self._response.status_code
        if status in REFUSING_STATUSES:
            raise Refused(f"the cloud refused the token (HTTP {status})")
        if status != 200:
            raise Disconnected(f"HTTP {status} from the cloud")
        self._lines = self._response.aiter_lines()
        event, data = await self._next_event()
        if event != "connected":
            raise Disconnected(f"unexpected first event {event!r}")
        side.connection_id = str(orjson.loads(data)["connection_id"])

    async def _next_event(self) -> tuple[str, str]:
        assert self._lines is not None
        event, event_id = "message", ""
        data: list[str] = []
        try:
            async for line in self._lines:
                if not line:
                    if data:
                        if event_id:
                            self._last_event_id = event_id
                        return event, "\n".join(data)
                    continue
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    event = value
                elif field == "data":
                    data.append(value)
                elif field == "id":
                    event_id = value
        except (httpx.HTTPError, asyncio.IncompleteReadError) as exc:
            raise Disconnected(f"stream broke: {exc or type(exc).__name__}") from exc
        raise Disconnected("the cloud closed the stream")

    async def messages(self) -> AsyncIterator[WireMessage]:
        while True:
            event, data = await self._next_event()
            if event == "webhook":
                try:
                    yield decode_native_json(orjson.loads(data))
                except (orjson.JSONDecodeError, FrameError) as exc:
                    raise Disconnected(f"bad event from the cloud: {exc}") from exc
            elif event == "error":
                detail = orjson.loads(data)
                if detail.get("error") == "unauthorized":
                    raise Refused(f"the cloud refused the token: {detail.get('detail')}")
                raise Disconnected(f"the cloud ended the stream: {detail.get('detail')}")

    async def ack(self, message_ids: list[str]) -> None:
        await ack_all(self._side, message_ids)

    async def nack(self, message_id: str, *, retry: bool, reason: str = "") -> None:
        await nack_one(self._side, message_id, retry=retry, reason=reason)

    async def aclose(self) -> None:
        if self._response is not None:
            await self._response.aclose()
        await self._http.aclose()
        await self._side.aclose()
