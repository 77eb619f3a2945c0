"""The administration API (``/admin/...``, docs/ADMIN.md), behind the admin token.

No admin token configured means the API is off, and it says so (404 with the reason) rather than
being open. The token is compared in constant time; connector tokens never open it.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from webhook_connect.cloud.admin.channels import ChannelRoutes
from webhook_connect.cloud.admin.common import guarded
from webhook_connect.cloud.admin.deadletters import DeadLetterRoutes
from webhook_connect.cloud.admin.groups import GroupRoutes
from webhook_connect.cloud.buffers import Buffer
from webhook_connect.cloud.reloader import ConfigReloader
from webhook_connect.shared.exceptions import ConfigError, HttpRefusal

PREFIX = "/admin/channels"


def admin_routes(admin_token: str | None, buffer: Buffer, reloader: ConfigReloader) -> list[Route]:
    """Every ``/admin/...`` route, each behind the admin token."""
    channels = ChannelRoutes(buffer, lambda: reloader.config)
    letters = DeadLetterRoutes(buffer)
    groups = GroupRoutes(buffer)

    async def reload(request: Request) -> Response:
        """``POST /admin/reload``: load ``webhooks.json`` again now."""
        try:
            reloaded = await reloader.reload()
        except ConfigError as exc:
            raise HttpRefusal(422, "invalid_config", str(exc)) from None
        return JSONResponse({"status": "reloaded", "webhooks": sorted(reloaded.config.webhooks)})

    table = [
        ("/admin/reload", reload, ["POST"]),
        (PREFIX, channels.index, ["GET"]),
        (PREFIX, channels.create, ["POST"]),
        (PREFIX + "/{channel}", channels.show, ["GET"]),
        (PREFIX + "/{channel}", channels.update, ["PATCH"]),
        (PREFIX + "/{channel}", channels.delete, ["DELETE"]),
        (PREFIX + "/{channel}/events", channels.events, ["GET"]),
        (PREFIX + "/{channel}/replay", channels.replay, ["POST"]),
        (PREFIX + "/{channel}/tokens", channels.tokens, ["GET"]),
        (PREFIX + "/{channel}/tokens", channels.issue, ["POST"]),
        (PREFIX + "/{channel}/rotate-token", channels.rotate, ["POST"]),
        (PREFIX + "/{channel}/tokens/{token_id}", channels.revoke, ["DELETE"]),
        (PREFIX + "/{channel}/connections", channels.connections, ["GET"]),
        (PREFIX + "/{channel}/connections/{connection_id}", channels.disconnect, ["DELETE"]),
        (PREFIX + "/{channel}/groups", groups.index, ["GET"]),
        (PREFIX + "/{channel}/groups", groups.add, ["POST"]),
        (PREFIX + "/{channel}/groups/{group}", groups.drop, ["DELETE"]),
        (PREFIX + "/{channel}/dead-letters", letters.index, ["GET"]),
        (PREFIX + "/{channel}/dead-letters", letters.purge, ["DELETE"]),
        (PREFIX + "/{channel}/dead-letters/replay", letters.replay, ["POST"]),
        (PREFIX + "/{channel}/dead-letters/{message_id}", letters.show, ["GET"]),
    ]
    # One Route per path with a method dispatcher, so a wrong method is a clean 405.
    by_path: dict[str, dict[str, object]] = {}
    for path, endpoint, methods in table:
        for method in methods:
            by_path.setdefault(path, {})[method] = guarded(admin_token, endpoint)
    return [_route(path, handlers) for path, handlers in by_path.items()]


def _route(path: str, handlers: dict[str, object]) -> Route:
    async def dispatch(request: Request) -> Response:
        handler = handlers[request.method]
        return await handler(request)  # type: ignore[operator, no-any-return]

    return Route(path, dispatch, methods=list(handlers))
