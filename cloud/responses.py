"""JSON answers: raw ASGI for ingest's 202 (no Request/Response objects per accepted webhook),
and the one answer to every refused HTTP request."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Send

from webhook_connect.shared.exceptions import HttpRefusal

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


def refusal_response(refusal: HttpRefusal) -> Response:
    """The one answer to a refused HTTP request, wherever it was refused (ingest, the admin
    API, /docs): ``status``, ``{"error": ..., "detail": ...}`` and the refusal's headers.

    A Starlette endpoint returns it; raw ASGI code (ingest) calls it: ``await
    refusal_response(exc)(scope, receive, send)``.
    """
    response = Response(
        orjson.dumps({"error": refusal.error, "detail": refusal.detail}),
        refusal.status,
        media_type="application/json",
    )
    response.raw_headers.extend(refusal.headers)
    return response
