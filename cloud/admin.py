"""The administration API (``/admin/...``), behind the admin token.

No admin token configured means the API is off, and it says so (404 with the reason) rather than
being open. The token is compared in constant time; connector tokens never open it.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cloud.reloader import ConfigReloader
from cloud.tokens import bearer_token
from shared.exceptions import ConfigError, StorageError


def error(status: int, code: str, detail: object = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status)


class AdminRoutes:
    """Admin endpoints sharing one authentication step."""

    def __init__(self, admin_token: str | None, reloader: ConfigReloader) -> None:
        self._token = admin_token
        self._reloader = reloader

    def _refusal(self, request: Request) -> Response | None:
        if self._token is None:
            return error(404, "admin_disabled", "start the cloud with --admin-token to use it")
        given = bearer_token(request.headers.get("authorization")) or ""
        if not hmac.compare_digest(given.encode(), self._token.encode()):
            return JSONResponse(
                {"error": "unauthorized", "detail": "admin token required"},
                401,
                {"www-authenticate": 'Bearer realm="webhook-connect-admin"'},
            )
        return None

    def guarded(
        self, endpoint: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            return self._refusal(request) or await endpoint(request)

        return handle

    async def reload(self, request: Request) -> Response:
        """``POST /admin/reload``: load ``webhooks.json`` again now."""
        try:
            reloaded = await self._reloader.reload()
        except ConfigError as exc:
            return error(422, "invalid_config", str(exc))
        except StorageError as exc:
            return error(503, "storage_unavailable", str(exc))
        return JSONResponse({"status": "reloaded", "webhooks": sorted(reloaded.config.webhooks)})
