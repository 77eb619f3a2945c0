"""Small raw-ASGI JSON answers for the hot path (no Request/Response objects per webhook)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.types import Send

JSON_HEADERS = [(b"content-type", b"application/json")]


async def send_json(
    send: Send,
    status: int,
    content: Any,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer with ``content`` as JSON."""
    body = orjson.dumps(content)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                *JSON_HEADERS,
                (b"content-length", str(len(body)).encode()),
                *(headers or ()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(
    send: Send,
    status: int,
    error: str,
    detail: Any = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer ``{"error": ..., "detail": ...}`` with ``status``."""
    await send_json(send, status, {"error": error, "detail": detail}, headers)
